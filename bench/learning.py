"""Does a recipe learn? Train it on a labelled train / val pair under a wall-clock budget and
record the online kNN and the label scores of every epoch.

    python bench/learning.py --recipe small --train cifar10/train --val cifar10/test \
        --minutes 120 --name small_cifar10 [--set key=value ...]

Every epoch's record (kNN top-1 of the validation images, clustering accuracy at k = number
of classes, NMI beside its chance level, times) goes to ``bench/results/learning_NAME.json``
as it comes, and a PNG of the curves beside it. The first epoch's scores are those of the
random weights the run starts from (its baseline); after the budget the run stops between
epochs and the trained weights are measured once more (the final clustering). The budget
counts training time only: the seconds spent measuring (``time_monitor`` and the validation
pass) are left out, so how often one measures does not change how far a run gets.
A run cut short (killed, or ended with a session) goes on with the same command and
``--resume``: training continues bit for bit after its last committed epoch, whose records
come back from the run folder's ``log.jsonl`` and count against the budget.

The raw-pixel baseline (``--raw-baseline``): the same kNN and k = number of classes k-means
on the centre view's pixels, with no network. The BatchNorm baseline (``--bn-baseline``): the
kNN of the run's random weights with BatchNorm statistics of the training images instead of
as initialised (``random_baseline.py``): what training gives even if it learns nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deepcluster.config import coerce, resolve
from deepcluster.settings.retired import convert
from deepcluster.train import run
from machine import cpu_flags, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def raw_pixel_baseline(config, train_dir: str, val_dir: str) -> dict:
    """kNN and k = classes k-means on the centre view's raw pixels (no network)."""
    from deepcluster.data import CenterView, FolderSource
    from deepcluster.evaluation.knn import knn_classify
    from deepcluster.monitor import class_kmeans_accuracy

    def pixels(source):
        view = CenterView(config.resize, config.crop)
        return np.stack([view(source.load(i)).float().flatten().numpy() for i in range(len(source))])

    train, val = FolderSource(train_dir), FolderSource(val_dir)
    train_x, val_x = pixels(train), pixels(val)
    knn = knn_classify(train_x, train.labels, val_x, val.labels, len(train.class_names))
    points = train_x - train_x.mean(axis=0)
    points /= np.linalg.norm(points, axis=1, keepdims=True) + 1e-12
    acc, class_nmi = class_kmeans_accuracy(points.astype(np.float32), train.labels, seed=0)
    return {"knn_top1": knn.top1, "knn_top5": knn.top5, "cluster_acc": acc, "cluster_nmi": class_nmi}


def series(records: list[dict], final: dict, start: np.ndarray, minutes: np.ndarray, key: str,
           scale: float) -> tuple[list[float], list[float]]:
    """A key's points over training minutes: each epoch at its start, the final clustering at the end."""
    xs = [x for x, r in zip(start, records) if key in r]
    ys = [scale * r[key] for r in records if key in r]
    if key in final:
        xs, ys = xs + [minutes[-1]], ys + [scale * final[key]]
    return xs, ys


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    minutes = np.cumsum([r["time_budget"] for r in records]) / 60.0
    start = np.concatenate([[0.0], minutes[:-1]])  # an epoch's scores are of the weights it started from
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    final = result.get("final") or {}
    for ax, key, name, scale in ((axes[0], "knn_top1", "kNN top-1 on val (%)", 1.0),
                                 (axes[1], "cluster_acc", "clustering ACC, k = classes (%)", 100.0)):
        xs, ys = series(records, final, start, minutes, key, scale)
        ax.plot(xs, ys, marker="o", markersize=3, label=result["name"])
        if ys:
            ax.axhline(ys[0], color="grey", linestyle="--", linewidth=1, label="random init")
        if key == "knn_top1" and result.get("random_bn"):
            ax.axhline(result["random_bn"]["of_data"], color="tab:green", linestyle="-.", linewidth=1,
                       label="random weights, data BatchNorm statistics")
        body_xs, body_ys = series(records, final, start, minutes, "knn_body_top1", scale)
        if key == "knn_top1" and body_ys:  # the fc layers clustered: the conv body they read, too
            line, = ax.plot(body_xs, body_ys, marker="s", markersize=3, label=f"{result['name']}, conv body")
            ax.axhline(body_ys[0], color=line.get_color(), linestyle="--", linewidth=0.8, label="conv body, random init")
            if (result.get("random_bn") or {}).get("body_of_data") is not None:
                ax.axhline(result["random_bn"]["body_of_data"], color=line.get_color(), linestyle="-.", linewidth=0.8,
                           label="conv body, random weights, data BatchNorm statistics")
        raw = result.get("raw_pixels") or {}
        if key in raw:
            ax.axhline(scale * raw[key], color="tab:red", linestyle=":", linewidth=1, label="raw pixels")
        ax.set_xlabel("training minutes")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: never over a curve
    save_figure(fig, f"{result['name']}: {result['cpu']}", path)


def save_figure(fig, title: str, path: Path) -> None:
    """Title, lay out, write as PNG and close a figure of curves."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--train", required=True, help="labelled training folder (FOLDER/<class>/<image>)")
    parser.add_argument("--val", required=True, help="labelled validation folder")
    parser.add_argument("--minutes", type=float, required=True, help="training budget (measuring excluded)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", default=None, help="run folder (default /tmp/deepcluster-learning/NAME)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings over the recipe")
    parser.add_argument("--raw-baseline", action="store_true")
    parser.add_argument("--bn-baseline", action="store_true",
                        help="also measure the random weights with the data's BatchNorm statistics")
    parser.add_argument("--resume", action="store_true",
                        help="continue this run (killed, or stopped by the end of a session) after its last "
                             "committed epoch; that epoch's records come back from the run folder's log.jsonl "
                             "and count against the budget")
    args = parser.parse_args(argv)

    overrides = convert(dict(item.split("=", 1) for item in args.set))  # retired settings converted
    overrides = {key: coerce(key, value) for key, value in overrides.items()}
    out = args.out or f"/tmp/deepcluster-learning/{args.name}"
    overrides.update(data=args.train, val=args.val, out_dir=out, tensorboard=False)
    overrides.setdefault("epochs", 10000)
    config = resolve(args.recipe, overrides=overrides)
    RESULTS.mkdir(exist_ok=True)
    json_path, png_path = RESULTS / f"learning_{args.name}.json", RESULTS / f"learning_{args.name}.png"
    result = {"name": args.name, "recipe": args.recipe, "settings": overrides, "config": config.to_dict(),
              "command": " ".join(["python", "bench/learning.py"] + sys.argv[1:]), "cpu": cpu_model(),
              "cpu_flags": cpu_flags(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "budget_minutes": args.minutes, "records": [], "final": None}
    earlier = json.loads(json_path.read_text()) if args.resume and json_path.is_file() else {}
    for key in ("random_bn", "raw_pixels"):  # measured when the run began
        if key in earlier:
            result[key] = earlier[key]
    if args.bn_baseline and "random_bn" not in result:
        from random_baseline import bn_baselines
        result["random_bn"] = bn_baselines(config, args.train, args.val)
        print("random weights, BatchNorm statistics at init / of the data:", result["random_bn"], flush=True)
    if args.raw_baseline and "raw_pixels" not in result:
        result["raw_pixels"] = raw_pixel_baseline(config, args.train, args.val)
        print("raw pixels:", result["raw_pixels"], flush=True)

    def save() -> None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        if result["records"]:
            plot(result, png_path)

    spent = 0.0

    def stop(record: dict) -> bool:
        nonlocal spent
        # Measuring is not training: the monitor's seconds are left out of the budget.
        record["time_budget"] = (record["time_features"] + record["time_clustering"] + record["time_training"])
        spent += record["time_budget"]
        record["minutes"] = spent / 60.0
        result["records"].append(record)
        save()
        return spent >= 60.0 * args.minutes

    log_path = Path(out) / "log.jsonl"
    result["resumed"] = bool(args.resume)
    if args.resume and log_path.is_file():  # the committed epochs, whatever the JSON had caught
        for line in log_path.read_text().splitlines():
            if line.strip():
                stop(json.loads(line))
    start = time.perf_counter()
    if not (args.resume and spent >= 60.0 * args.minutes):
        run(config, resume=args.resume, log=lambda line: print(line, flush=True), stop=stop)
    done = len(result["records"])
    final_config = resolve(args.recipe, overrides={**overrides, "epochs": done})
    run(final_config, resume=True, log=lambda line: print(line, flush=True))
    final_path = Path(out) / "final.json"
    if final_path.is_file():
        result["final"] = json.loads(final_path.read_text())
    result["wall_minutes"] = (time.perf_counter() - start) / 60.0
    save()
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
