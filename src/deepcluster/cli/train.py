"""``deepcluster train`` and ``deepcluster recipes``: they only parse and wire; the library
does the work.

    deepcluster train [--recipe NAME] [--config FILE] [--data FOLDER] [--out DIR]
                      [--resume] [--KEY VALUE ...]
    deepcluster train ... --print-config      (the resolved settings; no training)
    deepcluster recipes [NAME]                (the recipes; the settings of one)

Any setting of ``deepcluster.config.Config`` can be given as ``--key value`` (dashes or
underscores). Exit codes: see ``deepcluster.cli``.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import textwrap
from pathlib import Path
from typing import Any, Sequence

from deepcluster.cli.common import UsageError
from deepcluster.config import (RECIPE_PROVENANCE, RECIPES, config_text, default_recipe, recipe_line, resolve,
                                run_folder, settings_help)
from deepcluster.messages import shown_path

TRAIN_OPTIONS = ("recipe", "config", "data", "out", "resume", "print-config")  # the options of `train` besides the settings


def unknown_option(name: str) -> str:
    """The message for ``--name``, which is neither a setting nor an option of ``train``,
    with the closest one when there is one."""
    from deepcluster.config import FIELDS

    known = [key for key in FIELDS if key != "out_dir"] + list(TRAIN_OPTIONS)
    close = difflib.get_close_matches(name.replace("-", "_"), known, n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return f"unknown setting --{name}{hint}; deepcluster train --help lists them all"


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``["--n-clusters", "100", "--sobel=false"]`` -> ``{"n_clusters": "100", "sobel": "false"}``.

    Raises:
        UsageError: a stray token, an unknown setting (with the closest name) or a missing value.
    """
    from deepcluster.config import FIELDS, RETIRED

    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise UsageError(f"unexpected argument {token!r}; settings are given as --key value")
        name, eq, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if key not in FIELDS and key not in RETIRED:  # a retired one is converted or refused in one line
            raise UsageError(unknown_option(name))
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise UsageError(f"setting --{key} needs a value")
            value = tokens[i + 1]
            i += 1
        overrides[key] = value
        i += 1
    return overrides


def add_train_parsers(commands: Any) -> None:
    """Register ``train`` and ``recipes`` on the ``deepcluster`` subparsers."""
    width = max(60, min(shutil.get_terminal_size().columns, 120) - 2)
    train = commands.add_parser(
        "train", help="train DeepCluster on a folder of images or the built-in digits",
        description=textwrap.fill("Train DeepCluster. Every setting below can be given as --key value (or key: "
                                  "value in a --config file); the command line wins.", width),
        epilog=textwrap.fill("settings by section, with the paper recipe's defaults (deepcluster recipes NAME shows "
                             "what a recipe changes); a run refuses the settings of the other method's section:",
                             width) + "\n\n" + settings_help(width - 2),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                       help="preset: 'paper' (ImageNet settings, AlexNet-BN, 224 px, k=10000), 'small' (32-96 px "
                            "images, smallnet, k=100), 'digits' (built-in data), 'v2-imagenet' (DeepCluster-v2, "
                            "ResNet-50, 2x224 + 6x96 crops, batch 4096, LARS lr 4.8, 800 epochs), 'v2-cifar' "
                            "(DeepCluster-v2, ResNet-18 CIFAR stem, 2x32 crops, batch 256, LARS lr 0.6), 'v2-small' "
                            "(v2-cifar on smallnet, 11 epochs: DeepCluster-v2 on 32-96 px images on a CPU), 'photo' "
                            "(your photos: the paper's network, lr 0.02, k from the folder, the head and clusters "
                            "carried over epochs only from 9,000 images). Default: the --config file's recipe:, else "
                            "'digits' without a data folder (--data, or data: in the file), else the one that fits "
                            "the folder's images (a sample of their sizes): 'photo' at 64 px and more, 'small' "
                            "below; k then follows the number of images (1 cluster per 40, at least 50 or 1 per 5 "
                            "images if that is fewer, at most 10,000) unless --n_clusters or the recipe sets it. "
                            "--minutes M: a time budget, the epochs fitted to it after the first and shortened after "
                            "any epoch that runs slower")
    train.add_argument("--config", help="YAML file of settings (applied after the recipe)")
    train.add_argument("--data", help="image folder, any layout; its top-level sub-folders are the classes (used "
                                      "only for scores); default: the built-in scikit-learn digits")
    train.add_argument("--out", dest="out_dir", help="run folder (log, assignments, checkpoint)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out with its saved settings (RUN/config.yaml); settings given "
                            "as well may only change epochs, workers, threads, device and the like")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved settings (as RUN/config.yaml would hold them) and stop: no training, "
                            "no run folder")
    recipes = commands.add_parser("recipes", help="list the recipes, or print the settings one resolves to",
                                  description="Without NAME: one line per recipe. With NAME: every setting that "
                                              "recipe resolves to, the ones it sets marked.")
    recipes.add_argument("name", nargs="?", metavar="NAME", help="a recipe: " + ", ".join(RECIPES))


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from deepcluster import runfolder
    from deepcluster.api import training_settings
    from deepcluster.train import run

    overrides = parse_overrides(extra)
    for key in ("data", "out_dir"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    global _train_folder
    _train_folder = Path(run_folder(args.config, overrides))
    if args.resume and runfolder.saved_settings(_train_folder) is None:
        # stopped while starting, before it saved its settings: start it now
        print(f"deepcluster: {str(_train_folder)!r} holds no saved settings yet (the run stopped while starting); "
              "starting it from the beginning", flush=True)
        args.resume = False
    from deepcluster.autorecipe import for_command_line  # no --recipe: the one that fits the folder, and its k

    args.recipe, overrides = for_command_line(args.recipe, args.config, overrides, args.resume, args.print_config)
    # with --resume, the run's own settings, changed only where the command line says so
    config = training_settings(args.recipe, args.config, overrides, args.resume)
    if args.print_config:
        print(config_text(config, args.recipe or default_recipe(config.data)))
        return 0
    run(config, resume=args.resume, log=lambda line: print(shown_path(line), flush=True))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """``deepcluster recipes [NAME]``."""
    if args.name is None:
        for name in RECIPES:
            print(recipe_line(name))
        return 0
    if args.name not in RECIPES:
        raise UsageError(f"unknown recipe {args.name!r}; choose one of: {', '.join(RECIPES)}")
    config = resolve(args.name, overrides={} if args.name == "digits" else {"data": "FOLDER"})
    print(f"# {recipe_line(args.name)}")
    print(f"# from: {RECIPE_PROVENANCE[args.name]}")
    print(config_text(config, args.name))
    return 0


_train_folder: Path | None = None  # the run folder of this `train` command, once known


def interrupted_line(command: str | None) -> str:
    """What an interrupted command prints: for ``train``, whether a checkpoint is kept."""
    if command != "train":
        return "deepcluster: interrupted"
    if _train_folder is not None and (_train_folder / "checkpoint.pt").is_file():
        return "deepcluster: interrupted; the last completed epoch's checkpoint is kept (use --resume)"
    return "deepcluster: interrupted before the first epoch was completed, so there is no checkpoint yet (--resume " \
           "starts the run over)"


__all__ = ["TRAIN_OPTIONS", "add_train_parsers", "cmd_recipes", "cmd_train", "interrupted_line", "parse_overrides",
           "unknown_option"]
