"""Power Iteration Clustering on 100,000 points: time per stage and clusters found.

    OPENBLAS_CORETYPE=SkylakeX python bench/micro.py pic [--n_points 100000] [--knn_backend faiss]

Points: 256-d, L2-normalised, drawn around 1,000 random class directions (like
PCA-whitened, normalised DeepCluster features). Runs :func:`deepcluster.clustering.pic`
with the reference settings (5-NN, sigma 0.2, alpha 0.001, 200 iterations) and writes
``bench/results/pic_<n_points>.json``: seconds per stage, clusters found (before and
after merging singletons), NMI with the generating classes, and the k-NN recall of the
approximate graph on a 20,000-point subset (against the exact one).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from deepcluster.clustering import knn_graph, l2_normalize, nmi, pic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="micro.py pic", description=__doc__.splitlines()[0])
    parser.add_argument("--n_points", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n_classes", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.8, help="noise std per dimension, classes have unit norm")
    parser.add_argument("--knn_backend", default="faiss", choices=["faiss", "torch"])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent.parent / "results"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((args.n_classes, args.dim), dtype=np.float32)
    classes = rng.integers(0, args.n_classes, args.n_points)
    points = l2_normalize(centers[classes] + args.noise * rng.standard_normal((args.n_points, args.dim),
                                                                               dtype=np.float32))
    start = time.perf_counter()
    result = pic(points, knn_backend=args.knn_backend)
    total = time.perf_counter() - start
    subset = points[:20000]
    exact, _ = knn_graph(subset, 5, "faiss", exact_max_points=len(subset))
    approx, _ = knn_graph(subset, 5, "faiss", exact_max_points=0)
    recall = float(np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx, exact)]))
    record = {
        "n_points": args.n_points, "dim": args.dim, "n_classes": args.n_classes, "noise": args.noise,
        "knn_backend": args.knn_backend, "seconds_total": round(total, 2),
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
        "n_clusters": result.n_clusters, "n_roots": result.n_roots, "n_merged_singletons": result.n_merged,
        "nmi_with_classes": round(nmi(classes, result.assignments), 4),
        "approximate_knn_recall_at_5_on_20000": round(recall, 4),
        "load_average_after": os.getloadavg(), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / f"pic_{args.n_points}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))

