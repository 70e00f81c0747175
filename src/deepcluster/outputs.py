"""What ``assign`` and ``features`` write about a folder of images, and the folders they write
into: the assignment tables, the class and problem columns, the lines that sum them up.
(The command line and ``deepcluster.api`` both call these.)"""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from deepcluster.config import ConfigError
from deepcluster.messages import plural, shown_path


def out_folder(path: str) -> Path:
    """The ``--out`` folder of a command, created; a one-line ``ConfigError`` when it is a
    file or cannot be created."""
    from deepcluster.runfolder import check_out_folder

    folder = Path(path)
    check_out_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create output folder {path!r}: {error.strerror or error}") from None
    return folder


@contextmanager
def writing_to(path: Path | str) -> Iterator[None]:
    """Context for writes: an ``OSError`` becomes a one-line ``ConfigError`` naming the file."""
    try:
        yield
    except OSError as error:
        raise ConfigError(f"cannot write {str(path)!r}: {error.strerror or error}") from None


def class_column(source) -> list[str] | None:
    """The class of every image of a folder with class sub-folders; ``None`` without."""
    if source.labels is None or not source.class_names:
        return None
    return [shown_path(source.class_names[label]) for label in source.labels]


def problems(source, ok) -> list[str]:
    """Why each image that did not decode (``ok`` False) cannot be used; ``""`` for the others."""
    return ["" if good else shown_path(source.problem(index)) for index, good in enumerate(ok)]


def _write_csv(path: Path, paths: list[str], assignment, classes: list[str] | None, reasons: list[str]) -> None:
    with writing_to(path), open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "cluster", "distance"] + (["class"] if classes else []) + ["problem"])
        for row, name in enumerate(paths):
            distance = assignment.distances[row]
            cells = [shown_path(name), int(assignment.clusters[row]), "" if np.isnan(distance) else f"{distance:.6f}"]
            writer.writerow(cells + ([classes[row]] if classes else []) + [reasons[row]])


def _write_parquet(path: Path, paths: list[str], assignment, classes: list[str] | None, reasons: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"path": pa.array([shown_path(name) for name in paths], pa.string()),
               "cluster": pa.array(assignment.clusters.astype(np.int32)),
               "distance": pa.array(assignment.distances, pa.float32(), mask=np.isnan(assignment.distances))}
    if classes:
        columns["class"] = pa.array(classes, pa.string())
    columns["problem"] = pa.array([reason or None for reason in reasons], pa.string())
    with writing_to(path):
        pq.write_table(pa.table(columns), path)


def write_assignment_tables(out_dir: Path, paths: list[str], assignment, classes: list[str] | None,
                            formats: Sequence[str], reasons: list[str] | None = None) -> list[Path]:
    """``assignments.csv`` / ``assignments.parquet``: one row per image, in folder order.

    Columns: ``path``, ``cluster`` (-1: unreadable), ``distance`` (empty / null when
    unreadable), ``class`` when the folder has class sub-folders, and ``problem``: why an
    unreadable image could not be used (empty / null otherwise).
    """
    reasons = reasons if reasons is not None else [""] * len(paths)
    written = []
    for name, write in (("csv", _write_csv), ("parquet", _write_parquet)):
        if name in formats:
            path = Path(out_dir) / f"assignments.{name}"
            write(path, paths, assignment, classes, reasons)
            written.append(path)
    return written


def clustering_used(cluster_model) -> str:
    """Which saved clustering ``assign`` places images in, for its first line."""
    if cluster_model.final:
        return f"the final clustering (after epoch {cluster_model.epoch})"
    return (f"the clustering epoch {cluster_model.epoch} trained on (no final clustering saved: centroids older "
            "than the weights by one epoch of training)")


def placement_line(assignment, n_files: int) -> str:
    """``"36 images placed in 4 clusters (median distance 0.812)"``, and the unreadable ones."""
    placed = int(assignment.ok.sum())
    used = int(np.unique(assignment.clusters[assignment.ok]).size)
    median = float(np.nanmedian(assignment.distances)) if placed else float("nan")
    line = f"{plural(placed, 'image')} placed in {plural(used, 'cluster')} (median distance {median:.3f})"
    if placed < n_files:
        line += f", {n_files - placed} unreadable (cluster -1, the reason in the problem column)"
    return line


def training_agreement(cluster_model, data: str, assignment) -> str | None:
    """When ``data`` is the run's own training folder: how many images get the cluster the run
    gave them (its final clustering, or the last epoch's pseudo-labels); ``None`` otherwise."""
    trained_on, previous = cluster_model.config.data, cluster_model.assignments
    if (trained_on is None or os.path.realpath(trained_on) != os.path.realpath(data) or previous is None
            or len(previous) != len(assignment.clusters)):
        return None
    both = assignment.ok & (previous >= 0)
    agree = float((assignment.clusters[both] == previous[both]).mean()) if both.any() else float("nan")
    if cluster_model.final:
        return f"these are the run's training images: {100 * agree:.2f}% get the cluster of assignments/final.npy"
    return (f"these are the run's training images: {100 * agree:.1f}% keep the last epoch's pseudo-label (the "
            "weights trained one more epoch after that clustering, so features moved)")


__all__ = ["class_column", "clustering_used", "out_folder", "placement_line", "problems", "training_agreement",
           "write_assignment_tables", "writing_to"]
