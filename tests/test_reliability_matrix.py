"""A slice of the fault matrix (``bench/fault_matrix.py``): a v1 run killed by the kernel at
two of its commit points (the first checkpoint's rename and the last rename of the run),
resumed, and compared file by file with the uninterrupted run."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fault_matrix  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_kills_at_commit_points_then_resume_give_the_uninterrupted_run_file_by_file(tmp_path):
    data = fault_matrix.images(tmp_path / "images")
    out = tmp_path / "run"
    args = fault_matrix.command("v1", data, out, 2, 1)
    total = fault_matrix.count_renames(args, tmp_path / "renames.log", 1)
    reference = out.rename(tmp_path / "reference")
    for when in (total // 2, total):
        inject = ["-e", f"inject={fault_matrix.RENAMES}:signal=SIGKILL:when={when}"]
        assert fault_matrix.trial(f"rename {when}", lambda: fault_matrix.strace(args, inject).returncode, args,
                                  reference, out), when
