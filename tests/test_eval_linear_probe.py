import math

import numpy as np
import pytest
import torch

from deepcluster.data import CenterView, FolderSource, Normalize
from deepcluster.evaluation.features import probe_pooling
from deepcluster.evaluation.linear_probe import (ProbeSettings, RandomCropFlipView, probe_learning_rate,
                                                 train_linear_probe, train_probes_augmented)
from deepcluster.models import create_model
from PIL import Image


def linearly_separable(n: int, dim: int, n_classes: int, seed: int):
    """Labels given by the argmax of a fixed random linear map: separable by construction."""
    rng = np.random.default_rng(seed)
    weights = np.random.default_rng(100).standard_normal((dim, n_classes))
    features = rng.standard_normal((n, dim)).astype(np.float32)
    return features, (features @ weights).argmax(axis=1)


@pytest.mark.slow
def test_probe_reaches_high_accuracy_on_linearly_separable_features():
    train_x, train_y = linearly_separable(600, 20, 4, seed=0)
    val_x, val_y = linearly_separable(200, 20, 4, seed=1)
    result = train_linear_probe(train_x, train_y, val_x, val_y, 4, ProbeSettings(epochs=30, batch_size=32))
    assert result.top1 >= 90.0
    assert result.top5 == 100.0  # 4 classes: the top 5 always hold the truth
    assert len(result.history) == 30 and result.history[-1]["top1"] == result.top1
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.best_top1 >= result.top1 and 1 <= result.best_epoch <= 30


def test_probe_is_deterministic_given_its_seed():
    train_x, train_y = linearly_separable(100, 8, 3, seed=0)
    a = train_linear_probe(train_x, train_y, train_x, train_y, 3, ProbeSettings(epochs=2, batch_size=16, seed=5))
    b = train_linear_probe(train_x, train_y, train_x, train_y, 3, ProbeSettings(epochs=2, batch_size=16, seed=5))
    assert a.history == [dict(r, **{}) for r in b.history]


def test_learning_rate_follows_the_reference_decay():
    assert probe_learning_rate(0.01, 1e-4, 0) == 0.01
    assert probe_learning_rate(0.01, 1e-4, 10_000) == pytest.approx(0.01 / math.sqrt(1.01))
    assert probe_learning_rate(0.01, 0.0, 10**9) == 0.01


def test_probe_rejects_bad_input():
    x, y = linearly_separable(10, 4, 2, seed=0)
    with pytest.raises(ValueError, match=r"features must be \(N, D\) and \(M, D\)"):
        train_linear_probe(x, y, x[:, :3], y, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        train_linear_probe(x, y + 5, x, y, 2)


def test_reference_crop_view_crops_and_flips_deterministically():
    image = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    view = RandomCropFlipView(resize=24, crop=20)
    a = view(image, np.random.default_rng(0))
    b = view(image, np.random.default_rng(0))
    assert a.shape == (3, 20, 20) and a.dtype == torch.uint8
    assert torch.equal(a, b)


@pytest.mark.slow
def test_reference_mode_trains_one_probe_per_layer(image_folder):
    torch.manual_seed(0)
    model = create_model("smallnet")
    source = FolderSource(image_folder)
    pools = {name: spec for name, spec in probe_pooling(model, 32).items() if name in ("conv1", "conv7")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = train_probes_augmented(model, source, source.labels, source, source.labels, 3, pools,
                                     RandomCropFlipView(36, 32), CenterView(32, 32), Normalize(),
                                     ProbeSettings(epochs=1, batch_size=12))
    assert set(results) == {"conv1", "conv7"}
    for result in results.values():
        # a share of the 36 validation images, in percent
        assert len(result.history) == 1 and result.history[0]["top1"] == result.top1
        assert (result.best_top1, result.best_epoch) == (result.top1, 1)  # one epoch: the last is the best
        assert abs(result.top1 * 36 / 100 - round(result.top1 * 36 / 100)) < 1e-6, result.top1
    # The backbone is frozen: weights and BatchNorm statistics are untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
