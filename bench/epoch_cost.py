"""What an epoch of each recipe costs on this machine, measured one after the other in one run.

    python bench/epoch_cost.py --data cifar10/train --images 10000 --epochs 2 --name cifar10_10k \
        small v2-small [--set threads=2 ...]
    python bench/epoch_cost.py --data cifar10/train --images 3000 --epochs 1 --name bf16 \
        v2-small v2-small:precision=bf16        # RECIPE:key=value,key=value: settings of that entry only

Each recipe trains ``--epochs`` epochs on ``--images`` images of the folder (taken class by
class; a temporary run folder, no validation set) and its per-epoch seconds are read back from the
run's records: feature pass (v1's, or v2's pass that fills the memory bank before its first
epoch), clustering and training, the same sum ``bench/learning.py`` counts against its
budget. Seconds per training image follow, so the cost of an epoch on the whole folder can
be put beside a learning curve measured in another session: a seeded run's scores per
epoch do not depend on the machine, its minutes do (``bench/compare_learning.py
--epoch-minutes``). Written to ``bench/results/epoch_cost_NAME.json`` with the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepcluster.config import coerce, resolve
from deepcluster.train import run
from machine import cpu_flags, cpu_model
from vs_reference import folder_to_use

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("time_features", "time_clustering", "time_training")


def parse_entry(entry: str) -> tuple[str, dict]:
    """``RECIPE`` or ``RECIPE:key=value,key=value`` -> (recipe, its own settings)."""
    recipe, _, pairs = entry.partition(":")
    items = (item.split("=", 1) for item in pairs.split(",") if item)
    return recipe, {key: coerce(key, value) for key, value in items}


def measure(entry: str, data: Path, images: int, epochs: int, settings: dict, out: str) -> dict:
    """One recipe's per-epoch stage seconds on the image folder ``data`` (``images`` files)."""
    recipe, own = parse_entry(entry)
    settings = {**settings, **own}
    overrides = {**settings, "data": str(data), "out_dir": out, "epochs": epochs, "tensorboard": False,
                 "val": None, "final_clustering": False}
    config = resolve(recipe, overrides=overrides)
    start = time.perf_counter()
    records = run(config, log=lambda line: print(f"  [{recipe}] {line}", flush=True))
    wall = time.perf_counter() - start
    epochs_out = [{stage: float(r.get(stage, 0.0)) for stage in STAGES} for r in records]
    for epoch in epochs_out:
        epoch["budget"] = sum(epoch[stage] for stage in STAGES)
    return {"recipe": entry, "arch": config.arch, "method": config.method, "settings": settings,
            "images": images, "epochs": epochs_out, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help="RECIPE, or RECIPE:key=value,... for settings of that entry only")
    parser.add_argument("--data", required=True, help="image folder")
    parser.add_argument("--images", type=int, default=None,
                        help="use this many images of --data, class by class (default all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings over every recipe")
    args = parser.parse_args(argv)
    settings = {key: coerce(key, value) for key, value in (item.split("=", 1) for item in args.set)}

    result = {"name": args.name, "command": " ".join(["python", "bench/epoch_cost.py"] + sys.argv[1:]),
              "cpu": cpu_model(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "data": args.data, "runs": []}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"epoch_cost_{args.name}.json"
    print(f"{result['cpu']} ({result['cpu_flags']}), torch {result['torch']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="epoch_cost_") as scratch:
        data, n_images = folder_to_use(args.data, args.images, Path(scratch))
        for index, recipe in enumerate(args.recipes):
            out = str(Path(scratch) / f"run{index}")
            result["runs"].append(measure(recipe, data, n_images, args.epochs, settings, out))
            path.write_text(json.dumps(result, indent=1) + "\n")

    width = max(12, *(len(entry["recipe"]) for entry in result["runs"]))
    print(f"\n{'recipe':<{width}} {'epoch':>5} {'features':>9} {'clustering':>10} {'training':>9} {'total':>8} "
          f"{'ms/image':>9}")
    for entry in result["runs"]:
        for index, epoch in enumerate(entry["epochs"], start=1):
            print(f"{entry['recipe']:<{width}} {index:>5} {epoch['time_features']:>8.1f}s {epoch['time_clustering']:>9.1f}s "
                  f"{epoch['time_training']:>8.1f}s {epoch['budget']:>7.1f}s "
                  f"{1000 * epoch['budget'] / entry['images']:>9.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
