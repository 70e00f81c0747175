"""What the epochs of both methods share, written once: the epoch's draw of images, the
check that enough images decoded, k-means of the rows the processes hold, a stage of the
plan, a fresh backbone and where the clustering runs.

Each was written twice before (once per method); changing the sampler, say, is now one
edit for both methods.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from deepcluster import distributed, memory
from deepcluster.clustering.kmeans import kmeans
from deepcluster.data import decode_problem, uniform_cluster_sample
from deepcluster.methods import STREAM_SAMPLER, derived_seed
from deepcluster.models import model_from_config
from deepcluster.partition import Partition, TooFewDecoded
from deepcluster.progress import Progress

if TYPE_CHECKING:
    from deepcluster.clustering import KMeansResult
    from deepcluster.clustering.pca import PCA
    from deepcluster.config import Config
    from deepcluster.data import ImageSource
    from deepcluster.models import Backbone


def epoch_draw(labels: np.ndarray, config: Config, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
    """This process's share of epoch ``epoch``'s images and, with several processes, their
    places in the whole draw (None alone). Drawn alike on every process: uniform over the
    non-empty clusters of ``labels`` (``sampler: uniform``, the paper's defence against
    trivial solutions) or a plain shuffle of the images with a label (-1: none); then cut
    into equal shares, so no process waits in DDP for one with a step more."""
    rng = np.random.default_rng(derived_seed(config.seed, epoch, STREAM_SAMPLER))
    usable = labels >= 0
    if config.sampler == "uniform":
        indices = uniform_cluster_sample(labels, int(usable.sum()), rng)
    else:
        indices = rng.permutation(np.flatnonzero(usable))
    indices, positions = distributed.equal_shard(indices)
    return indices, positions if distributed.is_distributed() else None


def check_decoded(source: ImageSource, decoded: np.ndarray, needed: int, what: str, config: Config,
                  skipped: dict[str, str] | None = None) -> None:
    """List the images that did not decode (``decoded``: ``(N,)`` bool) in ``skipped``
    (path -> reason) when given.

    Raises:
        TooFewDecoded: fewer than ``needed`` decoded (``what`` says what needs them).
    """
    if skipped is not None:
        for index in np.flatnonzero(~decoded):
            skipped[source.name(int(index))] = decode_problem(source, int(index))
    if decoded.sum() < needed:
        from deepcluster.run_files import SKIPPED_NAME

        raise TooFewDecoded(f"only {int(decoded.sum())} of {len(source)} images could be decoded, fewer than the "
                            f"{needed} {what}; the reasons are in {str(config.run_dir / SKIPPED_NAME)!r}")


def kmeans_partition(points: np.ndarray | torch.Tensor, local: np.ndarray, rows: np.ndarray, n_images: int,
                     n_clusters: int, n_iter: int, seed: int, title: str, pca: PCA | None = None,
                     **options: Any) -> tuple[Partition, KMeansResult]:
    """k-means of the ``points`` this process holds, those of images ``local`` (one process
    is a world of one: with several, sums and sizes are all-reduced), with a bar titled
    ``title``; every process gets all ``n_images`` assignments, -1 outside ``rows`` (the
    images with a point on some process). ``options`` go to ``clustering.kmeans``; ``pca``
    is only stored with the result."""
    began = time.perf_counter()
    with Progress(n_iter + 1, title) as bar:
        result = kmeans(points, n_clusters, n_iter, seed, on_iteration=lambda _: bar.update(), shard=True, **options)
    labels = distributed.gather_rows(result.assignments, local, n_images)
    assignments = np.full(n_images, -1, dtype=np.int64)
    assignments[rows] = labels[rows]
    return Partition(assignments, n_clusters, result.centroids, result.objective[-1], result.n_split, pca, 0.0,
                     time.perf_counter() - began), result


@contextlib.contextmanager
def stage(name: str, spinner: str | None = None) -> Iterator[None]:
    """A stage of the plan: its peak memory noted as ``name`` (``memory.stage``) and, with
    ``spinner``, a spinner of that title on the terminal while it runs."""
    with memory.stage(name), (Progress(None, spinner) if spinner else contextlib.nullcontext()):
        yield


def backbone(config: Config, device: torch.device) -> Backbone:
    """A fresh backbone of the settings, seeded by ``seed``, on ``device``."""
    torch.manual_seed(config.seed)
    model = model_from_config(config)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def clustering_device(config: Config, device: torch.device, backend: str) -> str:
    """Where the clustering runs: ``clustering_device``, or with ``auto`` the training
    device (the CPU for the faiss backend when faiss is a CPU-only build)."""
    if config.clustering_device != "auto":
        return config.clustering_device
    if device.type == "cuda" and backend == "faiss":
        from deepcluster.clustering.search import faiss_has_gpu

        return str(device) if faiss_has_gpu() else "cpu"
    return str(device)


__all__ = ["backbone", "check_decoded", "clustering_device", "epoch_draw", "kmeans_partition", "stage"]
