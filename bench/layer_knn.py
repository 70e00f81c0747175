"""Where does a network's kNN accuracy live? kNN top-1 of a checkpoint and of its random
start on three taps: the pooled convolutional output (``body``), the first fully connected
layer after its ReLU (``fc1``) and the clustered features (``fc``), with BatchNorm on its
running statistics (eval mode, what the package uses) and on batch statistics.

    python bench/layer_knn.py RUN/checkpoint.pt --train cifar10/train --val cifar10/test

Written for the two-layer classifier of ``alexnet`` and ``smallnet`` (dropout, linear,
ReLU, dropout, linear).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import DataLoader

from deepcluster.checkpoint import load_checkpoint, load_weights
from deepcluster.config import from_dict
from deepcluster.data import CenterView, FeatureDataset, FolderSource, Normalize
from deepcluster.evaluation.knn import knn_classify
from deepcluster.models import model_from_config


@torch.no_grad()
def taps(model, source, config, batch_statistics: bool) -> dict[str, torch.Tensor]:
    model.eval()
    if batch_statistics:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.train()
                module.momentum = 0.0  # use the batch's statistics, keep the running ones
    normalize = Normalize(config.mean, config.std)
    out: dict[str, list] = {"body": [], "fc1": [], "fc": []}
    loader = DataLoader(FeatureDataset(source, CenterView(config.resize, config.crop)), batch_size=256, num_workers=2)
    for images, _, _ in loader:
        body = torch.flatten(model.pool(model.forward_body(normalize(images))), 1)
        layers = model.classifier
        fc1 = layers[2](layers[1](layers[0](body)))
        out["body"].append(body)
        out["fc1"].append(fc1)
        out["fc"].append(layers[4](layers[3](fc1)))
    return {name: torch.cat(rows) for name, rows in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--running-only", action="store_true", help="skip the batch-statistics rows")
    args = parser.parse_args()
    saved = load_checkpoint(args.checkpoint)
    config = from_dict(saved["config"])
    train, val = FolderSource(args.train), FolderSource(args.val)
    results = {}
    for name, weights in (("random init", None), ("trained", saved["model"])):
        torch.manual_seed(config.seed)  # the run's random start
        model = model_from_config(config)  # every shape setting (stem, width) as the run built it
        if weights is not None:
            load_weights(model, weights, args.checkpoint)
        for batch_statistics in (False,) if args.running_only else (False, True):
            train_taps = taps(model, train, config, batch_statistics)
            val_taps = taps(model, val, config, batch_statistics)
            key = f"{name}, BatchNorm {'batch' if batch_statistics else 'running'} statistics"
            results[key] = {tap: round(knn_classify(train_taps[tap], train.labels, val_taps[tap], val.labels,
                                                    len(train.class_names)).top1, 1) for tap in train_taps}
            print(key, results[key], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
