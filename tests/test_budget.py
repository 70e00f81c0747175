"""The time budget's re-fit (``--minutes``), on fake timings: the length after each epoch,
the lines it says, and what it records for a resume."""

from __future__ import annotations

import itertools
import types

import pytest

from deepcluster import budget


def test_the_first_fit_counts_the_final_clustering():
    assert budget.refit(3, 1, 21.0, [21.0], 0.0) == 8  # 180 s / 21 s
    assert budget.refit(3, 1, 21.0, [21.0], 15.0) == 7  # less 15 s at the end: 165 / 21
    assert budget.refit(1, 1, 90.0, [90.0], 10.0) == 1  # at least the epoch done
    assert budget.refit(10**7, 1, 1e-3, [1e-3], 0.0) == 100_000  # at most MAX_COUNT


def test_a_later_fit_only_shortens_and_never_below_the_epochs_done():
    # 21 s, then 33 s: 54 s spent, ~33 s an epoch, 15 s to end: (180 - 54 - 15) // 33 = 3 more
    assert budget.refit(3, 2, 54.0, [21.0, 33.0], 15.0, current=8) == 5
    assert budget.refit(3, 2, 30.0, [15.0, 15.0], 0.0, current=8) == 8  # faster: never longer than before
    assert budget.refit(3, 6, 200.0, [30.0] * 6, 15.0, current=8) == 6  # over the budget: stop where it is
    assert budget.per_epoch([20.0, 20.0, 35.0]) == 35.0  # the last, when slower than the mean
    assert budget.per_epoch([40.0, 20.0]) == 30.0  # the mean, when the last was faster


def test_the_first_fit_scales_a_warm_up():
    assert budget.fitted(60, 42.0, 30, 0) == (85, 0)
    assert budget.fitted(1, 90.0, 30, 0) == (1, 0)
    assert budget.fitted(30, 60.0, 800, 10) == (30, 1)  # scaled, at least one epoch
    assert budget.fitted(30, 6.0, 100, 10) == (300, 30)
    assert budget.fitted(3, 21.0, 30, 0, 15.0) == (7, 0)


def test_the_lines():
    assert budget.fit_line(60, 42.0, 85, 0) == "epoch 1 took 42 s; 60 minutes fit 85 epochs: running 85"
    assert budget.fit_line(3, 21.0, 7, 0, 15.0) == ("epoch 1 took 21 s; 3 minutes less ~15 s for the final "
                                                     "clustering fit 7 epochs: running 7")
    assert budget.refit_line(3, 2, 54.0, 33.0, 8, 5) == ("after 2 epochs (54 s of 180), epochs take ~33 s: "
                                                          "running 5 instead of 8")


class Folder:
    """What ``fit_to_budget`` reads of a run folder (nothing is written: not the writer)."""

    writer = False


@pytest.mark.parametrize("minutes, ticks, final, lengths, said", [
    # 3 minutes; epochs of 21 s then 24-33 s (the measured overshoot), 15 s to end
    (3, [0, 21, 27, 33, 30, 30], 15.0, [7, 6, 5, 5, 5],
     ["epoch 1 took 21 s", "after 2 epochs (48 s of 180), epochs take ~27 s: running 6 instead of 7",
      "after 3 epochs (81 s of 180), epochs take ~33 s: running 5 instead of 6"]),
    (3, [0] + [20] * 9, 0.0, [9] * 9, ["epoch 1 took 20 s"]),  # steady: fitted once
    (1, [0, 70], 5.0, [1], ["epoch 1 took 70 s"]),  # one epoch over the budget: still 1
])
def test_fit_to_budget_after_every_epoch(monkeypatch, minutes, ticks, final, lengths, said):
    """The run's clock moves by ``ticks`` (its start, then each epoch, set-up included in the
    first); the length after each epoch, what each record gets, and one line per change."""
    clock = iter(itertools.accumulate(ticks))
    monkeypatch.setattr(budget, "clock", lambda: float(next(clock)))
    monkeypatch.setattr(budget, "final_seconds", lambda record: final)
    config = types.SimpleNamespace(minutes=minutes, epochs=30, warmup_epochs=0)
    folder, records, lines, got = Folder(), [], [], []
    budget.start_clock(folder)
    epoch = 0
    while epoch < config.epochs:
        records.append({"epoch": epoch + 1})
        budget.fit_to_budget(config, folder, records, 1.0, lines.append)
        got.append(config.epochs)
        epoch += 1
    assert got == lengths[:len(got)] and len(got) == lengths[-1]
    assert [r["budget_epochs"] for r in records] == got
    assert records[-1]["time_run"] == sum(ticks[1:len(records) + 1])
    assert len(lines) == len(said) and all(line.startswith(f"deepcluster: {want}") for line, want in zip(lines, said))


def test_a_resumed_sitting_counts_the_recorded_seconds(monkeypatch):
    """Resumed after epoch 2 (100 s recorded): the new sitting's clock adds to it, and its
    set-up counts as part of its first epoch."""
    ticks = iter([1000.0, 1050.0])  # started, then the end of epoch 3: 50 s
    monkeypatch.setattr(budget, "clock", lambda: next(ticks))
    monkeypatch.setattr(budget, "final_seconds", lambda record: 0.0)
    config = types.SimpleNamespace(minutes=4, epochs=4, warmup_epochs=0)
    folder = Folder()
    budget.start_clock(folder)
    records = [{"epoch": 1, "time_run": 50.0}, {"epoch": 2, "time_run": 100.0}, {"epoch": 3}]
    said = []
    budget.fit_to_budget(config, folder, records, 1.0, said.append)
    assert records[-1]["time_run"] == 150.0 and config.epochs == 4 and said == []  # (240 - 150) // 50 = 1 more


def test_no_budget_no_change():
    config = types.SimpleNamespace(minutes=None, epochs=30, warmup_epochs=0)
    records = [{"epoch": 1}]
    budget.fit_to_budget(config, Folder(), records, 5.0, print)
    assert config.epochs == 30 and records == [{"epoch": 1}]
