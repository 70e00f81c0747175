"""A data folder that changes between a run's start and its resume or report: the run keeps
the images it started with (``RUN/images.json``), so row i of every assignments file always
means the same image."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from deepcluster.data import FolderSource
from deepcluster.report.run_data import load_run
from conftest import one_epoch


def copy_folder(image_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    return data


def test_the_stored_list_gives_the_scan_s_order_and_labels(image_folder):
    scanned = FolderSource(image_folder)
    listed = FolderSource(image_folder, scanned.relative_files())
    assert listed.paths == scanned.paths and listed.class_names == scanned.class_names
    assert np.array_equal(listed.labels, scanned.labels)


@pytest.mark.slow
def test_resume_keeps_the_images_the_run_started_with(cli, image_folder, tmp_path):
    data, run = copy_folder(image_folder, tmp_path), tmp_path / "run"
    one_epoch(cli, data, run)
    stored = json.loads((run / "images.json").read_text())
    assert stored["n_images"] == 36 and stored["files"] == FolderSource(data).relative_files()
    missing = data / stored["files"][4]
    missing.unlink()  # one image gone, two new ones sorted in front of the others
    shutil.copy(data / stored["files"][0], data / "checkers" / "00a.png")
    shutil.copy(data / stored["files"][0], data / "rings" / "000.png")
    code, out, err = cli("train", "--data", data, "--out", run, "--epochs", "2", "--resume")
    assert code == 0, err
    assert (f"the data folder {str(data)!r} changed since the run started: 2 new image file(s) not used "
            "(a run keeps the images it started with, listed in images.json), 1 missing (left out as unreadable)"
            ) in out
    assert json.loads((run / "images.json").read_text()) == stored
    first = np.load(run / "assignments" / "epoch_0001.npy")
    second = np.load(run / "assignments" / "epoch_0002.npy")
    assert len(first) == len(second) == 36
    assert second[4] == -1 and (np.delete(second, 4) >= 0).all()  # only the missing image left out
    skipped = dict(line.split("\t") for line in (run / "skipped.tsv").read_text().splitlines()[1:])
    assert skipped == {str(missing): "cannot be opened (No such file or directory)"}
    report = load_run(run)  # the report shows the run's images, not the folder's new order
    assert report.notes == [] and report.source.paths == [str(data / name) for name in stored["files"]]


@pytest.mark.slow
def test_a_run_without_a_stored_list_refuses_a_changed_folder_and_stores_the_list_otherwise(
        cli, image_folder, tmp_path):
    data, run = copy_folder(image_folder, tmp_path), tmp_path / "run"
    one_epoch(cli, data, run)
    (run / "images.json").unlink()  # as a run written before the list existed
    extra = data / "rings" / "000.png"
    shutil.copy(data / "rings" / "01.jpg", extra)
    code, _, err = cli("train", "--data", data, "--out", run, "--epochs", "2", "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert f"the data folder {str(data)!r} now holds 37 usable images but the run was trained on 36" in err
    assert not (run / "assignments" / "epoch_0002.npy").exists()
    extra.unlink()
    code, _, err = cli("train", "--data", data, "--out", run, "--epochs", "2", "--resume")
    assert code == 0, err
    assert json.loads((run / "images.json").read_text())["files"] == FolderSource(data).relative_files()


def test_a_damaged_image_list_is_one_line(cli, image_folder, tmp_path):
    data, run = copy_folder(image_folder, tmp_path), tmp_path / "run"
    one_epoch(cli, data, run)
    (run / "images.json").write_text('{"format": 1, "n_images": 36, "files": ["a.png"]}')
    code, _, err = cli("train", "--data", data, "--out", run, "--epochs", "2", "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot read the run's image list" in err and "delete it to fall back to scanning" in err
