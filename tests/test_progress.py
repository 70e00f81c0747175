"""Progress bars (only on a terminal) and TensorBoard scalars (only when installed)."""

import io
import json
import math
import subprocess
import sys

import pytest

from deepcluster import progress
from deepcluster.progress import CLEAR_LINE, Progress, bars_enabled, erase_bars, track
from deepcluster.scalars import TENSORBOARD_DIR, ScalarLog, scalar_items, tag_of


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def no_switch(monkeypatch):
    monkeypatch.delenv(progress.ENV_SWITCH, raising=False)


def test_bar_is_drawn_on_a_terminal_and_erased_when_done():
    stream = Terminal()
    with Progress(10, "features", unit="img", stream=stream, min_interval=0) as bar:
        for _ in range(10):
            bar.update(1, note="loss 1.0")
    text = stream.getvalue()
    assert "features [" in text and "10/10 100%" in text and "loss 1.0" in text
    assert text.endswith(CLEAR_LINE) and "\n" not in text


def test_nothing_is_written_when_not_a_terminal_unless_forced(monkeypatch):
    stream = io.StringIO()
    assert list(track(range(5), 5, "x", enabled=None)) == [0, 1, 2, 3, 4]
    with Progress(3, "x", stream=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == "" and not bars_enabled(stream)
    monkeypatch.setenv(progress.ENV_SWITCH, "1")
    assert bars_enabled(stream)
    monkeypatch.setenv(progress.ENV_SWITCH, "0")
    assert not bars_enabled(Terminal())


def test_render_fits_the_width_and_handles_unknown_totals():
    bar = Progress(None, "PCA-whitening", enabled=False)
    assert bar.render(80).startswith("PCA-whitening")
    bar = Progress(1000, "a very long stage description", enabled=False)
    bar.update(10, note="x" * 200)
    assert len(bar.render(60)) <= 59


def test_erase_bars_clears_a_bar_left_by_an_error():
    stream = Terminal()
    bar = Progress(5, "training", stream=stream, min_interval=0)
    bar.update(2)
    erase_bars()
    assert stream.getvalue().endswith(CLEAR_LINE) and not bar.enabled


def test_scalar_tags_and_values():
    record = {"epoch": 3, "train_loss": 1.5, "nmi_prev": None, "time_kmeans": 2.0, "n_split": 0,
              "clustering_objective": float("nan"), "flag": True, "new_number": 7}
    items = dict(scalar_items(record))
    assert items == {"train/loss": 1.5, "time/kmeans": 2.0, "clustering/empty_clusters_split": 0.0,
                     "other/new_number": 7.0}
    assert tag_of("nmi_labels") == "labels/nmi"


@pytest.mark.slow
def test_a_run_writes_tensorboard_scalars_next_to_its_log(tiny_run):
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / TENSORBOARD_DIR))
    events.Reload()
    losses = events.Scalars("train/loss")
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [e.step for e in losses] == [1, 2]
    assert all(math.isclose(e.value, r["train_loss"], rel_tol=1e-6) for e, r in zip(losses, log))
    assert "labels/nmi" in events.Tags()["scalars"] and "stability/nmi_previous_epoch" in events.Tags()["scalars"]


def test_missing_tensorboard_is_said_once_and_does_not_stop_anything(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    notes = []
    scalars = ScalarLog(tmp_path, enabled=True, log=notes.append)
    scalars.write({"epoch": 0, "train_loss": 1.0})
    scalars.close()
    assert len(notes) == 1 and "not installed" in notes[0] and not (tmp_path / TENSORBOARD_DIR).exists()
    off = ScalarLog(tmp_path, enabled=False, log=notes.append)
    off.write({"epoch": 0, "train_loss": 1.0})
    assert len(notes) == 1 and not off.active


def test_missing_tensorboard_with_the_default_notice_goes_to_stderr(tmp_path, monkeypatch, capsys):
    """The default ``log`` (what ``train`` uses): was ``log(...)`` on None, a TypeError."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    scalars = ScalarLog(tmp_path, enabled=True)
    scalars.write({"epoch": 1, "train_loss": 1.0})
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "not installed" in captured.err


@pytest.mark.slow
def test_bars_reach_a_forced_terminal_but_never_stdout(tiny_run, image_folder, tmp_path):
    """A command's stdout stays clean lines; bars go to stderr, and only when asked for."""
    import os

    env = dict(os.environ)
    args = [sys.executable, "-m", "deepcluster", "features", "--checkpoint", str(tiny_run / "checkpoint.pt"),
            "--data", str(image_folder), "--out", str(tmp_path / "f"), "--threads", "1"]
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "\r" not in quiet.stderr and "\r" not in quiet.stdout
    env[progress.ENV_SWITCH] = "1"
    loud = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert loud.returncode == 0, loud.stderr
    assert "features [" in loud.stderr and "\r" not in loud.stdout
