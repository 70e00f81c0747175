"""DeepCluster-v2's memory bank: the embeddings the next epoch's clustering reads.

For every image, the L2-normalised embeddings of its two large crops as the training pass
computed them (the first filling is a pass of its own before epoch 0). With several
processes each holds its share of the images, a contiguous block (``distributed.block``:
the blocks in rank order are the images in order, which k-means' sharded mode reads as one
process's rows), and what one process computes of another's images is handed over once
per epoch (``synchronise``), so no process ever holds more than its share.

The first filling (``fill_bank``) is a pass of its own before epoch 0, as the reference's
``init_memory``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from deepcluster import distributed
from deepcluster.checkpoint import CheckpointError
from deepcluster.data import Normalize
from deepcluster.data.multicrop import UNREADABLE, MultiCropDataset, collate_crops
from deepcluster.features import autocast, loader_kwargs
from deepcluster.health import check_features
from deepcluster.methods import STREAM_BANK_VIEWS
from deepcluster.progress import track

if TYPE_CHECKING:
    from deepcluster.config import Config
    from deepcluster.data import ImageSource
    from deepcluster.data.multicrop import MultiCrop

BANK_CROPS = 2  # the memory bank keeps the embeddings of the first two (large) crops


def fill_batches(rows: np.ndarray, n_images: int, batch_size: int) -> list[list[int]]:
    """The batches of the bank's first filling, as places in this process's share ``rows``
    (its image indices, ascending): batch t holds the images ``[t B, (t + 1) B)`` that this
    process holds. Together the processes then feed the network, step by step, the batches
    one process would (``B`` is the global batch, so BatchNorm pooled over the processes sees
    the same images), and every process takes the same number of steps, ``ceil(N / B)``,
    which the pooled statistics need; a process may get an empty batch when a last batch has
    fewer images than there are processes."""
    batch_of = np.asarray(rows, dtype=np.int64) // batch_size
    bounds = np.searchsorted(batch_of, np.arange(-(-n_images // batch_size) + 1))
    return [list(range(int(start), int(stop))) for start, stop in zip(bounds[:-1], bounds[1:])]


@dataclass
class MemoryBank:
    """The embeddings the clustering reads, each process holding its share of the images
    (its contiguous block ``distributed.block(n_images)``; all of them in one process).

    Attributes:
        embeddings: ``(2, n, dim)`` float32 (CPU): the L2-normalised embedding of the first
            and second crop of each image held, as last written.
        decoded: ``(n,)`` bool, the images held that have an embedding: those that decoded
            when the bank was filled (the others get no target).
        rows: ``(n,)`` the image indices held, ascending.
        n_images: images in the run.
    """

    embeddings: torch.Tensor
    decoded: np.ndarray
    rows: np.ndarray
    n_images: int
    outbox: list[tuple[np.ndarray, torch.Tensor]] = dataclasses.field(default_factory=list)

    @classmethod
    def empty(cls, n_images: int, dim: int) -> MemoryBank:
        rows = np.arange(*distributed.block(n_images))
        return cls(torch.zeros(BANK_CROPS, len(rows), dim), np.zeros(len(rows), dtype=bool), rows, n_images)

    @classmethod
    def from_full(cls, embeddings: torch.Tensor, decoded: np.ndarray) -> MemoryBank:
        """This process's share of a whole ``(2, N, dim)`` bank (a checkpoint's)."""
        rows = np.arange(*distributed.block(embeddings.shape[1]))
        index = torch.from_numpy(rows)
        return cls(embeddings[:, index].clone(), decoded[rows].copy(), rows, embeddings.shape[1])

    @classmethod
    def from_checkpoint(cls, saved: dict, n_images: int, dim: int) -> MemoryBank:
        """This process's share of the bank a checkpoint holds (entries ``bank``, ``bank_decoded``).

        Raises:
            CheckpointError: it is missing or does not fit a run of ``n_images`` images and
                ``dim``-dimensional embeddings.
        """
        bank, decoded = saved.get("bank"), saved.get("bank_decoded")
        shape = (BANK_CROPS, n_images, dim)
        if not (isinstance(bank, torch.Tensor) and tuple(bank.shape) == shape and bank.dtype == torch.float32
                and isinstance(decoded, torch.Tensor) and decoded.dtype == torch.bool
                and tuple(decoded.shape) == shape[1:2]):
            raise CheckpointError(f"the checkpoint holds no memory bank of shape {shape} (entries 'bank' and "
                                  "'bank_decoded'); it is not a resumable v2 checkpoint of this run")
        return cls.from_full(bank, decoded.numpy())

    def _store(self, rows: np.ndarray, embeddings: torch.Tensor) -> np.ndarray:
        """Put the embeddings of the images ``rows`` this process holds in place (they have an
        embedding now: ``decoded``); returns the mask of the others."""
        start, stop = distributed.block(self.n_images)
        held = (rows >= start) & (rows < stop)
        where = rows[held] - start
        self.embeddings[:, torch.from_numpy(where)] = embeddings if held.all() else embeddings[:, torch.from_numpy(held)]
        self.decoded[where] = True
        return ~held

    def write(self, rows: np.ndarray, embeddings: torch.Tensor) -> None:
        """Store ``(2, len(rows), dim)`` embeddings of the images ``rows``: those of images
        this process holds in place, the others for ``synchronise`` to hand over."""
        rows, embeddings = np.asarray(rows, dtype=np.int64), embeddings.float().cpu()
        others = self._store(rows, embeddings)
        if others.any():
            self.outbox.append((rows[others], embeddings[:, torch.from_numpy(others)]))

    def write_batch(self, image_indices: torch.Tensor, kept: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Store a batch's two large crops (a training batch's, or one of the first filling's):
        ``embeddings`` are the ``(n_crops * B, dim)`` rows of the batch's ``B`` images crop by
        crop (large crops first); only the images ``kept`` (``(B,)`` bool: those that could be
        read) are written."""
        batch = len(image_indices)
        large = embeddings.detach()[:BANK_CROPS * batch].view(BANK_CROPS, batch, -1)
        self.write(image_indices[kept].numpy(), large[:, kept.to(large.device)])

    def synchronise(self) -> None:
        """With several processes, hand each process what the others wrote of its images
        (:meth:`hand_over`). No-op alone."""
        outbox, self.outbox = self.outbox, []
        if distributed.is_distributed():
            self.hand_over(outbox)

    def hand_over(self, outbox: list[tuple[np.ndarray, torch.Tensor]]) -> None:
        """Each process in turn broadcasts its ``outbox`` (what it wrote of the others'
        images) and the others keep their rows, so no process holds more than its share and
        one outbox."""
        rows = np.concatenate([r for r, _ in outbox]) if outbox else np.zeros(0, dtype=np.int64)
        dim = self.embeddings.shape[2]
        embeddings = torch.cat([e for _, e in outbox], dim=1) if outbox else torch.zeros(BANK_CROPS, 0, dim)
        for source, count in enumerate(distributed.all_gather_ints(len(rows))):
            if count == 0:
                continue
            mine = source == distributed.rank()
            sent_rows = distributed.broadcast(torch.from_numpy(rows) if mine else torch.zeros(count, dtype=torch.int64),
                                              source).numpy()
            sent = distributed.broadcast(embeddings.contiguous() if mine else torch.zeros(BANK_CROPS, count, dim),
                                         source)
            if not mine:
                self._store(sent_rows, sent)

    def sample(self, wanted: np.ndarray) -> np.ndarray:
        """``(len(wanted), dim)`` float64: the first crop's embeddings of the images ``wanted``
        (ascending image indices), on every process: each gives those it holds and, the
        blocks being the images in rank order, their concatenation is in image order. Only
        these rows travel (the collapse indicators' sample), never the bank."""
        wanted = np.asarray(wanted, dtype=np.int64)
        start, stop = distributed.block(self.n_images)
        where = wanted[(wanted >= start) & (wanted < stop)] - start
        local = self.embeddings[0, torch.from_numpy(where)].numpy()
        return np.asarray(distributed.all_gather_rows(local), dtype=np.float64)

    def all_decoded(self) -> np.ndarray:
        """``(N,)`` bool, the images of every process's share that decoded."""
        return distributed.gather_in_order(self.decoded.astype(np.uint8), self.rows, self.n_images).astype(bool)

    def full(self) -> tuple[torch.Tensor, np.ndarray] | None:
        """The whole ``(2, N, dim)`` bank and ``(N,)`` decoded flags on the main process (for
        its checkpoint), None on the others."""
        return self.gathered() if distributed.is_distributed() else (self.embeddings, self.decoded)

    def gathered(self) -> tuple[torch.Tensor, np.ndarray] | None:
        """:meth:`full` with several processes: every share gathered on the main process."""
        gathered = distributed.gather_to_main(self.embeddings.transpose(0, 1).numpy(), self.rows)
        flags = distributed.gather_to_main(self.decoded, self.rows)
        if gathered is None or flags is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(gathered[0].transpose(1, 0, 2))), flags[0]


@torch.no_grad()
def fill_bank(network: torch.nn.Module, source: ImageSource, crops: MultiCrop, config: Config,
              device: torch.device) -> MemoryBank:
    """The pass before epoch 0: the two large crops (``crops``' first group) of every image,
    embedded by the network (v2's ``MultiCropModel``) in training mode (without gradients),
    make the first memory bank, as the reference's ``init_memory`` does. In eval mode a fresh
    network's BatchNorm has no statistics yet and maps every image to nearly the same
    embedding (cosines above 0.9999 on the test images), which leaves the first clustering
    arbitrary. The two crops of a batch pass the network together, so even a last batch of
    one image gives BatchNorm two rows.

    Raises:
        TrainingDiverged: an embedding is NaN or infinite.
    """
    network.train()
    transform = dataclasses.replace(crops, groups=(dataclasses.replace(crops.groups[0], count=BANK_CROPS),))
    n_images, normalize = len(source), Normalize(config.mean, config.std)
    indices = distributed.shard(np.arange(n_images))
    # Each image's crops seeded by its index, each step's batch the global one (``fill_batches``):
    # the processes together compute one process's bank.
    dataset = MultiCropDataset(source, indices, np.zeros((1, n_images), dtype=np.int64), transform, config.seed, 0,
                               stream=STREAM_BANK_VIEWS, positions=indices)
    loader = DataLoader(dataset, batch_sampler=fill_batches(indices, n_images, config.feature_batch_size),
                        collate_fn=functools.partial(collate_crops, transform.groups),
                        **loader_kwargs(config.workers, device))
    bank = MemoryBank.empty(n_images, config.projection_dim)  # this process's share (its block of the images)
    for crops_, targets, rows in track(loader, len(dataset), "memory bank", unit="img", size=lambda batch: len(batch[2])):
        with autocast(device, config.precision == "bf16"):
            embeddings, _ = network([normalize(crop, device, config.channels_last) for crop in crops_])
        check_features(embeddings.float().cpu().numpy(), 0)
        bank.write_batch(rows, targets[:, 0] != UNREADABLE, embeddings)  # as a training batch's
    bank.synchronise()  # the other processes' images handed over (each then decoded where it was written)
    return bank


__all__ = ["BANK_CROPS", "MemoryBank", "fill_bank", "fill_batches"]
