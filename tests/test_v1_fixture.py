"""Proof that DeepCluster v1 does not change: a tiny seeded run against a recorded reference.

A three-epoch ``small``-recipe run on 30 synthetic PNG images (written here, lossless, so
every machine decodes the same pixels) must give the assignments and final weights stored
in ``fixtures/v1_reference_<CPU>.json``, which were recorded with the code as it was before
the package was reshaped (the AVX-512 one later, from unchanged code: it has the same
assignments and losses as the AVX2 one).

Floats depend on the CPU: oneDNN and the BLAS pick kernels by instruction set. So there is
one reference per CPU capability class (``torch.backends.cpu.get_cpu_capability()``: AVX2,
AVX512), each with the library versions that recorded it, and the test runs in one of two
modes (named in its test id and printed):

- ``exact`` (a reference for this CPU class, recorded with the same torch, numpy and faiss):
  every epoch's assignments equal, the losses equal and the weights bit for bit (sha256 of
  their bytes);
- ``tolerant`` (no such reference: another CPU class or other library versions; compared
  with this class's reference, or the first class's): at most one image per epoch in
  another cluster, the losses within 1e-6 relative, each tensor's norm, sum and leading
  values within 1e-5 of its norm plus an absolute floor of 1e-8 per value (the AVX2 and
  AVX-512 recordings agree to 4e-7 relative on every tensor except the convolutions' biases
  before BatchNorm, which get no gradient and sit at 1e-10, where they differ by up to 20%).

Record this CPU class's reference (when it has none, or when a change of v1's numbers is
intended: then re-record every class and say so in the commit)::

    python tests/test_v1_fixture.py --record
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
N_IMAGES, SIZE, EPOCHS = 30, 20, 3
FIRST_VALUES = 2  # leading values of each tensor stored verbatim

SETTINGS = ["--recipe", "small", "--epochs", str(EPOCHS), "--n_clusters", "5", "--batch_size", "8",
            "--feature_batch_size", "16", "--workers", "0", "--threads", "1", "--pca_dim", "8",
            "--kmeans_iters", "5", "--feature_dim", "32", "--device", "cpu", "--tensorboard", "false",
            "--seed", "7",
            # The paper's loop as the small recipe ran it when the fixture was recorded; pinned so
            # that the recipe can change without changing what this test guards.
            "--sobel", "true", "--clustered", "fc", "--fc_init", "reference", "--kmeans_init", "random",
            "--carry_clusters", "false", "--color_jitter", "0", "--grayscale_prob", "0", "--hflip", "true"]


def fingerprint() -> dict[str, str]:
    """What decides the floats of a CPU run: the libraries and the CPU's kernel dispatch."""
    import faiss

    return {"torch": torch.__version__, "numpy": np.__version__, "faiss": faiss.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def write_images(root: Path) -> None:
    """``N_IMAGES`` RGB PNGs of three families (stripes, rings, checkers) in class folders.

    Like ``conftest.make_pattern``, on purpose not shared with it: the reference's inputs
    must stay exactly as recorded whatever other tests' images become."""
    from PIL import Image

    rng = np.random.default_rng(2024)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    for index in range(N_IMAGES):
        kind = index % 3
        phase = rng.uniform(0, 2 * np.pi)
        if kind == 0:
            base = np.sin(x * 0.8 + phase)
        elif kind == 1:
            base = np.sin(np.hypot(x - SIZE / 2, y - SIZE / 2) * 0.9 + phase)
        else:
            base = np.sign(np.sin(x * 0.6 + phase) * np.sin(y * 0.6 + phase))
        colour = rng.uniform(0.3, 1.0, size=3)
        pixels = ((base[..., None] * 0.5 + 0.5) * colour * 255).clip(0, 255).astype(np.uint8)
        folder = root / ("stripes", "rings", "checkers")[kind]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")


def final_weights(run: Path) -> list[tuple[str, torch.Tensor]]:
    """The trained network's tensors (body and head) in a fixed order, by the names the
    reference was recorded with (the head was then the backbone's ``top_layer``)."""
    from deepcluster.checkpoint import load_checkpoint

    saved = load_checkpoint(run / "checkpoint.pt")
    head = {name.replace("linear.", "top_layer.", 1): tensor for name, tensor in saved.get("head", {}).items()}
    return sorted({**saved["model"], **head}.items())


def observe(tmp: Path) -> dict:
    """Run the reference's training in ``tmp``; what it produced, as plain values."""
    from deepcluster.cli import main

    data, run = tmp / "data", tmp / "run"
    write_images(data)
    threads = torch.get_num_threads()
    try:
        code = main(["train", *SETTINGS, "--data", str(data), "--out", str(run)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assignments = {f"epoch_{e:04d}": np.load(run / "assignments" / f"epoch_{e:04d}.npy").tolist()
                   for e in range(1, EPOCHS + 1)}
    assignments["final"] = np.load(run / "assignments" / "final.npy").tolist()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    digest = hashlib.sha256()
    tensors = {}
    for name, tensor in final_weights(run):
        values = tensor.detach().cpu().contiguous()
        digest.update(values.numpy().tobytes())
        # numpy, not torch: a torch sum's order depends on the thread count other tests leave.
        as_double = values.numpy().astype(np.float64).ravel()
        tensors[name] = {"shape": list(values.shape), "dtype": str(values.dtype),
                         "sum": float(as_double.sum()), "sum_squares": float((as_double ** 2).sum()),
                         "first": as_double[:FIRST_VALUES].tolist()}
    return {"fingerprint": fingerprint(), "assignments": assignments,
            "train_loss": [record["train_loss"] for record in log],
            "sha256": digest.hexdigest(), "tensors": tensors}


def reference_path(capability: str | None = None) -> Path:
    """The reference file of a CPU capability class (default: this machine's)."""
    return FIXTURES / f"v1_reference_{capability or torch.backends.cpu.get_cpu_capability()}.json"


def reference() -> tuple[str, dict | None]:
    """The comparison mode and the reference to compare with: ``exact`` with this CPU
    class's reference when its fingerprint is this machine's, else ``tolerant`` with it (or,
    for a class without one, with the first recorded class's); ``missing`` when none exists."""
    own = reference_path()
    if own.is_file():
        saved = json.loads(own.read_text())
        return ("exact" if saved["fingerprint"] == fingerprint() else "tolerant"), saved
    others = sorted(FIXTURES.glob("v1_reference_*.json"))
    return ("tolerant", json.loads(others[0].read_text())) if others else ("missing", None)


def mode() -> str:
    """``exact`` on a machine like a recording one, else ``tolerant`` (see the module doc)."""
    return reference()[0]


def assert_tolerant(got: dict, expected_run: dict) -> None:
    """The ``tolerant`` comparison (see the module doc)."""
    for name, expected in expected_run["assignments"].items():
        moved = int(np.sum(np.asarray(got["assignments"][name]) != np.asarray(expected)))
        assert moved <= 1, f"{name}: {moved} images left the reference's cluster (at most 1 may)"
    np.testing.assert_allclose(got["train_loss"], expected_run["train_loss"], rtol=1e-6, atol=0)
    for name, expected in expected_run["tensors"].items():
        tensor = got["tensors"][name]
        assert tensor["shape"] == expected["shape"] and tensor["dtype"] == expected["dtype"], name
        norm, size = np.sqrt(expected["sum_squares"]), int(np.prod(expected["shape"]))
        floor = 1e-8  # per value: the unused pre-BatchNorm biases sit at 1e-10
        np.testing.assert_allclose(np.sqrt(tensor["sum_squares"]), norm, rtol=1e-5, atol=floor * np.sqrt(size),
                                   err_msg=name)
        np.testing.assert_allclose(tensor["sum"], expected["sum"], rtol=0, atol=1e-5 * norm + floor * size,
                                   err_msg=name)
        np.testing.assert_allclose(tensor["first"], expected["first"], rtol=0, atol=1e-5 * norm + floor,
                                   err_msg=name)


@pytest.mark.parametrize("comparison", [mode()])
def test_a_tiny_v1_run_matches_the_reference_recorded_before_the_reshape(comparison, tmp_path):
    assert comparison != "missing", f"no reference: record it with python {__file__} --record"
    _, expected_run = reference()
    got = observe(tmp_path)
    print(f"v1 fixture: {comparison} comparison (reference {expected_run['fingerprint']}, here {got['fingerprint']})")
    assert sorted(got["tensors"]) == sorted(expected_run["tensors"]), "the network's tensors changed names"
    if comparison == "exact":
        assert got["assignments"] == expected_run["assignments"]
        assert got["train_loss"] == expected_run["train_loss"]
        assert got["sha256"] == expected_run["sha256"], "weights differ from the reference bit for bit"
        assert got["tensors"] == expected_run["tensors"]
        return
    assert_tolerant(got, expected_run)


def test_the_references_of_every_cpu_class_agree_on_assignments_and_losses():
    """The recorded classes differ only in float rounding: each passes the tolerant
    comparison against the first (a class recorded from changed code would fail here)."""
    recorded = [json.loads(path.read_text()) for path in sorted(FIXTURES.glob("v1_reference_*.json"))]
    assert {run["fingerprint"]["cpu_capability"] for run in recorded} >= {"AVX2", "AVX512"}
    for run in recorded[1:]:
        assert run["assignments"] == recorded[0]["assignments"]
        assert run["train_loss"] == recorded[0]["train_loss"]
        assert_tolerant(run, recorded[0])


def record() -> None:
    """Write the reference from this code and machine."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        observed = observe(Path(tmp))
    path = reference_path()
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(observed, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes, {observed['fingerprint']})")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(f"usage: python {sys.argv[0]} --record   (or run it with pytest)")
    record()
