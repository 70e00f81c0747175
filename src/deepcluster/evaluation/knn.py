"""Weighted k-nearest-neighbour classification on L2-normalised features.

The quick check common in self-supervised evaluation (Wu et al. 2018, used by DINO and
solo-learn): cosine similarity between a query and every training image, the ``k = 20``
most similar vote for their class with weight ``exp(similarity / T)``, ``T = 0.07``.

Work is split by *size*, never into a fixed number of pieces: queries and training rows
are taken in chunks whose similarity block holds at most ``max_block`` numbers, and the
running top-k is merged across training chunks. The same code serves 10 images and
millions; ``k`` larger than the training set uses every training image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

# Similarities held at once (float32): 2**24 numbers = 64 MiB.
DEFAULT_BLOCK = 1 << 24


@dataclass
class KnnResult:
    """Accuracy of the weighted kNN classifier.

    Attributes:
        top1, top5: accuracy (%) on the queries (top-5 counts a hit when the true class
            has one of the 5 largest vote totals).
        k: neighbours actually used (``min(k, number of training images)``).
        temperature: the vote temperature.
        n_train, n_query: sizes of the two sets.
    """

    top1: float
    top5: float
    k: int
    temperature: float
    n_train: int
    n_query: int


def block_sizes(n_query: int, n_train: int, max_block: int = DEFAULT_BLOCK,
                min_query_chunk: int = 64) -> tuple[int, int]:
    """Chunk lengths ``(queries, training rows)`` so a similarity block holds at most
    ``max(max_block, min_query_chunk)`` numbers.

    As many queries as fit against the whole training set; when the training set alone is
    larger than the budget, ``min_query_chunk`` queries against training chunks that fit.
    """
    n_query, n_train = max(n_query, 1), max(n_train, 1)
    query_chunk = min(n_query, max(min_query_chunk, max_block // n_train))
    train_chunk = min(n_train, max(1, max_block // query_chunk))
    return query_chunk, train_chunk


def _normalized(features: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    tensor = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(features))
    return F.normalize(tensor.to(device=device, dtype=torch.float32), dim=1)


@torch.no_grad()
def nearest_neighbors(train_features: np.ndarray | torch.Tensor, query_features: np.ndarray | torch.Tensor,
                      k: int, max_block: int = DEFAULT_BLOCK,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` training rows most cosine-similar to each query.

    Args:
        train_features: ``(N, D)`` features (normalised here).
        query_features: ``(M, D)`` features.
        k: neighbours wanted; clipped to ``N``.
        max_block: most similarities held at once.
        device: where the products run.

    Returns:
        ``(M, k')`` similarities, best first, and ``(M, k')`` int64 training indices, with
        ``k' = min(k, N)``.
    """
    train = _normalized(train_features, device)
    queries = _normalized(query_features, device)
    if train.ndim != 2 or queries.ndim != 2 or train.shape[1] != queries.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(train.shape)} and {tuple(queries.shape)}")
    if len(train) == 0 or k < 1:
        raise ValueError(f"need at least one training image and k >= 1 (got {len(train)} images, k={k})")
    k = min(k, len(train))
    query_chunk, train_chunk = block_sizes(len(queries), len(train), max_block)
    all_sims = torch.empty(len(queries), k, device=device)
    all_index = torch.empty(len(queries), k, dtype=torch.int64, device=device)
    for q_start in range(0, len(queries), query_chunk):
        chunk = queries[q_start:q_start + query_chunk]
        best_sims = torch.full((len(chunk), 0), float("-inf"), device=device)
        best_index = torch.empty((len(chunk), 0), dtype=torch.int64, device=device)
        for t_start in range(0, len(train), train_chunk):
            sims = chunk @ train[t_start:t_start + train_chunk].T
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            best_sims = torch.cat([best_sims, top.values], dim=1)
            best_index = torch.cat([best_index, top.indices + t_start], dim=1)
            if best_sims.shape[1] > k:
                merged = best_sims.topk(k, dim=1)
                best_sims, best_index = merged.values, best_index.gather(1, merged.indices)
        all_sims[q_start:q_start + len(chunk)] = best_sims
        all_index[q_start:q_start + len(chunk)] = best_index
    return all_sims, all_index


@torch.no_grad()
def knn_scores(train_features: np.ndarray | torch.Tensor, train_labels: np.ndarray | torch.Tensor,
               query_features: np.ndarray | torch.Tensor, n_classes: int, k: int = 20,
               temperature: float = 0.07, max_block: int = DEFAULT_BLOCK,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Vote totals of every class for every query, ``(M, n_classes)``.

    Each of the ``k`` nearest training images adds ``exp(cosine / temperature)`` to its
    class.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    sims, index = nearest_neighbors(train_features, query_features, k, max_block, device)
    return neighbor_votes(sims, index, train_labels, n_classes, temperature)


def neighbor_votes(sims: torch.Tensor, index: torch.Tensor, train_labels: np.ndarray | torch.Tensor,
                   n_classes: int, temperature: float) -> torch.Tensor:
    """``(M, n_classes)`` vote totals from ``(M, k)`` neighbour similarities and indices."""
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64, device=sims.device)
    weights = torch.exp((sims - 1.0) / temperature)  # shifted by the largest possible cosine: no overflow
    votes = torch.zeros(len(sims), n_classes, device=sims.device)
    votes.scatter_add_(1, labels[index], weights)
    return votes


def knn_classify(train_features: np.ndarray | torch.Tensor, train_labels: np.ndarray | torch.Tensor,
                 query_features: np.ndarray | torch.Tensor, query_labels: np.ndarray | torch.Tensor,
                 n_classes: int, k: int = 20, temperature: float = 0.07, max_block: int = DEFAULT_BLOCK,
                 device: torch.device | str = "cpu") -> KnnResult:
    """Top-1/top-5 accuracy of the temperature-weighted kNN classifier.

    Args:
        train_features: ``(N, D)`` features of the labelled training images.
        train_labels: ``(N,)`` classes in ``[0, n_classes)``.
        query_features: ``(M, D)`` features to classify.
        query_labels: ``(M,)`` true classes.
        n_classes: number of classes.
        k: neighbours that vote (20 by default; clipped to ``N``).
        temperature: vote temperature (0.07 by default).
        max_block: most similarities held at once (sets the chunking).
        device: where the products run.
    """
    votes = knn_scores(train_features, train_labels, query_features, n_classes, k, temperature, max_block, device)
    top1, top5 = top_accuracies(votes, query_labels, n_classes)
    return KnnResult(top1, top5, min(k, len(train_labels)), temperature, len(train_labels), len(votes))


def top_accuracies(votes: torch.Tensor, truth: np.ndarray | torch.Tensor, n_classes: int) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of ``(M, n_classes)`` vote totals against the true classes."""
    label_tensor = torch.as_tensor(np.asarray(truth), dtype=torch.int64, device=votes.device)
    top = votes.topk(min(5, n_classes), dim=1).indices
    n = max(len(label_tensor), 1)
    return (float((top[:, 0] == label_tensor).float().sum()) * 100.0 / n,
            float((top == label_tensor[:, None]).any(dim=1).float().sum()) * 100.0 / n)


__all__ = ["DEFAULT_BLOCK", "KnnResult", "block_sizes", "knn_classify", "knn_scores", "nearest_neighbors",
           "neighbor_votes", "top_accuracies"]
