"""A time budget for a training run (the ``minutes`` setting, ``--minutes M``).

The first epoch runs as the settings say and is timed (feature pass, clustering, monitor
and training, the same on every process: their mean). Then the number of epochs is fitted to
the budget, ``floor(M * 60 / first epoch's seconds)`` (at least 1), and a warm-up, if the
settings have one, is scaled by the same factor (at least one epoch); the cosine after it
follows the new length. The fitted values replace ``epochs`` and ``warmup_epochs`` before the
first checkpoint is written and in ``RUN/config.yaml``, so ``--resume`` continues with the
same schedule: the fit happens once, after the first epoch of the run, never on a resume.

The final clustering (about one feature pass) comes after the budget.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import yaml

from deepcluster.config import MAX_COUNT, ConfigError

if TYPE_CHECKING:
    from deepcluster.config import Config
    from deepcluster.runfolder import RunFolder

MAX_MINUTES = 10**7  # about 19 years: far above any run, low enough to keep the arithmetic plain


def check(config: Config) -> None:
    """Raise ``ConfigError`` for a budget that is not a positive number of minutes."""
    if config.minutes is not None and not 0 < config.minutes <= MAX_MINUTES:
        raise ConfigError(f"setting 'minutes' must be a positive number of minutes (at most {MAX_MINUTES:,}), got "
                          f"{config.minutes:g}")


def check_given(overrides: dict) -> None:
    """Refuse ``epochs`` and ``minutes`` given together (one of them decides the length)."""
    if overrides.get("epochs") is not None and overrides.get("minutes") is not None:
        raise ConfigError("give --epochs or --minutes, not both: a time budget fits the epochs to it after timing "
                          "the first")


def fitted(minutes: float, seconds: float, epochs: int, warmup_epochs: int) -> tuple[int, int]:
    """``(epochs, warmup_epochs)`` for a budget of ``minutes`` when an epoch takes
    ``seconds``: as many whole epochs as fit (at least 1, at most ``MAX_COUNT``), and the
    warm-up scaled by the same factor (none stays none; otherwise at least one epoch)."""
    count = int(min(max(math.floor(minutes * 60.0 / max(seconds, 1e-6)), 1), MAX_COUNT))
    warmup = 0 if warmup_epochs == 0 else max(1, round(warmup_epochs * count / max(epochs, 1)))
    return count, warmup


def fit_line(minutes: float, seconds: float, count: int, warmup: int | None) -> str:
    """``epoch 1 took 42 s; 60 minutes fit 85 epochs: running 85``."""
    fits = math.floor(minutes * 60.0 / max(seconds, 1e-6))
    whole = f"{minutes:g} minute{'' if minutes == 1 else 's'}"
    fit = f"fit {fits:,} epoch{'' if fits == 1 else 's'}" if fits >= 1 else "fit less than one epoch"
    capped = " (the most a run may train)" if fits > count else ""
    warm = f", warm-up {warmup} epoch{'' if warmup == 1 else 's'}" if warmup else ""
    return f"epoch 1 took {seconds:.0f} s; {whole} {fit}: running {count:,}{capped}{warm}"


def mean_over_processes(seconds: float) -> float:
    """The mean of ``seconds`` over the processes (itself with one): every process fits alike."""
    from deepcluster import distributed

    if not distributed.is_distributed():
        return seconds
    import torch

    total = distributed.all_reduce_sum(torch.tensor([seconds], dtype=torch.float64))
    return float(total[0]) / distributed.world_size()


def fit_to_budget(config: Config, folder: RunFolder, epoch: int, seconds: float,
                  say: Callable[[str], None]) -> None:
    """After the run's first epoch (``epoch`` 0) under a budget: fit ``config.epochs`` (and
    ``warmup_epochs``) to it, in place, rewrite ``RUN/config.yaml`` and say so in one line.
    Called before the epoch's checkpoint is written, which then holds the fitted values."""
    if config.minutes is None or epoch != 0:
        return
    from deepcluster.checkpoint import atomic_write_bytes
    from deepcluster.runfolder import CONFIG_NAME, write_failure

    seconds = mean_over_processes(seconds)
    count, warmup = fitted(config.minutes, seconds, config.epochs, config.warmup_epochs)
    config.epochs, config.warmup_epochs = count, warmup
    if folder.writer:
        path = folder.path / CONFIG_NAME
        try:
            atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
        except OSError as error:
            raise write_failure("the run file", path, error) from None
    say(f"deepcluster: {fit_line(config.minutes, seconds, count, warmup)}")


def epochs_text(config: Config, completed: int) -> str:
    """The run's length for its first line: ``30 epochs``, or under a budget not yet fitted
    ``a 60-minute budget (epochs fitted after the first)``."""
    from deepcluster.messages import plural

    if config.minutes is None or completed > 0:
        return plural(config.epochs, "epoch")
    return f"a {config.minutes:g}-minute budget (epochs fitted after the first)"


__all__ = ["check", "check_given", "epochs_text", "fit_line", "fit_to_budget", "fitted"]
