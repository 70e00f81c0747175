"""The ``deepcluster`` command line. It only parses and wires; the library does the work.

    deepcluster train | recipes ...                        (``cli.train``)
    deepcluster eval ...                                   (``cli.eval``)
    deepcluster report | assign | features | export ...    (``cli.tools``)

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
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Sequence

from deepcluster.cli.common import EXIT_DIVERGED, EXIT_MEMORY, EXIT_USAGE, EXIT_WRITE, Parser, UsageError
from deepcluster.cli.train import parse_overrides, unknown_option
from deepcluster.config import ConfigError
from deepcluster.messages import one_line

# A process other than the first, failing a check every process fails alike, leaves the saying to
# the first and waits this long (at most) for the launcher to end it: exiting at once could get
# the first process terminated before it speaks.
SILENT_RANK_WAIT_S = 30.0


def build_parser() -> Parser:
    from deepcluster import __version__
    from deepcluster.cli.eval import add_eval_parser
    from deepcluster.cli.tools import add_tool_parsers
    from deepcluster.cli.train import add_train_parsers

    parser = Parser(prog="deepcluster", description="DeepCluster: unsupervised visual features by clustering.")
    parser.add_argument("--version", action="version", version=f"deepcluster {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=Parser)
    add_train_parsers(commands)
    add_eval_parser(commands)
    add_tool_parsers(commands)
    return parser


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


def run_command(parser: Parser, args: argparse.Namespace, extra: list[str], argv: Sequence[str] | None) -> int:
    """Dispatch a parsed command line (``extra``: the unparsed tokens, ``train``'s settings)."""
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "train":
        from deepcluster.cli.train import cmd_train

        return cmd_train(args, extra)
    if args.command == "recipes":
        from deepcluster.cli.train import cmd_recipes

        return cmd_recipes(parser.parse_args(argv))
    if args.command == "eval":
        from deepcluster.cli.eval import cmd_eval

        return cmd_eval(parser.parse_args(argv))  # strict parse: unknown options are an error
    from deepcluster.cli.tools import COMMANDS, run_tool

    if args.command in COMMANDS:
        return run_tool(parser.parse_args(argv), sys.argv[1:] if argv is None else argv)
    raise UsageError(f"unknown command {args.command!r}")


def _say(error: BaseException | str) -> None:
    from deepcluster.progress import erase_bars

    erase_bars()
    print(f"deepcluster: error: {one_line(error)}", file=sys.stderr)


def _memory_failure(error: BaseException, command: str | None) -> int:
    """Exit code 5 and one line for an allocation failure; anything else is raised again."""
    from deepcluster.progress import erase_bars

    reason = out_of_memory(error)
    if reason is None:
        raise error
    erase_bars()
    if command == "train":
        advice = ("lower batch_size, feature_batch_size, feature_dim or n_clusters, or use a machine with more "
                  "memory; a checkpoint already written is kept (continue with --resume)")
    else:
        advice = "use fewer images, layers (eval: --probe-layers) or a smaller batch, or a machine with more memory"
    print(f"deepcluster: error: out of memory ({reason}); {advice}", file=sys.stderr)
    return EXIT_MEMORY


def _main(argv: Sequence[str] | None) -> int:
    from deepcluster.checkpoint import CheckpointError
    from deepcluster.cli.train import interrupted_line
    from deepcluster.data import DataError
    from deepcluster.distributed import PeerFailed, is_distributed, launched_rank
    from deepcluster.health import TrainingDiverged
    from deepcluster.progress import erase_bars
    from deepcluster.runfolder import RunFolderError

    parser = build_parser()
    command = None
    try:
        args, extra = parser.parse_known_args(argv)
        command = args.command
        return run_command(parser, args, extra, argv)
    except PeerFailed as error:  # another process's setup failed: the main process says it once
        erase_bars()
        if error.args and error.args[0]:
            print(f"deepcluster: error: {one_line(error.args[0])}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ConfigError, DataError, CheckpointError) as error:
        if not is_distributed() and launched_rank() != 0:
            # Every process of the job read the same command line: the first one says it; the
            # launcher ends this one (SIGTERM, a silent Terminated) once the first has exited.
            erase_bars()
            time.sleep(SILENT_RANK_WAIT_S)
            return EXIT_USAGE
        _say(error)
        return EXIT_USAGE
    except TrainingDiverged as error:
        _say(error)
        return EXIT_DIVERGED
    except RunFolderError as error:
        _say(error)
        return EXIT_WRITE
    except (MemoryError, RuntimeError) as error:
        return _memory_failure(error, command)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (Terminated)
        erase_bars()
        print(interrupted_line(command), file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(interrupt, Terminated) else 130


__all__ = ["EXIT_DIVERGED", "EXIT_MEMORY", "EXIT_USAGE", "EXIT_WRITE", "Parser", "SILENT_RANK_WAIT_S", "Terminated",
           "UsageError", "build_parser", "main", "out_of_memory", "parse_overrides", "unknown_option"]
