"""DeepCluster-v2 sized to the folder (``deepcluster.settings.v2_sizing``): the rule's values
for several folder sizes, pinned values winning, the refusal below the smallest folder
measured, and the one line a training command says."""

from __future__ import annotations

import pytest

from deepcluster.autorecipe import choose
from deepcluster.settings.recipes import RECIPES
from deepcluster.settings.schema import ConfigError
from deepcluster.settings.v2_sizing import MIN_IMAGES, refusal, size_v2

SMALL = RECIPES["v2-small"]


@pytest.mark.parametrize("n_images, prototypes, batch", [
    (2_000, 40, 64),
    (5_000, 100, 128),
    (10_000, 200, 256),
    (19_999, 399, 256),
])
def test_the_rule_for_several_folder_sizes(n_images, prototypes, batch):
    sized, line = size_v2(n_images, SMALL, {})
    expected = {"prototypes": (prototypes,) * 3, "batch_size": batch, "lr": 0.06, "temperature": 0.2}
    assert sized == {key: value for key, value in expected.items() if value != SMALL[key]}
    assert line.startswith(f"v2 sized to {n_images:,} images: prototypes {prototypes},{prototypes},{prototypes}")
    assert "lr 0.06, temperature 0.2 (" in line and "pinned values win" in line


@pytest.mark.parametrize("recipe", ["v2-small", "v2-cifar", "v2-imagenet"])
def test_from_twenty_thousand_images_the_recipe_sizes_stay(recipe):
    assert size_v2(20_000, RECIPES[recipe], {}) == ({}, None)
    assert size_v2(1_281_167, RECIPES[recipe], {}) == ({}, None)


def test_pinned_values_win_and_are_not_named():
    sized, line = size_v2(2_000, SMALL, {"prototypes": "7,7", "lr": "0.3"})
    assert sized == {"batch_size": 64, "temperature": 0.2}
    assert "prototypes" not in line.split("(")[0] and "lr" not in line.split("(")[0]
    pinned = {"prototypes": "7,7", "batch_size": 128, "lr": 1, "temperature": 0.1}
    assert size_v2(2_000, SMALL, pinned) == ({}, None)


def test_a_folder_too_small_is_refused_in_one_line_unless_prototypes_and_batch_are_pinned():
    with pytest.raises(ConfigError) as caught:
        size_v2(MIN_IMAGES - 1, SMALL, {"prototypes": "5"})
    assert str(caught.value) == refusal(MIN_IMAGES - 1) and "\n" not in str(caught.value)
    assert "--recipe small" in str(caught.value) and "--prototypes" in str(caught.value)
    assert size_v2(30, SMALL, {"prototypes": "5,4", "batch_size": 8}) == ({}, None)  # the user sizes it


def test_the_v2_fixture_settings_are_left_alone(tmp_path):
    """The fixture's command line pins prototypes and batch on 30 images, fewer than the rule
    sizes: its settings stay as stated (temperature and all), nothing is said."""
    from test_v2_fixture import SETTINGS

    (tmp_path / "images" / "a").mkdir(parents=True)
    said = []
    overrides = {"data": str(tmp_path / "images"), "prototypes": "5,4", "batch_size": "8", "lr": "0.3"}
    assert choose("v2-small", None, overrides, say=said.append) == ("v2-small", overrides)
    assert said == [] and {"--prototypes", "--batch_size"} <= set(SETTINGS)


def _folder(root, n_images):
    from PIL import Image

    (root / "a").mkdir(parents=True)
    image = Image.new("RGB", (8, 8))
    for index in range(n_images):
        image.save(root / "a" / f"{index:04d}.png")
    return root


def test_a_training_command_says_the_sizes_in_one_line(tmp_path):
    data = _folder(tmp_path / "images", 2_400)
    said = []
    recipe, overrides = choose("v2-small", None, {"data": str(data), "batch_size": "64"}, say=said.append)
    assert recipe == "v2-small" and overrides["prototypes"] == (48, 48, 48) and overrides["batch_size"] == "64"
    assert overrides["lr"] == 0.06 and len(said) == 1
    assert said[0].startswith("v2 sized to 2,400 images: prototypes 48,48,48, lr 0.06, temperature 0.2 (")
    with pytest.raises(ConfigError, match="too few for DeepCluster-v2"):
        choose("v2-small", None, {"data": str(_folder(tmp_path / "few", 40))}, say=said.append)
    assert "prototypes" not in choose("small", None, {"data": str(data)}, say=None)[1]  # v1: untouched
