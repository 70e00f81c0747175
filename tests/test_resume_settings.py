"""`train --out RUN --resume` continues RUN with the settings it saved when it started."""

import json

import pytest
import torch
import yaml

from deepcluster.cli import main
from conftest import one_epoch


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def plain_main(capsys, *args) -> tuple[int, str, str]:
    """``deepcluster ARGS`` as a user types it (no test settings added)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_resume_as_the_readme_shows_it_takes_the_run_settings(cli, image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    one_epoch(cli, image_folder, run)
    saved = (run / "config.yaml").read_text()

    code, out, err = plain_main(capsys, "train", "--out", run, "--resume", "--epochs", "2")
    assert code == 0, err
    assert "resuming after epoch 1" in out and "epoch   2/2" in out
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2
    settings = yaml.safe_load((run / "config.yaml").read_text())
    assert settings == {**yaml.safe_load(saved), "epochs": 2}  # the small recipe, k = 6, the image folder

    # The older spelling still works.
    code, _, err = plain_main(capsys, "train", "--config", run / "config.yaml", "--out", run, "--resume",
                              "--epochs", "2")
    assert code == 0, err


def test_resume_refuses_an_explicit_setting_that_would_change_the_run(cli, image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    checkpoint = one_epoch(cli, image_folder, run)
    for args, named in ((["--lr", "0.1"], "lr: 0.05 -> 0.1"), (["--recipe", "digits"], "n_clusters: 6 -> 50"),
                        (["--data", tmp_path], "data: ")):
        code, _, err = plain_main(capsys, "train", "--out", run, "--resume", "--epochs", "2", *args)
        assert code == 2 and err.count("\n") == 1, err
        assert "cannot resume with different settings" in err and named in err and "epochs" in err
    assert (run / "checkpoint.pt").read_bytes() == checkpoint


@pytest.mark.slow
def test_a_run_stopped_in_its_first_epoch_restarts_with_its_own_settings(cli, image_folder, tmp_path, capsys):
    """Was: the default recipe, i.e. a digits run trained in that folder."""
    run = tmp_path / "run"
    code, _, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "2", fault="ENOSPC:checkpoint:1")
    assert code == 4 and not (run / "checkpoint.pt").exists() and (run / "config.yaml").is_file()

    code, out, err = plain_main(capsys, "train", "--out", run, "--resume")
    assert code == 0, err
    assert "starting from the beginning" in out and "36 image files" in out
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["config"]["data"] == str(image_folder)
    assert saved["config"]["n_clusters"] == 6 and saved["config"]["arch"] == "smallnet"


def test_resume_without_a_run_is_one_line(tmp_path, capsys):
    code, _, err = plain_main(capsys, "train", "--out", tmp_path / "empty", "--resume")
    assert code == 2 and err.count("\n") == 1 and "nothing to resume" in err
