"""Optimisers and schedules.

v1 (the paper): plain SGD at a constant learning rate (a warm-up and cosine of the body's
rate are options, not the paper's). v2 (the SwAV code): SGD wrapped in
LARS (layer-wise adaptive rate scaling: each layer's step is scaled by
``trust * |w| / (|g| + wd |w|)``), with a linear warm-up and then a cosine decay, given as
one value per training step so that the rate at any step is a pure function of the step
(a resumed run picks up exactly where it stopped).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch

if TYPE_CHECKING:
    from deepcluster.config import Config


def learning_rates(config: Config, steps_per_epoch: int) -> np.ndarray:
    """The rate of every step of a run: warm-up from ``warmup_start_lr`` to ``lr``, then a
    cosine to ``final_lr`` (exactly ``lr`` at every step when ``final_lr`` is none and there
    is no warm-up, v1's paper setting)."""
    final = config.lr if config.final_lr is None else config.final_lr
    return warmup_cosine(config.lr, final, config.epochs, steps_per_epoch, config.warmup_epochs,
                         config.warmup_start_lr)


def epoch_learning_rates(config: Config, steps_per_epoch: int, epoch: int) -> np.ndarray:
    """``(steps_per_epoch,)``: the rates of epoch ``epoch``'s steps (0-based) in
    :func:`learning_rates`, the schedule both methods set at every step."""
    final = config.lr if config.final_lr is None else config.final_lr
    return warmup_cosine(config.lr, final, config.epochs, steps_per_epoch, config.warmup_epochs,
                         config.warmup_start_lr, steps=(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch))


def warmup_cosine(base_lr: float, final_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                  start_warmup: float = 0.0, steps: tuple[int, int] | None = None) -> np.ndarray:
    """Learning rate of every step: linear from ``start_warmup`` to ``base_lr`` over the
    warm-up epochs, then half a cosine from ``base_lr`` down to ``final_lr``.

    Args:
        steps: ``(first, stop)``: only the rates of these steps (an epoch's), computed
            without the whole schedule (whose size grows with ``epochs``); the same values.

    Returns:
        ``(epochs * steps_per_epoch,)`` float64, or ``(stop - first,)`` with ``steps``.
    """
    warmup_steps = min(warmup_epochs, epochs) * steps_per_epoch
    total = epochs * steps_per_epoch
    first, stop = steps if steps is not None else (0, total)
    index = np.arange(max(first, 0), min(stop, total))
    rates = np.empty(len(index), dtype=np.float64)
    warm = index < warmup_steps
    # np.linspace(start_warmup, base_lr, warmup_steps, endpoint=False), element by element
    rates[warm] = index[warm] * ((base_lr - start_warmup) / max(warmup_steps, 1)) + start_warmup
    span = max(total - warmup_steps, 1)
    decay_steps = index[~warm] - warmup_steps
    rates[~warm] = final_lr + 0.5 * (base_lr - final_lr) * (1.0 + np.cos(math.pi * decay_steps / span))
    return rates


class LARS(torch.optim.SGD):
    """SGD with layer-wise adaptive rate scaling (You et al., 2017), as SwAV and solo-learn
    train DeepCluster-v2.

    Before SGD's step, the gradient ``g`` of every adapted parameter ``w`` becomes
    ``(g + wd w) * trust * |w| / (|g| + wd |w| + eps)``; weight decay is folded into that
    gradient instead of being applied by SGD. With ``clip``, the scaled rate
    ``trust * |w| / (...)`` is capped at the group's learning rate (solo-learn's
    ``clip_lr``). Biases and normalisation weights (1-d parameters) are left unscaled and
    without weight decay when ``exclude_1d`` is set (solo-learn's ``exclude_bias_n_norm``).

    Args:
        params: as for ``torch.optim.SGD``.
        lr, momentum, weight_decay: as for SGD.
        trust: the trust coefficient (SwAV's LARC: 0.001; solo-learn's ``eta``: 0.02).
        clip: cap the adaptive rate at ``lr`` (SwAV: False).
        exclude_1d: no adaptation or weight decay for 1-d parameters.
        eps: keeps the ratio finite.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust: float = 0.001, clip: bool = False, exclude_1d: bool = False, eps: float = 1e-8) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        self.lars_weight_decay, self.trust, self.clip, self.exclude_1d, self.eps = (
            weight_decay, trust, clip, exclude_1d, eps)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None or (self.exclude_1d and param.dim() == 1):
                    continue
                param_norm, grad_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(param.grad)
                if param_norm == 0 or grad_norm == 0:
                    continue
                ratio = self.trust * param_norm / (grad_norm + self.lars_weight_decay * param_norm + self.eps)
                if self.clip:
                    ratio = torch.clamp(ratio / group["lr"], max=1.0)
                param.grad.add_(param, alpha=self.lars_weight_decay).mul_(ratio)
        return super().step(closure)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group of ``optimizer`` at learning rate ``lr``, except those marked
    ``fixed_lr`` (v1's head, at its own constant rate)."""
    for group in optimizer.param_groups:
        if not group.get("fixed_lr", False):
            group["lr"] = lr
