"""DeepCluster-v2 and the size of the folder (``deepcluster.settings.v2_sizing``): from 50,000
images on the recipe's sizes stay; below, a v2 run is refused in one line unless the user pins
prototypes and batch; v1 runs are untouched."""

from __future__ import annotations

import pytest

from deepcluster.autorecipe import choose
from deepcluster.settings.schema import ConfigError
from deepcluster.settings.v2_sizing import MIN_IMAGES, check_size, refusal


@pytest.mark.parametrize("n_images", [MIN_IMAGES, 100_000, 1_281_167])
def test_from_fifty_thousand_images_a_v2_run_keeps_its_recipe(n_images):
    assert MIN_IMAGES == 50_000  # CIFAR-10's training set, where v2-small was measured to learn
    check_size(n_images, {})  # nothing raised, nothing changed


@pytest.mark.parametrize("given", [{}, {"prototypes": "100,100,100"}, {"batch_size": 64}, {"lr": 0.06}])
def test_a_smaller_folder_is_refused_in_one_line_unless_prototypes_and_batch_are_pinned(given):
    with pytest.raises(ConfigError) as caught:
        check_size(MIN_IMAGES - 1, given)
    line = str(caught.value)
    assert line == refusal(MIN_IMAGES - 1) and "\n" not in line and "49,999 images" in line
    assert "--recipe small" in line and "--prototypes" in line and "--batch_size" in line
    check_size(30, {"prototypes": "5,4", "batch_size": 8})  # the user sizes it


def test_the_v2_fixture_settings_are_left_alone(tmp_path):
    """The fixture's command line pins prototypes and batch on 30 images: its settings stay
    as stated, nothing is said."""
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


def test_a_training_command_on_a_small_folder_is_refused_and_v1_is_not(tmp_path):
    data = _folder(tmp_path / "images", 240)
    with pytest.raises(ConfigError, match="240 images, too few for DeepCluster-v2"):
        choose("v2-small", None, {"data": str(data)}, say=None)
    with pytest.raises(ConfigError, match="too few for DeepCluster-v2"):
        choose("small", None, {"data": str(data), "method": "v2"}, say=None)
    assert "prototypes" not in choose("small", None, {"data": str(data)}, say=None)[1]  # v1: untouched


def test_the_command_line_refuses_with_exit_code_2(tmp_path):
    import subprocess
    import sys

    data = _folder(tmp_path / "images", 40)
    done = subprocess.run([sys.executable, "-m", "deepcluster", "train", "--recipe", "v2-small", "--data", str(data),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 2 and "too few for DeepCluster-v2" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
