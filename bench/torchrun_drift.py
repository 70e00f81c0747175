"""Is the drift between one and two torchrun processes a wrong split, or rounding?

    python bench/torchrun_drift.py [--epochs 2]

Trains the tiny run of ``tests/test_torchrun.py`` (36 noisy 32 px images, dropout off,
global batch 8) three ways: one process with 1 thread, one process with 2 threads, and two
gloo processes with SyncBatchNorm (1 thread each). Prints, for a few layers, how far the
two-thread run and the two-process run end from the one-thread run, and each run's loss per
epoch. If the two-process run is no farther from the one-thread run than the two-thread run
is, the difference is rounding grown by training, not work split wrongly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_torchrun import NO_DROPOUT, TINY, folder  # noqa: E402

LAYERS = ("features.8.weight", "features.8.bias", "features.22.bias", "classifier.1.weight", "classifier.4.weight")


def train(script: Path, data: Path, out: Path, epochs: int, processes: int, threads: int) -> None:
    args = ["train", "--data", str(data), *TINY, "--epochs", str(epochs), "--final_clustering", "false",
            "--out", str(out), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        command = [sys.executable, str(script), *args, "--batch_size", "8"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(script), *args, "--batch_size", str(8 // processes), "--sync_batchnorm", "on"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{out.name} failed:\n{result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dc-drift-") as scratch:
        root = Path(scratch)
        data = folder(root / "images", 36)
        script = root / "no_dropout.py"
        script.write_text(NO_DROPOUT)
        runs = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2), "2 processes": (2, 1)}
        weights, losses = {}, {}
        for name, (processes, threads) in runs.items():
            out = root / name.replace(" ", "_").replace(",", "")
            train(script, data, out, args.epochs, processes, threads)
            weights[name] = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
            losses[name] = [json.loads(line)["train_loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    base = weights["1 process, 1 thread"]
    print(f"after {args.epochs} epoch(s), largest difference from '1 process, 1 thread' / largest value:")
    for layer in LAYERS:
        scale = base[layer].abs().max().item()
        cells = [f"{name}: {(weights[name][layer] - base[layer]).abs().max().item() / scale:.1e}"
                 for name in ("1 process, 2 threads", "2 processes")]
        print(f"  {layer:22s} " + "   ".join(cells))
    for name, values in losses.items():
        print(f"loss per epoch, {name}: " + ", ".join(f"{v:.5f}" for v in values))


if __name__ == "__main__":
    main()
