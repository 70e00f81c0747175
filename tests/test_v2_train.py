"""DeepCluster-v2 end to end on 36 tiny images: planning, a stopped-and-resumed run, the loss,
bad settings, and the commands that read a v2 run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcluster.cli import main
from deepcluster.methods.records import MACHINE_KEYS

# The smallest v2 run: the v2-cifar recipe on a small net and two crop sizes (so the grouped
# forward and the small crops are exercised), 4 training batches of 8 images per epoch.
TINY_V2 = ["--recipe", "v2-cifar", "--arch", "smallnet", "--stem", "imagenet", "--feature_dim", "32",
           "--resize", "24", "--crop", "24", "--crop_sizes", "24,16", "--crop_counts", "2,2",
           "--crop_min_scales", "0.3,0.1", "--crop_max_scales", "1,0.3", "--prototypes", "6,6,4",
           "--projection_hidden", "32", "--projection_dim", "16", "--epochs", "3", "--batch_size", "8",
           "--feature_batch_size", "16", "--workers", "0", "--threads", "1", "--warmup_epochs", "1",
           "--lr", "0.3", "--final_lr", "0.003", "--tensorboard", "false", "--device", "cpu"]
TIMING_KEYS = MACHINE_KEYS


@pytest.fixture(scope="module")
def v2_run(image_folder, tmp_path_factory) -> Path:
    """An uninterrupted three-epoch v2 run with the online kNN (the training folder as --val)."""
    out = tmp_path_factory.mktemp("v2") / "run"
    threads = torch.get_num_threads()
    try:
        code = main(["train", "--data", str(image_folder), "--out", str(out), "--val", str(image_folder), *TINY_V2])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_after_planning_the_prototypes_are_the_centroids_and_give_the_targets(image_folder):
    from deepcluster.config import resolve
    from deepcluster.data import FolderSource
    from deepcluster.methods import v2
    from deepcluster.cli import parse_overrides

    overrides = parse_overrides(TINY_V2[2:])
    config = resolve("v2-cifar", overrides={**overrides, "data": str(image_folder), "out_dir": "unused"})
    source = FolderSource(str(image_folder))
    model, head, _ = v2.build(config, torch.device("cpu"))
    planner = v2.V2Planner(config, torch.device("cpu"), source, head)
    made = []
    planner.cluster = lambda *args, **kwargs: made.append(v2.cluster_bank(*args, **kwargs)) or made[-1]
    skipped: dict[str, str] = {}
    plan = planner.plan(model, head, 0, None, skipped)
    clustering = made[0]
    assert planner.bank.decoded.all() and skipped == {}
    assert plan.targets.shape == (3, len(source)) and np.array_equal(plan.assignments, plan.targets[0])
    for index, layer in enumerate(head.prototypes.heads):
        assert torch.equal(layer.weight, clustering.centroids[index])
        assert torch.allclose(layer.weight.norm(dim=1), torch.ones(layer.out_features), atol=1e-5)
        # Head h clustered crop h mod 2: its targets are the nearest prototypes of that crop's embeddings.
        scores = planner.bank.embeddings[index % 2] @ layer.weight.T
        assert np.array_equal(plan.targets[index], scores.argmax(dim=1).numpy())
    assert plan.record["n_empty"] == [0, 0, 0] and len(plan.record["spherical_objective"]) == 3


@pytest.mark.slow
def test_a_three_epoch_v2_run_lowers_its_loss_and_logs_v1s_keys_plus_each_heads_loss(v2_run):
    logged = records(v2_run)
    assert [r["epoch"] for r in logged] == [1, 2, 3]
    assert logged[-1]["train_loss"] < logged[0]["train_loss"]
    for record in logged:
        assert len(record["train_loss_per_head"]) == 3
        assert record["train_loss"] == pytest.approx(np.mean(record["train_loss_per_head"]), rel=1e-6)
        for key in ("nmi_labels", "n_nonempty", "largest_cluster_share", "time_clustering", "time_training",
                    "knn_top1", "n_empty"):
            assert key in record, key
    saved = [np.load(v2_run / "assignments" / f"epoch_{e:04d}.npy") for e in (1, 2, 3)]
    from deepcluster.clustering import nmi
    assert logged[0]["nmi_prev"] is None
    assert [r["nmi_prev"] for r in logged[1:]] == pytest.approx([nmi(saved[0], saved[1]), nmi(saved[1], saved[2])],
                                                              abs=1e-12)
    # Warm-up then cosine: the last step's rate is near final_lr.
    assert logged[-1]["lr"] < logged[0]["lr"]


@pytest.mark.slow
def test_a_v2_run_stopped_mid_epoch_and_resumed_equals_an_uninterrupted_one(image_folder, v2_run, tmp_path,
                                                                                 run_cli):
    run = tmp_path / "run"
    # SIGTERM in the second batch of epoch 2 (4 batches an epoch): epoch 1's checkpoint stays.
    code, _, err = run_cli("train", "--data", image_folder, "--out", run, "--val", image_folder, *TINY_V2,
                           fault="term:training:6")
    assert code == 143, err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    code, out, err = run_cli("train", "--out", run, "--resume")
    assert code == 0, err
    assert "resuming after epoch 1" in out

    names = sorted(p.name for p in (v2_run / "assignments").glob("*.npy"))
    assert names == ["epoch_0001.npy", "epoch_0002.npy", "epoch_0003.npy", "final.npy"]
    for name in names:
        assert (run / "assignments" / name).read_bytes() == (v2_run / "assignments" / name).read_bytes(), name
    ours = torch.load(run / "checkpoint.pt", weights_only=True)
    theirs = torch.load(v2_run / "checkpoint.pt", weights_only=True)
    for part in ("model", "head"):  # the head holds the projection and the prototypes
        assert ours[part].keys() == theirs[part].keys()
        for name, tensor in theirs[part].items():
            assert torch.equal(ours[part][name], tensor), (part, name)
    assert "prototypes.heads.2.weight" in theirs["head"]
    assert torch.equal(ours["bank"], theirs["bank"]) and torch.equal(ours["bank_decoded"], theirs["bank_decoded"])
    for index, state in theirs["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert torch.equal(ours["torch_rng"], theirs["torch_rng"])
    for key, value in theirs["final"].items():
        assert torch.equal(ours["final"][key], value) if torch.is_tensor(value) else ours["final"][key] == value
    for record, want in zip(records(run), records(v2_run), strict=True):
        assert {k: v for k, v in record.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in want.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("settings, words", [
    (["--prototypes", "6,40,6"], "asks for 40 prototypes in a head but the data has only 36 images"),
    (["--batch_size", "64"], "drops an epoch's last incomplete batch"),
    (["--crop_counts", "1,2"], "the first (large) group at least 2"),
    (["--crop_sizes", "24"], "one value per crop group"),
    (["--clustering", "pic"], "'clustering' is a v1 setting; this run is v2"),
    (["--method", "v1"], "is a v2 setting; this run is v1"),
])
def test_bad_v2_settings_fail_with_one_line(image_folder, tmp_path, run_cli, settings, words):
    code, _, err = run_cli("train", "--data", image_folder, "--out", tmp_path / "run", *TINY_V2, *settings)
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_eval_assign_features_and_report_read_a_v2_run_folder(image_folder, v2_run, tmp_path, run_cli):
    final = np.load(v2_run / "assignments" / "final.npy")
    code, out, err = run_cli("assign", v2_run, "--data", image_folder, "--out", tmp_path / "assign",
                             "--format", "csv")
    assert code == 0, err
    assert "100.00% get the cluster of assignments/final.npy" in out and "6 clusters of the final clustering" in out
    code, out, err = run_cli("features", v2_run, "--data", image_folder, "--out", tmp_path / "features")
    assert code == 0 and np.load(tmp_path / "features" / "features.npy").shape == (36, 32), err
    code, _, err = run_cli("features", v2_run, "--data", image_folder, "--out", tmp_path / "f2", "--pca")
    assert code == 2 and err.count("\n") == 1 and "--pca applies to v1 runs" in err
    code, out, err = run_cli("eval", v2_run, "--train", image_folder, "--val", image_folder, "--protocols", "knn",
                             "--out", tmp_path / "eval", "--threads", "1")
    assert code == 0 and (tmp_path / "eval" / "eval.json").is_file(), err
    code, out, err = run_cli("report", v2_run, "--out", tmp_path / "report")
    assert code == 0 and (tmp_path / "report" / "index.html").is_file(), err
    assert "spherical k-means of the memory bank" in (tmp_path / "report" / "index.html").read_text()
    assert len(np.unique(final[final >= 0])) >= 2


def test_without_a_final_clustering_assign_uses_head_0s_prototypes(image_folder, tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--data", image_folder, "--out", run, *TINY_V2, "--epochs", "1",
                           "--final_clustering", "false")
    assert code == 0, err
    code, out, err = run_cli("assign", run, "--data", image_folder, "--out", tmp_path / "a", "--format", "csv")
    assert code == 0, err
    assert "6 clusters of the clustering epoch 1 trained on" in out
