"""DeepCluster from Python (a notebook, a script): the command line's functions, as calls.

    import deepcluster as dc

    run = dc.train(data="photos/", recipe="small", epochs=3, out="runs/photos")
    run.records                       # one dict per epoch (log.jsonl)
    run.records_frame()               # the same as a pandas DataFrame (pandas installed)
    run.report()                      # RUN/report/index.html
    placed = run.assign("new_photos/", into="sorted/")   # cluster_0007/... links
    features, paths = run.features("new_photos/")        # (N, D) float32 and the files

    dc.load("runs/photos")            # the same Run for a finished run
    dc.load("backbone.safetensors")   # the backbone of an export (eval mode)

Each method calls the library functions the matching command calls (``train``, ``report``,
``assign --into``, ``features``), so the numbers are the same.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deepcluster.config import ConfigError


def train(data: str | os.PathLike | None = None, recipe: str | None = None, epochs: int | None = None,
          out: str | os.PathLike | None = None, config: str | os.PathLike | None = None, resume: bool = False,
          log: Callable[[str], None] | None = print, **settings: Any) -> Run:
    """Train DeepCluster, as ``deepcluster train`` does, and return the finished run.

    Args:
        data: image folder (any layout); ``None`` = the built-in digits.
        recipe: a recipe name (``deepcluster recipes``); ``None`` = the command line's default.
        epochs: training epochs; ``None`` = the recipe's.
        out: run folder; ``None`` = the command line's default.
        config: a YAML file of settings (applied after the recipe).
        resume: continue the run in ``out`` (its saved settings).
        log: where the run's lines go (``None``: nowhere).
        **settings: any other setting of ``deepcluster train --help``, e.g. ``n_clusters=100``.

    Without ``recipe`` (nor a file's ``recipe:``) a data folder gets the recipe that fits its
    images and k by the folder's size, as on the command line (``deepcluster.autorecipe``).
    ``minutes=M`` (a setting) is a time budget instead of ``epochs``: the first epoch is timed
    and the epochs are fitted to it (``deepcluster.budget``); a resume keeps the fitted count.

    Raises:
        ConfigError, DataError, CheckpointError: bad settings, data or files (one-line messages).
    """
    from deepcluster.train import run as run_training

    overrides = dict(settings)
    for key, value in (("data", data), ("out_dir", out), ("epochs", epochs)):
        if value is not None:
            overrides[key] = str(value) if isinstance(value, os.PathLike) else value
    from deepcluster.autorecipe import choose

    say = log or (lambda _: None)
    recipe, overrides = choose(recipe, config, overrides, resume, lambda line: say(f"deepcluster: {line}"))
    chosen = training_settings(recipe, config, overrides, resume)
    run_training(chosen, resume=resume, log=say)
    return Run(chosen.out_dir)


def training_settings(recipe: str | None, config_file: str | os.PathLike | None, overrides: dict[str, Any],
                      resume: bool = False):
    """The validated ``Config`` of a training run (``deepcluster train`` and :func:`train`): a
    recipe, a YAML file and settings; for ``resume``, the run's saved settings with what may
    change applied."""
    from deepcluster import budget, runfolder
    from deepcluster.config import resolve, resolve_resume, run_folder

    if resume:
        run_dir = run_folder(config_file, overrides)
        config = resolve_resume(runfolder.saved_settings(Path(run_dir)), run_dir, recipe, config_file, overrides)
    else:
        budget.check_given(overrides)
        config = resolve(recipe, config_file, overrides)
    budget.check(config)
    return config


@dataclass
class Assigned:
    """Images placed in a run's clusters (``Run.assign``).

    Attributes:
        paths: every image file, in folder order.
        clusters: ``(N,)`` cluster of each, -1 where unreadable.
        distances: ``(N,)`` distance to its centroid (NaN where unreadable).
        problems: why each unreadable file could not be used ("" for the others).
        tables: the assignment files written (``out``), if any.
        sorted: the folders sorted into (``into``), if any.
    """

    paths: list[str]
    clusters: np.ndarray
    distances: np.ndarray
    problems: list[str]
    tables: list[Path]
    sorted: Any = None

    def frame(self):
        """The assignments as a pandas DataFrame (needs pandas)."""
        return _pandas().DataFrame({"path": self.paths, "cluster": self.clusters, "distance": self.distances,
                                    "problem": self.problems})


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("this needs pandas: pip install pandas") from None
    return pandas


class Run:
    """A run folder written by ``train``: its settings, epoch records, and what a trained run
    does (report, assign, features)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"run folder {str(self.folder)!r} does not exist")

    def __repr__(self) -> str:
        return f"Run({str(self.folder)!r}, {len(self.records)} epochs)"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.pt"

    @property
    def config(self):
        """The run's settings (``RUN/config.yaml``), as a ``Config``."""
        from deepcluster.config import from_dict
        from deepcluster.runfolder import saved_settings

        return from_dict(saved_settings(self.folder))

    @property
    def records(self) -> list[dict]:
        """One dict per completed epoch, as ``log.jsonl`` holds them."""
        from deepcluster.runfolder import LOG_NAME, read_log

        return read_log(self.folder / LOG_NAME)

    def records_frame(self):
        """``records`` as a pandas DataFrame, one row per epoch (needs pandas)."""
        return _pandas().DataFrame(self.records)

    def backbone(self, device: str = "cpu"):
        """The trained backbone, in eval mode."""
        from deepcluster.checkpoint import load_backbone

        return load_backbone(self.checkpoint)[0].to(device)

    def report(self, out: str | os.PathLike | None = None, **settings: Any) -> Path:
        """Write the run's HTML page (``deepcluster report``); returns ``index.html``'s path.
        ``settings``: fields of ``deepcluster.report.ReportSettings`` (e.g. ``ascent_steps=0``)."""
        from deepcluster.report import ReportSettings, build_report

        return Path(build_report(self.folder, out, ReportSettings(**settings), command="deepcluster.api").path)

    def assign(self, folder: str | os.PathLike, into: str | os.PathLike | None = None,
               out: str | os.PathLike | None = None, copy: bool = False, device: str = "cpu",
               batch_size: int | None = None, workers: int | None = 0) -> Assigned:
        """Place every image of ``folder`` in the nearest saved cluster (``deepcluster
        assign``); with ``into``, sort them into ``into/cluster_NNNN/`` (links, or copies with
        ``copy``); with ``out``, write ``assignments.csv`` there."""
        from deepcluster.outputs import class_column, out_folder, problems, write_assignment_tables
        from deepcluster.data import FolderSource
        from deepcluster.inference import assign_images, load_cluster_model
        from deepcluster.sorting import check_into, remember, sort_into_folders

        cluster_model = load_cluster_model(self.checkpoint)
        source = FolderSource(str(folder), every_file=True)
        target = None if into is None else check_into(into)
        assignment = assign_images(cluster_model, source, device, batch_size, workers)
        reasons = problems(source, assignment.ok)
        tables = [] if out is None else write_assignment_tables(out_folder(str(out)), source.paths, assignment,
                                                                 class_column(source), ("csv",), reasons)
        done = None
        if target is not None:
            done = sort_into_folders(target, folder, source.relative_files(), assignment.clusters, copy)
            remember(self.folder, done, folder)
        return Assigned(list(source.paths), assignment.clusters, assignment.distances, reasons, tables, done)

    def features(self, folder: str | os.PathLike, layer: str | None = None, device: str = "cpu",
                 batch_size: int = 256, workers: int = 0) -> tuple[np.ndarray, list[str]]:
        """The features of every image of ``folder`` (``deepcluster features``): an ``(N, D)``
        float32 array (zero rows for unreadable files) and the file paths. ``layer``: default
        what the run clusters (``fc`` or ``body``), or ``fc``, ``body``, ``convN``."""
        from deepcluster.checkpoint import load_backbone
        from deepcluster.data import FolderSource
        from deepcluster.inference import feature_layer, write_features

        model, config = load_backbone(self.checkpoint)
        _, tap = feature_layer(model, layer, False)
        source = FolderSource(str(folder), every_file=True)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "features.npy"
            write_features(model, config, source, path, tap, None, None, batch_size, workers, device)
            rows = np.load(path, allow_pickle=False)
        return rows, list(source.paths)


def load(path: str | os.PathLike):
    """A finished run (its folder, or a checkpoint in it) as a :class:`Run`, or an exported
    backbone (``deepcluster export``) as the ready network (eval mode, CPU)."""
    path = Path(path)
    if path.is_dir():
        return Run(path)
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; give a run folder, its checkpoint.pt or an exported "
                          ".safetensors backbone")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[8:9] == b"{":  # safetensors
        from deepcluster.models.export import load_backbone_safetensors

        return load_backbone_safetensors(path)
    return Run(path.parent)


__all__ = ["Assigned", "Run", "load", "train", "training_settings"]
