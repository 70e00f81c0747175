import json
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


@pytest.mark.slow
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

    with pytest.raises(SystemExit, match="^0$") as done:
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

    with pytest.raises(SystemExit, match="^0$") as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"deepcluster {__version__}\n"


@pytest.mark.slow
def test_every_command_takes_the_run_the_same_way(tiny_run, image_folder, tmp_path, capsys):
    """RUN, first on the line, is a run folder or a checkpoint file in one, in every command
    (was: eval CKPT, assign/features/export --checkpoint CKPT, report RUN_DIR)."""
    import torch

    threads = torch.get_num_threads()
    checkpoint = tiny_run / "checkpoint.pt"
    try:
        for index, run in enumerate((tiny_run, checkpoint)):
            out = tmp_path / str(index)
            assert main(["assign", str(run), "--data", str(image_folder), "--out", str(out / "a"),
                         "--format", "csv", "--threads", "1"]) == 0
            assert main(["features", str(run), "--data", str(image_folder), "--out", str(out / "f"),
                         "--threads", "1"]) == 0
            assert main(["export", str(run), "--out", str(out / "backbone.safetensors")]) == 0
            assert main(["report", str(run), "--out", str(out / "r"), "--ascent-steps", "0",
                         "--activation-sample", "36"]) == 0
            assert main(["eval", str(run), "--train", str(image_folder), "--val", str(image_folder), "--out",
                         str(out / "e"), "--protocols", "knn", "--workers", "0", "--threads", "1"]) == 0
        for name in ("a/assignments.csv", "f/features.npy"):
            assert (tmp_path / "0" / name).read_bytes() == (tmp_path / "1" / name).read_bytes(), name
        from deepcluster.models import read_backbone_metadata

        exported = [read_backbone_metadata(tmp_path / str(i) / "backbone.safetensors") for i in (0, 1)]
        assert exported[0] == exported[1] and exported[0].source == str(checkpoint.resolve())
        assert json.loads((tmp_path / "1" / "e" / "eval.json").read_text())["checkpoint"] == str(checkpoint)
        capsys.readouterr()
        empty = tmp_path / "empty"
        empty.mkdir()
        for argv, said in ((["assign", "--data", str(image_folder), "--out", str(tmp_path / "x")], "the run is missing"),
                           (["export", str(tiny_run), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")],
                            "given twice"),
                           (["features", str(empty), "--data", str(image_folder), "--out", str(tmp_path / "x")],
                            "has no checkpoint.pt"),
                           (["eval", str(tmp_path / "nowhere"), "--train", str(image_folder), "--val",
                             str(image_folder)], "does not exist")):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and said in err, err
    finally:
        torch.set_num_threads(threads)
