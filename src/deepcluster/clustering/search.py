"""Nearest-centroid search: the one expensive step of k-means, behind one interface.

A search object holds the current centroids and answers, for a block of points, the
index of and the squared Euclidean distance to the nearest centroid (metric ``l2``), or
the index of and the dot product with the centroid of largest dot product (metric
``cosine``, on unit vectors). Two backends:

- ``faiss``: an exact flat L2 index (``IndexFlatL2``), on the CPU, or on a GPU when
  ``device`` is ``cuda[:n]`` and the installed faiss is a GPU build.
- ``torch``: ``||c||^2 / 2 - x.c`` by one matrix product per block of rows followed by a
  row minimum, on any torch device. On CPUs the product goes through oneDNN (exact
  float32) when available, which on AMD CPUs runs AVX-512 kernels where PyTorch's default
  ``addmm`` (MKL) does not; elsewhere through ``addmm``. The centroids are packed once per
  iteration into oneDNN's own weight layout (``torch.ops.mkldnn._linear_pointwise``, the
  op PyTorch's compiler uses for frozen linear layers), so each block is one product from
  and to ordinary tensors. On CPUs the row minimum is taken in two levels (see
  :func:`row_min`): PyTorch's ``min(dim)`` with indices is not vectorised and cost a
  quarter of the product's time. For ``cosine``: one plain product per block of
  ``DOT_ROWS`` rows and a row maximum (:class:`DotSearch`, the spherical k-means reference).

Both take and return torch tensors: points stay where they are (CPU tensors are shared
with numpy, so the faiss backend copies nothing). On a CPU, k-means calls one search
object per worker thread on blocks of ``cpu_block_rows`` rows (see ``kmeans.py``): small
single-threaded products whose scores stay in cache ran 2x faster here than one
multi-threaded product over large blocks (faiss's own ``IndexFlatL2.search``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from deepcluster import devices
import torch.nn.functional as F

BACKENDS = ("faiss", "torch")
METRICS = ("l2", "cosine")
GEMMS = ("auto", "addmm", "onednn")

# Score-matrix budget of one block, in float32 elements: a CPU worker's block (4 MiB)
# stays in its core's share of the cache; a GPU block (256 MiB) keeps the GPU busy.
CPU_SCORE_BUDGET = 1 << 20
GPU_SCORE_BUDGET = 1 << 26
# Rows per faiss search call on a CPU worker (faiss blocks by 1,024 centroids inside).
FAISS_CPU_ROWS = 1024
# Columns per group of the two-level row minimum on CPUs; used from this many groups on.
MIN_GROUP = 64
MIN_GROUPS = 4
# Rows scored at once by the cosine search: bounds the (rows x k) product's memory.
DOT_ROWS = 1 << 15


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is known.

    Raises:
        ValueError: naming the setting and the allowed values.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    return backend


def resolve_device(device: str | torch.device) -> torch.device:
    """Where a search runs (``auto``: the first GPU when present); see ``deepcluster.devices``."""
    return devices.resolve_device(device, "clustering device")


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


@functools.cache
def packed_onednn_usable() -> bool:
    """Whether this PyTorch has oneDNN's packed-weight linear ops and they run here
    (tried once on a tiny product)."""
    if not onednn_usable():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(3, 2), 4)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(4, 2), weight, torch.zeros(3), "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return tuple(out.shape) == (4, 3) and bool((out == 2).all())


def row_min(scores: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum of every row of ``(n, m)`` scores and the index of its first occurrence.

    With ``group`` (``m`` a multiple of it), in two levels: the minimum of each group of
    ``group`` consecutive columns (a vectorised ``amin``), the first group holding the row
    minimum, then the first column of that group holding it. Same result as
    ``scores.min(1)``; about 2.5x faster on CPUs at ``m = 1,024`` (PyTorch's reduction with
    indices is scalar code; ``amin`` is not).
    """
    if group is None:
        return scores.min(1)
    n_rows, width = scores.shape
    grouped = scores.view(n_rows, width // group, group)
    values, chosen = grouped.amin(2).min(1)
    members = grouped.reshape(-1, group).index_select(
        0, torch.arange(n_rows, device=scores.device) * (width // group) + chosen)
    return values, chosen * group + members.argmin(1)


class TorchSearch:
    """Exact nearest-centroid search by blocked matrix products on a torch device.

    Args:
        device: where the products run; points given on another device are moved one
            block at a time.
        rows_per_block: rows per product; default ``block_rows(k, device)``.
        gemm: ``auto`` (oneDNN on CPUs where usable, else ``addmm``), ``addmm`` or
            ``onednn`` (CPU only; packed weights where this PyTorch has the ops, else
            ``mkldnn`` tensors). All give the same float32 products up to rounding.

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
        self.packed = gemm == "onednn" and packed_onednn_usable()
        self.centroids: torch.Tensor | None = None
        self.group: int | None = None
        self._weight: torch.Tensor | None = None  # (k', d) -centroids, k' padded to whole groups
        self._bias: torch.Tensor | None = None  # (k',) ||c||^2 / 2, +inf in the padding
        self._scores: torch.Tensor | None = None  # output buffer of addmm
        self._rows = 0

    def set_centroids(self, centroids: torch.Tensor) -> None:
        """Use ``(k, d)`` float32 ``centroids`` for the next searches."""
        self.centroids = centroids.to(self.device, torch.float32).contiguous()
        n_clusters = len(self.centroids)
        cpu = self.device.type == "cpu"
        self.group = MIN_GROUP if cpu and n_clusters >= MIN_GROUP * MIN_GROUPS else None
        width = n_clusters if self.group is None else -(-n_clusters // self.group) * self.group
        # Padding columns score +inf (zero weight, infinite bias): never a row's minimum.
        weight = torch.zeros(width, self.centroids.shape[1], device=self.device)
        weight[:n_clusters] = -self.centroids
        bias = torch.full((width,), float("inf"), device=self.device)
        bias[:n_clusters] = 0.5 * (self.centroids * self.centroids).sum(1)
        rows = self.rows_per_block or block_rows(n_clusters, self.device)
        if self.packed:
            self._weight, self._bias = torch.ops.mkldnn._reorder_linear_weight(weight, rows), bias
        elif self.gemm == "onednn":
            self._weight, self._bias = weight.to_mkldnn(), bias.to_mkldnn()
        else:
            self._weight, self._bias = weight, bias
        self._rows = rows
        if self.gemm == "addmm" and (self._scores is None or self._scores.shape != (rows, width)):
            self._scores = torch.empty(rows, width, device=self.device)

    def _scores_of(self, block: torch.Tensor) -> torch.Tensor:
        """``(n, k')`` scores ``||c||^2 / 2 - x.c``: their row minimum is the nearest centroid."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(block.contiguous(), self._weight, self._bias, "none", [], "")
        if self.gemm == "onednn":
            return F.linear(block.to_mkldnn(), self._weight, self._bias).to_dense()
        scores = self._scores[: len(block)]
        return torch.addmm(self._bias, block, self._weight.t(), out=scores)

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
        last = len(self.centroids) - 1
        for start in range(0, n_rows, self._rows):
            stop = min(start + self._rows, n_rows)
            block = points[start:stop].to(self.device, non_blocking=True)
            distances[start:stop], labels[start:stop] = row_min(self._scores_of(block), self.group)
            if self.group is not None:
                labels[start:stop].clamp_(max=last)  # a NaN point could land in the padding
            norms = (block * block).sum(1) if squared_norms is None else squared_norms[start:stop].to(self.device)
            distances[start:stop].mul_(2.0).add_(norms).clamp_(min=0.0)
        return labels.to(points.device), distances.to(points.device)


def best_dot(points: torch.Tensor, centroids: torch.Tensor,
             rows: int = DOT_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid of largest dot product of every point and that dot product, in blocks of
    ``rows`` rows: ``(N, d), (k, d) -> (N,) int64, (N,)`` (on ``points``' device)."""
    labels = torch.empty(len(points), dtype=torch.int64, device=points.device)
    scores = torch.empty(len(points), dtype=points.dtype, device=points.device)
    for start in range(0, len(points), rows):
        best = (points[start:start + rows] @ centroids.T).max(dim=1)
        scores[start:start + rows], labels[start:start + rows] = best.values, best.indices
    return labels, scores


class DotSearch:
    """Exact largest-dot-product search (metric ``cosine``) on a torch device: the same
    interface as :class:`TorchSearch`, the second result being dot products."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = resolve_device(device)
        self.centroids: torch.Tensor | None = None

    def set_centroids(self, centroids: torch.Tensor) -> None:
        self.centroids = centroids.to(self.device, torch.float32).contiguous()

    def search(self, points: torch.Tensor,
               squared_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.centroids is None:
            raise RuntimeError("set_centroids must be called before search")
        labels, scores = best_dot(points.to(self.device), self.centroids)
        return labels.to(points.device), scores.to(points.device)


class FaissSearch:
    """Exact nearest-centroid search with a faiss flat index (CPU, or GPU builds).

    Args:
        device: ``cpu``, or ``cuda[:n]`` for a GPU index (needs a GPU build of faiss).
        metric: ``l2`` (``IndexFlatL2``, squared distances) or ``cosine`` (``IndexFlatIP``,
            dot products).

    Raises:
        ValueError: faiss is missing, or a GPU is asked for and faiss has no GPU support.
    """

    def __init__(self, device: str | torch.device = "cpu", metric: str = "l2"):
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
        self.inner_product = metric == "cosine"
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
                flat = faiss.GpuIndexFlatIP if self.inner_product else faiss.GpuIndexFlatL2
                self.index = flat(self._gpu_resources, dim, config)
            else:
                self.index = faiss.IndexFlatIP(dim) if self.inner_product else faiss.IndexFlatL2(dim)
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
        distances_t = torch.from_numpy(distances[:, 0])
        if not self.inner_product:
            distances_t.clamp_(min=0.0)
        return labels_t.to(points.device), distances_t.to(points.device)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown k-means metric {metric!r}; choose one of: {', '.join(METRICS)}")
    return metric


def make_search(backend: str, device: str | torch.device = "cpu",
                metric: str = "l2") -> TorchSearch | FaissSearch | DotSearch:
    """The search object of ``backend`` (``faiss`` or ``torch``) for ``metric`` on ``device``."""
    if check_backend(backend) == "faiss":
        return FaissSearch(device, check_metric(metric))
    return TorchSearch(device) if check_metric(metric) == "l2" else DotSearch(device)


def cpu_block_rows(backend: str, n_clusters: int) -> int:
    """Rows per search call of one CPU worker thread."""
    return FAISS_CPU_ROWS if backend == "faiss" else block_rows(n_clusters, "cpu")
