"""The run folder on disk, kept consistent whatever moment a run is killed at.

Files of a run (``RUN = config.out_dir``)::

    RUN/config.yaml                the resolved settings
    RUN/skipped.tsv                files left out: path<TAB>reason (a header line first)
    RUN/assignments/epoch_NNNN.npy pseudo-labels of epoch NNNN (counted from 1), int32
    RUN/checkpoint.pt              the state after the last completed epoch
    RUN/log.jsonl                  one JSON record per completed epoch
    RUN/images.json                the run's images, in the order of the assignments
    RUN/.lock                      held (``flock``) by the run writing the folder

A run fixes its images when it starts: ``images.json`` lists them (relative to the data
folder, in the order the assignments use) and a resumed run, ``report`` and the final
clustering read that list instead of scanning the folder again. Files added to the folder
later are not used; files that went missing are skipped when they fail to load. The row of
an image in every assignments file therefore always means the same image.

Only one run may write a folder at a time: ``lock`` takes an exclusive POSIX record lock
(``lockf``) on ``RUN/.lock`` for the whole run, so a second ``train`` (or ``--resume``) on
the same folder stops at once with a clear error instead of mixing its epochs into the first
one's. The lock belongs to the process alone (forked loader workers do not inherit it) and
the operating system releases it when the process ends, however it ends, so a killed run
never leaves a stale lock behind.

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
import errno
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
from deepcluster.config import Config, ConfigError, check_unchanged, from_dict, load_yaml
from deepcluster.data import FolderSource, ImageSource, load_digits_source, walk_relative
from deepcluster.data.sources import DataError
from deepcluster.faults import fault_point
from deepcluster.messages import shown_path
from deepcluster.models.heads import ClassifierHead
from deepcluster.scalars import ScalarLog

if TYPE_CHECKING:
    from torch import nn

    from deepcluster.methods.v1 import Partition
    from deepcluster.models import Backbone

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
SKIPPED_NAME = "skipped.tsv"
SKIPPED_HEADER = "path\treason\n"  # the first line of skipped.tsv
CONFIG_NAME = "config.yaml"
ASSIGNMENTS_DIR = "assignments"
LOCK_NAME = ".lock"
IMAGES_NAME = "images.json"
_ASSIGNMENTS_FILE = re.compile(r"epoch_(\d+)\.npy")


class RunFolderError(RuntimeError):
    """A file of the run folder cannot be written (full disk, read-only folder, no
    permission); the message names the file and the operating system's reason."""


def _os_reason(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0)
    text = error.strerror or str(error) or type(error).__name__
    return f"{text} ({name})" if name else text


def write_failure(what: str, path: Path, error: OSError, kept: str = "") -> RunFolderError:
    """The error to raise when writing ``path`` failed with ``error``."""
    return RunFolderError(f"cannot write {what} {str(path)!r}: {_os_reason(error)}" + (f"; {kept}" if kept else ""))


def check_out_folder(path: Path) -> None:
    """Raise ``ConfigError`` when ``path`` (an ``--out`` folder) is a file or lies inside one."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"lies inside {str(candidate)!r}, which is a file"
                raise ConfigError(f"--out {str(path)!r} {where}; give a folder")
            return


@contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's exclusive lock inside the block (creating the folder).

    The lock is a POSIX record lock (``lockf``), which belongs to this process alone: a
    forked child (a DataLoader worker) does not inherit it, so the moment this process dies,
    however it dies, the folder is free again (an ``flock`` would live on in the workers
    until they notice). The descriptor is closed on ``exec``.

    Raises:
        ConfigError: another process holds the lock (names its process id), or the folder
            is a file.
        RunFolderError: the folder or its lock file cannot be created or written (full disk);
            nothing is left behind.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no locking
        yield
        return
    check_out_folder(run_dir)
    path = run_dir / LOCK_NAME
    created = not run_dir.exists()
    existed = path.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as error:
        _remove_new(run_dir, created, existed)
        raise write_failure("the run file", path, error) from None
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Earlier versions held an ``flock`` instead: a run of one of those is refused too
            # (tried and released at once: an ``flock`` would be inherited by loader workers).
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise write_failure("the run file", path, error) from None
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"run folder {str(run_dir)!r} is being written by another deepcluster run "
                              f"(process {holder}); wait for it to end or choose another --out") from None
        try:
            holder = f"{os.getpid()}\n".encode()
            os.pwrite(handle, holder, 0)
            os.ftruncate(handle, len(holder))
        except OSError as error:  # a full disk, before anything else was written
            _remove_new(run_dir, created, existed)
            raise write_failure("the run file", path, error) from None
        try:
            yield
        finally:
            if created and [entry.name for entry in run_dir.iterdir()] == [LOCK_NAME]:
                # Stopped before writing anything (bad settings): leave no folder behind.
                _remove_new(run_dir, created, existed)
    finally:
        os.close(handle)  # releases the lock


def _remove_new(run_dir: Path, created: bool, existed: bool) -> None:
    """Remove the lock file and the folder that ``lock`` created (best effort)."""
    with contextlib.suppress(OSError):
        if not existed:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
        if created:
            run_dir.rmdir()


def write_images(run_dir: Path, root: str, files: list[str]) -> None:
    """Store the run's image list (``files`` relative to ``root``), atomically.

    Raises:
        RunFolderError: the file cannot be written.
    """
    path = run_dir / IMAGES_NAME
    payload = json.dumps({"format": 1, "root": root, "n_images": len(files), "files": files})
    try:
        atomic_write_bytes(path, payload.encode())
    except OSError as error:
        raise write_failure("the run file", path, error) from None


def read_images(run_dir: Path) -> list[str] | None:
    """The image list a run stored, or ``None`` when the run has none (written by an older
    version, or the built-in digits).

    Raises:
        DataError: the file exists but is damaged.
    """
    path = run_dir / IMAGES_NAME
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_bytes())
        files = stored["files"]
        if not isinstance(files, list) or not all(isinstance(name, str) for name in files) \
                or stored.get("n_images") != len(files):
            raise ValueError("not a list of file names of the stated length")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"cannot read the run's image list {str(path)!r} ({error}); it is written when a run "
                             "starts: delete it to fall back to scanning the data folder") from None
    return files


def started_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the files a run writes before its first checkpoint."""
    return (run_dir / CONFIG_NAME).is_file() or (run_dir / LOG_NAME).is_file()


def saved_settings(run_dir: Path) -> dict[str, Any] | None:
    """The settings a run saved when it started (``config.yaml``; the checkpoint's when that
    file is gone), for ``--resume``; ``None`` when a run made the folder (empty, or with its
    ``.lock`` only) but was stopped before it saved anything: nothing to lose, it starts afresh.

    Raises:
        CheckpointError: no run ever started in ``run_dir``, or its checkpoint is unreadable.
        ConfigError: ``config.yaml`` is not a readable mapping of settings.
    """
    if (run_dir / CONFIG_NAME).is_file():
        return load_yaml(run_dir / CONFIG_NAME)
    if (run_dir / CHECKPOINT_NAME).is_file():
        saved = load_checkpoint(run_dir / CHECKPOINT_NAME).get("config")
        if isinstance(saved, dict):
            return saved
    elif (run_dir / LOCK_NAME).is_file() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return None  # killed while starting: after its lock, or after making the folder and before its lock
    raise CheckpointError(f"nothing to resume: {str(run_dir)!r} holds no run ({CONFIG_NAME} and {CHECKPOINT_NAME} "
                          "are missing); start it without --resume, or give the run folder with --out")


def json_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with plain Python values only (numpy scalars become floats and ints), so
    that it can sit in a checkpoint that ``torch.load(weights_only=True)`` accepts."""
    return json.loads(json.dumps(record))


def skipped_text(skipped: dict[str, str]) -> str:
    """The skipped list: a ``path<TAB>reason`` header line, then one such line per file,
    sorted by path. Tabs and line breaks inside a path or reason become spaces, so every file
    stays one line, and bytes of a name that are not UTF-8 are written as ``\\xNN``
    (``messages.shown_path``)."""
    def clean(text: str) -> str:
        return re.sub(r"[\t\r\n]", " ", shown_path(text))

    return SKIPPED_HEADER + "".join(f"{clean(path)}\t{clean(reason)}\n" for path, reason in sorted(skipped.items()))


def read_log(path: Path, strict: bool = False) -> list[dict[str, Any]]:
    """The epoch records of ``log.jsonl`` (none when the file is missing).

    A torn last line (a run killed while appending it) is dropped. Any other line that is
    not a JSON record with an integer ``epoch`` is skipped, or with ``strict`` an error.

    Raises:
        DataError: with ``strict``, a damaged line other than the last.
    """
    records = []
    if not path.is_file():
        return records
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if strict and number < len(lines):
                raise DataError(f"{str(path)!r} line {number} is not JSON") from None
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def log_text(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def records_from_log(run_dir: Path, completed: int) -> list[dict[str, Any]]:
    """The log records of the first ``completed`` epochs as ``log.jsonl`` holds them: whole
    JSON lines only, the first line of each epoch (logs written when epochs counted from 0
    included)."""
    records, seen = [], set()
    logged = read_log(run_dir / LOG_NAME)
    first = 0 if any(record["epoch"] == 0 for record in logged) else 1
    for record in logged:
        if first <= record["epoch"] < first + completed and record["epoch"] not in seen:
            seen.add(record["epoch"])
            records.append(record)
    return records


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


FINAL_ASSIGNMENTS = "final.npy"  # in ASSIGNMENTS_DIR
FINAL_SUMMARY = "final.json"


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


def open_source(config: Config, run_dir: Path | None = None, data: str | None = None) -> ImageSource:
    """The images of the run: ``data`` (default the run's ``config.data``), the built-in
    digits when there is none; with ``run_dir``, in the order of the list the run stored when
    it started (``RUN/images.json``) when it has one (which also spares a scan of every
    header), else a fresh scan of the folder."""
    folder = data if data is not None else config.data
    if folder is None:
        return load_digits_source()
    return FolderSource(folder, None if run_dir is None else read_images(Path(run_dir)))


def folder_changes(source: ImageSource, skipped: dict[str, str]) -> str | None:
    """What changed in a run's data folder since the run stored its image list (a cheap
    listing, no header read), as a warning; ``None`` when nothing did."""
    if not isinstance(source, FolderSource):
        return None
    stored = set(source.relative_files())
    present = set(walk_relative(source.root))
    added = [name for name in present - stored if str(Path(source.root) / name) not in skipped]
    missing = stored - present
    if not added and not missing:
        return None
    return (f"deepcluster: warning: the data folder {source.root!r} changed since the run started: "
            f"{len(added)} new image file(s) not used (a run keeps the images it started with, listed in "
            f"images.json), {len(missing)} missing (left out as unreadable)")


def checkpoint_state(model: Backbone, head: nn.Module, optimizer: torch.optim.Optimizer, config: Config,
                     state: RunState, clustering: dict[str, Any]) -> dict:
    """Everything a resume or a later ``assign`` needs, as tensors and plain containers.

    Args:
        clustering: what the method keeps of its clustering (the planner's
            ``checkpoint_entries``: v1's centroids and PCA, v2's memory bank).
    """
    return {
        "config": config.to_dict(),
        "arch": config.arch,
        "epoch": state.epoch,
        "model": dict(model.state_dict()),
        "head": dict(head.state_dict()),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "assignments": torch.from_numpy(state.previous) if state.previous is not None else None,
        "skipped": dict(state.skipped),
        "records": list(state.records),  # plain values (json_record): log.jsonl is rebuilt from them
        **clustering,
    }


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

    def commit_epoch(self, epoch: int, state: RunState, checkpoint: dict[str, Any], record: dict[str, Any]) -> None:
        """Write epoch ``epoch``'s (0-based) assignments, skipped list, checkpoint, log line
        and scalars (see ``commit_epoch``)."""
        if self.writer:
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


__all__ = ["ASSIGNMENTS_DIR", "CHECKPOINT_NAME", "LOG_NAME", "RunFolder", "RunFolderError", "RunState", "SKIPPED_NAME",
           "checkpoint_state", "commit_epoch", "json_record", "open_source", "prepare", "read_log", "records_from_log",
           "save_assignments", "save_final", "skipped_text", "started_run", "write_skipped"]
