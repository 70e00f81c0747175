"""Reliability of a run's life: the final clustering's files, restarts right after a kill,
a kill during start-up, paths typed relatively, a full disk at start, absurd pass counts and
the words said when a run is interrupted."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from conftest import TINY_TRAIN
from deepcluster.cli import EXIT_WRITE
from deepcluster.faults import ENV_VAR
from deepcluster.memory import PEAK_KEYS

TIMINGS = ("time_features", "time_clustering", "time_pca", "time_kmeans", "time_monitor", *PEAK_KEYS)


def subprocess_train(*args: str, fault: str | None = None, cwd: Path | None = None,
                     **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    if fault:
        env[ENV_VAR] = fault
    command = [sys.executable, "-m", "deepcluster", "train", *TINY_TRAIN, *map(str, args)]
    kwargs = {"capture_output": True, **kwargs}
    return subprocess.run(command, env=env, text=True, timeout=300, cwd=cwd, **kwargs)


def without_timings(path: Path) -> dict:
    return {key: value for key, value in json.loads(path.read_text()).items() if key not in TIMINGS}


@pytest.fixture(scope="module")
def finished(image_folder, tmp_path_factory) -> Path:
    """A finished two-epoch run with its final clustering."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = subprocess_train("--data", image_folder, "--out", out, "--epochs", "2")
    assert result.returncode == 0, result.stderr
    return out


# -- item: the final clustering's summary --------------------------------------------------

@pytest.mark.slow
def test_a_lost_final_json_is_made_again_by_resume(finished, cli, image_folder, tmp_path):
    """Was: ``--resume`` said "nothing left to train" and exited 0 without ``final.json``."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "final.json").unlink()
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume")
    assert code == 0, err
    assert without_timings(run / "final.json") == without_timings(finished / "final.json")
    assert (run / "assignments" / "final.npy").read_bytes() == (finished / "assignments" / "final.npy").read_bytes()


def _renames(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if "rename" in line and "= 0" in line)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_kernel_kill_at_the_last_renames_loses_no_file_of_the_final_clustering(finished, image_folder, tmp_path):
    """A real ``SIGKILL`` from the kernel (``strace`` fault injection) at each of the last
    three renames of a run (final.npy, final.json, the checkpoint holding the final
    clustering); ``--resume`` then gives every file of the uninterrupted run. Was: a kill at
    ``final.json``'s rename lost it for good."""
    trace = tmp_path / "renames.log"
    reference = tmp_path / "reference"
    result = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=rename,renameat,renameat2",
                             sys.executable, "-m", "deepcluster", "train", *TINY_TRAIN, "--data", str(image_folder),
                             "--out", str(reference), "--epochs", "2"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    total = _renames(trace)
    for when in (total - 2, total - 1, total):
        run = tmp_path / f"killed-{when}"
        killed = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=rename,renameat,renameat2",
                                 "-e", f"inject=rename,renameat,renameat2:signal=SIGKILL:when={when}",
                                 sys.executable, "-m", "deepcluster", "train", *TINY_TRAIN, "--data",
                                 str(image_folder), "--out", str(run), "--epochs", "2"],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                                timeout=300)
        assert killed.returncode != 0, when
        resumed = subprocess_train("--data", image_folder, "--out", run, "--epochs", "2", "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert without_timings(run / "final.json") == without_timings(reference / "final.json"), when
        for name in ("final.npy", "epoch_0001.npy", "epoch_0002.npy"):
            assert (run / "assignments" / name).read_bytes() == (reference / "assignments" / name).read_bytes()


# -- item: restarting at once ----------------------------------------------------------------

@pytest.mark.slow
def test_resume_right_after_a_kill_with_loader_workers_finds_the_folder_free(image_folder, tmp_path):
    """Was: the forked loader workers inherited the ``flock`` and held it for seconds after
    the run was killed: ``--resume`` said the folder was being written by the dead process."""
    from deepcluster.runfolder import lock

    run = tmp_path / "run"
    with open(tmp_path / "killed.out", "w") as out:  # not a pipe: the orphaned workers would hold it open
        killed = subprocess_train("--data", image_folder, "--out", run, "--epochs", "2", "--workers", "2",
                                  fault="kill:training:7", capture_output=False, stdout=out, stderr=out)
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "killed.out").read_text()
    with lock(run):  # at once: the dead run's workers may still be alive, the folder is free
        pass
    resumed = subprocess_train("--data", image_folder, "--out", run, "--epochs", "2", "--workers", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr


def test_resume_of_a_run_killed_before_it_saved_its_settings_starts_it(cli, image_folder, tmp_path):
    """A kill during start-up leaves the folder and its ``.lock`` only. Was: ``--resume``
    refused it ("nothing to resume"), so a scheduler that reruns with ``--resume`` failed."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("12345\n")
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--resume")
    assert code == 0, err
    assert "starting it from the beginning" in out
    assert (run / "checkpoint.pt").is_file() and (run / "config.yaml").is_file()


@pytest.mark.slow
def test_resume_of_a_run_killed_before_it_took_its_lock_starts_it(cli, image_folder, tmp_path):
    """A kill between the folder's creation and its ``.lock`` (a window torchrun's start-up
    widens) leaves an empty folder. Was: ``--resume`` refused it ("nothing to resume")."""
    run = tmp_path / "run"
    run.mkdir()
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--resume")
    assert code == 0, err
    assert "starting it from the beginning" in out
    assert (run / "checkpoint.pt").is_file() and (run / "config.yaml").is_file()


def test_resume_of_a_folder_that_does_not_exist_is_still_refused(cli, image_folder, tmp_path):
    code, _, err = cli("train", "--data", image_folder, "--out", tmp_path / "typo", "--resume")
    assert code == 2 and "nothing to resume" in err


# -- item: paths as typed ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_started_with_a_relative_data_folder_works_from_anywhere(cli, run_cli, image_folder, tmp_path,
                                                                        monkeypatch):
    """Was: ``data`` stored as typed: ``--resume`` from another folder failed, the same
    folder given absolutely was "different settings", and ``report`` from elsewhere exited
    0 with an empty page."""
    start = tmp_path / "start"
    start.mkdir()
    shutil.copytree(image_folder, start / "images")
    monkeypatch.chdir(start)
    code, _, err = cli("train", "--data", "images", "--out", tmp_path / "run", "--epochs", "1")
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = cli("train", "--out", tmp_path / "run", "--epochs", "2", "--resume")
    assert code == 0, err
    code, _, err = cli("train", "--out", tmp_path / "run", "--data", start / "images", "--epochs", "3", "--resume")
    assert code == 0, err
    code, out, err = run_cli("report", str(tmp_path / "run"), "--activation-sample", "8", "--ascent-steps", "0",
                             "--n-filters", "2")
    assert code == 0, err
    assert " 0 clusters" not in out and " 0 images" not in out


@pytest.mark.slow
def test_report_refuses_to_call_a_page_without_images_a_success(finished, run_cli, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text("\n".join("data: /no/longer/here" if line.startswith("data:") else line
                                               for line in text.splitlines()) + "\n")
    code, out, err = run_cli("report", str(run), "--activation-sample", "8", "--ascent-steps", "0", "--n-filters", "2")
    assert code == 2 and err.count("\n") == 1, err
    assert "shows no clusters or images" in err and "/no/longer/here" in err


# -- item: a full disk at start ---------------------------------------------------------------

def test_a_full_disk_when_taking_the_lock_is_exit_4_and_leaves_nothing(cli, image_folder, tmp_path, monkeypatch):
    """Was: an ``OSError`` traceback from the lock code and an empty ``.lock`` left behind."""
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    run = tmp_path / "new" / "run"
    code, out, err = cli("train", "--data", image_folder, "--out", run)
    assert code == EXIT_WRITE and err.count("\n") == 1 and "Traceback" not in err
    assert "No space left on device (ENOSPC)" in err
    assert not run.exists()


@pytest.mark.slow
def test_a_real_file_size_limit_at_start_is_exit_4_and_leaves_no_lock(image_folder, tmp_path):
    """The kernel refuses the lock file's first byte (``RLIMIT_FSIZE`` 0: ``EFBIG``, as a
    full disk refuses with ``ENOSPC``)."""
    run = tmp_path / "run"
    run.mkdir()

    def no_file_growth():
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    result = subprocess_train("--data", image_folder, "--out", run, preexec_fn=no_file_growth)
    assert result.returncode == EXIT_WRITE, result.stderr
    assert result.stderr.count("\n") == 1 and "File too large (EFBIG)" in result.stderr
    assert list(run.iterdir()) == []


# -- item: absurd pass counts -----------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("epochs", "1e9"), ("warmup_epochs", "1000000"), ("kmeans_iters", "1e8")])
def test_absurd_pass_counts_are_refused_before_a_run_folder_exists(key, value, cli, image_folder, tmp_path):
    """Was: ``--epochs 1e9`` accepted, then "out of memory (425 GiB ...)" after the run
    folder was made."""
    run = tmp_path / "run"
    code, out, err = cli("train", "--data", image_folder, "--out", run, f"--{key}", value)
    assert code == 2 and err.count("\n") == 1 and f"setting '{key}' must be at most 100,000" in err
    assert not run.exists()


def test_an_epochs_learning_rates_take_memory_of_one_epoch_only():
    from deepcluster.config import Config
    from deepcluster.optim import epoch_learning_rates

    config = Config(epochs=100_000, lr=0.1, final_lr=0.001, warmup_epochs=10)
    tracemalloc.start()
    try:
        rates = epoch_learning_rates(config, 1000, 50_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rates.shape == (1000,) and peak < 1 << 20  # the whole schedule: 800 MB


# -- item: the words of an interruption -------------------------------------------------------

def test_an_interruption_before_the_first_checkpoint_says_there_is_none(cli, image_folder, tmp_path, monkeypatch):
    """Was: "the last completed epoch's checkpoint is kept" when none had been written."""
    from deepcluster import train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    code, _, err = cli("train", "--data", image_folder, "--out", tmp_path / "run")
    assert code == 130 and err.count("\n") == 1
    assert "no checkpoint yet" in err and "is kept" not in err


@pytest.mark.slow
def test_torch_warnings_about_loader_workers_do_not_surround_the_error(image_folder, tmp_path):
    """More loader workers than cores: torch warns once per loader and process. Was: those
    lines printed around the one-line error."""
    workers = str((os.cpu_count() or 1) + 2)
    result = subprocess_train("--data", image_folder, "--out", tmp_path / "run", "--workers", workers,
                              fault="ENOSPC:checkpoint:1")
    assert result.returncode == EXIT_WRITE
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("deepcluster: error: cannot write"), \
        result.stderr


def test_checkpoint_torch_load_warning_is_silenced(tmp_path, capsys):
    from deepcluster.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x80\x05\x95" + b"x" * 64)  # looks like pickle protocol 5
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="cannot be loaded safely: it is truncated, corrupt") as error:
            load_checkpoint(path)
    assert not [w for w in caught if "pickle protocol" in str(w.message)]
    assert "In PyTorch 2.6" not in str(error.value)


def test_long_messages_are_cut_at_a_word_and_never_span_lines():
    from deepcluster.messages import MAX_MESSAGE, one_line

    text = "word " * 500 + "\nsecond line"
    line = one_line(text)
    assert "\n" not in line and len(line) <= MAX_MESSAGE + 4 and line.endswith("word ...")
    assert one_line("short\nmessage") == "short message"
