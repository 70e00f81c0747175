"""Figures of result files (``bench/plot.py``): learning curves of any number of runs, a cost
result's stage seconds, a memory result's peaks per stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PANELS = (("knn_top1", "kNN top-1 on val (%)", 1.0), ("cluster_acc", "clustering ACC, k = classes (%)", 1.0),
          ("cluster_nmi", "clustering NMI, k = classes", 1.0))


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def clock(run: dict, epoch_minutes: list[float] | None) -> np.ndarray | None:
    """Minutes at the end of each epoch: as recorded, or on a given clock (minutes of the first
    epoch, then of each later one); None when the records carry no times (plot by epochs)."""
    records = run["records"]
    if epoch_minutes:
        return np.cumsum([epoch_minutes[min(i, len(epoch_minutes) - 1)] for i in range(len(records))])
    if records and all("time_budget" in r or "time_training" in r for r in records):
        from lib.result import budget_seconds
        return np.cumsum([r.get("time_budget", budget_seconds(r)) for r in records]) / 60.0
    return None


def curve(run: dict, key: str, scale: float, epoch_minutes: list[float] | None = None
          ) -> tuple[list[float], list[float]]:
    """(x, values) of one score: an epoch's record scores the weights it started from, the
    final record the weights after the last epoch; x in minutes, or epochs without times."""
    records = run["records"]
    minutes = clock(run, epoch_minutes)
    if minutes is None:
        ends = np.array([r.get("epoch", i + 1) for i, r in enumerate(records)], dtype=float)
        ends = np.append(ends[:-1], run.get("epochs", ends[-1] if len(ends) else 0)) if len(ends) else ends
        starts = np.array([r.get("epoch", i + 1) - 1 for i, r in enumerate(records)], dtype=float)
    else:
        ends, starts = minutes, np.concatenate([[0.0], minutes[:-1]])
    xs = [float(x) for x, r in zip(starts, records) if r.get(key) is not None]
    ys = [scale * r[key] for r in records if r.get(key) is not None]
    final = run.get("final") or {}
    if final.get(key) is not None and len(ends):
        xs, ys = xs + [float(ends[-1])], ys + [scale * final[key]]
    return xs, ys


def baselines(ax, result: dict, key: str, scale: float) -> None:
    found = result.get("baselines") or {}
    bn, raw = found.get("random_bn") or {}, found.get("raw_pixels") or {}
    if key == "knn_top1" and bn.get("of_data") is not None:
        ax.axhline(bn["of_data"], color="tab:green", linestyle="-.", linewidth=1,
                   label="random weights, data BatchNorm statistics")
    if key == "knn_top1" and bn.get("body_of_data") is not None:
        ax.axhline(bn["body_of_data"], color="tab:olive", linestyle="-.", linewidth=0.8,
                   label="conv body, random weights, data BatchNorm statistics")
    if raw.get(key) is not None:
        ax.axhline(scale * raw[key], color="tab:red", linestyle=":", linewidth=1, label="raw pixels")


def plot_learning(results: list[dict], path: Path, labels: list[str] | None = None,
                  clocks: dict[str, list[float]] | None = None, nmi: bool | None = None) -> list[dict]:
    """Every run of ``results`` on one figure (kNN, ACC and, for several results, NMI), each
    beside its random-init start (dashed); the first result's baselines. Returns the points."""
    plt = pyplot()
    runs = [(result, run) for result in results for run in result["runs"]]
    labels = labels or [run["label"] for _, run in runs]
    clocks = clocks or {}
    panels = PANELS if (nmi if nmi is not None else len(results) > 1) else PANELS[:2]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6))
    points = []
    by_minutes = False
    for index, ((result, run), label) in enumerate(zip(runs, labels)):
        own = clocks.get(label) or clocks.get(run["label"])
        by_minutes |= clock(run, own) is not None
        entry = {"label": label, "points": {}}
        for ax, (key, _, scale) in zip(axes, panels):
            xs, ys = curve(run, key, scale, own)
            entry["points"][key] = (xs, ys)
            if not ys:
                continue
            color = f"C{index % 10}"
            ax.plot(xs, ys, marker="o", markersize=3, color=color, linestyle="-" if index < 10 else "--", label=label)
            ax.axhline(ys[0], color=color, linestyle="--", linewidth=0.8, alpha=0.6)
            if key == "knn_top1":
                bx, by = curve(run, "knn_body_top1", 1.0, own)
                if by:
                    ax.plot(bx, by, marker="s", markersize=3, color=color, alpha=0.6, label=f"{label}, conv body")
        points.append(entry)
    for ax, (key, title, scale) in zip(axes, panels):
        baselines(ax, results[0], key, scale)
        ax.set_xlabel(("training minutes" + (" (given clock)" if clocks else "")) if by_minutes else "epochs trained")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # below the axes: never over a curve
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    cpu = (results[0].get("machine") or {}).get("cpu") or "?"
    save_figure(fig, f"{' vs '.join(r['name'] for r in results)} ({cpu}; dashed: each run's random-init start)", path)
    return points


def plot_bars(result: dict, path: Path) -> None:
    """A cost result's mean seconds per stage, or a memory result's peak GiB per stage, per run."""
    plt = pyplot()
    key = "stages" if result["kind"] == "cost" else "memory"
    rows = [(run["label"], run.get("mean") or {}) if key == "stages" else
            (run["label"], {k: v.get("peak_rss_gib") or 0.0 for k, v in (run["memory"].get("stages") or {}).items()})
            for run in result["runs"]]
    names = list(dict.fromkeys(name for _, values in rows for name in values if name != "epoch"))  # in order
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) * max(1, len(names)) / 2), 4.5))
    width = 0.8 / max(1, len(rows))
    for index, (label, values) in enumerate(rows):
        ax.bar(np.arange(len(names)) + index * width, [values.get(n, 0.0) for n in names], width, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20)
    ax.set_ylabel("seconds per epoch (mean)" if key == "stages" else "peak RSS of the main process (GiB)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, f"{result['name']} ({(result.get('machine') or {}).get('cpu')})", path)


def save_figure(fig, title: str, path: Path) -> None:
    """Title, lay out, write as PNG and close a figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
