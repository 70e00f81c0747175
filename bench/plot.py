"""Figures of result files: ``bench/run.py``'s, and the files the older scripts wrote (read
into the same schema on the way; ``--convert`` writes that schema out once).

    python bench/plot.py bench/results/learning_small_cifar10_body.json            # -> ....png beside it
    python bench/plot.py v1_small_1core v2_smallnet_1core --out bench/results/v1_vs_v2.png \\
        [--labels v1 v2] [--epoch-minutes v2_smallnet_1core=9.6,7.2]
    python bench/plot.py bench/results/cost_c10.json --out cost.png
    python bench/plot.py bench/results/sweep_mnist10.json --convert bench/results/learning_mnist10.json

A bare name stands for ``bench/results/learning_NAME.json``. Learning results: kNN top-1,
clustering ACC (and, for several files, NMI) at k = classes against training minutes (epochs
when the file has no times), each run beside its random-init start; the first file's
baselines. Compare runs measured on one machine one after the other: their minutes are then
the same minutes. ``--epoch-minutes LABEL=MINUTES[,LATER]`` puts a run on another clock:
every epoch takes MINUTES, or the first MINUTES and each later one LATER (v2's first epoch
also fills its memory bank), as ``run.py cost`` measured them; a seeded run's scores per epoch
do not depend on the machine, its minutes do. Cost results: mean seconds per stage per side;
memory results: peak memory per stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import result as schema  # noqa: E402
from lib.plots import plot_bars, plot_learning  # noqa: E402


def find(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (schema.RESULTS / f"learning_{name}.json", schema.RESULTS / f"{name}.json"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"plot.py: no result file {name!r} (nor bench/results/learning_{name}.json)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="result files, or names of bench/results/learning_NAME.json")
    parser.add_argument("--out", default=None, help="PNG path (default: the first file's, .png)")
    parser.add_argument("--labels", nargs="*", default=None, help="legend labels, one per run")
    parser.add_argument("--epoch-minutes", nargs="*", default=[], metavar="LABEL=MINUTES[,LATER]")
    parser.add_argument("--convert", default=None, metavar="JSON", help="write the one file given in this schema")
    args = parser.parse_args(argv)
    paths = [find(name) for name in args.results]
    results = [schema.load(path) for path in paths]
    if args.convert:
        if len(results) != 1:
            parser.error("--convert takes one file")
        print(f"wrote {schema.write(results[0], Path(args.convert))}")
        return 0
    try:
        clocks = {label: [float(v) for v in value.split(",")]
                  for label, value in (item.split("=", 1) for item in args.epoch_minutes)}
    except ValueError:
        parser.error("--epoch-minutes takes LABEL=MINUTES[,LATER], for example v2_smallnet_2core_full=9.6,7.2")
    out = Path(args.out) if args.out else paths[0].with_suffix(".png")
    kinds = {result["kind"] for result in results}
    if kinds == {"learning"}:
        runs = sum(len(result["runs"]) for result in results)
        if args.labels and len(args.labels) != runs:
            parser.error(f"give one label per run ({runs})")
        labels = args.labels or [run["label"] for result in results for run in result["runs"]]
        unknown = sorted(set(clocks) - set(labels))
        if unknown:
            parser.error(f"--epoch-minutes names runs not plotted: {', '.join(unknown)}")
        for entry in plot_learning(results, out, labels, clocks):
            points = entry["points"]
            print(entry["label"], "x", [round(x, 1) for x in points["knn_top1"][0] or points["cluster_acc"][0]],
                  {key: [round(y, 3) for y in ys] for key, (_, ys) in points.items()})
    elif len(results) == 1 and kinds <= {"cost", "memory"}:
        plot_bars(results[0], out)
    else:
        parser.error(f"nothing to draw for {', '.join(sorted(kinds))} results together; "
                     "give learning results, or one cost or memory result")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
