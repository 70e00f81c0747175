"""Collapse: the indicators on synthetic points, the verdict, the one warning line, and
runs on the tiny folder that collapse (v1 and v2 at a far too high rate) and that do not."""

import json
import math
from types import SimpleNamespace

import numpy as np
import torch
import pytest

from deepcluster import collapse
from deepcluster.clustering.pca import PCA
from deepcluster.methods import Plan


def _collapsed(n=500, d=128, noise=1e-4, seed=0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    return direction[None, :] + noise * rng.normal(size=(n, d))


def test_collapsed_rows_span_one_direction_and_gaussian_rows_span_nearly_all():
    folded = collapse.embedding_indicators(_collapsed())
    assert folded["effective_rank"] < 1.5 and folded["mean_cosine"] > 0.999
    spread = collapse.embedding_indicators(np.random.default_rng(1).normal(size=(500, 128)))
    assert spread["effective_rank"] > 0.8 * 128 and spread["mean_cosine"] < 0.2


def test_effective_rank_of_equal_and_single_singular_values():
    assert collapse.effective_rank(np.ones(10)) == pytest.approx(10.0)
    assert collapse.effective_rank(np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert collapse.effective_rank(np.zeros(3)) == 0.0


def test_the_sample_is_evenly_spaced_over_the_usable_rows_and_takes_no_random_numbers():
    points = np.arange(10000, dtype=np.float64)[:, None]
    usable = np.arange(10000) % 2 == 0
    state = np.random.get_state()[1].copy()
    rows = collapse.sample_rows(points, usable, 100)[:, 0]
    assert len(rows) == 100 and rows[0] == 0 and rows[-1] == 9998 and (rows % 2 == 0).all()
    assert (np.random.get_state()[1] == state).all()


def test_loss_ratio_is_over_the_mean_log_k_of_the_heads():
    targets = np.array([np.arange(10) % 10, np.arange(10) % 5])
    assert collapse.loss_ratio(math.log(10), targets[:1]) == pytest.approx(1.0)
    assert collapse.loss_ratio(1.0, targets) == pytest.approx(1.0 / ((math.log(10) + math.log(5)) / 2))
    assert collapse.loss_ratio(float("nan"), targets) is None and collapse.loss_ratio(1.0, None) is None


def test_verdict_needs_folded_points_and_a_loss_at_chance():
    assert collapse.verdict({"effective_rank": 40.0, "mean_cosine": 0.99, "loss_ratio": 1.0}, 0.01, 128)
    assert collapse.verdict({"effective_rank": 1.4, "mean_cosine": None, "loss_ratio": 1.2}) is not None
    assert collapse.verdict({"effective_rank": 40.0, "mean_cosine": 0.99, "loss_ratio": 0.8}) is None  # learning
    assert collapse.verdict({"effective_rank": 40.0, "mean_cosine": 0.5, "loss_ratio": 1.0}) is None  # spread
    assert collapse.verdict({"effective_rank": None, "mean_cosine": None, "loss_ratio": 1.0}) is None


def test_indicators_of_a_v2_plan_and_of_a_v1_plan():
    points = _collapsed(n=300, d=16).astype(np.float32)
    targets = np.zeros((2, 300), dtype=np.int64)
    targets[:, ::2] = 9
    plan = Plan(targets[0], {"largest_cluster_share": 0.5}, targets, points=points)
    found = collapse.indicators(plan, math.log(10))
    assert found["mean_cosine"] > 0.99 and found["loss_ratio"] == pytest.approx(1.0)
    assert "effective directions of 16" in found["collapse"] and "largest cluster 50%" in found["collapse"]
    pca = PCA(np.zeros(8), np.eye(8), np.array([1.0, *[1e-12] * 7]), -0.5)
    v1 = collapse.indicators(Plan(targets[0], {}, pca=pca, points=np.ones((300, 8), np.float32)), 0.5)
    assert v1["effective_rank"] < 1.01 and v1["mean_cosine"] is None and v1["collapse"] is None  # loss far below


def _records(*reasons):
    return [{"epoch": i + 1, "collapse": reason} for i, reason in enumerate(reasons)]


def test_the_warning_is_said_once_when_a_collapse_starts_and_the_stop_says_so():
    config = SimpleNamespace(method="v2", prototypes=[300, 300, 300], n_clusters=0, stop_on_collapse=False)
    assert collapse.warning_line(_records(None, None), config) is None
    line = collapse.warning_line(_records(None, "x"), config)
    assert line.startswith("deepcluster: warning: collapsing since epoch 2") and "--prototypes 100,100,100" in line
    assert collapse.warning_line(_records(None, "x", "y"), config) is None  # already said
    assert "since epoch 2" in collapse.warning_line(_records(None, "x", "y"), config, stopping=True)
    said = []
    assert not collapse.announce(_records(None, "x"), config, said.append) and len(said) == 1
    config.stop_on_collapse = True
    assert collapse.announce(_records(None, "x", "y"), config, said.append) and "stopped" in said[-1]
    assert not collapse.announce(_records("x", None), config, said.append) and len(said) == 2
    assert "but not at the last epoch (3)" in collapse.report_line(_records(None, "x", None))
    assert collapse.report_line(_records(None, None)) is None


def test_a_healthy_tiny_run_logs_the_indicators_and_no_collapse(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    for record in records:
        assert record["collapse"] is None and record["effective_rank"] > 2 and record["loss_ratio"] > 0


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_v1_at_a_far_too_high_rate_collapses_warns_once_stops_and_resumes(cli, run_cli, image_folder, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "3", "--lr", "1",
                         "--stop_on_collapse", "true")
    assert code == 0, err
    warnings = [line for line in out.splitlines() if "collapsing" in line]
    assert len(warnings) == 1 and "collapsing since epoch 2" in warnings[0] and "stopped after this epoch" in warnings[0]
    assert [record["collapse"] is not None for record in _log(run)] == [False, True]
    assert not (run / "final.json").exists()
    code, out, err = cli("report", run, "--out", tmp_path / "report")
    assert code == 0, err
    assert "collapsing from epoch 2" in (tmp_path / "report" / "index.html").read_text()
    code, out, err = run_cli("train", "--out", run, "--resume", "--stop_on_collapse", "false")
    assert code == 0, err
    assert len(_log(run)) == 3 and "collapsing since" not in out  # still collapsing: said once, not again


@pytest.mark.slow
def test_v2_at_a_far_too_high_rate_collapses_and_says_so(run_cli, image_folder, tmp_path):
    from test_v2_train import TINY_V2

    run = tmp_path / "run"
    code, out, err = run_cli("train", "--data", image_folder, "--out", run, *TINY_V2, "--lr", "5")
    assert code == 0, err
    assert [line for line in out.splitlines() if "collapsing" in line] == [
        line for line in out.splitlines() if line.startswith("deepcluster: warning: collapsing since epoch 3")]
    assert "collapsing since epoch 3" in out
    records = _log(run)
    assert records[-1]["collapse"] and records[-1]["mean_cosine"] > collapse.COSINE_LIMIT
    assert records[0]["collapse"] is None and records[0]["mean_cosine"] < collapse.COSINE_LIMIT


@pytest.mark.slow
def test_v2_at_its_rate_does_not_warn(run_cli, image_folder, tmp_path):
    from test_v2_train import TINY_V2

    code, out, err = run_cli("train", "--data", image_folder, "--out", tmp_path / "run", *TINY_V2)
    assert code == 0, err
    assert "collapsing" not in out and all(r["collapse"] is None for r in _log(tmp_path / "run"))


def _bank_and_sample() -> tuple:
    """A whole ``(2, 41, 16)`` bank with four images undecoded, and the indices the
    indicators sample from it (at most 20 rows)."""
    rng = np.random.default_rng(3)
    bank = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(2, 41, 16)).astype(np.float32)), dim=2)
    decoded = np.ones(41, dtype=bool)
    decoded[[0, 7, 8, 40]] = False
    return bank, decoded, collapse.sample_indices(decoded, 20)


def _indicator_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from deepcluster.memory_bank import MemoryBank

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bank, decoded, wanted = _bank_and_sample()
        share = MemoryBank.from_full(bank, decoded)  # this process's block only
        plan = Plan(np.where(decoded, 1, -1), {}, np.where(decoded, 1, -1)[None], bank_rows=share.sample)
        torch.save({"rows": share.sample(wanted), "found": collapse.indicators(plan, 0.1), "held": len(share.rows)},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_holding_halves_of_the_bank_give_one_process_indicators(tmp_path):
    """v2 under torchrun: each process holds its block of the memory bank; the sampled rows
    are gathered, so every process logs the indicators one process computes, to the bit."""
    import os

    import torch.multiprocessing as mp

    from deepcluster.memory_bank import MemoryBank

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_indicator_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    bank, decoded, wanted = _bank_and_sample()
    one = MemoryBank.from_full(bank, decoded)
    plan = Plan(np.where(decoded, 1, -1), {}, np.where(decoded, 1, -1)[None], bank_rows=one.sample)
    expected = collapse.indicators(plan, 0.1)
    assert np.array_equal(one.sample(wanted), collapse.sample_rows(bank[0].numpy(), decoded, 20))
    assert expected["effective_rank"] > 2 and expected["mean_cosine"] is not None
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["held"] < 41  # a share, not the bank
        assert np.array_equal(result["rows"], one.sample(wanted)) and result["found"] == expected
