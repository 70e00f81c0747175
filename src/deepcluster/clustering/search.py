"""Nearest-centroid search: the one expensive step of k-means, behind one interface.

A search object holds the current centroids and answers, for a block of points, the
index of and the squared Euclidean distance to the nearest centroid. Two backends:

- ``faiss``: an exact flat L2 index (``IndexFlatL2``), on the CPU, or on a GPU when
  ``device`` is ``cuda[:n]`` and the installed faiss is a GPU build.
- ``torch``: ``||c||^2 / 2 - x.c`` by one matrix product per block of rows followed by a
  row minimum, on any torch device. On CPUs the product goes through oneDNN (PyTorch's
  ``mkldnn`` tensors, exact float32) when available, which on AMD CPUs runs AVX-512
  kernels where PyTorch's default ``addmm`` (MKL) does not; elsewhere through ``addmm``.

Both take and return torch tensors: points stay where they are (CPU tensors are shared
with numpy, so the faiss backend copies nothing). On a CPU, k-means calls one search
object per worker thread on blocks of ``cpu_block_rows`` rows (see ``kmeans.py``): small
single-threaded products whose scores stay in cache ran 2x faster here than one
multi-threaded product over large blocks (faiss's own ``IndexFlatL2.search``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("faiss", "torch")
GEMMS = ("auto", "addmm", "onednn")

# Score-matrix budget of one block, in float32 elements: a CPU worker's block (4 MiB)
# stays in its core's share of the cache; a GPU block (256 MiB) keeps the GPU busy.
CPU_SCORE_BUDGET = 1 << 20
GPU_SCORE_BUDGET = 1 << 26
# Rows per faiss search call on a CPU worker (faiss blocks by 1,024 centroids inside).
FAISS_CPU_ROWS = 1024


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is known.

    Raises:
        ValueError: naming the setting and the allowed values.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    return backend


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is the first CUDA GPU when one is present, else the CPU.

    Raises:
        ValueError: a CUDA device is asked for but none is available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"clustering device {str(device)!r} asked for, but no CUDA GPU is available; "
                         "use device 'cpu' or 'auto'")
    return device


def faiss_has_gpu() -> bool:
    """Whether the installed faiss is a GPU build and sees at least one GPU."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def block_rows(n_clusters: int, device: torch.device | str = "cpu") -> int:
    """Rows per score block of the torch backend: ``budget / k``, between 256 and 65,536."""
    budget = GPU_SCORE_BUDGET if torch.device(device).type == "cuda" else CPU_SCORE_BUDGET
    return int(min(65536, max(256, budget // max(n_clusters, 1))))


def onednn_usable() -> bool:
    """Whether CPU products can go through oneDNN in exact float32 (PyTorch built with
    mkldnn, and no reduced-precision float32 mode asked for)."""
    if not torch.backends.mkldnn.is_available():
        return False
    precision = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    return precision in ("none", "ieee")


class TorchSearch:
    """Exact nearest-centroid search by blocked matrix products on a torch device.

    Args:
        device: where the products run; points given on another device are moved one
            block at a time.
        rows_per_block: rows per product; default ``block_rows(k, device)``.
        gemm: ``auto`` (oneDNN on CPUs where usable, else ``addmm``), ``addmm`` or
            ``onednn`` (CPU only). All give the same float32 products up to rounding.

    Raises:
        ValueError: an unknown ``gemm``, or ``onednn`` where it is not usable.
    """

    def __init__(self, device: str | torch.device = "cpu", rows_per_block: int | None = None, gemm: str = "auto"):
        self.device = resolve_device(device)
        self.rows_per_block = rows_per_block
        if gemm not in GEMMS:
            raise ValueError(f"unknown gemm {gemm!r}; choose one of: {', '.join(GEMMS)}")
        if gemm == "onednn" and (self.device.type != "cpu" or not onednn_usable()):
            raise ValueError("gemm 'onednn' needs a CPU device and PyTorch built with mkldnn in float32 mode; "
                             "use gemm 'addmm' or 'auto'")
        if gemm == "auto":
            gemm = "onednn" if self.device.type == "cpu" and onednn_usable() else "addmm"
        self.gemm = gemm
        self.centroids: torch.Tensor | None = None
        self._half_norms: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None
        self._negated_onednn: torch.Tensor | None = None
        self._half_norms_onednn: torch.Tensor | None = None

    def set_centroids(self, centroids: torch.Tensor) -> None:
        """Use ``(k, d)`` float32 ``centroids`` for the next searches."""
        self.centroids = centroids.to(self.device, torch.float32).contiguous()
        self._half_norms = 0.5 * (self.centroids * self.centroids).sum(1)
        if self.gemm == "onednn":
            self._negated_onednn = (-self.centroids).to_mkldnn()
            self._half_norms_onednn = self._half_norms.to_mkldnn()
        rows = self.rows_per_block or block_rows(len(self.centroids), self.device)
        if self._scores is None or self._scores.shape != (rows, len(self.centroids)):
            self._scores = torch.empty(rows, len(self.centroids), device=self.device)

    def _scores_of(self, block: torch.Tensor) -> torch.Tensor:
        """``(n, k)`` scores ``||c||^2 / 2 - x.c``: their row minimum is the nearest centroid."""
        if self.gemm == "onednn":
            return F.linear(block.to_mkldnn(), self._negated_onednn, self._half_norms_onednn).to_dense()
        scores = self._scores[: len(block)]
        return torch.addmm(self._half_norms, block, self.centroids.t(), beta=1.0, alpha=-1.0, out=scores)

    def search(self, points: torch.Tensor,
               squared_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of every row of ``points``.

        Args:
            points: ``(n, d)`` float32, on any device.
            squared_norms: ``(n,)`` ``||x||^2`` of the rows if already known (k-means
                computes them once instead of once per iteration).

        Returns:
            ``(n,)`` int64 labels and ``(n,)`` float32 squared distances, on ``points``'
            device.
        """
        if self.centroids is None:
            raise RuntimeError("set_centroids must be called before search")
        n_rows = len(points)
        labels = torch.empty(n_rows, dtype=torch.int64, device=self.device)
        distances = torch.empty(n_rows, dtype=torch.float32, device=self.device)
        rows = len(self._scores)
        for start in range(0, n_rows, rows):
            stop = min(start + rows, n_rows)
            block = points[start:stop].to(self.device, non_blocking=True)
            torch.min(self._scores_of(block), dim=1, out=(distances[start:stop], labels[start:stop]))
            norms = (block * block).sum(1) if squared_norms is None else squared_norms[start:stop].to(self.device)
            distances[start:stop].mul_(2.0).add_(norms).clamp_(min=0.0)
        return labels.to(points.device), distances.to(points.device)


class FaissSearch:
    """Exact nearest-centroid search with a faiss flat L2 index (CPU, or GPU builds).

    Args:
        device: ``cpu``, or ``cuda[:n]`` for a GPU index (needs a GPU build of faiss).

    Raises:
        ValueError: faiss is missing, or a GPU is asked for and faiss has no GPU support.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        try:
            import faiss
        except ImportError:
            raise ValueError("k-means backend 'faiss' needs the faiss package (pip install faiss-cpu); "
                             "or use backend 'torch'") from None
        self._faiss = faiss
        self.device = resolve_device(device)
        if self.device.type == "cuda" and not faiss_has_gpu():
            raise ValueError(f"k-means backend 'faiss' on device {str(self.device)!r} needs a GPU build of "
                             "faiss; this faiss has no GPU support: use backend 'torch' or device 'cpu'")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"k-means backend 'faiss' runs on 'cpu' or 'cuda', not {str(self.device)!r}")
        self._gpu_resources = faiss.StandardGpuResources() if self.device.type == "cuda" else None
        self.index = None
        self.centroids: torch.Tensor | None = None

    def set_centroids(self, centroids: torch.Tensor) -> None:
        """Use ``(k, d)`` float32 ``centroids`` for the next searches."""
        faiss = self._faiss
        self.centroids = centroids.detach().to("cpu", torch.float32).contiguous()
        dim = self.centroids.shape[1]
        if self.index is None or self.index.d != dim:
            if self._gpu_resources is not None:
                config = faiss.GpuIndexFlatConfig()
                config.device = self.device.index or 0
                self.index = faiss.GpuIndexFlatL2(self._gpu_resources, dim, config)
            else:
                self.index = faiss.IndexFlatL2(dim)
        self.index.reset()
        self.index.add(self.centroids.numpy())

    def search(self, points: torch.Tensor,
               squared_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of every row of ``points``.

        Args:
            points: ``(n, d)`` float32; CPU tensors are passed to faiss without a copy.
            squared_norms: unused (faiss computes its own); for a common interface.

        Returns:
            ``(n,)`` int64 labels and ``(n,)`` float32 squared distances, on ``points``'
            device.
        """
        if self.index is None:
            raise RuntimeError("set_centroids must be called before search")
        host = np.ascontiguousarray(points.detach().to("cpu", torch.float32).numpy())
        distances, labels = self.index.search(host, 1)
        labels_t = torch.from_numpy(labels[:, 0])
        distances_t = torch.from_numpy(distances[:, 0]).clamp_(min=0.0)
        return labels_t.to(points.device), distances_t.to(points.device)


def make_search(backend: str, device: str | torch.device = "cpu") -> TorchSearch | FaissSearch:
    """The search object of ``backend`` (``faiss`` or ``torch``) on ``device``."""
    if check_backend(backend) == "faiss":
        return FaissSearch(device)
    return TorchSearch(device)


def cpu_block_rows(backend: str, n_clusters: int) -> int:
    """Rows per search call of one CPU worker thread."""
    return FAISS_CPU_ROWS if backend == "faiss" else block_rows(n_clusters, "cpu")
