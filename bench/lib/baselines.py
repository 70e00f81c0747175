"""The baselines a learning curve is read against: the raw pixels (no network) and the run's
random weights with the data's BatchNorm statistics (what any training leaves in the
network even if it learns nothing). ``deepcluster eval --baseline-batchnorm init,data``
measures the second for a checkpoint."""

from __future__ import annotations

import numpy as np
import torch


def source_of(folder: str | None):
    """A labelled folder, or the built-in digits for None."""
    from deepcluster.data import FolderSource, load_digits_source

    return load_digits_source() if folder is None else FolderSource(folder)


def raw_pixel_baseline(config, train_dir: str | None, val_dir: str | None) -> dict:
    """kNN (with a validation folder) and k = classes k-means on the centre view's raw pixels."""
    from deepcluster.data import CenterView
    from deepcluster.evaluation.knn import knn_classify
    from deepcluster.monitor import class_kmeans_accuracy

    def pixels(source):
        view = CenterView(config.resize, config.crop)
        return np.stack([view(source.load(i)).float().flatten().numpy() for i in range(len(source))])

    train = source_of(train_dir)
    train_x = pixels(train)
    result = {}
    if val_dir is not None:
        val = source_of(val_dir)
        knn = knn_classify(train_x, train.labels, pixels(val), val.labels, len(train.class_names))
        result.update(knn_top1=knn.top1, knn_top5=knn.top5)
    points = train_x - train_x.mean(axis=0)
    points /= np.linalg.norm(points, axis=1, keepdims=True) + 1e-12
    acc, class_nmi = class_kmeans_accuracy(points.astype(np.float32), train.labels, seed=0)
    return {**result, "cluster_acc": acc, "cluster_nmi": class_nmi}


def bn_baselines(config, train_dir: str | None, val_dir: str, device: torch.device = torch.device("cpu")) -> dict:
    """kNN top-1 (%) of ``config``'s random weights with BatchNorm statistics as initialised
    (``at_init``) and of the data (``of_data``); where the fc layers are clustered, also of
    the pooled conv body (``body_at_init``, ``body_of_data``)."""
    from deepcluster.evaluation.knn import knn_classify
    from deepcluster.features import PassSettings, batchnorm_statistics_of, compute_features
    from deepcluster.models import model_from_config
    from deepcluster.monitor import measures_body

    torch.manual_seed(config.seed)  # the weights a run of this recipe starts from
    model = model_from_config(config)
    train, val = source_of(train_dir), source_of(val_dir)
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
