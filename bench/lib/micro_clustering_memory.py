"""Peak memory of DeepCluster's clustering stage at ImageNet scale, with simulated features.

    OPENBLAS_CORETYPE=SkylakeX python bench/micro.py clustering-memory [--n_iter 2]

The reference holds all 1,281,167 x 4096 float32 features (21 GB) to fit its PCA. Here
the features are generated chunk by chunk in a random order (as a shuffled feature pass
would produce them) and fed to :class:`deepcluster.clustering.StreamingPCA`, which keeps
only its PCA sample at full width and ``N x 256`` afterwards; then k-means with k = 10,000
runs on the reduced points. The script reports the process's peak resident memory
(``VmHWM``) after each stage and the time of each stage, and writes
``bench/results/clustering_memory.json``.

Simulated features: 1,000 class centres plus a rank-64 common component plus isotropic
noise, 4096-d float32 (values only matter for timing, not for memory).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from deepcluster.clustering import StreamingPCA, kmeans


def memory_gib() -> dict[str, float]:
    """Current (``VmRSS``) and peak (``VmHWM``) resident memory of this process, GiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _ = line.split()
                values[name.rstrip(":")] = int(amount) / 2**20  # kB -> GiB
    return {"rss_gib": round(values["VmRSS"], 3), "peak_gib": round(values["VmHWM"], 3)}


class FeatureSimulator:
    """Deterministic stand-in for a network's 4096-d features: ``(m, D)`` float32 rows."""

    def __init__(self, dim: int, n_classes: int = 1000, rank: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centers = rng.standard_normal((n_classes, dim), dtype=np.float32)
        self.mixing = rng.standard_normal((rank, dim), dtype=np.float32) * 0.5
        self.rng = rng

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        features = self.rng.standard_normal((len(rows), self.centers.shape[1]), dtype=np.float32)
        features += self.centers[rows % len(self.centers)]
        features += self.rng.standard_normal((len(rows), len(self.mixing)), dtype=np.float32) @ self.mixing
        return features


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="micro.py clustering-memory", description=__doc__.splitlines()[0])
    parser.add_argument("--n_rows", type=int, default=1_281_167, help="images (ImageNet train: 1,281,167)")
    parser.add_argument("--dim", type=int, default=4096, help="feature width (AlexNet fc7: 4096)")
    parser.add_argument("--n_components", type=int, default=256)
    parser.add_argument("--sample_size", type=int, default=100_000, help="rows the PCA is fitted on")
    parser.add_argument("--n_clusters", type=int, default=10_000)
    parser.add_argument("--n_iter", type=int, default=2, help="k-means iterations (the paper: 20)")
    parser.add_argument("--backend", default="faiss", choices=["faiss", "torch"])
    parser.add_argument("--chunk", type=int, default=8192, help="rows per simulated feature batch")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent.parent / "results"))
    args = parser.parse_args(argv)

    stages: dict[str, dict] = {"imports": {**memory_gib(), "seconds": 0.0}}
    order = np.random.default_rng(1).permutation(args.n_rows)  # the shuffled feature pass
    simulate = FeatureSimulator(args.dim)
    reducer = StreamingPCA(args.n_rows, args.n_components, whiten_power=-0.5, sample_size=args.sample_size)
    start = time.perf_counter()
    generate_s = 0.0
    for first in range(0, args.n_rows, args.chunk):
        rows = order[first:first + args.chunk]
        tick = time.perf_counter()
        features = simulate(rows)
        generate_s += time.perf_counter() - tick
        reducer.add(features, rows)
        if reducer.pca is not None and "pca_fit" not in stages:
            stages["pca_fit"] = {**memory_gib(), "seconds": round(time.perf_counter() - start - generate_s, 1)}
    points, pca = reducer.finish()
    del features
    stages["features_and_projection"] = {**memory_gib(), "seconds": round(time.perf_counter() - start - generate_s, 1),
                                         "of_which_generating_features_s": round(generate_s, 1)}
    start = time.perf_counter()
    result = kmeans(points, args.n_clusters, args.n_iter, seed=0, backend=args.backend)
    stages["kmeans"] = {**memory_gib(), "seconds": round(time.perf_counter() - start, 1),
                        "n_split": result.n_split, "n_empty": result.n_empty,
                        "objective": [round(v, 5) for v in result.objective]}
    full_width_gb = args.n_rows * args.dim * 4 / 1e9
    record = {
        "n_rows": args.n_rows, "dim": args.dim, "n_components": pca.n_components, "sample_size": args.sample_size,
        "n_clusters": args.n_clusters, "n_iter": args.n_iter, "backend": args.backend,
        "peak_rss_gib": memory_gib()["peak_gib"],
        "reference_features_gb": round(full_width_gb, 1),
        "reduced_points_gb": round(points.nbytes / 1e9, 2),
        "stages": stages,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "clustering_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))

