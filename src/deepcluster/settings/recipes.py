"""The recipes (named sets of settings over the defaults, one YAML file each in
``deepcluster/recipes``) and the settings as text: a recipe's line, a run's ``config.yaml``."""

from __future__ import annotations

from typing import Any

import yaml

from deepcluster import recipes as recipe_files
from deepcluster.settings.checks import validate
from deepcluster.settings.retired import convert
from deepcluster.settings.schema import Config, ConfigError
from deepcluster.settings.sources import apply_overrides, refuse_other_method
from deepcluster.settings.values import coerce


def load_recipe(name: str) -> tuple[dict[str, Any], str, str]:
    """Recipe ``name`` from its file (``deepcluster/recipes/NAME.yaml``): its settings, checked
    as a ``--config`` file's are (known keys, values of their type, only its own method's
    section, a valid whole), its line for ``deepcluster recipes`` and its provenance.

    Raises:
        ConfigError: the file cannot be read or holds a bad setting.
    """
    try:
        content = recipe_files.read(name)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"recipe {name!r} cannot be read ({error})") from None
    settings = {key: coerce(key, value) for key, value in convert(content["settings"]).items()}
    config = apply_overrides(Config(), settings)
    refuse_other_method(config, settings, settings)
    validate(config)
    return settings, str(content["about"]), str(content["provenance"])


def recipe_line(name: str) -> str:
    """``name``, what it is for, and its main settings, on one line."""
    config = apply_overrides(Config(), RECIPES[name])
    clusters = (f"prototypes {','.join(map(str, config.prototypes))}" if config.method == "v2"
                else f"k={config.n_clusters}" if "n_clusters" in RECIPES[name] or name == "paper"
                else "k from the folder")
    return (f"{name:<12} {RECIPE_ABOUT.get(name, '')} ({config.method}, {config.arch}"
            f"{' + sobel' if config.sobel else ''}, {config.crop} px, {clusters}, {config.epochs} epochs)")


def config_text(config: Config, recipe: str | None = None) -> str:
    """The settings as the YAML a run saves (``RUN/config.yaml``); with ``recipe``, the keys
    that recipe sets are marked ``# recipe NAME`` and those set otherwise (a file, the command
    line) ``# set``."""
    marked = set(RECIPES.get(recipe or "", {}))
    base = apply_overrides(Config(), RECIPES[recipe]).to_dict() if recipe in RECIPES else None
    lines = []
    for key, value in config.to_dict().items():
        text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=True, width=10**6).strip()
        text = text[1:-1] if text.startswith("{") else text  # one line: key: value
        if base is not None and value != base[key]:
            text += "  # set"
        elif key in marked:
            text += f"  # recipe {recipe}"
        lines.append(text)
    return "\n".join(lines)


# The recipes, read once from their files.
_LOADED = {name: load_recipe(name) for name in recipe_files.NAMES}
RECIPES: dict[str, dict[str, Any]] = {name: loaded[0] for name, loaded in _LOADED.items()}
RECIPE_ABOUT: dict[str, str] = {name: loaded[1] for name, loaded in _LOADED.items()}  # one line each
RECIPE_PROVENANCE: dict[str, str] = {name: loaded[2] for name, loaded in _LOADED.items()}


__all__ = ["RECIPES", "RECIPE_ABOUT", "RECIPE_PROVENANCE", "config_text", "load_recipe", "recipe_line"]
