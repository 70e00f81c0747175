"""One source of defaults: the run configuration, its recipes, and how users override it.

Precedence, lowest first: the dataclass defaults (the paper's ImageNet settings), the
chosen recipe (``deepcluster/recipes/NAME.yaml``), a YAML file, ``--key value`` pairs on the
command line. Unknown keys are an error that names them; the resolved configuration is
written into the run folder and into every checkpoint.

Every setting belongs to one section (``SECTIONS``); the ``v1`` and ``v2`` sections hold
what only that method reads, and a setting of the other method's section given explicitly
(command line, file, ``overrides``) is refused rather than silently ignored. Settings the
measurements retired (``RETIRED``) are converted or refused with one line.

The code lives in ``deepcluster.settings``, one module per responsibility; this module is
their public face.
"""

from __future__ import annotations

from deepcluster.settings.checks import (COUNT_LIMITS, MAX_COUNT, MAX_IMAGE_SIDE, MAX_INT, MAX_THREADS,
                                         SECTION_CHECKS, V1_ONLY, V2_ONLY, validate, validate_v2)
from deepcluster.settings.recipes import (RECIPE_ABOUT, RECIPE_PROVENANCE, RECIPES, config_text, load_recipe,
                                          recipe_line)
from deepcluster.settings.resolve import (DIGITS_OUT_DIR, RESUMABLE, check_unchanged, default_recipe, from_dict,
                                          resolve, resolve_resume, run_folder)
from deepcluster.settings.retired import RETIRED
from deepcluster.settings.schema import (CHOICES, FIELDS, METHOD_SECTIONS, SECTIONS, Config, ConfigError, setting,
                                         settings_help)
from deepcluster.settings.sources import (MAX_CONFIG_BYTES, apply_overrides, load_yaml, refuse_other_method,
                                          section_of)
from deepcluster.settings.values import FOLDER_SETTINGS, TYPES, SettingType, coerce, short_repr

__all__ = ["CHOICES", "COUNT_LIMITS", "Config", "ConfigError", "DIGITS_OUT_DIR", "FIELDS", "FOLDER_SETTINGS",
           "MAX_CONFIG_BYTES", "MAX_COUNT", "MAX_IMAGE_SIDE", "MAX_INT", "MAX_THREADS", "METHOD_SECTIONS", "RECIPES",
           "RECIPE_ABOUT", "RECIPE_PROVENANCE", "RESUMABLE", "RETIRED", "SECTIONS", "SECTION_CHECKS", "SettingType",
           "TYPES", "V1_ONLY", "V2_ONLY", "apply_overrides", "check_unchanged", "coerce", "config_text",
           "default_recipe", "from_dict", "load_recipe", "load_yaml", "recipe_line", "refuse_other_method", "resolve",
           "resolve_resume", "run_folder", "section_of", "setting", "settings_help", "short_repr", "validate",
           "validate_v2"]
