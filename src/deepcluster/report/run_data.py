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
from deepcluster.runfolder import open_source, read_log

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
        """``(N,)`` int64 pseudo-labels of ``epoch`` (counted from 1)."""
        return np.load(self.assignment_files[epoch], allow_pickle=False).astype(np.int64)


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
    final = None
    if (run_dir / "final.json").is_file():
        try:
            final = json.loads((run_dir / "final.json").read_text())
        except (json.JSONDecodeError, OSError):
            final = None
    source: ImageSource | None
    try:
        source = open_source(config, run_dir, data)
    except DataError as error:
        source = None
        notes.append(f"images not shown: {error} (pass --data FOLDER if they moved)")
    if source is not None and source.unlabelled:
        notes.append(f"no class labels, so no purity or scores against them: {source.unlabelled}")
    if source is not None and files:
        n_assigned = len(np.load(final_file if final_file.is_file() else files[max(files)], mmap_mode="r",
                                 allow_pickle=False))
        if n_assigned != len(source):
            notes.append(f"images not shown: the folder now holds {len(source)} readable images but the run "
                         f"assigned {n_assigned}; pass --data with the folder the run was trained on")
            source = None
    return RunData(run_dir, config, records, files, source, notes, final_file if final_file.is_file() else None, final)


__all__ = ["RunData", "load_run"]
