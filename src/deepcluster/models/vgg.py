"""VGG-16 with BatchNorm, as trained by DeepCluster."""

from __future__ import annotations

from torch import nn

from deepcluster.models.base import Backbone, conv_bn_relu, fc_classifier, init_weights

VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg_body(widths: list, in_channels: int) -> tuple[nn.Sequential, int]:
    """3x3 conv-BN-ReLU blocks and 2x2 max-pools; returns the body and its output width."""
    layers: list[nn.Module] = []
    channels = in_channels
    for spec in widths:
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += conv_bn_relu(channels, spec, 3, padding=1)
            channels = spec
    return nn.Sequential(*layers), channels


class VGG16(Backbone):
    """VGG-16-BN. At 224 px the body gives 512 x 7 x 7; fc 4096, fc 4096."""

    arch = "vgg16"

    def __init__(self, sobel: bool = True, feature_dim: int = 4096) -> None:
        super().__init__(sobel)
        self.features, channels = vgg_body(VGG16_LAYERS, self.in_channels)
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.feature_dim = feature_dim
        self.classifier = fc_classifier(channels * 7 * 7, feature_dim)
        init_weights(self)
