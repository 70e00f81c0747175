"""Micro benchmarks of the clustering stage, on synthetic data (no network, no images):

    OPENBLAS_CORETYPE=SkylakeX python bench/micro.py kmeans [--cases small,large] [--repeats 3]
    OPENBLAS_CORETYPE=SkylakeX python bench/micro.py pic [--n_points 100000] [--knn_backend faiss]
    OPENBLAS_CORETYPE=SkylakeX python bench/micro.py clustering-memory [--n_iter 2]

- ``kmeans``: the package's k-means against raw faiss, scikit-learn and the machine's GEMM
  rate, on the same data (``bench/results/kmeans_<case>.json``; ``--report`` prints the
  table of files already written);
- ``pic``: Power Iteration Clustering on 100,000 points, seconds per stage and clusters
  found (``bench/results/pic_<n_points>.json``);
- ``clustering-memory``: peak memory of the clustering stage at ImageNet scale with simulated
  features (``bench/results/clustering_memory.json``).

``python bench/micro.py NAME --help`` gives each one's options and what it measures
(``bench/lib/micro_*.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHES = {"kmeans": "micro_kmeans", "pic": "micro_pic", "clustering-memory": "micro_clustering_memory"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        print(__doc__)
        print(f"micro.py: give one of: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(f"lib.{BENCHES[argv[0]]}")
    if len(argv) > 1 and argv[1] in ("-h", "--help"):
        print(module.__doc__)
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
