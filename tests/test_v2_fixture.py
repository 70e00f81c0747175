"""Proof that DeepCluster-v2 does not change: a tiny seeded run against a recorded reference.

A three-epoch ``v2-small``-recipe run on 30 synthetic PNG images (written here, lossless, so
every machine decodes the same pixels; the same images as ``test_v1_fixture``), with two crop
sizes, two prototype heads and the online kNN on, must give the assignments, losses, kNN
scores, final weights and memory bank stored in ``fixtures/v2_reference.json``, recorded with
the code as it was before v1 and v2 shared one training loop.

As for v1, floats depend on the CPU (oneDNN and the BLAS pick kernels by instruction set), so
the reference stores the fingerprint of the machine that recorded it and the test runs in one
of two modes (named in its test id and printed):

- ``exact`` (same torch, numpy, faiss and CPU capability as the recording): every epoch's
  assignments, every logged loss and score equal, the weights and the bank bit for bit;
- ``tolerant`` (another machine): at least 90% of the images in the same cluster every
  epoch, losses within 1e-3 relative, each tensor's norm and sum within 1e-3 of its norm
  (or 1e-5 a value).

Regenerate (only when a change of v2's numbers is intended, and say so in the commit)::

    python tests/test_v2_fixture.py --record
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_v1_fixture import FIRST_VALUES, fingerprint, write_images

REFERENCE = Path(__file__).parent / "fixtures" / "v2_reference.json"
EPOCHS = 3
# Logged numbers compared exactly (``exact``) or within 1e-3 (``tolerant``, losses only).
LOGGED = ("train_loss", "train_loss_per_head", "lr", "spherical_objective", "n_nonempty", "nmi_labels",
          "cluster_acc", "knn_top1", "knn_top5")

SETTINGS = ["--recipe", "v2-small", "--epochs", str(EPOCHS), "--feature_dim", "32", "--resize", "20", "--crop", "20",
            "--crop_sizes", "20,16", "--crop_counts", "2,2", "--crop_min_scales", "0.3,0.1",
            "--crop_max_scales", "1,0.3", "--prototypes", "5,4", "--projection_hidden", "32",
            "--projection_dim", "16", "--batch_size", "8", "--feature_batch_size", "16", "--kmeans_iters", "5",
            "--warmup_epochs", "1", "--lr", "0.3", "--final_lr", "0.003", "--workers", "0", "--threads", "1",
            "--device", "cpu", "--tensorboard", "false", "--seed", "11"]


def summarise(tensors: list[tuple[str, torch.Tensor]]) -> tuple[str, dict]:
    """sha256 of the tensors' bytes in order, and per tensor its shape, sum, sum of squares
    and first values (numpy sums: a torch sum's order depends on the thread count)."""
    digest, summary = hashlib.sha256(), {}
    for name, tensor in tensors:
        values = tensor.detach().cpu().contiguous()
        digest.update(values.numpy().tobytes())
        as_double = values.numpy().astype(np.float64).ravel()
        summary[name] = {"shape": list(values.shape), "dtype": str(values.dtype),
                         "sum": float(as_double.sum()), "sum_squares": float((as_double ** 2).sum()),
                         "first": as_double[:FIRST_VALUES].tolist()}
    return digest.hexdigest(), summary


def observe(tmp: Path) -> dict:
    """Run the reference's training in ``tmp``; what it produced, as plain values."""
    from deepcluster.checkpoint import load_checkpoint
    from deepcluster.cli import main

    data, run = tmp / "data", tmp / "run"
    write_images(data)
    threads = torch.get_num_threads()
    try:
        code = main(["train", *SETTINGS, "--data", str(data), "--val", str(data), "--out", str(run)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assignments = {f"epoch_{e:04d}": np.load(run / "assignments" / f"epoch_{e:04d}.npy").tolist()
                   for e in range(1, EPOCHS + 1)}
    assignments["final"] = np.load(run / "assignments" / "final.npy").tolist()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    saved = load_checkpoint(run / "checkpoint.pt")
    network = sorted({**saved["model"], **{f"head.{k}": v for k, v in saved["head"].items()}}.items())
    sha256, tensors = summarise(network)
    bank_sha256, bank = summarise([("bank", saved["bank"]), ("bank_decoded", saved["bank_decoded"].to(torch.uint8))])
    return {"fingerprint": fingerprint(), "assignments": assignments,
            "logged": {key: [as_recorded(key, record.get(key)) for record in log] for key in LOGGED},
            "sha256": sha256, "tensors": tensors, "bank_sha256": bank_sha256, "bank": bank}


def as_recorded(key: str, value):
    """A logged value in the reference's unit: ``cluster_acc`` is logged in percent now and
    was recorded as a fraction (the same number divided by 100, bit for bit)."""
    return value / 100.0 if key == "cluster_acc" and value is not None else value


def mode() -> str:
    """``exact`` on a machine like the recording one, else ``tolerant`` (see the module doc)."""
    if not REFERENCE.is_file():
        return "missing"
    return "exact" if json.loads(REFERENCE.read_text())["fingerprint"] == fingerprint() else "tolerant"


def close_tensors(got: dict, expected: dict) -> None:
    """Each tensor's norm, sum and first values within 1e-3 of its norm, or 1e-5 a value."""
    for name, reference in expected.items():
        tensor = got[name]
        assert tensor["shape"] == reference["shape"] and tensor["dtype"] == reference["dtype"], name
        norm, size = np.sqrt(reference["sum_squares"]), np.prod(reference["shape"])
        np.testing.assert_allclose(np.sqrt(tensor["sum_squares"]), norm, rtol=0,
                                   atol=1e-3 * norm + 1e-5 * np.sqrt(size), err_msg=name)
        np.testing.assert_allclose(tensor["sum"], reference["sum"], rtol=0, atol=1e-3 * norm + 1e-5 * size,
                                   err_msg=name)
        np.testing.assert_allclose(tensor["first"], reference["first"], rtol=1e-3, atol=1e-3 * norm + 1e-5,
                                   err_msg=name)


@pytest.mark.parametrize("comparison", [mode()])
def test_a_tiny_v2_run_matches_the_reference_recorded_before_the_shared_loop(comparison, tmp_path):
    assert comparison != "missing", f"no reference: record it with python {__file__} --record"
    reference = json.loads(REFERENCE.read_text())
    got = observe(tmp_path)
    print(f"v2 fixture: {comparison} comparison (reference {reference['fingerprint']}, here {got['fingerprint']})")
    assert sorted(got["tensors"]) == sorted(reference["tensors"]), "the network's tensors changed names"
    if comparison == "exact":
        assert got["assignments"] == reference["assignments"]
        assert got["logged"] == reference["logged"]
        assert got["sha256"] == reference["sha256"], "weights differ from the reference bit for bit"
        assert got["bank_sha256"] == reference["bank_sha256"], "the memory bank differs bit for bit"
        assert got["tensors"] == reference["tensors"]
        return
    for name, expected in reference["assignments"].items():
        same = np.mean(np.asarray(got["assignments"][name]) == np.asarray(expected))
        assert same >= 0.9, f"{name}: only {same:.0%} of the images keep the reference's cluster"
    np.testing.assert_allclose(got["logged"]["train_loss"], reference["logged"]["train_loss"], rtol=1e-3)
    np.testing.assert_allclose(got["logged"]["train_loss_per_head"], reference["logged"]["train_loss_per_head"],
                               rtol=1e-3)
    close_tensors(got["tensors"], reference["tensors"])
    close_tensors(got["bank"], reference["bank"])


def record(path: Path = REFERENCE) -> None:
    """Write the reference from this code and machine (to ``path``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        observed = observe(Path(tmp))
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(observed, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes, {observed['fingerprint']})")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(f"usage: python {sys.argv[0]} --record   (or run it with pytest)")
    record()
