"""Each core behaviour of DeepCluster checked on its own, against a hand computation.

v1 (DEEPCLUSTER.md section 2) and v2: the epoch-to-epoch NMI, the empty-cluster donor rule,
the uniform-over-clusters sampler, the head re-created each epoch, the body's momentum
kept across epochs, PCA-whitening, and v2's memory bank and prototype targets.

These tests do not lean on the recorded fixture (``test_v1_fixture.py``): each plants
nothing and compares one behaviour with what the paper says it is, so a bug in it fails
here by name. They go through the public entry points (``train.run`` on tiny images, the
clustering functions, the sampler) and ``torch.optim.SGD.step``, so that a move of code
inside the package does not break them.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import REFERENCE_LOOP


def find_in_package(package: str, name: str):
    """``name`` from whichever module of ``package`` defines it (it may move between them)."""
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        module = importlib.import_module(info.name)
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"no module of {package} defines {name}")


# ---------------------------------------------------------------- a tiny v1 run, observed


@contextmanager
def watching_sgd(epoch_of):
    """Record, per epoch (``epoch_of()``) and optimiser kind (``body``: with momentum,
    ``head``: without), the parameters and momentum buffers before the epoch's first step
    and after its last."""
    seen: dict[tuple[int, str], dict] = {}
    original = torch.optim.SGD.step

    def snapshot(optimizer, groups):
        params = [p for group in groups for p in group["params"]]
        return {"params": [p.detach().clone() for p in params],
                "momentum": [None if optimizer.state.get(p, {}).get("momentum_buffer") is None
                             else optimizer.state[p]["momentum_buffer"].clone() for p in params]}

    def by_kind(optimizer):
        # the head may be its own optimiser or a momentum-free parameter group of the body's
        kinds = {"body": [g for g in optimizer.param_groups if g["momentum"] > 0],
                 "head": [g for g in optimizer.param_groups if g["momentum"] == 0]}
        return {kind: groups for kind, groups in kinds.items() if groups}

    def step(optimizer, *args, **kwargs):
        kinds = by_kind(optimizer)
        for kind, groups in kinds.items():
            entry = seen.setdefault((epoch_of(), kind), {})
            if "first" not in entry:
                entry["first"] = snapshot(optimizer, groups)
        result = original(optimizer, *args, **kwargs)
        for kind, groups in kinds.items():
            seen[(epoch_of(), kind)]["last"] = snapshot(optimizer, groups)
        return result

    with mock.patch.object(torch.optim.SGD, "step", step):
        yield seen


@pytest.fixture(scope="module")
def observed_v1(image_folder, tmp_path_factory):
    """A three-epoch tiny v1 run (the paper's loop, random heads): the run folder, the SGD
    snapshots of every epoch and the checkpoint after each epoch."""
    from deepcluster.checkpoint import load_checkpoint
    from deepcluster.config import resolve
    from deepcluster.train import run

    out = tmp_path_factory.mktemp("core_v1")
    config = resolve("small", overrides={
        "data": str(image_folder), "out_dir": str(out), "n_clusters": 6, "epochs": 3, "batch_size": 8,
        "feature_batch_size": 16, "workers": 0, "pca_dim": 8, "kmeans_iters": 5, "feature_dim": 32, "threads": 1,
        "tensorboard": False, **REFERENCE_LOOP})
    epoch, checkpoints = [0], []

    def after_epoch(record):
        checkpoints.append(load_checkpoint(out / "checkpoint.pt"))
        epoch[0] += 1
        return False

    datasets = []  # every DataLoader's dataset, in order (the training pass's are the pseudo-labelled ones)
    original_init = torch.utils.data.DataLoader.__init__

    def recording_init(loader, dataset, *args, **kwargs):
        datasets.append((epoch[0], dataset))
        original_init(loader, dataset, *args, **kwargs)

    threads = torch.get_num_threads()
    try:
        with watching_sgd(lambda: epoch[0]) as seen, \
                mock.patch.object(torch.utils.data.DataLoader, "__init__", recording_init):
            run(config, log=lambda _: None, stop=after_epoch)
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "sgd": seen, "checkpoints": checkpoints, "config": config, "datasets": datasets}


@pytest.mark.slow
def test_the_logged_nmi_between_epochs_is_the_nmi_of_the_saved_assignments(observed_v1):
    from deepcluster.clustering import nmi

    out = observed_v1["out"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    saved = [np.load(out / "assignments" / f"epoch_{e:04d}.npy") for e in (1, 2, 3)]
    assert log[0]["nmi_prev"] is None
    expected = [nmi(saved[0], saved[1]), nmi(saved[1], saved[2])]
    assert [log[1]["nmi_prev"], log[2]["nmi_prev"]] == pytest.approx(expected, abs=1e-12)
    assert max(expected) < 0.99, "consecutive clusterings this alike cannot tell a self-comparison apart"
    final = json.loads((out / "final.json").read_text())
    assert final["nmi_last_epoch"] == pytest.approx(nmi(saved[2], np.load(out / "assignments" / "final.npy")),
                                                    abs=1e-12)


def test_the_body_momentum_entering_epoch_2_is_the_one_that_left_epoch_1(observed_v1):
    sgd = observed_v1["sgd"]
    leaving, entering = sgd[(0, "body")]["last"]["momentum"], sgd[(1, "body")]["first"]["momentum"]
    assert all(buffer is not None for buffer in leaving + entering)
    assert sum(float(buffer.abs().sum()) for buffer in leaving) > 0
    for before, after in zip(leaving, entering):
        assert torch.equal(before, after)
    # The checkpoint (what a resume starts from) holds the same buffers.
    state = observed_v1["checkpoints"][0]["optimizer"]["state"]
    for index, buffer in enumerate(leaving):
        assert torch.equal(state[index]["momentum_buffer"], buffer)


@pytest.mark.parametrize("epoch", [1, 2])
def test_each_epoch_starts_a_fresh_head_from_n_0_001_with_zero_bias(observed_v1, epoch):
    sgd = observed_v1["sgd"]
    weight, bias = sgd[(epoch, "head")]["first"]["params"]
    old_weight, old_bias = sgd[(epoch - 1, "head")]["last"]["params"]
    assert weight.shape == (6, 32) and bias.shape == (6,)
    assert torch.count_nonzero(bias) == 0, "a new head's bias starts at zero"
    # N(0, 0.01) (the paper's, fc_init reference): 192 draws, sample std within 20%.
    assert 0.008 < float(weight.std()) < 0.012 and abs(float(weight.mean())) < 0.003
    assert not torch.equal(weight, old_weight), "the new head kept last epoch's weights"
    assert float((weight - old_weight).abs().max()) > 1e-3
    # the old head had learnt (its bias moved): a reset, not an untrained layer carried over
    assert torch.count_nonzero(old_bias) > 0
    # and no momentum is carried into the new head's optimiser
    assert all(buffer is None for buffer in sgd[(epoch, "head")]["first"]["momentum"])


def test_each_epoch_trains_on_equal_shares_of_its_clusters(observed_v1):
    """The training pass draws uniformly over the epoch's clusters (not a plain shuffle of the
    images, which would give each cluster its size)."""
    out = observed_v1["out"]
    training = [(e, d) for e, d in observed_v1["datasets"] if hasattr(d, "indices") and hasattr(d, "assignments")]
    assert [e for e, _ in training] == [0, 1, 2]
    for epoch, dataset in training:
        assignments = np.load(out / "assignments" / f"epoch_{epoch + 1:04d}.npy")
        assert np.array_equal(dataset.assignments, assignments)
        indices = np.asarray(dataset.indices)
        sizes = np.bincount(assignments, minlength=6)
        nonempty = int((sizes > 0).sum())
        shares = np.bincount(assignments[indices], minlength=6)[sizes > 0]
        quota = 36 // nonempty + 1
        assert len(indices) == 36 and shares.max() <= quota and shares.min() >= quota - (quota * nonempty - 36)
    # the test means something: some epoch's clusters are of unequal sizes
    assert any(np.ptp(np.bincount(np.load(out / "assignments" / f"epoch_{e:04d}.npy"))) > 2 for e in (1, 2, 3))


# ---------------------------------------------------------------- the empty-cluster donor rule


def test_a_cluster_of_one_never_gives_a_point_to_an_empty_cluster():
    choose_donors = find_in_package("deepcluster.clustering", "choose_donors")
    rng = np.random.default_rng(0)
    for _ in range(2000):
        targets, donors = choose_donors(np.array([1, 0, 2, 1, 0, 1, 3]), rng)
        assert set(donors.tolist()) <= {2, 6} and len(set(donors.tolist())) == len(donors)
        assert targets.tolist() == [1, 4][:len(donors)]
    targets, donors = choose_donors(np.array([1, 0, 1, 1]), rng)
    assert len(targets) == 0 and len(donors) == 0, "no cluster has two points: nothing to split"


def test_donors_are_drawn_in_proportion_to_size_minus_one():
    choose_donors = find_in_package("deepcluster.clustering", "choose_donors")
    counts = np.array([0, 2, 5, 11, 1])
    expected = np.array([0, 1, 4, 10, 0]) / 15  # size - 1 (in proportion to size: 2, 5, 11, 1 of 19)
    rng = np.random.default_rng(12345)
    draws = 20_000
    tally = np.zeros(len(counts))
    for _ in range(draws):
        targets, donors = choose_donors(counts, rng)
        assert targets.tolist() == [0]
        tally[donors[0]] += 1
    share = tally / draws
    # 4 standard errors of a share near 1/2 over 20,000 draws is 0.014; size-proportional
    # draws would be off by 0.04 or more on three clusters.
    assert np.abs(share - expected).max() < 0.012, share


# ---------------------------------------------------------------- the uniform sampler


def skewed_assignments() -> np.ndarray:
    """Four clusters of 200, 30, 8 and 2 images, an unusable image (-1), in cluster order."""
    return np.concatenate([np.full(200, 0), np.full(30, 1), [-1], np.full(8, 2), np.full(2, 3)]).astype(np.int64)


def test_the_uniform_sampler_gives_every_cluster_the_same_share():
    from deepcluster.data import uniform_cluster_sample

    assignments = skewed_assignments()
    sample = uniform_cluster_sample(assignments, 240, np.random.default_rng(3))
    assert len(sample) == 240 and (assignments[sample] >= 0).all()
    shares = np.bincount(assignments[sample], minlength=4)
    # quota 240 // 4 + 1 = 61 each; the 4 draws too many are cut from the shuffled end
    assert shares.max() <= 61 and shares.min() >= 57, shares
    # the large cluster without replacement, the small ones with
    assert len(np.unique(sample[assignments[sample] == 0])) == shares[0]
    assert set(sample[assignments[sample] == 3].tolist()) == {239, 240}


def test_the_uniform_sampler_mixes_clusters_within_every_batch():
    from deepcluster.data import uniform_cluster_sample

    assignments = skewed_assignments()
    labels = assignments[uniform_cluster_sample(assignments, 240, np.random.default_rng(3))]
    # Shuffled, a neighbour is from the same cluster 1 time in 4; grouped, nearly always.
    same_as_next = float(np.mean(labels[1:] == labels[:-1]))
    assert same_as_next < 0.4, same_as_next
    batches = labels.reshape(30, 8)
    assert all(len(np.unique(batch)) >= 2 for batch in batches)
    # and not in a fixed cluster order either (e.g. round-robin)
    assert len({tuple(batch) for batch in batches[:, :4]}) > 20


# ---------------------------------------------------------------- PCA-whitening


def hand_whitened(x: np.ndarray, d: int) -> np.ndarray:
    """((x - mu) V Lambda^-1/2), then L2, from numpy's eigh of the covariance (1/N)."""
    mu = x.mean(axis=0)
    centred = x - mu
    values, vectors = np.linalg.eigh(centred.T @ centred / len(x))
    order = np.argsort(values)[::-1][:d]
    return centred @ vectors[:, order] / np.sqrt(values[order])


def offset_features(n: int, dim: int, seed: int) -> np.ndarray:
    """Correlated features far from the origin (mean about 5), so a missing centring shows."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * np.linspace(3.0, 0.2, dim)[:, None]
    return (rng.normal(size=(n, dim)) @ mixing + 5.0 + rng.normal(size=dim)).astype(np.float32)


@pytest.mark.parametrize("n, dim, d", [(400, 12, 6), (20, 64, 8)], ids=["covariance", "gram"])
def test_pca_whitening_is_centred_rotated_scaled_then_l2_normalised(n, dim, d):
    from deepcluster.clustering.pca import StreamingPCA, fit_pca

    x = offset_features(n, dim, seed=n)
    pca = fit_pca(x, d)
    whitened = pca.transform(x).astype(np.float64)
    hand = hand_whitened(x.astype(np.float64), d)
    # eigenvectors are defined up to sign: align each column, then compare
    signs = np.sign(np.sum(whitened * hand, axis=0))
    np.testing.assert_allclose(whitened, hand * signs, rtol=0, atol=2e-3)
    np.testing.assert_allclose(whitened.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(whitened.T @ whitened / n, np.eye(d), atol=5e-3)
    np.testing.assert_allclose(pca.mean, x.mean(axis=0), rtol=1e-6)
    points = pca.project(x)
    unit = hand * signs / np.linalg.norm(hand, axis=1, keepdims=True)
    np.testing.assert_allclose(points, unit, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(points, axis=1), 1.0, atol=1e-5)
    # streamed in chunks, in a shuffled order, as the feature pass feeds it: the same points
    reducer = StreamingPCA(n, d, sample_size=n)
    order = np.random.default_rng(0).permutation(n)
    for chunk in np.array_split(order, 5):
        reducer.add(x[chunk], chunk)
    streamed, _ = reducer.finish()
    np.testing.assert_allclose(np.abs(streamed), np.abs(points), atol=1e-5)


# ---------------------------------------------------------------- v2: the bank and the targets


@pytest.fixture(scope="module")
def observed_v2(image_folder, tmp_path_factory):
    """A three-epoch tiny v2 run with the checkpoint after each epoch."""
    from deepcluster.checkpoint import load_checkpoint
    from deepcluster.cli import parse_overrides
    from deepcluster.config import resolve
    from deepcluster.train import run

    from test_v2_train import TINY_V2

    out = tmp_path_factory.mktemp("core_v2")
    config = resolve("v2-cifar", overrides={**parse_overrides(TINY_V2[2:]), "data": str(image_folder),
                                            "out_dir": str(out), "sampler": "shuffle"})
    checkpoints = []
    threads = torch.get_num_threads()
    try:
        run(config, log=lambda _: None, stop=lambda _: checkpoints.append(load_checkpoint(out / "checkpoint.pt")))
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "checkpoints": checkpoints, "config": config}


def prototypes_of(checkpoint: dict) -> list[torch.Tensor]:
    head = checkpoint["head"]
    names = sorted((name for name in head if name.startswith("prototypes.")),
                   key=lambda name: int(name.split(".")[2]))
    return [head[name] for name in names]


@pytest.mark.slow
def test_v2_trains_epoch_t_on_the_nearest_prototypes_of_the_bank_written_in_epoch_t_minus_1(observed_v2):
    out, checkpoints = observed_v2["out"], observed_v2["checkpoints"]
    for epoch in (1, 2):
        bank = checkpoints[epoch - 1]["bank"]  # written by the training pass of epoch `epoch`
        prototypes = prototypes_of(checkpoints[epoch])  # frozen: set by the next plan, not trained
        assert [tuple(p.shape) for p in prototypes] == [(6, 16), (6, 16), (4, 16)]
        for p in prototypes:
            np.testing.assert_allclose(p.norm(dim=1).numpy(), 1.0, atol=1e-5)
        targets = np.load(out / "assignments" / f"epoch_{epoch + 1:04d}.npy")
        nearest = (bank[0] @ prototypes[0].T).argmax(dim=1).numpy()
        assert np.array_equal(targets, nearest)
        # each prototype is the normalised mean of the crop it clusters (crop h mod 2)
        for head, p in enumerate(prototypes):
            labels = (bank[head % 2] @ p.T).argmax(dim=1)
            for cluster in labels.unique():
                mean = bank[head % 2][labels == cluster].mean(dim=0)
                assert float(torch.dot(mean / mean.norm(), p[cluster])) > 0.99


def test_v2_training_writes_every_trained_images_two_crops_to_the_bank(observed_v2):
    checkpoints = observed_v2["checkpoints"]
    batch = observed_v2["config"].batch_size
    for before, after in zip(checkpoints, checkpoints[1:]):
        old, new = before["bank"], after["bank"]
        assert new.shape == (2, 36, 16)
        np.testing.assert_allclose(new.norm(dim=2).numpy(), 1.0, atol=1e-5)
        changed = (new != old).any(dim=2)  # (2, N)
        assert torch.equal(changed[0], changed[1]), "both crops of an image are written together"
        # 36 images in batches of 8, the last incomplete batch dropped: 32 trained, 32 written
        assert int(changed[0].sum()) == 36 // batch * batch
        # the two crops are different views, not one embedding written twice
        assert not torch.allclose(new[0], new[1])


# ---------------------------------------------------------------- a resumed run


@pytest.mark.slow
def test_a_resumed_run_makes_one_feature_pass_per_epoch_left_and_none_for_finished_ones(image_folder, tmp_path):
    """Stopped after epoch 1 of 3 and resumed: the resumed run passes over the images for
    epochs 2 and 3 and the final clustering (3 feature passes), trains 2 epochs, and never
    epoch 1 again."""
    from deepcluster.config import resolve
    from deepcluster.train import run

    config = resolve("small", overrides={
        "data": str(image_folder), "out_dir": str(tmp_path / "run"), "n_clusters": 6, "epochs": 3, "batch_size": 8,
        "feature_batch_size": 16, "workers": 0, "pca_dim": 8, "kmeans_iters": 5, "feature_dim": 32, "threads": 1,
        "tensorboard": False, **REFERENCE_LOOP})
    threads = torch.get_num_threads()
    passes = []
    original_init = torch.utils.data.DataLoader.__init__

    def recording_init(loader, dataset, *args, **kwargs):
        # a feature pass visits every image once, in its centre view (no pseudo-labels)
        passes.append("training" if hasattr(dataset, "assignments") else "features")
        original_init(loader, dataset, *args, **kwargs)

    try:
        first = run(config, log=lambda _: None, stop=lambda record: record["epoch"] == 1)
        assert [r["epoch"] for r in first] == [1]
        with mock.patch.object(torch.utils.data.DataLoader, "__init__", recording_init):
            resumed = run(config, resume=True, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert [r["epoch"] for r in resumed] == [2, 3]
    assert passes == ["features", "training", "features", "training", "features"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_each_epoch_seeds_its_k_means_from_the_run_seed_and_the_epoch():
    """k-means starts from the seed of (run seed, epoch): another start every epoch, the same
    one for the same epoch of a resumed run."""
    from types import SimpleNamespace

    from deepcluster.config import resolve
    from deepcluster.methods import STREAM_CLUSTERING, derived_seed
    from deepcluster.methods.v1 import V1Planner

    config = resolve("small", overrides={"data": None, "n_clusters": 2, "seed": 7, "threads": 1})
    seeds = []
    planner = V1Planner(config, torch.device("cpu"), SimpleNamespace(__len__=lambda: 4))
    planner.reduce = lambda *a, **k: SimpleNamespace(points=np.zeros((4, 2), np.float32), decoded=np.ones(4, bool),
                                                     pca=None, start=None, time_pca=0.0)
    planner.cluster = lambda points, decoded, pca, config, seed, *a, **k: seeds.append(seed) or SimpleNamespace()
    for epoch in (0, 1, 2, 1):
        planner.cluster_images(None, epoch)
    expected = [derived_seed(7, epoch, STREAM_CLUSTERING) for epoch in (0, 1, 2, 1)]
    assert seeds == expected and len(set(seeds)) == 3
