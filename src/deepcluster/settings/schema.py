"""The settings of a run: the ``Config`` dataclass, its sections and its choices.

Every field is made by ``setting``: a default, one line of advice (``metadata["help"]``) and
a section (``metadata["section"]``, one of ``SECTIONS``); ``deepcluster train --help`` and the
settings reference are generated from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepcluster.models import ARCHITECTURES, CLUSTERED, FC_INITS, STEMS


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
    stop_on_collapse: bool = setting(False, "end the run, resumable, after the first epoch whose features collapse "
                                            "onto one direction (log.jsonl's collapse; a warning line says it "
                                            "either way)", section="monitor")
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
    kmeans_init: str = setting("random", "random (the paper) | kmeans++: how k-means picks its first means (with "
                                         "carry_clusters: in the first epoch only)", section="v1")
    carry_clusters: bool = setting(False, "start each k-means from the means of last epoch's clusters, so cluster ids "
                                          "carry over, and keep the head, whose rows still name the same clusters "
                                          "(not in the paper: a new clustering and a new head every epoch)",
                                   section="v1")
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
    precision: str = setting("fp32", "fp32 (the paper) | bf16 autocast: faster on CPUs with bf16 units, slower "
                                     "on some without; measure yours with bench/run.py cost | auto: bf16 where a "
                                     "few timed training steps at the start find it faster on hardware with native "
                                     "bf16, else fp32 (the choice is saved with the run)", section="run")
    channels_last: bool = setting(True, "memory layout only (same numbers); faster convolutions on most CPUs",
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
                                            "no page faults per batch, faster epochs on some CPUs, but the paper "
                                            "recipe's peak memory 1.5 GiB higher; false = glibc's defaults",
                                      section="run")
    tensorboard: bool = setting(True, "also write the per-epoch numbers to RUN/tensorboard (when the tensorboard "
                                      "package is installed)", section="run")
    minutes: float | None = setting(None, "time budget of the training, final clustering included: the epochs (and "
                                          "a warm-up, scaled alike) fitted to it after the first, shortened after any "
                                          "slower epoch, saved in RUN/config.yaml; none = train the epochs",
                                    section="run")
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


CHOICES: dict[str, tuple[str, ...]] = {
    "arch": tuple(ARCHITECTURES),
    "fc_init": FC_INITS,
    "clustered": CLUSTERED,
    "stem": STEMS,
    "clustering": ("kmeans", "pic"),
    "kmeans_backend": ("faiss", "torch"),
    "kmeans_init": ("random", "kmeans++"),
    "sampler": ("uniform", "shuffle"),
    "precision": ("fp32", "bf16", "auto"),
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


__all__ = ["CHOICES", "FIELDS", "METHOD_SECTIONS", "SECTIONS", "Config", "ConfigError", "setting", "settings_help"]
