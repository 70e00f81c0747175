"""`deepcluster assign`: new images into the saved clusters, through the run's own pipeline."""

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from deepcluster import train
from deepcluster.checkpoint import load_checkpoint, save_checkpoint
from deepcluster.cli import main
from deepcluster.checkpoint import load_backbone
from deepcluster.clustering import l2_normalize, predict
from deepcluster.config import resolve
from deepcluster.data import FolderSource
from deepcluster.features import compute_features
from deepcluster.inference import assign_images, load_cluster_model


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_assign_on_the_training_images_reproduces_the_final_clustering_exactly(tiny_run, image_folder, tmp_path,
                                                                               capsys):
    assert main(["assign", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--data", str(image_folder),
                 "--out", str(tmp_path), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "the final clustering (after epoch 2)" in out and "100.00% get the cluster of assignments/final.npy" in out
    clusters = np.array([int(r["cluster"]) for r in read_csv(tmp_path / "assignments.csv")])
    assert np.array_equal(clusters, np.load(tiny_run / "assignments" / "final.npy"))
    final = load_checkpoint(tiny_run / "checkpoint.pt")["final"]
    assert final["epoch"] == 2 and np.array_equal(final["assignments"].numpy(), clusters)


@pytest.mark.slow
def test_with_the_clustering_weights_the_last_epoch_clustering_is_reproduced_exactly(image_folder, tmp_path,
                                                                                      monkeypatch):
    """Without a final clustering, assign uses the last epoch's. Skip the training stage, so
    the saved weights are those that clustering saw: then the features -> saved PCA -> L2 ->
    nearest saved centroid pipeline must give back the run's own assignments, image for image."""
    monkeypatch.setattr(train, "train_one_epoch", lambda model, *args, **kwargs: (0.0, 36))
    config = resolve("small", overrides={"data": str(image_folder), "out_dir": str(tmp_path / "run"), "epochs": 1,
                                         "n_clusters": 6, "workers": 0, "pca_dim": 8, "kmeans_iters": 5,
                                         "feature_dim": 32, "feature_batch_size": 16, "final_clustering": False})
    train.run(config, log=lambda _: None)
    code = main(["assign", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--data", str(image_folder),
                 "--out", str(tmp_path / "out")])
    assert code == 0
    rows = read_csv(tmp_path / "out" / "assignments.csv")
    expected = np.load(tmp_path / "run" / "assignments" / "epoch_0001.npy")
    assert [r["path"] for r in rows] == FolderSource(image_folder).paths
    assert np.array_equal(np.array([int(r["cluster"]) for r in rows]), expected)
    distances = np.array([float(r["distance"]) for r in rows])
    assert np.all((distances >= 0) & (distances <= 2.0001))
    assert not load_cluster_model(tmp_path / "run" / "checkpoint.pt").final

    # A finished run without a final clustering gets one from a resume with nothing left to train.
    lines = []
    assert train.run(dataclasses.replace(config, final_clustering=True), resume=True, log=lines.append) == []
    assert lines[-1].startswith("final clustering") and (tmp_path / "run" / "assignments" / "final.npy").is_file()
    assert load_cluster_model(tmp_path / "run" / "checkpoint.pt").final


@pytest.mark.slow
def test_assign_equals_the_pipeline_written_out_and_parquet_equals_csv(tiny_run, image_folder, tmp_path, capsys):
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet", reason="pyarrow (Parquet output) is not installed")
    checkpoint = tiny_run / "checkpoint.pt"
    assert main(["assign", "--checkpoint", str(checkpoint), "--data", str(image_folder), "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "get the cluster of assignments/final.npy" in out  # same folder as training: agreement reported
    rows = read_csv(tmp_path / "assignments.csv")
    table = pyarrow_parquet.read_table(tmp_path / "assignments.parquet").to_pydict()
    assert table["path"] == [r["path"] for r in rows] and table["cluster"] == [int(r["cluster"]) for r in rows]
    assert np.allclose(table["distance"], [float(r["distance"]) for r in rows], atol=1e-6)
    assert table["class"] == [r["class"] for r in rows] and set(table["class"]) == {"stripes", "rings", "checkers"}

    # The same steps by hand, from the library: features of the final weights, saved PCA, L2, nearest centroid.
    model, config = load_backbone(checkpoint)
    saved = load_checkpoint(checkpoint)["final"]
    features, ok, _ = compute_features(model.to(memory_format=torch.channels_last), FolderSource(image_folder),
                                          config, torch.device("cpu"))
    mean, projection = saved["pca_mean"].numpy(), saved["pca_projection"].numpy()
    points = (features - mean.astype(np.float32)) @ projection.astype(np.float32)
    by_hand = predict(l2_normalize(points), saved["centroids"].numpy(), backend="faiss")
    assert ok.all() and np.array_equal(by_hand, table["cluster"])


@pytest.mark.slow
def test_new_images_without_classes_and_an_unreadable_one(tiny_run, image_folder, tmp_path):
    folder = tmp_path / "new"
    (folder / "deep" / "er").mkdir(parents=True)
    for i, path in enumerate(sorted(image_folder.rglob("*.png"))[:4]):
        shutil.copy(path, folder / ("deep/er" if i % 2 else "") / f"new{i}.png")
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "broken.jpg", quality=95)
    payload = (folder / "broken.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(payload[: len(payload) // 2])  # header fine, pixels truncated
    cluster_model = load_cluster_model(tiny_run / "checkpoint.pt")
    source = FolderSource(folder)
    result = assign_images(cluster_model, source)
    broken = source.paths.index(str(folder / "broken.jpg"))
    assert result.clusters[broken] == -1 and np.isnan(result.distances[broken]) and not result.ok[broken]
    others = np.delete(np.arange(len(source)), broken)
    assert np.all((result.clusters[others] >= 0) & (result.clusters[others] < 6))
    assert main(["assign", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--data", str(folder), "--out",
                 str(tmp_path / "out"), "--format", "csv"]) == 0
    rows = read_csv(tmp_path / "out" / "assignments.csv")
    assert list(rows[0]) == ["path", "cluster", "distance", "problem"]  # no class column without class folders
    assert "truncated" in rows[broken]["problem"]
    assert rows[broken]["cluster"] == "-1" and rows[broken]["distance"] == ""
    assert not (tmp_path / "out" / "assignments.parquet").exists()


@pytest.mark.slow
def test_every_file_found_gets_a_row_with_its_reason(tiny_run, image_folder, tmp_path):
    """Was: one good, one truncated and one text file gave one CSV row, and features.json
    said n_unreadable 0 while files were dropped."""
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet", reason="pyarrow (Parquet output) is not installed")
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(sorted(image_folder.rglob("*.png"))[0], folder / "a_good.png")
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "b_truncated.jpg", quality=95)
    payload = (folder / "b_truncated.jpg").read_bytes()
    (folder / "b_truncated.jpg").write_bytes(payload[: len(payload) // 2])  # header fine, pixels cut
    (folder / "c_text.jpg").write_text("not an image\n")
    (folder / "d_empty.png").write_bytes(b"")
    Image.new("1", (12000, 8000)).save(folder / "e_bomb.png")  # refused from its header, never decoded
    (folder / "notes.txt").write_text("not an image file name: not an image file")
    checkpoint = str(tiny_run / "checkpoint.pt")
    names = ["a_good.png", "b_truncated.jpg", "c_text.jpg", "d_empty.png", "e_bomb.png"]
    reasons = {"b_truncated.jpg": "truncated", "c_text.jpg": "cannot identify", "d_empty.png": "empty file",
               "e_bomb.png": "too large"}

    assert main(["assign", "--checkpoint", checkpoint, "--data", str(folder), "--out", str(tmp_path / "a")]) == 0
    rows = read_csv(tmp_path / "a" / "assignments.csv")
    assert [r["path"] for r in rows] == [str(folder / name) for name in names]
    assert list(rows[0]) == ["path", "cluster", "distance", "problem"]
    assert rows[0]["cluster"] != "-1" and rows[0]["problem"] == ""
    for row, name in zip(rows[1:], names[1:]):
        assert row["cluster"] == "-1" and row["distance"] == "" and reasons[name] in row["problem"], row
    table = pyarrow_parquet.read_table(tmp_path / "a" / "assignments.parquet").to_pydict()
    assert table["problem"] == [None] + [r["problem"] for r in rows[1:]]

    assert main(["features", "--checkpoint", checkpoint, "--data", str(folder), "--out", str(tmp_path / "f")]) == 0
    meta = json.loads((tmp_path / "f" / "features.json").read_text())
    assert meta["n_images"] == 5 and meta["n_unreadable"] == 4
    lines = [line.split("\t") for line in (tmp_path / "f" / "paths.tsv").read_text().splitlines()]
    assert lines[0] == ["row", "path", "readable", "problem"]
    assert [line[2] for line in lines[1:]] == ["1", "0", "0", "0", "0"]
    assert all(reasons[name] in line[3] for name, line in zip(names[1:], lines[2:]))
    features = np.load(tmp_path / "f" / "features.npy")
    assert features.shape[0] == 5 and not features[1:].any() and features[0].any()


@pytest.mark.parametrize("case, message", [
    ("no_checkpoint", "does not exist"),
    ("no_data", "does not exist or is not a folder"),
    ("bad_format", "choose from csv, parquet"),
    ("no_clustering", "holds no clustering"),
    ("out_is_file", "is a file"),
    ("bad_device", "choose auto, cpu, cuda or cuda:N"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(case, message, tiny_run, image_folder, tmp_path, capsys):
    checkpoint, data, out, extra = str(tiny_run / "checkpoint.pt"), str(image_folder), str(tmp_path / "o"), []
    if case == "no_checkpoint":
        checkpoint = str(tmp_path / "missing.pt")
    elif case == "no_data":
        data = str(tmp_path / "nowhere")
    elif case == "bad_format":
        extra = ["--format", "xlsx"]
    elif case == "no_clustering":
        saved = load_checkpoint(tiny_run / "checkpoint.pt")
        for key in ("centroids", "pca_mean", "pca_projection", "final"):
            saved.pop(key)
        saved.pop("format_version")
        save_checkpoint(tmp_path / "early.pt", saved)
        checkpoint = str(tmp_path / "early.pt")
    elif case == "out_is_file":
        (tmp_path / "o").write_text("")
    elif case == "bad_device":
        extra = ["--device", "tpu"]
    code = main(["assign", "--checkpoint", checkpoint, "--data", data, "--out", out] + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
