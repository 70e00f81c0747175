import subprocess
import sys

import pytest

from deepcluster.cli import main, parse_overrides


def test_parse_overrides_accepts_both_forms():
    assert parse_overrides(["--n-clusters", "5", "--sobel=false"]) == {"n_clusters": "5", "sobel": "false"}


@pytest.mark.parametrize("argv, message", [
    (["train", "--n-clusters"], "needs a value"),
    (["train", "--n_clusterz", "3"], "unknown setting --n_clusterz (did you mean --n_clusters?)"),
    (["train", "--dry-run"], "unknown setting --dry-run; deepcluster train --help lists them all"),
    (["train", "--output", "x"], "unknown setting --output (did you mean --out?)"),
    (["train", "--lr", "0"], "setting 'lr' must be a positive number"),
    (["train", "--data", "/no/such/folder"], "does not exist"),
    (["train", "--recipe", "nope"], "invalid choice"),
    (["train", "stray"], "unexpected argument 'stray'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    code = main(argv + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_train_on_a_folder_from_the_command_line(image_folder, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "deepcluster", "train", "--recipe", "small", "--data", str(image_folder),
            "--out", str(out), "--epochs", "1", "--n_clusters", "4", "--workers", "0", "--pca_dim", "8",
            "--feature_dim", "32", "--batch_size", "12"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "epoch   1/1" in result.stdout and "nmi" in result.stdout
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr


def test_train_help_lists_every_setting_from_the_config_itself(capsys):
    import dataclasses

    from deepcluster.config import Config

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for item in dataclasses.fields(Config):
        advice = item.metadata.get("help", "")
        assert advice, f"Config.{item.name} has no metadata['help']"
        name = "--out" if item.name == "out_dir" else f"--{item.name}"
        assert f"{name} " in text and " ".join(advice.split()) in text, item.name
    assert "--n_clusters 10000 k of k-means" in text and "--threads none torch CPU threads" in text


def test_version(capsys):
    from deepcluster import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"deepcluster {__version__}\n"
