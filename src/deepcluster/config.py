"""One source of defaults: the run configuration, its recipes, and how users override it.

Precedence, lowest first: the dataclass defaults (the paper's ImageNet settings), the
chosen recipe (``deepcluster/recipes/NAME.yaml``), a YAML file, ``--key value`` pairs on the
command line. Unknown keys are an error that names them; the resolved configuration is
written into the run folder and into every checkpoint.

Every setting belongs to one section (``SECTIONS``); the ``v1`` and ``v2`` sections hold
what only that method reads, and a setting of the other method's section given explicitly
(command line, file, ``overrides``) is refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deepcluster import recipes as recipe_files
from deepcluster.models import ARCHITECTURES, CLUSTERED, FC_INITS, SCALINGS, STEMS, scalable_archs


class ConfigError(ValueError):
    """A setting is invalid; the message names it and says what is allowed."""


# The sections of the settings, in the order ``train --help`` lists them, each with its line.
# Every setting belongs to one; ``v1`` and ``v2`` hold what only that method reads, and a
# run of the other method refuses them when they are set explicitly.
SECTIONS: dict[str, str] = {
    "data": "what to train on",
    "run": "the method, the run folder, how long, and the machinery",
    "model": "the network",
    "views": "the images the network sees",
    "optim": "the training steps",
    "monitor": "the online kNN measured while training",
    "kmeans": "the clustering both methods run (v1: k-means, v2: spherical k-means per head)",
    "v1": "DeepCluster (method v1) only",
    "v2": "DeepCluster-v2 (method v2) only",
}
METHOD_SECTIONS = ("v1", "v2")  # the sections named after a method (``method``'s values)


def setting(default: Any, help: str, section: str) -> Any:
    """A ``Config`` field of ``section`` with its one line of advice (``--help`` lists them,
    ``settings_help``)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}")
    return dataclasses.field(default=default, metadata={"help": help, "section": section})


@dataclass
class Config:
    """Every setting of a DeepCluster run. Defaults are the reference ImageNet settings.

    Deviations from the paper are options with the paper's value as default, except
    where a recipe says otherwise (see ``RECIPES``). Each field carries its advice in
    ``metadata["help"]`` and its section (``SECTIONS``) in ``metadata["section"]``: the one
    source of ``deepcluster train --help``. ``config.section("optim")`` gives one section's
    values.
    """

    data: str | None = setting(None, "image folder (classes, for scores only: its top-level sub-folders); "
                                     "none = the built-in digits", section="data")
    val: str | None = setting(None, "labelled folder (FOLDER/<class>/<image>, e.g. a test split): every val_every "
                                    "epochs its images are classified by kNN on the training images' features",
                              section="monitor")
    val_every: int = setting(1, "epochs between online kNN measurements (the last epoch is always measured)",
                             section="monitor")
    knn_body: bool = setting(True, "when the fc features are clustered (the paper), also measure the online kNN on "
                                   "the pooled conv body, the layers the paper transfers (knn_body_top1; costs the "
                                   "body's width in memory per training image: 9,216 floats for AlexNet; left out, "
                                   "with a line, above 4 GiB per process)", section="monitor")
    out_dir: str = setting("runs/deepcluster", "run folder: log, assignments, checkpoint (runs/digits for the "
                                               "built-in digits)", section="run")
    method: str = setting("v1", "v1: DeepCluster (Caron et al. 2018): feature pass, PCA, k-means, a new classifier "
                                "every epoch | v2: DeepCluster-v2 (SwAV paper): spherical k-means of a memory bank "
                                "of embeddings, prototype heads, multi-crop (the v2-* recipes)", section="run")
    arch: str = setting("alexnet", " | ".join(f"{name} ({spec.about})" for name, spec in ARCHITECTURES.items()),
                        section="model")
    sobel: bool = setting(True, "fixed grayscale + Sobel filter in front of the first conv (the paper's)",
                          section="model")
    stem: str = setting("imagenet", "a ResNet's first layers: imagenet (7x7 stride-2 conv, max-pool) | cifar (3x3 "
                                    "stride-1 conv, no max-pool: for 32-96 px images)", section="model")
    feature_dim: int | None = setting(None, "width of the fc layers; none = the architecture's", section="model")
    width: int = setting(1, "smallnet only: its conv channels (32-32-64-64-128-128-256) times this; 1 = the small "
                            "net as designed", section="model")
    depth: int = setting(1, "smallnet only: each of its 7 conv layers repeated this many times (2: 14 conv "
                            "layers, each stage twice as deep); 1 = the small net as designed", section="model")
    clustered: str = setting("fc", "what is clustered and what the online kNN measures: fc, the last fully "
                                   "connected layer before its ReLU (the paper) | body, the convolutional output "
                                   "pooled to the classifier's grid (the fc layers then act only as a head); v2: what "
                                   "feeds the projection (a ResNet's pooled output either way)", section="model")
    init: str | None = setting(None, "start from these weights instead of random ones: a .safetensors file or a "
                                     "saved state dict of resnet18/resnet50 in torchvision's names (its fc is left "
                                     "out; set sobel false), or a deepcluster checkpoint or export; never downloaded",
                               section="model")
    fc_init: str = setting("reference", "reference: fc weights and heads from N(0, 0.01), the authors' | width: "
                                        "N(0, 0.01*sqrt(4096/fan_in)), the reference's 4096-wide gain at any width",
                           section="model")
    resize: int = setting(256, "feature pass: shorter side resized to this many pixels (at most 1024)", section="views")
    crop: int = setting(224, "then centre-cropped to this; also the training crop size (at most 1024)", section="views")
    crop_scale_min: float = setting(0.08, "random resized crop: smallest share of the image area; raise it for "
                                          "small images (0.2 at 32 px)", section="v1")
    hflip: bool = setting(True, "random horizontal flips in training (the paper; off in the small and digits "
                                "recipes: a flip changes a digit, and it did not help on CIFAR-10 either)",
                          section="views")
    color_jitter: float = setting(0.0, "colour jitter of training views (not in the paper): with probability 0.8 "
                                       "brightness, contrast, saturation x U[1-s, 1+s], hue +-s/4; 0 = off",
                                  section="views")
    grayscale_prob: float = setting(0.0, "probability that a training view turns gray (not in the paper)",
                                    section="views")
    mean: tuple[float, float, float] = setting((0.485, 0.456, 0.406), "per-channel mean of RGB in [0, 1]",
                                               section="data")
    std: tuple[float, float, float] = setting((0.229, 0.224, 0.225), "per-channel standard deviation", section="data")
    clustering: str = setting("kmeans", "kmeans (the paper) | pic (power iteration clustering on a 5-NN graph; "
                                        "finds its own number of clusters)", section="v1")
    n_clusters: int = setting(10000, "k of k-means: well above the number of classes (ImageNet: 10x; with k = "
                                     "10 on CIFAR-10 NMI stays below 0.1)", section="v1")
    pca_dim: int = setting(256, "PCA dimensions before clustering", section="v1")
    pca_sample_size: int | None = setting(None, "fit the PCA on this many images and project the rest as they "
                                                "come (bounded memory); none = all, as the reference", section="v1")
    whiten_power: float = setting(-0.5, "-0.5 whitens, 0 only reduces", section="v1")
    kmeans_iters: int = setting(20, "k-means iterations per clustering (v2: of each head's spherical k-means; "
                                    "the reference 10)", section="kmeans")
    kmeans_backend: str = setting("faiss", "faiss | torch (a PyTorch search: GPU too, sharded over processes)",
                                  section="kmeans")
    kmeans_init: str = setting("random", "random (the paper) | kmeans++ | previous: start from the means of last "
                                         "epoch's clusters, so cluster ids carry over (lets head_reset false keep "
                                         "the head)", section="v1")
    clustering_device: str = setting("auto", "where k-means and PIC search: auto (the training device) | cpu | "
                                             "cuda[:N]", section="kmeans")
    reassign_every: int = setting(1, "epochs between clusterings (the reference's --reassign)", section="v1")
    epochs: int = setting(500, "training epochs", section="run")
    batch_size: int = setting(256, "training batch (v1: of each process, so the global batch is batch_size x "
                                   "processes; v2: the global batch, split over the processes)", section="optim")
    sync_batchnorm: str = setting("auto", "with several processes, BatchNorm statistics over the global batch: on | "
                                          "off | auto (on for v2, as the references; off for v1)", section="run")
    lr: float = setting(0.05, "SGD learning rate of the body", section="optim")
    momentum: float = setting(0.9, "SGD momentum of the body; it persists across epochs", section="optim")
    weight_decay: float = setting(1e-5, "SGD weight decay", section="optim")
    head_lr: float | None = setting(None, "learning rate of the top layer, re-created each epoch; none = lr "
                                          "(the reference)", section="v1")
    head_init: str = setting("random", "random: each new head from N(0, 0.01) (the reference) | centroids: a "
                                       "nearest-cluster-mean classifier of the epoch's features", section="v1")
    head_reset: bool = setting(True, "a new head after every clustering (the reference: ids are arbitrary); false "
                                     "keeps it, only with kmeans_init previous", section="v1")
    sampler: str = setting("uniform", "uniform: every non-empty cluster gets the same share of an epoch (the "
                                      "paper's defence against trivial solutions) | shuffle: a plain pass",
                           section="optim")
    optimizer: str = setting("sgd", "sgd (v1: the only one) | lars: SGD with layer-wise adaptive rates (v2's "
                                    "reference; large batches)", section="v2")
    lars_trust: float = setting(0.001, "LARS trust coefficient (SwAV: 0.001; solo-learn's CIFAR recipe: 0.02)",
                                section="v2")
    lars_clip: bool = setting(False, "LARS: cap each layer's adaptive rate at lr (solo-learn: true; SwAV: false)",
                              section="v2")
    lars_exclude_1d: bool = setting(False, "LARS: biases and BatchNorm weights keep plain SGD, without weight decay "
                                           "(solo-learn: true; SwAV: false)", section="v2")
    warmup_epochs: int = setting(0, "epochs of linear warm-up from warmup_start_lr to lr, then half a cosine "
                                    "down to final_lr, set at every step (v2: SwAV 10, solo-learn CIFAR 11; v1: "
                                    "not in the paper, the body only, the head keeps head_lr)", section="optim")
    warmup_start_lr: float = setting(0.0, "learning rate of the first step (SwAV ImageNet: 0.3)", section="optim")
    final_lr: float | None = setting(None, "learning rate the cosine ends at (SwAV: 0.0048, solo-learn CIFAR: "
                                           "0.0006); none = lr all along (no schedule)", section="optim")
    precision: str = setting("fp32", "fp32 (the paper) | bf16 autocast: 1.9x faster on one CPU with bf16 units "
                                     "(Zen 5), 1.2x slower on another (a Xeon without AMX); measure yours with "
                                     "bench/epoch_cost.py", section="run")
    channels_last: bool = setting(True, "memory layout only (same numbers); 2x faster convolutions on CPU",
                                  section="run")
    prototypes: tuple[int, ...] = setting((3000, 3000, 3000), "v2: prototypes of each head, comma-separated (the "
                                                              "reference: 3000,3000,3000); each at most the images",
                                          section="v2")
    temperature: float = setting(0.1, "v2: the prototype scores (cosines) are divided by it before the "
                                      "cross-entropy (the reference: 0.1)", section="v2")
    projection_hidden: int = setting(2048, "v2: hidden width of the projection MLP (Linear, BatchNorm, ReLU, "
                                           "Linear); 0 = one linear layer", section="v2")
    projection_dim: int = setting(128, "v2: width of the L2-normalised embedding that is clustered", section="v2")
    crop_sizes: tuple[int, ...] = setting((224, 96), "v2: side (px) of each crop group, large first; the first "
                                                     "group's first two crops fill the memory bank", section="v2")
    crop_counts: tuple[int, ...] = setting((2, 6), "v2: crops per group (the reference 2,6; the first at least 2)",
                                           section="v2")
    crop_min_scales: tuple[float, ...] = setting((0.14, 0.05), "v2: smallest share of the image area of each "
                                                               "group's crops", section="v2")
    crop_max_scales: tuple[float, ...] = setting((1.0, 0.14), "v2: largest share of the image area of each "
                                                              "group's crops", section="v2")
    blur_prob: float = setting(0.5, "v2: probability of a Gaussian blur (radius 0.1-2 px) of each crop", section="v2")
    empty_clusters: str = setting("keep", "v2: an empty cluster keeps its previous centroid (the reference) | split: "
                                          "re-seeded next to a large one, as v1; the count is logged either way",
                                  section="v2")
    seed: int = setting(31, "seed of every random choice (a resumed run equals an uninterrupted one)", section="run")
    device: str = setting("auto", "auto (a GPU when present) | cpu | cuda | cuda:N", section="run")
    workers: int = setting(2, "data-loading processes (0 = load in the main process)", section="run")
    feature_batch_size: int = setting(256, "batch of the feature pass", section="run")
    threads: int | None = setting(None, "torch CPU threads; none = torch's default", section="run")
    keep_freed_memory: bool = setting(True, "keep the memory a batch frees for the next one (glibc: malloc's mmap and "
                                            "trim thresholds at 1 GiB, for the whole process): the same numbers, "
                                            "no page faults per batch, epochs 7-13% faster here, but the paper "
                                            "recipe's peak memory 1.5 GiB higher; false = glibc's defaults",
                                      section="run")
    tensorboard: bool = setting(True, "also write the per-epoch numbers to RUN/tensorboard (when the tensorboard "
                                      "package is installed)", section="run")
    minutes: float | None = setting(None, "time budget of the training: the first epoch is timed and the epochs (and "
                                          "a warm-up, scaled alike) fitted to it, saved in RUN/config.yaml; none = "
                                          "train the epochs", section="run")
    final_clustering: bool = setting(True, "after the last epoch, cluster the trained network once more, so the "
                                           "saved centroids fit the saved weights (what assign uses; not in the "
                                           "paper)", section="run")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir)

    def section(self, name: str) -> dict[str, Any]:
        """The values of the settings of section ``name`` (one of ``SECTIONS``), by name."""
        if name not in SECTIONS:
            raise KeyError(f"unknown section {name!r}; choose one of: {', '.join(SECTIONS)}")
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)
                if item.metadata["section"] == name}

    def to_dict(self) -> dict[str, Any]:
        """Plain values (list settings as lists), for YAML and checkpoints."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}


def load_recipe(name: str) -> tuple[dict[str, Any], str, str]:
    """Recipe ``name`` from its file (``deepcluster/recipes/NAME.yaml``): its settings, checked
    as a ``--config`` file's are (known keys, values of their type, only its own method's
    section, a valid whole), its line for ``deepcluster recipes`` and its provenance.

    Raises:
        ConfigError: the file cannot be read or holds a bad setting.
    """
    try:
        content = recipe_files.read(name)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"recipe {name!r} cannot be read ({error})") from None
    settings = {key: coerce(key, value) for key, value in content["settings"].items()}
    config = apply_overrides(Config(), settings)
    refuse_other_method(config, settings, settings)
    validate(config)
    return settings, str(content["about"]), str(content["provenance"])


def recipe_line(name: str) -> str:
    """``name``, what it is for, and its main settings, on one line."""
    config = apply_overrides(Config(), RECIPES[name])
    clusters = (f"prototypes {','.join(map(str, config.prototypes))}" if config.method == "v2"
                else f"k={config.n_clusters}" if "n_clusters" in RECIPES[name] or name == "paper"
                else "k from the folder")
    return (f"{name:<12} {RECIPE_ABOUT.get(name, '')} ({config.method}, {config.arch}"
            f"{' + sobel' if config.sobel else ''}, {config.crop} px, {clusters}, {config.epochs} epochs)")


def config_text(config: Config, recipe: str | None = None) -> str:
    """The settings as the YAML a run saves (``RUN/config.yaml``); with ``recipe``, the keys
    that recipe sets are marked ``# recipe NAME`` and those set otherwise (a file, the command
    line) ``# set``."""
    marked = set(RECIPES.get(recipe or "", {}))
    base = apply_overrides(Config(), RECIPES[recipe]).to_dict() if recipe in RECIPES else None
    lines = []
    for key, value in config.to_dict().items():
        text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=True, width=10**6).strip()
        text = text[1:-1] if text.startswith("{") else text  # one line: key: value
        if base is not None and value != base[key]:
            text += "  # set"
        elif key in marked:
            text += f"  # recipe {recipe}"
        lines.append(text)
    return "\n".join(lines)


CHOICES: dict[str, tuple[str, ...]] = {
    "arch": tuple(ARCHITECTURES),
    "fc_init": FC_INITS,
    "clustered": CLUSTERED,
    "stem": STEMS,
    "head_init": ("random", "centroids"),
    "clustering": ("kmeans", "pic"),
    "kmeans_backend": ("faiss", "torch"),
    "kmeans_init": ("random", "kmeans++", "previous"),
    "sampler": ("uniform", "shuffle"),
    "precision": ("fp32", "bf16"),
    "method": ("v1", "v2"),
    "optimizer": ("sgd", "lars"),
    "empty_clusters": ("keep", "split"),
    "sync_batchnorm": ("auto", "on", "off"),
}

FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def settings_help(width: int = 100) -> str:
    """Every setting with its default (the paper recipe's) and advice, one block per line,
    under a heading per section (``SECTIONS``, in that order), for ``deepcluster train
    --help``; generated from the fields' ``metadata``."""
    import textwrap

    def shown(value: Any) -> str:
        if value is None:
            return "none"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, tuple):
            return ",".join(f"{v:g}" for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    lines = []
    for section, about in SECTIONS.items():
        lines += ["", *textwrap.wrap(f"{section}: {about}", width)]
        for item in dataclasses.fields(Config):
            if item.metadata["section"] != section:
                continue
            name = "--out" if item.name == "out_dir" else f"--{item.name}"
            head = f"  {name:<21} {shown(item.default):<18} "
            advice = item.metadata.get("help", "")
            lines += textwrap.wrap(advice, width, initial_indent=head, subsequent_indent=" " * len(head),
                                   break_on_hyphens=False) or [head]
    return "\n".join(lines[1:])


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown setting {key!r}{hint}"


@dataclass(frozen=True)
class SettingType:
    """What values a setting takes, read from its annotation.

    Attributes:
        kind: ``bool``, ``int``, ``float``, ``str`` or ``tuple`` (a list setting).
        optional: ``None`` is allowed (``none``/``null`` on the command line).
        items: for a list setting, the type of each item (``int`` or ``float``).
        length: for a list setting, the number of items it must have (None: one or more).
    """

    kind: type
    optional: bool = False
    items: type | None = None
    length: int | None = None

    @classmethod
    def of(cls, annotation: Any) -> SettingType:
        """``int | None`` -> ``(int, optional)``; ``tuple[int, ...]`` -> a list of ints of any
        length; ``tuple[float, float, float]`` -> a list of three floats."""
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            return dataclasses.replace(cls.of(args[0]), optional=True)
        if origin is tuple:
            args = typing.get_args(annotation)
            if len(args) == 2 and args[1] is Ellipsis:
                return cls(tuple, items=args[0])
            return cls(tuple, items=args[0], length=len(args))
        return cls(annotation)

    def describe(self) -> str:
        """What a value must be, for error messages."""
        if self.kind is tuple:
            count = {None: "one or more", 3: "three"}.get(self.length, str(self.length))
            noun = "integers" if self.items is int else "finite numbers"
            return f"{count} comma-separated {noun}"
        return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[self.kind]

    def parse(self, value: Any) -> Any:
        """``value`` (from YAML or a command-line string) as this type.

        Raises:
            ValueError, TypeError, OverflowError: it is not one.
        """
        if self.optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        kind = self.kind
        if kind is tuple:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            parsed = tuple(SettingType(self.items).parse(item) for item in items)
            if not parsed or (self.length is not None and len(parsed) != self.length):
                raise ValueError
            return parsed
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan or inf would poison every later computation
                raise ValueError
            return number
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        raise TypeError(f"unsupported setting type {kind!r}")


TYPES = {name: SettingType.of(hint) for name, hint in typing.get_type_hints(Config).items()}


# Folders and files a run reads, stored as absolute paths (the run folder itself is named anew by
# every command that uses it).
FOLDER_SETTINGS = ("data", "val", "init")


def coerce(key: str, value: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the type of ``key``.

    Raises:
        ConfigError: unknown key or a value of the wrong type.
    """
    if key not in FIELDS:
        raise ConfigError(_unknown_key_message(key))
    try:
        parsed = TYPES[key].parse(value)
        if key in FOLDER_SETTINGS and parsed and "\0" not in parsed:
            # Stored absolute: the run reads the same folder from wherever it is resumed or
            # reported, and the folder typed relatively or absolutely is the same setting.
            parsed = os.path.abspath(parsed)
        return parsed
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"setting {key!r} must be {TYPES[key].describe()}, got {short_repr(value)}") from None


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` bounded in size and in the work it takes (nested containers are cut
    after a few items and levels), for error messages."""
    import reprlib

    bounded = reprlib.Repr()
    bounded.maxstring = bounded.maxother = limit
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 4
    bounded.maxlevel = 3
    text = bounded.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Integers go to C code (torch, faiss, the data loader) that holds them in 32 bits.
MAX_INT = 2**31 - 1
MAX_THREADS = 1024
# Largest image side (crop, resize): every image is resized to it, so a typo such as
# --crop 4000 would upscale each image to gigabytes of tensors before anything is printed.
# The paper uses 224/256; 1024 leaves room for high-resolution experiments.
MAX_IMAGE_SIDE = 1024
# Counts of passes: far above any real run (the paper: 500 epochs, v2: 800), low enough that
# a typo such as --epochs 1e9 is refused before a run folder exists.
MAX_COUNT = 100_000
COUNT_LIMITS = ("epochs", "warmup_epochs", "kmeans_iters", "val_every", "reassign_every")


def validate(config: Config) -> Config:
    """Check every setting; raise ``ConfigError`` naming the first bad one."""
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"setting {key!r} is {getattr(config, key)!r}; choose one of: {', '.join(allowed)}")
    for key, kind in TYPES.items():
        value = getattr(config, key)
        values = value if kind.kind is tuple else (value,)
        if int in (kind.kind, kind.items) and value is not None and max(values) > MAX_INT:
            raise ConfigError(f"setting {key!r} must be at most {MAX_INT}, got {value}")
    positive = ("resize", "crop", "n_clusters", "pca_dim", "kmeans_iters", "epochs", "batch_size",
                "reassign_every", "feature_batch_size", "val_every")
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"setting {key!r} must be a positive integer, got {getattr(config, key)}")
    for key in COUNT_LIMITS:
        if (getattr(config, key) or 0) > MAX_COUNT:
            raise ConfigError(f"setting {key!r} must be at most {MAX_COUNT:,}, got {getattr(config, key):,} (the "
                              "paper trains 500 epochs, DeepCluster-v2 800)")
    for key in ("crop", "resize"):
        if getattr(config, key) > MAX_IMAGE_SIDE:
            raise ConfigError(f"setting {key!r} must be at most {MAX_IMAGE_SIDE} pixels, got {getattr(config, key)} "
                              "(every image is resized to it: the paper uses crop 224, resize 256; small images 32)")
    if config.n_clusters < 2:
        raise ConfigError(f"setting 'n_clusters' must be at least 2, got {config.n_clusters}")
    min_crop = ARCHITECTURES[config.arch].min_crop  # its pooling stages shrink smaller inputs to nothing
    if config.crop < min_crop:
        raise ConfigError(f"setting 'crop' must be at least {min_crop} for arch {config.arch!r}, "
                          f"got {config.crop}")
    if config.stem != "imagenet" and not ARCHITECTURES[config.arch].stems:
        raise ConfigError(f"setting 'stem' applies to the ResNets only; arch {config.arch!r} has one fixed design "
                          "(leave stem at imagenet)")
    if ARCHITECTURES[config.arch].stems and config.feature_dim is not None:
        raise ConfigError(f"setting 'feature_dim' does not apply to {config.arch} (its pooled features have a fixed "
                          "width); leave it unset")
    for name in SCALINGS:
        value = getattr(config, name)
        if value != 1 and not ARCHITECTURES[config.arch].scalable:
            raise ConfigError(f"setting '{name}' applies to arch {scalable_archs()} only; {config.arch} has a fixed "
                              f"{name} (leave {name} at 1)")
        if value < 1:
            raise ConfigError(f"setting '{name}' must be a positive integer, got {value}")
    if config.seed < 0:
        raise ConfigError(f"setting 'seed' must be a non-negative integer, got {config.seed}")
    for key in ("lr", "head_lr"):
        value = getattr(config, key)
        if value is not None and not value > 0:
            raise ConfigError(f"setting {key!r} must be a positive number, got {value}")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"setting 'momentum' must be in [0, 1), got {config.momentum}")
    if config.weight_decay < 0:
        raise ConfigError(f"setting 'weight_decay' must be >= 0, got {config.weight_decay}")
    if config.head_init == "centroids" and config.clustered != "fc":
        raise ConfigError("setting 'head_init' centroids needs clustered: fc (the head reads the fc features)")
    if not config.head_reset and config.kmeans_init != "previous":
        raise ConfigError("setting 'head_reset' false needs kmeans_init: previous (otherwise cluster ids are "
                          "arbitrary every epoch and the kept head predicts the wrong ones)")
    for key in ("color_jitter", "grayscale_prob"):
        if not 0 <= getattr(config, key) <= 1:
            raise ConfigError(f"setting {key!r} must be in [0, 1], got {getattr(config, key)}")
    if not 0 < config.crop_scale_min <= 1:
        raise ConfigError(f"setting 'crop_scale_min' must be in (0, 1], got {config.crop_scale_min}")
    if not 0 <= config.workers <= MAX_THREADS:
        raise ConfigError(f"setting 'workers' must be between 0 and {MAX_THREADS}, got {config.workers}")
    if config.threads is not None and not 1 <= config.threads <= MAX_THREADS:
        raise ConfigError(f"setting 'threads' must be between 1 and {MAX_THREADS} (or none), got {config.threads}")
    if config.feature_dim is not None and config.feature_dim < 1:
        raise ConfigError(f"setting 'feature_dim' must be a positive integer, got {config.feature_dim}")
    if any(s <= 0 for s in config.std):
        raise ConfigError(f"setting 'std' must be three positive numbers, got {config.std}")
    for key in ("device", "clustering_device"):
        value = getattr(config, key)
        index = value[5:]
        if not (value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and index.isdigit() and index.isascii())):
            raise ConfigError(f"setting {key!r} is {value!r}; choose auto, cpu, cuda or cuda:N")
    if config.pca_sample_size is not None and config.pca_sample_size < config.pca_dim:
        raise ConfigError(f"setting 'pca_sample_size' must be at least pca_dim ({config.pca_dim}) or null for "
                          f"all images, got {config.pca_sample_size}")
    validate_v2(config)
    if not config.out_dir or "\0" in config.out_dir:
        raise ConfigError(f"setting 'out_dir' must be a folder path, got {config.out_dir!r}")
    if config.init is not None and (not config.init or "\0" in config.init):
        raise ConfigError(f"setting 'init' must be a file path, got {config.init!r}")
    if config.data is not None and "\0" in config.data:
        raise ConfigError(f"setting 'data' must be a folder path, got {config.data!r}")
    return config


# Settings that only a v2 run reads, and those only a v1 run reads that would change its
# training; given to the other method they are refused rather than silently ignored.
V2_ONLY = {"optimizer": "sgd"}
V1_ONLY = {"clustering": "kmeans", "head_init": "random", "head_lr": None, "reassign_every": 1}


def validate_v2(config: Config) -> None:
    """The checks of the v2 settings (and of the settings that belong to one method only)."""
    if config.method == "v1":
        for key, default in V2_ONLY.items():
            if getattr(config, key) != default:
                raise ConfigError(f"setting {key!r} applies to method v2 only (v1 trains with plain SGD, as the "
                                  f"paper); leave it at {default if default is not None else 'none'} or set method: v2")
    else:
        for key, default in V1_ONLY.items():
            if getattr(config, key) != default:
                raise ConfigError(f"setting {key!r} applies to method v1 only; leave it at "
                                  f"{default if default is not None else 'none'} with method: v2")
    if min(config.prototypes) < 2:
        raise ConfigError(f"setting 'prototypes' must be integers of at least 2 (one per head), got "
                          f"{','.join(map(str, config.prototypes))}")
    if config.projection_dim < 1 or config.projection_hidden < 0:
        raise ConfigError(f"settings 'projection_dim' (>= 1) and 'projection_hidden' (>= 0, 0 = none) got "
                          f"{config.projection_dim} and {config.projection_hidden}")
    if not config.temperature > 0:
        raise ConfigError(f"setting 'temperature' must be a positive number, got {config.temperature}")
    groups = {key: len(getattr(config, key)) for key in ("crop_sizes", "crop_counts", "crop_min_scales",
                                                         "crop_max_scales")}
    if len(set(groups.values())) != 1:
        raise ConfigError("settings crop_sizes, crop_counts, crop_min_scales and crop_max_scales need one value per "
                          f"crop group each, got {', '.join(f'{k} {n}' for k, n in groups.items())}")
    min_crop = ARCHITECTURES[config.arch].min_crop
    for size in config.crop_sizes:
        if not min_crop <= size <= MAX_IMAGE_SIDE:
            raise ConfigError(f"setting 'crop_sizes' must be between {min_crop} (arch {config.arch}) and "
                              f"{MAX_IMAGE_SIDE} pixels, got {size}")
    if min(config.crop_counts) < 1 or config.crop_counts[0] < 2:
        raise ConfigError(f"setting 'crop_counts' must be positive, the first (large) group at least 2: its first two "
                          f"crops fill the memory bank; got {','.join(map(str, config.crop_counts))}")
    for low, high in zip(config.crop_min_scales, config.crop_max_scales):
        if not 0 < low <= high <= 1:
            raise ConfigError(f"settings 'crop_min_scales' and 'crop_max_scales' must satisfy 0 < min <= max <= 1 in "
                              f"each group, got {low} and {high}")
    if not 0 <= config.blur_prob <= 1:
        raise ConfigError(f"setting 'blur_prob' must be in [0, 1], got {config.blur_prob}")
    if config.warmup_epochs < 0:
        raise ConfigError(f"setting 'warmup_epochs' must be >= 0, got {config.warmup_epochs}")
    for key in ("warmup_start_lr", "final_lr"):
        value = getattr(config, key)
        if value is not None and value < 0:
            raise ConfigError(f"setting {key!r} must be >= 0, got {value}")
    if not config.lars_trust > 0:
        raise ConfigError(f"setting 'lars_trust' must be a positive number, got {config.lars_trust}")


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``config`` with ``overrides`` coerced and applied (unknown keys rejected)."""
    unknown = [key for key in overrides if key not in FIELDS]
    if unknown:
        raise ConfigError("; ".join(_unknown_key_message(key) for key in unknown))
    return dataclasses.replace(config, **{key: coerce(key, value) for key, value in overrides.items()})


# A settings file is a flat mapping of a few dozen lines; anything far larger is a mistake.
MAX_CONFIG_BYTES = 1 << 20


def _refuse_aliases(text: str, path: Path) -> None:
    """Raise ``ConfigError`` at the first YAML alias (``*name``): nested aliases expand
    exponentially (a 1.5 KB file can stand for gigabytes once printed or walked), and a
    settings file never needs one."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"config file {str(path)!r} uses a YAML alias (*{event.anchor[:40]}) at line "
                              f"{event.start_mark.line + 1}; write each value out instead")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of settings; a clear ``ConfigError`` for any problem (aliases
    and files over ``MAX_CONFIG_BYTES`` are refused)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror or error}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(path)!r} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; a settings "
                          "file is a short mapping of setting: value")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    try:
        _refuse_aliases(text, path)
        content = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as error:
        # PyYAML's constructors raise these for values such as the date 2024-13-45.
        raise ConfigError(f"config file {str(path)!r} holds a value YAML cannot read ({error})") from None
    if content is None:
        return {}
    if not isinstance(content, dict) or not all(isinstance(k, str) for k in content):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of setting: value")
    return content


def default_recipe(data: str | None) -> str:
    """The recipe used when none is named: ``digits`` for the built-in digits (no data
    folder), ``paper`` for a folder of images."""
    return "paper" if data is not None else "digits"


DIGITS_OUT_DIR = "runs/digits"  # default run folder of the built-in digits (``out_dir`` otherwise)


def _read_given(recipe: str | None, config_file: str | Path | None,
                overrides: dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """The recipe named (``recipe``, else the file's ``recipe:``; checked) and every setting
    stated by the file and the overrides, the overrides winning."""
    from_file = load_yaml(config_file) if config_file is not None else {}
    file_recipe = from_file.pop("recipe", None)
    for name in (recipe, file_recipe):  # a bad recipe in the file is an error even when overridden
        if name is not None and (not isinstance(name, str) or name not in RECIPES):
            raise ConfigError(f"unknown recipe {short_repr(name)}; choose one of: {', '.join(RECIPES)}")
    return recipe or file_recipe, {**from_file, **(overrides or {})}


def run_folder(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> str:
    """The run folder a command line names: its ``out_dir``, else the default for its data
    (``runs/digits`` for the built-in digits, ``runs/deepcluster`` for a folder)."""
    _, given = _read_given(None, config_file, overrides)
    if "out_dir" in given:
        return str(coerce("out_dir", given["out_dir"]))
    data = coerce("data", given["data"]) if "data" in given else None
    return Config.out_dir if data is not None else DIGITS_OUT_DIR


def section_of(key: str) -> str:
    """The section (``SECTIONS``) of setting ``key``."""
    return FIELDS[key].metadata["section"]


def refuse_other_method(config: Config, given: dict[str, Any], overrides: dict[str, Any] | None) -> None:
    """Refuse a setting of the other method's section (``v1`` in a v2 run and the reverse)
    that ``given`` states explicitly: it would be silently ignored. A config file may hold
    such a key at its default, as the files a run or ``--print-config`` writes hold every
    setting; the command line and ``overrides`` may not hold it at all.

    Raises:
        ConfigError: one line naming the key, its section and the run's method.
    """
    if config.method not in METHOD_SECTIONS:
        return  # ``validate`` names the bad method
    for key, value in given.items():
        section = section_of(key)
        if section not in METHOD_SECTIONS or section == config.method:
            continue
        from_file = key not in (overrides or {})
        if from_file and coerce(key, value) == FIELDS[key].default:
            continue
        where = " of the config file" if from_file else ""
        raise ConfigError(f"setting {key!r} is a {section} setting; this run is {config.method} (method "
                          f"{config.method}): leave it out{where}, or set method: {section}")


def resolve(recipe: str | None = None, config_file: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated ``Config`` from a recipe, a YAML file and explicit overrides.

    The recipe is ``recipe``, else the file's own ``recipe:``, else ``default_recipe`` of the
    data folder the file or the overrides name (``digits`` without one, ``paper`` with one).
    Without an ``out_dir`` anywhere, a run on the built-in digits goes to ``runs/digits``.
    """
    named, given = _read_given(recipe, config_file, overrides)
    data = coerce("data", given["data"]) if "data" in given else None
    config = apply_overrides(Config(), RECIPES[named or default_recipe(data)])
    config = apply_overrides(config, given)
    refuse_other_method(config, given, overrides)
    if config.data is None and "out_dir" not in given:
        config.out_dir = DIGITS_OUT_DIR
    return validate(config)


# Settings a resumed run may change: they do not alter what the run computes (or, for
# epochs and the final clustering, only how far it goes).
RESUMABLE = frozenset({"epochs", "workers", "threads", "device", "clustering_device", "feature_batch_size", "out_dir",
                       "tensorboard", "final_clustering", "val", "val_every", "knn_body", "sync_batchnorm",
                       "keep_freed_memory"})


def check_unchanged(saved: Config, config: Config) -> None:
    """Raise ``ConfigError`` naming every setting outside ``RESUMABLE`` that differs."""
    old, new = saved.to_dict(), config.to_dict()
    changed = [key for key in new if key not in RESUMABLE and old.get(key) != new[key]]
    if changed:
        details = ", ".join(f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in changed)
        raise ConfigError(f"cannot resume with different settings ({details}); only {', '.join(sorted(RESUMABLE))} "
                          "may change")


def resolve_resume(saved: dict[str, Any], run_dir: str | Path, recipe: str | None = None,
                   config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The settings of a resumed run: the run's saved ones (``RUN/config.yaml``), with what
    the command line states explicitly (a recipe, a file, overrides, in that order) applied
    on top; anything outside ``RESUMABLE`` that this changes is refused.

    Raises:
        ConfigError: the saved settings are invalid, or an explicit setting changes one that
            must stay.
    """
    try:
        base = dataclasses.replace(from_dict(saved), out_dir=str(run_dir))
    except ConfigError as error:
        raise ConfigError(f"the saved settings of {str(run_dir)!r} are invalid ({error})") from None
    named, given = _read_given(recipe, config_file, overrides)
    config = apply_overrides(base, RECIPES[named] if named else {})
    config = apply_overrides(config, {**given, "out_dir": str(run_dir)})
    refuse_other_method(config, given, overrides)
    config = validate(config)
    check_unchanged(base, config)
    return config


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a ``Config`` saved with ``to_dict`` (e.g. from a checkpoint)."""
    return validate(apply_overrides(Config(), values))


# Recipes: named sets of overrides on top of the defaults, read from their files.
_LOADED = {name: load_recipe(name) for name in recipe_files.NAMES}
RECIPES: dict[str, dict[str, Any]] = {name: loaded[0] for name, loaded in _LOADED.items()}
RECIPE_ABOUT: dict[str, str] = {name: loaded[1] for name, loaded in _LOADED.items()}  # one line each
RECIPE_PROVENANCE: dict[str, str] = {name: loaded[2] for name, loaded in _LOADED.items()}


__all__ = ["CHOICES", "Config", "ConfigError", "RECIPES", "RECIPE_ABOUT", "RECIPE_PROVENANCE", "SECTIONS",
           "load_recipe", "refuse_other_method", "section_of", "config_text", "recipe_line", "RESUMABLE", "V1_ONLY",
           "V2_ONLY", "apply_overrides", "check_unchanged", "coerce", "default_recipe", "from_dict", "load_yaml",
           "resolve", "resolve_resume", "run_folder", "settings_help", "validate", "validate_v2"]
