"""Settings the measurements retired, and what older settings that name them become.

A run folder's ``config.yaml``, a checkpoint, a ``--config`` file or a ``--set`` list written
before may still hold them. ``convert`` turns what keeps a meaning today into today's
settings (a value that was the default is dropped; ``kmeans_init: previous`` with
``head_reset: false`` becomes ``carry_clusters: true``) and refuses the rest with one line
that says what to write instead.
"""

from __future__ import annotations

from typing import Any

from deepcluster.settings.schema import ConfigError
from deepcluster.settings.values import SettingType, short_repr

# Retired setting -> why, on one line.
RETIRED: dict[str, str] = {
    "head_init": "its centroids head (a nearest-cluster-mean classifier) collapsed the clustering and no recipe "
                 "used it; every new head is drawn from N(0, 0.01), the old head_init random",
    "width": "a wider small net gained nothing measured; smallnet has its one width, the old width 1",
    "depth": "a deeper small net gained nothing measured; smallnet has its one depth, the old depth 1",
    "head_reset": "replaced by carry_clusters: kmeans_init previous with head_reset false is now carry_clusters "
                  "true",
}
# The retired settings whose one value left is today's behaviour: at it they are dropped.
HARMLESS: dict[str, Any] = {"head_init": "random", "width": 1, "depth": 1}
# Retired setting -> the setting that took over its meaning.
RENAMED = {"head_reset": "carry_clusters"}

CARRY = ("set carry_clusters: true instead (each k-means starts from last epoch's means and the head is kept, "
         "what kmeans_init previous with head_reset false did)")


def _parse(key: str, value: Any, kind: type) -> Any:
    """``value`` read as the retired setting's type, or ``ConfigError`` as ``coerce`` says it."""
    setting_type = SettingType(kind)
    try:
        return setting_type.parse(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"setting {key!r} must be {setting_type.describe()}, got {short_repr(value)}") from None


def _drop_harmless(values: dict[str, Any]) -> None:
    for key, harmless in HARMLESS.items():
        if key in values and _parse(key, values.pop(key), type(harmless)) != harmless:
            raise ConfigError(f"setting {key!r} was removed ({RETIRED[key]}); leave it out")


def _convert_carry(values: dict[str, Any]) -> None:
    """``kmeans_init: previous`` and ``head_reset`` -> ``carry_clusters``, in place."""
    previous = values.get("kmeans_init") == "previous"
    if "head_reset" not in values:
        if previous:
            raise ConfigError(f"setting 'kmeans_init' previous was retired; {CARRY}")
        return
    if "carry_clusters" in values:
        raise ConfigError("settings 'head_reset' and 'carry_clusters' are both given; head_reset was replaced by "
                          "carry_clusters: leave head_reset out")
    keep_head = not _parse("head_reset", values.pop("head_reset"), bool)
    if keep_head and "kmeans_init" in values and not previous:
        raise ConfigError(f"setting 'head_reset' false needs kmeans_init previous, and both were retired; {CARRY}")
    if previous and not keep_head:
        raise ConfigError("setting 'kmeans_init' previous with head_reset true (a new head every epoch) was "
                          "retired; set carry_clusters: true, which also keeps the head, or leave kmeans_init out")
    if previous:
        values["kmeans_init"] = "random"  # what the first epoch, with no last epoch to start from, used
    values["carry_clusters"] = keep_head


def convert(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (setting: value, as given) with the retired settings converted (a copy when
    anything changed).

    Raises:
        ConfigError: a retired setting at a value that has no meaning today; the one line
            says what to write instead.
    """
    if not any(key in values for key in RETIRED) and values.get("kmeans_init") != "previous":
        return values
    values = dict(values)
    _drop_harmless(values)
    _convert_carry(values)
    return values


def converted_keys(keys: Any) -> set[str]:
    """The settings that ``keys`` (names as given, retired ones included) stand for today."""
    return {RENAMED.get(key, key) for key in keys if key not in HARMLESS}


__all__ = ["HARMLESS", "RENAMED", "RETIRED", "convert", "converted_keys"]
