"""One prepared command for a machine with CUDA GPUs (under 8 minutes on one recent GPU):

    python bench/gpu_check.py                 # writes bench/results/gpu_check.json, prints a table
    python bench/gpu_check.py --tiny          # the same steps at toy sizes on the CPU (a dry run)

Steps, each timed and recorded (a step that fails is recorded with its one-line error and
the others still run):

1. ``tests``: the GPU-marked tests (``pytest -m gpu``).
2. ``train_*`` / ``features_*``: the paper recipe's network (AlexNet + Sobel, its pseudo-label
   head with k = 10,000) on synthetic 224 px images at batch 256, in fp32 and in bf16
   autocast, channels-last: training images/s (forward, cross-entropy, backward, SGD step
   with momentum) and feature-pass images/s (eval, no gradients, the clustered features).
   Synthetic uint8 images already on the GPU: the network's rate, not the data loading's.
3. ``kmeans``: the package's torch k-means on the GPU, N = 1,281,167 (ImageNet), d = 256,
   k = 10,000, 20 iterations, random L2-normalised points.
4. ``torchrun``: with two or more GPUs, a tiny two-process NCCL run of ``deepcluster train``
   (synthetic images written to a temporary folder): one log, one checkpoint.

Nothing here runs on this project's CPU-only test machine except ``--tiny``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FULL = {"batch": 256, "size": 224, "k": 10_000, "warmup": 3, "steps": 20,
        "n_points": 1_281_167, "dim": 256, "n_clusters": 10_000, "kmeans_iters": 20}
TINY = {"batch": 4, "size": 64, "k": 10, "warmup": 1, "steps": 2,
        "n_points": 2_000, "dim": 16, "n_clusters": 10, "kmeans_iters": 3}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network(device: torch.device, sizes: dict):
    """The paper recipe's backbone and a k-way head, on ``device``, channels-last."""
    from deepcluster.config import resolve
    from deepcluster.models import model_from_config
    from deepcluster.models.heads import ClassifierHead, WithHead

    config = resolve("paper", overrides={"n_clusters": sizes["k"]})
    model = model_from_config(config).to(device).to(memory_format=torch.channels_last)
    head = ClassifierHead.for_backbone(model)
    head.reset(sizes["k"], device)
    return config, model, WithHead(model, head)


def images(device: torch.device, sizes: dict, config) -> torch.Tensor:
    from deepcluster.data import Normalize

    raw = torch.randint(0, 256, (sizes["batch"], 3, sizes["size"], sizes["size"]), dtype=torch.uint8, device=device)
    return Normalize(config.mean, config.std)(raw, device, True)


def rate(step, device: torch.device, sizes: dict) -> float:
    for _ in range(sizes["warmup"]):
        step()
    synchronise(device)
    start = time.perf_counter()
    for _ in range(sizes["steps"]):
        step()
    synchronise(device)
    return sizes["batch"] * sizes["steps"] / (time.perf_counter() - start)


def train_rate(device: torch.device, sizes: dict, bf16: bool) -> dict:
    config, model, net = network(device, sizes)
    batch = images(device, sizes, config)
    targets = torch.randint(0, sizes["k"], (sizes["batch"],), device=device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = net(batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {"images_per_s": rate(step, device, sizes)}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


@torch.no_grad()
def feature_rate(device: torch.device, sizes: dict, bf16: bool) -> dict:
    config, model, _ = network(device, sizes)
    batch = images(device, sizes, config)
    model.eval()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model.forward_clustered(batch).float().cpu()  # the pass copies each batch's rows out

    return {"images_per_s": rate(step, device, sizes)}


def kmeans_time(device: torch.device, sizes: dict) -> dict:
    from deepcluster.clustering import kmeans

    generator = torch.Generator(device=device).manual_seed(0)
    points = torch.randn(sizes["n_points"], sizes["dim"], device=device, generator=generator)
    points = torch.nn.functional.normalize(points, dim=1)
    synchronise(device)
    start = time.perf_counter()
    result = kmeans(points, sizes["n_clusters"], sizes["kmeans_iters"], seed=0, backend="torch", device=str(device))
    synchronise(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "seconds_per_iteration": seconds / (sizes["kmeans_iters"] + 1),
            "objective": float(result.objective[-1]), "n_split": int(result.n_split)}


def gpu_tests(tiny: bool) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")]
    if tiny:
        return {"skipped": "--tiny: " + " ".join(command[1:])}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    return {"returncode": done.returncode, "summary": (done.stdout.strip().splitlines() or [""])[-1]}


def torchrun_check(tiny: bool) -> dict:
    if tiny or torch.cuda.device_count() < 2:
        return {"skipped": "needs two CUDA GPUs"}
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        data, out = Path(folder) / "images", Path(folder) / "run"
        rng = np.random.default_rng(0)
        for i in range(64):
            (data / str(i % 4)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / str(i % 4) / f"{i}.png")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                   "deepcluster", "train", "--recipe", "small", "--data", str(data), "--out", str(out), "--epochs", "2",
                   "--n_clusters", "4", "--batch_size", "8", "--pca_dim", "8", "--device", "cuda",
                   "--kmeans_backend", "torch", "--sync_batchnorm", "on", "--tensorboard", "false"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
        lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").is_file() else []
        return {"returncode": done.returncode, "log_lines": len(lines), "checkpoint": (out / "checkpoint.pt").is_file(),
                "tail": (done.stdout + done.stderr).strip().splitlines()[-3:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (checks the script runs)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU here; run it on a GPU machine (or --tiny for a dry run on the CPU)",
              file=sys.stderr)
        return 2
    sizes = TINY if args.tiny else FULL
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results: dict = {"sizes": sizes, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "gpus": torch.cuda.device_count()}
    steps = {"tests": lambda: gpu_tests(args.tiny),
             "train_fp32": lambda: train_rate(device, sizes, False),
             "train_bf16": lambda: train_rate(device, sizes, True),
             "features_fp32": lambda: feature_rate(device, sizes, False),
             "features_bf16": lambda: feature_rate(device, sizes, True),
             "kmeans": lambda: kmeans_time(device, sizes),
             "torchrun": lambda: torchrun_check(args.tiny)}
    began = time.perf_counter()
    for name, step in steps.items():
        start = time.perf_counter()
        try:
            results[name] = step()
        except Exception as error:  # noqa: BLE001 - record it, run the other steps
            results[name] = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}
        results[name]["wall_s"] = round(time.perf_counter() - start, 2)
        print(f"{name:14s} {json.dumps(results[name])}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["total_s"] = round(time.perf_counter() - began, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"gpu_check: {results['total_s']} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
