"""The run folder on disk, kept consistent whatever moment a run is killed at.

Files of a run (``RUN = config.out_dir``)::

    RUN/config.yaml                the resolved settings
    RUN/skipped.tsv                files left out: path<TAB>reason
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

Only one run may write a folder at a time: ``lock`` takes an exclusive ``flock`` on
``RUN/.lock`` for the whole run, so a second ``train`` (or ``--resume``) on the same folder
stops at once with a clear error instead of mixing its epochs into the first one's. The
operating system releases the lock when the process ends, however it ends, so a killed
run never leaves a stale lock behind.

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

import errno
import io
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from deepcluster.checkpoint import (CheckpointError, atomic_write_bytes, load_checkpoint, remove_temp_files,
                                    save_checkpoint)
from deepcluster.config import Config, ConfigError, load_yaml
from deepcluster.data.sources import DataError
from deepcluster.faults import fault_point

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
SKIPPED_NAME = "skipped.tsv"
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

    Raises:
        ConfigError: another process holds the lock (names its process id), or the folder
            is a file.
        RunFolderError: the folder or its lock file cannot be created.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no locking
        yield
        return
    check_out_folder(run_dir)
    path = run_dir / LOCK_NAME
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise write_failure("the run file", path, error) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"run folder {str(run_dir)!r} is being written by another deepcluster run "
                              f"(process {holder}); wait for it to end or choose another --out") from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            if created and [entry.name for entry in run_dir.iterdir()] == [LOCK_NAME]:
                # Stopped before writing anything (bad settings): leave no folder behind.
                path.unlink(missing_ok=True)
                run_dir.rmdir()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)


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


def saved_settings(run_dir: Path) -> dict[str, Any]:
    """The settings a run saved when it started (``config.yaml``; the checkpoint's when that
    file is gone), for ``--resume``.

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
    raise CheckpointError(f"nothing to resume: {str(run_dir)!r} holds no run ({CONFIG_NAME} and {CHECKPOINT_NAME} "
                          "are missing); start it without --resume, or give the run folder with --out")


def json_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with plain Python values only (numpy scalars become floats and ints), so
    that it can sit in a checkpoint that ``torch.load(weights_only=True)`` accepts."""
    return json.loads(json.dumps(record))


def skipped_text(skipped: dict[str, str]) -> str:
    """The skipped list, one ``path<TAB>reason`` line per file, sorted by path. Tabs and
    line breaks inside a path or reason become spaces, so every file stays one line."""
    def clean(text: str) -> str:
        return re.sub(r"[\t\r\n]", " ", text)

    return "".join(f"{clean(path)}\t{clean(reason)}\n" for path, reason in sorted(skipped.items()))


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of ``log.jsonl``, skipping any line that is not a whole JSON object."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def log_text(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def records_from_log(run_dir: Path, completed: int) -> list[dict[str, Any]]:
    """The log records of the first ``completed`` epochs as ``log.jsonl`` holds them: whole
    JSON lines only, the first line of each epoch (for a checkpoint that stores no records,
    as written before they were stored; such logs count epochs from 0)."""
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
    """Write the final clustering: ``assignments/final.npy``, the checkpoint that holds it,
    then its summary; each atomically.

    Raises:
        RunFolderError: naming the file that could not be written; the trained checkpoint
            is kept (a resume with nothing left to train retries the final clustering).
    """
    path = run_dir / ASSIGNMENTS_DIR / FINAL_ASSIGNMENTS
    try:
        save_assignments(path, assignments)
        path = run_dir / CHECKPOINT_NAME
        save_checkpoint(path, checkpoint)
        path = run_dir / FINAL_SUMMARY
        atomic_write_bytes(path, summary.encode())
    except OSError as error:
        raise write_failure("final clustering", path, error, "the trained checkpoint is kept; --resume retries it") from None


__all__ = ["ASSIGNMENTS_DIR", "CHECKPOINT_NAME", "LOG_NAME", "RunFolderError", "SKIPPED_NAME", "commit_epoch",
           "json_record", "prepare", "save_final", "read_log", "records_from_log", "save_assignments", "skipped_text", "started_run",
           "write_skipped"]
