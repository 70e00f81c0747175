import numpy as np
import pytest
from PIL import Image

from deepcluster.data import (CenterView, DataError, FolderSource, RandomResizedCropFlip, load_digits_source,
                              scan_folder, to_rgb, uniform_cluster_sample)


def test_uniform_sampler_gives_every_nonempty_cluster_the_same_share():
    # Very unbalanced: cluster 0 has 900 images, clusters 1-3 have 30, cluster 4 is empty,
    # and 10 images are unusable (-1).
    assignments = np.concatenate([np.zeros(900), np.ones(30), np.full(30, 2), np.full(30, 3), np.full(10, -1)]).astype(int)
    n = int((assignments >= 0).sum())
    sample = uniform_cluster_sample(assignments, n, np.random.default_rng(0))
    assert len(sample) == n
    counts = np.bincount(assignments[sample], minlength=5)
    assert counts[4] == 0 and np.all(assignments[sample] >= 0)
    quota = n // 4 + 1
    assert np.all(counts[:4] <= quota)
    assert counts[:4].min() >= quota - 4  # the cut to n removes at most 4 draws in total
    # Big clusters are drawn without replacement, small ones with.
    big = sample[assignments[sample] == 0]
    assert len(np.unique(big)) == len(big)


def test_uniform_sampler_is_seeded():
    assignments = np.random.default_rng(0).integers(0, 7, 100)
    a = uniform_cluster_sample(assignments, 100, np.random.default_rng(5))
    b = uniform_cluster_sample(assignments, 100, np.random.default_rng(5))
    assert np.array_equal(a, b)


def test_scan_labelled_folder(image_folder):
    scan = scan_folder(image_folder)
    assert len(scan.paths) == 36
    assert scan.class_names == ["checkers", "rings", "stripes"]
    assert np.bincount(scan.labels).tolist() == [12, 12, 12]


def test_flat_folder_has_no_labels_and_bad_files_are_skipped(tmp_path):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    Image.new("RGB", (10, 10), "red").save(tmp_path / "one.png")
    Image.new("L", (12, 9), 128).save(nested / "two.jpg")
    Image.new("P", (8, 8)).save(tmp_path / "three.bmp")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    source = FolderSource(tmp_path)
    assert source.labels is None and len(source) == 3
    assert sorted(s.reason.split(" ")[0] for s in source.skipped) == ["empty", "not"]
    assert all(source.load(i).mode == "RGB" for i in range(3))


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no image files"):
        scan_folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 1 image files"):
        scan_folder(tmp_path)


def test_to_rgb_converts_modes():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    gray16 = Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16))  # 1000 / 65535 of full scale
    assert to_rgb(gray16).getpixel((0, 0)) == (4, 4, 4)
    assert to_rgb(Image.new("CMYK", (4, 4))).mode == "RGB"


def test_views_have_the_right_shape_and_are_seeded():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    center = CenterView(256, 224)(image)
    assert center.shape == (3, 224, 224) and center.dtype.is_floating_point is False
    crop = RandomResizedCropFlip(224)
    a = crop(image, np.random.default_rng(1))
    b = crop(image, np.random.default_rng(1))
    assert a.shape == (3, 224, 224) and bool((a == b).all())
    small = CenterView(32, 32)(Image.new("RGB", (8, 8)))
    assert small.shape == (3, 32, 32)


def test_builtin_digits():
    source = load_digits_source()
    assert len(source) == 1797 and source.n_classes == 10
    assert source.load(0).size == (8, 8)


def test_classes_are_the_top_level_folders_at_any_depth(tmp_path):
    """One rule everywhere: deeper files belong to their top-level class folder (was: one
    nested file turned the labels off); a file at the top, or a single class, gives none,
    and the source says why."""
    for name in ("cat/a.png", "cat/nested/deeper/b.png", "dog/c.png", "dog/puppies/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    source = FolderSource(tmp_path)
    assert source.class_names == ["cat", "dog"] and source.labels.tolist() == [0, 0, 1, 1]
    assert source.unlabelled is None
    stored = FolderSource(tmp_path, files=["dog/puppies/d.png", "cat/nested/deeper/b.png"])  # a run's list
    assert stored.labels.tolist() == [1, 0]
    Image.new("RGB", (8, 8), "red").save(tmp_path / "loose.png")
    loose = FolderSource(tmp_path)
    assert loose.labels is None and "1 image(s) lie directly in the folder" in loose.unlabelled
    assert "'loose.png'" in loose.unlabelled
    single = FolderSource(tmp_path / "cat" / "nested")  # only deeper/b.png
    assert single.labels is None and "single class" in single.unlabelled
