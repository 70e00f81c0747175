"""Category-level retrieval: each validation image queries the training images.

Images are ranked by cosine similarity of their L2-normalised features; a training image
is relevant when it has the query's class. Reported:

- mAP: the mean over queries of average precision over the *whole* ranking (the mean of
  the precision at the rank of every relevant image);
- precision@k: share of relevant images among the ``k`` most similar.

Queries are processed in chunks sized so that one chunk's similarity block (and its
sort) stays within ``max_block`` numbers; the whole gallery is ranked for every query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

# Similarities ranked at once; the sort and its bookkeeping take ~25 bytes each.
DEFAULT_BLOCK = 1 << 23


@dataclass
class RetrievalResult:
    """Retrieval quality with class labels as relevance.

    Attributes:
        mean_ap: mean average precision (%) over queries with at least one relevant image.
        precision_at: k -> mean precision@k (%); k is clipped to the gallery size.
        n_gallery, n_query: sizes; queries with no relevant image are left out of both means.
    """

    mean_ap: float
    precision_at: dict[int, float]
    n_gallery: int
    n_query: int


@torch.no_grad()
def retrieval_scores(gallery_features: np.ndarray | torch.Tensor, gallery_labels: np.ndarray | torch.Tensor,
                     query_features: np.ndarray | torch.Tensor, query_labels: np.ndarray | torch.Tensor,
                     ks: tuple[int, ...] = (1, 10, 100), max_block: int = DEFAULT_BLOCK,
                     device: torch.device | str = "cpu") -> RetrievalResult:
    """mAP and precision@k of ranking the gallery by cosine similarity to each query.

    Args:
        gallery_features: ``(N, D)`` features of the searched images (the training split).
        gallery_labels: ``(N,)`` their classes.
        query_features: ``(M, D)`` features of the queries (the validation split).
        query_labels: ``(M,)`` their classes.
        ks: cut-offs of precision@k.
        max_block: most similarities ranked at once (sets the query chunk).
        device: where the products and sorts run.
    """

    def as_tensor(array, dtype):
        tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
        return tensor.to(device=device, dtype=dtype)

    gallery = F.normalize(as_tensor(gallery_features, torch.float32), dim=1)
    queries = F.normalize(as_tensor(query_features, torch.float32), dim=1)
    gallery_y = as_tensor(np.asarray(gallery_labels), torch.int64)
    query_y = as_tensor(np.asarray(query_labels), torch.int64)
    if gallery.ndim != 2 or queries.ndim != 2 or gallery.shape[1] != queries.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(gallery.shape)} and {tuple(queries.shape)}")
    if len(gallery) == 0:
        raise ValueError("the gallery is empty")
    cutoffs = sorted({min(int(k), len(gallery)) for k in ks if int(k) >= 1})
    n_labels = int(torch.cat([gallery_y, query_y]).max()) + 1
    class_counts = torch.bincount(gallery_y, minlength=n_labels)
    ranks = torch.arange(1, len(gallery) + 1, device=device, dtype=torch.float32)
    chunk = max(1, min(len(queries), max_block // len(gallery)))
    ap_sum, n_scored = 0.0, 0
    precision_sums = {k: 0.0 for k in cutoffs}
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ gallery.T
        order = sims.argsort(dim=1, descending=True)
        labels = query_y[start:start + chunk]
        relevant = (gallery_y[order] == labels[:, None]).float()
        n_relevant = class_counts[labels].float()
        scored = n_relevant > 0
        hits = relevant.cumsum(dim=1)
        average_precision = (relevant * hits / ranks).sum(dim=1) / n_relevant.clamp_min(1.0)
        ap_sum += float(average_precision[scored].sum())
        for k in cutoffs:
            precision_sums[k] += float((hits[scored, k - 1] / k).sum())
        n_scored += int(scored.sum())
    n_scored_safe = max(n_scored, 1)
    return RetrievalResult(mean_ap=100.0 * ap_sum / n_scored_safe,
                           precision_at={k: 100.0 * total / n_scored_safe for k, total in precision_sums.items()},
                           n_gallery=len(gallery), n_query=n_scored)


__all__ = ["DEFAULT_BLOCK", "RetrievalResult", "retrieval_scores"]
