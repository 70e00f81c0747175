import numpy as np
import pytest
import torch
from torch.nn import functional as F

from deepcluster.data import CenterView, FolderSource, Normalize
from deepcluster.evaluation.features import (FC_LAYER, PoolSpec, choose_pooling, extract_features, forward_layers,
                                             probe_pooling)
from deepcluster.models import create_model


@pytest.mark.slow
def test_alexnet_pooling_reproduces_the_paper_table_at_224_px():
    pools = probe_pooling(create_model("alexnet"), 224)
    assert list(pools) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert [spec.dim for spec in pools.values()] == [9600, 9216, 9600, 9600, 9216]
    # The authors' AvgPool2d(kernel, stride=kernel, padding) of each layer.
    assert [(spec.kernel, spec.padding) for spec in pools.values()] == [(6, 3), (4, 0), (3, 1), (3, 1), (2, 0)]


@pytest.mark.slow
def test_pooled_activations_have_the_stated_dims():
    torch.manual_seed(0)
    model = create_model("alexnet").eval()
    pools = probe_pooling(model, 224)
    with torch.no_grad():
        out = forward_layers(model, torch.randn(2, 3, 224, 224), pools, include_fc=True)
    assert {name: tuple(t.shape) for name, t in out.items()} == {
        "conv1": (2, 9600), "conv2": (2, 9216), "conv3": (2, 9600), "conv4": (2, 9600), "conv5": (2, 9216),
        FC_LAYER: (2, 4096)}


@pytest.mark.parametrize("channels, size", [(32, 32), (64, 16), (256, 4), (512, 14), (3, 200)])
def test_choose_pooling_is_closest_to_the_target_among_all_poolings(channels, size):
    spec = choose_pooling(channels, size, size, target_dim=9000)
    for kernel in range(1, size + 1):
        for padding in range(kernel // 2 + 1):
            if kernel <= size + 2 * padding:
                other = PoolSpec(channels, size, size, kernel, padding)
                assert abs(spec.dim - 9000) <= abs(other.dim - 9000)


def test_a_map_smaller_than_the_target_is_kept_whole():
    spec = choose_pooling(256, 4, 4)
    assert (spec.kernel, spec.dim) == (1, 4096)
    x = torch.randn(2, 256, 4, 4)
    assert torch.equal(spec.apply(x), x.flatten(1))


@pytest.mark.slow
def test_forward_layers_taps_the_post_relu_map_and_pools_it():
    torch.manual_seed(0)
    model = create_model("smallnet").eval()
    images = torch.randn(3, 3, 32, 32)
    pools = probe_pooling(model, 32)
    with torch.no_grad():
        out = forward_layers(model, images, {"conv3": pools["conv3"]})
        relus = [i for i, module in enumerate(model.features) if isinstance(module, torch.nn.ReLU)]
        reference = model.features[:relus[2] + 1](model.sobel(images))  # conv3: the third conv block's ReLU
    assert (reference >= 0).all()  # post-ReLU
    spec = pools["conv3"]
    expected = F.avg_pool2d(reference, spec.kernel, spec.kernel, spec.padding).flatten(1)
    assert torch.allclose(out["conv3"], expected, atol=1e-6)
    with torch.no_grad():
        fc = forward_layers(model, images, {}, include_fc=True)[FC_LAYER]
        assert torch.allclose(fc, model.forward_features(images), atol=1e-6)


def test_forward_layers_rejects_an_unknown_layer():
    model = create_model("smallnet").eval()
    with pytest.raises(KeyError, match="conv9"):
        forward_layers(model, torch.zeros(1, 3, 32, 32), {"conv9": choose_pooling(8, 4, 4)})


@pytest.mark.slow
def test_extract_features_in_memory_and_on_disk_agree(image_folder, tmp_path):
    torch.manual_seed(0)
    model = create_model("smallnet")
    source = FolderSource(image_folder)
    pools = {name: spec for name, spec in probe_pooling(model, 32).items() if name in ("conv1", "conv7")}
    args = (model, source, CenterView(32, 32), Normalize(), pools)
    memory = extract_features(*args, batch_size=8)
    disk = extract_features(*args, batch_size=5, storage_dir=tmp_path, prefix="train_")
    assert memory.ok.all() and len(memory.ok) == 36
    assert set(memory.layers) == {"conv1", "conv7", FC_LAYER}
    for name in memory.layers:
        assert memory.layers[name].shape == (36, pools[name].dim if name in pools else 512)
        np.testing.assert_allclose(memory.layers[name], np.asarray(disk.layers[name]), atol=1e-5)
    assert (tmp_path / "train_conv1.npy").is_file()
    assert not model.training  # frozen BatchNorm statistics
