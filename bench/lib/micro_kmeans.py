"""k-means speed against raw faiss, scikit-learn and the machine's GEMM rate, on the same data.

    OPENBLAS_CORETYPE=SkylakeX python bench/micro.py kmeans [--cases small,large] [--repeats 3]

For each case (``small``: N = 100,000, d = 256, k = 1,000, 20 iterations, the issue's
setting; ``large``: N = 250,000, d = 256, k = 10,000, 5 iterations, ImageNet's k), on one
seeded data set (a Gaussian mixture, PCA-like width, L2-normalised rows) and one set of
starting centroids (k distinct points), it times:

- ``deepcluster faiss`` and ``deepcluster torch``: :func:`deepcluster.clustering.kmeans`;
- ``raw faiss``: ``faiss.Kmeans(d, k, niter).train(x, init_centroids=c0)`` then the
  final ``index.search(x, 1)`` for the labels, what the reference implementation does
  (no subsampling: ``max_points_per_centroid`` set above N / k); and the same with
  faiss's query block raised from 4,096 to 16,384 rows
  (``faiss.cvar.distance_compute_blas_query_bs``), its best setting in our trials;
- ``scikit-learn``: ``KMeans(init=c0, n_init=1, max_iter, tol=0, algorithm="lloyd")``;
- dense float32 GEMMs (torch and numpy, the k-means shape and a square one): the
  machine's GEMM rate, measured before and after the k-means runs.

Each run does ``n_iter + 1`` nearest-centroid searches (``n_iter`` Lloyd iterations plus
the final assignment; scikit-learn: ``n_iter_ + 1``), so its effective rate is
``2 N k d (n_iter + 1) / time``. Methods are run round-robin ``--repeats`` times and the
fastest run of each is kept, so that a burst of load on a shared machine hits all methods
alike; wall and CPU time, and the load average, are recorded. The "CPU share" column is
CPU time / (wall time x threads): near 1.0 the run had the machine to itself; well below,
other processes took part of it (the machine is shared) and the wall times are inflated. Results go to
``bench/results/kmeans_<case>.json`` and a Markdown table is printed.

faiss-cpu 1.15's wheel bundles OpenBLAS 0.3.15, which does not recognise AMD Zen 5 and
falls back to its SSE3 (Prescott) kernels; ``OPENBLAS_CORETYPE`` (read when the library
loads, so set it in the environment) selects the AVX-512 kernels. The script records it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from deepcluster.clustering.search import packed_onednn_usable

CASES = {
    "small": {"n_points": 100_000, "dim": 256, "n_clusters": 1_000, "n_iter": 20},
    "large": {"n_points": 250_000, "dim": 256, "n_clusters": 10_000, "n_iter": 5},
}
METHODS = ("deepcluster faiss", "deepcluster torch", "raw faiss", "raw faiss (16k query blocks)", "scikit-learn")


def make_data(n_points: int, dim: int, n_clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(N, d)`` unit rows from a mixture of ``n_clusters`` Gaussians, and ``(k, d)``
    starting centroids (k distinct rows)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    points = np.empty((n_points, dim), dtype=np.float32)
    for start in range(0, n_points, 65536):
        stop = min(start + 65536, n_points)
        points[start:stop] = centers[rng.integers(0, n_clusters, stop - start)]
        points[start:stop] += 3.0 * rng.standard_normal((stop - start, dim), dtype=np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    start_centroids = points[rng.choice(n_points, n_clusters, replace=False)].copy()
    return points, start_centroids


@dataclass
class Timing:
    wall_s: float
    cpu_s: float
    objective: float | None = None
    searches: int | None = None


def timed(run: Callable[[], tuple[float | None, int | None]]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    objective, searches = run()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, objective, searches)


def cpu_share(timing: Timing) -> float:
    """CPU time over wall time times threads: 1.0 when the run had the whole machine."""
    return timing.cpu_s / max(timing.wall_s, 1e-9) / torch.get_num_threads()


def gemm_rates(dim: int, n_clusters: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of float32 matrix products: the k-means shape (16,384 x d) @ (d x k) and a
    square 4096^3, with torch (MKL), numpy (OpenBLAS) and, where available, oneDNN with
    packed weights (torch's ``mkldnn._linear_pointwise``); best of ``repeats``."""
    rng = np.random.default_rng(1)
    shapes = {"kmeans_shape": (16384, dim, n_clusters), "square_4096": (4096, 4096, 4096)}
    rates = {}
    for name, (m, kk, n) in shapes.items():
        a = rng.standard_normal((m, kk), dtype=np.float32)
        b = rng.standard_normal((kk, n), dtype=np.float32)
        a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
        out_t = torch.empty(m, n)
        products = [("torch", lambda: torch.mm(a_t, b_t, out=out_t)), ("numpy", lambda: a @ b)]
        if packed_onednn_usable():  # the product the torch backend uses, weights packed once
            packed = torch.ops.mkldnn._reorder_linear_weight(b_t.t().contiguous(), m)
            products.append(("onednn", lambda: torch.ops.mkldnn._linear_pointwise(a_t, packed, None, "none", [], "")))
        for library, product in products:
            product()  # warm-up: first-touch of the output, thread start
            best = min((timed(lambda: (product(), None, None)[1:]) for _ in range(repeats)), key=lambda t: t.wall_s)
            rates[f"{library}_{name}"] = 2.0 * m * kk * n / best.wall_s / 1e9
            rates[f"{library}_{name}_cpu_share"] = cpu_share(best)
    return rates


def run_method(method: str, points: np.ndarray, start: np.ndarray, n_iter: int) -> Timing:
    n_clusters, dim = start.shape
    if method.startswith("deepcluster"):
        from deepcluster.clustering import kmeans

        backend = method.split()[1]
        return timed(lambda: (kmeans(points, n_clusters, n_iter, seed=0, backend=backend, init=start).objective[-1],
                              n_iter + 1))
    if method.startswith("raw faiss"):
        import faiss

        def raw_faiss() -> tuple[float, int]:
            faiss.cvar.distance_compute_blas_query_bs = 16384 if "16k" in method else 4096
            model = faiss.Kmeans(dim, n_clusters, niter=n_iter, seed=0, verbose=False,
                                 max_points_per_centroid=len(points) // n_clusters + 1)
            model.train(points, init_centroids=start)
            distances, _ = model.index.search(points, 1)
            return float(distances.mean()), n_iter + 1
        return timed(raw_faiss)
    if method == "scikit-learn":
        from sklearn.cluster import KMeans

        def sklearn() -> tuple[float, int]:
            model = KMeans(n_clusters, init=start, n_init=1, max_iter=n_iter, tol=0.0, algorithm="lloyd",
                           random_state=0).fit(points)
            return float(model.inertia_ / len(points)), int(model.n_iter_) + 1
        return timed(sklearn)
    raise ValueError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")


def machine() -> dict:
    model = "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        model = f"{fields.get('Model name', '?').strip()} (family {fields.get('CPU family', '?').strip()}), " \
                f"{fields.get('CPU(s)', '?').strip()} CPUs, AVX-512: {'avx512f' in fields.get('Flags', '')}"
    except (OSError, subprocess.CalledProcessError):
        pass
    import faiss
    import sklearn

    return {"cpu": model, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(), "numpy": np.__version__, "scikit_learn": sklearn.__version__,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), "gpu": torch.cuda.is_available()}


def per_cpu_gemm_rate(result: dict) -> tuple[float, str]:
    """Best GEMM rate per CPU-second (GFLOP/s / busy cores), and which product gave it."""
    threads = result["machine"]["torch_threads"]
    best, name = 0.0, ""
    for when in ("before", "after"):
        rates = result[f"gemm_gflops_{when}"]
        for key, rate in rates.items():
            if key.endswith("_cpu_share"):
                continue
            per_cpu = rate / max(rates[f"{key}_cpu_share"] * threads, 1e-9)
            if per_cpu > best:
                best, name = per_cpu, f"{key} ({when})"
    return best, name


def markdown(results: list[dict]) -> str:
    """The results as a Markdown table.

    Two shares of the GEMM rate: by wall time (what a user waits for) and by CPU time
    (work done per busy core-second), which stays comparable when other processes take
    a varying part of a shared machine between the GEMM measurement and a run.
    """
    lines = ["| case | method | wall s | CPU share | GFLOP/s (wall) | GFLOP per CPU-s | share of GEMM, wall | "
             "share of GEMM, per CPU-s | time / raw faiss | final objective |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        case = result["case"]
        label = f"N={case['n_points']:,} d={case['dim']} k={case['n_clusters']:,} it={case['n_iter']}"
        raw = result["methods"]["raw faiss"]["wall_s"]
        gemm_per_cpu, gemm_per_cpu_name = per_cpu_gemm_rate(result)
        for method, row in result["methods"].items():
            flops = 2.0 * case["n_points"] * case["n_clusters"] * case["dim"] * row["searches"]
            per_cpu = flops / row["cpu_s"] / 1e9
            lines.append(f"| {label} | {method} | {row['wall_s']:.2f} | {row['cpu_share']:.2f} | {row['gflops']:.1f} | "
                         f"{per_cpu:.1f} | {100 * row['share_of_gemm']:.0f}% | {100 * per_cpu / gemm_per_cpu:.0f}% | "
                         f"{row['wall_s'] / raw:.2f}x | {row['objective']:.5f} |")
        rates = result["gemm_gflops_before"]
        lines.append(f"| {label} | GEMM, best by wall ({result['gemm_best']}) | | {result['gemm_cpu_share']:.2f} | "
                     f"{result['gemm_rate']:.1f} | | 100% | | | |")
        lines.append(f"| {label} | GEMM, best per CPU-s ({gemm_per_cpu_name}) | | | | "
                     f"{gemm_per_cpu:.1f} | | 100% | | |")
        libraries = [name for name in ("torch", "numpy", "onednn") if f"{name}_kmeans_shape" in rates]
        lines.append(f"| {label} | GEMM {' / '.join(libraries)}, k-means shape (before) | | | "
                     + " / ".join(f"{rates[f'{name}_kmeans_shape']:.1f}" for name in libraries) + " | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="micro.py kmeans", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="small,large", help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin repeats; the fastest run is kept")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent.parent / "results"))
    parser.add_argument("--report", action="store_true",
                        help="only print the table of the results already in --output, for --cases")
    args = parser.parse_args(argv)
    if args.report:
        print(markdown([json.loads((Path(args.output) / f"kmeans_{name}.json").read_text())
                        for name in args.cases.split(",")]))
        return
    methods = [m.strip() for m in args.methods.split(",")]
    info = machine()
    print(json.dumps(info, indent=2))
    results = []
    for case_name in args.cases.split(","):
        case = CASES[case_name]
        points, start = make_data(case["n_points"], case["dim"], case["n_clusters"])
        load_before = os.getloadavg()
        before = gemm_rates(case["dim"], case["n_clusters"])
        runs: dict[str, list[Timing]] = {m: [] for m in methods}
        for repeat in range(args.repeats):
            for method in methods:
                timing = run_method(method, points, start, case["n_iter"])
                runs[method].append(timing)
                print(f"{case_name} repeat {repeat}: {method}: {timing.wall_s:.2f} s wall, {timing.cpu_s:.2f} s CPU, "
                      f"objective {timing.objective:.5f}", flush=True)
        after = gemm_rates(case["dim"], case["n_clusters"])
        both = {f"{name} ({when})": rate for when, rates in (("before", before), ("after", after))
                for name, rate in rates.items() if not name.endswith("cpu_share")}
        gemm_best = max(both, key=both.get)
        gemm_rate = both[gemm_best]
        name, when = gemm_best.rsplit(" (", 1)
        gemm_cpu_share = (before if when.startswith("before") else after)[f"{name}_cpu_share"]
        per_method = {}
        for method, timings in runs.items():
            best = min(timings, key=lambda t: t.wall_s)
            flops = 2.0 * case["n_points"] * case["n_clusters"] * case["dim"] * best.searches
            per_method[method] = {
                "wall_s": best.wall_s, "cpu_s": best.cpu_s, "all_wall_s": [t.wall_s for t in timings],
                "searches": best.searches, "objective": best.objective, "gflops": flops / best.wall_s / 1e9,
                "cpu_share": cpu_share(best),
                "share_of_gemm": flops / best.wall_s / 1e9 / gemm_rate,
            }
        result = {"case": case, "case_name": case_name, "machine": info, "methods": per_method,
                  "gemm_gflops_before": before, "gemm_gflops_after": after, "gemm_rate": gemm_rate,
                  "gemm_cpu_share": gemm_cpu_share,
                  "gemm_best": gemm_best, "load_average_before": load_before, "load_average_after": os.getloadavg()}
        results.append(result)
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / f"kmeans_{case_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(results))

