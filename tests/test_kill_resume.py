"""Kill and resume: real training processes killed with SIGKILL, then resumed.

A SIGKILL gives the process no chance to clean up, exactly like the OOM killer or a
pre-empted cloud machine. The kills land at exact points through the documented
``DEEPCLUSTER_FAULT`` hook (``deepcluster.faults``), which sends the real signal to the real
process, plus one kill from outside at an arbitrary moment. After ``--resume`` the run
folder must hold exactly what an uninterrupted run with the same seed writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcluster.faults import ENV_VAR
from deepcluster.methods.records import MACHINE_KEYS
from conftest import one_epoch

EPOCHS = 3
TINY = ["--recipe", "small", "--epochs", str(EPOCHS), "--n_clusters", "6", "--batch_size", "8",
        "--feature_batch_size", "16", "--workers", "0", "--pca_dim", "8", "--kmeans_iters", "5",
        "--feature_dim", "32", "--threads", "1"]
# 36 images: 3 feature batches of 16 and 5 training batches of 8 per epoch.
TIMING_KEYS = MACHINE_KEYS


def train(data: Path, out: Path, fault: str | None = None, resume: bool = False,
          start_only: bool = False, threads: int = 1) -> subprocess.CompletedProcess | subprocess.Popen:
    """``deepcluster train`` in a fresh Python process (the test's PYTHONPATH is kept)."""
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    env["OMP_NUM_THREADS"] = str(threads)
    if fault:
        env[ENV_VAR] = fault
    args = [sys.executable, "-m", "deepcluster", "train", "--data", str(data), "--out", str(out), *TINY,
            "--threads", str(threads)]
    if resume:
        args.append("--resume")
    if start_only:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def temp_files(run: Path) -> list[Path]:
    return sorted(run.glob(".*.tmp-*")) + sorted(run.glob("assignments/.*.tmp-*"))


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-for-bit equal assignments, weights and optimiser state; the same log but for timings."""
    names = sorted(p.name for p in (reference / "assignments").glob("*.npy"))
    assert names == [f"epoch_{e:04d}.npy" for e in range(1, EPOCHS + 1)] + ["final.npy"]
    assert sorted(p.name for p in (run / "assignments").iterdir()) == names
    for name in names:
        assert (run / "assignments" / name).read_bytes() == (reference / "assignments" / name).read_bytes(), name
    ours = torch.load(run / "checkpoint.pt", weights_only=True)
    theirs = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert ours["epoch"] == theirs["epoch"] == EPOCHS
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name
    for index, state in theirs["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert torch.equal(ours["torch_rng"], theirs["torch_rng"])
    assert torch.equal(ours["assignments"], theirs["assignments"])
    for key, value in theirs["final"].items():  # the clustering of the trained weights
        assert torch.equal(ours["final"][key], value) if torch.is_tensor(value) else ours["final"][key] == value, key
    records, expected = log_records(run), log_records(reference)
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    for record, want in zip(records, expected):
        assert {k: v for k, v in record.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in want.items() if k not in TIMING_KEYS}
    assert temp_files(run) == []


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory) -> Path:
    """The uninterrupted run every killed-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(image_folder, out)
    assert result.returncode == 0, result.stderr
    return out


def assert_killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-2000:])


def epoch_lines(stdout: str) -> list[int]:
    """The epochs a run's output reports training, in order."""
    return [int(number) for number in re.findall(r"^epoch +(\d+)/\d+ ", stdout, re.M)]


@pytest.mark.slow
def test_at_two_threads_a_run_killed_mid_epoch_resumes_to_the_same_run_without_repeating_an_epoch(
        image_folder, tmp_path):
    """The promise holds at any thread count: two threads here (the reference run too, since
    floats depend on the thread count). The resumed run trains epochs 2 and 3 once each and
    never epoch 1 again."""
    reference = tmp_path / "reference"
    result = train(image_folder, reference, threads=2)
    assert result.returncode == 0, result.stderr
    assert epoch_lines(result.stdout) == [1, 2, 3]
    run = tmp_path / "run"
    assert_killed(train(image_folder, run, "kill:training:3", threads=2))  # epoch 1's third batch
    assert not (run / "checkpoint.pt").exists()
    result = train(image_folder, run, "kill:training:8", resume=True, threads=2)  # epoch 2, third batch
    assert_killed(result)
    assert epoch_lines(result.stdout) == [1]
    result = train(image_folder, run, resume=True, threads=2)
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch 1" in result.stdout and epoch_lines(result.stdout) == [2, 3]
    assert_same_run(run, reference)


@pytest.mark.slow
def test_sigkill_at_every_stage_then_resume_equals_an_uninterrupted_run(image_folder, reference, tmp_path):
    run = tmp_path / "run"

    # Epoch 1, feature pass, before any checkpoint exists.
    assert_killed(train(image_folder, run, "kill:features:2"))
    assert not (run / "checkpoint.pt").exists()

    # --resume with no checkpoint starts over; the first checkpoint's write is torn halfway:
    # the temporary file is left behind, no checkpoint.pt appears.
    result = train(image_folder, run, "kill:checkpoint:1", resume=True)
    assert_killed(result)
    assert "no checkpoint yet" in result.stdout and "starting from the beginning" in result.stdout
    torn = temp_files(run)
    assert [p.name.startswith(".checkpoint.pt.tmp-") for p in torn] == [True]
    assert 0 < torn[0].stat().st_size and not (run / "checkpoint.pt").exists()

    # Killed after the checkpoint of epoch 1, before its log line; the torn file was removed.
    result = train(image_folder, run, "kill:log:1", resume=True)
    assert_killed(result)
    assert "removed 1 temporary file" in result.stdout
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert (run / "log.jsonl").read_text() == "" and temp_files(run) == []

    # Resumed (the log is rebuilt from the checkpoint), then killed in epoch 2's clustering.
    result = train(image_folder, run, "kill:clustering:1", resume=True)
    assert_killed(result)
    assert "resuming after epoch 1" in result.stdout
    assert [r["epoch"] for r in log_records(run)] == [1]

    # Killed in the middle of epoch 2's training (its third batch).
    assert_killed(train(image_folder, run, "kill:training:3", resume=True))
    # A torn write of epoch 2's checkpoint never replaces the good one of epoch 1.
    good = (run / "checkpoint.pt").read_bytes()
    assert_killed(train(image_folder, run, "kill:checkpoint:1", resume=True))
    assert (run / "checkpoint.pt").read_bytes() == good
    assert len(temp_files(run)) == 1

    result = train(image_folder, run, resume=True)
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


@pytest.mark.slow
def test_sigkill_from_outside_at_an_arbitrary_moment_then_resume(image_folder, reference, tmp_path):
    """The kill comes from another process, some milliseconds into the second epoch, with no
    hook involved; where exactly it lands varies, the resumed result must not."""
    run = tmp_path / "run"
    process = train(image_folder, run, start_only=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().count("\n") >= 1):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
            time.sleep(0.002)
        time.sleep(random.Random(0).uniform(0.0, 0.05))
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL  # it was still running: a real interruption
    assert np.load(run / "assignments" / "epoch_0001.npy", allow_pickle=False).shape == (36,)
    result = train(image_folder, run, resume=True)
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


INTERRUPTED = "deepcluster: interrupted; the last completed epoch's checkpoint is kept (use --resume)\n"


@pytest.mark.slow
def test_sigterm_stops_as_ctrl_c_does_and_resume_goes_on(image_folder, tmp_path, capsys):
    """Was: a silent stop with status -15. SIGTERM (``kill PID``, a scheduler), here halfway
    through writing epoch 2's checkpoint, now prints Ctrl-C's line, exits 143 and keeps the
    checkpoint of epoch 1, from which ``--resume`` goes on."""
    from deepcluster.cli import main

    run = tmp_path / "run"
    result = train(image_folder, run, "term:checkpoint:2")
    assert result.returncode == 128 + signal.SIGTERM and result.stderr == INTERRUPTED, result.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1 and temp_files(run) == []
    assert [r["epoch"] for r in log_records(run)] == [1]
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(run), "--resume"]) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    assert [r["epoch"] for r in log_records(run)] == [1, 2, 3] and temp_files(run) == []


@pytest.mark.slow
def test_ctrl_c_prints_the_same_line(cli, image_folder, tmp_path, monkeypatch):
    from deepcluster import train as train_module

    trained = train_module.train_one_epoch

    def interrupted(*args, **kwargs):  # Ctrl-C in epoch 2, once epoch 1's checkpoint is written
        if args[5] == 1:
            raise KeyboardInterrupt
        return trained(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    code, _, err = cli("train", "--data", image_folder, "--out", tmp_path / "run", "--epochs", "2")
    assert code == 130 and err == INTERRUPTED


@pytest.mark.slow
def test_resume_of_a_folder_that_never_started_is_a_clear_error(tmp_path, image_folder, capsys):
    from deepcluster.cli import main

    code = main(["train", "--data", str(image_folder), "--out", str(tmp_path / "nothing"), "--resume",
                 "--recipe", "small"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "nothing to resume" in err and "checkpoint.pt" in err


@pytest.mark.slow
def test_resume_cleans_up_what_a_kill_can_leave(cli, image_folder, tmp_path):
    """The leftovers of kills at unlucky moments, planted by hand: temporary files of torn
    writes, assignments of an epoch the checkpoint does not hold, a duplicated and a torn log
    line."""
    run = tmp_path / "run"
    one_epoch(cli, image_folder, run)
    first = (run / "log.jsonl").read_text()
    (run / "log.jsonl").write_text(first + first + '{"epoch": 2, "train_lo')
    (run / ".checkpoint.pt.tmp-99-beef").write_bytes(b"torn")
    (run / "assignments" / ".epoch_0002.npy.tmp-99-dead").write_bytes(b"torn")
    (run / "assignments" / "epoch_0007.npy").write_bytes(b"stale")

    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume")
    assert code == 0, err
    assert "removed 2 temporary file(s)" in out
    assert temp_files(run) == []
    assert sorted(p.name for p in (run / "assignments").iterdir()) == ["epoch_0001.npy", "epoch_0002.npy", "final.npy"]
    lines = (run / "log.jsonl").read_text().splitlines()
    assert lines[0] == first.strip() and [json.loads(line)["epoch"] for line in lines] == [1, 2]
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 2 and [r["epoch"] for r in saved["records"]] == [1, 2]
    latest = np.load(run / "assignments" / "epoch_0002.npy", allow_pickle=False)
    assert np.array_equal(latest, saved["assignments"].numpy())


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_stops_and_a_killed_run_leaves_no_stale_lock(image_folder, reference,
                                                                                      tmp_path, capsys):
    from deepcluster.cli import main

    run = tmp_path / "run"
    process = train(image_folder, run, start_only=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "config.yaml").is_file():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
            time.sleep(0.002)
        for resume in ([], ["--resume"]):  # a fresh start and a resume both meet the running run
            code = main(["train", "--data", str(image_folder), "--out", str(run), *TINY, *resume])
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1, err
            assert "is being written by another deepcluster run" in err and f"(process {process.pid})" in err
        assert process.poll() is None  # the first run was not disturbed
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stdout.close()
        process.stderr.close()
    result = train(image_folder, run, resume=True)  # the kernel dropped the dead run's lock
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


@pytest.mark.slow
def test_a_run_folder_that_counted_epochs_from_0_is_renumbered_on_resume(cli, image_folder, tmp_path):
    """Runs written before epochs counted from 1 (log ``epoch: 0``, ``epoch_0000.npy``) are
    read by ``report`` from 1 and renumbered by ``--resume``, which then goes on exactly as
    an uninterrupted run."""
    from deepcluster.checkpoint import load_checkpoint, save_checkpoint
    from deepcluster.report.run_data import load_run

    code, _, err = cli("train", "--data", image_folder, "--out", tmp_path / "whole", "--epochs", "2")
    assert code == 0, err
    run = tmp_path / "old"
    one_epoch(cli, image_folder, run)
    first = (run / "assignments" / "epoch_0001.npy").read_bytes()
    (run / "assignments" / "epoch_0001.npy").rename(run / "assignments" / "epoch_0000.npy")  # as written then
    (run / "assignments" / "epoch_0001.npy").write_bytes(b"the unfinished second epoch's")
    state = load_checkpoint(run / "checkpoint.pt")
    state.pop("format_version")
    state["records"][0]["epoch"] = 0
    save_checkpoint(run / "checkpoint.pt", state)
    (run / "log.jsonl").write_text(json.dumps(state["records"][0]) + "\n")
    (run / "assignments" / "epoch_0001.npy").unlink()
    seen = load_run(run)
    assert [r["epoch"] for r in seen.records] == [1] and list(seen.assignment_files) == [1]
    (run / "assignments" / "epoch_0001.npy").write_bytes(b"the unfinished second epoch's")

    code, _, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume")
    assert code == 0, err
    names = sorted(p.name for p in (run / "assignments").iterdir())
    assert names == ["epoch_0001.npy", "epoch_0002.npy", "final.npy"]  # no journal left
    assert (run / "assignments" / "epoch_0001.npy").read_bytes() == first
    for name in names:
        assert (run / "assignments" / name).read_bytes() == (tmp_path / "whole" / "assignments" / name).read_bytes()
    assert [r["epoch"] for r in log_records(run)] == [1, 2]
    assert [r["epoch"] for r in torch.load(run / "checkpoint.pt", weights_only=True)["records"]] == [1, 2]


class Killed(Exception):
    pass


def test_renumbering_goes_on_after_an_interruption_at_any_step(tmp_path, monkeypatch):
    """``runfolder.count_from_one`` stopped before each of its writes (renames and journal
    updates), then run again from the checkpoint's records: every file ends one up."""
    from deepcluster import runfolder

    real_replace, real_write = os.replace, runfolder.atomic_write_bytes
    for stop_at in range(8):  # 3 renames + 4 journal writes, and one run without a stop
        run = tmp_path / str(stop_at)
        (run / "assignments").mkdir(parents=True)
        for epoch in range(3):
            (run / "assignments" / f"epoch_{epoch:04d}.npy").write_text(f"epoch {epoch + 1}")
        (run / "assignments" / "epoch_0003.npy").write_text("unfinished")
        steps = []

        def counted(real):
            def step(*args, **kwargs):
                if Path(args[0]).parent == run / "assignments" and not Path(args[0]).name.startswith(".."):
                    steps.append(args)
                    if len(steps) == stop_at + 1:
                        raise Killed("killed")  # a kill at this moment
                return real(*args, **kwargs)
            return step

        monkeypatch.setattr(runfolder.os, "replace", counted(real_replace))
        monkeypatch.setattr(runfolder, "atomic_write_bytes", counted(real_write))
        with pytest.raises(Killed, match="killed") if stop_at < 7 else contextlib.nullcontext():
            runfolder.count_from_one(run, [{"epoch": e} for e in range(3)])
        assert len(steps) == min(stop_at + 1, 7)
        monkeypatch.undo()
        records = [{"epoch": e} for e in range(3)]  # the checkpoint still counts from 0
        assert runfolder.count_from_one(run, records) and [r["epoch"] for r in records] == [1, 2, 3]
        files = {p.name: p.read_text() for p in (run / "assignments").glob("epoch_*.npy")}
        assert files == {f"epoch_{e:04d}.npy": f"epoch {e}" for e in (1, 2, 3)}, (stop_at, files)
