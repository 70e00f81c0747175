"""TensorBoard scalars next to ``log.jsonl``: the same per-epoch numbers, for ``tensorboard --logdir``.

Optional by design: the ``tensorboard`` package may be absent (it is in the ``tools``
extra), a folder may not be writable. Either way the run goes on, says so once, and the
JSONL log stays the record. Steps are the log's ``epoch`` field (1 for the first epoch).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

TENSORBOARD_DIR = "tensorboard"

# log.jsonl key -> TensorBoard tag; the part before "/" is the section TensorBoard groups by.
TAGS = {
    "clustering_objective": "clustering/objective",
    "n_split": "clustering/empty_clusters_split",
    "n_nonempty": "clustering/nonempty_clusters",
    "largest_cluster_share": "clustering/largest_cluster_share",
    "nmi_prev": "stability/nmi_previous_epoch",
    "nmi_labels": "labels/nmi",
    "nmi_chance": "labels/nmi_chance",
    "cluster_acc": "labels/cluster_acc_k_classes",
    "cluster_nmi": "labels/cluster_nmi_k_classes",
    "purity": "labels/purity",
    "knn_top1": "labels/knn_top1",
    "knn_top5": "labels/knn_top5",
    "knn_body_top1": "labels/knn_body_top1",
    "knn_body_top5": "labels/knn_body_top5",
    "ari_labels": "labels/ari",
    "train_loss": "train/loss",
    "train_images_per_s": "train/images_per_s",
    "n_images": "data/images",
    "n_skipped": "data/skipped",
}


def tag_of(key: str) -> str:
    """TensorBoard tag of a log key: ``TAGS``, ``time_x -> time/x``, else ``other/key``."""
    if key in TAGS:
        return TAGS[key]
    if key.startswith("time_"):
        return f"time/{key[len('time_'):]}"
    return f"other/{key}"


def scalar_items(record: dict[str, Any]) -> list[tuple[str, float]]:
    """``(tag, value)`` of every finite number of a log record except ``epoch``."""
    items = []
    for key, value in record.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            items.append((tag_of(key), float(value)))
    return items


class ScalarLog:
    """Writes each epoch's record as scalars into ``RUN/tensorboard`` (or does nothing).

    Args:
        run_dir: the run folder.
        enabled: the run's ``tensorboard`` setting.
        log: where the one-time notice goes when scalars cannot be written (default: stderr,
            so the run's one line per epoch on stdout stays as it is).
    """

    def __init__(self, run_dir: str | Path, enabled: bool, log: Callable[[str], None] | None = None) -> None:
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.writer = None
        self.directory = Path(run_dir) / TENSORBOARD_DIR
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - ImportError, or a tensorboard/protobuf mismatch
            self.log("deepcluster: note: the 'tensorboard' package is not installed, so no TensorBoard scalars are "
                "written (log.jsonl has them all); pip install tensorboard, or set tensorboard: false")
            return
        try:
            self.writer = SummaryWriter(log_dir=str(self.directory))
        except Exception as error:  # noqa: BLE001 - an unwritable folder must not stop the run
            self._give_up(error)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def _give_up(self, error: Exception) -> None:
        self.writer = None
        self.log(f"deepcluster: note: TensorBoard scalars turned off ({type(error).__name__}: {error}); "
                 "log.jsonl is unaffected")

    def write(self, record: dict[str, Any]) -> None:
        """Add the numbers of one epoch's record at step ``record['epoch']``."""
        if self.writer is None:
            return
        try:
            for tag, value in scalar_items(record):
                self.writer.add_scalar(tag, value, global_step=int(record["epoch"]))
            self.writer.flush()
        except Exception as error:  # noqa: BLE001
            self._give_up(error)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
            self.writer = None


__all__ = ["ScalarLog", "TAGS", "TENSORBOARD_DIR", "scalar_items", "tag_of"]
