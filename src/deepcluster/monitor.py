"""What a run shows every epoch about whether its features are learning.

Two kinds of numbers, both only where classes are known (they never steer training):

- **Label scores of the epoch's clustering** (the training folder has class sub-folders):
  NMI of the k pseudo-labels with the classes beside its chance level, ARI, the purity of
  the pseudo-labels, and the clustering accuracy papers report: a k-means with k = number
  of classes on the same PCA points with their whitening undone (v2: its embeddings),
  matched one-to-one to the classes, mean of 5 starts. The
  one-to-one accuracy of the k pseudo-labels themselves is not reported: with k above the
  number of classes it credits at most one cluster per class (CIFAR-10 at k = 100 shows
  about 5% whatever the features), which reads as failure when it is not.
- **Online kNN** (``val`` set): the labelled validation images are classified by their
  k = 20 most cosine-similar training images, votes weighted by ``exp(cos / 0.07)``, on the
  features DeepCluster clusters, exactly as ``deepcluster eval``'s kNN protocol. The
  training side reuses the epoch's feature pass; only the validation images cost a pass.
  When the fc layers' output is what is clustered (the paper), the same kNN is also
  measured on the pooled convolutional body (``knn_body_top1``): the paper judges its
  network by the conv layers, and in the first epochs the fc features, fitted to
  pseudo-labels that are not semantic yet, can read below the body they come from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepcluster import distributed
from deepcluster.clustering import PCA, ari, kmeans, l2_normalize, nmi
from deepcluster.config import Config
from deepcluster.data import ArraySource, DataError, FolderSource, ImageSource
from deepcluster.evaluation.clustering_scores import kmeans_clustering_scores
from deepcluster.evaluation.knn import nearest_neighbors, neighbor_votes, top_accuracies
from deepcluster.features import Keep, Kept, compute_features, local_features
from deepcluster.methods import STREAM_SCORES, Plan, derived_seed

# k-means for the k = number of classes accuracy: a few Lloyd iterations from k-means++
# starts is plenty at such a small k. One start is not: at k = 10 a k-means lands in a
# different local optimum from seed to seed, and one run's accuracy swung 42-63% from epoch
# to epoch on MNIST features that hardly changed. The mean over CLASS_KMEANS_SEEDS starts is
# what `deepcluster eval` reports (its clustering protocol's five seeds).
CLASS_KMEANS_ITERS = 30
CLASS_KMEANS_SEEDS = 5


def purity(labels: np.ndarray, assignments: np.ndarray) -> float:
    """Share of images whose cluster's majority class is their class (1 = every cluster
    pure; it grows with the number of clusters, so compare it at equal k only)."""
    labels, assignments = np.asarray(labels), np.asarray(assignments)
    _, cluster = np.unique(assignments, return_inverse=True)
    _, truth = np.unique(labels, return_inverse=True)
    counts = np.zeros((cluster.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(counts, (cluster, truth), 1)
    return float(counts.max(axis=1).sum() / len(labels))


def chance_nmi(labels: np.ndarray, assignments: np.ndarray, seed: int = 0) -> float:
    """NMI of the classes with the same cluster sizes shuffled at random: what NMI reads
    when the clustering knows nothing (it grows with k and the number of classes)."""
    shuffled = np.random.default_rng(seed).permutation(np.asarray(assignments))
    return nmi(labels, shuffled)


def class_kmeans_accuracy(points: np.ndarray, labels: np.ndarray, seed: int,
                          backend: str = "faiss", n_seeds: int = CLASS_KMEANS_SEEDS) -> tuple[float, float]:
    """Clustering accuracy and NMI of a k-means with k = number of classes, means over
    ``n_seeds`` k-means++ starts.

    Args:
        points: ``(N, d)`` float32 unit rows (the epoch's PCA points with the whitening
            undone, or v2's embeddings); scored as ``deepcluster eval``'s clustering
            protocol scores them (``kmeans_clustering_scores`` without a PCA).
        labels: ``(N,)`` classes.
        seed: seed of the first start; the others follow it (seed + 1, ...).
        n_seeds: number of starts averaged.

    Returns:
        ``(accuracy, nmi)``: accuracy in percent under the best one-to-one matching of the
        clusters to the classes, and NMI (in [0, 1]), each the mean over the starts.
    """
    outcome = kmeans_clustering_scores(points, labels, n_iter=CLASS_KMEANS_ITERS,
                                       seeds=tuple(range(seed, seed + n_seeds)), backend=backend)
    return outcome.train.acc, outcome.train.nmi


def unwhitened(points: np.ndarray | None, pca: PCA | None) -> np.ndarray | None:
    """The clustered points with the PCA's whitening undone: ``(N, d)`` unit rows of the
    same projection with every direction at its own variance (``pca.whiten_power`` 0).

    Exact from the unit rows: scaling row ``z / |z|`` by ``eigenvalues ** -whiten_power``
    and normalising again gives the unit rows of the unwhitened projection, whatever ``|z|``.
    What the k = number of classes accuracy is measured on: whitening gives every one of
    the ``d`` directions the same weight, which serves DeepCluster's many balanced clusters
    but, at k = classes, lets the many low-variance directions drown the few that separate
    the classes (docs/notebook/2026-11-30.md). None (no points) passes through.
    """
    if points is None or pca is None or pca.whiten_power == 0:
        return points
    scale = (np.asarray(pca.eigenvalues, dtype=np.float64) ** -pca.whiten_power).astype(np.float32)
    return l2_normalize(points * scale[None, :])


def label_scores(assignments: np.ndarray, labels: np.ndarray | None, points: np.ndarray | None = None,
                 seed: int = 0, backend: str = "faiss") -> dict[str, float]:
    """The log's label scores of one clustering (empty without labels).

    Args:
        assignments: ``(N,)`` pseudo-labels, -1 for unusable images (left out).
        labels: ``(N,)`` classes, or None.
        points: ``(N, d)`` points for the k = number of classes k-means accuracy
            (``cluster_acc``, ``cluster_nmi``), added when given: v1 passes its clustered
            points unwhitened (``unwhitened``), v2 its embeddings.
        seed: seed of the chance level and of that k-means.

    Returns:
        ``nmi_labels``, ``nmi_chance``, ``ari_labels``, ``purity`` and, with points,
        ``cluster_acc``, ``cluster_nmi``: the accuracies (purity, ``cluster_acc``) in percent,
        as the online kNN's and ``deepcluster eval``'s, NMI and ARI in [0, 1].
    """
    if labels is None:
        return {}
    usable = assignments >= 0
    truth, pred = labels[usable], assignments[usable]
    scores = {"nmi_labels": nmi(truth, pred), "nmi_chance": chance_nmi(truth, pred, seed),
              "ari_labels": ari(truth, pred), "purity": 100.0 * purity(truth, pred)}
    if points is not None and len(np.unique(truth)) <= usable.sum():
        scores["cluster_acc"], scores["cluster_nmi"] = class_kmeans_accuracy(points[usable], truth, seed, backend)
    return scores


def raw_pixel_scores(images: np.ndarray, labels: np.ndarray, n_clusters: int, seeds: tuple[int, ...] = (0, 1, 2),
                     backend: str = "faiss") -> dict:
    """NMI and purity with the classes of k-means on the raw pixels (no network), means over
    seeds: the trivial baseline a clustering of learned features has to beat.

    Args:
        images: ``(N, ...)`` pixels, one row per image after flattening.
        labels: ``(N,)`` classes.
        n_clusters: k (use the run's, so both numbers are at the same k).
    """
    points = np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.float32)
    runs = [kmeans(points, n_clusters, 20, seed=seed, backend=backend, init="kmeans++").assignments
            for seed in seeds]
    scores = [nmi(labels, a) for a in runs]
    return {"nmi_labels": float(np.mean(scores)), "nmi_spread": float(np.ptp(scores)),
            "purity": 100.0 * float(np.mean([purity(labels, a) for a in runs]))}


def nmi_ceiling(labels: np.ndarray, assignments: np.ndarray) -> float:
    """The highest NMI with ``labels`` that any clustering with these cluster sizes can have:
    their mutual information is at most the smaller entropy, so NMI (arithmetic mean, as
    reported) <= 2 min(H(Y), H(C)) / (H(Y) + H(C)). With more clusters than classes it is
    below 1 even for pure clusters (10 balanced classes, 50 balanced clusters: 0.74)."""
    def entropy(values: np.ndarray) -> float:
        p = np.unique(values, return_counts=True)[1] / len(values)
        return float(-(p * np.log(p)).sum())
    h_labels, h_clusters = entropy(np.asarray(labels)), entropy(np.asarray(assignments))
    total = h_labels + h_clusters
    return 1.0 if total == 0 else 2.0 * min(h_labels, h_clusters) / total


@dataclass
class KnnMonitor:
    """Online kNN of a labelled validation folder against the run's training images.

    Attributes:
        val: the validation images.
        val_labels: ``(M,)`` their classes, numbered as the training folder's.
        memory: ``(N,)`` bool, the training images whose features are kept as the kNN
            memory (those with a class); None when the training folder has no classes:
            then each validation image is classified by the other validation images
            (leave-one-out).
        train_labels: ``(N,)`` classes of the training images (None without).
        n_classes: number of classes.
        k, temperature: the kNN's neighbours and vote temperature.
        note: a one-line remark for the terminal (classes left out, leave-one-out).
    """

    val: ImageSource
    val_labels: np.ndarray
    memory: np.ndarray | None
    train_labels: np.ndarray | None
    n_classes: int
    k: int = 20
    temperature: float = 0.07
    note: str | None = None

    @classmethod
    def open(cls, val_dir: str | Path, train: ImageSource, k: int = 20, temperature: float = 0.07) -> "KnnMonitor":
        """Read the validation folder; match its classes to the training folder's by name.

        Raises:
            DataError: the folder is missing, has no class sub-folders, or shares no class
                with the training folder.
        """
        val = FolderSource(val_dir)
        if val.labels is None:
            raise DataError(f"--val {str(val_dir)!r} has no class sub-folders (FOLDER/<class>/<image>); the online "
                            "kNN needs labelled images")
        val_names = list(val.class_names)
        if train.labels is None or not train.class_names:
            note = (f"the training folder has no classes, so the online kNN classifies each of the {len(val)} "
                    f"validation images by the other validation images (leave-one-out)")
            return cls(val, np.asarray(val.labels), None, None, len(val_names), k, temperature, note)
        index = {name: i for i, name in enumerate(train.class_names)}
        val_labels = np.array([index.get(val_names[label], -1) for label in val.labels], dtype=np.int64)
        if (val_labels < 0).all():
            raise DataError(f"--val {str(val_dir)!r} shares no class name with the training folder "
                            f"(val: {', '.join(val_names[:5])}...; train: {', '.join(train.class_names[:5])}...)")
        note = None
        if (val_labels < 0).any():
            unknown = sorted({val_names[label] for label in val.labels[val_labels < 0]})
            note = (f"{int((val_labels < 0).sum())} validation images of classes the training folder lacks "
                    f"({', '.join(unknown[:3])}{'...' if len(unknown) > 3 else ''}) are left out of the online kNN")
        return cls(val, val_labels, np.ones(len(train), dtype=bool), np.asarray(train.labels),
                   len(train.class_names), k, temperature, note)

    def score(self, val_features: np.ndarray, val_decoded: np.ndarray,
              memory_features: np.ndarray | None, memory_labels: np.ndarray | None,
              device: torch.device | str = "cpu", key: str = "knn") -> dict[str, float]:
        """kNN top-1 and top-5 (%) of the validation images, as ``{key}_top1`` and ``{key}_top5``.

        Args:
            val_features: ``(M, D)`` features of all the validation images (every process
                holds them all).
            val_decoded: ``(M,)`` bool, the validation images that decoded.
            memory_features: ``(n, D)`` features of the memory images that decoded, those
                this process holds (all of them in one process; with several, each passes
                its own share and the neighbours are merged: ``sharded_knn_votes``), or
                None for leave-one-out.
            memory_labels: ``(n,)`` their classes.
        """
        query = val_decoded & (self.val_labels >= 0)
        if memory_features is None:  # leave-one-out within the validation images
            feats, labels = val_features[query], self.val_labels[query]
            top1, top5 = _leave_one_out(feats, labels, self.n_classes, self.k, self.temperature, device)
        else:
            votes = sharded_knn_votes(memory_features, memory_labels, val_features[query], self.n_classes, self.k,
                                      self.temperature, device)
            top1, top5 = top_accuracies(votes, self.val_labels[query], self.n_classes)
        return {f"{key}_top1": top1, f"{key}_top5": top5}

    def score_with_body(self, val: tuple[np.ndarray, np.ndarray | None], val_decoded: np.ndarray,
                        memory: tuple[np.ndarray, np.ndarray | None] | None, memory_labels: np.ndarray | None,
                        device: torch.device | str = "cpu") -> dict[str, float]:
        """``score`` of the clustered features (``knn_*``) and, where given, of the pooled
        body (``knn_body_*``): ``val`` and ``memory`` are ``(clustered, body or None)``
        pairs; ``memory`` None for leave-one-out."""
        scores = {}
        for index, key in enumerate(("knn", "knn_body")):
            if val[index] is not None:
                scores.update(self.score(val[index], val_decoded, None if memory is None else memory[index],
                                         memory_labels, device, key))
        return scores


def sharded_knn_votes(memory: np.ndarray, memory_labels: np.ndarray, queries: np.ndarray, n_classes: int, k: int,
                      temperature: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(M, n_classes)`` kNN votes of ``queries`` when each process holds a share of the
    memory: each finds the k nearest of its own rows, the ``(M, k)`` similarities and
    classes of every process are gathered (``M x k x processes`` numbers, not the memory),
    and the k best of them vote. In one process this is ``knn_scores`` itself; with several
    the same neighbours vote (up to the order of exact ties). No process ever holds more of
    the memory than its share.
    """
    n_local = len(memory)
    total = sum(distributed.all_gather_ints(n_local))
    if total == 0:
        raise ValueError("the kNN memory is empty: no training image of a known class decoded")
    k = min(k, total)
    if n_local:
        sims, index = nearest_neighbors(memory, queries, k, device=device)
        classes = torch.as_tensor(np.asarray(memory_labels), dtype=torch.int64, device=sims.device)[index]
    else:
        sims = torch.empty(len(queries), 0, device=device)
        classes = torch.empty(len(queries), 0, dtype=torch.int64, device=device)
    if distributed.is_distributed():
        # Pad to k columns (a share smaller than k), gather every share's candidates, keep the k best.
        pad = k - sims.shape[1]
        sims = torch.cat([sims.float().cpu(), torch.full((len(queries), pad), -torch.inf)], dim=1)
        classes = torch.cat([classes.cpu(), torch.zeros((len(queries), pad), dtype=torch.int64)], dim=1)
        n_processes = distributed.world_size()
        sims = torch.from_numpy(distributed.all_gather_rows(sims.numpy()))
        classes = torch.from_numpy(distributed.all_gather_rows(classes.numpy()))
        sims = sims.view(n_processes, len(queries), k).permute(1, 0, 2).reshape(len(queries), -1)
        classes = classes.view(n_processes, len(queries), k).permute(1, 0, 2).reshape(len(queries), -1)
        best = sims.topk(k, dim=1)
        sims, classes = best.values.to(device), classes.gather(1, best.indices).to(device)
    # The neighbours' classes index the votes directly.
    return neighbor_votes(sims, classes, np.arange(n_classes), n_classes, temperature)


def _leave_one_out(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int, temperature: float,
                   device: torch.device | str) -> tuple[float, float]:
    """kNN accuracy (%) of every row against all the others."""
    sims, index = nearest_neighbors(features, features, min(k + 1, len(features)), device=device)
    sims, index = sims[:, 1:], index[:, 1:]  # drop the image itself (its own best match)
    return top_accuracies(neighbor_votes(sims, index, labels, n_classes, temperature), labels, n_classes)


# The most memory the conv body's kNN memory may take in one process (AlexNet on ImageNet
# would need 47 GB); above it the body's kNN is left out and the run says so.
KNN_BODY_MAX_BYTES = 4 * 2**30


def body_memory_bytes(model: torch.nn.Module, monitor: KnnMonitor) -> int:
    """Bytes of pooled body features the online kNN keeps in one process."""
    rows = len(monitor.val) if monitor.memory is None else int(monitor.memory.sum())
    return rows * model.body_dim * 4 // distributed.world_size()


def measures_body(model: torch.nn.Module, config: Config, monitor: KnnMonitor | None = None) -> bool:
    """Whether the online kNN also reads the pooled conv body (``knn_body_top1``): asked for
    (``knn_body``), meaningful (the fc features are clustered, so the body is another
    feature; the paper judges its network by the conv layers, not by fc), and with
    ``monitor``, small enough to keep (``KNN_BODY_MAX_BYTES``)."""
    if not (config.knn_body and getattr(model, "separate_body", False)):
        return False
    return monitor is None or body_memory_bytes(model, monitor) <= KNN_BODY_MAX_BYTES


class Monitor:
    """The epoch's scores, run by the loop on what the plan returns: the label scores of the
    clustering (with classes) and the online kNN (with ``val``, every ``val_every`` epochs
    and the last, on a fresh clustering). The only thing it asks of the method's feature pass
    is ``request``: keep the kNN memory's raw features (and pooled body), so the training
    side of the kNN costs no pass of its own where the method makes one (v1).

    Args:
        knn: the online kNN, or None.
        source: the training images (their labels, and the kNN memory's pass where needed).
        config: the run's settings.
        device: where the networks run.
    """

    def __init__(self, knn: KnnMonitor | None, source: ImageSource, config: Config, device: torch.device) -> None:
        self.knn, self.source, self.config, self.device = knn, source, config, device

    def due(self, epoch: int, final: bool = False) -> bool:
        """Whether the kNN is measured at epoch ``epoch`` (0-based) or on the final clustering."""
        return self.knn is not None and (final or epoch % self.config.val_every == 0 or epoch == self.config.epochs - 1)

    def request(self, model: torch.nn.Module, epoch: int, final: bool = False) -> Keep | None:
        """What the feature pass of epoch ``epoch`` should keep for the kNN (None: nothing)."""
        if not self.due(epoch, final) or self.knn.memory is None:
            return None
        return Keep(self.knn.memory, measures_body(model, self.config, self.knn))

    def __call__(self, model: torch.nn.Module, plan: Plan, epoch: int, final: bool = False) -> dict[str, float]:
        """The scores of ``plan`` (epoch ``epoch``, 0-based; ``final``: the final clustering),
        with the seconds they took (``time_monitor``, epochs only)."""
        tick = time.perf_counter()
        scores = label_scores(plan.assignments, self.source.labels, unwhitened(plan.points, plan.pca),
                              derived_seed(self.config.seed, epoch, STREAM_SCORES), self.config.kmeans_backend)
        if plan.fresh and self.due(epoch, final):
            scores.update(self.knn_scores(model, plan.kept))
        if not final:
            scores["time_monitor"] = time.perf_counter() - tick
        return scores

    def knn_scores(self, model: torch.nn.Module, kept: Kept | None) -> dict[str, float]:
        """Online kNN of the validation images against the memory rows ``kept`` by the
        epoch's feature pass, or, without them, against a pass of its own (each process its
        share); also on the pooled body where ``measures_body`` says so (``knn_body_top1``)."""
        knn, config, device = self.knn, self.config, self.device
        body = measures_body(model, config, knn)
        val_features, val_decoded, val_body = compute_features(model, knn.val, config, device, body=body)
        if knn.memory is None:
            return knn.score_with_body((val_features, val_body), val_decoded, None, None, device)
        if kept is None:
            kept = Kept(*local_features(model, self.source, config, device, np.flatnonzero(knn.memory), body=body))
        decoded = kept.decoded
        return knn.score_with_body((val_features, val_body), val_decoded,
                                   (kept.features[decoded], None if kept.body is None else kept.body[decoded]),
                                   knn.train_labels[kept.rows[decoded]], device)


def digits_verdict(source: ArraySource, summary: dict, assignments: np.ndarray, backend: str = "faiss") -> str:
    """The demo's last line: the trained network's clustering beside k-means on the raw
    pixels at the same k (the baseline a feature learner has to beat), NMI and purity, and
    the NMI no clustering with the network's cluster sizes can pass (``nmi_ceiling``: at k
    above the number of classes even pure clusters score below 1, so the room above the
    baseline is that far, not up to 1)."""
    raw = raw_pixel_scores(source.images[..., 0], source.labels, summary["n_clusters"], backend=backend)
    return (f"digits: NMI with the classes {summary['nmi_labels']:.3f} for the trained network's clustering vs "
            f"{raw['nmi_labels']:.3f} for k-means on the raw 64 pixels (k = {summary['n_clusters']} both; purity "
            f"{summary['purity']:.1f}% vs {raw['purity']:.1f}%; no clustering with these cluster sizes can pass NMI "
            f"{nmi_ceiling(source.labels, assignments):.3f}): {raw_verdict(summary['nmi_labels'], raw)}")


# The least NMI by which the demo's clustering must pass the raw pixels to be called above them
# (besides passing the spread of the raw-pixel k-means over its seeds).
CLEAR_MARGIN = 0.01


def raw_verdict(network_nmi: float, raw: dict) -> str:
    """``above`` the raw-pixel baseline only when the network's NMI passes its mean by at
    least ``CLEAR_MARGIN`` and by more than the spread of its seeds; a smaller difference,
    either way, is no result (a seed or the thread count moves the demo's NMI by about
    0.01), and is said so."""
    margin, spread = network_nmi - raw["nmi_labels"], raw["nmi_spread"]
    if margin >= CLEAR_MARGIN and margin > spread:
        return f"above the raw-pixel baseline (by {margin:.3f})"
    if margin <= -CLEAR_MARGIN and -margin > spread:
        return f"NOT above the raw-pixel baseline (below it by {-margin:.3f})"
    return (f"NOT clearly above the raw-pixel baseline ({margin:+.3f}: within {CLEAR_MARGIN} or the {spread:.3f} "
            "spread of its seeds)")


__all__ = ["CLEAR_MARGIN", "KNN_BODY_MAX_BYTES", "KnnMonitor", "Monitor", "body_memory_bytes", "chance_nmi", "class_kmeans_accuracy",
           "digits_verdict", "label_scores", "measures_body", "nmi_ceiling", "purity", "raw_pixel_scores",
           "raw_verdict"]
