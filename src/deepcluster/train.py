"""The DeepCluster loop: plan -> monitor -> pseudo-labelled data -> training -> commit.

One loop for every method; what differs is the method's entry in ``methods.registry.METHODS``.
:func:`run_epoch` is one epoch, top to bottom. Each epoch of v1 (``methods.v1``), as the paper
has it:

1. **Plan** (``V1Planner.plan``): the body, in eval mode, maps the centre view of every
   image to its features; PCA-whitening, L2 normalisation and k-means with a fresh seed give
   every image a pseudo-label; the classifier head is re-created with k outputs (cluster ids
   change every epoch, so last epoch's head means nothing).
2. **Monitor** (``monitor.Monitor``): the clustering's label scores and the online kNN, on
   what the plan returns.
3. **Pseudo-labelled data** (``pseudo_label_loader``): an epoch's worth of images drawn
   uniformly over non-empty clusters, with random-resized-crop and flip.
4. **Training** (``train_one_epoch``): one head, one crop, temperature 1; the head with
   its own momentum-free SGD (a parameter group for the epoch), the body with SGD whose
   momentum persists across epochs.
5. **Commit** (``runfolder.RunFolder``): assignments, checkpoint, log line, atomically.

DeepCluster-v2 (``methods.v2``) fills the same stages differently: the plan clusters last
epoch's memory bank of embeddings per prototype head (spherical k-means; the prototypes
become the centroids), the data are multi-crop views each carrying its image's targets, and
the training pass scores the embeddings against H heads at temperature T, steps LARS on a
warm-up + cosine schedule and writes the next memory bank.

The loop does no file I/O and injects no faults: the run folder and ``faults.instrument``
(wrapped around the planner and the loss by ``startup.set_up``) do, around it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from deepcluster import distributed, memory
from deepcluster.data import Normalize
from deepcluster.features import autocast
from deepcluster.health import check_loss
from deepcluster.methods.records import epoch_record
from deepcluster.optim import epoch_learning_rates, set_lr
from deepcluster.progress import Progress
from deepcluster.startup import (STOPS_AFTER_SKIPPED, Setup, build, epoch_said, final_lines, held_folder,
                                 note_unreadable, set_up, start_process)

if TYPE_CHECKING:
    from deepcluster.config import Config
    from deepcluster.memory_bank import MemoryBank
    from deepcluster.runfolder import RunFolder


class Trained(NamedTuple):
    """What an epoch's training pass did: mean loss, images trained on, each head's mean
    loss, the last step's rate and the images that could not be read any more (a plain
    ``(loss, seen)`` pair reads as one too)."""

    loss: float
    seen: int
    head_losses: tuple[float, ...] = ()
    lr: float = float("nan")
    unreadable: tuple[int, ...] = ()


def train_one_epoch(network: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                    config: Config, epoch: int, device: torch.device, temperature: float = 1.0,
                    head_group: dict | None = None, bank: MemoryBank | None = None) -> Trained:
    """One pass of pseudo-label classification over ``loader``'s ``(crops, targets, image
    indices)`` batches, for every method: H heads, V crops, temperature T (v1: 1, 1, 1).

    ``network`` maps the normalised crops to ``(embeddings or None, scores per head)``;
    ``loss_fn(scores, (H, B) targets, T)`` gives each head's loss and the step minimises
    their mean, at the schedule's rate (``optim``); ``head_group`` is optimised with the rest
    for this epoch only, at its own rate. With a ``bank`` (v2) the large crops' embeddings
    are written into it. An image unreadable since the feature pass (target -1) is left out
    of the loss and of the bank, and returned in ``Trained.unreadable``.

    Raises:
        TrainingDiverged: a batch's loss is NaN or infinite (before its step).
    """
    if distributed.is_distributed():
        network = nn.parallel.DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)
    network.train()
    normalize, rates = Normalize(config.mean, config.std), epoch_learning_rates(config, len(loader), epoch)
    if head_group is not None:
        optimizer.add_param_group(head_group)
    head_totals, total_loss, seen, unreadable = 0.0, 0.0, 0, set()
    bar = Progress(min(len(loader.dataset), len(loader) * loader.batch_size), f"epoch {epoch + 1} training", unit="img")
    for step, (crops, targets, image_indices) in enumerate(loader):
        crops = crops if isinstance(crops, list) else [crops]  # v1's batches hold one crop
        targets = targets.reshape(len(image_indices), -1).T  # (heads, B)
        readable = targets[0] >= 0  # -1: the image could not be read any more
        unreadable.update(image_indices[~readable].tolist())
        set_lr(optimizer, float(rates[step]))
        with autocast(device, config.precision == "bf16"):
            embeddings, scores = network([normalize(crop, device, config.channels_last) for crop in crops])
        head_losses = loss_fn([s.float() for s in scores], targets.to(device), temperature)
        loss = head_losses.mean()
        loss_value, n_readable = loss.item(), int(readable.sum())
        check_loss(loss_value, epoch, step)  # before the step: the weights never take a non-finite value
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if bank is not None:  # v2: the large crops' embeddings, for the next epoch's clustering
            bank.write_batch(image_indices, readable, embeddings)
        head_totals = head_totals + head_losses.detach().double().cpu().numpy() * n_readable
        total_loss, seen = total_loss + loss_value * n_readable, seen + n_readable
        bar.update(len(image_indices), note=f"loss {total_loss / max(seen, 1):.4f}")
    bar.close()
    if head_group is not None:
        optimizer.param_groups.pop()  # momentum-free: no state to drop
    if bank is not None:
        bank.synchronise()
    if distributed.is_distributed():  # the wrapper must go before the next epoch's (``release``)
        del network
        total_loss, seen, head_totals = summed_over_processes(total_loss, seen, head_totals)
    return Trained(total_loss / max(seen, 1), seen, tuple(np.atleast_1d(head_totals / max(seen, 1)).tolist()),
                   float(rates[-1]) if len(rates) else float("nan"), tuple(sorted(unreadable)))


def summed_over_processes(total_loss: float, seen: int, head_totals: np.ndarray) -> tuple[float, int, np.ndarray]:
    """An epoch's sums over every process's share (releasing the DDP wrapper's buffers first)."""
    distributed.release()
    totals = distributed.all_reduce_sum(torch.from_numpy(np.concatenate([[total_loss, seen], head_totals])))
    return float(totals[0]), int(round(float(totals[1]))), totals[2:].numpy()


def run(config: Config, resume: bool = False, log: Callable[[str], None] = print,
        stop: Callable[[dict], bool] | None = None) -> list[dict]:
    """Train DeepCluster as ``config`` says; returns the per-epoch records.

    Writes into ``config.out_dir`` (see ``deepcluster.runfolder``): ``config.yaml``,
    ``log.jsonl`` (one JSON object per epoch), ``assignments/epoch_NNNN.npy`` (epochs counted
    from 1, as on screen), ``skipped.tsv`` and ``checkpoint.pt``; after the last epoch, the
    final clustering; ``tensorboard/`` scalars.

    ``stop``, when given, is asked after each committed epoch with its record; True ends
    the run there (resumable, like a kill between epochs; no final clustering).

    A kill at any moment loses at most the epoch in progress: ``resume=True`` continues from
    the checkpoint and ends with the same assignments and weights as an uninterrupted run.

    Raises:
        ConfigError, DataError, CheckpointError: bad settings, data or checkpoint, before
            any training starts.
        TrainingDiverged: the loss or the features became NaN or infinite; the checkpoint
            of the last good epoch is left as it was.
        RunFolderError: a file of the run folder cannot be written (full disk, read-only);
            the previous checkpoint is left as it was.
    """
    # torchrun's process group, if launched by it; precision auto: fp32 or bf16, before anything is written
    device, created, config = start_process(config, log, resume)
    try:
        with held_folder(config, log) as folder:  # the main process holds the folder for all of them
            records = fit(config, folder, resume, device, log, stop)
        if created:
            distributed.barrier()  # the main process has written its last file: all leave together
        return records
    finally:
        if created:
            distributed.stop()


def fit(config: Config, folder: RunFolder, resume: bool, device: torch.device,
        log: Callable[[str], None] = print, stop: Callable[[dict], bool] | None = None) -> list[dict]:
    """The run of :func:`run`, its folder held: set up (or resume), train the epochs left
    (:func:`run_epoch`), then cluster the trained network once more."""
    folder.log = say = log if distributed.is_main_process() else (lambda _: None)  # one process speaks
    after_epoch = []
    if config.minutes is not None:  # a time budget counts the set-up; config.epochs is fitted after every epoch
        from deepcluster.budget import fit_to_budget, start_clock
        start_clock(folder)  # (so fit_to_budget needs no epoch's seconds to start it)
        after_epoch.append(lambda records, say: fit_to_budget(config, folder, records, 0.0, say))
    run_ = set_up(config, folder, resume, device)
    run_.after_epoch.extend(after_epoch)
    folder.open_scalars()
    records = []
    try:
        epoch = run_.state.epoch
        while epoch < config.epochs:  # a time budget fits config.epochs after every epoch (``budget``)
            records.append(run_epoch(config, run_, folder, epoch, say))
            # The epoch's lines and, once, a collapse warning (with stop_on_collapse, the end)
            if epoch_said(run_.state.records, config, say) or (stop is not None and stop(records[-1])):
                break
            epoch += 1
    except STOPS_AFTER_SKIPPED:
        folder.write_skipped(run_.state.skipped)
        raise
    folder.close()
    # A resume with nothing left to train only adds a missing final clustering.
    if config.final_clustering and run_.state.epoch == config.epochs and (
            records or not folder.final_is_current(config.epochs)):
        final_clustering(config, run_, folder, say)
    return records


def run_epoch(config: Config, run_: Setup, folder: RunFolder, epoch: int, say: Callable[[str], None]) -> dict:
    """Epoch ``epoch`` (0-based): plan -> monitor -> pseudo-labelled data -> training ->
    commit; returns its log record (the caller shows it)."""
    method, model, head, state = run_.method, run_.model, run_.head, run_.state
    plan = run_.planner.plan(model, head, epoch, state.previous, state.skipped, run_.monitor.request(model, epoch))
    scores = run_.monitor(model, plan, epoch)
    loader = method.loader(run_.source, plan, config, epoch, run_.device)
    start = time.perf_counter()
    with distributed.rank_stream(config.seed, epoch, model, head), memory.stage("training"):  # own dropout masks
        trained = Trained(*train_one_epoch(method.network(model, head), loader, run_.optimizer, run_.loss, config,
                                          epoch, run_.device, method.temperature(config),
                                          method.head_group(head, config), run_.planner.bank))
    if trained.unreadable:  # images that could not be read any more: listed in skipped.tsv
        note_unreadable(run_.source, trained.unreadable, epoch, state.skipped, say)
    record = epoch_record(plan, scores, trained, time.perf_counter() - start, len(state.skipped), method.logs_heads,
                          run_.processes)
    state.epoch, state.previous = epoch + 1, plan.assignments
    state.records.append(record)
    for step in run_.after_epoch:  # an option's steps (``Setup.after_epoch``: the time budget)
        step(state.records, say)
    folder.commit_epoch(epoch, state, record, model, head, run_.optimizer, run_.planner.checkpoint_entries())
    return record


def final_clustering(config: Config, run_: Setup, folder: RunFolder, say: Callable[[str], None]) -> None:
    """Cluster the trained network once more; its scores, files and lines."""
    model, epochs, last = run_.model, run_.state.epoch, run_.state.previous
    final, summary, plan = run_.planner.final_clustering(model, epochs, last,
                                                         run_.monitor.request(model, epochs, final=True))
    summary = {**summary, **memory.take(), **run_.monitor(model, plan, epochs, final=True)}
    folder.save_final(epochs, final, summary)
    for line in final_lines(config, run_.source, summary, final.assignments, epochs):
        say(line)


__all__ = ["Trained", "build", "fit", "run", "run_epoch", "train_one_epoch"]
