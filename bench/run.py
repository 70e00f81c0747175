"""The benchmark runner: one command, one result schema (``bench/README.md``).

    python bench/run.py learning --recipe small --train cifar10/train --val cifar10/test \\
        --minutes 120 --name small_cifar10 [--set key=value ...] [--bn-baseline] [--raw-baseline]
    python bench/run.py learning --recipe small --train mnist5k/train --val mnist5k/val --epochs 10 \\
        --name mnist --variant control: --variant k300: n_clusters=300
    python bench/run.py learning --epochs 1 --name digits_toy          # the built-in digits
    python bench/run.py cost --data cifar10/train --images 10000 --epochs 2 --name c10 small v2-small
    python bench/run.py cost --data cifar10/train --images 3000 --epochs 1 --name bf16 \\
        v2-small v2-small:precision=bf16                                 # RECIPE:key=value,...
    python bench/run.py cost --data cifar10/train --processes 1 2 --name c10_processes small
    python bench/run.py cost --data cifar10/train --against 114fbff --repeats 2 --limits --name c10_vs small
    python bench/run.py cost --reference /path/to/facebookresearch/deepcluster \\
        --data imagenette/train --k 100 --epochs 2 --threads 2 --workers 2 --name imagenette
    python bench/run.py memory --recipe paper --train imagenette/train --epochs 1 --name paper
    python bench/run.py memory --page-faults --name reuse
    python bench/run.py drift [--tiny] [--epochs 2] --name digits
    python bench/run.py folders omniglot images_background_small1.zip images_background_small2.zip \\
        --out omniglot32 --size 32 --val-per-class 5
    python bench/run.py folders split Sign-Language-Digits-Dataset/Dataset --out signs --size 100 \\
        --val-per-class 40

What each measures:

- ``learning``: per epoch the online kNN top-1 of the validation images (``--val``), the
  clustering ACC and NMI at k = number of classes, and the times, under a budget in training
  minutes (``--minutes``: the seconds spent measuring are left out) or epochs (``--epochs``);
  then the trained weights clustered once more (``final``). The folder's rules of ``deepcluster
  train`` apply (``autorecipe.choose``: k, carried clusters, v2's smallest folder). Baselines: ``--raw-baseline``
  (kNN and k-means on the raw pixels), ``--bn-baseline`` (the random start with the data's
  BatchNorm statistics). ``--variant LABEL: key=value ...`` (repeatable): each variant a run
  of its own, in its own process, one table; ``--against COMMIT`` the same runs with the
  package of another commit (a temporary git worktree) or checkout; ``--processes N``
  trains under torchrun (budget in epochs). ``--resume`` continues a run cut short.
- ``cost``: seconds per stage of an epoch and peak memory of every process, for each side
  (recipe entries, ``--processes 1 2``, ``--against``, ``--also KEY=VALUE``) in fresh
  processes, ``--repeats`` rounds in turn; with ``--against``/``--also`` whether the
  pseudo-labels and losses agree; ``--limits`` what the CPU can do beside; ``--reference``
  the authors' code instead (``lib/reference.py`` lists its patches).
- ``memory``: peak memory per stage of a run in this process; ``--page-faults``: what
  ``keep_freed_memory`` saves in page faults (exit 1 when not as expected).
- ``drift``: one process against two torchrun processes and against two threads.
- ``folders``: labelled train/val folders made from public image sets (``lib/folders.py``
  says which and how), for ``learning``.

Results go to ``bench/results/KIND_NAME.json`` (learning also writes a PNG; ``bench/plot.py``
draws any result). The machine (CPU model and flags, torch, threads) is in every file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def common(parser: argparse.ArgumentParser, recipe: bool = True) -> None:
    parser.add_argument("--name", required=True, help="the result is bench/results/KIND_NAME.json")
    if recipe:
        parser.add_argument("--recipe", default=None, help="default small, digits on the built-in digits")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings over the recipe")
    parser.add_argument("--results", default=None, help="folder of the result files (default bench/results)")


def learning_parser(sub) -> None:
    p = sub.add_parser("learning", help="scores per epoch under a budget, with baselines")
    common(p)
    p.add_argument("--train", default=None, help="labelled training folder (FOLDER/<class>/<image>; "
                                                 "default the built-in digits)")
    p.add_argument("--val", default=None, help="labelled validation folder (the online kNN)")
    p.add_argument("--minutes", type=float, default=None, help="training budget (measuring excluded)")
    p.add_argument("--epochs", type=int, default=None, help="epochs budget (with --minutes: whichever ends first)")
    p.add_argument("--out", default=None, help="run folder (default TMPDIR/deepcluster-learning/NAME)")
    p.add_argument("--raw-baseline", action="store_true")
    p.add_argument("--bn-baseline", action="store_true",
                   help="also measure the random weights with the data's BatchNorm statistics (needs --val)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL: key=value ...")
    p.add_argument("--against", default=None, metavar="COMMIT|CHECKOUT")
    p.add_argument("--processes", type=int, default=1, help="torchrun processes (gloo)")
    p.add_argument("--resume", action="store_true", help="continue this run after its last committed epoch")
    p.add_argument("--no-plot", action="store_true", help=argparse.SUPPRESS)


def cost_parser(sub) -> None:
    p = sub.add_parser("cost", help="seconds per stage and peak memory, side by side")
    common(p, recipe=False)
    p.add_argument("recipes", nargs="*", default=["small"],
                   help="RECIPE, or RECIPE:key=value,... for settings of that entry only (default small)")
    p.add_argument("--data", default=None, help="image folder (default the built-in digits)")
    p.add_argument("--images", type=int, default=None, help="this many images of --data, class by class")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--processes", type=int, nargs="+", default=[1], help="torchrun processes per side")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="cores shared out: each of P processes gets cores // P torch threads")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--against", default=None, metavar="COMMIT|CHECKOUT")
    p.add_argument("--also", action="append", default=[], metavar="KEY=VALUE",
                   help="one more side: this tree with one setting changed")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all sides in turn")
    p.add_argument("--limits", action="store_true", help="also GEMM/convolution rates and the data pipeline")
    ref = p.add_argument_group("against the authors' code (--reference)")
    ref.add_argument("--reference", default=None, help="checkout of facebookresearch/deepcluster")
    ref.add_argument("--k", type=int, default=100)
    ref.add_argument("--arch", default="alexnet", choices=["alexnet", "vgg16"])
    ref.add_argument("--no-sobel", dest="sobel", action="store_false")
    ref.add_argument("--batch", type=int, default=256)
    ref.add_argument("--cpus", default=None, help="pin both runs to these cores (taskset -c)")
    ref.add_argument("--first", default="reference", choices=["reference", "ours"])


def memory_parser(sub) -> None:
    p = sub.add_parser("memory", help="peak memory per stage; --page-faults")
    common(p)
    p.add_argument("--train", default=None, help="image folder (default the built-in digits)")
    p.add_argument("--val", default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--page-faults", action="store_true", help="keep_freed_memory's page faults instead")


def drift_parser(sub) -> None:
    p = sub.add_parser("drift", help="one process against two torchrun processes")
    common(p, recipe=False)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="the tiny run of tests/test_torchrun.py (dropout off)")


def folders_parser(sub) -> None:
    p = sub.add_parser("folders", help="labelled train/val folders from public image sets")
    p.add_argument("set", choices=["omniglot", "split"], help="omniglot: its zip files; split: a folder of classes")
    p.add_argument("sources", nargs="+", help="the zip files (omniglot) or the folder of classes (split)")
    p.add_argument("--out", required=True, help="a new folder: OUT/train and OUT/val")
    p.add_argument("--size", type=int, default=64, help="pixels of the square images written")
    p.add_argument("--val-per-class", type=int, default=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    for add in (learning_parser, cost_parser, memory_parser, drift_parser, folders_parser):
        add(sub)
    args = parser.parse_args(argv)
    if args.kind == "folders":
        from lib.folders import folders
        return folders(args)
    if args.results:
        from lib import result as schema
        schema.RESULTS = Path(args.results).resolve()
    if "=" in args.name or "/" in args.name:
        parser.error("--name is a plain name (letters, digits, - and _)")
    if getattr(args, "recipe", "") is None:
        args.recipe = "digits" if args.train is None else "small"
    if args.kind == "learning":
        if args.minutes is None and args.epochs is None and not any(s.startswith("epochs=") for s in args.set):
            parser.error("learning needs a budget: --minutes or --epochs")
        from lib.learning import learning
        return learning(args)
    if args.kind == "cost":
        if args.reference and (args.also or args.against):
            parser.error("--reference compares this package with the authors' code; --also and --against compare "
                         "sides of this package: run them without --reference")
        from lib.cost import cost
        return cost(args)
    if args.kind == "memory":
        from lib.memory import memory
        return memory(args)
    from lib.drift import drift
    return drift(args)


if __name__ == "__main__":
    sys.exit(main())
