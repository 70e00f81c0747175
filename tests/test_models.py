import pytest
import torch

from deepcluster.models import SobelFilter, create_model
from deepcluster.models.heads import ClassifierHead


def test_sobel_gives_known_gradients_of_a_vertical_edge():
    # Left half 0, right half 1: a vertical edge between columns 3 and 4.
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 1.0
    out = SobelFilter()(image)
    assert out.shape == (1, 2, 8, 8)
    horizontal, vertical = out[0, 0], out[0, 1]
    # Kernel [[1,0,-1],[2,0,-2],[1,0,-1]] (cross-correlation): left minus right = -4 at the edge.
    assert torch.allclose(horizontal[2:6, 3], torch.full((4,), -4.0))
    assert torch.allclose(horizontal[2:6, 4], torch.full((4,), -4.0))
    assert torch.allclose(horizontal[2:6, 1], torch.zeros(4))
    assert torch.allclose(horizontal[2:6, 6], torch.zeros(4))
    # No horizontal edge inside the image: the vertical gradient vanishes away from the border.
    assert torch.allclose(vertical[1:7, :], torch.zeros(6, 8))


def test_sobel_uses_plain_channel_mean_and_is_not_trained():
    sobel = SobelFilter()
    assert list(sobel.parameters()) == []
    red = torch.zeros(1, 3, 5, 5)
    red[0, 0, :, 3:] = 3.0  # only the red channel has the edge: gray = 1.0 there
    gray_edge = torch.zeros(1, 3, 5, 5)
    gray_edge[..., 3:] = 1.0
    assert torch.allclose(sobel(red), sobel(gray_edge))


@pytest.mark.parametrize("arch, size, dim", [pytest.param("alexnet", 224, 4096, marks=pytest.mark.slow), ("smallnet", 32, 512),
                                             pytest.param("vgg16", 64, 4096, marks=pytest.mark.slow)])
def test_backbones_share_one_interface(arch, size, dim):
    torch.manual_seed(0)
    model = create_model(arch).eval()
    images = torch.randn(2, 3, size, size)
    features = model.forward_features(images)
    assert features.shape == (2, dim)
    assert model.taps()[0] == "conv1"
    head = ClassifierHead.for_backbone(model)
    head.reset(7)
    assert head(model.forward_features(images)).shape == (2, 7)
    assert model.features[0].in_channels == 2  # Sobel in front


def test_alexnet_matches_the_reference_layout():
    model = create_model("alexnet")
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (96, 11, 4), (256, 5, 1), (384, 3, 1), (384, 3, 1), (256, 3, 1)]
    assert len([m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]) == 5
    body = model.forward_body(torch.zeros(1, 3, 224, 224))
    assert body.shape == (1, 256, 6, 6)
    assert model.classifier[1].in_features == 256 * 6 * 6
    # The clustered features are taken before the last ReLU: they can be negative.
    assert isinstance(model.classifier[-1], torch.nn.Linear)


def test_reset_creates_a_fresh_head_with_reference_init():
    torch.manual_seed(0)
    model = create_model("smallnet")
    head = ClassifierHead.for_backbone(model)
    first = head.reset(1000)
    second = head.reset(1000)
    assert first is not second and head.linear is second and head.n_outputs == 1000
    assert torch.all(second.bias == 0)
    assert abs(second.weight.std().item() - 0.01) < 0.001
    assert not any(p is second.weight for p in model.parameters())


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'resnet9'; choose one of"):
        create_model("resnet9")


def test_forward_taps_reads_any_layers_in_one_pass_and_their_pre_activation_maps():
    torch.manual_seed(0)
    model = create_model("smallnet", feature_dim=16).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        taps = model.forward_taps(images, ["conv2", "conv5", "fc"])
        alone = model.forward_taps(images, ["conv5"])["conv5"]
        before = model.forward_taps(images, ["conv2", "conv5"], pre_activation=True)
    assert torch.equal(taps["conv5"], alone) and torch.equal(taps["fc"], model.forward_features(images))
    assert torch.equal(torch.relu(before["conv2"]), taps["conv2"]) and (before["conv5"] < 0).any()
    assert list(model.tap_shapes(32)) == model.taps() and model.tap_shapes(32)["conv1"] == (32, 32, 32)
    assert model.first_conv().in_channels == 2


def test_smallnet_has_its_one_shape():
    """Seven conv layers of 32 ... 256 channels (the width and depth settings were retired)."""
    model = create_model("smallnet", clustered="body")
    assert [m.out_channels for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)] == [
        32, 32, 64, 64, 128, 128, 256]
    with torch.no_grad():
        assert model.eval().forward_clustered(torch.randn(2, 3, 32, 32)).shape == (2, model.body_dim)
    with pytest.raises(TypeError):
        create_model("smallnet", width=2)
