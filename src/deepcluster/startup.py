"""What surrounds the training loop: the process's setup, the errors of a run's setup, the
fault points wrapped around what the loop calls, and what a run says on the terminal."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

from deepcluster import collapse, distributed, faults, memory
from deepcluster.budget import epochs_text
from deepcluster.checkpoint import CheckpointError
from deepcluster.config import Config, ConfigError
from deepcluster.data import DataError, ImageSource
from deepcluster.devices import keep_freed_memory, resolve_device
from deepcluster.initial_weights import load_initial_weights
from deepcluster.messages import final_line, format_line, plural
from deepcluster.methods.registry import METHODS
from deepcluster.monitor import KNN_BODY_MAX_BYTES, KnnMonitor, Monitor, body_memory_bytes, digits_verdict, measures_body
from deepcluster.partition import TooFewDecoded
from deepcluster.precision import resolve_precision
from deepcluster.runfolder import RunFolder, RunFolderError, RunState

if TYPE_CHECKING:
    from deepcluster.methods import Method
    from deepcluster.models import Backbone

# What a run's setup may raise on one process only (its lock, its view of the data folder):
# every process learns of it and stops (``distributed.agree``).
SETUP_ERRORS = (ConfigError, DataError, CheckpointError, RunFolderError, OSError)
# What stops a run after it has listed its unreadable files (it writes skipped.tsv first).
STOPS_AFTER_SKIPPED = (TooFewDecoded,)


def start_process(config: Config, log: Callable[[str], None] = print,
                  resume: bool = False) -> tuple[torch.device, bool, Config]:
    """Check the fault plan, pick the device and threads, join torchrun's process group if
    launched by it, settle ``precision: auto`` (``precision.resolve_precision``, before
    anything is written); returns the device, whether a group was created here and the
    settings with their precision."""
    faults.check_environment()
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.keep_freed_memory:
        keep_freed_memory()
    device, created = distributed.start(device)
    return device, created, resolve_precision(config, device, log, resume)


@contextlib.contextmanager
def held_folder(config: Config, log: Callable[[str], None] = print) -> Iterator[RunFolder]:
    """The run folder, held (its lock taken) by the main process for all of them while the
    block runs; if that fails, every process stops (``distributed.agree``)."""
    with contextlib.ExitStack() as stack:
        folder, error = RunFolder(config, log), None
        try:
            stack.enter_context(folder.held())
        except SETUP_ERRORS as caught:
            error = caught
        distributed.agree(error)
        yield folder


def build(config: Config, device: torch.device) -> tuple[Backbone, torch.nn.Module, torch.optim.Optimizer]:
    """A fresh backbone on ``device``, its head and optimiser, as the run's method builds them."""
    return METHODS[config.method].build(config, device)


def global_batch(config: Config) -> int:
    """Images per optimiser step over all processes."""
    return METHODS[config.method].global_batch(config, distributed.world_size())


def sync_batchnorm(config: Config) -> bool:
    """Whether BatchNorm layers pool their batch statistics over the processes: the
    ``sync_batchnorm`` setting; ``auto`` as the method says (v2 on, as SwAV's and solo-learn's
    multi-GPU runs; v1 off, the paper trained on one GPU)."""
    return config.sync_batchnorm == "on" or (config.sync_batchnorm == "auto" and METHODS[config.method].sync_batchnorm)


def epoch_lines(record: dict, epochs: int) -> list[str]:
    """The terminal lines of an epoch: its numbers, then its warnings."""
    return [format_line(record, epochs),
            *(f"deepcluster: warning: epoch {record['epoch']}: {warning}" for warning in record["warnings"])]


def epoch_said(records: list[dict], config: Config, say: Callable[[str], None]) -> bool:
    """Say the last epoch's lines (:func:`epoch_lines` of ``records[-1]``), then the run's
    collapse warning once (``collapse.announce``); True when the run should stop there
    (``stop_on_collapse``)."""
    for line in epoch_lines(records[-1], config.epochs):
        say(line)
    return collapse.announce(records, config, say)


def note_unreadable(source: ImageSource, unreadable: Iterable[int], epoch: int, skipped: dict[str, str],
                    say: Callable[[str], None]) -> None:
    """Add the images that became unreadable during the training pass to ``skipped`` (warning
    once per file)."""
    for index in sorted(unreadable):
        name = source.name(index)
        if name not in skipped:
            say(f"deepcluster: warning: epoch {epoch + 1}: {name} could not be read in the training pass "
                "(readable in the feature pass); left out of the loss and listed in skipped.tsv")
        skipped[name] = f"became unreadable during the run (training pass of epoch {epoch + 1})"


def final_lines(config: Config, source: ImageSource, summary: dict, assignments, epochs: int) -> list[str]:
    """What a run says of its final clustering (with the built-in digits, beside raw pixels)."""
    lines = [final_line(summary, epochs)]
    if config.data is None and "nmi_labels" in summary:
        lines.append(digits_verdict(source, summary, assignments, config.kmeans_backend))
    return lines


def clusters_text(config: Config) -> str:
    """The clusters a run makes, in a few words."""
    return METHODS[config.method].describe(config)


def start_lines(config: Config, source: ImageSource, state: RunState, resume: bool, device: torch.device,
                monitor: KnnMonitor | None, removed: list, model: torch.nn.Module | None = None) -> list[str]:
    """What a run says before its first epoch: the data, the network, the notes."""
    lines = [f"deepcluster: {plural(len(source) + len(getattr(source, 'skipped', [])), 'image file')}"
             + f", {config.arch}{' + sobel' if config.sobel else ''}, {clusters_text(config)}, "
             f"{epochs_text(config, state.epoch)}, device {device}, run folder {config.run_dir}"
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
    lines.extend(METHODS[config.method].notes(config, len(source)))
    if distributed.is_distributed():
        lines.append(f"deepcluster: {distributed.world_size()} processes ({torch.distributed.get_backend()}), "
                     f"global batch {global_batch(config)} ({global_batch(config) // distributed.world_size()} per "
                     "process), "
                     f"SyncBatchNorm {'on' if sync_batchnorm(config) else 'off'}")
    if resume and state.epoch >= config.epochs:
        lines.append(f"deepcluster: the run has already trained {plural(state.epoch, 'epoch')}; nothing left to "
                     "train (raise --epochs to train further)")
    return lines


__all__ = ["SETUP_ERRORS", "STOPS_AFTER_SKIPPED", "Setup", "build", "clusters_text", "epoch_lines", "epoch_said",
           "final_lines", "global_batch", "held_folder", "note_unreadable", "set_up", "start_lines", "start_process", "sync_batchnorm"]


@dataclass
class Setup:
    """A run ready for its next epoch: its network, data, state, monitor, the method (its
    registry entry), planner and loss (wrapped with the fault points, ``faults.instrument``),
    the device, the processes of the log (with several: their number and the global
    batch; empty alone) and the steps of an option after each epoch's record, before its
    commit (``after_epoch``: each called with the records so far and ``say``; with
    ``minutes``, the time budget)."""

    model: Backbone
    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    source: ImageSource
    state: RunState
    monitor: Monitor
    planner: Any
    loss: Callable[..., torch.Tensor]
    device: torch.device
    method: Method
    processes: dict[str, int]
    after_epoch: list[Callable[[list[dict], Callable[[str], None]], None]] = field(default_factory=list)


def set_up(config: Config, folder: RunFolder, resume: bool, device: torch.device) -> Setup:
    """Every process sets up (or resumes) the run, its network from the method's ``build``;
    if one fails, all stop (``distributed.agree``).

    Raises:
        ConfigError, DataError, CheckpointError, RunFolderError, OSError: bad settings,
            data, checkpoint or run folder.
    """
    method, error = METHODS[config.method], None
    try:
        resume = folder.check_resume(resume)
        source = folder.open_source(resume)
        knn = None if config.val is None else KnnMonitor.open(config.val, source)
        problem = method.size_problem(config, len(source))
        if problem is not None:
            raise ConfigError(problem)
        model, head, optimizer = method.build(config, device)
        if config.init is not None and not resume:  # the run starts from these weights (``initial_weights``)
            kind = load_initial_weights(model, config.init)
            folder.log(f"deepcluster: start: {config.init} ({kind}); epoch 1's scores are this start's")
        state = folder.restore(model, head, optimizer, source) if resume else RunState()
        for item in getattr(source, "skipped", []):
            state.skipped[item.path] = item.reason
        removed = folder.prepare(source, state, resume)
    except SETUP_ERRORS as caught:
        error = caught
    distributed.agree(error)
    if distributed.is_distributed() and sync_batchnorm(config):
        model = distributed.synchronise_batchnorm(model, device)
        distributed.synchronise_batchnorm(head, device)  # v2's projection has a BatchNorm (in place)
    for line in start_lines(config, source, state, resume, device, knn, removed, model):
        folder.log(line)
    planner, loss = faults.instrument(method.planner(config, device, source, head), method.loss)
    if resume and state.epoch > 0:
        planner.load_state(state.saved)
    processes = ({"processes": distributed.world_size(), "global_batch": global_batch(config)}
                 if distributed.is_distributed() else {})
    memory.take()  # the peak memory of an epoch's stages goes into its record: nothing before counts
    return Setup(model, head, optimizer, source, state, Monitor(knn, source, config, device), planner, loss, device,
                 method, processes)
