"""``assign --into DIR``: the images sorted into one folder per cluster (links, or copies)."""

from __future__ import annotations

import csv
import os
import shutil

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_the_training_folder_sorted_into_linked_cluster_folders(tiny_run, image_folder, tmp_path, run_cli):
    into, run = tmp_path / "sorted", tmp_path / "run"
    shutil.copytree(tiny_run, run)  # the run folder remembers the sorting
    code, out, err = run_cli("assign", run, "--data", image_folder, "--into", into, "--format", "csv")
    assert code == 0, err
    table = rows(into / "assignments.csv")
    assert len(table) == 36
    for row in table:
        relative = os.path.relpath(row["path"], image_folder)
        link = into / f"cluster_{int(row['cluster']):04d}" / relative
        assert link.is_symlink() and os.path.samefile(link, row["path"])
    folders = sorted(p.name for p in into.iterdir() if p.is_dir())
    assert folders == sorted({f"cluster_{int(r['cluster']):04d}" for r in table})
    assert f"sorted into {into}: 36 images linked into {len(folders)} cluster folders" in out
    # the run remembers it, and its report page says where
    code, out, err = run_cli("report", run, "--out", tmp_path / "page", "--ascent-steps", "0",
                             "--activation-sample", "8", "--threads", "1")
    assert code == 0, err
    assert f"<td>sorted into</td><td>{into} (" in (tmp_path / "page" / "index.html").read_text().replace("\n", "")


@pytest.mark.slow
def test_copies_and_unreadable_files(tiny_run, image_folder, tmp_path, run_cli):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "rings" / "broken.jpg").write_text("not an image")
    into = tmp_path / "copies"
    shutil.copytree(tiny_run, tmp_path / "run")
    code, out, err = run_cli("assign", tmp_path / "run", "--data", data, "--into", into, "--copy", "--out",
                             tmp_path / "tables", "--format", "csv")
    assert code == 0, err
    # each count said once: the files found first, the placed and unreadable ones at the end
    assert "37 image files," in out and "36 images placed" in out and ", 1 unreadable (" in out
    assert (into / "unreadable" / "rings" / "broken.jpg").read_text() == "not an image"
    assert not (into / "unreadable" / "rings" / "broken.jpg").is_symlink()
    problem = [r for r in rows(tmp_path / "tables" / "assignments.csv") if r["path"].endswith("broken.jpg")]
    assert problem[0]["cluster"] == "-1" and problem[0]["problem"]
    assert not (into / "assignments.csv").exists()  # the tables went to --out


def test_names_that_are_not_utf8_are_linked_as_they_are(tmp_path):
    import numpy as np

    from deepcluster.sorting import check_into, sort_into_folders

    root = tmp_path / "data"
    root.mkdir()
    odd = os.fsencode(str(root)) + b"/caf\xe9.png"
    with open(odd, "wb") as handle:
        handle.write(b"pixels")
    name = os.fsdecode(b"caf\xe9.png")  # as a folder listing gives it (surrogate escapes)
    done = sort_into_folders(check_into(tmp_path / "out"), root, [name, "gone.png"], np.array([3, -1]))
    assert (done.placed, done.unreadable, done.clusters) == (1, 1, 1)
    link = os.fsencode(str(tmp_path / "out" / "cluster_0003")) + b"/caf\xe9.png"
    assert os.path.islink(link) and open(link, "rb").read() == b"pixels"
    assert os.path.islink(tmp_path / "out" / "unreadable" / "gone.png")


@pytest.mark.slow
def test_a_full_into_folder_is_refused_and_a_failed_command_leaves_no_empty_folder(tiny_run, image_folder,
                                                                                     tmp_path, run_cli):
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("x")
    code, _, err = run_cli("assign", tiny_run, "--data", image_folder, "--into", full)  # fails before writing
    assert code == 2 and "is not empty" in err and err.count("\n") == 1
    code, _, err = run_cli("assign", tiny_run, "--data", image_folder, "--copy", "--out", tmp_path / "o")
    assert code == 2 and "--copy applies to --into" in err
    code, _, err = run_cli("features", tiny_run, "--data", image_folder, "--out", tmp_path / "f", "--layer", "conv9")
    assert code == 2 and "unknown layer 'conv9'" in err and not (tmp_path / "f").exists()
    code, _, err = run_cli("report", tiny_run, "--out", tmp_path / "r", "--epoch", "7")
    assert code == 2 and not (tmp_path / "r").exists()
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, _, err = run_cli("report", run, "--epoch", "7")
    assert code == 2 and not (run / "report").exists()
