"""Labelled folders built from public image sets, for the learning measurements
(``python bench/run.py folders``); every folder is ``OUT/train/<class>/<image>`` and
``OUT/val/<class>/<image>``, images resized to ``--size`` pixels (a square, PNG).

- ``omniglot ZIP ...``: the handwritten characters of Omniglot's ``images_background*.zip``
  files (github.com/brendenlake/omniglot, ``python/``), one class per character of each
  alphabet (``Alphabet__characterNN``), the same character of two files counted once. Each
  character has 20 drawings by 20 people; ``--val-per-class`` of them (the last drawers)
  go to ``val``.
- ``split FOLDER``: an image folder of classes (for example the Sign Language Digits
  dataset's ``Dataset/``), the last ``--val-per-class`` images of each class (sorted by
  name) to ``val``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def omniglot_classes(zips: list[Path]) -> dict[str, dict[str, bytes]]:
    """``{Alphabet__characterNN: {file name: PNG bytes}}`` from Omniglot's zip files."""
    classes: dict[str, dict[str, bytes]] = {}
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                parts = Path(name).parts
                if len(parts) < 4 or not name.lower().endswith(".png"):
                    continue
                alphabet, character, file = parts[-3], parts[-2], parts[-1]
                classes.setdefault(f"{alphabet}__{character}", {})[file] = archive.read(name)
    return classes


def folder_classes(data: Path) -> dict[str, dict[str, bytes]]:
    """``{class: {file name: bytes}}`` of an image folder of classes."""
    return {c.name: {f.name: f.read_bytes() for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}
            for c in sorted(p for p in data.iterdir() if p.is_dir())}


def write_split(classes: dict[str, dict[str, bytes]], out: Path, val_per_class: int, size: int) -> tuple[int, int]:
    """Write ``out/train`` and ``out/val`` (the last ``val_per_class`` files of each class,
    by name), each image converted to RGB or grayscale as it is and resized to ``size``
    square; returns the numbers of training and validation images."""
    counts = [0, 0]
    for name, files in sorted(classes.items()):
        names = sorted(files)
        if len(names) <= val_per_class:
            raise SystemExit(f"run.py folders: class {name!r} has {len(names)} images; --val-per-class "
                             f"{val_per_class} leaves none to train on")
        for i, file in enumerate(names):
            part = "val" if i >= len(names) - val_per_class else "train"
            image = Image.open(io.BytesIO(files[file]))
            image = image.convert("L" if image.mode in ("1", "L") else "RGB").resize((size, size), Image.LANCZOS)
            target = out / part / name / (Path(file).stem + ".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            counts[part == "val"] += 1
    return counts[0], counts[1]


def folders(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"run.py folders: {out} is not empty; give a new folder")
    sources = [Path(s) for s in args.sources]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise SystemExit(f"run.py folders: no such file or folder: {missing[0]}")
    classes = omniglot_classes(sources) if args.set == "omniglot" else folder_classes(sources[0])
    n_train, n_val = write_split(classes, out, args.val_per_class, args.size)
    print(f"{out}: {len(classes)} classes, {n_train} training and {n_val} validation images of {args.size} px")
    return 0
