"""DeepCluster-v2 sized to the folder: prototypes per head, batch, learning rate and
temperature from the number of images N (``size_v2``), where the command line and the
``--config`` file leave them to it.

The v2 recipes carry the references' sizes (3,000 prototypes per head, a batch of 256, lr
0.6 with LARS, temperature 0.1), made for 50,000 images and more; ``v2-small`` with them is
healthy on the 50,000 CIFAR-10 images (docs/results.md). On 2,000 CIFAR-10 images they fold
the embeddings onto one direction at the second epoch, and so do 40 or 100 prototypes, a
batch of 64, four warm-up epochs and lr 0.15; only lr 0.06 with temperature 0.2 (with 40
prototypes and a batch of 64) stayed spread (docs/recipes.md, the v2 part, has the table).
The rule, for a folder of fewer than ``SMALL_FOLDER`` images:

- prototypes per head: one per ``IMAGES_PER_PROTOTYPE`` images (at least ``MIN_PROTOTYPES``);
- batch: the largest power of two that leaves ``STEPS_PER_EPOCH`` steps an epoch (at least
  ``MIN_BATCH``);
- lr: the recipe's over ``LR_DIVISOR``; temperature: ``SMALL_TEMPERATURE``;
- warm-up: the recipe's (four epochs of it did not help).

None of them above the recipe's (nor the temperature below it). From ``SMALL_FOLDER`` images
on, the recipe's own sizes. Each value a user states (command line or ``--config`` file)
wins. Below ``MIN_IMAGES`` images (fewer than measured) the rule sizes nothing: a run that
pins prototypes and batch (like the v2 fixture's on 30 images) runs as stated, any other is
refused in one line.
"""

from __future__ import annotations

import math
from typing import Any

from deepcluster.settings.schema import ConfigError

SMALL_FOLDER = 20_000  # from here on the recipe's sizes (healthy on 50,000 CIFAR-10 images)
IMAGES_PER_PROTOTYPE = 50  # one prototype per this many images in every head
MIN_PROTOTYPES = 10  # a head never gets fewer
STEPS_PER_EPOCH = 30  # the batch leaves at least this many steps an epoch
MIN_BATCH = 32  # the smallest batch the rule chooses
LR_DIVISOR = 10  # the recipe's lr over this (0.6 -> 0.06)
SMALL_TEMPERATURE = 0.2
MIN_IMAGES = 2_000  # the smallest folder measured: below it the rule sizes nothing
SIZED = ("prototypes", "batch_size", "lr", "temperature")

RULE = (f"below {SMALL_FOLDER:,} images: 1 prototype per {IMAGES_PER_PROTOTYPE} images per head, a batch leaving "
        f"{STEPS_PER_EPOCH}+ steps an epoch, lr / {LR_DIVISOR}, temperature {SMALL_TEMPERATURE}, against collapse")


def rule_prototypes(n_images: int, recipe: tuple[int, ...]) -> tuple[int, ...]:
    """Each head's prototypes for ``n_images``: ``n / IMAGES_PER_PROTOTYPE``, at least
    ``MIN_PROTOTYPES``, at most the recipe's ``recipe`` (per head)."""
    wanted = max(MIN_PROTOTYPES, n_images // IMAGES_PER_PROTOTYPE)
    return tuple(min(count, wanted) for count in recipe)


def rule_batch(n_images: int, recipe: int) -> int:
    """The batch for ``n_images``: the largest power of two with ``STEPS_PER_EPOCH`` steps an
    epoch, at least ``MIN_BATCH``, at most the recipe's ``recipe``."""
    fits = n_images // STEPS_PER_EPOCH
    power = 2 ** int(math.log2(fits)) if fits >= 1 else 1
    return min(recipe, max(MIN_BATCH, power))


def rule_values(n_images: int, base: dict[str, Any]) -> dict[str, Any]:
    """The rule's value of every sized setting for ``n_images`` images, from ``base`` (the
    recipe's, or what was pinned)."""
    if n_images >= SMALL_FOLDER:
        return dict(base)
    return {"prototypes": rule_prototypes(n_images, tuple(base["prototypes"])),
            "batch_size": rule_batch(n_images, base["batch_size"]),
            "lr": float(f"{base['lr'] / LR_DIVISOR:.6g}"),
            "temperature": max(base["temperature"], SMALL_TEMPERATURE)}


def is_v2(recipe: str | None, given: dict[str, Any]) -> bool:
    """Whether a run of ``recipe`` (a name of ``RECIPES``) with the settings ``given`` is a v2 run."""
    from deepcluster.settings.recipes import RECIPES

    return recipe in RECIPES and given.get("method", RECIPES[recipe].get("method")) == "v2"


def refusal(n_images: int) -> str:
    """The one line that refuses to size v2 for ``n_images`` images."""
    return (f"the folder has {n_images:,} images, too few for DeepCluster-v2 to size itself (the rule is "
            f"measured from {MIN_IMAGES:,} on); use v1 (e.g. --recipe small), or pin --prototypes and --batch_size "
            "(and watch the collapse warning) to run v2 anyway")


def size_v2(n_images: int, recipe: dict[str, Any], given: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The sizes the rule sets for a v2 run on ``n_images`` images and the clause that says
    them and why (None: nothing changed).

    Args:
        recipe: the recipe's settings (the defaults where it has none of them).
        given: every setting the command line and the ``--config`` file state; those win.

    Raises:
        ConfigError: fewer than ``MIN_IMAGES`` images and prototypes or batch left to the rule.
    """
    from deepcluster.settings.schema import Config
    from deepcluster.settings.values import coerce

    if all(key in given for key in SIZED):
        return {}, None
    if n_images < MIN_IMAGES:  # not measured: the user sizes the run, or it is refused
        if "prototypes" in given and "batch_size" in given:
            return {}, None
        raise ConfigError(refusal(n_images))
    base = {key: coerce(key, given[key]) if key in given else recipe.get(key, getattr(Config, key)) for key in SIZED}
    changed = {key: value for key, value in rule_values(n_images, base).items()
               if key not in given and value != base[key]}
    if not changed:
        return {}, None
    said = ", ".join(f"{key} {','.join(map(str, value)) if isinstance(value, tuple) else value}"
                     for key, value in changed.items())
    return changed, f"v2 sized to {n_images:,} images: {said} ({RULE}; pinned values win)"


__all__ = ["IMAGES_PER_PROTOTYPE", "LR_DIVISOR", "MIN_BATCH", "MIN_IMAGES", "MIN_PROTOTYPES", "RULE", "SMALL_FOLDER",
           "SMALL_TEMPERATURE", "STEPS_PER_EPOCH", "is_v2", "refusal", "rule_batch", "rule_prototypes", "rule_values", "size_v2"]
