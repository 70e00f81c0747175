"""Clustering stage: PCA-whitening, k-means, PIC, and the scores that compare labellings.

- :func:`kmeans` (backends ``faiss`` and ``torch``, CPU or GPU, one or many processes) and
  :func:`predict` for new points given saved centroids;
- :func:`pic`, power iteration clustering on a k-NN graph (:func:`knn_graph`);
- :func:`fit_pca` / :class:`StreamingPCA` and ``PCA.project`` (PCA then L2), the preprocessing;
- :func:`nmi`, :func:`clustering_accuracy`, :func:`ari`, the scores.
"""

from deepcluster.clustering.kmeans import KMeansResult, kmeans, nearest_centroid, predict
from deepcluster.clustering.knn import knn_graph
from deepcluster.clustering.metrics import ari, cluster_sizes, clustering_accuracy, nmi
from deepcluster.clustering.pca import PCA, StreamingPCA, fit_pca, l2_normalize
from deepcluster.clustering.pic import PICResult, pic
from deepcluster.clustering.search import BACKENDS

__all__ = [
    "BACKENDS", "KMeansResult", "PCA", "PICResult", "StreamingPCA", "ari", "cluster_sizes", "clustering_accuracy",
    "fit_pca", "kmeans", "knn_graph", "l2_normalize", "nearest_centroid", "nmi", "pic", "predict",
]
