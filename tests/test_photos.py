"""Your own photos: the recipe and k a folder gets without ``--recipe``, the time budget
(``--minutes``), and the three commands a user types on a folder of real photos."""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from deepcluster import autorecipe, budget
from deepcluster.config import RECIPES, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_the_k_rule_follows_the_folder_size():
    assert [autorecipe.k_rule(n) for n in (10, 60, 200, 300, 2_000, 4_000, 9_469, 50_000, 1_281_167)] == \
        [2, 12, 40, 50, 50, 100, 237, 1_250, 10_000]
    for n in (10, 60, 200, 300, 2_000, 10**6):
        assert 2 <= autorecipe.k_rule(n) <= max(2, n // 5)  # at least 5 images a cluster


def photos(folder: Path, count: int, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    return folder


def test_a_folder_of_photos_gets_the_photo_recipe_and_k_from_its_size(tmp_path):
    folder = photos(tmp_path / "p", 60, (80, 64))
    (folder / "a" / "broken.jpg").write_bytes(b"not an image")  # skipped by the look
    said = []
    recipe, overrides = autorecipe.choose(None, None, {"data": str(folder)}, say=said.append)
    assert recipe == "photo" and overrides["n_clusters"] == autorecipe.k_rule(61) == 12
    assert said == [f"recipe: photo (61 image files, median 80x64 px, shorter side >= 64 px); k = 12 "
                    f"({autorecipe.K_RULE}; --n_clusters sets it); carry_clusters false ({autorecipe.CARRY_RULE}; "
                    "--carry_clusters true sets it)"]
    config = resolve(recipe, overrides={**overrides, "out_dir": str(tmp_path / "run")})
    assert (config.lr, config.carry_clusters, config.n_clusters) == (0.02, False, 12)


def test_photo_carries_its_clusters_only_on_a_large_folder(tmp_path, monkeypatch):
    """carry_clusters stays the recipe's (true) from CARRY_MIN_IMAGES images on; below, it is
    turned off, whether photo was picked or named, unless the command line or file sets it."""
    folder = photos(tmp_path / "p", 12, (80, 64))
    quiet = dict(say=None)
    data = {"data": str(folder)}
    assert RECIPES["photo"]["carry_clusters"] is True and autorecipe.CARRY_MIN_IMAGES == 9_000
    assert autorecipe.choose(None, None, data, **quiet)[1]["carry_clusters"] is False
    assert autorecipe.choose("photo", None, {**data, "n_clusters": 3}, **quiet)[1]["carry_clusters"] is False
    assert autorecipe.choose(None, None, {**data, "carry_clusters": "true"}, **quiet)[1]["carry_clusters"] == "true"
    assert "carry_clusters" not in autorecipe.choose("small", None, data, **quiet)[1]
    file = tmp_path / "s.yaml"
    file.write_text("carry_clusters: true\n")
    assert "carry_clusters" not in autorecipe.choose(None, file, data, **quiet)[1]
    real = autorecipe.look
    for n_images, carried in ((autorecipe.CARRY_MIN_IMAGES - 1, False), (autorecipe.CARRY_MIN_IMAGES, None)):
        monkeypatch.setattr(autorecipe, "look", lambda root, n=n_images: dataclasses.replace(real(root), n_images=n))
        said = []
        assert autorecipe.choose(None, None, data, say=said.append)[1].get("carry_clusters") is carried
        assert ("carry_clusters false" in said[0]) == (carried is False)


def test_small_images_get_the_small_recipe_its_k_capped_to_the_folder(image_folder):
    said = []
    recipe, overrides = autorecipe.choose(None, None, {"data": str(image_folder)}, say=said.append)
    assert recipe == "small" and RECIPES["small"]["n_clusters"] == 100
    assert overrides["n_clusters"] == 36 // 5 and "shorter side < 64 px" in said[0]


def test_what_is_given_wins_over_the_choice(image_folder, tmp_path):
    data = {"data": str(image_folder)}
    quiet = dict(say=None)
    assert autorecipe.choose("paper", None, data, **quiet) == ("paper", data)  # the paper's k = 10,000
    assert autorecipe.choose(None, None, {**data, "n_clusters": "7"}, **quiet)[1]["n_clusters"] == "7"
    assert autorecipe.choose(None, None, data, resume=True, **quiet) == (None, data)
    assert autorecipe.choose(None, None, {}, **quiet) == (None, {})  # the built-in digits
    file = tmp_path / "s.yaml"
    file.write_text("recipe: photo\nn_clusters: 9\n")
    small = {"carry_clusters": False}  # 36 images: photo's carry rule
    assert autorecipe.choose(None, file, data, **quiet) == ("photo", {**data, **small})  # the file's k
    file.write_text("recipe: photo\n")
    assert autorecipe.choose(None, file, data, **quiet) == ("photo", {**data, "n_clusters": autorecipe.k_rule(36),
                                                                      **small})
    v2 = autorecipe.choose("photo", None, {**data, "method": "v2", "prototypes": "4", "batch_size": "8"}, **quiet)[1]
    assert "n_clusters" not in v2 and "carry_clusters" not in v2  # v1 settings: a v2 run refuses them


def test_print_config_says_the_choice_as_a_comment(run_cli, image_folder, tmp_path):
    code, out, err = run_cli("train", "--data", image_folder, "--out", tmp_path / "r", "--print-config")
    assert code == 0, err
    first, *rest = out.splitlines()
    assert first.startswith("# recipe: small (36 image files, median 24x24 px") and "k = 7" in first
    assert "n_clusters: 7  # set" in rest and "arch: smallnet  # recipe small" in rest
    assert yaml.safe_load(out)["n_clusters"] == 7


def test_the_budget_fits_epochs_and_a_warm_up():
    assert budget.fitted(60, 42.0, 30, 0) == (85, 0)
    assert budget.fitted(1, 90.0, 30, 0) == (1, 0)  # at least the epoch that was timed
    assert budget.fitted(10**7, 1e-3, 30, 0)[0] == 100_000  # at most MAX_COUNT
    assert budget.fitted(30, 60.0, 800, 10) == (30, 1)  # scaled, at least one epoch
    assert budget.fitted(30, 6.0, 100, 10) == (300, 30)
    assert budget.fit_line(60, 42.0, 85, 0) == "epoch 1 took 42 s; 60 minutes fit 85 epochs: running 85"


def test_bad_budgets_are_one_line(run_cli, image_folder, tmp_path):
    for args, words in ((["--minutes", "0"], "'minutes' must be a positive number"),
                        (["--minutes", "5", "--epochs", "3"], "give --epochs or --minutes, not both")):
        code, out, err = run_cli("train", "--data", image_folder, "--out", tmp_path / "r", *args)
        assert code == 2 and words in err and err.count("\n") == 1, err
        assert not (tmp_path / "r").exists()


# The smallest run with a budget and a v1 warm-up + cosine: 36 tiny images, small net.
TINY = {"n_clusters": 6, "batch_size": 8, "feature_batch_size": 16, "workers": 0, "pca_dim": 8,
        "kmeans_iters": 5, "feature_dim": 32, "threads": 1, "tensorboard": False, "minutes": 5,
        "warmup_epochs": 2, "final_lr": 0.001}


class FakeClock:
    """A clock that moves by the next of ``steps`` at every reading (one at the start of the
    sitting, then one after each epoch)."""

    def __init__(self, steps):
        self.steps, self.now = list(steps), 0.0

    def __call__(self):
        self.now += self.steps.pop(0) if self.steps else 100.0
        return self.now


def budget_run(name, image_folder, tmp_path, monkeypatch, steps, stop_after=None):
    """A TINY run under a 5-minute budget on a fake clock (epochs of ``steps`` seconds, no
    time for the final clustering); stopped after ``stop_after`` epochs and resumed on a
    fresh clock (the second sitting)."""
    from deepcluster.api import training_settings
    from deepcluster.train import run

    monkeypatch.setattr(budget, "final_seconds", lambda record: 0.0)
    threads, lines = torch.get_num_threads(), []
    try:
        monkeypatch.setattr(budget, "clock", FakeClock(steps))
        config = training_settings("small", None, {**TINY, "data": str(image_folder), "out_dir": str(tmp_path / name)})
        seen = []
        stop = None if stop_after is None else (lambda record: seen.append(record) or len(seen) == stop_after)
        run(config, log=lines.append, stop=stop)
        if stop_after is not None:  # as a kill there: resume with the saved settings
            monkeypatch.setattr(budget, "clock", FakeClock([0.0, *steps[stop_after + 1:]]))
            resumed = training_settings(None, None, {"out_dir": str(tmp_path / name)}, resume=True)
            run(resumed, resume=True, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return lines


def test_a_budget_is_fitted_saved_and_resumed_exactly(image_folder, tmp_path, monkeypatch):
    """Epoch 1: 100 s, the 5 minutes fit 3 epochs; epoch 2 took 150 s, the re-fit shortens
    the run to 2 (said once). Stopped after epoch 1 and resumed, the run decides alike."""
    from deepcluster.checkpoint import load_checkpoint

    steps = [0.0, 100.0, 150.0, 100.0]  # the set-up, then each epoch, as the clock sees them
    lines = {name: budget_run(name, image_folder, tmp_path, monkeypatch, steps, stop)
             for name, stop in (("whole", None), ("stopped", 1))}
    for name in ("whole", "stopped"):
        saved = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert (saved["epochs"], saved["warmup_epochs"], saved["minutes"]) == (2, 1, 5.0)
        said = [line for line in lines[name] if "epoch 1 took" in line or "instead of" in line]
        assert said == ["deepcluster: epoch 1 took 100 s; 5 minutes fit 3 epochs: running 3, warm-up 1 epoch",
                        "deepcluster: after 2 epochs (250 s of 300), epochs take ~150 s: running 2 instead of 3"], said
        records = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert [(r["time_run"], r["budget_epochs"]) for r in records] == [(100.0, 3), (250.0, 2)]
    assert any("a 5-minute budget (epochs fitted after the first)" in line for line in lines["whole"])
    whole, stopped = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("whole", "stopped"))
    assert whole["epoch"] == stopped["epoch"] == 2 and whole["config"]["epochs"] == 2
    for key, value in whole["model"].items():
        assert torch.equal(value, stopped["model"][key]), key
    for name in ("epoch_0001.npy", "epoch_0002.npy", "final.npy"):
        assert np.array_equal(np.load(tmp_path / "whole" / "assignments" / name),
                              np.load(tmp_path / "stopped" / "assignments" / name))


def test_a_relative_init_is_saved_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve("small", overrides={"data": str(tmp_path), "init": "weights/start.safetensors"})
    assert config.init == str(tmp_path / "weights" / "start.safetensors")


def datasets() -> Path | None:
    """The shared data sets beside the checkout (``../shared/datasets``, or the folder
    ``DEEPCLUSTER_DATASETS`` names), if there."""
    folder = Path(os.environ.get("DEEPCLUSTER_DATASETS") or ROOT.parent / "shared" / "datasets")
    return folder if (folder / "imagenette2-224.tar").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(datasets() is None, reason="../shared/datasets/imagenette2-224.tar (real photos) is not beside "
                                               "the checkout")
def test_your_photos_in_three_commands(run_cli, tmp_path):
    """200 Imagenette photos, 20 of each class, with the commands as a user writes them."""
    folder = tmp_path / "photos"
    with tarfile.open(datasets() / "imagenette2-224.tar") as archive:
        counts: dict[str, int] = {}
        members = []
        for member in archive:
            parts = member.name.split("/")
            if member.isfile() and parts[0] == "train" and counts.get(parts[1], 0) < 20:
                counts[parts[1]] = counts.get(parts[1], 0) + 1
                member.name = "/".join(parts[1:])
                members.append(member)
        archive.extractall(folder, members=members, filter="data")
    run = tmp_path / "run"
    code, out, err = run_cli("train", "--data", folder, "--out", run, "--minutes", "0.2")
    assert code == 0, err
    assert "recipe: photo (200 image files, median 224x224 px, shorter side >= 64 px); k = 40" in out
    assert "carry_clusters false" in out
    assert "epoch 1 took" in out and "running 1" in out
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(1 < r["cluster_acc"] <= 100 and 1 < r["purity"] <= 100 for r in records)  # percent, as kNN's
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["minutes"] == 0.2 and saved["n_clusters"] == 40 and saved["lr"] == 0.02
    code, out, err = run_cli("report", run, "--ascent-steps", "0")  # no gradient ascent: most of the page's time
    assert code == 0, err
    page = (run / "report" / "index.html").read_text()
    assert "ACC % (k = classes)" in page
    code, out, err = run_cli("assign", run, "--data", folder, "--into", tmp_path / "sorted")
    assert code == 0, err
    placed = [p for p in (tmp_path / "sorted").glob("cluster_*/**/*") if p.is_file()]
    assert len(placed) == 200 and len({p.parent for p in placed}) > 1
