"""The code and the images a measurement runs on: another commit of this package (a git
worktree made for the measurement, or a checkout given), and a class-by-class subset of an
image folder."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path

from lib.result import ROOT, tree_label


@contextlib.contextmanager
def checkout(commit_or_path: str):
    """A checkout of ``commit_or_path``: the folder itself when it is one, else a temporary
    ``git worktree`` of that commit of this repository, removed afterwards. Yields
    ``(folder, label)``."""
    given = Path(commit_or_path)
    if given.is_dir():
        yield given.resolve(), tree_label(given.resolve())
        return
    scratch = Path(tempfile.mkdtemp(prefix="bench-tree-"))
    folder = scratch / "tree"
    made = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), commit_or_path],
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(f"run.py: --against {commit_or_path!r} is neither a folder nor a commit of this repository "
                         f"({made.stderr.strip().splitlines()[-1] if made.stderr.strip() else 'git failed'})")
    try:
        yield folder, tree_label(folder)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], capture_output=True)
        with contextlib.suppress(OSError):
            scratch.rmdir()


def env_for(tree: Path | None, threads: int | None = None) -> dict:
    """The environment of a process that imports the package of ``tree`` (None: this one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str((tree or ROOT) / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONWARNINGS"] = "ignore"
    if threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(threads)
    return env


def subset_folder(data: Path, n_images: int, target: Path) -> Path:
    """Symlinks to ``n_images`` images of ``data``, taken class by class in turn (sorted)."""
    classes = sorted(p for p in data.iterdir() if p.is_dir())
    files = {c: sorted(f for f in c.rglob("*") if f.is_file()) for c in classes}
    chosen, position = [], 0
    while len(chosen) < n_images and any(position < len(f) for f in files.values()):
        for c in classes:
            if position < len(files[c]) and len(chosen) < n_images:
                chosen.append((c, files[c][position]))
        position += 1
    for c, file in chosen:
        (target / c.name).mkdir(parents=True, exist_ok=True)
        (target / c.name / file.name).symlink_to(file.resolve())
    return target


def folder_to_use(data: str | None, n_images: int | None, scratch: Path) -> tuple[Path | None, int]:
    """``data`` itself, or a subset of ``n_images`` of it in ``scratch``; and its number of
    files (None and 1,797: the built-in digits)."""
    if data is None:
        return None, 1797
    folder = Path(data).resolve()
    if n_images:
        folder = subset_folder(folder, n_images, scratch / "data")
    return folder, sum(1 for f in folder.rglob("*") if f.is_file())
