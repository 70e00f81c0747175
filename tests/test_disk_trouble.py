"""Disk trouble: a checkpoint that cannot be written stops the run with one clear line,
exit code 4, the previous checkpoint byte-identical and no temporary file left."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys

import pytest

from conftest import TINY_TRAIN, one_epoch
from deepcluster import checkpoint as checkpoint_module
from deepcluster.cli import EXIT_WRITE
from deepcluster.faults import ENV_VAR


def leftovers(run):
    return sorted(run.glob(".*.tmp-*")) + sorted(run.glob("assignments/.*.tmp-*"))


@pytest.mark.parametrize("name", ["ENOSPC", "EROFS", "EACCES"])
@pytest.mark.slow
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(name, cli, image_folder, tmp_path):
    """The error is injected halfway through writing the temporary file of epoch 2's
    checkpoint (``DEEPCLUSTER_FAULT=<errno>:checkpoint:1``): the OSError the operating system
    raises for a full disk, a read-only file system or a denied permission."""
    run = tmp_path / "run"
    before = one_epoch(cli, image_folder, run)
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume",
                         fault=f"{name}:checkpoint:1")
    assert code == EXIT_WRITE
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot write checkpoint '{run / 'checkpoint.pt'}'" in err
    assert f"{os.strerror(getattr(errno, name))} ({name})" in err and "the checkpoint of epoch 1 is kept" in err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert leftovers(run) == []
    assert (run / "log.jsonl").read_text().count("\n") == 1
    if name == "ENOSPC":  # once there is room again, the run resumes where it stopped
        code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume")
        assert code == 0, err
        assert "resuming after epoch 1" in out and (run / "log.jsonl").read_text().count("\n") == 2


@pytest.mark.slow
def test_a_real_file_size_limit_fails_the_write_and_keeps_the_checkpoint(cli, image_folder, tmp_path):
    """No simulation: the resumed process runs under RLIMIT_FSIZE smaller than a checkpoint,
    so the kernel itself refuses the write halfway (EFBIG, as a full disk refuses with ENOSPC)."""
    run = tmp_path / "run"
    before = one_epoch(cli, image_folder, run)
    limit = len(before) // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-m", "deepcluster", "train", *TINY_TRAIN, "--data", str(image_folder),
                             "--out", str(run), "--epochs", "2", "--resume"],
                            env=env, preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_WRITE, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"cannot write checkpoint '{run / 'checkpoint.pt'}': File too large (EFBIG)" in result.stderr
    assert (run / "checkpoint.pt").read_bytes() == before
    assert leftovers(run) == []


def test_a_read_only_run_folder_stops_before_training(cli, image_folder, tmp_path, monkeypatch,
                                                     permissions_enforced):
    """Where file modes are enforced the folder really is made read-only with chmod. As root,
    which ignores file modes, the refusal is injected: ``os.open`` raises EROFS for any file
    created in it, as a read-only file system would."""
    run = tmp_path / "run"
    before = one_epoch(cli, image_folder, run)
    folders = [run, run / "assignments"]
    if permissions_enforced:
        for folder in folders:
            folder.chmod(0o555)
        expected = f"{os.strerror(errno.EACCES)} (EACCES)"
    else:
        real_open = os.open

        def read_only_open(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and os.path.dirname(os.path.abspath(path)) in map(str, folders):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(checkpoint_module.os, "open", read_only_open)
        expected = f"{os.strerror(errno.EROFS)} (EROFS)"
    try:
        code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume")
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert code == EXIT_WRITE and err.count("\n") == 1
    assert f"cannot write the run file '{run}" in err and expected in err
    assert "epoch   2/2" not in out
    assert (run / "checkpoint.pt").read_bytes() == before and leftovers(run) == []
