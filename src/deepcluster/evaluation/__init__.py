"""Evaluation of frozen backbones: tensors in, numbers out.

- ``features``: per-layer activations pooled to about 9,000 dims (the paper's rule).
- ``linear_probe``: linear classifiers on frozen layers (reference and fast modes).
- ``knn``: temperature-weighted kNN on L2-normalised features, chunked by size.
- ``clustering_scores``: k-means with k = classes; NMI, ARI, ACC.
- ``retrieval``: mAP and precision@k with class labels as relevance.
- ``splits``: a labelled train/validation pair of class folders.
- ``suite``: all of them on one backbone and a labelled train/validation pair.
- ``compare``: a checkpoint against the network it started from (``deepcluster eval``).
- ``report``: the terminal table and the JSON file.
"""

from deepcluster.evaluation.clustering_scores import (ClusteringEvaluation, ClusteringScores,
                                                      kmeans_clustering_scores, score_labelling)
from deepcluster.evaluation.features import (BODY_LAYER, FC_LAYER, PoolSpec, choose_pooling, extract_features,
                                             forward_layers, head_layers, probe_pooling)
from deepcluster.evaluation.knn import KnnResult, knn_classify, knn_scores, nearest_neighbors
from deepcluster.evaluation.linear_probe import (ProbeResult, ProbeSettings, train_linear_probe,
                                                 train_probes_augmented)
from deepcluster.evaluation.retrieval import RetrievalResult, retrieval_scores
from deepcluster.evaluation.suite import (EvalSettings, LabelledSplits, evaluate_backbone, open_labelled_splits,
                                          random_init_backbone)

__all__ = [
    "BODY_LAYER", "ClusteringEvaluation", "ClusteringScores", "EvalSettings", "FC_LAYER", "KnnResult", "LabelledSplits",
    "PoolSpec", "ProbeResult", "ProbeSettings", "RetrievalResult", "choose_pooling", "evaluate_backbone",
    "extract_features", "forward_layers", "head_layers", "kmeans_clustering_scores", "knn_classify", "knn_scores",
    "nearest_neighbors", "open_labelled_splits", "probe_pooling", "random_init_backbone", "retrieval_scores",
    "score_labelling", "train_linear_probe", "train_probes_augmented",
]
