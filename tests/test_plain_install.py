"""A plain install, without the optional extras (no tensorboard, no pyarrow), trains,
assigns and reports.

With ``DEEPCLUSTER_PLAIN_PYTHON`` set (CI's ``.ci/run`` does), the commands run with that
interpreter: a real virtual environment where ``pip install .`` put deepcluster and its
required dependencies only. Without it (the suite's own environment has the extras), each
command runs in a subprocess whose ``sitecustomize`` (first on ``PYTHONPATH``) makes
``import tensorboard``, ``import pyarrow`` and ``import torch.utils.tensorboard`` fail as
they do where the packages are absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses

PLAIN_PYTHON = os.environ.get("DEEPCLUSTER_PLAIN_PYTHON")

BLOCKER = '''
import importlib.abc
import sys

BLOCKED = ("tensorboard", "pyarrow", "torch.utils.tensorboard")


class _PlainInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == blocked or name.startswith(blocked + ".") for blocked in BLOCKED):
            raise ImportError(f"No module named {name!r} (a plain install: the optional extras are absent)")
        return None


sys.meta_path.insert(0, _PlainInstall())
'''


@pytest.fixture
def plain(tmp_path):
    """``plain(*args) -> CompletedProcess``: ``python -m deepcluster ARGS`` in an empty folder,
    with the extras made unimportable."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BLOCKER)
    work = tmp_path / "work"
    work.mkdir()
    if PLAIN_PYTHON:  # a real plain install: nothing to hide, and nothing of this checkout on the path
        python, env = PLAIN_PYTHON, {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    else:
        python = sys.executable
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))
    env.pop("DEEPCLUSTER_FAULT", None)

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)

    call.work = work
    return call


@pytest.mark.skipif(not PLAIN_PYTHON, reason="DEEPCLUSTER_PLAIN_PYTHON (a venv without the extras) not set; "
                                              ".ci/run makes one")
def test_the_plain_venv_has_deepcluster_and_not_the_extras(plain):
    found = plain("-c", "import deepcluster, sys; print(deepcluster.__file__); print(sys.prefix)")
    assert found.returncode == 0, found.stderr
    assert "site-packages" in found.stdout.splitlines()[0], "deepcluster must come from the plain venv's install"


def test_the_shim_hides_the_extras(plain):
    for module in ("tensorboard", "pyarrow", "torch.utils.tensorboard"):
        result = plain("-c", f"import {module}")
        assert result.returncode == 1 and "No module named" in result.stderr, module


def test_a_plain_install_trains_assigns_and_reports(plain, image_folder):
    # The default command (built-in digits, runs/digits), shortened to 2 small epochs at 16 px.
    train = plain("-m", "deepcluster", "train", "--epochs", "2", "--n_clusters", "10", "--kmeans_iters", "5",
                  "--pca_dim", "16", "--feature_dim", "32", "--crop", "16", "--resize", "16", "--batch_size", "64",
                  "--threads", "1")
    assert train.returncode == 0, train.stderr
    assert "Traceback" not in train.stderr
    notes = [line for line in train.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and "'tensorboard' package is not installed" in notes[0], train.stderr
    run = Path(plain.work) / "runs" / "digits"
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    assert (run / "assignments" / "final.npy").is_file() and not (run / "tensorboard").exists()

    assign = plain("-m", "deepcluster", "assign", str(run), "--data", str(image_folder), "--out", "clusters",
                   "--threads", "1")
    assert assign.returncode == 0, assign.stderr
    assert "pyarrow is not installed" in assign.stdout and "Traceback" not in assign.stderr
    table = Path(plain.work) / "clusters" / "assignments.csv"
    assert len(table.read_text().splitlines()) == 1 + 36
    assert not (Path(plain.work) / "clusters" / "assignments.parquet").exists()

    report = plain("-m", "deepcluster", "report", str(run), "--ascent-steps", "0", "--activation-sample", "64",
                   "--threads", "1")
    assert report.returncode == 0, report.stderr
    assert (run / "report" / "index.html").stat().st_size > 10_000
