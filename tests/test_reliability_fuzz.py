"""Fuzzing the commands that read a finished run (``assign``, ``features``, ``eval``,
``report``, ``export``), as ``tests/test_bad_settings.py`` fuzzes ``train``: whatever the
run, folder and options, the command gets as far as its real work (stubbed here) or ends
with one line on stderr and a documented exit code; never an uncaught exception."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepcluster.cli import main


class ReachedWork(Exception):
    """Raised instead of the command's heavy work: the input was valid all the way there."""


@pytest.fixture(scope="module")
def runs(image_folder, tmp_path_factory) -> dict[str, Path]:
    """A finished run and damaged or foreign things to give in its place."""
    root = tmp_path_factory.mktemp("fuzz")
    good = root / "good"
    threads = torch.get_num_threads()
    try:
        code = main(["train", "--recipe", "small", "--data", str(image_folder), "--out", str(good), "--epochs", "1",
                     "--n_clusters", "6", "--batch_size", "8", "--feature_batch_size", "16", "--workers", "0",
                     "--pca_dim", "8", "--kmeans_iters", "5", "--feature_dim", "32", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    text = root / "notes.txt"
    text.write_text("not a run")
    (root / "empty").mkdir()
    damaged = root / "damaged"
    shutil.copytree(good, damaged)
    payload = (damaged / "checkpoint.pt").read_bytes()
    (damaged / "checkpoint.pt").write_bytes(payload[: len(payload) // 2])
    noise = root / "noise"
    shutil.copytree(good, noise)
    (noise / "checkpoint.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    np.save(noise / "assignments" / "final.npy", np.arange(3.0))
    (noise / "final.json").write_text("[1, 2")
    (noise / "log.jsonl").write_text('{"epoch": 1}\n{"epo\n{"epoch": "x"}\n')
    no_log = root / "no-log"
    shutil.copytree(good, no_log)
    (no_log / "log.jsonl").unlink()
    (no_log / "checkpoint.pt").unlink()
    return {"good": good, "checkpoint": good / "checkpoint.pt", "missing": root / "missing", "text": text,
            "empty": root / "empty", "damaged": damaged, "noise": noise, "no-log": no_log,
            "images": image_folder}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An empty working folder; each command's heavy work replaced by ``ReachedWork``."""
    import deepcluster.inference as inference
    import deepcluster.report as report
    import deepcluster.evaluation.suite as suite
    from deepcluster.checkpoint import load_backbone
    from deepcluster.report.run_data import load_run

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def reached(*args, **kwargs):
        raise ReachedWork()

    def report_stub(run_dir, out_dir=None, settings=None, command=""):
        settings.check()
        run = load_run(run_dir, settings.data)
        if run.checkpoint.is_file():
            load_backbone(run.checkpoint)  # the filters' sections read it
        raise ReachedWork()

    monkeypatch.setattr(inference, "assign_images", reached)
    monkeypatch.setattr(inference, "write_features", reached)
    monkeypatch.setattr(report, "build_report", report_stub)
    monkeypatch.setattr(suite, "evaluate_backbone", reached)
    threads = torch.get_num_threads()
    yield cwd
    torch.set_num_threads(threads)


def check_outcome(argv: list[str], capsys) -> None:
    try:
        code = main(argv)
    except ReachedWork:
        return
    except SystemExit as exit_:  # -h: argparse prints the usage and exits 0
        assert exit_.code == 0 and "usage:" in capsys.readouterr().out, argv
        return
    err = capsys.readouterr().err
    if code == 0:  # export does its work for real
        assert argv[0] == "export" and err == "", (argv, err)
        return
    assert code in (2, 3, 4, 5), (argv, code, err)
    assert err.count("\n") == 1 and err.startswith("deepcluster: error: "), (argv, err)


VALUES = st.one_of(
    st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), max_size=10),
    st.integers(-10**12, 10**12).map(str),
    st.sampled_from(["0", "1", "-1", "2", "nan", "inf", "1e400", "0.5", "", "cpu", "cuda", "cuda:7", "auto",
                     "conv1", "conv5", "fc", "body", "layer9", "1,2", "1,x", "csv", "parquet", "csv,xml", "knn",
                     "linear", "all", "none", "99999999999999999999"]))
PLACES = ["good", "checkpoint", "missing", "text", "empty", "damaged", "noise", "no-log", "images"]
COMMON = ["--device", "--batch-size", "--workers", "--threads"]
OPTIONS = {
    "assign": COMMON + ["--format"],
    "features": COMMON + ["--layer", "--pool-dim"],
    "report": COMMON + ["--epoch", "--max-clusters", "--images-per-cluster", "--thumb-size", "--layer", "--filters",
                        "--n-filters", "--top-images", "--activation-sample", "--ascent-steps", "--ascent-size",
                        "--seed"],
    "export": [],
    "eval": ["--protocols", "--probe-mode", "--probe-layers", "--probe-epochs", "--probe-lr", "--probe-batch-size",
             "--pool-dim", "--feature-layers", "--knn-k", "--knn-temperature", "--cluster-pca", "--retrieval-k",
             "--train-limit", "--val-limit", "--batch-size", "--workers", "--device", "--threads", "--baseline",
             "--layers", "--pca-widths", "--baseline-batchnorm"],
}
# Options that name a folder or file: a place, never free text (no scan of the whole disk).
PATH_OPTIONS = {"assign": ["--data", "--out"], "features": ["--data", "--out"], "report": ["--data", "--out"],
                "export": ["--out"], "eval": ["--train", "--val", "--out"]}
FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def command_line(command: str):
    """Strategy: ``command RUN`` with fuzzed options; the run and each folder option are
    mostly good ones (so that most inputs reach the options' checks), sometimes any place."""
    run = st.sampled_from(["good"] * 6 + ["checkpoint"] * 2 + PLACES + ["none"])
    options = st.lists(st.tuples(st.sampled_from(OPTIONS[command] or ["--out"]), VALUES), max_size=3)
    paths = st.tuples(*[st.sampled_from(["good"] * 8 + PLACES + ["new", "absent"]) for _ in PATH_OPTIONS[command]])
    return st.tuples(run, options, paths, st.sampled_from([0, 0, 0, 0, 0, 1]))


def argv_for(command: str, drawn, runs: dict[str, Path], cwd: Path) -> list[str]:
    run, options, places, stray = drawn
    argv = [command] + ([] if run == "none" else [str(runs[run])])
    for key, place in zip(PATH_OPTIONS[command], places):
        if place == "good":  # an image folder for what is read, a fresh folder or file for what is written
            place = "new" if key == "--out" else "images"
        if place == "new":
            argv += [key, str(cwd / ("backbone.safetensors" if command == "export" else "output"))]
        elif place != "absent":
            argv += [key, str(runs[place])]
    for key, value in options:
        argv += [key, value]
    return argv + (["--unknown-option"] if stray else [])


@pytest.mark.parametrize("command", ["assign", "features", "report", "export", "eval"])
@pytest.mark.slow
def test_fuzzed_tool_command_lines_end_in_one_line_or_reach_their_work(command, runs, sandbox, capsys):
    @FUZZ
    @given(drawn=command_line(command))
    def fuzz(drawn):
        check_outcome(argv_for(command, drawn, runs, sandbox), capsys)

    fuzz()


@pytest.mark.parametrize("place", ["text", "empty", "damaged", "noise", "missing", "no-log"])
@pytest.mark.parametrize("command", ["assign", "features", "report", "export", "eval"])
def test_each_bad_run_is_one_line_and_exit_2(command, place, runs, sandbox, capsys):
    """Every tool given each bad run, with otherwise good options."""
    extra = {"assign": ["--data", str(runs["images"]), "--out", "a"],
             "features": ["--data", str(runs["images"]), "--out", "f"], "report": [], "export": ["--out", "b.st"],
             "eval": ["--train", str(runs["images"]), "--val", str(runs["images"])]}[command]
    try:
        code = main([command, str(runs[place]), *extra])
    except ReachedWork:
        pytest.fail(f"{command} on {place} reached its work")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("deepcluster: error: "), (command, place, err)
