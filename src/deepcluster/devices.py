"""Where tensors go: the one resolution of ``auto``, ``cpu``, ``cuda`` and ``cuda:N``."""

from __future__ import annotations

import torch

from deepcluster.config import ConfigError


def resolve_device(name: str | torch.device, what: str = "setting 'device'") -> torch.device:
    """``auto`` is the first CUDA GPU when one is present, else the CPU.

    Args:
        name: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (or a ``torch.device``).
        what: how the error names the setting.

    Raises:
        ConfigError: a CUDA device is asked for but none is available.
    """
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} is {str(name)!r} but no CUDA GPU is available; use cpu or auto")
    return device


__all__ = ["resolve_device"]
