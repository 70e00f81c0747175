"""``init``: start a run (or judge a baseline) from weights you already have.

Accepted files, all read without running code (``torch.load(weights_only=True)`` or
safetensors) and never downloaded:

- a ResNet-18 / ResNet-50 state dict in torchvision's layout and names (what
  ``torchvision.models.resnet50(weights=...).state_dict()`` saved with ``torch.save`` or
  ``safetensors.torch.save_file`` holds); its ``fc`` classifier is left out;
- a state dict in this package's own names (any architecture);
- a checkpoint of this package (``RUN/checkpoint.pt``: its backbone) or an export
  (``deepcluster export``).

A file that does not fit the run's network is refused with one line naming the first
mismatching key and its shape.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deepcluster.checkpoint import CheckpointError, load_checkpoint
from deepcluster.models.torchvision_layout import from_torchvision, is_torchvision_layout, shape_text


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def read_init_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of an ``init`` file and what kind of file it was.

    Raises:
        CheckpointError: missing, unreadable, or holding no mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"init file {str(path)!r} does not exist (give a .safetensors file, a saved state "
                              "dict, a run's checkpoint.pt or a deepcluster export)")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then its JSON header
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "safetensors file"
        except Exception as error:  # noqa: BLE001 - any parse failure means the same to the user
            raise CheckpointError(f"init file {str(path)!r} is not a readable safetensors file "
                                  f"({_first_line(error)})") from None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"init file {str(path)!r} cannot be loaded safely: it is neither safetensors nor a "
                              f"PyTorch file of plain tensors ({_first_line(error)})") from None
    if isinstance(content, dict) and "format_version" in content and "model" in content:
        return load_checkpoint(path)["model"], "deepcluster checkpoint"
    if isinstance(content, dict) and not _is_tensor_dict(content) and _is_tensor_dict(content.get("state_dict")):
        content = content["state_dict"]
    if not _is_tensor_dict(content):
        raise CheckpointError(f"init file {str(path)!r} holds no mapping of parameter names to tensors (save a "
                              "model's state_dict())")
    return content, "state dict"


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names saved from ``DataParallel`` / DDP (``module.conv1.weight``) without the prefix."""
    if all(key.startswith("module.") for key in tensors):
        return {key[len("module."):]: value for key, value in tensors.items()}
    return tensors


def _own_layout(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> str | None:
    """The first difference between ``tensors`` and ``model``'s own names and shapes."""
    state = model.state_dict()
    for name, tensor in state.items():
        if name not in tensors:
            return f"key {name!r} is missing (the model expects shape {shape_text(tensor)})"
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            return f"key {name!r} has shape {shape_text(tensors[name])}, the model expects {shape_text(tensor)}"
    extra = [name for name in tensors if name not in state]
    if extra:
        return f"key {extra[0]!r} (shape {shape_text(tensors[extra[0]])}) is not part of the model"
    return None


def _hint(model: torch.nn.Module, problem: str) -> str:
    if "'conv1.weight'" in problem and getattr(model, "sobel", None) is not None:
        return " (torchvision's conv1 takes RGB: set sobel false)"
    if "'conv1.weight'" in problem and getattr(model, "stem_kind", "imagenet") != "imagenet":
        return " (torchvision's ResNets have the imagenet stem: set stem imagenet)"
    return ""


def load_initial_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Copy the weights of ``path`` into ``model`` (in place; its device, memory layout and
    dtypes kept); returns the file's kind in words, e.g. ``torchvision state dict``.

    Raises:
        CheckpointError: the file is unreadable or does not fit ``model``; one line naming the
            first mismatching key and shape.
    """
    tensors, kind = read_init_file(path)
    tensors = _strip_prefix(tensors)
    arch = getattr(model, "arch", type(model).__name__)
    if is_torchvision_layout(tensors) and not any(key.startswith("features.") for key in tensors):
        if getattr(model, "stem_kind", None) is None:
            raise CheckpointError(f"init file {str(path)!r} is in torchvision's ResNet layout; it fits arch resnet18 "
                                  f"or resnet50 only, not {arch}")
        tensors, problem = from_torchvision(model, tensors)
        kind, layout = f"torchvision {kind}", "torchvision layout"
    else:
        problem, layout = _own_layout(model, tensors), "deepcluster layout"
    if problem:
        raise CheckpointError(f"init file {str(path)!r} does not fit {arch} ({layout}): {problem}"
                              f"{_hint(model, problem)}")
    state = model.state_dict()
    with torch.no_grad():
        for name, target in state.items():
            target.copy_(tensors[name].to(target.dtype))
    return kind


__all__ = ["load_initial_weights", "read_init_file"]
