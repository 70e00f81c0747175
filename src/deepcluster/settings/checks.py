"""The checks of the settings: one small function per section (``SECTIONS``), each looking at
its own settings (and, where a limit depends on it, at the architecture); ``validate`` runs
them in the sections' order and raises ``ConfigError`` naming the first bad setting."""

from __future__ import annotations

from typing import Callable

from deepcluster.models import ARCHITECTURES
from deepcluster.settings.schema import CHOICES, SECTIONS, Config, ConfigError
from deepcluster.settings.values import TYPES

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

# Settings that only a v2 run reads, and those only a v1 run reads that would change its
# training; given to the other method they are refused rather than silently ignored.
V2_ONLY = {"optimizer": "sgd"}
V1_ONLY = {"clustering": "kmeans", "head_lr": None, "reassign_every": 1}


def _positive(config: Config, *keys: str) -> None:
    for key in keys:
        if getattr(config, key) < 1:
            raise ConfigError(f"setting {key!r} must be a positive integer, got {getattr(config, key)}")


def _counts(config: Config, *keys: str) -> None:
    for key in keys:
        if (getattr(config, key) or 0) > MAX_COUNT:
            raise ConfigError(f"setting {key!r} must be at most {MAX_COUNT:,}, got {getattr(config, key):,} (the "
                              "paper trains 500 epochs, DeepCluster-v2 800)")


def _share(config: Config, *keys: str) -> None:
    for key in keys:
        if not 0 <= getattr(config, key) <= 1:
            raise ConfigError(f"setting {key!r} must be in [0, 1], got {getattr(config, key)}")


def _device(config: Config, key: str) -> None:
    value = getattr(config, key)
    index = value[5:]
    if not (value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and index.isdigit() and index.isascii())):
        raise ConfigError(f"setting {key!r} is {value!r}; choose auto, cpu, cuda or cuda:N")


def check_kinds(config: Config) -> None:
    """Every section: each choice among its values, each integer within 32 bits."""
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"setting {key!r} is {getattr(config, key)!r}; choose one of: {', '.join(allowed)}")
    for key, kind in TYPES.items():
        value = getattr(config, key)
        values = value if kind.kind is tuple else (value,)
        if int in (kind.kind, kind.items) and value is not None and max(values) > MAX_INT:
            raise ConfigError(f"setting {key!r} must be at most {MAX_INT}, got {value}")


def check_data(config: Config) -> None:
    if config.data is not None and "\0" in config.data:
        raise ConfigError(f"setting 'data' must be a folder path, got {config.data!r}")
    if any(s <= 0 for s in config.std):
        raise ConfigError(f"setting 'std' must be three positive numbers, got {config.std}")


def check_method_only(config: Config) -> None:
    """The settings one method reads that would change its training, at their defaults in a
    run of the other method."""
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


def check_run(config: Config) -> None:
    _positive(config, "epochs", "feature_batch_size")
    _counts(config, "epochs")
    if not config.out_dir or "\0" in config.out_dir:
        raise ConfigError(f"setting 'out_dir' must be a folder path, got {config.out_dir!r}")
    if config.seed < 0:
        raise ConfigError(f"setting 'seed' must be a non-negative integer, got {config.seed}")
    if not 0 <= config.workers <= MAX_THREADS:
        raise ConfigError(f"setting 'workers' must be between 0 and {MAX_THREADS}, got {config.workers}")
    if config.threads is not None and not 1 <= config.threads <= MAX_THREADS:
        raise ConfigError(f"setting 'threads' must be between 1 and {MAX_THREADS} (or none), got {config.threads}")
    _device(config, "device")
    check_method_only(config)


def check_model(config: Config) -> None:
    if config.stem != "imagenet" and not ARCHITECTURES[config.arch].stems:
        raise ConfigError(f"setting 'stem' applies to the ResNets only; arch {config.arch!r} has one fixed design "
                          "(leave stem at imagenet)")
    if ARCHITECTURES[config.arch].stems and config.feature_dim is not None:
        raise ConfigError(f"setting 'feature_dim' does not apply to {config.arch} (its pooled features have a fixed "
                          "width); leave it unset")
    if config.feature_dim is not None and config.feature_dim < 1:
        raise ConfigError(f"setting 'feature_dim' must be a positive integer, got {config.feature_dim}")
    if config.init is not None and (not config.init or "\0" in config.init):
        raise ConfigError(f"setting 'init' must be a file path, got {config.init!r}")


def check_views(config: Config) -> None:
    _positive(config, "resize", "crop")
    for key in ("crop", "resize"):
        if getattr(config, key) > MAX_IMAGE_SIDE:
            raise ConfigError(f"setting {key!r} must be at most {MAX_IMAGE_SIDE} pixels, got {getattr(config, key)} "
                              "(every image is resized to it: the paper uses crop 224, resize 256; small images 32)")
    min_crop = ARCHITECTURES[config.arch].min_crop  # its pooling stages shrink smaller inputs to nothing
    if config.crop < min_crop:
        raise ConfigError(f"setting 'crop' must be at least {min_crop} for arch {config.arch!r}, "
                          f"got {config.crop}")
    _share(config, "color_jitter", "grayscale_prob")


def check_optim(config: Config) -> None:
    _positive(config, "batch_size")
    if not config.lr > 0:
        raise ConfigError(f"setting 'lr' must be a positive number, got {config.lr}")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"setting 'momentum' must be in [0, 1), got {config.momentum}")
    if config.weight_decay < 0:
        raise ConfigError(f"setting 'weight_decay' must be >= 0, got {config.weight_decay}")
    _counts(config, "warmup_epochs")
    if config.warmup_epochs < 0:
        raise ConfigError(f"setting 'warmup_epochs' must be >= 0, got {config.warmup_epochs}")
    for key in ("warmup_start_lr", "final_lr"):
        value = getattr(config, key)
        if value is not None and value < 0:
            raise ConfigError(f"setting {key!r} must be >= 0, got {value}")


def check_monitor(config: Config) -> None:
    _positive(config, "val_every")
    _counts(config, "val_every")


def check_kmeans(config: Config) -> None:
    _positive(config, "kmeans_iters")
    _counts(config, "kmeans_iters")
    _device(config, "clustering_device")


def check_v1(config: Config) -> None:
    _positive(config, "n_clusters", "pca_dim", "reassign_every")
    _counts(config, "reassign_every")
    if config.n_clusters < 2:
        raise ConfigError(f"setting 'n_clusters' must be at least 2, got {config.n_clusters}")
    if config.head_lr is not None and not config.head_lr > 0:
        raise ConfigError(f"setting 'head_lr' must be a positive number, got {config.head_lr}")
    if not 0 < config.crop_scale_min <= 1:
        raise ConfigError(f"setting 'crop_scale_min' must be in (0, 1], got {config.crop_scale_min}")
    if config.pca_sample_size is not None and config.pca_sample_size < config.pca_dim:
        raise ConfigError(f"setting 'pca_sample_size' must be at least pca_dim ({config.pca_dim}) or null for "
                          f"all images, got {config.pca_sample_size}")
    if config.carry_clusters and config.clustering != "kmeans":
        raise ConfigError("setting 'carry_clusters' needs clustering: kmeans (PIC finds new clusters, with new ids, "
                          "every time); set carry_clusters: false with clustering: pic")


def _check_crop_groups(config: Config) -> None:
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


def check_v2(config: Config) -> None:
    if min(config.prototypes) < 2:
        raise ConfigError(f"setting 'prototypes' must be integers of at least 2 (one per head), got "
                          f"{','.join(map(str, config.prototypes))}")
    if config.projection_dim < 1 or config.projection_hidden < 0:
        raise ConfigError(f"settings 'projection_dim' (>= 1) and 'projection_hidden' (>= 0, 0 = none) got "
                          f"{config.projection_dim} and {config.projection_hidden}")
    if not config.temperature > 0:
        raise ConfigError(f"setting 'temperature' must be a positive number, got {config.temperature}")
    _check_crop_groups(config)
    _share(config, "blur_prob")
    if not config.lars_trust > 0:
        raise ConfigError(f"setting 'lars_trust' must be a positive number, got {config.lars_trust}")


# Each section's checks, run in the order of ``SECTIONS``.
SECTION_CHECKS: dict[str, Callable[[Config], None]] = {
    "data": check_data, "run": check_run, "model": check_model, "views": check_views, "optim": check_optim,
    "monitor": check_monitor, "kmeans": check_kmeans, "v1": check_v1, "v2": check_v2,
}


def validate(config: Config) -> Config:
    """Check every setting; raise ``ConfigError`` naming the first bad one."""
    check_kinds(config)
    for section in SECTIONS:
        SECTION_CHECKS[section](config)
    return config


def validate_v2(config: Config) -> None:
    """The checks of the v2 section and of the settings that belong to one method only."""
    check_method_only(config)
    check_v2(config)


__all__ = ["COUNT_LIMITS", "MAX_COUNT", "MAX_IMAGE_SIDE", "MAX_INT", "MAX_THREADS", "SECTION_CHECKS", "V1_ONLY",
           "V2_ONLY", "check_data", "check_kinds", "check_kmeans", "check_method_only", "check_model",
           "check_monitor", "check_optim", "check_run", "check_v1", "check_v2", "check_views", "validate",
           "validate_v2"]
