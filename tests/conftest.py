"""Shared fixtures: tiny, seeded, real image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_pattern(kind: int, rng: np.random.Generator, size: int = 24) -> np.ndarray:
    """A uint8 RGB image of one of three visually distinct families (stripes, rings,
    checkers), with random phase and colour so no two images are identical."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == 0:
        base = np.sin(x * 0.8 + phase)
    elif kind == 1:
        base = np.sin(np.hypot(x - size / 2, y - size / 2) * 0.9 + phase)
    else:
        base = np.sign(np.sin(x * 0.6 + phase) * np.sin(y * 0.6 + phase))
    colour = rng.uniform(0.3, 1.0, size=3)
    image = (base[..., None] * 0.5 + 0.5) * colour[None, None, :] * 255
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """36 images in 3 class sub-folders, mixed JPEG and PNG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for kind, name in enumerate(["stripes", "rings", "checkers"]):
        (root / name).mkdir()
        for i in range(12):
            extension = "png" if i % 3 == 0 else "jpg"
            Image.fromarray(make_pattern(kind, rng)).save(root / name / f"{i:02d}.{extension}")
    return root


# The paper's loop (Sobel, the fc layer clustered, a fresh random head and random k-means
# starts every epoch, no colour augmentation), which the `small` and `digits` recipes leave for
# settings that learn on small images. Tests of the loop's machinery pin it, so that a recipe
# change does not change what they guard.
REFERENCE_LOOP = {"sobel": True, "clustered": "fc", "fc_init": "reference", "kmeans_init": "random",
                  "carry_clusters": False, "color_jitter": 0.0, "grayscale_prob": 0.0, "hflip": True}
REFERENCE_LOOP_ARGS = [item for key, value in REFERENCE_LOOP.items()
                       for item in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))]

# The smallest real training run: 36 tiny images, small net, one thread, no worker processes.
TINY_TRAIN = ["--recipe", "small", "--epochs", "1", "--n_clusters", "6", "--batch_size", "8", "--feature_batch_size", "16",
              "--workers", "0", "--pca_dim", "8", "--kmeans_iters", "5", "--feature_dim", "32", "--threads", "1",
              *REFERENCE_LOOP_ARGS]


def one_epoch(cli, data, run) -> bytes:
    """Train the first epoch of a ``TINY_TRAIN`` run into ``run``; returns its checkpoint's bytes."""
    code, _, err = cli("train", "--data", data, "--out", run, "--epochs", "1")
    assert code == 0, err
    return (run / "checkpoint.pt").read_bytes()


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``deepcluster`` in-process as given: ``run_cli(*args, fault=None) -> (exit code,
    stdout, stderr)``. ``fault`` sets ``DEEPCLUSTER_FAULT`` for this call. Torch's global
    thread count, which ``--threads`` changes, is restored afterwards."""
    import torch

    from deepcluster import faults
    from deepcluster.cli import main

    threads = torch.get_num_threads()

    def call(*args: str, fault: str | None = None) -> tuple[int, str, str]:
        faults.reset()
        if fault:
            monkeypatch.setenv(faults.ENV_VAR, fault)
        else:
            monkeypatch.delenv(faults.ENV_VAR, raising=False)
        try:
            code = main([str(a) for a in args])
        finally:
            monkeypatch.delenv(faults.ENV_VAR, raising=False)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield call
    torch.set_num_threads(threads)


@pytest.fixture
def cli(run_cli):
    """``run_cli`` with the ``TINY_TRAIN`` settings put first on every ``train`` (later
    arguments override them)."""

    def call(*args: str, fault: str | None = None) -> tuple[int, str, str]:
        argv = [str(a) for a in args]
        if argv[:1] == ["train"]:
            argv = ["train", *TINY_TRAIN, *argv[1:]]
        return run_cli(*argv, fault=fault)

    return call


@pytest.fixture(scope="session")
def permissions_enforced(tmp_path_factory) -> bool:
    """Whether file modes stop this process: False for root (or any process holding
    CAP_DAC_OVERRIDE), which reads and writes whatever the mode says. Tests that need an
    unreadable file or a read-only folder use chmod when this is True and inject the
    operating system's error otherwise."""
    probe = tmp_path_factory.mktemp("permissions") / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        probe.read_text()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
    return False


@pytest.fixture(scope="session")
def tiny_run(image_folder, tmp_path_factory) -> Path:
    """A finished two-epoch run on ``image_folder`` (small recipe, k = 6): run folder with
    log, assignments, checkpoint and TensorBoard scalars. Shared; tests must not modify it."""
    from deepcluster.config import resolve
    from deepcluster.train import run

    out = tmp_path_factory.mktemp("tiny_run")
    config = resolve("small", overrides={
        "data": str(image_folder), "out_dir": str(out), "n_clusters": 6, "epochs": 2, "batch_size": 8,
        "feature_batch_size": 16, "workers": 0, "pca_dim": 8, "kmeans_iters": 5, "feature_dim": 32,
        **REFERENCE_LOOP})
    run(config, log=lambda _: None)
    return out
