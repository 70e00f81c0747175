"""The run folder on disk, kept consistent whatever moment a run is killed at.

Files of a run (``RUN = config.out_dir``)::

    RUN/config.yaml                the resolved settings
    RUN/skipped.tsv                files left out: path<TAB>reason (a header line first)
    RUN/assignments/epoch_NNNN.npy pseudo-labels of epoch NNNN (counted from 1), int32
    RUN/checkpoint.pt              the state after the last completed epoch
    RUN/log.jsonl                  one JSON record per completed epoch
    RUN/images.json                the run's images, in the order of the assignments
    RUN/.lock                      held (``lockf``) by the run writing the folder

The image list (``images.json``) and the other names: ``run_files``; the lock: ``run_lock``.

The checkpoint is the single source of truth. At the end of an epoch the files are
written in the order assignments, skipped list, checkpoint, log line; each file except the
log is replaced atomically (``checkpoint.atomic_write_bytes``), so a kill leaves either
the old or the new version, plus perhaps a hidden temporary file. A run that starts (or
resumes) removes those temporary files, deletes assignments of epochs the checkpoint has not
completed, and rewrites ``log.jsonl`` from the records stored in the checkpoint: whatever the
kill interrupted, the folder then describes exactly the epochs the checkpoint holds, with no
duplicate and no torn line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
import yaml

from deepcluster import distributed
from deepcluster.checkpoint import (CheckpointError, atomic_write_bytes, check_resumable, load_checkpoint, load_head,
                                    load_weights, remove_temp_files, save_checkpoint)
from deepcluster.config import Config, ConfigError, check_unchanged, from_dict
from deepcluster.data import FolderSource, ImageSource
from deepcluster.faults import fault_point
from deepcluster.models.heads import ClassifierHead
from deepcluster.run_files import (ASSIGNMENTS_DIR, CHECKPOINT_NAME, CONFIG_NAME, FINAL_ASSIGNMENTS, FINAL_SUMMARY,
                                   IMAGES_NAME, LOG_NAME, SKIPPED_HEADER, SKIPPED_NAME, folder_changes, json_record,
                                   log_text, open_source, read_images, read_log, records_from_log, saved_settings,
                                   skipped_text, started_run, write_images)
from deepcluster.run_lock import LOCK_NAME, RunFolderError, check_out_folder, lock, write_failure
from deepcluster.scalars import ScalarLog

if TYPE_CHECKING:
    from torch import nn

    from deepcluster.models import Backbone
    from deepcluster.partition import Partition

_ASSIGNMENTS_FILE = re.compile(r"epoch_(\d+)\.npy")


def prepare(run_dir: Path, config: Config, completed: int, records: list[dict[str, Any]],
            skipped: dict[str, str]) -> list[Path]:
    """Make ``run_dir`` describe exactly the first ``completed`` epochs, before training
    (a folder that counted epochs from 0 is renumbered first, see ``count_from_one``).

    Args:
        run_dir: the run folder (created if needed).
        config: written to ``config.yaml``.
        completed: epochs the checkpoint holds (0 for a fresh run).
        records: one log record per completed epoch (those stored in the checkpoint);
            ``log.jsonl`` is rewritten to hold exactly these.
        skipped: files left out so far, written to ``skipped.tsv``.

    Returns:
        The stale temporary files that were removed.

    Raises:
        RunFolderError: a file or folder cannot be written.
    """
    assignments_dir = run_dir / ASSIGNMENTS_DIR
    try:
        assignments_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_failure("the run folder", assignments_dir, error) from None
    try:
        removed = remove_temp_files(run_dir) + remove_temp_files(assignments_dir)
        count_from_one(run_dir, records[:completed])
        for stale in assignments_dir.iterdir():
            match = _ASSIGNMENTS_FILE.fullmatch(stale.name)
            if match and int(match.group(1)) > completed:
                stale.unlink()
        if completed < config.epochs:
            # Epochs are left to train: a final clustering of the current weights is outdated.
            for stale in (assignments_dir / FINAL_ASSIGNMENTS, run_dir / FINAL_SUMMARY):
                stale.unlink(missing_ok=True)
    except OSError as error:
        raise write_failure("the run folder", run_dir, error) from None
    for name, payload in ((CONFIG_NAME, yaml.safe_dump(config.to_dict(), sort_keys=False)),
                          (SKIPPED_NAME, skipped_text(skipped)), (LOG_NAME, log_text(records[:completed]))):
        path = run_dir / name
        try:
            atomic_write_bytes(path, payload.encode())
        except OSError as error:
            raise write_failure("the run file", path, error) from None
    return removed


RENUMBER_JOURNAL = ".renumbering"  # in ASSIGNMENTS_DIR, while a folder counting from 0 is renumbered


def count_from_one(run_dir: Path, records: list[dict[str, Any]]) -> bool:
    """Bring a run folder written when epochs counted from 0 (the first epoch's log record
    ``epoch: 0``, its assignments ``epoch_0000.npy``) to counting from 1, in place: each
    record's ``epoch`` goes up by one and each assignments file is renamed one up, last
    first. A journal (``assignments/.renumbering``: the lowest epoch still to move) makes a
    kill at any moment harmless: the next start goes on where it stopped. The journal stays
    until a checkpoint holds the renumbered records.

    Args:
        records: the completed epochs' records, from the checkpoint (changed in place).

    Returns:
        True when the records counted from 0 (and were renumbered here).
    """
    folder = run_dir / ASSIGNMENTS_DIR
    journal = folder / RENUMBER_JOURNAL
    if not records or records[0].get("epoch") != 0:
        journal.unlink(missing_ok=True)  # the checkpoint holds renumbered records: done
        return False
    if journal.is_file():
        start = int(journal.read_text())
    else:  # nothing moved yet: first drop the file of an unfinished epoch, then start the journal
        for stale in folder.iterdir():
            match = _ASSIGNMENTS_FILE.fullmatch(stale.name)
            if match and int(match.group(1)) >= len(records):
                stale.unlink()
        start = len(records)
        atomic_write_bytes(journal, str(start).encode())
    for old in range(start - 1, -1, -1):
        source = folder / f"epoch_{old:04d}.npy"
        if source.exists():
            os.replace(source, folder / f"epoch_{old + 1:04d}.npy")
        atomic_write_bytes(journal, str(old).encode())
    for record in records:
        record["epoch"] += 1
    return True


def write_skipped(run_dir: Path, skipped: dict[str, str]) -> None:
    """Replace ``skipped.tsv`` atomically.

    Raises:
        RunFolderError: it cannot be written.
    """
    path = run_dir / SKIPPED_NAME
    try:
        atomic_write_bytes(path, skipped_text(skipped).encode())
    except OSError as error:
        raise write_failure("skipped-file list", path, error) from None


def save_assignments(path: Path, assignments: np.ndarray) -> None:
    """Write ``(N,)`` assignments as an int32 ``.npy`` (no pickle), atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(assignments, dtype=np.int32), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue(), fault="assignments")


def commit_epoch(run_dir: Path, epoch: int, assignments: np.ndarray, skipped: dict[str, str],
                 checkpoint: dict[str, Any], record: dict[str, Any]) -> None:
    """Write the outputs of epoch ``epoch`` (the 0-based loop index; files and messages count
    from 1), checkpoint last but for the log line.

    A failure leaves the previous checkpoint as it was and raises; the files of this epoch
    written before it are removed or rewritten when the run is resumed (``prepare``).

    Raises:
        RunFolderError: naming the file that could not be written and why.
    """
    kept = (f"the checkpoint of epoch {epoch} is kept" if epoch > 0 else "no checkpoint had been written yet")
    path = run_dir / ASSIGNMENTS_DIR / f"epoch_{epoch + 1:04d}.npy"
    try:
        save_assignments(path, assignments)
        path = run_dir / SKIPPED_NAME
        atomic_write_bytes(path, skipped_text(skipped).encode())
        path = run_dir / CHECKPOINT_NAME
        save_checkpoint(path, checkpoint)
        (run_dir / ASSIGNMENTS_DIR / RENUMBER_JOURNAL).unlink(missing_ok=True)  # records now count from 1
    except OSError as error:
        what = {CHECKPOINT_NAME: "checkpoint", SKIPPED_NAME: "skipped-file list"}.get(path.name, "assignments")
        raise write_failure(what, path, error, kept) from None
    fault_point("log")
    path = run_dir / LOG_NAME
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        # The checkpoint of this epoch is written; a resume rewrites the log from it.
        raise write_failure("log", path, error, f"the checkpoint of epoch {epoch + 1} is written; resume to "
                                                "continue") from None


def save_final(run_dir: Path, assignments: np.ndarray, checkpoint: dict[str, Any], summary: str) -> None:
    """Write the final clustering: ``assignments/final.npy``, its summary ``final.json``,
    then the checkpoint that holds it (the commit point: a run whose checkpoint holds the
    final clustering has both files); each atomically.

    Raises:
        RunFolderError: naming the file that could not be written; the trained checkpoint
            is kept (a resume with nothing left to train retries the final clustering).
    """
    path = run_dir / ASSIGNMENTS_DIR / FINAL_ASSIGNMENTS
    try:
        save_assignments(path, assignments)
        path = run_dir / FINAL_SUMMARY
        atomic_write_bytes(path, summary.encode())
        path = run_dir / CHECKPOINT_NAME
        save_checkpoint(path, checkpoint)
    except OSError as error:
        raise write_failure("final clustering", path, error, "the trained checkpoint is kept; --resume retries it") from None


@dataclass
class RunState:
    """What a resumed run needs besides the weights."""

    epoch: int = 0  # epochs completed
    previous: np.ndarray | None = None  # last epoch's assignments
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    records: list[dict] = field(default_factory=list)  # log record of every completed epoch
    saved: dict[str, Any] = field(default_factory=dict)  # the checkpoint's other entries (the planner's state)


def check_resume_config(saved: dict, config: Config) -> None:
    """A resumed run must use the settings it started with, except ``RESUMABLE`` ones."""
    try:
        old = from_dict(saved)
    except ConfigError as error:
        raise CheckpointError(f"the checkpoint's settings are invalid ({error})") from None
    check_unchanged(old, config)


class RunFolder:
    """A run's folder as the training loop sees it: everything the loop reads from or writes
    to disk goes through here, so the loop itself does no file I/O.

    With several processes only the main one writes (the others could delete its
    temporary files); the others read.

    Args:
        config: the run's settings (``run_dir`` is the folder).
        log: where one-line notices go.
    """

    def __init__(self, config: Config, log: Callable[[str], None] = print) -> None:
        self.config, self.path, self.log = config, config.run_dir, log
        self.writer = distributed.is_main_process()
        self.checkpoint_path = self.path / CHECKPOINT_NAME
        self.scalars: ScalarLog | None = None

    @contextmanager
    def held(self) -> Iterator[RunFolder]:
        """The folder's lock for the whole run (taken by the writer only; see ``lock``)."""
        with lock(self.path) if self.writer else contextlib.nullcontext():
            yield self

    def check_resume(self, resume: bool) -> bool:
        """Whether the run resumes: a folder killed during its first epoch starts over.

        Raises:
            CheckpointError: nothing to resume.
            ConfigError: a fresh run into a folder that holds a checkpoint.
        """
        if resume and not self.checkpoint_path.is_file():
            if not started_run(self.path):
                raise CheckpointError(f"nothing to resume: {str(self.checkpoint_path)!r} does not exist")
            # Killed during its first epoch: there is nothing to lose, start over.
            self.log(f"deepcluster: {str(self.path)!r} has no checkpoint yet (the run stopped during its first epoch); "
                     "starting from the beginning")
            resume = False
        if not resume and self.checkpoint_path.is_file():
            raise ConfigError(f"run folder {str(self.path)!r} already holds a checkpoint; pass --resume to continue it "
                              "or choose another --out")
        return resume

    def open_source(self, resume: bool) -> ImageSource:
        """The run's images (a resumed run: the list it stored when it started)."""
        return open_source(self.config, self.path if resume else None)

    def restore(self, model: Backbone, head: nn.Module, optimizer: torch.optim.Optimizer,
                source: ImageSource) -> RunState:
        """Load the checkpoint into ``model``, ``head`` and ``optimizer``, and the torch
        generator; returns the run state.

        Raises:
            CheckpointError: a checkpoint that is damaged, of other settings or another model.
            ConfigError: the data folder no longer holds the images the run was trained on.
        """
        path, config = self.checkpoint_path, self.config
        saved = load_checkpoint(path)
        check_resume_config(saved["config"], config)
        check_resumable(saved, path)
        if saved.get("arch") != config.arch:
            raise CheckpointError(f"checkpoint {str(path)!r} is for architecture {saved.get('arch')!r}, "
                                  f"but the run asks for {config.arch!r}")
        load_weights(model, saved["model"], path)
        if isinstance(head, ClassifierHead):  # v1's head is re-created at its saved width
            load_head(head, saved["head"], path, next(model.parameters()).device)
        else:
            load_weights(head, saved["head"], path)
        try:
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: "
                                  f"{str(error).splitlines()[0]}") from None
        torch.set_rng_state(saved["torch_rng"])
        previous = saved.get("assignments")
        records = saved.get("records")
        state = RunState(int(saved["epoch"]), None if previous is None else previous.numpy().astype(np.int64),
                         dict(saved.get("skipped", {})),
                         records if isinstance(records, list) and all(isinstance(r, dict) for r in records) else [],
                         saved)
        if state.previous is not None and len(state.previous) != len(source):
            raise ConfigError(f"the data folder {config.data!r} now holds {len(source)} usable images but the run "
                              f"was trained on {len(state.previous)}; restore the folder as it was, or start a new "
                              "run with another --out")
        return state

    def prepare(self, source: ImageSource, state: RunState, resume: bool) -> list[Path]:
        """Make the folder describe exactly the checkpoint's epochs (``prepare``), store the
        image list (a fresh run) or warn about a changed data folder (a resumed one), and
        returns the temporary files of an interrupted write that were removed."""
        if not self.writer:
            return []
        removed = prepare(self.path, self.config, state.epoch, state.records, state.skipped)
        if isinstance(source, FolderSource):
            if not resume or not (self.path / IMAGES_NAME).is_file():  # or a run from before the list
                write_images(self.path, source.root, source.relative_files())
            else:
                change = folder_changes(source, state.skipped)
                if change:
                    self.log(change)
        return removed

    def open_scalars(self) -> None:
        """Start the TensorBoard scalars (``tensorboard`` setting; flushed every epoch, so a
        run that stops early keeps them without a ``close``)."""
        self.scalars = ScalarLog(self.path, self.config.tensorboard and self.writer)

    def write_skipped(self, skipped: dict[str, str]) -> None:
        """Replace ``skipped.tsv`` (see ``write_skipped``)."""
        if self.writer:
            write_skipped(self.path, skipped)

    def commit_epoch(self, epoch: int, state: RunState, record: dict[str, Any], model: Backbone, head: nn.Module,
                     optimizer: torch.optim.Optimizer, clustering: dict[str, Any]) -> None:
        """Write epoch ``epoch``'s (0-based) assignments, skipped list, checkpoint, log line and
        scalars (see ``commit_epoch``). The checkpoint, made here, holds everything a resume or
        a later ``assign`` needs, as tensors and plain containers; ``clustering`` is what the
        method keeps of its clustering (the planner's ``checkpoint_entries``: v1's centroids
        and PCA, v2's memory bank)."""
        if self.writer:
            previous = None if state.previous is None else torch.from_numpy(state.previous)
            checkpoint = {"config": self.config.to_dict(), "arch": self.config.arch, "epoch": state.epoch,
                          "model": dict(model.state_dict()), "head": dict(head.state_dict()),
                          "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                          "assignments": previous, "skipped": dict(state.skipped),
                          "records": list(state.records),  # plain values (json_record): log.jsonl is rebuilt from them
                          **clustering}
            commit_epoch(self.path, epoch, state.previous, state.skipped, checkpoint, record)
            self.scalars.write(record)

    def close(self) -> None:
        """Flush and close the scalars (they are flushed every epoch anyway)."""
        if self.scalars is not None:
            self.scalars.close()

    def final_is_current(self, epoch: int) -> bool:
        """Whether the checkpoint already holds the final clustering of ``epoch`` epochs and
        both files made from it are there (a missing one is made again)."""
        final = load_checkpoint(self.checkpoint_path).get("final")
        return (isinstance(final, dict) and final.get("epoch") == epoch
                and (self.path / ASSIGNMENTS_DIR / FINAL_ASSIGNMENTS).is_file()
                and (self.path / FINAL_SUMMARY).is_file())

    def save_final(self, epoch: int, partition: Partition, summary: dict[str, Any]) -> None:
        """Add the final clustering to the checkpoint, ``assignments/final.npy`` and
        ``final.json`` (see ``save_final``)."""
        if not self.writer:
            return
        saved = load_checkpoint(self.checkpoint_path)
        saved.pop("format_version", None)
        saved["final"] = {"epoch": epoch, "centroids": torch.from_numpy(partition.centroids),
                          **({} if partition.pca is None else {  # v2 clusters unit embeddings, no PCA
                              "pca_mean": torch.from_numpy(partition.pca.mean),
                              "pca_projection": torch.from_numpy(partition.pca.projection)}),
                          "assignments": torch.from_numpy(partition.assignments)}
        save_final(self.path, partition.assignments, saved, json.dumps(summary) + "\n")


__all__ = ["ASSIGNMENTS_DIR", "CHECKPOINT_NAME", "CONFIG_NAME", "FINAL_ASSIGNMENTS", "FINAL_SUMMARY", "IMAGES_NAME",
           "LOCK_NAME", "LOG_NAME", "RunFolder", "RunFolderError", "RunState", "SKIPPED_HEADER", "SKIPPED_NAME",
           "check_out_folder", "commit_epoch", "count_from_one", "folder_changes", "json_record",
           "lock", "log_text", "open_source", "prepare", "read_images", "read_log", "records_from_log",
           "save_assignments", "save_final", "saved_settings", "skipped_text", "started_run", "write_failure",
           "write_images", "write_skipped"]
