"""Small helpers for the words of terminal messages (no heavy imports: the command line uses them)."""

from __future__ import annotations

import os
import re

# Longest error message printed: a message never carries a whole expanded value.
MAX_MESSAGE = 600


def shown_path(name: str) -> str:
    """A file name as every output of the package writes it (``skipped.tsv``, ``assign``'s
    CSV and Parquet, ``features``' ``paths.tsv``, the report, the terminal lines): the name's
    bytes as UTF-8, each byte that is not part of valid UTF-8 written as ``\\xNN``. Python
    hands such bytes over as lone surrogates (``os.fsdecode``), which no UTF-8 file accepts;
    valid names come out unchanged. (A name with a literal ``\\x`` in it reads the same.)"""
    if name.isascii():
        return name
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name's bytes
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` as one printable line of at most about ``limit`` characters: line breaks
    become spaces, undecodable file-name bytes are escaped (``shown_path``), and a longer
    text is cut at a word boundary with `` ...`` appended."""
    text = shown_path(re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[:cut if cut > limit // 2 else limit].rstrip(" ,;:(") + " ..."


def plural(count: int, word: str) -> str:
    """``plural(1, "epoch") == "1 epoch"``, ``plural(1797, "image") == "1,797 images"`` (regular nouns)."""
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


def _knn_text(record: dict, key: str, named: bool = True) -> str:
    """``knn top-1/5 41.2/78.5%``: a kNN's top-1 and top-5 side by side (top-1 alone when the
    record has no top-5)."""
    top1, top5 = record[f"{key}_top1"], record.get(f"{key}_top5")
    if top5 is None:
        return f"{'knn top-1 ' if named else ''}{top1:.1f}%"
    return f"{'knn top-1/5 ' if named else ''}{top1:.1f}/{top5:.1f}%"


def format_scores(record: dict) -> list[str]:
    """The label scores of a record, named so they cannot be misread (see ``monitor``)."""
    parts = []
    if "knn_top1" in record:
        parts.append(_knn_text(record, "knn"))
        if "knn_body_top1" in record:
            parts[-1] += f" (conv body {_knn_text(record, 'knn_body', named=False)})"
    if "cluster_acc" in record:
        parts.append(f"acc(k=classes) {record['cluster_acc']:.1f}%")
    if "nmi_labels" in record:
        parts.append(f"nmi {record['nmi_labels']:.3f} (chance {record['nmi_chance']:.3f}) "
                     f"ari {record['ari_labels']:.3f} purity {record['purity']:.1f}%")
    return parts


def format_line(record: dict, epochs: int) -> str:
    """The one terminal line of an epoch: the scores are of the features the epoch clustered
    (the weights it started from: epoch 1 shows the random start)."""
    parts = [f"epoch {record['epoch']:>3}/{epochs}"]
    if record["clustering_objective"] is not None:
        parts.append(f"objective {record['clustering_objective']:.4f}")
    if record.get("spherical_objective") is not None:  # v2: mean cosine to the centroid, per head
        parts.append(f"cosine {'/'.join(f'{value:.3f}' for value in record['spherical_objective'])}")
    parts.append(f"loss {record['train_loss']:.4f}")
    if record.get("train_loss_per_head") is not None:
        parts[-1] += f" (heads {'/'.join(f'{value:.3f}' for value in record['train_loss_per_head'])})"
    if record.get("n_empty") is not None:
        parts.append(f"empty {'/'.join(map(str, record['n_empty']))}")
    parts.extend(format_scores(record))
    if record.get("nmi_prev") is not None:
        parts.append(f"nmi(t-1,t) {record['nmi_prev']:.3f}")
    if record.get("n_skipped"):  # the log's counts, said once per epoch
        parts.append(f"images {record['n_images']} ({record['n_skipped']} unreadable, in skipped.tsv)")
    parts.append(f"clusters {record['n_nonempty']} (largest {100 * record['largest_cluster_share']:.1f}%)")
    parts.append(f"time features {record['time_features']:.1f}s clustering {record['time_clustering']:.1f}s "
                 f"training {record['time_training']:.1f}s ({record['train_images_per_s']:.0f} img/s)")
    return "  ".join(parts)


def final_line(summary: dict, last_epoch: int) -> str:
    """The terminal line of the final clustering (``final.json``'s numbers)."""
    parts = [f"final clustering of the trained network: {plural(summary['n_nonempty'], 'cluster')} "
             f"(largest {100 * summary['largest_cluster_share']:.1f}%)"]
    if summary["nmi_last_epoch"] is not None:
        parts.append(f"nmi with epoch {last_epoch}'s {summary['nmi_last_epoch']:.3f}")
    parts.extend(format_scores(summary))
    parts.append(f"time {summary['time_features'] + summary['time_clustering']:.1f}s")
    return "  ".join(parts)


__all__ = ["MAX_MESSAGE", "final_line", "format_line", "format_scores", "one_line", "plural", "shown_path"]
