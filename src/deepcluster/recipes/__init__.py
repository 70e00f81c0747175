"""The recipes: named sets of settings, one YAML file each, shipped in the package.

Each file holds ``provenance`` (one line: where its values come from), ``about`` (one line
for ``deepcluster recipes``) and ``settings`` (a mapping of setting: value, read as a
``--config`` file is). ``deepcluster.config`` checks and applies them; this module only
reads the files.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

# The order ``deepcluster recipes`` lists them in.
NAMES = ("paper", "photo", "small", "digits", "v2-imagenet", "v2-cifar", "v2-small")
KEYS = {"provenance", "about", "settings"}


def read(name: str) -> dict[str, Any]:
    """The contents of recipe ``name``'s file, its shape checked (not its settings).

    Raises:
        ValueError: the file is not a mapping of exactly ``KEYS`` with a mapping of settings.
    """
    text = resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    content = yaml.safe_load(text)
    if not isinstance(content, dict) or set(content) != KEYS or not isinstance(content["settings"], dict):
        raise ValueError(f"recipe file {name}.yaml must hold exactly {', '.join(sorted(KEYS))}, with settings a "
                         "mapping of setting: value")
    return content


__all__ = ["KEYS", "NAMES", "read"]
