"""How much of a "random init" baseline is the BatchNorm statistics: kNN top-1 of a recipe's
random weights with BatchNorm's running statistics as initialised (mean 0, variance 1: what
a run's first epoch and ``deepcluster eval``'s random-init column measure) and with the same
weights after one training-mode pass over the training images, no gradient (statistics of
the data, what any training leaves in the network even if it learned nothing).

    python bench/random_baseline.py --recipe small --train cifar10/train --val cifar10/test

Prints both kNN figures (the online kNN's protocol: cosine, k = 20, temperature 0.07), on the
clustered features and, where those are the fc layers' output, on the pooled conv body too
(what the online kNN's ``knn_body_top1`` reads).
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
from deepcluster.monitor import measures_body
from machine import cpu_flags, cpu_model


def bn_baselines(config, train_dir: str, val_dir: str, device: torch.device = torch.device("cpu")) -> dict:
    """kNN top-1 (%) of ``config``'s random weights with BatchNorm statistics as initialised
    (``at_init``) and of the data (``of_data``); where the fc layers are clustered, also of
    the pooled conv body (``body_at_init``, ``body_of_data``)."""
    torch.manual_seed(config.seed)  # the weights a run of this recipe starts from
    model = model_from_config(config)
    train, val = FolderSource(train_dir), FolderSource(val_dir)
    body = measures_body(model, config)

    def knn() -> tuple[float, float | None]:
        train_features, _, train_body = compute_features(model, train, config, device, body=body)
        val_features, _, val_body = compute_features(model, val, config, device, body=body)
        n_classes = len(train.class_names)
        return (knn_classify(train_features, train.labels, val_features, val.labels, n_classes).top1,
                None if not body else knn_classify(train_body, train.labels, val_body, val.labels, n_classes).top1)

    at_init, body_at_init = knn()
    batchnorm_statistics_of(model, train, PassSettings.of_run(config, device))
    of_data, body_of_data = knn()
    result = {"at_init": at_init, "of_data": of_data, "n_train": len(train), "n_val": len(val)}
    if body:
        result.update(body_at_init=body_at_init, body_of_data=body_of_data)
    return result


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
    if "body_of_data" in result:
        print(f"the same on the pooled conv body: {result['body_at_init']:.1f}% at init, "
              f"{result['body_of_data']:.1f}% with the data's statistics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
