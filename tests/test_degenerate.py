"""Degenerate training: a NaN loss stops the run cleanly (exit 3, last good checkpoint kept);
one cluster holding more than half of the images is warned about and logged."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from conftest import make_pattern, one_epoch
from deepcluster.cli import EXIT_DIVERGED
from deepcluster.health import TrainingDiverged, check_features, cluster_warnings


def leftovers(run):
    return sorted(run.glob(".*.tmp-*")) + sorted(run.glob("assignments/.*.tmp-*"))


def test_a_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(cli, image_folder, tmp_path):
    """The second batch of epoch 2 gets a NaN loss (``DEEPCLUSTER_FAULT=nan:training:2``)."""
    run = tmp_path / "run"
    good = one_epoch(cli, image_folder, run)
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume",
                         fault="nan:training:2")
    assert code == EXIT_DIVERGED
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "training loss became nan at epoch 2, batch 2" in err and "the checkpoint of epoch 1 is kept" in err
    assert (run / "checkpoint.pt").read_bytes() == good
    assert (run / "log.jsonl").read_text().count("\n") == 1
    assert sorted(p.name for p in (run / "assignments").iterdir()) == ["epoch_0001.npy"]
    assert leftovers(run) == []


def test_an_absurd_learning_rate_diverges_for_real_with_one_line(cli, image_folder, tmp_path):
    """No injection: lr = 1e30 blows the weights up within the first batches."""
    run = tmp_path / "run"
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--lr", "1e30")
    assert code == EXIT_DIVERGED and err.count("\n") == 1
    assert "training loss became nan at epoch 1" in err and "no checkpoint had been written yet" in err
    assert "lower 'lr'" in err
    assert not (run / "checkpoint.pt").exists() and leftovers(run) == []
    assert (run / "log.jsonl").read_text() == ""


def test_nan_weights_in_a_checkpoint_stop_at_the_feature_pass(cli, image_folder, tmp_path):
    run = tmp_path / "run"
    one_epoch(cli, image_folder, run)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    name = next(k for k, v in saved["model"].items() if v.is_floating_point() and k.startswith("classifier"))
    saved["model"][name][0] = float("nan")
    saved.pop("checksum", None)  # edited by hand: without the checksum, which would refuse it first
    torch.save(saved, run / "checkpoint.pt")
    poisoned = (run / "checkpoint.pt").read_bytes()
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume")
    assert code == EXIT_DIVERGED and err.count("\n") == 1
    assert "features became NaN or infinite at epoch 2" in err
    assert (run / "checkpoint.pt").read_bytes() == poisoned


def test_check_features_finds_one_bad_value_in_any_block():
    features = np.zeros((10, 3), dtype=np.float32)
    check_features(features, 0, block=4)
    features[9, 2] = np.inf
    try:
        check_features(features, 4, block=4)
    except TrainingDiverged as error:
        assert "epoch 5" in str(error)
    else:
        raise AssertionError("an infinite feature was not reported")


def test_cluster_warnings_fire_above_half_and_ignore_unusable_images():
    assert cluster_warnings(np.array([0, 0, 1, 1])) == []  # exactly half: fine
    warned = cluster_warnings(np.array([2, 2, 2, 0, 1, -1, -1, -1]))
    assert len(warned) == 1 and warned[0].startswith("cluster 2 holds 60.0% of the images")
    assert cluster_warnings(np.array([-1, -1])) == []


def test_a_dominant_cluster_is_warned_once_per_epoch_and_recorded(cli, tmp_path):
    """A real run on a folder where 24 of 36 images are the same picture."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    duplicate = make_pattern(0, rng)
    for i in range(36):
        Image.fromarray(duplicate if i < 24 else make_pattern(i % 3, rng)).save(data / f"{i:02d}.png")
    run = tmp_path / "run"
    code, out, err = cli("train", "--data", data, "--out", run, "--epochs", "2")
    assert code == 0, err
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["largest_cluster_share"] >= 24 / 36 for r in records)
    for record in records:
        assert len(record["warnings"]) == 1 and "more than half" in record["warnings"][0]
    printed = [line for line in out.splitlines() if line.startswith("deepcluster: warning:")]
    assert [line.split(":")[2].strip() for line in printed] == ["epoch 1", "epoch 2"]
