"""Build the report page of a run: ``build_report(run_dir, out_dir, settings)``.

Every section is bounded, whatever the size of the run: at most ``max_clusters`` clusters
times ``images_per_cluster`` thumbnails, ``n_filters`` times ``top_images`` top images
found among ``activation_sample`` images, and ``ascent_steps`` gradient-ascent steps on
``n_filters`` images. The defaults give a page of a few MB for 50,000 images and k = 100
or k = 10,000, built in well under a minute on a CPU for the small recipe.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deepcluster import collapse
from deepcluster.checkpoint import atomic_write_bytes
from deepcluster.config import ConfigError
from deepcluster.messages import shown_path
from deepcluster.data import CenterView, Normalize
from deepcluster.sorting import sorted_folders_text
from deepcluster.report import page
from deepcluster.report.clusters import choose_clusters, sample_members, size_statistics, summarize_clusters
from deepcluster.report.plots import epoch_curves, size_distribution
from deepcluster.report.run_data import RunData, load_run

PAGE_NAME = "index.html"


@dataclass(frozen=True)
class ReportSettings:
    """Limits and choices of the report (the command line's options).

    Attributes:
        epoch: epoch whose clustering is shown (counted from 1); ``None`` = the final clustering of the
            trained network when the run saved one, else the last epoch's.
        max_clusters: clusters shown in the grid (largest, and with labels also purest).
        images_per_cluster: random sample of each shown cluster.
        thumb_size: thumbnail side in pixels (larger images are reduced).
        page_size: cluster cards per "show more" click.
        layer: conv layer for top images and gradient ascent; ``None`` = the last one.
        filters: channels of that layer; ``None`` = the ``n_filters`` most selective.
        n_filters: how many filters when chosen automatically.
        top_images: images shown per filter.
        activation_sample: images searched for the top images (a seeded random sample).
        ascent_steps: gradient-ascent steps (0 turns the visualisation off).
        ascent_size: side of the optimised image; ``None`` = the crop size, at most 128.
        device: where the network runs.
        batch_size, workers: the pass over the sampled images.
        seed: every random choice of the page.
        data: the image folder, if it moved since training.
    """

    epoch: int | None = None
    max_clusters: int = 100
    images_per_cluster: int = 10
    thumb_size: int = 64
    page_size: int = 24
    layer: str | None = None
    filters: tuple[int, ...] | None = None
    n_filters: int = 8
    top_images: int = 9
    activation_sample: int = 2000
    ascent_steps: int = 80
    ascent_size: int | None = None
    device: str = "cpu"
    batch_size: int = 128
    workers: int = 0
    seed: int = 0
    data: str | None = None

    def check(self) -> "ReportSettings":
        """Raise ``ConfigError`` naming the first bad limit."""
        for name in ("max_clusters", "images_per_cluster", "thumb_size", "page_size", "n_filters", "top_images",
                     "activation_sample", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("ascent_steps", "workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.ascent_size is not None and self.ascent_size < 8:
            raise ConfigError(f"--ascent-size must be at least 8 pixels, got {self.ascent_size}")
        if self.epoch is not None and self.epoch < 1:
            raise ConfigError(f"--epoch must be 1 or more, got {self.epoch}")
        if self.filters is not None and any(f < 0 for f in self.filters):
            raise ConfigError("--filters must be filter numbers of 0 or more")
        return self


@dataclass
class ReportResult:
    """What was written.

    Attributes:
        path: the HTML file.
        size_bytes: its size.
        clusters_shown: clusters in the grid.
        thumbnails: images embedded in the grid and the filter section.
        sections: anchors of the sections present.
        notes: what is missing and why.
        seconds: build time.
    """

    path: Path
    size_bytes: int
    clusters_shown: int
    thumbnails: int
    sections: list[str]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# Label scores shown in the summary table, as (log key, name): accuracies in percent (one
# decimal), NMI and ARI in [0, 1] (three), as in log.jsonl, on the terminal and in ``eval``.
LABEL_SCORES = (("knn_top1", "kNN top-1 %"), ("knn_body_top1", "kNN top-1 %, conv body"),
                ("cluster_acc", "ACC % (k = classes)"), ("nmi_labels", "NMI"), ("nmi_chance", "NMI by chance"),
                ("ari_labels", "ARI"))

def clustering_summary(config) -> str:
    """How the run clusters, in a few words."""
    from deepcluster.methods.registry import METHODS

    return METHODS[config.method].clustering_text(config)


def configured_clusters(config) -> int:
    """The number of clusters a run's settings ask for (0 when the method finds its own):
    v1 k-means' k, v2's prototypes of head 0."""
    from deepcluster.methods.registry import METHODS

    return METHODS[config.method].n_clusters(config)


def _summary_rows(run: RunData, epochs_done: int) -> list[tuple[str, str]]:
    config = run.config
    data = config.data or "built-in digits (scikit-learn, 1,797 images)"
    n_images = "?" if run.source is None else f"{len(run.source):,}"
    rows = [("data", f"{data} ({n_images} images"
                     + (f", {len(run.class_names)} classes)" if run.class_names else ")")),
            ("network", f"{config.arch}{' + Sobel' if config.sobel else ''}, input {config.crop} px"),
            ("clustering", clustering_summary(config)),
            ("epochs", f"{epochs_done} of {config.epochs}")]
    if config.init:
        rows.insert(2, ("start", config.init))
    sorted_into = sorted_folders_text(run.run_dir)
    if sorted_into:
        rows.append(("sorted into", sorted_into))
    if run.records:
        last = run.records[-1]
        parts = [f"loss {last['train_loss']:.3f}"] if isinstance(last.get("train_loss"), (int, float)) else []
        if isinstance(last.get("nmi_prev"), (int, float)):
            parts.append(f"NMI(t-1,t) {last['nmi_prev']:.3f}")
        for key, name in LABEL_SCORES:
            if isinstance(last.get(key), (int, float)):
                parts.append(f"{name} {last[key]:{'.1f' if '%' in name else '.3f'}}")
        rows.append(("last epoch", ", ".join(parts)))
        if warning := collapse.report_line(run.records):
            rows.append(("warning", warning))
        total = sum(float(r.get(k) or 0.0) for r in run.records
                    for k in ("time_features", "time_clustering", "time_training"))
        rows.append(("training time", f"{total / 60:.1f} min"))
        peaks = peak_memory_text(run.records)
        if peaks:
            rows.append(("peak memory", peaks))
    final = run.final or {}
    if final:
        parts = [f"{final.get('n_nonempty', '?')} clusters"]
        if isinstance(final.get("nmi_last_epoch"), (int, float)):
            parts.append(f"NMI with the last epoch's {final['nmi_last_epoch']:.3f}")
        for key, name in LABEL_SCORES:
            if isinstance(final.get(key), (int, float)):
                parts.append(f"{name} {final[key]:{'.1f' if '%' in name else '.3f'}}")
        rows.append(("final clustering", ", ".join(parts)))
    return rows


def peak_memory_text(records: list[dict]) -> str:
    """The largest resident set of the main process in each stage over the epochs
    (``peak_mib_<stage>`` in log.jsonl), in a few words; empty when the log has none."""
    parts = []
    for stage, name in (("features", "features"), ("pca", "PCA"), ("kmeans", "clustering"), ("training", "training")):
        values = [r[f"peak_mib_{stage}"] for r in records if isinstance(r.get(f"peak_mib_{stage}"), (int, float))]
        if values:
            parts.append(f"{name} {max(values):,.0f}")
    return f"{', '.join(parts)} MiB (main process, largest over the epochs)" if parts else ""


def _curves_section(run: RunData) -> str:
    figures = epoch_curves(run.records)
    if not figures:
        return '<p class="note">log.jsonl holds no epoch yet.</p>'
    return '<div class="figs">' + "".join(page.figure_html(page.png_uri_bytes(f.png), f.title, f.caption)
                                          for f in figures) + "</div>"


def _clusters_section(run: RunData, assignments: np.ndarray, which: str, settings: ReportSettings
                      ) -> tuple[str, int, int]:
    """HTML of the cluster section for ``assignments`` (described by ``which``); also the
    number of clusters and thumbnails shown."""
    labels = run.labels if run.source is not None and run.labels is not None and len(run.labels) == len(assignments) \
        else None
    summaries = summarize_clusters(assignments, labels)
    n_clusters = max(int(assignments.max()) + 1, configured_clusters(run.config))
    stats = size_statistics(summaries, n_clusters)
    sizes = np.array([s.size for s in summaries])
    distribution = size_distribution(sizes, n_clusters, which)
    parts = ['<div class="figs">', page.figure_html(page.png_uri_bytes(distribution.png), distribution.title,
                                                    distribution.caption, wide=True), "</div>"]
    if stats.get("nonempty"):
        parts.append(f'<p>{int(stats["nonempty"]):,} non-empty clusters of {int(stats["clusters"]):,}; sizes from '
                     f'{int(stats["smallest"]):,} to {int(stats["largest"]):,} images (median {stats["median"]:.0f}); '
                     f'the largest holds {100 * stats["largest_share"]:.1f}% of the images.</p>')
    if run.source is None:
        parts.append('<p class="note">No sample images: the image folder is not available (see the note above).</p>')
        return "".join(parts), 0, 0
    min_size = max(2, min(settings.images_per_cluster, int(stats.get("median", 2))))
    shown = choose_clusters(summaries, settings.max_clusters, min_size_for_purity=min_size)
    cards, thumbs = _cluster_cards(run, assignments, labels, shown, settings)
    chosen = (f"the {len(shown)} largest" if labels is None else
              f"{len(shown)} clusters: the largest and the purest (purity: share of the majority class; "
              f"clusters of at least {min_size} images)")
    parts.append(f'<p class="hint">Showing {chosen} of {len(summaries):,} non-empty clusters of {which}, '
                 f'{settings.images_per_cluster} random images each. Hover an image for its file name.</p>')
    parts.append(_cluster_controls(labels is not None, run.class_names))
    parts.append(f'<div id="cluster-grid" data-page="{settings.page_size}">'
                 + "".join(page.card_html(card) for card in cards) + "</div>")
    parts.append('<div class="controls"><button id="more">show more clusters</button></div>')
    return "".join(parts), len(shown), thumbs


def _cluster_cards(run: RunData, assignments: np.ndarray, labels: np.ndarray | None, shown: list,
                   settings: ReportSettings) -> tuple[list[page.ClusterCard], int]:
    """A card of random member thumbnails for each cluster of ``shown``; also the number of
    thumbnails (images that no longer load are left out)."""
    members = sample_members(assignments, [s.cluster for s in shown], settings.images_per_cluster, settings.seed)
    names = run.class_names
    cards, thumbs = [], 0
    for summary in shown:
        pictures = []
        for index in members[summary.cluster]:
            try:
                image = run.source.load(int(index))
            except Exception:  # noqa: BLE001 - a file that vanished or broke since training
                continue
            title = shown_path(os.path.basename(run.source.name(int(index))))
            if labels is not None and names:
                title += f" ({names[labels[index]]})"
            pictures.append(page.Thumb(page.thumbnail_uri(image, settings.thumb_size), title))
        thumbs += len(pictures)
        majority = None if summary.majority is None or not names else names[summary.majority]
        cards.append(page.ClusterCard(summary.cluster, summary.size, majority, summary.purity, pictures))
    return cards, thumbs


def _cluster_controls(labelled: bool, names: list[str] | None) -> str:
    """The sort buttons of the cluster grid, and with class names the majority-class filter."""
    controls = ['<div class="controls"><span>Sort:</span><button data-sort="size" class="on">largest first</button>']
    if labelled:
        controls.append('<button data-sort="purity">purest first</button>')
        if names:
            options = "".join(f'<option value="{page.esc(n)}">{page.esc(n)}</option>' for n in names)
            controls.append(f'<span>Majority class:</span><select id="class-filter"><option value="">all</option>'
                            f"{options}</select>")
    controls.append('<span id="count" class="hint"></span></div>')
    return "".join(controls)


def _filters_sections(run: RunData, settings: ReportSettings,
                      notes: list[str]) -> tuple[list[tuple[str, str, str]], int]:
    """The first-layer filters and the chosen layer's filters (top images, gradient ascent)."""
    from deepcluster.checkpoint import load_backbone

    if not run.checkpoint.is_file():
        notes.append("filters not shown: the run folder has no checkpoint.pt")
        return [], 0
    model, config = load_backbone(run.checkpoint)
    device = torch.device(settings.device)
    model = model.to(device).eval()
    first = _first_filters_section(model)
    units, thumbs = _units_section(run, model, config, settings, device)
    return [first, units], thumbs


def _first_filters_section(model) -> tuple[str, str, str]:
    """The first conv layer's filters as one image (composed with the Sobel kernels when the
    network has them)."""
    from deepcluster.report import visuals

    grid = visuals.filter_grid(visuals.effective_first_filters(model))
    conv = model.first_conv()
    if model.sobel is not None:
        how = (f"{conv.out_channels} filters of {conv.kernel_size[0]}x{conv.kernel_size[1]} on the two Sobel "
               f"gradients, shown as the {conv.kernel_size[0] + 2}x{conv.kernel_size[1] + 2} filter they apply to "
               "the grayscale image (weights composed with the fixed Sobel kernels)")
    else:
        how = f"{conv.out_channels} RGB filters of {conv.kernel_size[0]}x{conv.kernel_size[1]}"
    return ("conv1", "First-layer filters", page.figure_html(
        page.png_uri(grid), "conv1", how + "; grey is 0, each filter scaled to its own range, largest norm first. "
        "Trained filters look like oriented edge and blob detectors; random ones like noise.", wide=True, pixel=True))


def _units_section(run: RunData, model, config, settings: ReportSettings,
                   device: torch.device) -> tuple[tuple[str, str, str], int]:
    """What the chosen layer's filters respond to: their top images among a random sample,
    and inputs made by gradient ascent; also the number of thumbnails."""
    from deepcluster.report import visuals

    layer, n_channels = _chosen_layer(model, settings)
    responses = _sample_responses(run, model, config, layer, settings, device)
    channels, how_chosen = _chosen_filters(settings, responses, n_channels)
    ascent_images = None
    if settings.ascent_steps > 0 and channels:
        ascent = visuals.AscentSettings(size=settings.ascent_size or min(config.crop, 128),
                                        steps=settings.ascent_steps, seed=settings.seed)
        ascent_images = visuals.gradient_ascent(model, layer, channels, config.mean, config.std, ascent, device)
    rows, thumbs = _filter_rows(run, responses, channels, ascent_images, settings)
    sample = "" if responses is None else (f"Top {settings.top_images} of a random sample of "
                                           f"{len(responses.image_indices):,} images by the filter's strongest "
                                           "response (spatial maximum after the ReLU). ")
    ascent_text = "" if ascent_images is None else (
        f"Left: an input optimised by {settings.ascent_steps} steps of gradient ascent on the filter's mean response "
        "(from grey noise, with random jitter, L2 decay and blur; a Sobel network is blind to colour, so it is grey). ")
    intro = (f'<p class="hint">{n_channels} filters in {layer}; shown: {len(channels)}, {how_chosen}. '
             f"{ascent_text}{sample}</p>")
    return ("units", f"What {layer} filters respond to", intro + "".join(page.unit_html(r) for r in rows)), thumbs


def _chosen_layer(model, settings: ReportSettings) -> tuple[str, int]:
    """The layer asked for (default the last conv layer) and its number of filters.

    Raises:
        ConfigError: not a conv layer of ``model``, or a ``--filters`` number beyond its filters.
    """
    from deepcluster.report import visuals

    taps = model.taps()
    layer = settings.layer or taps[-1]
    if layer not in taps:
        raise ConfigError(f"--layer {layer!r} is not a conv layer of {model.arch}; choose one of: {', '.join(taps)}")
    n_channels = visuals.layer_channels(model, layer)
    if settings.filters is not None:
        bad = [f for f in settings.filters if f >= n_channels]
        if bad:
            raise ConfigError(f"--filters {bad[0]} is out of range: {layer} has filters 0 to {n_channels - 1}")
    return layer, n_channels


def _sample_responses(run: RunData, model, config, layer: str, settings: ReportSettings, device: torch.device):
    """The filters' responses on a seeded random sample of the run's images (centre view);
    None when the images are not available."""
    from deepcluster.report import visuals

    if run.source is None:
        return None
    view = CenterView(config.resize, config.crop)
    normalize = Normalize(config.mean, config.std)
    rng = np.random.default_rng(settings.seed)
    count = min(settings.activation_sample, len(run.source))
    indices = np.sort(rng.choice(len(run.source), count, replace=False))
    return visuals.filter_responses(model, run.source, indices, layer, view, normalize, device,
                                    settings.batch_size, settings.workers)


def _chosen_filters(settings: ReportSettings, responses, n_channels: int) -> tuple[list[int], str]:
    """The filters shown, and how they were chosen, in words."""
    from deepcluster.report import visuals

    if settings.filters is not None:
        return list(settings.filters), "chosen with --filters"
    if responses is not None and len(responses.scores):
        channels = visuals.pick_filters(responses.scores, settings.n_filters, settings.top_images)
        return channels, ("the most selective (highest ratio of their response on their top images to their mean "
                          "response)")
    return list(range(min(settings.n_filters, n_channels))), "the first ones (no images to rank them)"


def _filter_rows(run: RunData, responses, channels: list[int], ascent_images: np.ndarray | None,
                 settings: ReportSettings) -> tuple[list[page.FilterRow], int]:
    """A row per filter: its gradient-ascent image and its top images; also the number of
    thumbnails."""
    rows, thumbs = [], 0
    for position, channel in enumerate(channels):
        top = []
        if responses is not None:
            indices, scores = responses.top_images(channel, settings.top_images)
            for index, score in zip(indices, scores):
                image = run.source.load(int(index))
                title = f"{shown_path(os.path.basename(run.source.name(int(index))))}: response {score:.2f}"
                if run.labels is not None and run.class_names:
                    title += f" ({run.class_names[run.labels[index]]})"
                top.append(page.Thumb(page.thumbnail_uri(image, settings.thumb_size), title))
        thumbs += len(top)
        uri = None if ascent_images is None else page.png_uri(ascent_images[position])
        rows.append(page.FilterRow(channel, uri, top))
    return rows, thumbs


def build_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 settings: ReportSettings = ReportSettings(), command: str = "") -> ReportResult:
    """Write ``<out_dir>/index.html`` (default ``<run_dir>/report``) for the run in ``run_dir``.

    Raises:
        DataError: not a run folder, or images that cannot be read.
        ConfigError: a setting that does not fit the run (unknown layer, epoch without assignments).
        CheckpointError: an unreadable checkpoint.
    """
    start = time.perf_counter()
    settings.check()
    run = load_run(run_dir, settings.data)
    notes = list(run.notes)
    epochs_done = len(run.records)
    sections = [("curves", "Training curves", _curves_section(run))]
    clusters_shown = thumbnails = 0
    if settings.epoch is None and run.final_file is not None:
        assignments = run.final_assignments()
        which = f"the final clustering (trained network after epoch {epochs_done})"
    elif run.assignment_files:
        epoch = max(run.assignment_files) if settings.epoch is None else settings.epoch
        if epoch not in run.assignment_files:
            saved = sorted(run.assignment_files)
            raise ConfigError(f"--epoch {epoch} has no saved assignments; this run has epochs "
                              f"{saved[0]} to {saved[-1]}")
        assignments = run.assignments(epoch)
        which = f"epoch {epoch} (the clustering that epoch trained on)"
    else:
        assignments, which = None, ""
    if assignments is not None:
        html, clusters_shown, thumbnails = _clusters_section(run, assignments, which, settings)
        sections.append(("clusters", "Clusters", html))
    else:
        notes.append("clusters not shown: the run folder has no assignments yet")
    filter_sections, filter_thumbs = _filters_sections(run, settings, notes)
    sections += filter_sections
    thumbnails += filter_thumbs
    name = Path(run_dir).resolve().name
    document = page.page_html(
        f"DeepCluster report: {name}", f"run folder {Path(run_dir).resolve()}",
        _summary_rows(run, epochs_done), sections, notes,
        f"Made by deepcluster {_version()} on {time.strftime('%Y-%m-%d %H:%M')}"
        + (f" with: {command}" if command else "")
        + ". Self-contained: no file or network access is needed to view it.",
        thumb_px=max(48, min(settings.thumb_size, 96)))
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    path = out / PAGE_NAME
    payload = document.encode("utf-8")
    atomic_write_bytes(path, payload)
    return ReportResult(path, len(payload), clusters_shown, thumbnails, [s[0] for s in sections], notes,
                        time.perf_counter() - start)


def _version() -> str:
    from deepcluster import __version__

    return __version__


__all__ = ["PAGE_NAME", "ReportResult", "ReportSettings", "build_report"]
