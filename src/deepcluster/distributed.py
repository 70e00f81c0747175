"""Process-group helpers that are no-ops at world size 1.

Every code path runs unchanged on one CPU: with no initialised ``torch.distributed``
process group, rank is 0, world size is 1, reductions and gathers return their input and
barriers return at once. NCCL groups only reduce CUDA tensors, so CPU tensors are moved
to the current GPU and back for them; gloo reduces CPU tensors in place.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(indices: np.ndarray) -> np.ndarray:
    """This process's share of ``indices``: every ``world_size``-th item from ``rank``."""
    return indices[rank()::world_size()]


def _communication_device(tensor: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it (unchanged at world size 1)."""
    if not is_distributed():
        return tensor
    device = _communication_device(tensor)
    if device == tensor.device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    else:
        moved = tensor.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved)
    return tensor


def all_gather_ints(value: int) -> list[int]:
    """Every process's ``value``, in rank order (``[value]`` at world size 1)."""
    if not is_distributed():
        return [int(value)]
    local = torch.zeros(world_size(), dtype=torch.int64)
    local[rank()] = int(value)
    return [int(v) for v in all_reduce_sum(local).tolist()]


def all_gather_floats(value: float) -> list[float]:
    """Every process's ``value`` as float64, in rank order."""
    if not is_distributed():
        return [float(value)]
    local = torch.zeros(world_size(), dtype=torch.float64)
    local[rank()] = float(value)
    return [float(v) for v in all_reduce_sum(local).tolist()]


def all_gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's ``(m_r, ...)`` rows, concatenated in rank order (``local`` itself at
    world size 1); processes may hold different numbers of rows."""
    if not is_distributed():
        return local
    counts = all_gather_ints(len(local))
    padded = np.zeros((max(counts),) + local.shape[1:], dtype=local.dtype)
    padded[:len(local)] = local
    tensor = torch.from_numpy(padded)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor)
    return np.concatenate([part.cpu().numpy()[:count] for part, count in zip(gathered, counts)])


def gather_rows(local: np.ndarray, local_indices: np.ndarray, n_total: int) -> np.ndarray:
    """Rebuild the full ``(n_total, ...)`` array from every process's rows.

    Each process holds ``local[i]`` for global row ``local_indices[i]``; rows that no
    process holds are zero. At world size 1 this only places the rows.
    """
    full = np.zeros((n_total,) + local.shape[1:], dtype=local.dtype)
    full[local_indices] = local
    if is_distributed():
        # Each row is non-zero on one rank only, so a sum rebuilds it.
        full = all_reduce_sum(torch.from_numpy(full)).numpy()
    return full
