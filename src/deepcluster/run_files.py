"""The run folder's names, and the files a run, ``report`` and ``--resume`` read back: the
image list, the saved settings, the log and the skipped list.

A run fixes its images when it starts: ``images.json`` lists them (relative to the data
folder, in the order the assignments use) and a resumed run, ``report`` and the final
clustering read that list instead of scanning the folder again. Files added to the folder
later are not used; files that went missing are skipped when they fail to load. The row of
an image in every assignments file therefore always means the same image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from deepcluster.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint
from deepcluster.config import Config, load_yaml
from deepcluster.data import FolderSource, ImageSource, load_digits_source, walk_relative
from deepcluster.data.sources import DataError
from deepcluster.messages import shown_path
from deepcluster.run_lock import LOCK_NAME, write_failure

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
SKIPPED_NAME = "skipped.tsv"
SKIPPED_HEADER = "path\treason\n"  # the first line of skipped.tsv
CONFIG_NAME = "config.yaml"
ASSIGNMENTS_DIR = "assignments"
IMAGES_NAME = "images.json"
FINAL_ASSIGNMENTS = "final.npy"  # in ASSIGNMENTS_DIR
FINAL_SUMMARY = "final.json"


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



__all__ = ["ASSIGNMENTS_DIR", "CHECKPOINT_NAME", "CONFIG_NAME", "FINAL_ASSIGNMENTS", "FINAL_SUMMARY", "IMAGES_NAME",
           "LOG_NAME", "SKIPPED_HEADER", "SKIPPED_NAME", "folder_changes", "json_record", "log_text", "open_source",
           "read_images", "read_log", "records_from_log", "saved_settings", "skipped_text", "started_run",
           "write_images"]
