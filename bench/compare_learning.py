"""Several ``bench/learning.py`` results on one plot: kNN top-1 and clustering accuracy
against training minutes, each curve beside its own random-init start.

    python bench/compare_learning.py v1_small_1core v2_smallnet_1core --out bench/results/v1_vs_v2.png

Names are those given to ``bench/learning.py --name`` (read from
``bench/results/learning_NAME.json``). Compare only runs made side by side in one session on
one machine: their minutes are then the same minutes. Runs from other sessions can be put on
this session's clock with ``--epoch-minutes NAME=MINUTES[,LATER]``: every epoch of the run
takes MINUTES, or the first MINUTES and each later one LATER (v2's first epoch also fills its
memory bank), as measured in this session (``bench/epoch_cost.py``). A seeded run's scores
per epoch do not depend on the machine; its minutes do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PANELS = (("knn_top1", "kNN top-1 on val (%)", 1.0), ("cluster_acc", "clustering ACC, k = classes (%)", 100.0),
          ("cluster_nmi", "clustering NMI, k = classes", 1.0))


def curve(result: dict, key: str, scale: float, epoch_minutes: list[float] | None = None
          ) -> tuple[list[float], list[float]]:
    """(minutes, values) of one score: each epoch's record measures the weights it started
    from, the final record the weights after the last epoch. With ``epoch_minutes`` epoch i
    takes ``epoch_minutes[min(i, len - 1)]`` instead of the minutes the run recorded."""
    records = result["records"]
    if epoch_minutes is None:
        minutes = np.cumsum([r["time_budget"] for r in records]) / 60.0
    else:
        minutes = np.cumsum([epoch_minutes[min(i, len(epoch_minutes) - 1)] for i in range(len(records))])
    starts = np.concatenate([[0.0], minutes[:-1]])
    xs = [float(x) for x, r in zip(starts, records) if r.get(key) is not None]
    ys = [scale * r[key] for r in records if r.get(key) is not None]
    final = result.get("final") or {}
    if final.get(key) is not None and len(minutes):
        xs, ys = xs + [float(minutes[-1])], ys + [scale * final[key]]
    return xs, ys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--labels", nargs="*", default=None, help="legend labels (default: the names)")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--epoch-minutes", nargs="*", default=[], metavar="NAME=MINUTES",
                        help="put NAME's epochs on this clock (minutes per epoch measured in this session; "
                             "a second value for the epochs after the first)")
    args = parser.parse_args(argv)
    try:
        clocks = {name: [float(v) for v in value.split(",")]
                  for name, value in (item.split("=", 1) for item in args.epoch_minutes)}
    except ValueError:
        parser.error("--epoch-minutes takes NAME=MINUTES[,LATER], for example v2_smallnet_2core_full=9.6,7.2")
    unknown = sorted(set(clocks) - set(args.names))
    if unknown:
        parser.error(f"--epoch-minutes names runs not compared: {', '.join(unknown)}")
    results = [json.loads((RESULTS / f"learning_{name}.json").read_text()) for name in args.names]
    labels = args.labels or args.names
    if len(labels) != len(results):
        parser.error("give one label per name")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4))
    for ax, (key, title, scale) in zip(axes, PANELS):
        for index, (name, result, label) in enumerate(zip(args.names, results, labels)):
            xs, ys = curve(result, key, scale, clocks.get(name))
            if not ys:
                continue
            color = f"C{index}"
            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
            ax.axhline(ys[0], color=color, linestyle="--", linewidth=0.8, alpha=0.6)
        ax.set_xlabel("training minutes" + (" (this session's clock)" if clocks else ""))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    cpu = results[0].get("cpu", "?")
    fig.suptitle(f"{' vs '.join(labels)} ({cpu}; dashed: each run's random-init start)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    for name, result, label in zip(args.names, results, labels):
        points = {key: curve(result, key, scale, clocks.get(name)) for key, _, scale in PANELS}
        print(label, "minutes", [round(x, 1) for x in points["knn_top1"][0]],
              {key: [round(y, 3) for y in ys] for key, (_, ys) in points.items()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
