"""Does the PCA's whitening decide the clustering accuracy? k-means ACC (k = number of
classes, mean of 5 seeds, ``deepcluster eval``'s own ``kmeans_clustering_scores``) of a
trained checkpoint's clustered features and of its random start (the same random weights
with BatchNorm statistics of the training images, ``eval``'s baseline), on the training
images, with the PCA in front of k-means at several widths, whitened (-0.5, as DeepCluster
clusters) and not (0), and with L2 normalisation only:

    python bench/whitening_probe.py RUN/checkpoint.pt --train mnist5k/train --val mnist5k/val
    python bench/whitening_probe.py runs/digits/checkpoint.pt --train digits

``--train digits`` uses the built-in digits (the demo's data). ``--bn-recalibration`` also
prints the trained network's kNN top-1 on ``--val`` with its running BatchNorm statistics
(from augmented training batches) and with statistics recalibrated on the training images'
centre views, as the baseline's are (docs/notebook/2026-11-30.md).
"""

from __future__ import annotations

import argparse
import sys

import torch

from deepcluster.checkpoint import load_backbone
from deepcluster.data import FolderSource
from deepcluster.evaluation.clustering_scores import kmeans_clustering_scores
from deepcluster.evaluation.knn import knn_classify
from deepcluster.evaluation.suite import random_init_backbone
from deepcluster.features import PassSettings, batchnorm_statistics_of, compute_features
from deepcluster.monitor import measures_body
from machine import cpu_flags, cpu_model


def accuracy_row(features, labels, widths: list[int]) -> list[str]:
    cells = [f"{kmeans_clustering_scores(features, labels, pca_dim=0).train.acc:.1f}"]
    for width in widths:
        whitened = kmeans_clustering_scores(features, labels, pca_dim=width, whiten_power=-0.5).train.acc
        plain = kmeans_clustering_scores(features, labels, pca_dim=width, whiten_power=0.0).train.acc
        cells.append(f"{whitened:.1f} / {plain:.1f}")
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--train", required=True, help="labelled folder, or 'digits'")
    parser.add_argument("--val", default=None, help="labelled folder (only for --bn-recalibration)")
    parser.add_argument("--widths", default="16,32,64,128,256", help="PCA widths (comma-separated)")
    parser.add_argument("--bn-recalibration", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    model, config = load_backbone(args.checkpoint)
    if args.train == "digits":
        from deepcluster.data.digits import load_digits_source
        train = load_digits_source()
    else:
        train = FolderSource(args.train)
    widths = [int(w) for w in args.widths.split(",") if w]
    settings = PassSettings.of_run(config, device)
    baseline = random_init_backbone(config)
    batchnorm_statistics_of(baseline, train, settings)
    print(f"{cpu_model()} [{cpu_flags()}]; {args.checkpoint}: {config.arch}, {len(train)} images")
    print("| network | L2 only | " + " | ".join(f"PCA {w} whitened / not" for w in widths) + " |")
    print("|---|---:|" + "---|" * len(widths))
    for name, network in (("random weights, data BatchNorm", baseline), ("trained", model)):
        features = compute_features(network, train, config, device)[0]
        print(f"| {name} | " + " | ".join(accuracy_row(features, train.labels, widths)) + " |", flush=True)
    if args.bn_recalibration:
        if args.val is None:
            parser.error("--bn-recalibration needs --val")
        val = FolderSource(args.val)
        body = measures_body(model, config)

        def knn() -> str:
            train_x, _, train_body = compute_features(model, train, config, device, body=body)
            val_x, _, val_body = compute_features(model, val, config, device, body=body)
            classes = len(train.class_names)
            text = f"{knn_classify(train_x, train.labels, val_x, val.labels, classes).top1:.1f}%"
            if body:
                text += f" (body {knn_classify(train_body, train.labels, val_body, val.labels, classes).top1:.1f}%)"
            return text

        print(f"trained kNN top-1, running BatchNorm statistics: {knn()}", flush=True)
        batchnorm_statistics_of(model, train, settings)
        print(f"trained kNN top-1, statistics recalibrated on the centre views: {knn()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
