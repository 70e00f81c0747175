"""Retired settings: old settings (a run folder's config.yaml, a checkpoint, a --config file, a
--set list) that keep a meaning load converted; the rest are refused in one line that says what
to write instead. Also: the checks are one function per section."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from deepcluster import recipes as recipe_files
from deepcluster.config import (FIELDS, RETIRED, SECTION_CHECKS, SECTIONS, Config, ConfigError, coerce, from_dict,
                                load_recipe, resolve)
from deepcluster.settings.retired import convert

FIXTURES = Path(__file__).parent / "fixtures"


def old_settings(**changes) -> dict:
    """A v1 run's config.yaml as written before the retirements, with ``changes``."""
    settings = yaml.safe_load((FIXTURES / "config_v1_before_sections.yaml").read_text())
    return {**settings, "data": None, "out_dir": "run", **changes}


def refusal(message: str, **overrides) -> str:
    with pytest.raises(ConfigError, match=message) as error:
        resolve("paper", overrides=overrides)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_the_metadata_keys_of_every_setting_stay_help_and_section():
    assert all(set(item.metadata) == {"help", "section"} for item in dataclasses.fields(Config))
    assert not set(RETIRED) & set(FIELDS)


def test_each_section_has_its_own_check_and_validate_runs_them_all():
    assert list(SECTION_CHECKS) == list(SECTIONS)
    with pytest.raises(ConfigError, match="'blur_prob' must be in"):
        resolve("v2-small", overrides={"blur_prob": 2})
    with pytest.raises(ConfigError, match="'val_every' must be a positive integer"):
        resolve("paper", overrides={"val_every": 0})


def test_an_old_config_yaml_at_the_retired_defaults_loads():
    config = from_dict(old_settings())  # width 1, depth 1, head_init random, head_reset true
    assert config.carry_clusters is False and config.kmeans_init == "random"
    assert not hasattr(config, "width") and not hasattr(config, "depth")


def test_the_old_pair_previous_and_a_kept_head_becomes_carry_clusters():
    config = from_dict(old_settings(kmeans_init="previous", head_reset=False))
    assert config.carry_clusters is True and config.kmeans_init == "random"
    # as --set or --config gives them: strings
    config = resolve("paper", overrides={"kmeans_init": "previous", "head_reset": "false"})
    assert config.carry_clusters is True and config.kmeans_init == "random"
    assert resolve("small", overrides={"head_reset": "true"}).carry_clusters is False
    assert resolve("paper", overrides={"head_reset": "false"}).carry_clusters is True


@pytest.mark.parametrize("overrides, message", [
    ({"kmeans_init": "previous"}, "'kmeans_init' previous was retired; set carry_clusters: true instead"),
    ({"kmeans_init": "previous", "head_reset": True}, "previous with head_reset true .* was retired; set "
                                                      "carry_clusters: true"),
    ({"kmeans_init": "kmeans++", "head_reset": False}, "'head_reset' false needs kmeans_init previous, and both were "
                                                       "retired; set carry_clusters: true instead"),
    ({"head_reset": False, "carry_clusters": True}, "'head_reset' and 'carry_clusters' are both given"),
    ({"head_reset": "maybe"}, "setting 'head_reset' must be true or false, got 'maybe'"),
    ({"head_init": "centroids"}, "setting 'head_init' was removed \\(its centroids head .*\\); leave it out"),
    ({"width": 2}, "setting 'width' was removed \\(a wider small net gained nothing measured; .*\\); leave it out"),
    ({"depth": "3"}, "setting 'depth' was removed \\(a deeper small net"),
    ({"width": "wide"}, "setting 'width' must be an integer, got 'wide'"),
])
def test_a_retired_setting_without_a_meaning_today_is_refused_in_one_line(overrides, message):
    refusal(message, **overrides)


def test_a_retired_setting_read_on_its_own_says_what_replaced_it():
    with pytest.raises(ConfigError, match="^setting 'head_reset' was removed \\(replaced by carry_clusters: "):
        coerce("head_reset", "false")


def test_retired_settings_at_their_one_value_left_are_dropped():
    assert resolve("small", overrides={"width": "1", "depth": 1, "head_init": "random"}) == resolve("small")
    assert convert({"lr": 0.1}) == {"lr": 0.1}


def test_a_saved_config_with_a_retired_value_is_refused_naming_it():
    with pytest.raises(ConfigError, match="'head_init' was removed"):
        from_dict(old_settings(head_init="centroids"))


def test_a_v2_run_refuses_the_old_pair_as_the_v1_setting_it_became():
    for overrides in ({"kmeans_init": "previous", "head_reset": "false"}, {"head_reset": "false"}):
        with pytest.raises(ConfigError, match="' is a v1 setting; this run is v2"):
            resolve("v2-small", overrides=overrides)
    old = yaml.safe_load((FIXTURES / "config_v2_before_sections.yaml").read_text())
    assert from_dict({**old, "data": None, "out_dir": "run"}).method == "v2"


def test_a_recipe_file_with_the_old_pair_reads_converted(monkeypatch):
    monkeypatch.setattr(recipe_files, "read", lambda name: {"provenance": "x", "about": "x", "settings": {
        "arch": "smallnet", "crop": 32, "resize": 32, "kmeans_init": "previous", "head_reset": False}})
    settings, _, _ = load_recipe("small")
    assert settings["carry_clusters"] is True and "head_reset" not in settings


def test_the_recipes_that_kept_their_head_carry_their_clusters():
    for name in ("small", "digits"):
        assert resolve(name).carry_clusters is True and resolve(name).kmeans_init == "random"
    assert resolve("paper").carry_clusters is False


def test_an_old_run_folder_that_kept_its_head_resumes_bit_identically(cli, run_cli, image_folder, tmp_path):
    """A run folder written with kmeans_init previous, head_reset false (and the retired
    settings at their defaults) resumes as carry_clusters, to the numbers of a run that was
    never stopped."""
    settings = ("--carry_clusters", "true", "--epochs", "2")
    code, _, err = cli("train", "--data", image_folder, "--out", tmp_path / "full", *settings)
    assert code == 0, err
    code, _, err = cli("train", "--data", image_folder, "--out", tmp_path / "cut", *settings[:-1], "1")
    assert code == 0, err
    path = tmp_path / "cut" / "config.yaml"
    lines = [line for line in path.read_text().splitlines() if not line.startswith("kmeans_init:")]
    text = "\n".join(lines).replace("carry_clusters: true", "kmeans_init: previous\nhead_reset: false")
    path.write_text(text + "\nwidth: 1\ndepth: 1\nhead_init: random\n")
    code, _, err = run_cli("train", "--out", tmp_path / "cut", "--resume", "--epochs", "2")  # as a user types it
    assert code == 0, err
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    assert all(torch.equal(full["head"][k], cut["head"][k]) for k in full["head"])
    assert torch.equal(full["assignments"], cut["assignments"])


def test_an_old_run_folder_with_a_wider_small_net_is_refused_in_one_line(cli, run_cli, image_folder, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "1")
    assert code == 0, err
    path = run / "config.yaml"
    path.write_text(path.read_text() + "width: 2\n")
    code, _, err = run_cli("train", "--out", run, "--resume", "--epochs", "2")
    assert code == 2 and err.count("\n") == 1 and "'width' was removed" in err, err


def test_a_retired_flag_on_the_command_line_is_converted_or_refused_in_one_line(capsys):
    from deepcluster.cli import main

    assert main(["train", "--head_reset", "true", "--epochs", "1", "--print-config"]) == 0
    assert "carry_clusters: false  # set" in capsys.readouterr().out
    assert main(["train", "--kmeans_init", "previous", "--epochs", "1", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "set carry_clusters: true instead" in err, err
