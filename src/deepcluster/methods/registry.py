"""The methods a run can train with, by the name of the setting ``method``."""

from __future__ import annotations

from deepcluster.methods import Method, v1, v2

METHODS: dict[str, Method] = {"v1": v1.METHOD, "v2": v2.METHOD}

__all__ = ["METHODS"]
