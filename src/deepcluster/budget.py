"""A time budget for a training run (the ``minutes`` setting, ``--minutes M``).

The budget is the wall time of the training, from its set-up to the final clustering. The
first epoch runs as the settings say; after it, and again after every epoch, the number of
epochs is fitted from what has been measured so far (every process's mean):

- ``spent``: the run's seconds up to the end of the epoch (set-up included; the epochs of
  an earlier sitting count with their recorded time, the pause between sittings does not);
- ``per epoch``: the larger of the mean of the epochs of this sitting and the last of them
  (the first epoch of a sitting with its set-up);
- ``final``: the final clustering and what ends the run, estimated as the last epoch's
  feature pass, clustering and scores plus ``END_MARGIN`` of them.

``epochs = done + floor((budget - spent - final) / per epoch)``, at least the epochs done
and at least 1, at most ``MAX_COUNT``. The first fit sets the length (longer or shorter than
the settings'); every later fit may only shorten it, so a slow epoch ends the run earlier
and a fast one never lengthens it. Each change is said in one line.

A warm-up, if the settings have one, is scaled by the first fit (at least one epoch) and not
changed afterwards; a cosine after it always spans the current length, so a shortened run
still ends at ``final_lr``, the epochs already trained keep the rates they had, and the
rates of the epochs left drop to the shorter cosine. (The paper's v1 and the ``photo``
recipe train at a constant rate: nothing changes.)

Every decision is saved where the run's schedule lives: the fitted ``epochs`` and
``warmup_epochs`` in the epoch's checkpoint and in ``RUN/config.yaml``, and the epoch's
record (``log.jsonl``) gets ``budget_epochs`` (the length decided after it) and
``time_run`` (the seconds spent). ``--resume`` continues with the saved length and goes on
fitting from the recorded seconds, so the epochs it decided are never decided again.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import TYPE_CHECKING, Callable, Sequence

import yaml

from deepcluster.config import MAX_COUNT, ConfigError

if TYPE_CHECKING:
    from deepcluster.config import Config
    from deepcluster.runfolder import RunFolder

MAX_MINUTES = 10**7  # about 19 years: far above any run, low enough to keep the arithmetic plain
END_MARGIN = 0.25  # the final clustering: the last epoch's feature pass, clustering and scores, plus a quarter
RECORD_KEYS = ("time_run", "budget_epochs")  # what a budget adds to an epoch's record


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


def per_epoch(durations: Sequence[float]) -> float:
    """The seconds an epoch is expected to take: the larger of the mean of ``durations``
    (this sitting's epochs) and the last of them."""
    return max(sum(durations) / len(durations), durations[-1])


def refit(minutes: float, done: int, spent: float, durations: Sequence[float], final: float,
          current: int | None = None) -> int:
    """The epochs a run of ``minutes`` should have after ``done`` epochs and ``spent``
    seconds, its epochs taking ``durations`` seconds and its end ``final`` seconds: as many
    as fit, never fewer than ``done`` (nor 1), never more than ``MAX_COUNT``, nor more than
    ``current`` (the length fitted before; ``None`` at the first fit)."""
    left = minutes * 60.0 - spent - final
    more = max(math.floor(left / max(per_epoch(durations), 1e-6)), 0)
    count = int(min(max(done + more, done, 1), MAX_COUNT))
    return count if current is None else max(min(count, current), done)


def fitted(minutes: float, seconds: float, epochs: int, warmup_epochs: int, other: float = 0.0) -> tuple[int, int]:
    """``(epochs, warmup_epochs)`` at the first fit, after one epoch of ``seconds``, the
    set-up and the final clustering taking ``other`` seconds: :func:`refit`'s count, and the
    warm-up scaled by the same factor (none stays none; otherwise at least one epoch)."""
    count = refit(minutes, 1, seconds, [seconds], other)
    warmup = 0 if warmup_epochs == 0 else max(1, round(warmup_epochs * count / max(epochs, 1)))
    return count, warmup


def fit_line(minutes: float, seconds: float, count: int, warmup: int | None, final: float = 0.0) -> str:
    """The first fit: ``epoch 1 took 42 s; 60 minutes fit 85 epochs: running 85``, with the
    final clustering's estimate where it takes a second or more."""
    whole = f"{minutes:g} minute{'' if minutes == 1 else 's'}"
    less = f" less ~{final:.0f} s for the final clustering" if final >= 1 else ""
    fits = math.floor((minutes * 60.0 - final) / max(seconds, 1e-6))
    fit = f"fit {fits:,} epoch{'' if fits == 1 else 's'}" if fits >= 1 else "fit less than one epoch"
    capped = " (the most a run may train)" if fits > count else ""
    warm = f", warm-up {warmup} epoch{'' if warmup == 1 else 's'}" if warmup else ""
    return f"epoch 1 took {seconds:.0f} s; {whole}{less} {fit}: running {count:,}{capped}{warm}"


def refit_line(minutes: float, done: int, spent: float, seconds: float, before: int, count: int) -> str:
    """A later fit that changed the length: ``after 4 epochs (118 s of 180), epochs take
    ~30 s: running 6 instead of 8``."""
    return (f"after {done} epoch{'' if done == 1 else 's'} ({spent:.0f} s of {minutes * 60:.0f}), epochs take "
            f"~{seconds:.0f} s: running {count:,} instead of {before:,}")


def clock() -> float:
    """Seconds on a monotonic clock (a test replaces it with its own)."""
    return time.perf_counter()


def final_seconds(record: dict) -> float:
    """The final clustering's estimated seconds: the epoch's feature pass, clustering and
    scores, and ``END_MARGIN`` more for the rest of the run's end."""
    stage = sum(float(record.get(key) or 0.0) for key in ("time_features", "time_clustering", "time_monitor"))
    return stage * (1.0 + END_MARGIN)


def mean_over_processes(seconds: float) -> float:
    """The mean of ``seconds`` over the processes (itself with one): every process fits alike."""
    from deepcluster import distributed

    if not distributed.is_distributed():
        return seconds
    import torch

    total = distributed.all_reduce_sum(torch.tensor([seconds], dtype=torch.float64))
    return float(total[0]) / distributed.world_size()


class Sitting:
    """The seconds of one sitting of a run (a run, or a resume of it): when it began, the
    run's seconds before it, and its epochs' seconds."""

    def __init__(self, started: float) -> None:
        self.started, self.before, self.marks, self.durations = started, None, [], []

    def after_epoch(self, records: list[dict]) -> tuple[float, list[float]]:
        """``(spent, durations)`` once the epoch of ``records[-1]`` is trained and scored:
        the run's seconds so far (every process's mean) and the seconds of each of this
        sitting's epochs (the first with the set-up, the others from the end of the one
        before, its files included)."""
        if self.before is None:  # the seconds of earlier sittings, as recorded
            self.before = float(records[-2].get("time_run") or 0.0) if len(records) > 1 else 0.0
        spent = self.before + mean_over_processes(clock() - self.started)
        self.durations.append(spent - (self.marks[-1] if self.marks else self.before))
        self.marks.append(spent)
        return spent, self.durations


_sittings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # RunFolder -> its Sitting


def start_clock(folder: RunFolder) -> None:
    """Note that this sitting's training begins now (its set-up counts against the budget)."""
    _sittings[folder] = Sitting(clock())


def fit_to_budget(config: Config, folder: RunFolder, records: list[dict], seconds: float,
                  say: Callable[[str], None]) -> None:
    """After every epoch of a run under a budget: fit ``config.epochs`` (and, at the first
    fit, ``warmup_epochs``) in place from the seconds measured so far; add ``time_run`` and
    ``budget_epochs`` to the epoch's record (``records[-1]``; its training took ``seconds``,
    the start of the clock when this sitting's was not started); when
    the length changes, rewrite ``RUN/config.yaml`` and say so in one line. Called before
    the epoch's checkpoint is written, which then holds the fitted values."""
    if config.minutes is None:
        return
    if folder not in _sittings:  # the clock was not started: from the epoch's training on
        _sittings[folder] = Sitting(clock() - seconds)
    sitting = _sittings[folder]
    record, done = records[-1], int(records[-1]["epoch"])
    spent, durations = sitting.after_epoch(records)
    final = mean_over_processes(final_seconds(record))
    before = config.epochs
    if done == 1:
        config.epochs, config.warmup_epochs = fitted(config.minutes, durations[0], config.epochs,
                                                     config.warmup_epochs, final)
        line = fit_line(config.minutes, durations[0], config.epochs, config.warmup_epochs, final)
    else:
        config.epochs = refit(config.minutes, done, spent, durations, final, config.epochs)
        line = refit_line(config.minutes, done, spent, per_epoch(durations), before, config.epochs)
    record.update(time_run=spent, budget_epochs=config.epochs)
    if done == 1 or config.epochs != before:
        _save(config, folder)
        say(f"deepcluster: {line}")


def _save(config: Config, folder: RunFolder) -> None:
    """Rewrite ``RUN/config.yaml`` with the fitted length."""
    from deepcluster.checkpoint import atomic_write_bytes
    from deepcluster.runfolder import CONFIG_NAME, write_failure

    if folder.writer:
        path = folder.path / CONFIG_NAME
        try:
            atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
        except OSError as error:
            raise write_failure("the run file", path, error) from None


def epochs_text(config: Config, completed: int) -> str:
    """The run's length for its first line: ``30 epochs``, or under a budget not yet fitted
    ``a 60-minute budget (epochs fitted after the first)``."""
    from deepcluster.messages import plural

    if config.minutes is None or completed > 0:
        return plural(config.epochs, "epoch")
    return f"a {config.minutes:g}-minute budget (epochs fitted after the first)"


__all__ = ["END_MARGIN", "RECORD_KEYS", "check", "check_given", "epochs_text", "fit_line", "fit_to_budget", "fitted",
           "per_epoch", "refit", "refit_line", "start_clock"]
