"""Bad files: every kind of damaged or unusual image, made for real with Pillow or bytes.

Each is either converted correctly (pixels checked) or skipped, counted and listed in
``RUN/skipped.tsv`` with its reason; a real training run goes through a folder mixing them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_pattern
from deepcluster.data import FolderSource, scan_folder
from deepcluster.data import sources as sources_module
from deepcluster.data.sources import MAX_IMAGE_PIXELS


def png_bytes(pixels: np.ndarray, color_type: int) -> bytes:
    """A PNG written byte by byte: ``pixels`` is ``(H, W[, C])`` uint16, stored at 16 bits
    per sample (color type 0 = gray, 2 = RGB), which Pillow itself cannot write in colour."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def make_converted(folder: Path) -> None:
    """Files that must be converted, each with a known expected result (see the checks)."""
    gradient = np.array([[0, 257 * 100, 32768, 65535]] * 4, dtype=np.uint16)
    Image.fromarray(gradient).save(folder / "gray16.png")  # Pillow writes 16-bit grayscale PNGs
    rgb48 = np.zeros((4, 4, 3), dtype=np.uint16)
    rgb48[...] = (65535, 257 * 128, 257)
    (folder / "rgb48.png").write_bytes(png_bytes(rgb48, color_type=2))
    cmyk = Image.new("CMYK", (32, 32))
    for box, ink in [((0, 0, 16, 16), (255, 0, 0, 0)), ((16, 0, 32, 16), (0, 255, 0, 0)),
                     ((0, 16, 16, 32), (0, 0, 255, 0)), ((16, 16, 32, 32), (0, 0, 0, 255))]:
        cmyk.paste(ink, box)
    cmyk.save(folder / "cmyk.jpg", quality=95)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    palette.paste(1, (0, 0, 4, 8))
    palette.save(folder / "palette.png", transparency=0)
    photo = Image.new("RGB", (40, 20), (255, 0, 0))
    photo.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    photo.save(folder / "exif_rotated.jpg", exif=exif, quality=95)


def make_broken(folder: Path) -> dict[str, str]:
    """Files that must be skipped; returns name -> a word their reason must contain."""
    buffer = io.BytesIO()
    Image.fromarray(make_pattern(1, np.random.default_rng(1), size=64)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    Image.new("1", (12000, 8000)).save(folder / "bomb.png")  # 96 Mpx, 12 kB on disk
    Image.new("RGB", (8, 8)).save(folder / "unreadable.png")
    os.symlink("loop_b.jpg", folder / "loop_a.jpg")
    os.symlink("loop_a.jpg", folder / "loop_b.jpg")
    os.symlink("missing.png", folder / "dangling.png")
    return {"truncated.jpg": "truncated", "empty.jpg": "empty file", "text.jpg": "cannot identify",
            "bomb.png": f"limit {MAX_IMAGE_PIXELS}", "unreadable.png": "permission denied",
            "loop_a.jpg": "symbolic links", "loop_b.jpg": "symbolic links", "dangling.png": "No such file"}


@pytest.fixture
def unreadable(monkeypatch, permissions_enforced):
    """Make ``unreadable.png`` unreadable: chmod 000 where file modes are enforced; as root
    (which reads any file whatever its mode) opening it raises the PermissionError the
    operating system would raise."""
    def apply(folder: Path) -> None:
        path = folder / "unreadable.png"
        if permissions_enforced:
            path.chmod(0)
            return
        real_open = sources_module.Image.open

        def open_image(file, *args, **kwargs):
            if Path(file).name == "unreadable.png":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(sources_module.Image, "open", open_image)
    return apply


def test_converted_images_have_the_right_pixels(tmp_path):
    make_converted(tmp_path)
    source = FolderSource(tmp_path)
    assert source.skipped == []
    image = {Path(source.name(i)).name: np.asarray(source.load(i)) for i in range(len(source))}
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in image.values())
    # 16 bits scaled to 8, not clipped: 0, 100, 128, 255 (clipping gives 0, 255, 255, 255).
    assert image["gray16.png"][0, :, 0].tolist() == [0, 100, 128, 255]
    assert image["rgb48.png"][0, 0].tolist() == [255, 128, 1]
    # CMYK inks: cyan, magenta, yellow, black (JPEG is lossy: within 12 levels).
    cmyk = image["cmyk.jpg"].astype(int)
    for (y, x), rgb in [((4, 4), (0, 255, 255)), ((4, 28), (255, 0, 255)), ((28, 4), (255, 255, 0)),
                        ((28, 28), (0, 0, 0))]:
        assert np.abs(cmyk[y, x] - rgb).max() <= 12, ((y, x), cmyk[y, x])
    # Palette with a transparent index: transparent pixels on white, opaque ones red.
    assert image["palette.png"][0, 0].tolist() == [255, 0, 0] and image["palette.png"][0, 7].tolist() == [255] * 3
    # EXIF orientation 6 really rotates: 40x20 stored becomes 20 wide, 40 tall, left half on top.
    rotated = image["exif_rotated.jpg"].astype(int)
    assert rotated.shape == (40, 20, 3)
    assert np.abs(rotated[5, 10] - (255, 0, 0)).max() <= 12 and np.abs(rotated[35, 10] - (0, 0, 255)).max() <= 12


def test_broken_files_are_skipped_with_their_reason(tmp_path, unreadable):
    Image.new("RGB", (8, 8), "green").save(tmp_path / "good.png")
    expected = make_broken(tmp_path)
    unreadable(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's DecompressionBombWarning: the bomb is refused quietly
        scan = scan_folder(tmp_path)
    # The truncated JPEG has a good header: it is found when decoded (see the training test).
    assert sorted(Path(p).name for p in scan.paths) == ["good.png", "truncated.jpg"]
    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    del expected["truncated.jpg"]
    assert sorted(reasons) == sorted(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])


def test_a_symlink_loop_between_folders_is_walked_once(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    os.symlink("..", tmp_path / "a" / "up")  # a/up/a/up/... would never end
    assert [Path(p).relative_to(tmp_path).as_posix() for p in scan_folder(tmp_path).paths] == ["a/x.png"]


def test_training_on_a_folder_mixing_good_and_bad_files(cli, tmp_path, unreadable):
    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(make_pattern(i % 3, rng)).save(data / f"good_{i:02d}.{'png' if i % 2 else 'jpg'}")
    make_converted(data / "nested")
    expected = make_broken(data)
    os.symlink("..", data / "nested" / "loop")
    unreadable(data)
    run = tmp_path / "run"
    code, out, err = cli("train", "--data", data, "--out", run, "--epochs", "2")
    assert code == 0, err
    assert (run / "skipped.tsv").read_text().startswith("path\treason\n")  # a header line, then the files
    lines = (run / "skipped.tsv").read_text().splitlines()[1:]
    listed = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in lines}
    assert sorted(listed) == sorted(expected) and len(lines) == len(expected)
    for name, word in expected.items():
        assert word in listed[name], (name, listed[name])
    assert "cannot be decoded" in listed["truncated.jpg"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["n_skipped"] for r in records] == [len(expected)] * 2
    assert [r["n_images"] for r in records] == [12 + 5] * 2  # good + converted
    paths = FolderSource(data).paths  # the order of the assignments
    assignments = np.load(run / "assignments" / "epoch_0002.npy", allow_pickle=False)
    assert len(assignments) == len(paths) == 12 + 5 + 1
    decoded = assignments >= 0
    assert [Path(p).name for p, ok in zip(paths, decoded) if not ok] == ["truncated.jpg"]


def test_a_folder_with_nothing_usable_is_an_error_before_training(cli, tmp_path, unreadable):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, out, err = cli("train", "--data", empty, "--out", tmp_path / "r1")
    assert code == 2 and err.count("\n") == 1 and "no image files" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    make_broken(broken)
    unreadable(broken)
    (broken / "truncated.jpg").unlink()
    code, out, err = cli("train", "--data", broken, "--out", tmp_path / "r2")
    assert code == 2 and err.count("\n") == 1 and "none of the" in err and "could be read" in err

    # Headers all fine, pixels all truncated: found by the first feature pass, before training.
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    jpeg = io.BytesIO()
    Image.fromarray(make_pattern(0, np.random.default_rng(0), size=64)).save(jpeg, "JPEG")
    for i in range(8):
        (truncated / f"{i}.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 6 // 10])
    run = tmp_path / "r3"
    code, out, err = cli("train", "--data", truncated, "--out", run)
    assert code == 2 and err.count("\n") == 1
    assert "only 0 of 8 images could be decoded" in err and "skipped.tsv" in err
    assert "epoch   1/" not in out and not (run / "checkpoint.pt").exists()
    assert len((run / "skipped.tsv").read_text().splitlines()[1:]) == 8


def test_a_file_that_breaks_after_the_feature_pass_is_left_out_of_training(cli, tmp_path, monkeypatch):
    from deepcluster.methods import v1 as v1_module

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(make_pattern(i % 3, rng)).save(data / f"good_{i:02d}.png")
    victim = data / "good_05.png"
    paths = FolderSource(data).paths  # the order of the assignments
    original = v1_module.reduce_features
    passes = []

    def reduce_then_break(*args, **kwargs):
        result = original(*args, **kwargs)
        passes.append(1)
        if len(passes) == 1:  # after the first feature pass read it, before training reads it
            victim.write_bytes(b"this is no longer a PNG")
        return result

    monkeypatch.setattr(v1_module, "reduce_features", reduce_then_break)
    run = tmp_path / "run"
    # Every image is drawn at least once: more samples than images, with uniform sampling.
    code, out, err = cli("train", "--data", data, "--out", run, "--epochs", "2", "--n_clusters", "3")
    assert code == 0, err
    assert out.count("good_05.png could not be read in the training pass") == 1
    lines = dict(line.split("\t") for line in (run / "skipped.tsv").read_text().splitlines()[1:])
    assert list(lines) == [str(victim)]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["n_skipped"] for r in records] == [1, 1]
    assert all(np.isfinite(r["train_loss"]) for r in records)
    second = np.load(run / "assignments" / "epoch_0002.npy", allow_pickle=False)
    assert second[paths.index(str(victim))] == -1  # found broken by the next feature pass
