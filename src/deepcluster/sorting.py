"""Images sorted into one folder per cluster: ``assign --into DIR``.

``DIR/cluster_0007/<file>`` is a symbolic link to each image placed in cluster 7 (or a
copy, ``copy=True``); images that could not be read go to ``DIR/unreadable/`` (their reason
is in the assignments table's ``problem`` column). A file keeps its path relative to the data
folder, so class sub-folders stay apart and two files of the same name never collide. Names
are handled as bytes (``os.fsencode``): a file name that is not valid UTF-8 is linked as it is.

The run folder remembers where its images were sorted (``RUN/sorted.json``), so the report
page can point there.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepcluster.config import ConfigError

UNREADABLE_DIR = "unreadable"
RECORD_NAME = "sorted.json"  # in the run folder: where its images were sorted


def cluster_dir_name(cluster: int) -> str:
    """``cluster_0007``; ``unreadable`` for -1."""
    return UNREADABLE_DIR if cluster < 0 else f"cluster_{cluster:04d}"


@dataclass
class SortedFolders:
    """What :func:`sort_into_folders` did.

    Attributes:
        into: the folder holding ``cluster_NNNN/`` and ``unreadable/``.
        placed: files linked or copied into a cluster folder.
        unreadable: files put in ``unreadable/``.
        clusters: cluster folders made.
        copied: True for copies, False for symbolic links.
    """

    into: Path
    placed: int
    unreadable: int
    clusters: int
    copied: bool


def check_into(into: str | Path) -> Path:
    """``into`` as a folder that is new or empty (so an earlier sorting is never mixed with
    this one); created. A one-line ``ConfigError`` otherwise."""
    folder = Path(into)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--into {str(folder)!r} is a file; give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(f"--into {str(folder)!r} is not empty; give a new or empty folder (remove the old "
                          "sorting first)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create folder {str(folder)!r}: {error.strerror or error}") from None
    return folder


def _place(source: bytes, target: bytes, copy: bool) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if copy:
        shutil.copy2(source, target)
    else:
        os.symlink(source, target)


def sort_into_folders(into: str | Path, root: str | Path, relative_files: list[str], clusters: np.ndarray,
                      copy: bool = False) -> SortedFolders:
    """Link (or copy) every file into the folder of its cluster.

    Args:
        into: a new or empty folder (see :func:`check_into`).
        root: the data folder the relative file names are under.
        relative_files: each image's path relative to ``root``, in the order of ``clusters``.
        clusters: ``(N,)`` cluster of each image, -1 for unreadable ones.
        copy: copy the files instead of linking them.

    Raises:
        ConfigError: a file cannot be linked or copied (the first one, with the reason).
    """
    into = Path(into)
    root_bytes = os.fsencode(os.path.abspath(root))
    into_bytes = os.fsencode(os.path.abspath(into))
    made = set()
    for name, cluster in zip(relative_files, np.asarray(clusters).tolist()):
        relative = os.fsencode(name)
        folder = os.fsencode(cluster_dir_name(int(cluster)))
        target = os.path.join(into_bytes, folder, relative)
        try:
            _place(os.path.join(root_bytes, relative), target, copy)
        except OSError as error:
            shown = os.fsdecode(target)
            raise ConfigError(f"cannot {'copy' if copy else 'link'} into {shown!r}: {error.strerror or error}") from None
        made.add(int(cluster))
    unreadable = int((np.asarray(clusters) < 0).sum())
    return SortedFolders(into, len(relative_files) - unreadable, unreadable, len(made - {-1}), copy)


def remember(run_dir: str | Path, sorted_folders: SortedFolders, data: str | Path) -> None:
    """Note in ``RUN/sorted.json`` where this run's images were sorted (best effort: a
    read-only run folder only loses the report's pointer)."""
    path = Path(run_dir) / RECORD_NAME
    entries = [entry for entry in read_sortings(run_dir) if entry["into"] != os.path.abspath(sorted_folders.into)]
    entries.append({"into": os.path.abspath(sorted_folders.into), "data": os.path.abspath(data),
                    "placed": sorted_folders.placed, "unreadable": sorted_folders.unreadable,
                    "clusters": sorted_folders.clusters, "copied": sorted_folders.copied})
    try:
        from deepcluster.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, (json.dumps(entries, indent=1) + "\n").encode())
    except OSError:
        pass


def read_sortings(run_dir: str | Path) -> list[dict]:
    """The sortings ``RUN/sorted.json`` lists (none when missing or unreadable)."""
    try:
        entries = json.loads((Path(run_dir) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(entries, list):
        return []
    return [entry for entry in entries if isinstance(entry, dict) and isinstance(entry.get("into"), str)]


def sorted_folders_text(run_dir: str | Path) -> str | None:
    """Where this run's images are sorted into folders (those that still exist), for the
    report page; ``None`` when nowhere."""
    shown = [f"{entry['into']} ({entry.get('clusters', '?')} cluster folders, images of {entry.get('data', '?')})"
             for entry in read_sortings(run_dir) if Path(entry["into"]).is_dir()]
    return "; ".join(shown) or None


__all__ = ["RECORD_NAME", "SortedFolders", "UNREADABLE_DIR", "check_into", "cluster_dir_name", "read_sortings",
           "remember", "sort_into_folders", "sorted_folders_text"]
