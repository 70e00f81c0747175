"""Read a run folder for the report: config, per-epoch log, assignments, images and labels."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepcluster.config import Config, ConfigError, from_dict, load_yaml
from deepcluster.data import DataError, ImageSource
from deepcluster.messages import one_line
from deepcluster.runfolder import open_source, read_images, read_log

ASSIGNMENT_FILE = re.compile(r"^epoch_(\d{4,})\.npy$")


@dataclass
class RunData:
    """Everything the report shows that comes from the run folder.

    Attributes:
        run_dir: the folder.
        config: the run's resolved configuration.
        records: parsed ``log.jsonl`` lines, in order.
        assignment_files: epoch (counted from 1) -> path of its ``assignments/epoch_NNNN.npy``.
        source: the run's images, or ``None`` when they cannot be opened now.
        notes: why parts of the page are missing (data moved, sizes differ, ...).
        final_file: ``assignments/final.npy``, the final clustering of the trained network, if any.
        final: its numbers (``final.json``), if any.
    """

    run_dir: Path
    config: Config
    records: list[dict[str, Any]]
    assignment_files: dict[int, Path]
    source: ImageSource | None
    notes: list[str] = field(default_factory=list)
    final_file: Path | None = None
    final: dict[str, Any] | None = None
    n_images: int | None = None  # rows every assignments file must have, when known


    @property
    def labels(self) -> np.ndarray | None:
        return None if self.source is None else self.source.labels

    @property
    def class_names(self) -> list[str] | None:
        return None if self.source is None else self.source.class_names

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def assignments(self, epoch: int) -> np.ndarray:
        """``(N,)`` int64 pseudo-labels of ``epoch`` (counted from 1).

        Raises:
            DataError: the file is damaged (see ``read_assignments``).
        """
        return read_assignments(self.assignment_files[epoch], self.n_images)

    def final_assignments(self) -> np.ndarray:
        """``(N,)`` int64 final clustering (``assignments/final.npy``)."""
        return read_assignments(self.final_file, self.n_images)


def read_assignments(path: Path, n_images: int | None = None) -> np.ndarray:
    """An assignments file as ``(N,)`` int64, checked: a 1-d integer array (no pickle) of
    cluster ids >= -1, with ``n_images`` rows when given.

    Raises:
        DataError: one line naming the file and what is wrong with it.
    """
    def damaged(why: str) -> DataError:
        return DataError(f"assignments file {str(path)!r} is damaged ({why}); restore it from a copy of the run "
                         "folder")

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise damaged(f"not a readable .npy file: {one_line(first, 120)}") from None
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype.kind not in "iu":
        raise damaged(f"holds a {getattr(array, 'dtype', type(array).__name__)} array of shape "
                      f"{getattr(array, 'shape', '?')}, not one integer per image")
    if n_images is not None and len(array) != n_images:
        raise damaged(f"{len(array)} rows for the run's {n_images} images")
    if len(array) and int(array.min()) < -1:
        raise damaged(f"cluster id {int(array.min())} is below -1")
    return array.astype(np.int64)


def read_final_summary(path: Path) -> dict[str, Any] | None:
    """``final.json``'s numbers, ``None`` when there is none.

    Raises:
        DataError: the file is there but not a JSON object.
    """
    if not path.is_file():
        return None
    try:
        final = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise DataError(f"{str(path)!r} is damaged ({one_line(str(error).splitlines()[0], 120)}); delete it and run "
                        "`deepcluster train --out RUN --resume` to make it again") from None
    if not isinstance(final, dict):
        raise DataError(f"{str(path)!r} is damaged (not a JSON object); delete it and run "
                        "`deepcluster train --out RUN --resume` to make it again")
    return final


def load_run(run_dir: str | Path, data: str | None = None) -> RunData:
    """Read ``run_dir``; missing images or a changed folder only add a note.

    Args:
        run_dir: a folder written by ``deepcluster train``.
        data: the image folder, when it moved since training (default: the run's).

    Raises:
        DataError: not a run folder (no ``config.yaml`` and no ``log.jsonl``).
        ConfigError: a ``config.yaml`` that is not a valid configuration.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder {str(run_dir)!r} does not exist")
    config_path, log_path = run_dir / "config.yaml", run_dir / "log.jsonl"
    if not config_path.is_file() or not log_path.is_file():
        raise DataError(f"{str(run_dir)!r} is not a deepcluster run folder (it needs config.yaml and log.jsonl, "
                        "written by `deepcluster train --out`)")
    try:
        config = from_dict(load_yaml(config_path))
    except ConfigError as error:
        raise ConfigError(f"{str(config_path)!r}: {error}") from None
    records = read_log(log_path, strict=True)
    files: dict[int, Path] = {}
    folder = run_dir / "assignments"
    if folder.is_dir():
        for path in folder.iterdir():
            match = ASSIGNMENT_FILE.match(path.name)
            if match:
                files[int(match.group(1))] = path
    if records and records[0]["epoch"] == 0:  # written when epochs counted from 0: shown from 1
        records = [{**record, "epoch": record["epoch"] + 1} for record in records]
        files = {epoch + 1: path for epoch, path in files.items()}
    notes: list[str] = []
    final_file = folder / "final.npy"
    final = read_final_summary(run_dir / "final.json")
    stored = read_images(run_dir)
    source: ImageSource | None
    try:
        source = open_source(config, run_dir, data)
    except DataError as error:
        source = None
        notes.append(f"images not shown: {error} (pass --data FOLDER if they moved)")
    n_images = len(stored) if stored is not None else (len(source) if config.data is None and source else None)
    if source is not None and source.unlabelled:
        notes.append(f"no class labels, so no purity or scores against them: {source.unlabelled}")
    if source is not None and files:
        n_assigned = len(read_assignments(final_file if final_file.is_file() else files[max(files)], n_images))
        if n_assigned != len(source):
            notes.append(f"images not shown: the folder now holds {len(source)} readable images but the run "
                         f"assigned {n_assigned}; pass --data with the folder the run was trained on")
            source = None
    return RunData(run_dir, config, records, files, source, notes, final_file if final_file.is_file() else None, final,
                   n_images)


__all__ = ["RunData", "load_run", "read_assignments", "read_final_summary"]
