"""The building blocks of DeepCluster-v2 and of the ResNets, on tiny seeded data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deepcluster.clustering import kmeans, nmi
from deepcluster.data.multicrop import CropGroup, MultiCrop
from deepcluster.losses import IGNORE, pseudo_label_loss
from deepcluster.methods.v2 import EMPTY_RULE
from deepcluster.models.projection import MultiCropModel, ProjectionHead, Prototypes, crop_groups
from deepcluster.models.resnet import ResNet18, ResNet50
from deepcluster.optim import LARS, warmup_cosine


def test_one_head_one_crop_at_temperature_1_is_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=generator)
    targets = torch.randint(0, 7, (16,), generator=generator)
    assert torch.allclose(pseudo_label_loss([logits], targets[None]), F.cross_entropy(logits, targets))


def test_heads_are_averaged_crops_share_targets_and_ignored_images_count_nowhere():
    generator = torch.Generator().manual_seed(1)
    batch, crops = 4, 3
    scores = [torch.randn(crops * batch, 5, generator=generator), torch.randn(crops * batch, 9, generator=generator)]
    targets = torch.tensor([[0, 4, IGNORE, 2], [8, 1, 3, IGNORE]])
    expected = sum(F.cross_entropy(s / 0.1, t.repeat(crops), ignore_index=IGNORE) for s, t in zip(scores, targets)) / 2
    assert torch.allclose(pseudo_label_loss(scores, targets, temperature=0.1), expected)
    # Every target ignored (an epoch before any clustering): zero, with a zero gradient, not NaN.
    logits = torch.randn(8, 3, requires_grad=True)
    loss = pseudo_label_loss([logits], torch.full((1, 8), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def unit_blobs(n_per: int, n_blobs: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_blobs, dim, generator=generator), dim=1)
    labels = np.repeat(np.arange(n_blobs), n_per)
    points = centers[torch.from_numpy(labels)] + noise * torch.randn(n_blobs * n_per, dim, generator=generator)
    return F.normalize(points, dim=1), labels


def spherical_kmeans(points: torch.Tensor, n_clusters: int, n_iter: int = 10, seed: int = 0, empty: str = "keep"):
    """The k-means v2 runs (``methods.v2.cluster_bank``), for one process."""
    return kmeans(points, n_clusters, n_iter, seed, backend="torch", init="randperm", metric="cosine",
                  empty=EMPTY_RULE[empty], shard=True)


def test_spherical_kmeans_keeps_unit_centroids_never_worsens_and_finds_blobs():
    points, labels = unit_blobs(50, 6, 16, 0.05, seed=2)
    result = spherical_kmeans(points, 6, n_iter=10, seed=3)
    assert np.allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    assert all(b >= a - 1e-6 for a, b in zip(result.objective, result.objective[1:]))
    assert len(result.objective) == 11
    # Random starts can put two centroids in one blob; the best of a few restarts finds them all.
    best = max((spherical_kmeans(points, 6, n_iter=10, seed=seed) for seed in range(8)), key=lambda r: r.objective[-1])
    assert nmi(labels, best.assignments) > 0.99
    # The final assignments are the nearest (largest dot product) final centroids.
    assert np.array_equal(result.assignments, (points @ torch.from_numpy(result.centroids).T).argmax(dim=1).numpy())


def test_spherical_kmeans_empty_clusters_kept_or_split():
    points, _ = unit_blobs(30, 3, 8, 0.0, seed=4)  # 3 distinct points, 30 copies each
    kept = spherical_kmeans(points, 6, n_iter=5, seed=0, empty="keep")
    split = spherical_kmeans(points, 6, n_iter=5, seed=0, empty="split")
    assert kept.n_empty == 3 and kept.n_split == 0
    assert split.n_split > 0
    with pytest.raises(ValueError, match="empty-cluster policy"):
        kmeans(points, 3, backend="torch", metric="cosine", empty="drop")
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        spherical_kmeans(points[:2], 3)


def test_prototypes_are_frozen_and_take_the_centroids():
    prototypes = Prototypes(8, [5, 7])
    assert prototypes.counts == [5, 7]
    assert not any(p.requires_grad for p in prototypes.parameters())
    centroids = F.normalize(torch.randn(7, 8), dim=1)
    prototypes.set(1, centroids)
    embeddings = F.normalize(torch.randn(3, 8), dim=1)
    assert torch.allclose(prototypes(embeddings)[1], embeddings @ centroids.T)


@pytest.mark.slow
def test_grouped_multicrop_forward_equals_one_crop_at_a_time():
    torch.manual_seed(5)
    model = MultiCropModel(ResNet18(stem="cifar"), ProjectionHead(512, 64, 16), Prototypes(16, [10, 12])).eval()
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16),
             torch.randn(3, 3, 16, 16)]
    assert crop_groups(crops) == [(0, 2), (2, 5)]
    with torch.no_grad():
        embeddings, scores = model(crops)
        single = torch.cat([model.projection(model.backbone.forward_features(c)) for c in crops])
    assert embeddings.shape == (15, 16)
    assert torch.allclose(embeddings, single, atol=1e-5)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(15), atol=1e-5)
    assert [s.shape for s in scores] == [(15, 10), (15, 12)]


def test_lars_scales_each_layer_and_leaves_1d_parameters_to_sgd():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS([weight, bias], lr=0.5, momentum=0.0, weight_decay=0.1, trust=0.02, exclude_1d=True)
    weight.grad, bias.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])  # |g| = 2
    optimizer.step()
    ratio = 0.02 * 5.0 / (2.0 + 0.1 * 5.0 + 1e-8)
    expected = torch.tensor([[3.0, 4.0]]) - 0.5 * ratio * (torch.tensor([[0.0, 2.0]]) + 0.1 * torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(weight.detach(), expected)
    assert torch.allclose(bias.detach(), torch.tensor([1.0 - 0.5 * 0.5]))  # plain SGD, no weight decay


def test_warmup_then_cosine_per_step():
    rates = warmup_cosine(0.6, 0.0006, epochs=10, steps_per_epoch=5, warmup_epochs=2, start_warmup=0.0)
    assert rates.shape == (50,)
    assert rates[0] == 0.0 and np.all(np.diff(rates[:10]) > 0)
    assert rates[10] == pytest.approx(0.6)
    assert np.all(np.diff(rates[10:]) < 0) and 0.0006 < rates[-1] < 0.002  # the last step is one short of the end


@pytest.mark.parametrize("cls, params, dim", [(ResNet18, 11_176_512, 512), (ResNet50, 23_508_032, 2048)])
@pytest.mark.slow
def test_resnets_have_the_reference_sizes_and_taps(cls, params, dim):
    model = cls(stem="imagenet").eval()
    assert sum(p.numel() for p in model.parameters()) == params  # torchvision's, without the fc layer
    assert model.taps() == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert model.tap_shapes(64)["layer4"] == (dim, 2, 2)
    cifar = cls(stem="cifar").eval()
    assert cifar.tap_shapes(32)["stem"] == (64, 32, 32) and cifar.tap_shapes(32)["layer4"] == (dim, 4, 4)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        taps = cifar.forward_taps(images, ["layer2", "fc"])
        pre = cifar.forward_taps(images, ["layer2"], pre_activation=True)
        assert torch.allclose(taps["fc"], cifar.forward_features(images))
        assert torch.allclose(torch.relu(pre["layer2"]), taps["layer2"])
    assert cifar.clustered_dim == dim


def test_resnet_with_sobel_sees_two_channels():
    model = ResNet18(sobel=True, stem="cifar")
    assert model.features.stem.conv.in_channels == 2
    with pytest.raises(ValueError, match="stem"):
        ResNet18(stem="tiny")
    with pytest.raises(ValueError, match="feature_dim"):
        ResNet18(feature_dim=128)


def test_multicrop_gives_the_crops_large_first_and_repeats_with_the_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    views = MultiCrop((CropGroup(32, 2, (0.14, 1.0)), CropGroup(16, 3, (0.05, 0.14))))
    crops = views(image, np.random.default_rng(7))
    assert views.n_crops == 5 and [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    again = views(image, np.random.default_rng(7))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    assert all(c.dtype == torch.uint8 for c in crops)


@pytest.mark.slow
def test_everything_v1_does_works_on_a_resnet(cli, image_folder, tmp_path):
    """ResNet-18 with the CIFAR stem through every command: train (online kNN), eval (linear
    probes per stage, kNN, clustering, retrieval), assign, features, export and report."""
    import json

    from deepcluster.models import load_backbone_safetensors

    run = tmp_path / "run"
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--arch", "resnet18",
                         "--stem", "cifar", "--sobel", "false", "--feature_dim", "none", "--resize", "16", "--crop", "16",
                         "--val", image_folder)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("knn_top1" in r for r in records)
    code, _, err = cli("eval", run, "--train", image_folder, "--val", image_folder, "--out", tmp_path / "eval",
                       "--workers", "0", "--baseline", "none", "--probe-epochs", "1")
    assert code == 0, err
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]["trained"]
    assert set(results["linear"]["layers"]) >= {"stem", "layer1", "layer4"}
    code, _, err = cli("assign", run, "--data", image_folder, "--out", tmp_path / "a.csv", "--format", "csv")
    assert code == 0, err
    code, _, err = cli("features", run, "--data", image_folder, "--out", tmp_path / "f")
    assert code == 0, err
    code, _, err = cli("export", run, "--out", tmp_path / "b.safetensors")
    assert code == 0, err
    model = load_backbone_safetensors(tmp_path / "b.safetensors")
    assert model.arch == "resnet18" and model.stem_kind == "cifar"
    code, _, err = cli("report", run, "--out", tmp_path / "report", "--max-clusters", "2", "--images-per-cluster", "2")
    assert code == 0, err
    code, _, err = cli("train", "--data", image_folder, "--out", tmp_path / "bad", "--stem", "cifar")
    assert code == 2 and "ResNets only" in err
