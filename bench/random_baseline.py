"""How much of a "random init" baseline is the BatchNorm statistics: kNN top-1 of a recipe's
random weights with BatchNorm's running statistics as initialised (mean 0, variance 1: what
a run's first epoch and ``deepcluster eval``'s random-init column measure) and with the same
weights after one training-mode pass over the training images, no gradient (statistics of
the data, what any training leaves in the network even if it learned nothing).

    python bench/random_baseline.py --recipe small --train cifar10/train --val cifar10/test

Prints both kNN figures (the online kNN's protocol: cosine, k = 20, temperature 0.07).
"""

from __future__ import annotations

import argparse
import sys

import torch

from deepcluster.config import resolve
from deepcluster.data import FolderSource
from deepcluster.evaluation.knn import knn_classify
from deepcluster.features import PassSettings, batchnorm_statistics_of, compute_features
from deepcluster.models import model_from_config
from machine import cpu_flags, cpu_model


def bn_baselines(config, train_dir: str, val_dir: str, device: torch.device = torch.device("cpu")) -> dict:
    """kNN top-1 (%) of ``config``'s random weights with BatchNorm statistics as initialised
    (``at_init``) and of the data (``of_data``)."""
    torch.manual_seed(config.seed)  # the weights a run of this recipe starts from
    model = model_from_config(config)
    train, val = FolderSource(train_dir), FolderSource(val_dir)

    def knn() -> float:
        train_features, _ = compute_features(model, train, config, device)
        val_features, _ = compute_features(model, val, config, device)
        return knn_classify(train_features, train.labels, val_features, val.labels, len(train.class_names)).top1

    at_init = knn()
    batchnorm_statistics_of(model, train, PassSettings.of_run(config, device))
    return {"at_init": at_init, "of_data": knn(), "n_train": len(train), "n_val": len(val)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bn_baselines(resolve(args.recipe, overrides={"data": args.train}), args.train, args.val)
    print(f"{cpu_model()} [{cpu_flags()}], recipe {args.recipe}, {result['n_train']} train / {result['n_val']} val "
          f"images")
    print(f"random weights, BatchNorm statistics at init:     kNN top-1 {result['at_init']:.1f}%")
    print(f"random weights, BatchNorm statistics of the data: kNN top-1 {result['of_data']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
