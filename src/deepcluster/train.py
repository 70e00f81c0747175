"""The DeepCluster loop: features -> clustering -> pseudo-labelled data -> training.

One loop for both methods; what differs lives in the method's planner (``methods.v1``,
``methods.v2``). Each epoch of v1 (``fit``), as the paper has it:

1. **Plan** (``methods.v1.V1Planner``): the body, in eval mode, maps the centre view of
   every image to its features; PCA-whitening, L2 normalisation and k-means with a fresh
   seed give every image a pseudo-label; the classifier head is re-created with k outputs
   (cluster ids change every epoch, so last epoch's head means nothing).
2. **Pseudo-labelled data** (``pseudo_label_loader``): an epoch's worth of images drawn
   uniformly over non-empty clusters, with random-resized-crop and flip.
3. **Training** (``train_one_epoch``): the head with its own momentum-free SGD, the body
   with SGD whose momentum persists across epochs.
4. **Commit** (``runfolder.RunFolder``): assignments, checkpoint, log line, atomically.

DeepCluster-v2 (``method: v2``, ``methods.v2.V2Planner``) fills the same four stages
differently: the plan clusters last epoch's memory bank of embeddings per prototype head
(spherical k-means; the prototypes become the centroids), the data are multi-crop views
each carrying its image's targets, and the training pass (the planner's) scores the
embeddings against the prototypes, steps LARS on a warm-up + cosine schedule and writes the
next memory bank.

The loop does no file I/O and injects no faults: the run folder and ``faults.instrument``
do, around it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from deepcluster import distributed, faults, losses
from deepcluster.config import Config, ConfigError
from deepcluster.data import (ColorJitter, ImageSource, Normalize, PseudoLabelDataset, RandomResizedCropFlip,
                              uniform_cluster_sample)
from deepcluster.data import transforms
from deepcluster.data.pseudo import UNREADABLE
from deepcluster.devices import keep_freed_memory, resolve_device
from deepcluster.features import autocast, loader_kwargs
from deepcluster.health import check_loss
from deepcluster.messages import final_line, format_line, plural
from deepcluster.methods import STREAM_SAMPLER, Plan, derived_seed, v2
from deepcluster.methods.v1 import TooFewDecoded, V1Planner, pca_dim_for
from deepcluster.models import Backbone, model_from_config
from deepcluster.models.heads import ClassifierHead, WithHead
from deepcluster.monitor import KNN_BODY_MAX_BYTES, KnnMonitor, body_memory_bytes, digits_verdict, measures_body
from deepcluster.optim import epoch_learning_rates, set_lr
from deepcluster.progress import Progress
from deepcluster.checkpoint import CheckpointError
from deepcluster.data import DataError
from deepcluster.runfolder import RunFolder, RunFolderError, RunState, checkpoint_state, json_record

# What a run's setup may raise on one process only (its lock, its view of the data folder):
# every process learns of it and stops (``distributed.agree``).
SETUP_ERRORS = (ConfigError, DataError, CheckpointError, RunFolderError, OSError)


def build(config: Config, device: torch.device) -> tuple[Backbone, nn.Module, torch.optim.Optimizer]:
    """A fresh backbone on ``device``, its pseudo-label head (without a layer until the first
    clustering) and the body optimiser (SGD with momentum); for v2, ``methods.v2.build``."""
    if config.method == "v2":
        return v2.build(config, device)
    torch.manual_seed(config.seed)
    model = model_from_config(config)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return model, ClassifierHead.for_backbone(model), optimizer


def color_jitter(config: Config) -> ColorJitter | None:
    """The training views' colour jitter, or None when off (the reference)."""
    return transforms.color_jitter(config.color_jitter, config.grayscale_prob)


def pseudo_label_loader(source: ImageSource, assignments: np.ndarray, config: Config, epoch: int,
                        device: torch.device) -> DataLoader:
    """An epoch of ``(image, pseudo-label, image index)`` batches: with the ``uniform``
    sampler each non-empty cluster gets the same share of the epoch (the paper's defence
    against trivial solutions); random-resized-crop and flip views."""
    usable = int((assignments >= 0).sum())
    rng = np.random.default_rng(derived_seed(config.seed, epoch, STREAM_SAMPLER))
    if config.sampler == "uniform":
        indices = uniform_cluster_sample(assignments, usable, rng)
    else:
        indices = rng.permutation(np.flatnonzero(assignments >= 0))
    # Drawn alike on every process, then cut into equal shares (no process waits in DDP for
    # one with a step more); each sample keeps its position in the whole list for its crop.
    indices, positions = distributed.equal_shard(indices)
    transform = RandomResizedCropFlip(config.crop, (config.crop_scale_min, 1.0), flip=config.hflip,
                                      color=color_jitter(config))
    dataset = PseudoLabelDataset(source, indices, assignments, transform, config.seed, epoch,
                                 positions if distributed.is_distributed() else None)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, drop_last=False,
                      **loader_kwargs(config.workers, device))


def pseudo_label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(B, k)`` logits against ``(B,)`` pseudo-labels, ignoring images
    that could not be read (``UNREADABLE``); a batch without a readable image gives a zero
    loss that still reaches every parameter (so every process takes the same steps). The
    shared loss of :mod:`deepcluster.losses` with one head, one crop, temperature 1."""
    return losses.pseudo_label_loss([logits], targets[None])


def train_one_epoch(model: Backbone, head: ClassifierHead, body_optimizer: torch.optim.Optimizer,
                    loader: DataLoader, config: Config, epoch: int, device: torch.device,
                    unreadable: set[int] | None = None,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = pseudo_label_loss,
                    ) -> tuple[float, int]:
    """One pass of pseudo-label classification; returns (mean loss, images trained on).

    An image that cannot be read any more (it was readable in the feature pass) is left out
    of its batch's loss and its index added to ``unreadable``.

    Raises:
        TrainingDiverged: a batch's loss is NaN or infinite (checked before its step, so
            the weights never take a non-finite value).
    """
    head_optimizer = torch.optim.SGD(head.parameters(), lr=config.head_lr or config.lr,
                                     weight_decay=config.weight_decay)
    normalize = Normalize(config.mean, config.std)
    rates = epoch_learning_rates(config, len(loader), epoch)  # the body's; constant lr in the paper's setting
    network = WithHead(model, head)
    if distributed.is_distributed():
        network = nn.parallel.DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)
    network.train()
    total_loss, seen = 0.0, 0
    bar = Progress(len(loader.dataset), f"epoch {epoch + 1} training", unit="img")
    for step, (images, targets, image_indices) in enumerate(loader):
        failed = targets == UNREADABLE
        n_readable = len(images) - int(failed.sum())
        if n_readable < len(images) and unreadable is not None:
            unreadable.update(int(index) for index in image_indices[failed])
        set_lr(body_optimizer, float(rates[step]))
        with autocast(device, config.precision == "bf16"):
            logits = network(normalize(images, device, config.channels_last))
        loss = loss_fn(logits.float(), targets.to(device))
        loss_value = loss.item()
        check_loss(loss_value, epoch, step)
        body_optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        body_optimizer.step()
        head_optimizer.step()
        total_loss += loss_value * n_readable
        seen += n_readable
        bar.update(len(images), note=f"loss {total_loss / seen:.4f}")
    bar.close()
    if distributed.is_distributed():  # the epoch's numbers over every process's share
        del network, logits, loss  # the wrapper must go before the next epoch's (``release``)
        distributed.release()
        totals = distributed.all_reduce_sum(torch.tensor([total_loss, float(seen)], dtype=torch.float64))
        total_loss, seen = float(totals[0]), int(round(float(totals[1])))
    return total_loss / max(seen, 1), seen


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
    faults.check_environment()
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.keep_freed_memory:
        keep_freed_memory()
    device, created = distributed.start(device)  # torchrun's process group, if launched by it
    try:
        with contextlib.ExitStack() as stack:
            folder, error = RunFolder(config, log), None
            try:
                stack.enter_context(folder.held())  # the main process holds the folder for all of them
            except SETUP_ERRORS as caught:
                error = caught
            distributed.agree(error)
            records = fit(config, folder, resume, device, log, stop)
        if created:
            distributed.barrier()  # the main process has written its last file: all leave together
        return records
    finally:
        if created:
            distributed.stop()


def fit(config: Config, folder: RunFolder, resume: bool, device: torch.device,
        log: Callable[[str], None] = print, stop: Callable[[dict], bool] | None = None) -> list[dict]:
    """The run of :func:`run`, its folder held: set up (or resume), train the epochs left,
    then cluster the trained network once more."""
    say = log if distributed.is_main_process() else (lambda _: None)  # one process speaks
    folder.log = say
    error = None
    try:  # every process sets up; if one fails, all stop (``distributed.agree``)
        resume = folder.check_resume(resume)
        source = folder.open_source(resume)
        monitor = None if config.val is None else KnnMonitor.open(config.val, source)
        if config.method == "v2":
            v2.check_sizes(config, len(source))
        elif config.clustering == "kmeans" and config.n_clusters > len(source):
            raise ConfigError(f"setting 'n_clusters' is {config.n_clusters} but the data has only {len(source)} "
                              f"images; choose at most {len(source)}")
        model, head, optimizer = build(config, device)
        state = folder.restore(model, head, optimizer, source) if resume else RunState()
        for item in getattr(source, "skipped", []):
            state.skipped[item.path] = item.reason
        removed = folder.prepare(source, state, resume)
    except SETUP_ERRORS as caught:
        error = caught
    distributed.agree(error)
    if distributed.is_distributed() and sync_batchnorm(config):
        model = distributed.synchronise_batchnorm(model, device)
    for line in start_lines(config, source, state, resume, device, monitor, removed, model):
        say(line)
    if config.method == "v2":
        planner, loss_fn = faults.instrument(v2.V2Planner(config, device, source, monitor, head), losses.per_head_losses)
        train_pass, make_loader = planner.train_one_epoch, v2.multi_crop_loader
    else:
        planner, loss_fn = faults.instrument(V1Planner(config, device, source, monitor), pseudo_label_loss)
        train_pass, make_loader = train_one_epoch, pseudo_label_loader
    if resume and state.epoch > 0:
        planner.load_state(state.saved)
    folder.open_scalars()
    records = []
    try:
        for epoch in range(state.epoch, config.epochs):
            plan = planner.plan(model, head, epoch, state.previous, state.skipped)
            loader = make_loader(source, plan.assignments if plan.targets is None else plan.targets, config, epoch,
                                 device)
            start, unreadable = time.perf_counter(), set()
            with distributed.rank_stream(config.seed, epoch, model, head):  # each process its own dropout masks
                loss, seen = train_pass(model, head, optimizer, loader, config, epoch, device, unreadable, loss_fn)
            note_unreadable(source, unreadable, epoch, state.skipped, say)
            record = epoch_record(plan, loss, seen, time.perf_counter() - start, state, planner.training_numbers)
            if distributed.is_distributed():
                record.update(processes=distributed.world_size(), global_batch=global_batch(config))
            state.epoch, state.previous = epoch + 1, plan.assignments
            state.records.append(record)
            folder.commit_epoch(epoch, state, checkpoint_state(model, head, optimizer, config, state,
                                                               planner.checkpoint_entries()), record)
            for line in epoch_lines(record, config.epochs):
                say(line)
            records.append(record)
            if stop is not None and stop(record):
                break
    except TooFewDecoded:
        folder.write_skipped(state.skipped)
        raise
    folder.close()
    # A resume with nothing left to train only adds a missing final clustering.
    if config.final_clustering and state.epoch == config.epochs and (
            records or not folder.final_is_current(state.epoch)):
        final, summary = planner.final_clustering(model, state.epoch, state.previous)
        folder.save_final(state.epoch, final, summary)
        say(final_line(summary, state.epoch))
        if config.data is None and "nmi_labels" in summary:
            say(digits_verdict(source, summary, final.assignments, config.kmeans_backend))
    return records


def global_batch(config: Config) -> int:
    """Images per optimiser step over all processes (v1's ``batch_size`` is per process,
    v2's is already global)."""
    return config.batch_size * distributed.world_size() if config.method == "v1" else config.batch_size


def sync_batchnorm(config: Config) -> bool:
    """Whether BatchNorm layers pool their batch statistics over the processes: the
    ``sync_batchnorm`` setting; ``auto`` is on for v2 (as SwAV's and solo-learn's multi-GPU
    runs) and off for v1 (the paper trained on one GPU)."""
    return config.sync_batchnorm == "on" or (config.sync_batchnorm == "auto" and config.method == "v2")


def epoch_record(plan: Plan, loss: float, seen: int, seconds: float, state: RunState,
                 training: dict | None = None) -> dict:
    """An epoch's log record: the plan's numbers, then the training stage's (``training``: the
    method's own, e.g. v2's loss per head), as plain values."""
    return json_record({**plan.record, "time_training": seconds, "train_loss": loss, **(training or {}),
                        "train_images_per_s": seen / max(seconds, 1e-9),
                        "n_images": int((plan.assignments >= 0).sum()), "n_skipped": len(state.skipped)})


def epoch_lines(record: dict, epochs: int) -> list[str]:
    """The terminal lines of an epoch: its numbers, then its warnings."""
    return [format_line(record, epochs),
            *(f"deepcluster: warning: epoch {record['epoch']}: {warning}" for warning in record["warnings"])]


def note_unreadable(source: ImageSource, unreadable: set[int], epoch: int, skipped: dict[str, str],
                    say: Callable[[str], None]) -> None:
    """Add the images that became unreadable during the training pass to ``skipped`` (warning
    once per file)."""
    for index in sorted(unreadable):
        name = source.name(index)
        if name not in skipped:
            say(f"deepcluster: warning: epoch {epoch + 1}: {name} could not be read in the training pass "
                "(readable in the feature pass); left out of the loss and listed in skipped.tsv")
        skipped[name] = f"became unreadable during the run (training pass of epoch {epoch + 1})"


def clusters_text(config: Config) -> str:
    """The clusters a run makes, in a few words."""
    if config.method == "v2":
        return f"v2 with prototypes {','.join(map(str, config.prototypes))}"
    return f"k={config.n_clusters}"


def start_lines(config: Config, source: ImageSource, state: RunState, resume: bool, device: torch.device,
                monitor: KnnMonitor | None, removed: list, model: torch.nn.Module | None = None) -> list[str]:
    """What a run says before its first epoch: the data, the network, the notes."""
    lines = [f"deepcluster: {plural(len(source), 'image')}"
             + (f" ({len(state.skipped)} unreadable file(s) skipped, listed in skipped.tsv)" if state.skipped else "")
             + f", {config.arch}{' + sobel' if config.sobel else ''}, {clusters_text(config)}, "
             f"{plural(config.epochs, 'epoch')}, device {device}, run folder {config.run_dir}"
             + (f", resuming after epoch {state.epoch}" if resume else "")
             + (f"; removed {len(removed)} temporary file(s) of an interrupted write" if removed else "")]
    if source.unlabelled:
        lines.append(f"deepcluster: note: no class labels, so no NMI/ACC/ARI against them: {source.unlabelled}")
    if monitor is None and source.labels is not None:
        lines.append("deepcluster: the data folder has classes: add --val FOLDER (labelled images, e.g. a test "
                     "split) to see the online kNN accuracy every epoch")
    if monitor is not None and monitor.note:
        lines.append(f"deepcluster: {monitor.note}")
    if monitor is not None and model is not None and measures_body(model, config) \
            and not measures_body(model, config, monitor):
        lines.append(f"deepcluster: the online kNN leaves out the conv body: its features would take "
                     f"{body_memory_bytes(model, monitor) / 2**30:.1f} GiB per process (over "
                     f"{KNN_BODY_MAX_BYTES // 2**30} GiB); set knn_body: false to silence this")
    if config.method == "v1" and config.pca_dim > pca_dim_for(config.pca_dim, len(source)):
        lines.append(f"deepcluster: warning: {plural(len(source), 'image')} are too few for pca_dim {config.pca_dim} "
                     f"(whitened to N - 1 dimensions or more, the points are all equally far apart and k-means is "
                     f"arbitrary); using {pca_dim_for(config.pca_dim, len(source))}")
    if distributed.is_distributed():
        lines.append(f"deepcluster: {distributed.world_size()} processes ({torch.distributed.get_backend()}), "
                     f"global batch {global_batch(config)} ({global_batch(config) // distributed.world_size()} per "
                     "process), "
                     f"SyncBatchNorm {'on' if sync_batchnorm(config) else 'off'}")
    if resume and state.epoch >= config.epochs:
        lines.append(f"deepcluster: the run has already trained {plural(state.epoch, 'epoch')}; nothing left to "
                     "train (raise --epochs to train further)")
    return lines


__all__ = ["build", "fit", "pseudo_label_loader", "pseudo_label_loss", "run", "train_one_epoch"]
