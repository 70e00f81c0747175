"""The pseudo-label loss, shared by DeepCluster v1 and v2.

v1 is its simplest case: one head, one crop, temperature 1, which is exactly
``F.cross_entropy(logits, targets)`` (a test checks it). v2 (SwAV paper, section on
DeepCluster-v2) scores every crop against several prototype heads, divides the scores by a
temperature (0.1) and averages the cross-entropy over the heads; every crop of an image
carries its image's assignment in each head.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE = -1  # the target of an image that has no assignment yet


def pseudo_label_loss(scores: Sequence[torch.Tensor], targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of each head's scores against its pseudo-labels, averaged over heads.

    Args:
        scores: one tensor per head, ``(n_crops * B, k_h)``: the crops of a batch stacked
            crop by crop (all images' first crop, then all images' second crop, ...).
        targets: ``(n_heads, B)`` int64 assignments of the batch's images in each head;
            ``IGNORE`` (-1) leaves an image out of the loss.
        temperature: scores are divided by it (v2: 0.1; v1: 1).

    Returns:
        The scalar loss; images with ``IGNORE`` count in no head. A batch in which every
        target is ``IGNORE`` gives 0 (with a gradient of 0), not NaN.
    """
    if targets.dim() != 2 or targets.shape[0] != len(scores):
        raise ValueError(f"targets must be (n_heads={len(scores)}, batch), got {tuple(targets.shape)}")
    batch = targets.shape[1]
    total = scores[0].new_zeros(())
    for head, head_scores in enumerate(scores):
        if head_scores.shape[0] % batch:
            raise ValueError(f"head {head}: {head_scores.shape[0]} score rows are not a whole number of crops of "
                             f"{batch} images")
        n_crops = head_scores.shape[0] // batch
        head_targets = targets[head].repeat(n_crops)
        if bool((head_targets == IGNORE).all()):
            total = total + head_scores.sum() * 0.0
            continue
        total = total + F.cross_entropy(head_scores / temperature, head_targets, ignore_index=IGNORE)
    return total / len(scores)


def per_head_losses(scores: Sequence[torch.Tensor], targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(n_heads,)``: the loss of :func:`pseudo_label_loss` for each head alone (v2 logs
    them; their mean is v2's loss). Arguments as for :func:`pseudo_label_loss`."""
    if targets.dim() != 2 or targets.shape[0] != len(scores):
        raise ValueError(f"targets must be (n_heads={len(scores)}, batch), got {tuple(targets.shape)}")
    return torch.stack([pseudo_label_loss([head_scores], head_targets[None], temperature)
                        for head_scores, head_targets in zip(scores, targets)])
