"""Clustering stage: PCA-whitening, k-means, PIC, and the scores that compare labellings.

- :func:`kmeans`: one Lloyd loop for the ``l2`` and ``cosine`` (spherical) metrics, one
  empty-cluster rule set (``split``, ``nudge``, ``keep``), backends ``faiss`` and ``torch``,
  CPU or GPU, on one process or sharded over a process group (``shard``);
  :func:`labelling_centroids` starts it from an earlier labelling; :func:`predict` labels
  new points given saved centroids;
- :func:`pic`, power iteration clustering on a k-NN graph (:func:`knn_graph`);
- :func:`fit_pca` / :class:`StreamingPCA` and ``PCA.project`` (PCA then L2), the preprocessing;
- :func:`nmi`, :func:`clustering_accuracy`, :func:`ari`, the scores.
"""

from deepcluster.clustering.empty import EMPTY_RULES
from deepcluster.clustering.kmeans import KMeansResult, kmeans, nearest_centroid, predict
from deepcluster.clustering.knn import knn_graph
from deepcluster.clustering.metrics import ari, cluster_sizes, clustering_accuracy, nmi
from deepcluster.clustering.pca import PCA, StreamingPCA, fit_pca, l2_normalize
from deepcluster.clustering.pic import PICResult, pic
from deepcluster.clustering.search import BACKENDS, METRICS
from deepcluster.clustering.seeding import INITS, labelling_centroids
from deepcluster.clustering.shard import Shard

__all__ = [
    "BACKENDS", "EMPTY_RULES", "INITS", "KMeansResult", "METRICS", "PCA", "PICResult", "Shard", "StreamingPCA", "ari",
    "cluster_sizes", "clustering_accuracy", "fit_pca", "kmeans", "knn_graph", "l2_normalize", "labelling_centroids",
    "nearest_centroid", "nmi", "pic", "predict",
]
