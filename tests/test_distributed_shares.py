"""What each process holds under torchrun: its share, never all N rows. On a real gloo group of
two processes, the sharded kNN votes equal one process's, and v2's memory bank, written by
the process that trained on each image and handed over at the epoch's end, equals the bank
one process would hold, while each process keeps only its share."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepcluster import distributed
from deepcluster.evaluation.knn import knn_scores
from deepcluster.methods.v2 import BANK_CROPS, MemoryBank
from deepcluster.monitor import sharded_knn_votes

WORLD_SIZE = 2
N_MEMORY, N_QUERIES, N_CLASSES = 25, 30, 4
N_IMAGES, DIM = 11, 3
K_VALUES = (3, 20)  # 20 is more than either process's share of the memory (13 and 12 rows)


def knn_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((N_MEMORY, 8)).astype(np.float32), rng.integers(0, N_CLASSES, N_MEMORY),
            rng.standard_normal((N_QUERIES, 8)).astype(np.float32))


def embedding(rows: np.ndarray, epoch: int) -> torch.Tensor:
    """A recognisable ``(2, len(rows), DIM)`` embedding of each image at each epoch."""
    base = torch.as_tensor(rows, dtype=torch.float32)[None, :, None]
    crop = torch.arange(BANK_CROPS, dtype=torch.float32)[:, None, None]
    return base + 0.1 * crop + 0.01 * epoch + torch.arange(DIM, dtype=torch.float32) * 1e-3


def epoch_order(epoch: int) -> np.ndarray:
    """The images trained on in ``epoch``, in order, as every process draws them; the last
    two are left out (as v2 drops the last incomplete batch): they keep their older rows."""
    return np.random.default_rng(epoch).permutation(N_IMAGES)[:-2]


def expected_bank() -> torch.Tensor:
    """The bank one process holds after filling at epoch 0 and training epochs 1 and 2."""
    bank = embedding(np.arange(N_IMAGES), 0)
    for epoch in (1, 2):
        rows = epoch_order(epoch)
        bank[:, torch.from_numpy(rows)] = embedding(rows, epoch)
    return bank


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        memory, labels, queries = knn_data()
        mine = distributed.shard(np.arange(N_MEMORY))
        votes = {k: sharded_knn_votes(memory[mine], labels[mine], queries, N_CLASSES, k, 0.07) for k in K_VALUES}

        bank = MemoryBank.empty(N_IMAGES, DIM)
        bank.write(bank.rows, embedding(bank.rows, 0))  # the filling pass: each process its own images
        bank.decoded[:] = True
        for epoch in (1, 2):
            trained, _ = distributed.equal_shard(epoch_order(epoch))
            for batch in np.array_split(trained, 2):  # written batch by batch, as in training
                bank.write(batch, embedding(batch, epoch))
            bank.synchronise()
        full = bank.full()
        share = MemoryBank.from_full(*full) if full is not None else None
        gathered = distributed.gather_to_main(np.arange(len(bank.rows))[:, None] + 100 * rank, bank.rows)
        torch.save({"votes": votes, "held": bank.rows, "held_shape": tuple(bank.embeddings.shape),
                    "held_rows": bank.embeddings.clone(), "full": full, "all_decoded": bank.all_decoded(),
                    "share_rows": None if share is None else share.rows, "gathered": gathered},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shares(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shares")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.mark.slow
@pytest.mark.parametrize("k", K_VALUES)
def test_sharded_knn_votes_equal_one_process(shares, k):
    memory, labels, queries = knn_data()
    single = knn_scores(memory, labels, queries, N_CLASSES, k, 0.07)
    assert torch.equal(single, sharded_knn_votes(memory, labels, queries, N_CLASSES, k, 0.07))
    for result in shares:
        torch.testing.assert_close(result["votes"][k], single, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_each_process_holds_its_share_of_the_bank(shares):
    expected = expected_bank()
    for rank, result in enumerate(shares):
        rows = np.arange(6) if rank == 0 else np.arange(6, N_IMAGES)  # contiguous blocks, in rank order
        assert np.array_equal(result["held"], rows)
        assert result["held_shape"] == (BANK_CROPS, len(rows), DIM)
        # what the others trained on was handed over: the share equals that part of one process's bank
        assert torch.equal(result["held_rows"], expected[:, torch.from_numpy(rows)])
        assert result["all_decoded"].all() and len(result["all_decoded"]) == N_IMAGES


@pytest.mark.slow
def test_the_checkpoint_bank_is_whole_on_the_main_process_only(shares):
    embeddings, decoded = shares[0]["full"]
    assert torch.equal(embeddings, expected_bank()) and decoded.all()
    assert shares[1]["full"] is None
    assert np.array_equal(shares[0]["share_rows"], np.arange(6))  # resume takes a share
    values, indices = shares[0]["gathered"]
    assert np.array_equal(indices, np.arange(N_IMAGES))
    assert np.array_equal(values[:, 0], np.where(indices < 6, indices, indices - 6 + 100))
    assert shares[1]["gathered"] is None


def test_one_process_bank_writes_in_place_and_keeps_nothing_aside():
    bank = MemoryBank.empty(N_IMAGES, DIM)
    rows = np.array([4, 1, 7])
    bank.write(rows, embedding(rows, 3))
    assert bank.outbox == []
    assert torch.equal(bank.embeddings[:, torch.from_numpy(rows)], embedding(rows, 3))
    full, _ = bank.full()
    assert full is bank.embeddings


def test_the_first_filling_takes_one_process_batches_split_over_the_processes():
    """Step t of every process holds its images of ``[t B, (t + 1) B)``: together the batch one
    process takes; every process takes the same number of steps, one an empty batch where a
    last batch has fewer images than there are processes."""
    from deepcluster.data.multicrop import CropGroup, collate_crops
    from deepcluster.memory_bank import fill_batches

    n_images, batch = 33, 16
    strided = [np.arange(rank, n_images, WORLD_SIZE) for rank in range(WORLD_SIZE)]
    steps = [fill_batches(rows, n_images, batch) for rows in strided]
    assert fill_batches(np.arange(n_images), n_images, batch) == [list(range(16)), list(range(16, 32)), [32]]
    assert [len(s) for s in steps] == [3, 3] and steps[1][2] == []
    for t in range(3):
        together = np.concatenate([rows[s[t]] for rows, s in zip(strided, steps)])
        assert np.array_equal(np.sort(together), np.arange(t * batch, min((t + 1) * batch, n_images)))
    crops, targets, indices = collate_crops((CropGroup(24, 2, (0.3, 1.0)), CropGroup(16, 1, (0.1, 0.3))), [])
    assert [tuple(c.shape) for c in crops] == [(0, 3, 24, 24), (0, 3, 24, 24), (0, 3, 16, 16)]
    assert tuple(targets.shape) == (0, 1) and tuple(indices.shape) == (0,)
