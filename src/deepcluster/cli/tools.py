"""Commands that look at and use a trained run. They parse and wire; the library works.

    deepcluster report RUN [--out DIR] [--max-clusters 100] [--layer conv5] [--device auto] ...
    deepcluster assign RUN --data FOLDER [--out DIR] [--into DIR [--copy]] [--format csv,parquet]
    deepcluster features RUN --data FOLDER --out DIR [--layer fc|body|convN] [--pca]
    deepcluster export RUN --out FILE.safetensors

``RUN`` is the same in every command, ``eval`` included: a run folder (``train --out``) or a
checkpoint file in one. (``--checkpoint CKPT``, the older spelling, still works.)

Bad input ends with one line on stderr and exit code 2 (see ``deepcluster.cli.main``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Sequence

from deepcluster.cli.common import (add_machine_options, add_run_argument, int_list, machine_setup, out_folder,
                                    resolve_run, writing_to)
from deepcluster.config import ConfigError
from deepcluster.messages import plural, shown_path
from deepcluster.outputs import class_column, problems

COMMANDS = ("report", "assign", "features", "export")
FORMATS = ("csv", "parquet")


def _formats(text: str) -> tuple[str, ...]:
    items = tuple(item.strip().lower() for item in text.split(",") if item.strip())
    unknown = [item for item in items if item not in FORMATS]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(FORMATS)} (comma-separated), got {text!r}")
    return items


def add_tool_parsers(subparsers: Any) -> None:
    """Register ``report``, ``assign``, ``features`` and ``export``."""
    for add in (add_report_parser, add_assign_parser, add_features_parser, add_export_parser):
        add(subparsers)


def add_report_parser(subparsers: Any) -> None:
    """``deepcluster report``."""
    from deepcluster.report import ReportSettings

    defaults = ReportSettings()
    report = subparsers.add_parser(
        "report", help="write a self-contained HTML page about a run: curves, clusters, filters",
        description="Write RUN_DIR/report/index.html (or --out DIR/index.html): per-epoch curves, cluster sizes, "
                    "sample images of the clusters (with majority class and purity when the folder has classes), "
                    "first-layer filters, the images that most excite filters of a layer and gradient-ascent "
                    "visualisations. Images are embedded; the page opens from disk with no network.")
    add_run_argument(report)
    report.add_argument("--out", dest="out_dir", help="folder for index.html (default: RUN/report)")
    report.add_argument("--data", help="image folder, if it moved since training (default: the run's)")
    report.add_argument("--epoch", type=int, default=None,
                        help="epoch whose clustering is shown, counted from 1 as everywhere (default: the final "
                             "clustering when the run saved one, else the last epoch)")
    report.add_argument("--max-clusters", type=int, default=defaults.max_clusters,
                        help=f"clusters in the grid: the largest and, with labels, the purest (default "
                             f"{defaults.max_clusters}); bounds the page size at any k")
    report.add_argument("--images-per-cluster", type=int, default=defaults.images_per_cluster,
                        help=f"random images shown per cluster (default {defaults.images_per_cluster})")
    report.add_argument("--thumb-size", type=int, default=defaults.thumb_size,
                        help=f"thumbnail side in pixels (default {defaults.thumb_size})")
    report.add_argument("--layer", default=None,
                        help="conv layer for top images and gradient ascent, e.g. conv5 (default: the last)")
    report.add_argument("--filters", type=int_list, default=None,
                        help="filters of that layer to show, e.g. 3,17,42 (default: the most selective)")
    report.add_argument("--n-filters", type=int, default=defaults.n_filters,
                        help=f"filters shown when not given (default {defaults.n_filters})")
    report.add_argument("--top-images", type=int, default=defaults.top_images,
                        help=f"images shown per filter (default {defaults.top_images})")
    report.add_argument("--activation-sample", type=int, default=defaults.activation_sample,
                        help=f"images searched for the top images (default {defaults.activation_sample})")
    report.add_argument("--ascent-steps", type=int, default=defaults.ascent_steps,
                        help=f"gradient-ascent steps, 0 to skip (default {defaults.ascent_steps}; about a "
                             "second for the small net at 32 px, tens of seconds for AlexNet at 224 px on a CPU)")
    report.add_argument("--ascent-size", type=int, default=None,
                        help="side of the gradient-ascent images (default: the crop size, at most 128)")
    report.add_argument("--seed", type=int, default=defaults.seed, help="seed of every random sample (default 0)")
    add_machine_options(report, defaults.batch_size, f"images per forward pass (default {defaults.batch_size})")


def add_assign_parser(subparsers: Any) -> None:
    """``deepcluster assign``."""
    assign = subparsers.add_parser(
        "assign", help="cluster new images with a checkpoint's PCA and centroids (CSV and Parquet)",
        description="Place every image of a folder in the cluster of the nearest saved centroid, through the "
                    "run's own pipeline (eval-mode features of the centre view, the saved PCA-whitening, L2 "
                    "normalisation). Writes OUT/assignments.csv and OUT/assignments.parquet: path, cluster, "
                    "distance (Euclidean, in the whitened normalised space) and, with class folders, class.")
    add_run_argument(assign)
    assign.add_argument("--data", required=True, help="image folder (any layout; class sub-folders add a column)")
    assign.add_argument("--out", dest="out_dir", help="folder for the tables (default: the --into folder)")
    assign.add_argument("--into", help="also sort the images into folders, one per cluster: INTO/cluster_0007/<file> "
                                       "as symbolic links, unreadable files in INTO/unreadable/ (a new or empty "
                                       "folder)")
    assign.add_argument("--copy", action="store_true", help="with --into: copy the files instead of linking them")
    assign.add_argument("--format", dest="formats", type=_formats, default=None,
                        help="csv, parquet or both (default: both, or csv alone when pyarrow is not installed)")
    add_machine_options(assign, None, "images per forward pass (default: the run's feature_batch_size, which reproduces its "
                          "feature pass exactly)")


def add_features_parser(subparsers: Any) -> None:
    """``deepcluster features``."""
    features = subparsers.add_parser(
        "features", help="write the features of a folder of images (.npy plus the list of paths)",
        description="Write OUT/features.npy (float32, one row per image), OUT/paths.tsv (row, path, readable and, "
                    "with class folders, class) and OUT/features.json (what the rows are).")
    add_run_argument(features)
    features.add_argument("--data", required=True, help="image folder")
    features.add_argument("--out", dest="out_dir", required=True, help="output folder")
    features.add_argument("--layer", default=None,
                          help="fc: the last fully connected layer, before its ReLU; body: the pooled convolutional "
                               "output (a ResNet's only one); default: the one the run clusters (its 'clustered' "
                               "setting), before PCA; convN: that layer after its ReLU, average-pooled to about "
                               "--pool-dim numbers as the linear probes do")
    features.add_argument("--pca", action="store_true",
                          help="apply the checkpoint's PCA-whitening and L2 normalisation (fc only): the space "
                               "k-means clusters in")
    features.add_argument("--pool-dim", type=int, default=9000, help="pooled size of a conv layer (default 9000)")
    add_machine_options(features, 256, "images per forward pass (default 256)")


def add_export_parser(subparsers: Any) -> None:
    """``deepcluster export``."""
    export = subparsers.add_parser(
        "export", help="write the backbone alone as safetensors",
        description="Write the backbone of a checkpoint (no pseudo-label top layer) with its architecture, "
                    "Sobel flag, feature width, image size and normalisation as metadata. Load it back with "
                    "deepcluster.models.load_backbone_safetensors(PATH).")
    add_run_argument(export)
    export.add_argument("--out", required=True, help="file to write, e.g. backbone.safetensors")


@contextmanager
def removed_if_failed(*paths: str | None):
    """Folders a command may create: each one that did not exist before and is still empty
    when the command fails is removed again, so a failure leaves no empty ``--out`` behind."""
    new = [Path(path) for path in paths if path is not None and not os.path.lexists(path)]
    try:
        yield
    except BaseException:
        for folder in new:
            with suppress(OSError):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        raise


def cmd_report(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from deepcluster.data import DataError
    from deepcluster.report import ReportSettings, build_report

    device = machine_setup(args)
    settings = ReportSettings(
        epoch=args.epoch, max_clusters=args.max_clusters,
        images_per_cluster=args.images_per_cluster, thumb_size=args.thumb_size, layer=args.layer,
        filters=args.filters, n_filters=args.n_filters, top_images=args.top_images,
        activation_sample=args.activation_sample, ascent_steps=args.ascent_steps, ascent_size=args.ascent_size,
        device=str(device), batch_size=args.batch_size, workers=args.workers, seed=args.seed, data=args.data)
    if args.out_dir:
        out_folder(args.out_dir)
    command = "deepcluster " + " ".join(shlex.quote(a) for a in argv)
    with writing_to(Path(args.out_dir or args.run_dir)):
        result = build_report(args.run_dir, args.out_dir, settings, command=command)
    if result.clusters_shown == 0 or result.thumbnails == 0:  # a page without clusters or images is no success
        reason = next((note for note in result.notes if "not shown" in note), "nothing to show")
        raise DataError(f"the report of {str(args.run_dir)!r} shows no clusters or images ({reason}); the page "
                        f"written to {str(result.path)!r} holds only what the log has")
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {result.path} ({result.size_bytes / 1e6:.1f} MB, {plural(result.clusters_shown, 'cluster')} "
          f"and {plural(result.thumbnails, 'image')} shown, {result.seconds:.1f}s)")
    return 0


def open_every_file(folder: str):
    """Every image file found under ``folder``, unreadable ones included (each gets its row
    in a command's output), as a ``FolderSource``; says so when the folder has no classes."""
    from deepcluster.data import FolderSource

    source = FolderSource(folder, every_file=True)
    if source.unlabelled:
        print(f"note: no class column: {source.unlabelled}")
    return source


def _found(source) -> str:
    """The files found; how many are unreadable is said once, at the end of the command."""
    return plural(len(source), "image file")


def output_formats(asked: tuple[str, ...] | None) -> tuple[str, ...]:
    """The table formats ``assign`` writes: as asked, or both when pyarrow is installed.

    Raises:
        ConfigError: Parquet asked for without pyarrow.
    """
    if asked is None or "parquet" in asked:
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            if asked is not None:
                raise ConfigError("Parquet output needs pyarrow: pip install pyarrow (or deepcluster[tools]), "
                                  "or pass --format csv") from None
            print("note: pyarrow is not installed, so the assignments are written as CSV only (pip install pyarrow "
                  "for Parquet too)")
            return ("csv",)
    return asked or FORMATS


def cmd_assign(args: argparse.Namespace) -> int:
    from deepcluster.inference import assign_images, load_cluster_model
    from deepcluster.outputs import clustering_used, placement_line, training_agreement, write_assignment_tables
    from deepcluster.sorting import UNREADABLE_DIR, check_into, remember, sort_into_folders

    device = machine_setup(args)
    formats = output_formats(args.formats)
    if args.out_dir is None and args.into is None:
        raise ConfigError("give --out DIR (the tables) and/or --into DIR (the images sorted into one folder per "
                          "cluster)")
    if args.copy and args.into is None:
        raise ConfigError("--copy applies to --into DIR (copies instead of links); add --into")
    cluster_model = load_cluster_model(args.checkpoint)
    source = open_every_file(args.data)
    into = None if args.into is None else check_into(args.into)
    out_dir = out_folder(args.out_dir or args.into)
    print(f"deepcluster assign: {_found(source)}, {cluster_model.n_clusters} clusters of "
          f"{clustering_used(cluster_model)}, {cluster_model.config.arch}, device {device}", flush=True)
    assignment = assign_images(cluster_model, source, device, args.batch_size, args.workers)
    written = write_assignment_tables(out_dir, source.paths, assignment, class_column(source), formats,
                                      problems(source, assignment.ok))
    print(placement_line(assignment, len(source)))
    agreement = training_agreement(cluster_model, args.data, assignment)
    if agreement is not None:
        print(agreement)
    for path in written:
        print(f"wrote {path}")
    if into is not None:
        done = sort_into_folders(into, args.data, source.relative_files(), assignment.clusters, args.copy)
        remember(args.run_dir, done, args.data)
        print(f"sorted into {into}: {plural(done.placed, 'image')} {'copied' if done.copied else 'linked'} into "
              f"{plural(done.clusters, 'cluster folder')} (cluster_NNNN/)"
              + (f", {done.unreadable} unreadable in {into / UNREADABLE_DIR}" if done.unreadable else ""))
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from deepcluster.inference import clustered_layer, feature_layer, load_cluster_model, write_features
    from deepcluster.checkpoint import load_backbone

    device = machine_setup(args)
    if args.pool_dim < 1:
        raise ConfigError(f"--pool-dim must be a positive integer, got {args.pool_dim}")
    if args.pca:
        cluster_model = load_cluster_model(args.checkpoint)
        if cluster_model.pca is None:
            raise ConfigError("--pca applies to v1 runs (their PCA-whitened features); a v2 run clusters the "
                              "embeddings of its projection head, not a PCA of these layers: leave --pca out")
        model, config, pca = cluster_model.model, cluster_model.config, cluster_model.pca
    else:
        (model, config), pca = load_backbone(args.checkpoint), None
    layer, tap = feature_layer(model, args.layer, pca is not None)
    source = open_every_file(args.data)
    out_dir = out_folder(args.out_dir)
    print(f"deepcluster features: {_found(source)}, layer {layer}{' + PCA' if args.pca else ''}, "
          f"{config.arch}, device {device}", flush=True)
    features_path = out_dir / "features.npy"
    with writing_to(features_path):
        result = write_features(model, config, source, features_path, tap, pca, args.pool_dim,
                                args.batch_size, args.workers, device)
    classes = class_column(source)
    table = out_dir / "paths.tsv"
    with writing_to(table), open(table, "w", encoding="utf-8") as handle:
        handle.write("row\tpath\treadable" + ("\tclass" if classes else "") + "\tproblem\n")
        for row, (path, reason) in enumerate(zip(source.paths, problems(source, result.ok))):
            cells = [str(row), shown_path(path), str(int(result.ok[row]))] + ([classes[row]] if classes else []) + [reason]
            handle.write("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in cells) + "\n")
    meta = {"checkpoint": shown_path(os.path.abspath(args.checkpoint)), "data": shown_path(os.path.abspath(args.data)),
            "layer": layer, "clustered": clustered_layer(model) if tap == "fc" else None,
            "dim": result.dim, "n_images": len(source), "n_unreadable": int((~result.ok).sum()),
            "pooling": result.pooling, "pca_whitened_l2": result.whitened, "arch": config.arch, "sobel": config.sobel,
            "image_size": config.crop, "resize": config.resize, "mean": list(config.mean), "std": list(config.std),
            "dtype": "float32", "rows": "paths.tsv order; rows of unreadable images are zero"}
    with writing_to(out_dir / "features.json"):
        (out_dir / "features.json").write_text(json.dumps(meta, indent=2) + "\n")
    unreadable = int((~result.ok).sum())
    print(f"wrote {features_path} ({len(source)} x {result.dim} float32"
          + (f"; {unreadable} unreadable: zero rows, the reason in paths.tsv" if unreadable else "")
          + f"), {table}, {out_dir / 'features.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from deepcluster.inference import clustered_layer
    from deepcluster.checkpoint import load_checkpoint
    from deepcluster.models.export import BackboneMetadata, save_backbone_safetensors
    from deepcluster.checkpoint import load_backbone

    model, config = load_backbone(args.checkpoint)
    epoch = int(load_checkpoint(args.checkpoint).get("epoch", 0))
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a folder; give a file name such as backbone.safetensors")
    metadata = BackboneMetadata(model.arch, model.sobel is not None, model.feature_dim, config.crop, config.resize,
                                tuple(config.mean), tuple(config.std), epoch, os.path.abspath(args.checkpoint),
                                config.stem, clustered=config.clustered)
    with writing_to(out):
        save_backbone_safetensors(model, out, metadata)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({config.arch}, {n_params:,} parameters, epoch {epoch}, clusters its "
          f"{clustered_layer(model)}); load it with deepcluster.models.load_backbone_safetensors({str(out)!r}), "
          "then forward_clustered(images)")
    return 0


def run_tool(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Dispatch one of ``COMMANDS``."""
    resolve_run(args)
    default_report = str(Path(args.run_dir) / "report") if args.command == "report" else None
    with removed_if_failed(getattr(args, "out_dir", None) or default_report, getattr(args, "into", None)):
        if args.command == "report":
            return cmd_report(args, argv)
        if args.command == "assign":
            return cmd_assign(args)
        if args.command == "features":
            return cmd_features(args)
        return cmd_export(args)


__all__ = ["COMMANDS", "add_tool_parsers", "output_formats", "removed_if_failed", "run_tool"]
