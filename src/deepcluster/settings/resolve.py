"""The settings of a run: from a recipe, a file and the command line (``resolve``), or a
resumed run's saved ones with what may change on top (``resolve_resume``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from deepcluster.settings.checks import validate
from deepcluster.settings.recipes import RECIPES
from deepcluster.settings.retired import convert, converted_keys
from deepcluster.settings.schema import Config, ConfigError
from deepcluster.settings.sources import apply_overrides, load_yaml, refuse_other_method
from deepcluster.settings.values import coerce, short_repr


def default_recipe(data: str | None) -> str:
    """The recipe used when none is named: ``digits`` for the built-in digits (no data
    folder), ``paper`` for a folder of images."""
    return "paper" if data is not None else "digits"


DIGITS_OUT_DIR = "runs/digits"  # default run folder of the built-in digits (``out_dir`` otherwise)


def _read_given(recipe: str | None, config_file: str | Path | None,
                overrides: dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """The recipe named (``recipe``, else the file's ``recipe:``; checked) and every setting
    stated by the file and the overrides, the overrides winning (retired settings converted)."""
    from_file = load_yaml(config_file) if config_file is not None else {}
    file_recipe = from_file.pop("recipe", None)
    for name in (recipe, file_recipe):  # a bad recipe in the file is an error even when overridden
        if name is not None and (not isinstance(name, str) or name not in RECIPES):
            raise ConfigError(f"unknown recipe {short_repr(name)}; choose one of: {', '.join(RECIPES)}")
    return recipe or file_recipe, convert({**from_file, **(overrides or {})})


def run_folder(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> str:
    """The run folder a command line names: its ``out_dir``, else the default for its data
    (``runs/digits`` for the built-in digits, ``runs/deepcluster`` for a folder)."""
    _, given = _read_given(None, config_file, overrides)
    if "out_dir" in given:
        return str(coerce("out_dir", given["out_dir"]))
    data = coerce("data", given["data"]) if "data" in given else None
    return Config.out_dir if data is not None else DIGITS_OUT_DIR


def resolve(recipe: str | None = None, config_file: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated ``Config`` from a recipe, a YAML file and explicit overrides.

    The recipe is ``recipe``, else the file's own ``recipe:``, else ``default_recipe`` of the
    data folder the file or the overrides name (``digits`` without one, ``paper`` with one).
    Without an ``out_dir`` anywhere, a run on the built-in digits goes to ``runs/digits``.
    """
    named, given = _read_given(recipe, config_file, overrides)
    data = coerce("data", given["data"]) if "data" in given else None
    config = apply_overrides(Config(), RECIPES[named or default_recipe(data)])
    config = apply_overrides(config, given)
    refuse_other_method(config, given, converted_keys(overrides or {}))
    if config.data is None and "out_dir" not in given:
        config.out_dir = DIGITS_OUT_DIR
    return validate(config)


# Settings a resumed run may change: they do not alter what the run computes (or, for
# epochs and the final clustering, only how far it goes).
RESUMABLE = frozenset({"epochs", "workers", "threads", "device", "clustering_device", "feature_batch_size", "out_dir",
                       "tensorboard", "final_clustering", "val", "val_every", "knn_body", "sync_batchnorm",
                       "keep_freed_memory", "stop_on_collapse"})


def check_unchanged(saved: Config, config: Config) -> None:
    """Raise ``ConfigError`` naming every setting outside ``RESUMABLE`` that differs."""
    old, new = saved.to_dict(), config.to_dict()
    changed = [key for key in new if key not in RESUMABLE and old.get(key) != new[key]]
    if changed:
        details = ", ".join(f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in changed)
        raise ConfigError(f"cannot resume with different settings ({details}); only {', '.join(sorted(RESUMABLE))} "
                          "may change")


def resolve_resume(saved: dict[str, Any], run_dir: str | Path, recipe: str | None = None,
                   config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The settings of a resumed run: the run's saved ones (``RUN/config.yaml``), with what
    the command line states explicitly (a recipe, a file, overrides, in that order) applied
    on top; anything outside ``RESUMABLE`` that this changes is refused.

    Raises:
        ConfigError: the saved settings are invalid, or an explicit setting changes one that
            must stay.
    """
    try:
        base = dataclasses.replace(from_dict(saved), out_dir=str(run_dir))
    except ConfigError as error:
        raise ConfigError(f"the saved settings of {str(run_dir)!r} are invalid ({error})") from None
    named, given = _read_given(recipe, config_file, overrides)
    config = apply_overrides(base, RECIPES[named] if named else {})
    config = apply_overrides(config, {**given, "out_dir": str(run_dir)})
    refuse_other_method(config, given, converted_keys(overrides or {}))
    if config.precision == "auto":  # the run resolved auto when it started: keep what it chose
        config = dataclasses.replace(config, precision=base.precision)
    config = validate(config)
    check_unchanged(base, config)
    return config


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a ``Config`` saved with ``to_dict`` (e.g. from a checkpoint)."""
    return validate(apply_overrides(Config(), values))


__all__ = ["DIGITS_OUT_DIR", "RESUMABLE", "check_unchanged", "default_recipe", "from_dict", "resolve",
           "resolve_resume", "run_folder"]
