"""``run.py drift``: how far two torchrun processes (gloo) end from one process, beside how far
one process with 2 threads ends from one with 1 thread: a wrong split of the work, or rounding
grown by training?

Three runs of the same training, one after the other: one process with 1 thread, one
process with 2 threads, two processes with 1 thread each (each half the batch).

- ``--recipe digits`` (the default): the built-in digits (1,797 8x8 digits at 32 px, smallnet
  with dropout, global batch 32). After each epoch: the median (over parameter tensors)
  relative difference ``|w - w_ref| / |w_ref|`` from the one-thread run, and how many of the
  next epoch's assignments differ from it.
- ``--tiny``: the tiny run of ``tests/test_torchrun.py`` (36 noisy 32 px images, dropout off,
  global batch 8, SyncBatchNorm with two processes). After the last epoch: for a few layers,
  the largest difference from the one-thread run over the largest value; each run's losses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from lib import result as schema
from lib.trees import env_for

RUNS = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2), "2 processes": (2, 1)}
DIGITS = ["train", "--recipe", "digits", "--final_clustering", "false", "--tensorboard", "false", "--workers", "0"]
LAYERS = ("features.8.weight", "features.8.bias", "features.22.bias", "classifier.1.weight", "classifier.4.weight")


def folder_name(name: str) -> str:
    return name.replace(" ", "_").replace(",", "")


def launch(entry: list[str], args: list[str], processes: int, threads: int, batch: int, extra: list[str]) -> None:
    if processes == 1:
        command = [sys.executable, *entry, *args, "--batch_size", str(batch)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *entry, *args, "--batch_size", str(batch // processes), *extra]
    done = subprocess.run(command, env=env_for(None, threads), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run.py drift: a run failed:\n{done.stderr[-2000:]}")


def relative_difference(a: dict, b: dict) -> float:
    values = [float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12))
              for k in b if b[k].is_floating_point() and "running" not in k]
    return float(np.median(values))


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


def digits(epochs: int, root: Path) -> tuple[dict, list[str]]:
    """Epoch by epoch (each a resume of the last): weights and assignments against one thread."""
    weights: dict[str, dict[int, dict]] = {name: {} for name in RUNS}
    for epoch in range(1, epochs + 1):
        for name, (processes, threads) in RUNS.items():
            out = root / folder_name(name)
            args = [*DIGITS, "--out", str(out), "--epochs", str(epoch), "--threads", str(threads)]
            args += ["--resume"] if (out / "checkpoint.pt").is_file() else []
            launch(["-m", "deepcluster"], args, processes, threads, 32, [])
            weights[name][epoch] = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    reference, rows, lines = root / folder_name("1 process, 1 thread"), [], []
    for epoch in range(1, epochs + 1):
        for name in list(RUNS)[1:]:
            row = {"epoch": epoch, "run": name,
                   "median_relative_weight_difference": relative_difference(weights[name][epoch],
                                                                           weights["1 process, 1 thread"][epoch])}
            line = f"epoch {epoch}: {name}: median relative weight difference " \
                   f"{100 * row['median_relative_weight_difference']:.1f}%"
            if epoch > 1:
                a = np.load(root / folder_name(name) / "assignments" / f"epoch_{epoch:04d}.npy")
                b = np.load(reference / "assignments" / f"epoch_{epoch:04d}.npy")
                row["assignments_differing"], row["assignments"] = int((a != b).sum()), len(b)
                line += f", epoch {epoch}'s assignments: {row['assignments_differing']} of {len(b)} differ"
            rows.append(row)
            lines.append(line)
    return {"per_epoch": rows}, lines


def tiny(epochs: int, root: Path) -> tuple[dict, list[str]]:
    """After the last epoch: the largest difference of a few layers from one thread."""
    sys.path.insert(0, str(schema.ROOT / "tests"))
    from test_torchrun import NO_DROPOUT, TINY, folder

    data = folder(root / "images", 36)
    script = root / "no_dropout.py"
    script.write_text(NO_DROPOUT)
    weights = {}
    for name, (processes, threads) in RUNS.items():
        out = root / folder_name(name)
        args = ["train", "--data", str(data), *TINY, "--epochs", str(epochs), "--final_clustering", "false",
                "--out", str(out), "--threads", str(threads)]
        launch([str(script)], args, processes, threads, 8, ["--sync_batchnorm", "on"])
        weights[name] = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    base, layers = weights["1 process, 1 thread"], {}
    lines = [f"after {epochs} epoch(s), largest difference from '1 process, 1 thread' / largest value:"]
    for layer in LAYERS:
        scale = base[layer].abs().max().item()
        layers[layer] = {name: (weights[name][layer] - base[layer]).abs().max().item() / scale for name in list(RUNS)[1:]}
        lines.append(f"  {layer:22s} " + "   ".join(f"{name}: {value:.1e}" for name, value in layers[layer].items()))
    return {"layers": layers}, lines


def drift(args) -> int:
    epochs = args.epochs or 2
    result = schema.new_result("drift", args.name, {"data": "tiny" if args.tiny else "digits", "epochs": epochs,
                                                    "runs": {k: {"processes": p, "threads": t}
                                                             for k, (p, t) in RUNS.items()}})
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as scratch:
        root = Path(scratch)
        summary, lines = (tiny if args.tiny else digits)(epochs, root)
        for name, (processes, threads) in RUNS.items():
            records = losses(root / folder_name(name))
            result["runs"].append(schema.new_run(name, processes=processes, threads=threads, records=records))
            lines.append(f"loss per epoch, {name}: " + ", ".join(f"{r['train_loss']:.5f}" for r in records))
    result["summary"], result["table"] = summary, "\n".join(lines)
    print(result["table"])
    print(f"wrote {schema.write(result)}")
    return 0
