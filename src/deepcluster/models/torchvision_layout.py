"""torchvision's ResNet parameter names, mapped onto this package's ResNet.

A file saved from ``torchvision.models.resnet18(...)`` or ``resnet50(...)`` (``state_dict()``)
names its tensors ``conv1.weight``, ``bn1.running_mean``, ``layer2.0.downsample.0.weight``,
``fc.weight`` ...; this package's ResNet holds the same tensors under ``features.stem.conv``,
``features.layer2.0.shortcut.0`` and so on (``deepcluster.models.resnet``). The map below is
derived from the model itself, so every name of the package's body has exactly one
torchvision name. torchvision's ``fc`` (its ImageNet classifier) has no counterpart: the
package's ResNet ends at the pooled last stage, so ``fc`` is checked (its input width must be
the body's) and then left out. torchvision itself is never imported.
"""

from __future__ import annotations

import re

import torch

# Position in a block's ``residual`` Sequential -> torchvision's module name. The ReLUs sit
# at positions 2 and 5 and hold no tensors.
_RESIDUAL_NAMES = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
_STAGE = re.compile(r"^features\.(layer\d)\.(\d+)\.(residual|shortcut)\.(\d+)\.(\w+)$")
_STEM = {"features.stem.conv.": "conv1.", "features.stem.bn.": "bn1."}
# torchvision's classifier: present in its files, absent from this package's ResNet.
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")
RESNETS = ("resnet18", "resnet50")


def torchvision_name(name: str) -> str | None:
    """torchvision's name for the package ResNet's tensor ``name``; ``None`` for tensors
    torchvision has no counterpart of (the Sobel filter's buffers)."""
    for ours, theirs in _STEM.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    match = _STAGE.match(name)
    if match is None:
        return None
    stage, block, branch, position, leaf = match.groups()
    module = _RESIDUAL_NAMES[position] if branch == "residual" else f"downsample.{position}"
    return f"{stage}.{block}.{module}.{leaf}"


def name_map(model: torch.nn.Module) -> dict[str, str]:
    """Package name -> torchvision name for every tensor of ``model``'s body that has one."""
    pairs = {ours: torchvision_name(ours) for ours in model.state_dict()}
    return {ours: theirs for ours, theirs in pairs.items() if theirs is not None}


def is_torchvision_layout(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict names its tensors as torchvision's ResNets do."""
    return "conv1.weight" in tensors and "bn1.weight" in tensors and any(k.startswith("layer1.") for k in tensors)


def to_torchvision(model: torch.nn.Module, classes: int | None = None) -> dict[str, torch.Tensor]:
    """``model``'s body as a torchvision state dict (for tests and for use elsewhere); with
    ``classes``, a zero ``fc`` classifier of that many outputs is added, as torchvision has."""
    state = model.state_dict()
    tensors = {theirs: state[ours].detach().cpu().clone() for ours, theirs in name_map(model).items()}
    if classes is not None:
        width = int(getattr(model, "feature_dim"))
        tensors["fc.weight"] = torch.zeros(classes, width)
        tensors["fc.bias"] = torch.zeros(classes)
    return tensors


def shape_text(tensor: torch.Tensor | torch.Size) -> str:
    shape = tensor.shape if isinstance(tensor, torch.Tensor) else tensor
    return "(" + ", ".join(str(size) for size in shape) + ")"


def from_torchvision(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """A torchvision state dict renamed to ``model``'s names, and the first mismatch in words
    (``None`` when every name and shape fits). Tensors torchvision lacks (Sobel buffers) keep
    the model's own values; ``fc`` is checked and dropped."""
    state = model.state_dict()
    mapping = name_map(model)
    converted = {ours: tensor for ours, tensor in state.items() if ours not in mapping}
    for ours, theirs in mapping.items():
        if theirs not in tensors:
            return converted, (f"key {theirs!r} is missing (the model expects shape {shape_text(state[ours])})")
        if tuple(tensors[theirs].shape) != tuple(state[ours].shape):
            return converted, (f"key {theirs!r} has shape {shape_text(tensors[theirs])}, the model expects "
                               f"{shape_text(state[ours])}")
        converted[ours] = tensors[theirs]
    known = set(mapping.values()) | set(CLASSIFIER_KEYS)
    extra = [key for key in tensors if key not in known]
    if extra:
        return converted, f"key {extra[0]!r} (shape {shape_text(tensors[extra[0]])}) is not part of the model"
    width = int(getattr(model, "feature_dim", 0))
    fc = tensors.get("fc.weight")
    if fc is not None and (fc.dim() != 2 or fc.shape[1] != width):
        return converted, (f"key 'fc.weight' has shape {shape_text(fc)}, the model's pooled features are {width} "
                           f"wide (expects (classes, {width}))")
    return converted, None


__all__ = ["CLASSIFIER_KEYS", "RESNETS", "from_torchvision", "is_torchvision_layout", "name_map", "shape_text",
           "to_torchvision", "torchvision_name"]
