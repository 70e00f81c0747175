"""Process-group helpers that are no-ops at world size 1.

Every code path runs unchanged on one CPU: with no initialised ``torch.distributed``
process group, rank is 0, world size is 1, reductions and gathers return their input and
barriers return at once. NCCL groups only reduce CUDA tensors, so CPU tensors are moved
to the current GPU and back for them; gloo reduces CPU tensors in place.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

# How long a collective may wait for a process that is gone before the job fails (torchrun
# ends the others at once when one process dies; this bounds the wait when it does not).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)

_created = False  # whether this process has created a process group (``start``; read by ``leave``)


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE`` of torchrun's environment; 1
    without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process's rank as the launcher's environment gives it (``RANK``; 0 without one):
    known before the process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def start(device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); returns this process's device and
    whether this call created the group (so the caller destroys it).

    NCCL when ``device`` is a GPU, gloo on the CPU. On a GPU each process takes its own,
    ``cuda:LOCAL_RANK`` (an explicit ``cuda:N`` is kept). Without a launcher (one process)
    or with a group that already exists, nothing is created.
    """
    if device.type == "cuda" and launched_processes() > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and (launched_processes() > 1 or is_distributed()):
        torch.cuda.set_device(device)
    if is_distributed() or launched_processes() == 1:
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    global _created
    _created = True
    return device, True


def stop() -> None:
    """Leave the process group. After a normal run the caller meets a barrier first, so no
    process tears its group down while another still talks to it; after an error it leaves
    at once, since the others may never reach that barrier."""
    if is_distributed():
        dist.destroy_process_group()


def leave(code: int) -> int:
    """End a process that created a process group with exit status ``code``, skipping the
    interpreter's teardown; any other process gets ``code`` back.

    PyTorch keeps a group that ``DistributedDataParallel`` has used alive after
    ``destroy_process_group`` (pytorch/pytorch#107298; measured with torch 2.13: one
    construction is enough, deleting the wrapper and collecting garbage does not free it),
    so gloo's threads still run when the interpreter shuts down, and
    now and then the process aborts there ("terminate called without an active
    exception", SIGABRT) after the run has finished and written everything: torchrun
    then reports the run as failed. Call it once every file is closed.
    """
    if not _created:
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say
            pass
    logging.shutdown()
    os._exit(code)


class PeerFailed(RuntimeError):
    """Another process could not start the run (its message, or None where the main process
    reports it): this one stops too, quietly unless it is the main process."""


def agree(error: BaseException | None) -> None:
    """Every process passes the error its setup raised (or None); if any process failed, all
    stop together instead of the others waiting forever in the next collective.

    The main process raises its own error, or ``PeerFailed`` naming the first process that
    failed; the other processes raise ``PeerFailed(None)`` (nothing to print: the main
    process says it once). At world size 1 the error itself is raised.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    messages: list = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [r for r, message in enumerate(messages) if message is not None]
    if not failed:
        return
    if rank() != 0:
        raise PeerFailed(None)
    if error is not None:
        raise error
    raise PeerFailed(f"process {failed[0]}: {messages[failed[0]]}")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


# Mixed into the seed of a process's own stream (``rank_stream``), apart from every other stream.
STREAM_RANK = 0x52414E4B


@contextmanager
def rank_stream(seed: int, epoch: int, *modules: torch.nn.Module) -> Iterator[None]:
    """Inside the block (an epoch's training pass), each process draws from torch's global
    generator on a stream of its own (dropout masks, the loader's worker seeds): process 0
    goes on with the run's stream, exactly as a single process does, and process ``r > 0``
    with one seeded by ``(seed, epoch, r)``. Without it every process would draw the same
    dropout masks for different images. When the block ends normally, every process takes
    process 0's generator state again, so the clustering and the next epoch draw alike on
    all of them, and the checkpoint (process 0's state) resumes every process exactly; so do
    the buffers of ``modules`` (BatchNorm statistics, which each process updated last with
    its own batch): the next feature pass of every process uses those the checkpoint holds.
    A single process: nothing changes."""
    if not is_distributed():
        yield
        return
    if rank() > 0:
        key = np.random.SeedSequence([seed, epoch, STREAM_RANK, rank()]).generate_state(2)
        torch.manual_seed(int(key[0]) << 32 | int(key[1]))
    yield
    torch.set_rng_state(broadcast(torch.get_rng_state(), 0))
    with torch.no_grad():
        for module in modules:
            for buffer in module.buffers():
                buffer.copy_(broadcast(buffer.detach().clone(), 0))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(indices: np.ndarray) -> np.ndarray:
    """This process's share of ``indices``: every ``world_size``-th item from ``rank``."""
    return indices[rank()::world_size()]


def block(n_items: int) -> tuple[int, int]:
    """This process's contiguous share ``[start, stop)`` of ``n_items`` (the first
    ``n_items % world_size`` processes hold one more): k-means' sharded mode wants contiguous
    shards in global order."""
    size, extra = divmod(n_items, world_size())
    start = rank() * size + min(rank(), extra)
    return start, start + size + (rank() < extra)


def equal_shard(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """This process's share of an epoch's ``indices`` (drawn identically on every process),
    all shares of the same length so that every process takes the same number of steps
    (a process with one step more would wait forever inside DDP).

    The list is wrapped around to a multiple of ``world_size`` (at most ``world_size - 1``
    images seen twice), then every ``world_size``-th item from ``rank``: the global batch
    of step ``t`` is then items ``[t B P, (t + 1) B P)`` of the list, the batch one process
    of batch ``B P`` takes. Returns the indices and their positions in the (wrapped) list,
    which seed each sample's augmentation as in a single-process run.
    """
    n_processes = world_size()
    if n_processes == 1 or len(indices) == 0:
        return indices, np.arange(len(indices))
    padded = np.resize(indices, -(-len(indices) // n_processes) * n_processes)
    positions = np.arange(rank(), len(padded), n_processes)
    return padded[positions], positions


def gather_in_order(local: np.ndarray, local_indices: np.ndarray, n_total: int) -> np.ndarray:
    """The ``(n_total, ...)`` array rebuilt from every process's rows, like ``gather_rows``,
    but only the rows held travel (``all_gather_rows``), not an ``n_total``-row array of zeros
    per process."""
    if not is_distributed():
        full = np.zeros((n_total,) + local.shape[1:], dtype=local.dtype)
        full[local_indices] = local
        return full
    rows = all_gather_rows(np.ascontiguousarray(local))
    where = all_gather_rows(np.asarray(local_indices, dtype=np.int64))
    full = np.zeros((n_total,) + local.shape[1:], dtype=local.dtype)
    full[where] = rows
    return full


def gather_sorted(local: np.ndarray, local_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every process's rows and their (distinct) indices, together in ascending index order:
    only the rows held travel and are held, never an array of all the indices' range."""
    rows = all_gather_rows(np.ascontiguousarray(local))
    where = all_gather_rows(np.asarray(local_indices, dtype=np.int64))
    order = np.argsort(where, kind="stable")
    return rows[order], where[order]


def gather_to_main(local: np.ndarray, local_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Every process's rows and (distinct) indices, in ascending index order, on the main
    process only (None on the others, which hold nothing more than their rows): for what
    only the main process writes, such as a checkpoint."""
    if not is_distributed():
        order = np.argsort(local_indices, kind="stable")
        return local[order], np.asarray(local_indices)[order]
    counts = all_gather_ints(len(local))
    parts = []
    for array in (local, np.asarray(local_indices, dtype=np.int64)):
        tensor = _padded(array, max(counts))
        received = [torch.empty_like(tensor) for _ in range(world_size())] if is_main_process() else None
        dist.gather(tensor, received, dst=0)
        if received is not None:
            parts.append(_unpadded(received, counts))
    if not is_main_process():
        return None
    rows, where = parts
    order = np.argsort(where, kind="stable")
    return rows[order], where[order]


def broadcast(tensor: torch.Tensor, source: int) -> torch.Tensor:
    """``source``'s ``tensor`` on every process (the others pass one of the same shape and
    dtype to fill); returns it."""
    if not is_distributed():
        return tensor
    device = _communication_device(tensor)
    moved = tensor.to(device)
    dist.broadcast(moved, src=source)
    return moved.to(tensor.device) if device != tensor.device else moved


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
    tensor = _padded(local, max(counts))
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor)
    return _unpadded(gathered, counts)


def _padded(array: np.ndarray, rows: int) -> torch.Tensor:
    """``array`` with zero rows added up to ``rows``, on the device the backend communicates
    from (collectives want tensors of one shape on every process)."""
    padded = np.zeros((rows,) + array.shape[1:], dtype=array.dtype)
    padded[:len(array)] = array
    tensor = torch.from_numpy(padded)
    return tensor.to(_communication_device(tensor))


def _unpadded(parts: list[torch.Tensor], counts: list[int]) -> np.ndarray:
    """The real rows of every process's padded part, concatenated in rank order."""
    return np.concatenate([part.cpu().numpy()[:count] for part, count in zip(parts, counts)])


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


def release() -> None:
    """Destroy the ``DistributedDataParallel`` wrappers nothing refers to any more (call it
    once the epoch's wrapper is deleted). A wrapper's reducer keeps gradient hooks on the
    parameters until it is destroyed, and DDP holds reference cycles, so without this
    collection last epoch's wrapper would still act on the next epoch's gradients (the
    same body parameters) and change them."""
    import gc

    gc.collect()


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce sum whose gradient is the all-reduced sum of the gradients: each process's
    input counts in every process's output."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102 - autograd API
        return all_reduce_sum(tensor.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102 - autograd API
        return all_reduce_sum(grad.clone())


class ProcessBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batches of all processes, for process groups on the CPU (gloo):
    PyTorch's ``SyncBatchNorm`` runs on GPUs only. In training mode the per-channel count,
    sum and sum of squares are all-reduced (float64) and every process normalises with the
    global mean and (biased) variance; the running statistics take the global, unbiased
    ones, as ``SyncBatchNorm`` does. In eval mode, or without a process group, it is the
    ordinary BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102 - nn.Module API
        if not (self.training and is_distributed() and world_size() > 1):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        wide = input.double()
        count = input.numel() // channels
        local = torch.cat([wide.sum(dims), (wide * wide).sum(dims), wide.new_full((1,), float(count))])
        total = _SumOverProcesses.apply(local)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (wide - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        out = out.to(input.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def synchronise_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with every BatchNorm layer pooling its statistics over the processes:
    PyTorch's ``SyncBatchNorm`` on GPUs, ``ProcessBatchNorm`` on the CPU. The parameters and
    buffers are the same objects (an optimiser built on them keeps working) under the same
    names (checkpoints load either way)."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if isinstance(model, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
            model, (ProcessBatchNorm, torch.nn.SyncBatchNorm)):
        layer = ProcessBatchNorm(model.num_features, model.eps, model.momentum, model.affine,
                                 model.track_running_stats)
        if model.affine:
            layer.weight, layer.bias = model.weight, model.bias
        if model.track_running_stats:
            layer.running_mean, layer.running_var = model.running_mean, model.running_var
            layer.num_batches_tracked = model.num_batches_tracked
        layer.train(model.training)
        return layer
    for name, child in model.named_children():
        model.add_module(name, synchronise_batchnorm(child, device))
    return model
