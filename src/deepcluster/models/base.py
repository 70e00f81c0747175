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


# The name under which ``forward_taps`` returns ``forward_features``: the clustered fc layer.
FC_LAYER = "fc"
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

    def forward_clustered_and_body(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_clustered``'s output (the same numbers) and the pooled, flattened body
        it is computed from, ``(B, body_dim)``, in one pass: what the online kNN reads when
        the fc features are clustered (the paper judges its network by the conv layers)."""
        pooled = torch.flatten(self.pool(self.forward_body(images)), 1)
        return (pooled if self.clustered == "body" else self.classifier(pooled)), pooled

    @property
    def separate_body(self) -> bool:
        """True when the clustered features are the fc layers' output, so the pooled body
        is another feature worth measuring (False when the body itself is clustered)."""
        return self.clustered != "body"

    @property
    def body_dim(self) -> int:
        """Width of the pooled, flattened body (the fc layers' input)."""
        return next(m for m in self.classifier.modules() if isinstance(m, nn.Linear)).in_features

    @property
    def clustered_dim(self) -> int:
        """Width of ``forward_clustered``'s output."""
        return self.body_dim if self.clustered == "body" else self.feature_dim

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

    # -- taps: the layers a probe, a report or a feature file can read, by name. Callers never
    # walk the modules: a backbone without a flat ``features`` overrides these three.

    def _tap_indices(self) -> dict[str, int]:
        """``conv1``, ``conv2``, ... -> index in ``features`` of that conv block's ReLU."""
        indices, count = {}, 0
        for index, module in enumerate(self.features):
            if isinstance(module, nn.ReLU):
                count += 1
                indices[f"conv{count}"] = index
        return indices

    def taps(self) -> list[str]:
        """Names of the probe-able layers, input to output: ``conv1``, ``conv2``, ... (the
        post-ReLU map of each convolution). ``forward_taps`` also takes ``FC_LAYER``."""
        return list(self._tap_indices())

    def forward_taps(self, images: torch.Tensor, names: list[str] | tuple[str, ...],
                     pre_activation: bool = False) -> dict[str, torch.Tensor]:
        """The maps of the named taps, in one pass that stops after the last one asked for.

        Args:
            images: ``(B, 3, H, W)`` normalised images (Sobel, when present, is applied here).
            names: taps from ``taps()``, and/or ``FC_LAYER`` for the clustered features
                (``forward_clustered``: the fc layer, or the pooled body with ``clustered = "body"``).
            pre_activation: a conv tap's map just before its ReLU instead of after it (what
                gradient ascent maximises, so silent filters still get a gradient).

        Returns:
            Name -> ``(B, C, h, w)`` map (``(B, clustered_dim)`` for ``FC_LAYER``).

        Raises:
            KeyError: a name the backbone does not have.
        """
        indices = self._tap_indices()
        unknown = [name for name in names if name not in indices and name != FC_LAYER]
        if unknown:
            raise KeyError(f"unknown layer(s) {', '.join(unknown)}; {self.arch} has {', '.join(indices)}")
        shift = 1 if pre_activation else 0
        wanted = {indices[name] - shift: name for name in names if name != FC_LAYER}
        last = len(self.features) - 1 if FC_LAYER in names else max(wanted, default=-1)
        outputs: dict[str, torch.Tensor] = {}
        x = self.sobel(images) if self.sobel is not None else images
        for index, module in enumerate(self.features):
            if index > last:
                break
            x = module(x)
            if index in wanted:  # a pre-activation map is kept apart from the in-place ReLU that follows
                outputs[wanted[index]] = x.clone() if pre_activation and index < last else x
        if FC_LAYER in names:  # the clustered features: fc (the paper), or the pooled body
            pooled = torch.flatten(self.pool(x), 1)
            outputs[FC_LAYER] = pooled if self.clustered == "body" else self.classifier(pooled)
        return outputs

    @torch.no_grad()
    def tap_shapes(self, image_size: int) -> dict[str, tuple[int, int, int]]:
        """``(channels, height, width)`` of every tap's map for ``image_size`` px inputs, in
        tap order (one black image through the body in eval mode; the mode is restored)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        maps = self.forward_taps(torch.zeros(1, 3, image_size, image_size, device=device), self.taps())
        self.train(was_training)
        return {name: tuple(maps[name].shape[1:]) for name in self.taps()}  # type: ignore[misc]

    def first_conv(self) -> nn.Conv2d:
        """The first convolution (the one that sees the pixels, or the Sobel gradients)."""
        return next(module for module in self.modules() if isinstance(module, nn.Conv2d))


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
