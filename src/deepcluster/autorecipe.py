"""The recipe and the k a folder gets when the command line names neither.

``deepcluster train --data FOLDER`` without ``--recipe`` reads the size of a sample of the
folder's images (their headers only) and picks:

- ``photo`` when the median image's shorter side is at least ``SMALL_SIDE`` pixels;
- ``small`` below that (CIFAR-sized images).

k (``n_clusters``) then comes from the number of images by ``k_rule`` wherever the recipe
does not pin it (``photo`` does not; ``paper``, named, keeps the paper's 10,000) and the
command line or the ``--config`` file does not give it. ``photo``'s ``carry_clusters`` is
turned off below ``CARRY_MIN_IMAGES`` images unless given. The choice and its reason are said
in one line. A resumed run keeps its saved settings: nothing is chosen again.
"""

from __future__ import annotations

import os
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deepcluster.config import RECIPES, coerce, load_yaml
from deepcluster.settings.v2_sizing import check_size, is_v2

SMALL_SIDE = 64  # a median shorter side below this is a small image (the `small` recipe: 32-96 px)
HEADER_SAMPLE = 200  # image headers read to judge the size (evenly spread over the folder)
# The k rule: one cluster per IMAGES_PER_CLUSTER images, at least MIN_K (but never fewer than
# MIN_IMAGES_PER_CLUSTER images a cluster), at most the paper's MAX_K.
IMAGES_PER_CLUSTER = 40
MIN_K = 50
MIN_IMAGES_PER_CLUSTER = 5
MAX_K = 10_000
# The carry rule: ``photo`` starts each k-means from last epoch's clusters and keeps the head
# (carry_clusters) only on a folder of at least CARRY_MIN_IMAGES images, the size where that was
# measured to help (Imagenette, 9,469: docs/notebook/2026-11-30.md); on 300 photos it froze
# (docs/notebook/2026-12-07.md): below it, fresh clusters and a new head every epoch, as the paper.
CARRY_MIN_IMAGES = 9_000
CARRY_RULE = f"carry_clusters only from {CARRY_MIN_IMAGES:,} images: on a few hundred the kept clusters freeze"
K_RULE = (f"1 cluster per {IMAGES_PER_CLUSTER} images, but at least {MIN_K} or 1 per {MIN_IMAGES_PER_CLUSTER} "
          f"images if that is fewer, at most the paper's {MAX_K:,}")


def k_rule(n_images: int) -> int:
    """k for a folder of ``n_images`` images: ``n / 40`` rounded, at least 50 (well above the
    classes of a personal folder) but no more than ``n / 5`` (five images a cluster), at most
    10,000 (the paper's k, for 1.28 M images: one per 128); never below 2.

    The measurements behind it (docs/findings.md): on 4,000 digits k = 100 (40 images a
    cluster) beat k = 300 and k = 1,000 on kNN and ACC; Imagenette trained with k = 100 (one
    per 95); the digits demo uses k = 50 for 1,797 images.
    """
    k = max(round(n_images / IMAGES_PER_CLUSTER), min(MIN_K, n_images // MIN_IMAGES_PER_CLUSTER))
    return max(2, min(k, MAX_K))


@dataclass(frozen=True)
class FolderLook:
    """What a quick look at a data folder found: the image files and a sample's sizes."""

    n_images: int  # image files found (by extension)
    n_read: int  # headers of the sample that could be read
    width: int  # median width of those
    height: int  # median height
    short_side: int  # median shorter side

    def says(self) -> str:
        return f"{self.n_images:,} image files, median {self.width}x{self.height} px"


def image_files(root: str | os.PathLike) -> list[str]:
    """The image files under ``root`` (the same walk as the training's), sorted; [] if none."""
    from deepcluster.data.sources import _walk_images

    return [str(path) for path in _walk_images(Path(root))] if Path(root).is_dir() else []


def header_size(path: str) -> tuple[int, int] | None:
    """``(width, height)`` from the image's header (no decoding), or ``None`` if unreadable."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                width, height = image.size
    except Exception:  # noqa: BLE001 - any unreadable file is skipped here; the scan names it later
        return None
    return (width, height) if width > 0 and height > 0 else None


def look(root: str | os.PathLike, sample: int = HEADER_SAMPLE) -> FolderLook | None:
    """Count the images under ``root`` and read the sizes of up to ``sample`` of them,
    evenly spread in folder order (the same on every process); ``None`` when there is no
    readable image (the run's own scan then says what is wrong)."""
    files = image_files(root)
    if not files:
        return None
    picked = sorted({i * len(files) // sample for i in range(sample)}) if len(files) > sample else range(len(files))
    sizes = [size for size in (header_size(files[i]) for i in picked) if size is not None]
    if not sizes:
        return None
    return FolderLook(len(files), len(sizes), int(statistics.median(w for w, _ in sizes)),
                      int(statistics.median(h for _, h in sizes)), int(statistics.median(min(s) for s in sizes)))


def pick_recipe(folder: FolderLook) -> tuple[str, str]:
    """The recipe for a folder and why, in a few words."""
    if folder.short_side >= SMALL_SIDE:
        return "photo", f"{folder.says()}, shorter side >= {SMALL_SIDE} px"
    return "small", f"{folder.says()}, shorter side < {SMALL_SIDE} px"


def _given(config_file: str | os.PathLike | None, overrides: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The ``--config`` file's recipe and every setting stated by the file and the overrides."""
    from_file = dict(load_yaml(config_file)) if config_file is not None else {}
    file_recipe = from_file.pop("recipe", None)
    return (file_recipe if isinstance(file_recipe, str) else None), {**from_file, **overrides}


def _one_k(method: str | None) -> bool:
    """Whether ``method`` (``None``: the default) clusters with one k, ``n_clusters`` (v2
    sizes its prototypes instead)."""
    from deepcluster.config import Config
    from deepcluster.methods.registry import METHODS

    return not METHODS[method or Config().method].assigns_by_prototypes


def _k_line(recipe: str, given: dict[str, Any], folder: FolderLook | None, auto: bool) -> tuple[int | None, str]:
    """k for ``recipe`` and the clause that says why (``None``: the recipe, file or command
    line decides)."""
    settings = RECIPES.get(recipe, {})
    clustering = given.get("clustering", settings.get("clustering", "kmeans"))
    if (folder is None or "n_clusters" in given or not _one_k(given.get("method", settings.get("method")))
            or clustering != "kmeans" or recipe == "paper"):
        return None, ""
    if "n_clusters" not in settings:
        return k_rule(folder.n_images), f"k = {k_rule(folder.n_images):,} ({K_RULE}; --n_clusters sets it)"
    pinned, cap = settings["n_clusters"], max(2, folder.n_images // MIN_IMAGES_PER_CLUSTER)
    if auto and pinned > cap:  # a chosen recipe's k must fit the folder
        return cap, (f"k = {cap:,} (the recipe's {pinned:,} would leave fewer than {MIN_IMAGES_PER_CLUSTER} images "
                     "a cluster; --n_clusters sets it)")
    return None, f"k = {pinned:,} (the recipe's; --n_clusters sets it)"


def _carry_line(recipe: str, given: dict[str, Any], folder: FolderLook | None) -> tuple[bool | None, str]:
    """``photo``'s carry_clusters for the folder and the clause that says why (``None``: the
    recipe, file or command line decides)."""
    if (recipe != "photo" or folder is None or "carry_clusters" in given or folder.n_images >= CARRY_MIN_IMAGES
            or not _one_k(given.get("method", RECIPES[recipe].get("method")))):  # a v1 setting
        return None, ""
    return False, f"carry_clusters false ({CARRY_RULE}; --carry_clusters true sets it)"


def choose(recipe: str | None, config_file: str | os.PathLike | None, overrides: dict[str, Any],
           resume: bool = False, say: Callable[[str], None] | None = print) -> tuple[str | None, dict[str, Any]]:
    """The recipe and settings a training command runs with: without a recipe (``recipe``
    or the file's ``recipe:``) and with a data folder, the one that fits the folder
    (``pick_recipe``); k by ``k_rule`` where nothing pins it; ``photo``'s carry_clusters off
    below ``CARRY_MIN_IMAGES`` images where nothing sets it; a v2 run on a folder too small for
    it refused (``v2_sizing.check_size``). Says the choice in one line.

    Returns:
        ``(recipe, overrides)``: ``recipe`` as given unless one was chosen, ``overrides``
        with ``n_clusters`` and ``carry_clusters`` added where the rules set them.

    Raises:
        ConfigError: the ``--config`` file cannot be read, or a v2 run's folder is too small.
    """
    if resume:
        return recipe, overrides
    file_recipe, given = _given(config_file, overrides)
    named = recipe or file_recipe
    if "data" not in given or given["data"] is None or (named is not None and named not in RECIPES):
        return recipe, overrides  # the digits, or a bad name that ``resolve`` names
    data = coerce("data", given["data"])
    rule_may_apply = named is None or named == "photo" or (named != "paper" and "n_clusters" not in RECIPES[named]
                                                           and _one_k(RECIPES[named].get("method")))
    folder = look(data) if data and (named is None or rule_may_apply or is_v2(named, given)) else None
    if named is None and folder is None:
        return recipe, overrides  # no readable image: the run's scan says what is wrong
    reason = None
    if named is None:
        named, reason = pick_recipe(folder)
    k, k_text = _k_line(named, given, folder, reason is not None)
    if folder and is_v2(named, given):
        check_size(folder.n_images, given)
    carry, carry_text = _carry_line(named, given, folder)
    parts = [f"recipe: {named} ({reason})" if reason else "", k_text, carry_text or ""]
    if say is not None and (reason or k is not None or carry is not None):
        say("; ".join(part for part in parts if part))
    chosen = {"n_clusters": k, "carry_clusters": carry}
    return named, {**overrides, **{key: value for key, value in chosen.items() if value is not None}}


def for_command_line(recipe: str | None, config_file: str | os.PathLike | None, overrides: dict[str, Any],
                     resume: bool, print_config: bool) -> tuple[str | None, dict[str, Any]]:
    """``choose`` for ``deepcluster train``: the line goes to the terminal from the first
    process only, as a YAML comment under ``--print-config``."""
    from deepcluster.distributed import launched_rank

    def say(line: str) -> None:
        if launched_rank() == 0:
            print(f"# {line}" if print_config else f"deepcluster: {line}", flush=True)

    return choose(recipe, config_file, overrides, resume, say)


__all__ = ["CARRY_MIN_IMAGES", "CARRY_RULE", "FolderLook", "K_RULE", "SMALL_SIDE", "choose", "for_command_line", "k_rule", "look", "pick_recipe"]
