"""One setting at a time: a recipe and variants of it, each trained the same number of epochs
on one labelled train / val pair, in one table.

    python bench/sweep.py --recipe small --train mnist5k/train --val mnist5k/val --epochs 10 \
        --name mnist --variant control: --variant k300: n_clusters=300 --variant crop50: crop_scale_min=0.5

Each variant is a ``bench/learning.py`` run (``learning_NAME_VARIANT.json``, per-epoch kNN,
k = classes clustering accuracy and NMI), in its own process, one after another; the first
variant also measures the baselines (random weights with the data's BatchNorm statistics,
raw pixels). A variant is ``LABEL: key=value ...`` (no settings: the recipe itself). The
table (``bench/results/sweep_NAME.md`` and ``.json``) gives, per variant: the kNN top-1 at
the start, its lowest point during training, after the last epoch, the clustering accuracy
and NMI at k = classes after the last epoch (the eval-mode final clustering), and the
minutes of wall time; the plot (``sweep_NAME.png``) the kNN and accuracy per epoch.

Variants of one seeded recipe start from the same random weights when they do not change
the network, so their first points agree; a difference at the end smaller than the
validation set's standard error (about 0.8 points of kNN on 1,000 images near 90%,
1.5 near 50%) is noise. Rerunning the command skips the variants whose result is complete.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from learning import save_figure

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"k300: n_clusters=300 pca_dim=64"`` -> ``("k300", ["n_clusters=300", "pca_dim=64"])``."""
    label, _, settings = text.partition(":")
    label = label.strip()
    if not label or not label.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"variant {text!r}: give it a label of letters, digits, - and _ before the colon")
    items = settings.split()
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ValueError(f"variant {label}: settings are key=value, not {bad[0]!r}")
    return label, items


def standard_error(percent: float, n: int) -> float:
    """Binomial standard error, in points, of an accuracy measured on n images."""
    p = percent / 100.0
    return 100.0 * math.sqrt(max(p * (1.0 - p), 1e-12) / max(n, 1))


def summarise(label: str, settings: list[str], result: dict) -> dict:
    records, final = result["records"], result.get("final") or {}
    # An epoch's record scores the weights it started from (epoch 1: the random start); with
    # reassign_every > 1 only the epochs that cluster are scored.
    measured = [r for r in records if r.get("knn_top1") is not None]
    knn = [r["knn_top1"] for r in measured]
    acc = [100.0 * r["cluster_acc"] if r.get("cluster_acc") is not None else None for r in measured]
    row = {"variant": label, "settings": " ".join(settings) or "(the recipe)", "epochs": len(records),
           "measured_after": [r["epoch"] - 1 for r in measured], "knn_per_epoch": knn, "acc_per_epoch": acc,
           "knn_start": knn[0] if knn else None, "knn_lowest": min(knn[1:]) if len(knn) > 1 else None,
           "knn_final": final.get("knn_top1"), "acc_final": 100.0 * final["cluster_acc"] if "cluster_acc" in final else None,
           "nmi_final": final.get("cluster_nmi"), "nmi_pseudo_labels": final.get("nmi_labels"),
           "wall_minutes": result.get("wall_minutes")}
    return row


def table(rows: list[dict], n_val: int | None) -> str:
    def cell(value, digits=1):
        return "" if value is None else f"{value:.{digits}f}"

    lines = ["| variant | settings | kNN start | kNN lowest | kNN final | ACC final (k = classes) | NMI final | minutes |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['variant']} | `{row['settings']}` | {cell(row['knn_start'])} | {cell(row['knn_lowest'])} | "
                     f"{cell(row['knn_final'])} | {cell(row['acc_final'])} | {cell(row['nmi_final'], 3)} | "
                     f"{cell(row['wall_minutes'])} |")
    if n_val and rows and rows[0]["knn_final"] is not None:
        lines.append("")
        lines.append(f"One standard error of a kNN top-1 near {rows[0]['knn_final']:.0f}% on {n_val} validation "
                     f"images: {standard_error(rows[0]['knn_final'], n_val):.1f} points.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for index, row in enumerate(rows):
        for ax, key, final in ((axes[0], "knn_per_epoch", "knn_final"), (axes[1], "acc_per_epoch", "acc_final")):
            xs = list(row["measured_after"]) + ([row["epochs"]] if row[final] is not None else [])
            ys = list(row[key]) + ([row[final]] if row[final] is not None else [])
            ax.plot(xs, ys, marker="o", markersize=2.5, color=f"C{index % 10}",
                    linestyle="-" if index < 10 else "--", label=row["variant"])
    for ax, name in ((axes[0], "kNN top-1 on val (%)"), (axes[1], "clustering ACC, k = classes (%)")):
        ax.set_xlabel("epochs trained")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    save_figure(fig, title, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--epochs", type=int, required=True, help="epochs of every variant")
    parser.add_argument("--name", required=True)
    parser.add_argument("--variant", action="append", required=True, metavar="LABEL: key=value ...")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings of every variant")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(text) for text in args.variant]
    except ValueError as error:
        parser.error(str(error))
    labels = [label for label, _ in variants]
    if len(set(labels)) != len(labels):
        parser.error("give every variant its own label")

    RESULTS.mkdir(exist_ok=True)
    rows, cpu, n_val = [], None, None
    for index, (label, settings) in enumerate(variants):
        run_name = f"{args.name}_{label}"
        path = RESULTS / f"learning_{run_name}.json"
        done = path.is_file() and json.loads(path.read_text()).get("final") is not None
        if not done:
            command = [sys.executable, str(HERE / "learning.py"), "--recipe", args.recipe, "--train", args.train,
                       "--val", args.val, "--minutes", "100000", "--name", run_name,
                       "--set", f"epochs={args.epochs}", *args.set, *settings]
            if index == 0:
                command += ["--bn-baseline", "--raw-baseline"]
            print(f"[{time.strftime('%H:%M:%S')}] {label}: {' '.join(settings) or '(the recipe)'}", flush=True)
            log = RESULTS.parent / f"sweep_{run_name}.log"  # *.log is not committed
            with open(log, "w") as handle:
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
            if code != 0:
                print(f"{label}: learning.py exited {code}; see {log}", flush=True)
                continue
        result = json.loads(path.read_text())
        cpu = cpu or result.get("cpu")
        n_val = n_val or (result.get("random_bn") or {}).get("n_val")
        rows.append(summarise(label, settings, result))
        print(f"  {label}: kNN {rows[-1]['knn_per_epoch']} -> {rows[-1]['knn_final']}, "
              f"ACC final {rows[-1]['acc_final']}", flush=True)

    first = json.loads((RESULTS / f"learning_{args.name}_{labels[0]}.json").read_text()) if rows else {}
    summary = {"name": args.name, "recipe": args.recipe, "train": args.train, "val": args.val, "epochs": args.epochs,
               "common_settings": args.set, "cpu": cpu, "command": " ".join(["python", "bench/sweep.py"] + sys.argv[1:]),
               "random_bn": first.get("random_bn"), "raw_pixels": first.get("raw_pixels"), "rows": rows}
    (RESULTS / f"sweep_{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    header = (f"# {args.name}: `{args.recipe}` and variants, {args.epochs} epochs each\n\n"
              f"{args.train} -> {args.val}; {cpu}\n\n"
              f"Baselines: random weights with the data's BatchNorm statistics kNN "
              f"{(first.get('random_bn') or {}).get('of_data')}; raw pixels kNN "
              f"{(first.get('raw_pixels') or {}).get('knn_top1')}, ACC "
              f"{100 * (first.get('raw_pixels') or {}).get('cluster_acc', float('nan')):.1f}\n\n")
    (RESULTS / f"sweep_{args.name}.md").write_text(header + table(rows, n_val))
    if rows:
        plot(rows, f"{args.name}: {args.recipe}, {args.epochs} epochs ({cpu})", RESULTS / f"sweep_{args.name}.png")
    print(table(rows, n_val))
    return 0


if __name__ == "__main__":
    sys.exit(main())
