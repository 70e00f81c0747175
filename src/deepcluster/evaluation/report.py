"""The evaluation report: a table for the terminal and a JSON file for the run folder.

A report holds the results of one or two backbones (the trained checkpoint and its
random-init twin), the settings that produced them, and the training budget read from
the checkpoint and its ``log.jsonl``. Every number shown in the table has one flat key
(``linear/conv3/top1``, ``knn/fc/top1``, ...) so the gain over random init is a plain
difference of two dicts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepcluster.checkpoint import atomic_write_bytes
from deepcluster.config import Config, ConfigError
from deepcluster.messages import plural

REPORT_VERSION = 1


@dataclass(frozen=True)
class MetricRow:
    """One line of the table: a flat key, what it means, its value and unit."""

    key: str
    label: str
    value: float
    percent: bool  # accuracies, precisions and mAP are in %; NMI and ARI in [0, 1]


def metric_rows(results: dict[str, Any]) -> list[MetricRow]:
    """The numbers of one backbone's results, in display order."""
    rows: list[MetricRow] = []
    linear = results.get("linear")
    if linear:
        mode = "fast, no augmentation" if linear["mode"] == "fast" else "reference, augmented"
        epochs = linear["settings"]["epochs"]
        for layer, scores in linear["layers"].items():
            rows.append(MetricRow(f"linear/{layer}/top1", f"linear {layer} top-1, last of {epochs} epochs ({mode})",
                                  scores["top1"], True))
            rows.append(MetricRow(f"linear/{layer}/top5", f"linear {layer} top-5, last epoch", scores["top5"], True))
            rows.append(MetricRow(f"linear/{layer}/best_top1",
                                  f"linear {layer} best top-1 (epoch {scores['best_epoch']}, selected on val)",
                                  scores["best_top1"], True))
    for layer, scores in (results.get("knn") or {}).items():
        rows.append(MetricRow(f"knn/{layer}/top1", f"kNN {layer} top-1 (k={scores['k']}, T={scores['temperature']:g})",
                              scores["top1"], True))
        rows.append(MetricRow(f"knn/{layer}/top5", f"kNN {layer} top-5", scores["top5"], True))
    for layer, scores in (results.get("clustering") or {}).items():
        seeds = len(scores["seeds"])
        # Reports written before the setting existed whitened (-0.5).
        whitened = scores["pca_dim"] and scores.get("whiten_power", -0.5) != 0
        pca = f"PCA {scores['pca_dim']}{' whitened' if whitened else ''}" if scores["pca_dim"] else "PCA off"
        where = f"k={scores['n_clusters']}, {pca}, mean of {seeds} seeds"
        for split in ("train", "val"):
            if scores.get(split) is None:
                continue
            fitted = "fitted" if split == "train" else "nearest centroid"
            rows.append(MetricRow(f"clustering/{layer}/{split}/acc",
                                  f"k-means {layer} ACC {split} ({fitted}; {where})", scores[split]["acc"], True))
            rows.append(MetricRow(f"clustering/{layer}/{split}/nmi", f"k-means {layer} NMI {split}",
                                  scores[split]["nmi"], False))
            rows.append(MetricRow(f"clustering/{layer}/{split}/ari", f"k-means {layer} ARI {split}",
                                  scores[split]["ari"], False))
    for layer, scores in (results.get("pca_widths") or {}).items():
        rows.append(MetricRow(f"pca_widths/{layer}/l2/acc", f"k-means {layer} ACC train, L2 only (PCA widths)",
                              scores["l2"]["train"]["acc"], True))
        for width, pair in scores["widths"].items():
            for kind, words in (("whitened", "whitened"), ("not", "not whitened")):
                rows.append(MetricRow(f"pca_widths/{layer}/{width}/{kind}/acc",
                                      f"k-means {layer} ACC train, PCA {width} {words}", pair[kind]["train"]["acc"],
                                      True))
    for layer, scores in (results.get("retrieval") or {}).items():
        rows.append(MetricRow(f"retrieval/{layer}/map", f"retrieval {layer} mAP (val queries train)",
                              scores["map"], True))
        for k, value in scores["precision_at"].items():
            rows.append(MetricRow(f"retrieval/{layer}/p@{k}", f"retrieval {layer} precision@{k}", value, True))
    return rows


def flat_metrics(results: dict[str, Any] | None) -> dict[str, float]:
    """``{key: value}`` of ``metric_rows``; empty for ``None``."""
    return {} if results is None else {row.key: row.value for row in metric_rows(results)}


def gains(trained: dict[str, Any] | None, random_init: dict[str, Any] | None) -> dict[str, float] | None:
    """Trained minus random init for every key both have; ``None`` without both."""
    if trained is None or random_init is None:
        return None
    a, b = flat_metrics(trained), flat_metrics(random_init)
    return {key: a[key] - b[key] for key in a if key in b}


def _cell(value: float | None, percent: bool, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:+.2f}" if percent and signed else f"{value:.2f}" if percent else \
        f"{value:+.3f}" if signed else f"{value:.3f}"
    return text


def clusters_of(budget: dict[str, Any]) -> str:
    """``k=10000`` for v1, ``v2, prototypes 3000,3000,3000`` for v2 (whose ``n_clusters`` is unused)."""
    if budget.get("prototypes"):
        return f"v2, prototypes {','.join(map(str, budget['prototypes']))}"
    return f"k={budget.get('n_clusters')}"


def baseline_columns(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The baseline columns of a report, ``(title, results)``: one random-init column (``start``
    for a run started from a file), or one per BatchNorm statistics with several."""
    several = report["results"].get("baselines")
    if several:
        return [(f"random BN {mode}", results) for mode, results in several.items()]
    random_init = report["results"].get("random_init")
    if random_init is None:
        return []
    return [("start" if report.get("start") else "random init", random_init)]


def _header(report: dict[str, Any]) -> list[str]:
    lines = [f"DeepCluster evaluation of {report['checkpoint']}"]
    model = report["model"]
    lines.append(f"  backbone {model['arch']}{' + sobel' if model['sobel'] else ''}, {model['image_size']} px; "
                 f"train {report['data']['train']} ({report['data']['n_train']} images), "
                 f"val {report['data']['val']} ({report['data']['n_val']} images), "
                 f"{report['data']['n_classes']} classes")
    budget = report.get("training_budget") or {}
    if budget:
        hours = budget.get("hours")
        lines.append(f"  trained {plural(int(budget.get('epochs_completed') or 0), 'epoch')} "
                     f"({clusters_of(budget)}, "
                     f"batch {budget.get('batch_size')}, lr {budget.get('lr')}, {budget.get('images_per_epoch')} "
                     f"images/epoch" + (f", {hours:.2f} h" if hours is not None else "") + ")")
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned text: a header, then one row per metric with the random-init
    value(s), the trained value and the gain (the columns present in the report)."""
    trained = report["results"].get("trained")
    random_init = report["results"].get("random_init")
    rows_source = trained if trained is not None else random_init
    lines = _header(report)
    if rows_source is None:
        return "\n".join(lines)
    rows = metric_rows(rows_source)
    columns = [(title, flat_metrics(results), False) for title, results in baseline_columns(report)]
    if trained is not None:
        columns.append(("trained", flat_metrics(trained), False))
    gain = gains(trained, random_init) or {}
    if gain:
        columns.append(("gain", gain, True))
    label_width = max(len(row.label) for row in rows) if rows else 10
    widths = [max(13, len(title) + 2) for title, _, _ in columns]
    lines.append("")
    titles = "".join(f"{title:>{w}}" for (title, _, _), w in zip(columns, widths))
    lines.append("  " + "metric".ljust(label_width) + titles)
    for row in rows:
        cells = "".join(f"{_cell(values.get(row.key), row.percent, signed):>{w}}"
                        for (_, values, signed), w in zip(columns, widths))
        lines.append("  " + row.label.ljust(label_width) + cells)
    lines.append("")
    lines.append("  accuracies, precisions and mAP in %; NMI and ARI in [0, 1]")
    if random_init is not None:
        lines.append("  " + baseline_note(report))
    return "\n".join(lines)


def baseline_note(report: dict[str, Any]) -> str:
    """What the random-init column measured: its BatchNorm statistics (or, for a run started
    from a file, ``init``, that file's weights)."""
    if report.get("start"):
        return f"start: the weights the run started from, {report['start']}, with their own BatchNorm statistics"
    several = list(report["results"].get("baselines") or {})
    if several:
        words = {"init": "as initialised", "data": "of the training images"}
        return ("random BN: the run's random weights with BatchNorm statistics "
                + ", ".join(f"{words[mode]} ({mode})" for mode in several)
                + f" (--baseline-batchnorm {','.join(several)}); the gain is over random BN {several[0]}")
    if (report.get("settings") or {}).get("baseline_batchnorm", "init") == "data":
        return ("random init: the run's random weights with BatchNorm statistics of the training images "
                "(--baseline-batchnorm data)")
    return ("random init: the run's random weights with BatchNorm statistics as initialised "
            "(--baseline-batchnorm init)")


def training_budget(checkpoint_path: str | Path, epochs_completed: int, config: Config) -> dict[str, Any]:
    """What produced the checkpoint: settings from its config, time from its ``log.jsonl``."""
    from deepcluster.methods.registry import METHODS

    budget: dict[str, Any] = {
        "epochs_completed": int(epochs_completed), "epochs_planned": config.epochs, "method": config.method,
        **METHODS[config.method].cluster_settings(config), "batch_size": config.batch_size,
        "lr": config.lr, "arch": config.arch, "sobel": config.sobel,
        "image_size": config.crop, "data": config.data, "precision": config.precision, "seed": config.seed,
    }
    from deepcluster.runfolder import records_from_log

    records = records_from_log(Path(checkpoint_path).parent, int(epochs_completed))
    if records:
        stages = ("time_features", "time_clustering", "time_training")
        seconds = sum(float(r.get(stage) or 0.0) for r in records for stage in stages)
        last = records[-1]
        budget.update(hours=seconds / 3600.0, images_per_epoch=last.get("n_images"), epochs_logged=len(records),
                      final_train_loss=last.get("train_loss"), final_nmi_labels=last.get("nmi_labels"),
                      final_nmi_prev=last.get("nmi_prev"))
    return budget


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """Write the report as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(report, indent=2, sort_keys=False) + "\n").encode())


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report written by ``write_report``.

    Raises:
        ConfigError: missing file, not JSON, or not an evaluation report.
    """
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read evaluation report {str(path)!r}: {error.strerror or error}") from None
    except json.JSONDecodeError:
        raise ConfigError(f"{str(path)!r} is not a JSON evaluation report") from None
    if not isinstance(report, dict) or report.get("report_version") != REPORT_VERSION or "results" not in report:
        raise ConfigError(f"{str(path)!r} is not a deepcluster evaluation report (version {REPORT_VERSION})")
    return report


__all__ = ["MetricRow", "REPORT_VERSION", "baseline_columns", "baseline_note", "flat_metrics", "format_table", "gains",
           "load_report",
           "metric_rows", "training_budget", "write_report"]
