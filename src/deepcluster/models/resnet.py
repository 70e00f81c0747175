"""ResNet-18 and ResNet-50 (He et al., 2016), the backbones of DeepCluster-v2.

Two stems: ``imagenet`` (7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max-pool:
224 px in, a 7x7 map out of the last stage) and ``cifar`` (3x3 stride-1 convolution, no
max-pool: for 32-96 px images, as solo-learn and SwAV's CIFAR experiments use). Stride 2
sits in the 3x3 convolution of a bottleneck block (the "v1.5" layout of SwAV's and
torchvision's ResNet-50).

For v1, what is clustered is the globally average-pooled output of the last stage
(512 values for ResNet-18, 2,048 for ResNet-50), PCA-whitened as usual; there are no fully
connected layers between it and the pseudo-label head. The taps a probe or the report can
read are the stem and the four stages.

With the imagenet stem and no Sobel filter, every tensor has exactly one counterpart of the same
shape in torchvision's ``resnet18`` / ``resnet50`` (``conv1`` is ``features.stem.conv``,
``layer2.0.downsample.0`` is ``features.layer2.0.shortcut.0``, ...): ``torchvision_layout``
maps the names, so a run can start from torchvision weights (the ``init`` setting).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from deepcluster.models.base import FC_LAYER, Backbone

STEMS = ("imagenet", "cifar")


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels)]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut: ResNet-18's block."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(*conv_bn(in_channels, width, 3, stride), nn.ReLU(inplace=True),
                                      *conv_bn(width, width, 3))
        self.shortcut = shortcut(in_channels, width * self.expansion, stride)

    def forward(self, x: torch.Tensor, pre_activation: bool = False) -> torch.Tensor:
        out = self.residual(x) + self.shortcut(x)
        return out if pre_activation else torch.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here), 1x1 expand by 4, and a shortcut: ResNet-50's block."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(*conv_bn(in_channels, width, 1), nn.ReLU(inplace=True),
                                      *conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                                      *conv_bn(width, width * self.expansion, 1))
        self.shortcut = shortcut(in_channels, width * self.expansion, stride)

    def forward(self, x: torch.Tensor, pre_activation: bool = False) -> torch.Tensor:
        out = self.residual(x) + self.shortcut(x)
        return out if pre_activation else torch.relu(out)


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when the shape is kept; otherwise a strided 1x1 convolution and BatchNorm."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class Stage(nn.Sequential):
    """Blocks of one resolution; ``forward(x, pre_activation)`` leaves the last block's ReLU
    out when asked (what gradient ascent maximises)."""

    def forward(self, x: torch.Tensor, pre_activation: bool = False) -> torch.Tensor:  # type: ignore[override]
        for index, block in enumerate(self):
            x = block(x, pre_activation=pre_activation and index == len(self) - 1)
        return x

    def finish(self, pre_activation: torch.Tensor) -> torch.Tensor:
        """The stage's output from its pre-activation map."""
        return torch.relu(pre_activation)


class Stem(nn.Module):
    def __init__(self, in_channels: int, stem: str) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; choose one of: {', '.join(STEMS)}")
        kernel, stride = (7, 2) if stem == "imagenet" else (3, 1)
        self.conv = nn.Conv2d(in_channels, 64, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()

    def forward(self, x: torch.Tensor, pre_activation: bool = False) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if pre_activation else self.finish(x)

    def finish(self, pre_activation: torch.Tensor) -> torch.Tensor:
        """The stem's output from its pre-activation map."""
        return self.pool(torch.relu(pre_activation))


class ResNet(Backbone):
    """A ResNet body, globally average-pooled: ``(B, 3, H, W) -> (B, feature_dim)``.

    Args:
        sobel: the fixed grayscale + Sobel filter in front (v1's option; v2 sees colour).
        stem: ``imagenet`` or ``cifar`` (see the module's docstring).
        feature_dim: must be the last stage's width when given (a ResNet has no fully
            connected layers to resize).
    """

    block: type[BasicBlock] | type[Bottleneck] = BasicBlock
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    arch = "resnet"

    def __init__(self, sobel: bool = False, stem: str = "imagenet", feature_dim: int | None = None) -> None:
        super().__init__(sobel)
        self.stem_kind = stem
        stages: list[tuple[str, nn.Module]] = [("stem", Stem(self.in_channels, stem))]
        channels = 64
        for index, (depth, width) in enumerate(zip(self.depths, (64, 128, 256, 512))):
            blocks = []
            for position in range(depth):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(self.block(channels, width, stride))
                channels = width * self.block.expansion
            stages.append((f"layer{index + 1}", Stage(*blocks)))
        if feature_dim is not None and feature_dim != channels:
            raise ValueError(f"{self.arch} gives {channels} features; feature_dim cannot change that")
        self.features = nn.Sequential(OrderedDict(stages))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Identity()
        self.feature_dim = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.weight.requires_grad:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled last stage, ``(B, feature_dim)``: what v1 clusters."""
        return torch.flatten(self.pool(self.forward_body(images)), 1)

    def forward_clustered(self, images: torch.Tensor) -> torch.Tensor:
        # No fully connected layers: "fc" and "body" are the same pooled output.
        return self.forward_features(images)

    @property
    def clustered_dim(self) -> int:
        return self.feature_dim

    @property
    def separate_body(self) -> bool:
        return False  # the pooled output is both the body and what is clustered

    @property
    def body_dim(self) -> int:
        return self.feature_dim

    def scale_fc_init(self) -> None:
        """No fully connected layers to rescale; a head drawn later keeps N(0, 0.01)."""

    def taps(self) -> list[str]:
        """``stem``, ``layer1`` ... ``layer4``: the post-ReLU output of the stem and of each stage."""
        return [name for name, _ in self.features.named_children()]

    def forward_taps(self, images: torch.Tensor, names: list[str] | tuple[str, ...],
                     pre_activation: bool = False) -> dict[str, torch.Tensor]:
        """The maps of the named taps (and ``fc``, the pooled features), in one pass that
        stops after the last one asked for; see ``Backbone.forward_taps``."""
        order = self.taps()
        unknown = [name for name in names if name not in order and name != FC_LAYER]
        if unknown:
            raise KeyError(f"unknown layer(s) {', '.join(unknown)}; {self.arch} has {', '.join(order)}")
        last = len(order) - 1 if FC_LAYER in names else max(order.index(name) for name in names)
        outputs: dict[str, torch.Tensor] = {}
        x = self.sobel(images) if self.sobel is not None else images
        for index, (name, stage) in enumerate(self.features.named_children()):
            if index > last:
                break
            if name in names and pre_activation:
                outputs[name] = stage(x, pre_activation=True)
                x = stage.finish(outputs[name])
            else:
                x = stage(x)
                if name in names:
                    outputs[name] = x
        if FC_LAYER in names:
            outputs[FC_LAYER] = torch.flatten(self.pool(x), 1)
        return outputs


class ResNet18(ResNet):
    arch = "resnet18"
    block, depths = BasicBlock, (2, 2, 2, 2)


class ResNet50(ResNet):
    arch = "resnet50"
    block, depths = Bottleneck, (3, 4, 6, 3)
