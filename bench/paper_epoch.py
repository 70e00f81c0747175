"""One epoch of the paper recipe on an image folder: time per stage and peak memory.

    python bench/paper_epoch.py --data /tmp/data/imagenette/train [--precision bf16]

Runs the real training loop (AlexNet-BN, Sobel, 224 px, batch 256, k = 100 unless
overridden) for one epoch in a fresh run folder and writes a JSON record next to this
script. Peak memory is reported three ways: the largest resident set of the main process
and of any one data-loading worker (``getrusage``), and the largest total over the whole
process tree, sampled every 0.2 s as the sum of each process's proportional set size
(``/proc/PID/smaps_rollup`` Pss: pages shared between the main process and its forked
workers counted once), which is the figure to set beside another program's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from deepcluster.config import resolve
from deepcluster.train import run
from machine import PeakSampler, cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="image folder (e.g. Imagenette's train/)")
    parser.add_argument("--n_clusters", type=int, default=100)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        config = resolve("paper", overrides={"data": args.data, "out_dir": out_dir, "epochs": 1,
                                             "n_clusters": args.n_clusters, "precision": args.precision,
                                             "workers": args.workers, "final_clustering": False,
                                             "tensorboard": False})
        sampler = PeakSampler()
        sampler.start()
        start = time.perf_counter()
        record = run(config)[0]
        wall = time.perf_counter() - start
        peak_tree = sampler.stop()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    result = {
        "data": args.data, "n_images": record["n_images"], "n_clusters": args.n_clusters,
        "precision": args.precision, "workers": args.workers,
        "wall_s": round(wall, 1),
        "features_s": round(record["time_features"], 1),
        "features_images_per_s": round(record["n_images"] / record["time_features"], 1),
        "pca_s": round(record["time_pca"], 2), "kmeans_s": round(record["time_kmeans"], 2),
        "training_s": round(record["time_training"], 1),
        "training_images_per_s": round(record["train_images_per_s"], 1),
        "peak_rss_main_gib": round(own, 2), "peak_rss_worker_gib": round(workers, 2),
        "peak_pss_total_gib": round(peak_tree, 2),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    Path(args.output).mkdir(parents=True, exist_ok=True)
    name = f"paper_epoch_{args.precision}.json"
    (Path(args.output) / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
