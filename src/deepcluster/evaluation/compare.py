"""A checkpoint against the network it started from: what ``deepcluster eval`` runs.

``compare`` evaluates the trained backbone of a checkpoint (``suite.evaluate_backbone``)
and its baseline: the same architecture with the random weights the run started from, with
BatchNorm statistics of the training images and/or as initialised (one column each), or,
for a run started from a weights file, those weights. It writes ``<out>/eval.json`` and
``<out>/eval_table.txt`` (``eval_random_init.json`` for the baseline, which a later
evaluation with the same settings reuses instead of recomputing it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from deepcluster.config import Config, ConfigError
from deepcluster.evaluation import report as reporting
from deepcluster.evaluation import suite
from deepcluster.evaluation.splits import LabelledSplits, open_labelled_splits
from deepcluster.evaluation.suite import (EvalSettings, baseline_backbone, check_settings, random_init_backbone,
                                          remove_dir)

TRAINED_REPORT = "eval.json"
RANDOM_REPORT = "eval_random_init.json"
TABLE_NAME = "eval_table.txt"


@dataclass(frozen=True)
class EvalRequest:
    """What to compare, and where the reports go.

    Attributes:
        checkpoint: the checkpoint file.
        train, val: labelled class folders.
        settings: the protocols and their settings.
        out_dir: report folder; ``None``: ``eval/`` beside the checkpoint.
        random_init: evaluate only the baseline (writes ``eval_random_init.json``).
        baseline: ``auto`` (reuse ``<out>/eval_random_init.json`` when its settings match,
            compute it otherwise), ``none``, or a report file to take the baseline from.
        keep_features: keep the extracted features in ``<out>/features/``.
        device: where the backbones run; ``None``: the checkpoint's setting.
    """

    checkpoint: str
    train: str
    val: str
    settings: EvalSettings = EvalSettings()
    out_dir: str | None = None
    random_init: bool = False
    baseline: str = "auto"
    keep_features: bool = False
    device: str | None = None


def fingerprint(config: Config, splits: LabelledSplits, settings: EvalSettings, train_dir: str,
                val_dir: str) -> dict[str, Any]:
    """What must match for two reports' numbers to be comparable (random init included)."""
    return {
        "train": os.path.abspath(train_dir), "val": os.path.abspath(val_dir),
        "arch": config.arch, "sobel": config.sobel, "feature_dim": config.feature_dim, "resize": config.resize,
        "crop": config.crop, "mean": list(config.mean), "std": list(config.std), "init_seed": config.seed,
        "pca_dim": config.pca_dim, "n_train": len(splits.train), "n_val": len(splits.val),
        "classes": list(splits.class_names), "settings": settings.result_defining(),
        # absent without init: older reports stay comparable
        **({"init": os.path.abspath(config.init)} if config.init else {}),
    }


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two fingerprints."""
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))


def _baseline_part(results: dict[str, Any]) -> dict[str, Any] | None:
    """The baseline entries of a report's results (``random_init``, and ``baselines`` when
    there are several); ``None`` without a baseline."""
    if results.get("random_init") is None:
        return None
    return {key: results[key] for key in ("random_init", "baselines") if results.get(key) is not None}


def reusable_baseline(path: Path, prints: dict[str, Any]) -> dict[str, Any] | None:
    """The baseline results stored in ``path`` when they were made with the same fingerprint;
    ``None`` otherwise (missing, unreadable or different settings)."""
    if not path.is_file():
        return None
    try:
        saved = reporting.load_report(path)
    except ConfigError:
        return None
    if saved.get("fingerprint") != prints:
        return None
    return _baseline_part(saved["results"])


def saved_baseline(path: Path, prints: dict[str, Any]) -> dict[str, Any]:
    """The baseline of the report ``path`` (``--baseline FILE``).

    Raises:
        ConfigError: not a report, made with other settings, or without a baseline.
    """
    saved = reporting.load_report(path)
    differ = differences(saved.get("fingerprint") or {}, prints)
    if differ:
        raise ConfigError(f"baseline {str(path)!r} was made with other settings ({', '.join(differ)}); "
                          "rerun it with the same options or use --baseline auto")
    part = _baseline_part(saved["results"])
    if part is None:
        raise ConfigError(f"baseline {str(path)!r} holds no random-init results")
    return part


def start_backbone(config: Config, splits: LabelledSplits, settings: EvalSettings, device,
                   batchnorm: str | None = None):
    """The baseline column's network: the weights the run started from. Random ones (the
    suite's ``baseline_backbone``, with ``batchnorm`` statistics), or for a run with ``init``
    that file's weights, as they were (their own BatchNorm statistics)."""
    from deepcluster.initial_weights import load_initial_weights

    if not config.init:
        return baseline_backbone(config, splits, settings, device, batchnorm)
    model = random_init_backbone(config)
    load_initial_weights(model, config.init)
    return model.to(device).eval()


class Comparison:
    """One ``compare`` call: the checkpoint, its splits, the report being filled."""

    def __init__(self, request: EvalRequest, log: Callable[[str], None]) -> None:
        from deepcluster.checkpoint import load_backbone, load_checkpoint
        from deepcluster.devices import resolve_device
        from deepcluster.outputs import out_folder

        self.request, self.log, self.settings = request, log, check_settings(request.settings)
        if request.baseline not in ("auto", "none") and request.random_init:
            raise ConfigError("--baseline FILE compares a trained checkpoint; it makes no sense with --random-init")
        self.model, self.config = load_backbone(request.checkpoint)
        if self.config.init and len(self.settings.baseline_modes) > 1:
            raise ConfigError(f"this run started from {self.config.init!r}: its baseline is those weights with their "
                              "own BatchNorm statistics; give --baseline-batchnorm one value")
        epochs = int(load_checkpoint(request.checkpoint).get("epoch", 0))
        s = self.settings
        self.splits = open_labelled_splits(request.train, request.val, s.train_limit, s.val_limit, s.subset_seed)
        self.device = resolve_device(request.device or self.config.device)
        self.out_dir = out_folder(request.out_dir or str(Path(request.checkpoint).parent / "eval"))
        self.prints = fingerprint(self.config, self.splits, s, request.train, request.val)
        self.report = self._skeleton(epochs)

    def _skeleton(self, epochs: int) -> dict[str, Any]:
        config, splits, request = self.config, self.splits, self.request
        budget = None if request.random_init else reporting.training_budget(request.checkpoint, epochs, config)
        return {
            "report_version": reporting.REPORT_VERSION,
            "checkpoint": os.path.abspath(request.checkpoint),
            "data": {"train": os.path.abspath(request.train), "val": os.path.abspath(request.val),
                     "n_train": len(splits.train), "n_val": len(splits.val), "n_classes": splits.n_classes,
                     "class_names": list(splits.class_names)},
            "model": {"arch": config.arch, "sobel": config.sobel, "feature_dim": self.model.feature_dim,
                      "image_size": config.crop,
                      "resize": config.resize},
            "training_budget": budget,
            "settings": self.settings.to_dict(),
            "fingerprint": self.prints,
            "results": {"trained": None, "random_init": None},
            "gain": None,
            **({"start": config.init} if config.init else {}),
        }

    def evaluate(self, which: str, network: torch.nn.Module) -> dict[str, Any]:
        """Every protocol on ``network``; its features in a folder of this process alone (two
        evaluations writing into one report folder never collide)."""
        features = self.out_dir / "features"
        work_dir = features / f"{which}-{os.getpid()}"
        try:
            return suite.evaluate_backbone(network, self.config, self.splits, self.settings, self.device, work_dir,
                                     self.request.keep_features, self.log)
        finally:
            if not self.request.keep_features:
                remove_dir(work_dir)
                if features.is_dir() and not any(features.iterdir()):
                    features.rmdir()

    def baselines(self) -> dict[str, Any]:
        """Evaluate the baseline, once per BatchNorm statistics asked for."""
        modes = self.settings.baseline_modes
        by_mode: dict[str, Any] = {}
        for mode in modes:
            network = start_backbone(self.config, self.splits, self.settings, self.device, mode)
            if self.config.init:
                self.log(f"[baseline: the run's start, {self.config.init}]")
            else:
                self.log("[random init]" if len(modes) == 1 else f"[random init, BatchNorm statistics {mode}]")
            by_mode[mode] = self.evaluate(f"random_init_{mode}" if len(modes) > 1 else "random_init", network)
        return {"random_init": by_mode[modes[0]], **({"baselines": by_mode} if len(modes) > 1 else {})}

    def write(self, path: Path, table_name: str, report: dict[str, Any]) -> None:
        """The JSON report and its table; the table is shown too."""
        reporting.write_report(path, report)
        table = reporting.format_table(report)
        (self.out_dir / table_name).write_text(table + "\n")
        self.log(table)


def compare(request: EvalRequest, log: Callable[[str], None] = print) -> Path:
    """Evaluate a checkpoint and its baseline (or, with ``random_init``, the baseline alone);
    returns the path of the report written.

    Raises:
        ConfigError, DataError, CheckpointError: bad settings, folders or checkpoint, found
            before the long evaluation starts.
    """
    run = Comparison(request, log)
    splits, settings = run.splits, run.settings
    log(f"deepcluster eval: {run.config.arch}, {len(splits.train)} train / {len(splits.val)} val images, "
        f"{splits.n_classes} classes, protocols {', '.join(settings.protocols)}, device {run.device}, "
        f"report in {run.out_dir}")
    random_path = run.out_dir / RANDOM_REPORT
    if request.random_init:
        run.report["results"].update(run.baselines())
        run.write(random_path, TABLE_NAME.replace(".txt", "_random_init.txt"), run.report)
        return random_path
    baseline = None
    if request.baseline not in ("auto", "none"):  # checked before the long evaluation: a bad file fails fast
        baseline = saved_baseline(Path(request.baseline), run.prints)
    log("[trained]")
    run.report["results"]["trained"] = run.evaluate("trained", run.model)
    if request.baseline == "auto":
        # Looked up only now, so a `--random-init` run that finished meanwhile is reused.
        baseline = reusable_baseline(random_path, run.prints)
        if baseline is not None:
            log(f"random-init baseline reused from {random_path}")
        else:
            baseline = run.baselines()
            reporting.write_report(random_path, {**run.report, "training_budget": None,
                                                 "results": {"trained": None, **baseline}})
    if baseline is not None:
        run.report["results"].update(baseline)
    run.report["gain"] = reporting.gains(run.report["results"]["trained"], run.report["results"]["random_init"])
    report_path = run.out_dir / TRAINED_REPORT
    run.write(report_path, TABLE_NAME, run.report)
    return report_path


__all__ = ["Comparison", "EvalRequest", "RANDOM_REPORT", "TABLE_NAME", "TRAINED_REPORT", "compare", "differences",
           "fingerprint", "reusable_baseline", "saved_baseline", "start_backbone"]
