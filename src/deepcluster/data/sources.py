"""Where images come from: a folder on disk or an in-memory array.

A source is an indexable list of images plus, when known, integer labels. Labels only
ever feed evaluation metrics (NMI, ACC, ARI against the truth); training never reads them.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

# Pillow's own bomb guard warns at ~89 Mpx and raises at twice that; we refuse at the
# warning level so a hostile file is skipped before it is decoded.
MAX_IMAGE_PIXELS = 89_478_485


class DataError(ValueError):
    """The data given cannot be used; the message says what to fix."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: applies EXIF rotation, flattens alpha on white,
    expands palettes, maps 16-bit and CMYK to 8-bit RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grayscale (Pillow's "I" mode also holds 16-bit PNGs): map 0-65535 onto
        # 0-255. Pillow's own conversion clips at 255, which turns almost every pixel white.
        array = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.rint(array).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


@dataclass
class SkippedFile:
    """A file left out, and why."""

    path: str
    reason: str


class ImageSource:
    """Interface: ``len(source)``, ``source.load(i) -> PIL RGB image``, ``labels``, ``names``."""

    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    unlabelled: str | None = None  # why a folder has no labels (see ``folder_labels``)

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """A human-readable identifier of image ``index`` (its path, for files)."""
        return str(index)

    @property
    def n_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1


class ArraySource(ImageSource):
    """Images held in memory as a ``(N, H, W, 3)`` or ``(N, H, W)`` uint8 array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, class_names: list[str] | None = None):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError("ArraySource needs a uint8 array of shape (N, H, W) or (N, H, W, 3)")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return to_rgb(Image.fromarray(self.images[index]))


@dataclass
class FolderScan:
    """Result of scanning a folder: usable files, their labels, and what was skipped.

    Attributes:
        paths: the usable files, in folder order.
        labels, class_names: the classes (``FolderLabels``), or ``None``.
        skipped: files whose header could not be read, with the reason.
        found: every image file found, usable or not, in folder order.
        unlabelled: why there are no labels (``None`` when there are).
    """

    paths: list[str]
    labels: np.ndarray | None
    class_names: list[str] | None
    skipped: list[SkippedFile] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    unlabelled: str | None = None


def _walk_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, in sorted order; follows directory
    symlinks but never enters the same real directory twice (no symlink loops)."""
    found: list[Path] = []
    seen: set[str] = set()
    for current, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(Path(current) / name)
    return found


def check_header(path: Path) -> str | None:
    """Open the image header only (fast) and return why it is unusable, or ``None``.

    Damage past the header (a truncated JPEG) shows only when the pixels are decoded, in
    the feature pass; such a file is then skipped with the reason ``decode_problem`` gives.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            # Pillow warns about large images as it opens them; we refuse them just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                return f"too large ({width}x{height} pixels, limit {MAX_IMAGE_PIXELS})"
            if width < 1 or height < 1:
                return "empty image"
    except Image.UnidentifiedImageError:
        return "not a readable image (cannot identify its format)"
    except PermissionError:
        return "permission denied"
    except OSError as error:
        if error.errno is not None:  # the file itself: dangling link, symlink loop, I/O error
            return f"cannot be opened ({error.strerror})"
        return f"not a readable image ({type(error).__name__}: {error})"
    except Image.DecompressionBombError as error:
        return f"too large ({error})"
    except Exception as error:  # noqa: BLE001 - Pillow's parsers raise many types on corrupt headers
        return f"not a readable image ({type(error).__name__}: {error})"
    return None


def scan_folder(root: str | os.PathLike) -> FolderScan:
    """Find images under ``root``, recursively.

    The classes (labels for evaluation only) follow ``folder_labels``: when every image
    lies somewhere inside a sub-folder of ``root`` and there are at least two, each image
    belongs to its top-level sub-folder. Files whose header cannot be read are skipped and
    listed.

    Raises:
        DataError: the folder does not exist, or holds no readable image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist or is not a folder")
    files = _walk_images(root)
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}")
    skipped, good = [], []
    for path in files:
        reason = check_header(path)
        if reason is None:
            good.append(path)
        else:
            skipped.append(SkippedFile(str(path), reason))
    if not good:
        raise DataError(f"none of the {len(files)} image files under {str(root)!r} could be read (first: {skipped[0].path}: {skipped[0].reason})")
    labels, class_names = folder_labels([path.relative_to(root) for path in good])
    return FolderScan([str(p) for p in good], labels, class_names, skipped, [str(p) for p in files],
                      unlabelled_reason([path.relative_to(root) for path in good]))


def unlabelled_reason(relative: list[PurePath]) -> str | None:
    """Why files at these paths (relative to the data folder) have no classes, as a clause
    for a message; ``None`` when they have (see ``folder_labels``)."""
    loose = [rel for rel in relative if len(rel.parts) < 2]
    if loose:
        return (f"{len(loose)} image(s) lie directly in the folder, not in a class sub-folder (e.g. "
                f"{str(loose[0])!r}); classes need FOLDER/<class>/...")
    tops = {rel.parts[0] for rel in relative}
    if len(tops) < 2:
        return f"all images lie in one sub-folder ({next(iter(tops), '')!r}), so there is a single class"
    return None


def folder_labels(relative: list[PurePath]) -> tuple[np.ndarray | None, list[str] | None]:
    """``(labels, class names)`` of files at these paths, relative to the data folder.

    The rule, the same everywhere (``train``, ``eval``, ``report``, ``assign``, ``features``):
    an image belongs to the top-level sub-folder it lies in, at any depth
    (``cat/indoor/x.jpg`` is a ``cat``, as in ImageNet-style trees); the folder has classes
    when every image lies in a sub-folder and there are at least two of them. Otherwise
    ``(None, None)``, and ``unlabelled_reason`` says why.
    """
    if unlabelled_reason(relative) is not None:
        return None, None
    class_names = sorted({rel.parts[0] for rel in relative})
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[rel.parts[0]] for rel in relative], dtype=np.int64), class_names


def walk_relative(root: str | os.PathLike) -> list[str]:
    """The image files under ``root`` (no header check), relative to it: a cheap listing to
    compare a folder with the list a run stored."""
    return [str(path.relative_to(root)) for path in _walk_images(Path(root))]


def decode_problem(source: ImageSource, index: int) -> str:
    """Why image ``index`` of ``source`` cannot be used, found by decoding it again (only
    called for the few images that failed in the feature pass)."""
    try:
        source.load(index)
    except Exception as error:  # noqa: BLE001 - any failure is a reason to skip the file
        if isinstance(error, OSError) and error.errno is not None:  # the file itself: gone, unreadable, I/O error
            return f"cannot be opened ({error.strerror})"
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"cannot be decoded ({type(error).__name__}{': ' + text if text else ''})"
    return "cannot be decoded (it failed in a data-loading worker, then decoded in the main process)"


class FolderSource(ImageSource):
    """Images in a folder (class sub-folders, or any layout without labels).

    Args:
        root: the folder.
        files: the images to use, relative to ``root``, in this order (a run's stored list,
            ``RUN/images.json``); ``None`` scans the folder and checks every header. Given
            files are not opened here: one that is missing or broken fails when it is
            decoded, and is skipped then.
        every_file: keep the files whose header failed (a scan only): every image file found
            is then an image of the source, in folder order, and those fail to load with
            their reason (``problem``) without being opened again; for commands that write
            one row per file.
    """

    def __init__(self, root: str | os.PathLike, files: list[str] | None = None, every_file: bool = False):
        self.root = str(root)
        if files is None:
            scan = scan_folder(root)
        else:
            if not Path(root).is_dir():
                raise DataError(f"data folder {self.root!r} does not exist or is not a folder")
            relative = [PurePath(name) for name in files]
            labels, class_names = folder_labels(relative)
            scan = FolderScan([str(Path(root) / name) for name in files], labels, class_names,
                              unlabelled=unlabelled_reason(relative))
        self.skipped = scan.skipped
        self._known_problems = {}
        if every_file and scan.skipped:
            self._known_problems = {item.path: item.reason for item in scan.skipped}
            found = [PurePath(path).relative_to(root) for path in scan.found]
            labels, class_names = folder_labels(found)
            scan = FolderScan(scan.found, labels, class_names, scan.skipped, scan.found, unlabelled_reason(found))
        self.paths = scan.paths
        self.labels = scan.labels
        self.class_names = scan.class_names
        self.unlabelled = scan.unlabelled
        self._relative = None if files is None else list(files)

    def problem(self, index: int) -> str:
        """Why image ``index`` cannot be used: its header's reason, else ``decode_problem``."""
        return self._known_problems.get(self.paths[index]) or decode_problem(self, index)

    def relative_files(self) -> list[str]:
        """The images' paths relative to the root, in order (what ``files`` takes)."""
        if self._relative is None:
            self._relative = [str(Path(path).relative_to(self.root)) for path in self.paths]
        return self._relative

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        known = self._known_problems.get(self.paths[index]) if self._known_problems else None
        if known is not None:  # refused from its header (a decompression bomb is never decoded)
            raise DataError(known)
        with Image.open(self.paths[index]) as image:
            image.load()
            return to_rgb(image)

    def name(self, index: int) -> str:
        return self.paths[index]
