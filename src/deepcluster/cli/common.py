"""What every command shares: the parser class, the exit codes, ``RUN`` and the options of
the commands that read a trained run (device, batch size, workers, threads)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from deepcluster.config import ConfigError
from deepcluster.outputs import out_folder, writing_to

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_WRITE = 4
EXIT_MEMORY = 5

RUN_HELP = "a run folder (deepcluster train --out) or a checkpoint file in one"


class UsageError(Exception):
    """Bad command-line input."""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(message)


def csv_items(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def int_list(text: str) -> tuple[int, ...]:
    """``"1,10,100"`` -> ``(1, 10, 100)``; an ``argparse`` type (a bad item is a usage error)."""
    try:
        return tuple(int(item) for item in csv_items(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_run_argument(parser: argparse.ArgumentParser) -> None:
    """The run a command reads: ``RUN`` first on the line, the same in every command
    (``--checkpoint`` is the older spelling, kept working)."""
    parser.add_argument("run", nargs="?", metavar="RUN", help=RUN_HELP)
    parser.add_argument("--checkpoint", dest="checkpoint_option", help=argparse.SUPPRESS)


def resolve_run(args: argparse.Namespace) -> None:
    """Set ``args.run_dir`` and ``args.checkpoint`` from ``RUN`` (a folder or a checkpoint file).

    Raises:
        ConfigError: no run given, given twice, or a path that does not exist.
    """
    given = [value for value in (args.run, args.checkpoint_option) if value is not None]
    if len(given) != 1:
        what = "is missing" if not given else "is given twice (RUN and --checkpoint)"
        raise ConfigError(f"the run {what}: deepcluster {args.command} RUN ..., where RUN is {RUN_HELP}")
    path = Path(given[0])
    if path.is_dir():
        args.run_dir, args.checkpoint = str(path), str(path / "checkpoint.pt")
        if args.command != "report" and not (path / "checkpoint.pt").is_file():
            raise ConfigError(f"run folder {str(path)!r} has no checkpoint.pt (a run writes it at the end of its "
                              "first epoch)")
    elif path.exists():
        args.run_dir, args.checkpoint = str(path.parent), str(path)
    else:
        raise ConfigError(f"RUN {str(path)!r} does not exist; give {RUN_HELP}")


def add_machine_options(parser: argparse.ArgumentParser, batch_default: int | None, batch_help: str) -> None:
    """``--device``, ``--batch-size``, ``--workers`` and ``--threads``."""
    parser.add_argument("--device", default="auto",
                        help="auto (a GPU when present), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int, default=batch_default, help=batch_help)
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def machine_setup(args: argparse.Namespace):
    """Threads and device of a command; bad values are a one-line error."""
    import torch

    from deepcluster.devices import resolve_device

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    for name in ("batch_size", "workers"):
        value = getattr(args, name, None)
        if value is not None and value < (1 if name == "batch_size" else 0):
            wanted = "positive" if name == "batch_size" else "0 or more"
            raise ConfigError(f"--{name.replace('_', '-')} must be {wanted}, got {value}")
    check_device(args.device)
    return resolve_device(args.device)


def check_device(name: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N, else a one-line ``ConfigError``."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"--device is {name!r}; choose auto, cpu, cuda or cuda:N")
    return name


__all__ = ["EXIT_DIVERGED", "EXIT_MEMORY", "EXIT_USAGE", "EXIT_WRITE", "Parser", "RUN_HELP", "UsageError",
           "add_machine_options", "add_run_argument", "check_device", "csv_items", "int_list", "machine_setup",
           "out_folder", "resolve_run", "writing_to"]
