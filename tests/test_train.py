"""End to end: the whole loop on a few dozen tiny real image files."""

import json

import numpy as np
import pytest
import torch

from deepcluster.checkpoint import load_checkpoint
from deepcluster.config import ConfigError, resolve
from deepcluster.checkpoint import load_backbone
from deepcluster.clustering import nmi
from deepcluster.train import run

from conftest import REFERENCE_LOOP


def tiny_config(folder, out_dir, **overrides):
    settings = {"data": str(folder), "out_dir": str(out_dir), "n_clusters": 6, "epochs": 2, "batch_size": 8,
                "feature_batch_size": 16, "workers": 0, "pca_dim": 8, "kmeans_iters": 5, "feature_dim": 32}
    settings.update(REFERENCE_LOOP)
    settings.update(overrides)
    return resolve("small", overrides=settings)


@pytest.mark.slow
def test_two_epochs_write_log_assignments_and_a_resumable_checkpoint(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path / "full")
    lines = []
    records = run(config, log=lines.append)
    assert len(records) == 2 and len(lines) == 5  # header, the --val hint, one line per epoch, the final clustering
    assert lines[-1].startswith("final clustering of the trained network")
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]  # counted from 1, as on screen
    for key in ("clustering_objective", "n_split", "largest_cluster_share", "n_nonempty", "train_loss",
                "nmi_labels", "cluster_acc", "ari_labels", "time_features", "time_clustering",
                "time_training", "train_images_per_s"):
        assert key in log[1], key
    assignments = np.load(tmp_path / "full" / "assignments" / "epoch_0002.npy", allow_pickle=False)
    first = np.load(tmp_path / "full" / "assignments" / "epoch_0001.npy", allow_pickle=False)
    assert log[0]["nmi_prev"] is None and log[1]["nmi_prev"] == pytest.approx(nmi(first, assignments), abs=1e-12)
    assert assignments.shape == (36,) and assignments.max() < 6
    saved = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert saved["epoch"] == 2 and saved["config"]["n_clusters"] == 6
    assert (tmp_path / "full" / "config.yaml").is_file()

    # Stop after one epoch, resume to two: the same assignments and weights.
    half = tiny_config(image_folder, tmp_path / "half", epochs=1)
    run(half, log=lambda _: None)
    resumed = tiny_config(image_folder, tmp_path / "half", epochs=2)
    run(resumed, resume=True, log=lambda _: None)
    again = np.load(tmp_path / "half" / "assignments" / "epoch_0002.npy", allow_pickle=False)
    assert np.array_equal(assignments, again)
    model_a, _ = load_backbone(tmp_path / "full" / "checkpoint.pt")
    model_b, _ = load_backbone(tmp_path / "half" / "checkpoint.pt")
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert len((tmp_path / "half" / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_head_is_recreated_every_epoch(image_folder, tmp_path, monkeypatch):
    from deepcluster.models.heads import ClassifierHead

    heads = []
    original = ClassifierHead.reset

    def spy(self, n_outputs, device=None):
        layer = original(self, n_outputs, device)
        heads.append(layer)
        return layer

    monkeypatch.setattr(ClassifierHead, "reset", spy)
    run(tiny_config(image_folder, tmp_path / "run", epochs=3), log=lambda _: None)
    assert len(heads) == 3 and len({id(h) for h in heads}) == 3
    assert all(h.out_features == 6 for h in heads)


@pytest.mark.slow
def test_body_momentum_persists_and_loss_is_finite(image_folder, tmp_path):
    records = run(tiny_config(image_folder, tmp_path / "run"), log=lambda _: None)
    assert all(np.isfinite(r["train_loss"]) for r in records)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert any("momentum_buffer" in s for s in saved["optimizer"]["state"].values())


@pytest.mark.slow
def test_impossible_settings_fail_before_any_work(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="only 36 images"):
        run(tiny_config(image_folder, tmp_path / "run", n_clusters=100), log=lambda _: None)
    assert not (tmp_path / "run").exists()
    run(tiny_config(image_folder, tmp_path / "done", epochs=1), log=lambda _: None)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        run(tiny_config(image_folder, tmp_path / "done", epochs=1), log=lambda _: None)
    with pytest.raises(ConfigError, match="cannot resume with different settings"):
        run(tiny_config(image_folder, tmp_path / "done", epochs=2, lr=0.1), resume=True, log=lambda _: None)


@pytest.mark.slow
def test_pic_clustering_runs_in_the_loop_with_the_number_of_clusters_it_finds(image_folder, tmp_path):
    records = run(tiny_config(image_folder, tmp_path / "pic", clustering="pic", epochs=1), log=lambda _: None)
    saved = load_checkpoint(tmp_path / "pic" / "checkpoint.pt")
    n_found = records[0]["n_nonempty"]
    assert records[0]["clustering_objective"] is None and 1 <= n_found < 36
    assert saved["head"]["linear.weight"].shape[0] == saved["centroids"].shape[0]


@pytest.mark.slow
def test_streamed_reduction_equals_in_memory_pca_and_bounded_sample_clusters(image_folder, tmp_path):
    from deepcluster.data import FolderSource
    from deepcluster.features import compute_features
    from deepcluster.clustering import fit_pca
    from deepcluster.methods.v1 import reduce_features
    from deepcluster.train import build

    config = tiny_config(image_folder, tmp_path / "run", threads=1)
    device = torch.device("cpu")
    model, _, _ = build(config, device)
    source = FolderSource(config.data)
    features, ok, _ = compute_features(model, source, config, device)
    reference = fit_pca(features[ok], config.pca_dim, config.whiten_power)  # in memory, all rows
    reduced = reduce_features(model, source, config, device, seed=5)
    points, ok_streamed = reduced.points, reduced.decoded
    assert np.array_equal(ok, ok_streamed)
    expected = reference.transform(features)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    # Same PCA fitted on all rows: the same reduced points (eigenvector signs included).
    np.testing.assert_allclose(points, expected, atol=1e-4)

    # A bounded sample: the PCA sees only 20 of the 36 images, every image is still reduced.
    bounded = tiny_config(image_folder, tmp_path / "run", pca_sample_size=20)
    reduced = reduce_features(model, source, bounded, device, seed=5)
    points, ok_streamed = reduced.points, reduced.decoded
    assert points.shape == (36, 8) and ok_streamed.all()
    np.testing.assert_allclose(np.linalg.norm(points, axis=1), 1.0, atol=1e-5)
    records = run(tiny_config(image_folder, tmp_path / "bounded", pca_sample_size=20, epochs=1), log=lambda _: None)
    assert records[0]["n_nonempty"] >= 2


@pytest.mark.slow
def test_a_nested_file_keeps_the_labels_and_a_loose_one_is_said(image_folder, tmp_path, cli):
    """Was: one ``<class>/nested/deeper/x.jpg`` dropped NMI/ACC without a word, and eval said
    the folder had no class sub-folders."""
    import shutil

    from deepcluster.data import DataError
    from deepcluster.evaluation.suite import open_labelled_splits

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "rings" / "nested" / "deeper").mkdir(parents=True)
    shutil.move(data / "rings" / "00.png", data / "rings" / "nested" / "deeper" / "x.png")
    code, out, err = cli("train", "--data", data, "--out", tmp_path / "nested")
    assert code == 0, err
    assert "nmi " in out and "no class labels" not in out
    record = json.loads((tmp_path / "nested" / "log.jsonl").read_text())
    assert "nmi_labels" in record
    assert open_labelled_splits(data, data).class_names == ["checkers", "rings", "stripes"]

    shutil.move(data / "rings" / "01.jpg", data / "loose.jpg")
    code, out, err = cli("train", "--data", data, "--out", tmp_path / "loose")
    assert code == 0, err
    note = [line for line in out.splitlines() if "no class labels" in line]
    assert len(note) == 1 and "1 image(s) lie directly in the folder" in note[0] and "'loose.jpg'" in note[0]
    assert "nmi_labels" not in json.loads((tmp_path / "loose" / "log.jsonl").read_text())
    with pytest.raises(DataError, match="has no class labels: 1 image\\(s\\) lie directly in the folder"):
        open_labelled_splits(data, data)


def test_the_terminal_says_what_was_skipped_and_when_nothing_is_left(image_folder, tmp_path, cli):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "rings" / "broken.jpg").write_text("not an image")
    code, out, err = cli("train", "--data", data, "--out", tmp_path / "run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("deepcluster: 37 image files, ")  # the unreadable count is the log's, said per epoch
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert (record["n_images"], record["n_skipped"]) == (36, 1) and "images 36 (1 unreadable, in skipped.tsv)" in lines[2]
    assert ", 1 epoch, " in lines[0]
    assert lines[1].startswith("deepcluster: the data folder has classes: add --val FOLDER")
    assert lines[2].startswith("epoch   1/1  objective ") and "time features " in lines[2]
    assert " clustering " in lines[2] and " training " in lines[2] and " clus " not in lines[2]
    code, out, err = cli("train", "--data", data, "--out", tmp_path / "run", "--resume")
    assert code == 0, err
    assert "the run has already trained 1 epoch; nothing left to train (raise --epochs" in out


@pytest.mark.slow
def test_v1_body_follows_a_warmup_and_cosine_when_asked_and_resumes_on_it(image_folder, tmp_path, monkeypatch):
    import deepcluster.train as train_module
    from deepcluster.optim import learning_rates

    seen = []
    original = train_module.set_lr

    def spy(optimizer, lr):
        seen.append(lr)
        original(optimizer, lr)

    monkeypatch.setattr(train_module, "set_lr", spy)
    config = tiny_config(image_folder, tmp_path / "full", epochs=3, lr=0.05, warmup_epochs=1, warmup_start_lr=0.0,
                         final_lr=0.001)
    run(config, log=lambda _: None)
    steps = len(seen) // 3
    assert steps * 3 == len(seen)
    assert np.allclose(seen, learning_rates(config, steps))
    assert seen[0] == 0.0 and max(seen) == pytest.approx(0.05) and seen[-1] < 0.01
    saved = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(seen[-1])

    # The rate is a function of the step: stopped after the warm-up epoch and resumed, the same weights.
    run(tiny_config(image_folder, tmp_path / "half", epochs=1, lr=0.05, warmup_epochs=1, final_lr=0.001),
        log=lambda _: None)
    run(tiny_config(image_folder, tmp_path / "half", epochs=3, lr=0.05, warmup_epochs=1, final_lr=0.001),
        resume=True, log=lambda _: None)
    model_a, _ = load_backbone(tmp_path / "full" / "checkpoint.pt")
    model_b, _ = load_backbone(tmp_path / "half" / "checkpoint.pt")
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_v1_without_a_schedule_keeps_the_paper_constant_rate(image_folder, tmp_path, monkeypatch):
    import deepcluster.train as train_module

    seen = []
    monkeypatch.setattr(train_module, "set_lr", lambda optimizer, lr: seen.append(lr))
    run(tiny_config(image_folder, tmp_path / "run", epochs=1, lr=0.03), log=lambda _: None)
    assert seen and set(seen) == {0.03}
