"""The one interface every DeepCluster backbone offers.

A backbone is ``sobel -> features (convs) -> classifier (fully connected)``:
``forward_features(x)`` returns the output of the last fully connected layer *before* its
ReLU (the authors strip that ReLU for the feature pass). The pseudo-label head that reads
it during training (``relu``, then a ``Linear`` re-created at every clustering) is not part
of the backbone: see ``deepcluster.models.heads``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepcluster.models.sobel import SobelFilter


# The reference's N(0, 0.01) for fully connected weights, and the width it was made for.
REFERENCE_STD = 0.01
REFERENCE_WIDTH = 4096


class Backbone(nn.Module):
    """Base class: subclasses build ``self.features`` and ``self.classifier``.

    Attributes:
        sobel: the fixed input filter, or ``None`` when the network sees RGB.
        features: convolutional body, ``(B, C_in, H, W) -> (B, C, h, w)``.
        pool: resizes the body's output to the grid the classifier expects.
        classifier: fully connected layers ending with a ``Linear`` (no final ReLU),
            ``(B, C*h*w) -> (B, feature_dim)``.
        head_std: the standard deviation a head on these features draws its weights from
            (see ``scale_fc_init``).
    """

    feature_dim: int
    arch: str

    def __init__(self, sobel: bool) -> None:
        super().__init__()
        self.sobel = SobelFilter() if sobel else None
        self.head_std = REFERENCE_STD  # a head's init; see scale_fc_init
        self.clustered = "fc"  # what the feature pass returns: see forward_clustered

    @property
    def in_channels(self) -> int:
        """Channels the first convolution takes (2 with Sobel, 3 without)."""
        return 2 if self.sobel is not None else 3

    def forward_body(self, images: torch.Tensor) -> torch.Tensor:
        """Convolutional feature map, ``(B, 3, H, W) -> (B, C, h, w)``."""
        if self.sobel is not None:
            images = self.sobel(images)
        return self.features(images)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The features DeepCluster clusters, ``(B, 3, H, W) -> (B, feature_dim)``."""
        body = self.pool(self.forward_body(images))
        return self.classifier(torch.flatten(body, 1))

    def forward_clustered(self, images: torch.Tensor) -> torch.Tensor:
        """What DeepCluster clusters, ``(B, 3, H, W) -> (B, clustered_dim)``: the fc features
        (the paper), or with ``clustered = "body"`` the convolutional output, pooled to the
        classifier's grid and flattened (the fc layers then serve only as a head)."""
        if self.clustered == "body":
            return torch.flatten(self.pool(self.forward_body(images)), 1)
        return self.forward_features(images)

    @property
    def clustered_dim(self) -> int:
        """Width of ``forward_clustered``'s output."""
        if self.clustered == "body":
            return next(m for m in self.classifier.modules() if isinstance(m, nn.Linear)).in_features
        return self.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The features DeepCluster clusters (``forward_features``); heads live apart
        (``deepcluster.models.heads``)."""
        return self.forward_features(images)

    def scale_fc_init(self) -> None:
        """Rescale the fully connected layers from N(0, 0.01) to N(0, 0.01 * sqrt(4096 / fan_in)).

        The reference draws every fully connected weight from N(0, 0.01). That suits
        AlexNet's 4096-wide layers (each passes on about 0.64 of its input's scale), but a
        512-wide net passes on 0.23 per layer: its pseudo-label logits start near zero, so
        hardly any gradient reaches the convolutions for the first epochs and the loss sits
        at ln k. Scaled by fan-in, every layer has the reference's 4096-wide gain, whatever
        its width; for a 4096-wide layer nothing changes. Heads made later follow the rule.
        """
        for layer in self.classifier.modules():
            if isinstance(layer, nn.Linear):
                with torch.no_grad():
                    layer.weight.mul_(math.sqrt(REFERENCE_WIDTH / layer.in_features))
        self.head_std = REFERENCE_STD * math.sqrt(REFERENCE_WIDTH / self.feature_dim)

    def conv_layers(self) -> list[tuple[str, int]]:
        """``(name, index)`` of each conv block's ReLU in ``features``: conv1, conv2, ...

        Evaluation taps the post-ReLU activation of each convolution at these indices.
        """
        taps, count = [], 0
        for index, module in enumerate(self.features):
            if isinstance(module, nn.ReLU):
                count += 1
                taps.append((f"conv{count}", index))
        return taps


def init_weights(module: nn.Module) -> None:
    """The reference initialisation.

    Convolutions: N(0, sqrt(2 / (kh * kw * out_channels))), bias 0; BatchNorm: weight 1,
    bias 0; Linear: N(0, 0.01), bias 0.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            fan_out = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / fan_out))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.zeros_(layer.bias)


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    """A convolution, BatchNorm and in-place ReLU, as three modules."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def fc_classifier(in_features: int, hidden: int, dropout: float = 0.5) -> nn.Sequential:
    """Two fully connected layers; the last one has no ReLU (see ``forward_features``)."""
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
    )
