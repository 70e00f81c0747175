"""Bad settings: every invalid value is one line on stderr naming the setting and what is
allowed, exit code 2, no traceback; the command line and YAML files are fuzzed."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepcluster.cli import main
from deepcluster.config import FIELDS, RECIPES, validate
from deepcluster.methods.registry import METHODS
from deepcluster.models import ARCHITECTURES, create_model
from conftest import one_epoch


@pytest.mark.parametrize("args, message", [
    (["--n_clusters", "1"], "setting 'n_clusters' must be at least 2, got 1"),
    (["--n_clusters", "37"], "setting 'n_clusters' is 37 but the data has only 36 images; choose at most 36"),
    (["--lr", "0"], "setting 'lr' must be a positive number, got 0.0"),
    (["--lr", "-0.1"], "setting 'lr' must be a positive number"),
    (["--lr", "nan"], "setting 'lr' must be a finite number, got 'nan'"),
    (["--head_lr", "inf"], "setting 'head_lr' must be a finite number, got 'inf'"),
    (["--batch_size", "0"], "setting 'batch_size' must be a positive integer, got 0"),
    (["--batch-size", "-8"], "setting 'batch_size' must be a positive integer, got -8"),
    (["--batch_size", "2.5"], "setting 'batch_size' must be an integer, got '2.5'"),
    (["--batch_size", "1e12"], "setting 'batch_size' must be at most 2147483647"),
    (["--data", "/no/such/folder"], "data folder '/no/such/folder' does not exist"),
    (["--arch", "resnet34"], "setting 'arch' is 'resnet34'; choose one of: alexnet, vgg16, smallnet, resnet18, resnet50"),
    (["--n_cluster", "5"], "unknown setting --n_cluster (did you mean --n_clusters?)"),
    (["--crop", "8"], "setting 'crop' must be at least 16 for arch 'smallnet', got 8"),
    (["--crop", "4000"], "setting 'crop' must be at most 1024 pixels, got 4000"),
    (["--resize", "100000"], "setting 'resize' must be at most 1024 pixels, got 100000"),
    (["--device", "cuda:x"], "setting 'device' is 'cuda:x'; choose auto, cpu, cuda or cuda:N"),
    (["--seed", "-1"], "setting 'seed' must be a non-negative integer, got -1"),
    (["--threads", "100000"], "setting 'threads' must be between 1 and 1024 (or none), got 100000"),
    (["--mean", "0.5,nan,0.5"], "setting 'mean' must be three comma-separated finite numbers"),
    (["--momentum", "1"], "setting 'momentum' must be in [0, 1), got 1.0"),
    (["--sobel", "maybe"], "setting 'sobel' must be true or false, got 'maybe'"),
    (["--out", ""], "setting 'out_dir' must be a folder path, got ''"),
    (["--recipe", "huge"], "argument --recipe: invalid choice: 'huge'"),
    (["--n_clusters"], "setting --n_clusters needs a value"),
], ids=lambda value: value if isinstance(value, str) and len(value) < 30 else None)
def test_each_invalid_setting_is_one_line_naming_it(args, message, cli, image_folder, tmp_path):
    code, out, err = cli("train", "--data", image_folder, "--out", tmp_path / "run", *args)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("deepcluster: error: ") and message in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("command", ["train", "assign", "features", "eval", "report"])
@pytest.mark.slow
def test_out_naming_a_file_is_one_line_and_exit_2(command, cli, tiny_run, image_folder, tmp_path):
    """Was: "cannot write the run file '.../afile.txt/.lock': File exists", exit 4."""
    afile = tmp_path / "afile.txt"
    afile.write_text("notes")
    args = {"train": ["--data", image_folder],
            "assign": ["--checkpoint", tiny_run / "checkpoint.pt", "--data", image_folder],
            "features": ["--checkpoint", tiny_run / "checkpoint.pt", "--data", image_folder],
            "eval": [tiny_run / "checkpoint.pt", "--train", image_folder, "--val", image_folder],
            "report": [tiny_run]}[command]
    for out, said in ((afile, "is a file"), (afile / "run", "lies inside")):
        code, _, err = cli(command, *args, "--out", out)
        assert code == 2 and err.count("\n") == 1 and f"--out '{out}' {said}" in err, err
    assert afile.read_text() == "notes"


@pytest.mark.parametrize("content, message", [
    ("n_clusters: [1, 2\n", "is not valid YAML at line 2"),
    ("- a\n- list\n", "must be a mapping of setting: value"),
    ("n_clusterz: 10\n", "unknown setting 'n_clusterz' (did you mean 'n_clusters'?)"),
    ("recipe: [small]\n", "unknown recipe ['small']"),
    ("seed: 2024-13-45\n", "holds a value YAML cannot read"),
    ("lr: .nan\n", "setting 'lr' must be a finite number"),
    ("mean: {r: 1}\n", "setting 'mean' must be three comma-separated finite numbers"),
    (b"\xff\xfe\x00binary", "is not UTF-8 text"),
], ids=["unclosed", "list", "unknown-key", "recipe-list", "bad-date", "nan", "mapping", "binary"])
def test_a_bad_config_file_is_one_line(content, message, cli, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = cli("train", "--config", path, "--out", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_missing_or_unreadable_config_file_is_one_line(cli, tmp_path):
    code, out, err = cli("train", "--config", tmp_path / "missing.yaml", "--out", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and "cannot read config file" in err
    code, out, err = cli("train", "--config", tmp_path, "--out", tmp_path / "run")  # a folder
    assert code == 2 and err.count("\n") == 1 and "cannot read config file" in err


def test_resuming_with_another_architecture_is_refused(cli, image_folder, tmp_path):
    run = tmp_path / "run"
    before = one_epoch(cli, image_folder, run)
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume",
                         "--arch", "vgg16")
    assert code == 2 and err.count("\n") == 1
    assert "cannot resume with different settings (arch: 'smallnet' -> 'vgg16')" in err
    assert "may change" in err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_a_malformed_fault_plan_is_a_setting_error(cli, tmp_path):
    code, out, err = cli("train", "--out", tmp_path / "run", fault="explode:everywhere:soon")
    assert code == 2 and err.count("\n") == 1 and "DEEPCLUSTER_FAULT='explode:everywhere:soon'" in err


@pytest.mark.parametrize("arch", [pytest.param(name, marks=pytest.mark.slow) if name == "vgg16" else name
                                  for name in sorted(ARCHITECTURES)])
def test_min_crop_is_the_smallest_input_each_architecture_takes(arch):
    fixed_width = bool(ARCHITECTURES[arch].stems)  # a ResNet's pooled features keep their width
    model = create_model(arch, feature_dim=None if fixed_width else 8).eval()
    smallest = ARCHITECTURES[arch].min_crop
    with torch.no_grad():
        width = model.feature_dim if fixed_width else 8
        assert model.forward_features(torch.zeros(1, 3, smallest, smallest)).shape == (1, width)
        with pytest.raises(RuntimeError, match=r"(input|output) size"):
            model.forward_features(torch.zeros(1, 3, smallest - 1, smallest - 1))


# -- fuzzing: whatever the input, exit 2 with one line, or a valid configuration that would
# train (the stub below stops it there); never an uncaught exception.

class ReachedTraining(Exception):
    """Raised instead of building the network: the input was valid all the way to training."""


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Run in an empty folder with the network build stubbed out; restores torch threads."""
    cwd = tmp_path / "sandbox" / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)

    def stop(config, device):
        raise ReachedTraining(config)

    # the network is built in startup.set_up, through the method's build
    for name, method in METHODS.items():
        monkeypatch.setitem(METHODS, name, dataclasses.replace(method, build=stop))
    threads = torch.get_num_threads()
    yield cwd
    torch.set_num_threads(threads)


def check_outcome(argv: list[str], capsys) -> None:
    try:
        code = main(argv)
    except ReachedTraining as reached:
        validate(reached.args[0])  # a configuration that got through is a valid one
        return
    except SystemExit as exit_:  # --help / -h: argparse prints the usage and exits 0
        assert exit_.code == 0 and "usage:" in capsys.readouterr().out, argv
        return
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert err.count("\n") == 1 and err.startswith("deepcluster: error: "), (argv, err)


# No "/" in free text: a fuzzed --data must not send the scan through the whole disk.
TEXT = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), max_size=12)
VALUES = st.one_of(
    TEXT, st.integers(-10**20, 10**20).map(str), st.floats().map(repr),
    st.sampled_from(["0", "1", "2", "-1", "nan", "inf", "-inf", "1e400", "0.5", "true", "no", "none", "null", "",
                     "cuda", "cuda:0", "cuda:x", "cpu", "auto", "pic", "kmeans", "torch", "kmeans++", "bf16",
                     "1,2,3", "1,2", "alexnet", "vgg16", "smallnet", "small", "digits", "paper", ".", ".."]))
KEYS = st.sampled_from([f"--{key}" for key in FIELDS] + [f"--{key.replace('_', '-')}" for key in FIELDS]
                       + ["--recipe", "--config", "--data", "--out"])
PAIR = st.tuples(KEYS, VALUES).map(list)  # --key value: mostly, so that most inputs reach validation
JOINED = st.builds("{}={}".format, KEYS, VALUES).map(lambda token: [token])
STRAY = st.one_of(KEYS, VALUES, st.sampled_from(["--", "-x", "-h", "train", "eval", "--resume=1"])).map(
    lambda token: [token])
TOKENS = st.tuples(st.lists(st.one_of(PAIR, PAIR, JOINED, st.just(["--resume"])), max_size=5),
                   st.sampled_from([0, 0, 0, 1]), STRAY).map(
    lambda parts: sum(parts[0], []) + (parts[2] if parts[1] else []))  # a stray token one time in four
FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(tokens=TOKENS)
@pytest.mark.slow
def test_fuzzed_command_lines_end_in_exit_2_or_a_valid_config(tokens, sandbox, capsys):
    check_outcome(["train", *tokens, "--out", "fuzz-run"], capsys)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), TEXT)
YAML_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)
SETTING_NAMES = st.sampled_from(sorted(FIELDS) + ["recipe"])
YAML_KEYS = st.one_of(SETTING_NAMES, SETTING_NAMES, SETTING_NAMES, TEXT)
YAML_VALUES = st.one_of(SCALARS, SCALARS, VALUES, YAML_VALUES)  # flat values reach validation more often
YAML_MAPPINGS = st.dictionaries(YAML_KEYS, YAML_VALUES, max_size=5).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
RAW_YAML = st.lists(st.one_of(YAML_KEYS.map(lambda k: f"{k}: "), TEXT, st.sampled_from(
    ["\n", ": ", "- ", "[", "]", "{", "}", "&a ", "*a", "!!python/object:os.system ", "? ", "'", '"', "#",
     "recipe: ", "2024-13-45", "!!binary ", "--- ", "... ", "%YAML 1.1\n", "\t"])), max_size=12).map("".join)
# Three mappings of settings (which reach validation) for one raw text (which tests the parser).
YAML_TEXT = st.tuples(st.sampled_from([0, 0, 0, 1]), YAML_MAPPINGS, RAW_YAML).map(lambda t: t[1 + t[0]])


@FUZZ
@given(text=YAML_TEXT, recipe=st.sampled_from([None, *RECIPES]))
@pytest.mark.slow
def test_fuzzed_config_files_end_in_exit_2_or_a_valid_config(text, recipe, sandbox, capsys):
    path = sandbox / "fuzz.yaml"
    path.write_text(text)
    argv = ["train", "--config", str(path), "--out", "fuzz-run"] + (["--recipe", recipe] if recipe else [])
    check_outcome(argv, capsys)
    assert not os.path.exists("code-ran")  # "!!python/object" tags are refused by safe_load
