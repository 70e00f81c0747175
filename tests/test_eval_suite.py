import shutil

import numpy as np
import pytest

from deepcluster.config import ConfigError
from deepcluster.data import DataError
from deepcluster.evaluation.suite import EvalSettings, check_settings, open_labelled_splits


def copy_classes(source, target, names):
    target.mkdir()
    for name in names:
        shutil.copytree(source / name, target / name)
    return target


def test_validation_classes_are_numbered_as_in_the_training_split(image_folder, tmp_path):
    val = copy_classes(image_folder, tmp_path / "val", ["rings", "stripes"])  # no "checkers"
    splits = open_labelled_splits(image_folder, val)
    assert splits.class_names == ["checkers", "rings", "stripes"]
    assert sorted(set(splits.val_labels.tolist())) == [1, 2]
    assert len(splits.val) == 24 and len(splits.train) == 36


def test_limits_draw_a_seeded_subset_with_its_labels(image_folder):
    a = open_labelled_splits(image_folder, image_folder, train_limit=10, val_limit=5, seed=3)
    b = open_labelled_splits(image_folder, image_folder, train_limit=10, val_limit=5, seed=3)
    assert len(a.train) == 10 and len(a.val) == 5
    assert np.array_equal(a.train_labels, b.train_labels)
    assert [a.train.name(i) for i in range(10)] == [b.train.name(i) for i in range(10)]
    # Each kept image keeps its own class: the folder name is in its path.
    for i in range(10):
        assert a.class_names[a.train_labels[i]] in a.train.name(i)


def test_unknown_validation_class_is_a_data_error(image_folder, tmp_path):
    train = copy_classes(image_folder, tmp_path / "train", ["rings", "stripes"])
    with pytest.raises(DataError, match="checkers"):
        open_labelled_splits(train, image_folder)


@pytest.mark.parametrize("bad, message", [
    (dict(protocols=("knn", "magic")), "unknown protocol"), (dict(probe_mode="slow"), "probe mode 'slow'"),
    (dict(knn_k=0), "knn k must be a positive integer"), (dict(knn_temperature=0.0), "knn temperature must be positive"),
    (dict(retrieval_ks=(0,)), "retrieval cut-offs must be positive"), (dict(feature_layers=()), "at least one feature layer")])
def test_bad_settings_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(EvalSettings(**bad))


def test_probes_read_a_memory_mapped_layer_in_place_without_changing_it(tmp_path):
    from deepcluster.evaluation.features import ExtractedFeatures
    from deepcluster.evaluation.linear_probe import ProbeSettings, train_linear_probe
    from deepcluster.evaluation.suite import SplitFeatures

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    values = (rng.normal(size=(300, 16)) + labels[:, None]).astype(np.float32)
    stored = np.lib.format.open_memmap(tmp_path / "train_conv1.npy", mode="w+", dtype=np.float32, shape=values.shape)
    stored[:] = values
    stored.flush()
    everything = SplitFeatures(ExtractedFeatures({"conv1": stored}, np.ones(300, dtype=bool), 0.0), labels)
    x, y = everything.layer("conv1", copy=False)
    assert x is stored and y is labels  # no copy of the layer at all
    copied, _ = everything.layer("conv1")
    assert not np.shares_memory(copied, stored) and np.array_equal(copied, values)

    settings = ProbeSettings(epochs=3, batch_size=32)
    in_place = train_linear_probe(x, y, x[:100], y[:100], 3, settings)
    in_ram = train_linear_probe(values, labels, values[:100], labels[:100], 3, settings)
    assert in_place.history == in_ram.history
    assert np.array_equal(np.load(tmp_path / "train_conv1.npy"), values)  # the probe never wrote into the file

    ok = np.ones(300, dtype=bool)
    ok[[5, 17]] = False  # two unreadable images: their rows are left out, in one copy
    some = SplitFeatures(ExtractedFeatures({"conv1": stored}, ok, 0.0), labels)
    x, y = some.layer("conv1", copy=False)
    assert len(x) == 298 and not np.shares_memory(x, stored) and np.array_equal(y, labels[ok])
