"""The report's plots, drawn with matplotlib (Agg, no display) into PNG bytes.

Epochs are numbered from 1 on the x axis, as the terminal and ``log.jsonl`` count them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

WIDTH, HEIGHT, DPI = 3.9, 2.7, 100  # inches, dots per inch: 390 x 270 px panels, three to a row


@dataclass(frozen=True)
class Figure:
    """One plot: a title for the page, a one-sentence reading guide, PNG bytes."""

    title: str
    caption: str
    png: bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    _pyplot().close(figure)
    return buffer.getvalue()


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and values of ``key``, skipping epochs where it is missing or None."""
    points = [(r["epoch"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    if not points:
        return np.zeros(0), np.zeros(0)
    epochs, values = zip(*points)
    return np.asarray(epochs), np.asarray(values)


# A curve whose values differ by less than this share of their size is drawn flat: without
# it, matplotlib stretches rounding noise (0.846774 +- 1e-8) to the full height of the plot.
FLAT_SHARE = 0.02


def _honest_y_axis(axis, values: np.ndarray) -> None:
    """Plain tick labels (no ``1e-8+8.46774e-1`` offset) and a y range of at least
    ``2 * FLAT_SHARE`` of the values' size, so noise does not look like a trend."""
    axis.ticklabel_format(axis="y", style="plain", useOffset=False)
    low, high = float(values.min()), float(values.max())
    least = max(FLAT_SHARE * max(abs(low), abs(high)), 1e-9)
    if high - low < 2 * least:
        middle = (low + high) / 2
        axis.set_ylim(middle - least * 1.5, middle + least * 1.5)


def line_axes(records, lines: list[tuple], ylabel: str, ylim: tuple[float, float] | None = None):
    """A matplotlib figure of the ``(key, label)`` curves of ``records``, or ``None`` when
    none has data. A line may carry a third item, keyword arguments of ``plot`` (a dashed
    style, a colour shared with another line)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(WIDTH, HEIGHT))
    drawn = []
    for key, label, *style in lines:
        x, y = _series(records, key)
        if len(x):
            axis.plot(x, y, **{"marker": "o", "markersize": 3, "linewidth": 1.5, "label": label,
                               **(style[0] if style else {})})
            drawn.append(y)
    if not drawn:
        plt.close(figure)
        return None
    axis.set_ylabel(ylabel)
    _epoch_axis(axis, records)
    if ylim is not None:
        axis.set_ylim(*ylim)
    else:
        _honest_y_axis(axis, np.concatenate(drawn))
    if len(drawn) > 1:
        axis.legend(fontsize=8)
    return figure


def _epoch_axis(axis, records) -> None:
    """Whole epochs from 1 to the last one on the x axis, the same on every plot."""
    from matplotlib.ticker import MaxNLocator

    last = max((r["epoch"] for r in records), default=1)
    axis.set_xlim(0.5, last + 0.5)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    axis.set_xlabel("epoch")
    axis.grid(alpha=0.3)


def _plain_log_ticks(axis) -> None:
    """Log-scale y axis labelled 3, 10, 300 rather than 3x10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_formatter(NullFormatter())


# The online kNN's curves: top-5 dashed in the colour of its top-1.
KNN_LINES = [("knn_top1", "kNN top-1 (%)", {"color": "C0"}),
             ("knn_top5", "kNN top-5 (%)", {"color": "C0", "linestyle": "--", "marker": "s"}),
             ("knn_body_top1", "conv body top-1 (%)", {"color": "C1"}),
             ("knn_body_top5", "conv body top-5 (%)", {"color": "C1", "linestyle": "--", "marker": "s"})]


def epoch_curves(records: list[dict[str, Any]]) -> list[Figure]:
    """Per-epoch curves of a run's log: objective, loss, stability, label scores, balance, time.

    Args:
        records: the parsed lines of ``log.jsonl``.

    Returns:
        The figures that have data (label scores only for labelled data, stability only
        after the second clustering).
    """
    specs = [
        ("Clustering objective", "mean squared distance of the whitened, normalised features to their centroid; "
         "lower is tighter clusters", [("clustering_objective", "objective")], "objective", None),
        ("Training loss", "cross-entropy of the pseudo-label classifier, head re-initialised every epoch",
         [("train_loss", "loss")], "loss", None),
        ("NMI(t-1, t)", "agreement of consecutive clusterings; rises then levels off as the clustering "
         "stabilises (the paper's stays below about 0.8)", [("nmi_prev", "NMI(t-1, t)")], "NMI", (0.0, 1.0)),
        ("Online kNN", "top-1 (solid) and top-5 (dashed) accuracy (%) of the --val images classified by their 20 "
         "most similar training images, on the features each epoch clustered (epoch 1 = the random start), and, "
         "when those are the fc layers' output, on the pooled conv body they come from", KNN_LINES, "accuracy (%)",
         None),
        ("Against the true labels", "NMI of the k pseudo-labels with the classes beside its chance level (the "
         "same cluster sizes shuffled) and ARI; labels are never used for training",
         [("nmi_labels", "NMI"), ("nmi_chance", "NMI by chance"), ("ari_labels", "ARI")], "score", (0.0, 1.0)),
        ("Clustering accuracy", "accuracy (%) of a k-means with k = number of classes on the features each epoch "
         "clustered, its clusters matched one-to-one to the classes, and the purity of the k pseudo-labels",
         [("cluster_acc", "ACC (k = classes, %)"), ("purity", "purity of the pseudo-labels (%)")], "accuracy (%)",
         None),
        ("Largest cluster", "share of the images in the largest cluster; a jump means a degenerate solution",
         [("largest_cluster_share", "largest share")], "share of images", None),
    ]
    figures = []
    for title, caption, lines, ylabel, ylim in specs:
        figure = line_axes(records, lines, ylabel, ylim)
        if figure is not None:
            figures.append(Figure(title, caption, _png(figure)))
    timing = time_figure(records)
    if timing is not None:
        figures.append(timing)
    return figures


def time_figure(records: list[dict[str, Any]]) -> Figure | None:
    """Stacked bars of the seconds each epoch spent per stage."""
    figure = time_axes(records)
    if figure is None:
        return None
    return Figure("Time per epoch", "seconds per stage: the feature pass and clustering are DeepCluster's overhead "
                  "over plain training", _png(figure))


def time_axes(records: list[dict[str, Any]]):
    """The matplotlib figure of ``time_figure`` (``None`` without timings); the legend sits
    above the bars, never on them."""
    stages = [("time_features", "features"), ("time_clustering", "clustering"), ("time_training", "training")]
    if not records or not any(key in records[0] for key, _ in stages):
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(WIDTH, HEIGHT))
    epochs = np.array([r["epoch"] for r in records])
    bottom = np.zeros(len(records))
    for key, label in stages:
        values = np.array([float(r.get(key) or 0.0) for r in records])
        axis.bar(epochs, values, bottom=bottom, label=label, width=0.8)
        bottom += values
    _epoch_axis(axis, records)
    axis.set_ylabel("seconds")
    axis.legend(fontsize=8, ncol=3, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False,
                borderaxespad=0.2)
    return figure


def size_distribution(sizes: np.ndarray, n_clusters: int, which: str) -> Figure:
    """Cluster sizes sorted from largest to smallest (log scale), with the uniform size marked.

    Args:
        sizes: ``(n_nonempty,)`` sizes of the non-empty clusters.
        n_clusters: k (empty clusters count in the uniform reference).
        which: the clustering shown ("epoch 3 (...)", "the final clustering (...)").
    """
    figure = size_axes(sizes, n_clusters)
    ordered = np.asarray(sizes)
    return Figure("Cluster sizes",
                  f"{which}: {len(ordered)} non-empty of {n_clusters} clusters; the dashed line is the size if all "
                  "were equal",
                  _png(figure))


def size_axes(sizes: np.ndarray, n_clusters: int):
    """The matplotlib figure of ``size_distribution``: ranked sizes and their histogram,
    whose axes count whole images and whole clusters."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    figure, (ranked, histogram) = plt.subplots(1, 2, figsize=(2 * WIDTH, HEIGHT))
    ordered = np.sort(np.asarray(sizes))[::-1]
    total = ordered.sum()
    ranked.plot(np.arange(1, len(ordered) + 1), ordered, linewidth=1.5)
    ranked.axhline(total / max(n_clusters, 1), color="grey", linestyle="--", linewidth=1, label="uniform")
    ranked.set_yscale("log")
    _plain_log_ticks(ranked)
    ranked.set_xlabel("cluster rank (largest first)")
    ranked.set_ylabel("images")
    ranked.legend(fontsize=8)
    ranked.grid(alpha=0.3)
    histogram.hist(ordered, bins=min(50, max(5, len(ordered) // 4)), color="tab:orange")
    histogram.set_xlabel("cluster size (images)")
    histogram.set_ylabel("clusters")
    histogram.xaxis.set_major_locator(MaxNLocator(integer=True))
    histogram.yaxis.set_major_locator(MaxNLocator(integer=True))
    histogram.grid(alpha=0.3)
    return figure


__all__ = ["Figure", "epoch_curves", "line_axes", "size_axes", "size_distribution", "time_axes", "time_figure"]
