"""The online kNN a run logs equals ``deepcluster eval``'s kNN of the same weights, on a
validation folder apart from the training images (a few hundred images, of which the
training folder holds none), for v1 and v2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_pattern
from test_v2_train import TINY_V2

N_PER_CLASS = 80


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> Path:
    """240 PNGs in the training folder's three classes, drawn from another seed, with noise
    so that the kNN is not perfect."""
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(99)
    for kind, name in enumerate(["stripes", "rings", "checkers"]):
        (root / name).mkdir()
        for i in range(N_PER_CLASS):
            image = make_pattern(kind, rng).astype(np.float32) + rng.normal(0, 60, size=(24, 24, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def eval_knn(cli, checkpoint: Path, train: Path, val: Path, out: Path) -> dict:
    code, _, err = cli("eval", checkpoint, "--train", train, "--val", val, "--protocols", "knn", "--baseline",
                       "none", "--out", out, "--workers", "0", "--threads", "1")
    assert code == 0, err
    return json.loads((out / "eval.json").read_text())["results"]["trained"]["knn"]


def assert_agrees(online: float, offline: float) -> None:
    assert online == pytest.approx(offline, abs=1e-6)
    # a share of the 240 validation images, and not a trivial one
    assert abs(online * 2.4 - round(online * 2.4)) < 1e-6 and 0 < online < 100, online


@pytest.mark.slow
def test_v1_online_knn_equals_eval_knn_on_a_separate_val_folder(cli, image_folder, val_folder, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--val", val_folder)
    assert code == 0, err
    final = json.loads((run / "final.json").read_text())
    knn = eval_knn(cli, run / "checkpoint.pt", image_folder, val_folder, tmp_path / "eval")
    assert_agrees(final["knn_top1"], knn["fc"]["top1"])


@pytest.mark.slow
def test_v2_online_knn_equals_eval_knn_on_a_separate_val_folder(run_cli, image_folder, val_folder, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--data", image_folder, "--out", run, "--val", val_folder, *TINY_V2,
                           "--epochs", "2")
    assert code == 0, err
    final = json.loads((run / "final.json").read_text())
    knn = eval_knn(run_cli, run / "checkpoint.pt", image_folder, val_folder, tmp_path / "eval")
    assert_agrees(final["knn_top1"], knn["fc"]["top1"])
