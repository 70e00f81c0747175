"""How far two torchrun processes end from one on the digits recipe (dropout on).

    python bench/torchrun_digits.py [--epochs 2]

Trains the digits recipe (1,797 8x8 digits at 32 px, smallnet with dropout, global batch 32)
three ways, one thread per process: one process, one process with 2 threads, and two gloo
processes with 16 images each. After each epoch it prints the median (over parameter
tensors) relative difference ``|w - w_ref| / |w_ref|`` of the weights from the one-process,
one-thread run, and how many of the 1,797 assignments of the next epoch differ from it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ARGS = ["train", "--recipe", "digits", "--final_clustering", "false", "--tensorboard", "false", "--workers", "0"]


def train(out: Path, epochs: int, processes: int, threads: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    args = [*ARGS, "--out", str(out), "--epochs", str(epochs), "--threads", str(threads)]
    if (out / "checkpoint.pt").is_file():
        args.append("--resume")
    if processes == 1:
        command = [sys.executable, "-m", "deepcluster", *args, "--batch_size", "32"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "deepcluster", *args, "--batch_size", str(32 // processes)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{out.name} failed:\n{result.stderr[-2000:]}")


def relative_difference(a: dict, b: dict) -> float:
    values = [float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12))
              for k in b if b[k].is_floating_point() and "running" not in k]
    return float(np.median(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    runs = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2), "2 processes": (2, 1)}
    with tempfile.TemporaryDirectory(prefix="dc-digits-drift-") as scratch:
        root = Path(scratch)
        weights: dict[str, dict[int, dict]] = {name: {} for name in runs}
        for epoch in range(1, args.epochs + 1):
            for name, (processes, threads) in runs.items():
                out = root / name.replace(" ", "_").replace(",", "")
                train(out, epoch, processes, threads)
                weights[name][epoch] = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        reference = root / "1_process_1_thread"
        for epoch in range(1, args.epochs + 1):
            for name in list(runs)[1:]:
                out = root / name.replace(" ", "_").replace(",", "")
                line = (f"epoch {epoch}: {name}: median relative weight difference "
                        f"{100 * relative_difference(weights[name][epoch], weights['1 process, 1 thread'][epoch]):.1f}%")
                if epoch > 1:
                    a = np.load(out / "assignments" / f"epoch_{epoch:04d}.npy")
                    b = np.load(reference / "assignments" / f"epoch_{epoch:04d}.npy")
                    line += f", epoch {epoch}'s assignments: {int((a != b).sum())} of {len(b)} differ"
                print(line, flush=True)


if __name__ == "__main__":
    main()
