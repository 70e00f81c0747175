"""DeepCluster-v2 and the size of the folder (``check_size``): from ``MIN_IMAGES`` images on,
a v2 run keeps its recipe's sizes; on a smaller folder it is refused in one line, unless the
command line or the ``--config`` file pins both ``prototypes`` and ``batch_size`` (the user
sizes the run and watches the collapse warning).

Why (docs/recipes.md, "v2 and the size of the folder", has the measurements and commands):
``v2-small`` with the recipe's sizes (3 x 3,000 prototypes, a batch of 256, lr 0.6 with LARS,
temperature 0.1) learns on the 50,000 CIFAR-10 training images within its 11 epochs. On
20,000 of them the same sizes ended 5 kNN points below the random weights with the data's
BatchNorm statistics, and on 3,630 Omniglot characters they folded the embeddings onto one
direction. A rule that sized the run to the folder (one prototype per 50 images per head, a
batch leaving 30 steps an epoch, lr / 10, temperature 0.2) kept the embeddings spread on
2,000 to 10,000 CIFAR-10 images but also ended below that baseline, as on Omniglot, where v1's
``small`` recipe learned. A refusal that names v1 serves such a folder better than a run that
ends worse than its start.
"""

from __future__ import annotations

from typing import Any

from deepcluster.settings.schema import ConfigError

MIN_IMAGES = 50_000  # the smallest folder on which v2 with its recipe's sizes was measured to learn
PINNED = ("prototypes", "batch_size")  # with both stated, the user sizes the run


def is_v2(recipe: str | None, given: dict[str, Any]) -> bool:
    """Whether a run of ``recipe`` (a name of ``RECIPES``) with the settings ``given`` is a v2 run."""
    from deepcluster.settings.recipes import RECIPES

    return recipe in RECIPES and given.get("method", RECIPES[recipe].get("method")) == "v2"


def refusal(n_images: int) -> str:
    """The one line that refuses a v2 run on ``n_images`` images."""
    return (f"the folder has {n_images:,} images, too few for DeepCluster-v2: below {MIN_IMAGES:,} it did not learn "
            "in the measurements (docs/recipes.md); use v1 (--recipe small for small images, photo for photos), or "
            "pin --prototypes and --batch_size to run v2 anyway (and watch the collapse warning)")


def check_size(n_images: int, given: dict[str, Any]) -> None:
    """Refuse a v2 run on fewer than ``MIN_IMAGES`` images unless ``given`` (the settings the
    command line and the ``--config`` file state) pins its prototypes and batch.

    Raises:
        ConfigError: too few images, and prototypes or batch left to the recipe.
    """
    if n_images < MIN_IMAGES and not all(key in given for key in PINNED):
        raise ConfigError(refusal(n_images))


__all__ = ["MIN_IMAGES", "PINNED", "check_size", "is_v2", "refusal"]
