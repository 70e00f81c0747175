"""A small VGG-style convnet for 32-96 px images (CIFAR, STL, the built-in digits).

Not in the paper: AlexNet's 11x11/4 first layer throws away most of a 32 px image. This
net keeps DeepCluster's structure (Sobel, conv-BN-ReLU body, two fully connected layers,
the clustered features taken before the last ReLU) at a cost a laptop CPU can train.
"""

from __future__ import annotations

from torch import nn

from deepcluster.models.base import Backbone, fc_classifier, init_weights
from deepcluster.models.vgg import vgg_body

SMALL_LAYERS = [32, 32, "M", 64, 64, "M", 128, 128, "M", 256, "M"]


class SmallNet(Backbone):
    """Seven conv layers, VGG-style; the body ends with a 2x2 grid at 32 px (256 x 2 x 2).

    Args:
        sobel: put the fixed grayscale + Sobel filter in front.
        feature_dim: width of the two fully connected layers.
    """

    arch = "smallnet"

    def __init__(self, sobel: bool = True, feature_dim: int = 512) -> None:
        super().__init__(sobel)
        self.features, channels = vgg_body(SMALL_LAYERS, self.in_channels)
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.feature_dim = feature_dim
        self.classifier = fc_classifier(channels * 2 * 2, feature_dim)
        init_weights(self)
