"""The ``deepcluster`` command line. It only parses and wires; the library does the work.

    deepcluster train [--recipe NAME] [--config FILE] [--data FOLDER] [--out DIR]
                      [--resume] [--KEY VALUE ...]
    deepcluster train ... --print-config      (the resolved settings; no training)
    deepcluster recipes [NAME]                (the recipes; the settings of one)
    deepcluster eval | report | assign | features | export ...   (``cli_eval``, ``cli_tools``)

Any setting of ``deepcluster.config.Config`` can be given as ``--key value`` (dashes or
underscores).

Exit codes (each failure is one line on stderr, ``deepcluster: error: ...``, no traceback):

- 0: done;
- 2 (``EXIT_USAGE``): bad input: a setting, the data folder, the YAML file or a checkpoint;
- 3 (``EXIT_DIVERGED``): the loss or the features became NaN or infinite; the checkpoint of
  the last good epoch is kept;
- 4 (``EXIT_WRITE``): a file of the run folder cannot be written (full disk, read-only
  folder, no permission); the previous checkpoint is kept;
- 5 (``EXIT_MEMORY``): out of memory (host or GPU) that Python could catch; the checkpoint
  of the last completed epoch is kept. (When the kernel's OOM killer ends the process
  instead, nothing can be printed; ``--resume`` still continues from the last checkpoint.)
- 130: interrupted with Ctrl-C; 143: stopped by ``SIGTERM`` (``kill PID``, a job scheduler);
  both print the same line and keep the checkpoint of the last completed epoch.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import signal
import sys
import textwrap
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

from deepcluster.config import (RECIPE_PROVENANCE, RECIPES, ConfigError, config_text, default_recipe, recipe_line,
                                resolve, run_folder, settings_help)
from deepcluster.messages import one_line, shown_path

EXIT_USAGE = 2
# A process other than the first, failing a check every process fails alike, leaves the saying to
# the first and waits this long (at most) for the launcher to end it: exiting at once could get
# the first process terminated before it speaks.
SILENT_RANK_WAIT_S = 30.0
EXIT_DIVERGED = 3
EXIT_WRITE = 4
EXIT_MEMORY = 5


class UsageError(Exception):
    """Bad command-line input."""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(message)


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
    from deepcluster.config import FIELDS

    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise UsageError(f"unexpected argument {token!r}; settings are given as --key value")
        name, eq, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if key not in FIELDS:
            raise UsageError(unknown_option(name))
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise UsageError(f"setting --{key} needs a value")
            value = tokens[i + 1]
            i += 1
        overrides[key] = value
        i += 1
    return overrides


def build_parser() -> Parser:
    from deepcluster import __version__

    parser = Parser(prog="deepcluster", description="DeepCluster: unsupervised visual features by clustering.")
    parser.add_argument("--version", action="version", version=f"deepcluster {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=Parser)
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
                       help="preset: 'paper' (ImageNet settings, AlexNet-BN, 224 px, k=10000), 'small' "
                            "(32-96 px images, smallnet, k=100), 'digits' (built-in data), 'v2-imagenet' "
                            "(DeepCluster-v2, ResNet-50, 2x224 + 6x96 crops, batch 4096, LARS lr 4.8, 800 epochs), "
                            "'v2-cifar' (DeepCluster-v2, ResNet-18 CIFAR stem, 2x32 crops, batch 256, LARS lr 0.6), "
                            "'v2-small' (v2-cifar on smallnet, 11 epochs: DeepCluster-v2 on 32-96 px images on a "
                            "CPU), 'photo' (your photos: the paper's network, head kept, lr 0.02, k from the "
                            "folder). Default: the --config file's recipe:, else 'digits' without a data folder "
                            "(--data, or data: in the file), else the one that fits the folder's images (a sample "
                            "of their sizes): 'photo' at 64 px and more, 'small' below; k then follows the number "
                            "of images (1 cluster per 40, at least 50 or 1 per 5 images if that is fewer, at most "
                            "10,000) unless --n_clusters or the recipe sets it. --minutes M: a time budget, the "
                            "epochs fitted to it after timing the first")
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
    from deepcluster.cli_eval import add_eval_parser

    add_eval_parser(commands)
    from deepcluster.cli_tools import add_tool_parsers

    add_tool_parsers(commands)
    return parser


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


class Terminated(KeyboardInterrupt):
    """``SIGTERM`` arrived: raised where the program is, so it stops as Ctrl-C stops it
    (atomic writes remove their temporary file, the last checkpoint stays)."""


def _terminate(signum, frame):
    raise Terminated()


@contextmanager
def sigterm_as_interrupt():
    """Inside the block, ``SIGTERM`` raises ``Terminated`` (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def out_of_memory(error: BaseException) -> str | None:
    """The short reason if ``error`` is an allocation failure (host or GPU), else ``None``."""
    import torch

    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return message or "an allocation failed"
    lowered = message.lower()
    if isinstance(error, RuntimeError) and any(words in lowered for words in ("not enough memory", "out of memory", "can't allocate memory",
                                          "cannot allocate memory")):
        match = re.search(r"tried to allocate (\d+) bytes", message)
        if match:
            return f"an allocation of {int(match.group(1)) / 2**30:.1f} GiB failed"
        return one_line(message, 200)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code (see the module docstring)."""
    with sigterm_as_interrupt(), warnings.catch_warnings():
        # torch's advice to use fewer loader workers than cores, once per loader and process:
        # noise around the run's own lines (the workers setting is the user's choice).
        warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes")
        try:
            code = _main(argv)
        except Terminated:
            # SIGTERM before the command's own handling began (while importing or building the
            # parser: torchrun ends the other processes when one fails its settings at once).
            # Nothing was started, so nothing to say and no traceback.
            code = 128 + signal.SIGTERM
    distributed = sys.modules.get("deepcluster.distributed")  # not imported: no process group
    return distributed.leave(code) if distributed else code  # a torchrun trainer ends here


def _main(argv: Sequence[str] | None) -> int:
    from deepcluster.checkpoint import CheckpointError
    from deepcluster.data import DataError
    from deepcluster.health import TrainingDiverged
    from deepcluster.runfolder import RunFolderError
    from deepcluster.progress import erase_bars
    from deepcluster.distributed import PeerFailed, is_distributed, launched_rank

    parser = build_parser()
    command = None
    try:
        args, extra = parser.parse_known_args(argv)
        command = args.command
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "recipes":
            return cmd_recipes(parser.parse_args(argv))
        if args.command == "eval":
            from deepcluster.cli_eval import cmd_eval

            return cmd_eval(parser.parse_args(argv))  # strict parse: unknown options are an error
        from deepcluster.cli_tools import COMMANDS, run_tool

        if args.command in COMMANDS:
            return run_tool(parser.parse_args(argv), sys.argv[1:] if argv is None else argv)
        raise UsageError(f"unknown command {args.command!r}")
    except PeerFailed as error:  # another process's setup failed: the main process says it once
        erase_bars()
        if error.args and error.args[0]:
            print(f"deepcluster: error: {one_line(error.args[0])}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ConfigError, DataError, CheckpointError) as error:
        erase_bars()
        if not is_distributed() and launched_rank() != 0:
            # Every process of the job read the same command line: the first one says it; the
            # launcher ends this one (SIGTERM, a silent Terminated) once the first has exited.
            time.sleep(SILENT_RANK_WAIT_S)
            return EXIT_USAGE
        print(f"deepcluster: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as error:
        erase_bars()
        print(f"deepcluster: error: {one_line(error)}", file=sys.stderr)
        return EXIT_DIVERGED
    except RunFolderError as error:
        erase_bars()
        print(f"deepcluster: error: {one_line(error)}", file=sys.stderr)
        return EXIT_WRITE
    except (MemoryError, RuntimeError) as error:
        reason = out_of_memory(error)
        if reason is None:
            raise
        erase_bars()
        if command == "train":
            advice = ("lower batch_size, feature_batch_size, feature_dim or n_clusters, or use a machine with more "
                      "memory; a checkpoint already written is kept (continue with --resume)")
        else:
            advice = "use fewer images, layers (eval: --probe-layers) or a smaller batch, or a machine with more memory"
        print(f"deepcluster: error: out of memory ({reason}); {advice}", file=sys.stderr)
        return EXIT_MEMORY
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (Terminated)
        erase_bars()
        print(interrupted_line(command), file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(interrupt, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
