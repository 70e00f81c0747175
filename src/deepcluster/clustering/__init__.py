"""Clustering stage: PCA-whitening, k-means, and the scores that compare labellings."""

from deepcluster.clustering.kmeans import KMeansResult, kmeans, nearest_centroid
from deepcluster.clustering.metrics import ari, cluster_sizes, clustering_accuracy, nmi
from deepcluster.clustering.pca import PCA, fit_pca, l2_normalize, preprocess_features

__all__ = [
    "KMeansResult", "PCA", "ari", "cluster_sizes", "clustering_accuracy", "fit_pca",
    "kmeans", "l2_normalize", "nearest_centroid", "nmi", "preprocess_features",
]
