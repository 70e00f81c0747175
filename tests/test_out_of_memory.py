"""Out of memory: an allocation the operating system refuses ends the run with one line and
exit code 5, and the last completed epoch's checkpoint stays as it was."""

from __future__ import annotations

import resource
from contextlib import contextmanager

import pytest

from deepcluster.cli import EXIT_MEMORY
from conftest import one_epoch


@contextmanager
def address_space_limit(extra_bytes: int):
    """Cap this process's address space at its current size plus ``extra_bytes``: the kernel
    then refuses any larger allocation, whatever its overcommit policy."""
    with open("/proc/self/status") as status:
        size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size_kb * 1024 + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_network_too_large_for_the_memory_is_one_line_and_exit_5(cli, image_folder, tmp_path):
    run = tmp_path / "run"
    with address_space_limit(4 * 2**30):  # fc layers of width 2**31 - 1 need terabytes
        code, out, err = cli("train", "--data", image_folder, "--out", run, "--feature_dim", str(2**31 - 1))
    assert code == EXIT_MEMORY, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("deepcluster: error: out of memory (an allocation of ") and "GiB failed)" in err
    assert "lower batch_size, feature_batch_size, feature_dim or n_clusters" in err


@pytest.mark.slow
def test_running_out_of_memory_mid_run_keeps_the_checkpoint_and_resume_goes_on(cli, image_folder, tmp_path):
    run = tmp_path / "run"
    before = one_epoch(cli, image_folder, run)
    code, _, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume",
                       fault="oom:training:2")
    assert code == EXIT_MEMORY and err.count("\n") == 1, err
    assert "out of memory (an allocation of 1.0 GiB failed)" in err and "continue with --resume" in err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert (run / "log.jsonl").read_text().count("\n") == 1
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume")
    assert code == 0, err
    assert "resuming after epoch 1" in out and (run / "log.jsonl").read_text().count("\n") == 2


def test_allocation_failures_are_recognised_and_other_errors_are_not():
    import numpy as np
    import pytest
    import torch

    from deepcluster.cli import out_of_memory

    with address_space_limit(2**30):
        with pytest.raises(MemoryError, match="Unable to allocate") as numpy_error:
            np.empty((2**20, 2**20), dtype=np.float32)  # 4 TiB
    assert out_of_memory(numpy_error.value).startswith("Unable to allocate 4.00 TiB")
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total)\nmore")
    assert out_of_memory(cuda) == "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total)"
    assert out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 3221225472 "
                                      "bytes.")) == "an allocation of 3.0 GiB failed"
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")) is None
    assert out_of_memory(ValueError("out of memory")) is None
