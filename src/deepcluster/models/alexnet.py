"""AlexNet with BatchNorm after every convolution, as trained by DeepCluster."""

from __future__ import annotations

from torch import nn

from deepcluster.models.base import Backbone, conv_bn_relu, fc_classifier, init_weights

# (out_channels, kernel, stride, padding) or "M" for 3x3/2 max-pooling: the reference's
# 96-11/4, pool, 256-5, pool, 384-3, 384-3, 256-3, pool.
ALEXNET_LAYERS = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"]


class AlexNet(Backbone):
    """AlexNet-BN. At 224 px the body gives 256 x 6 x 6; fc 4096, fc 4096.

    Args:
        sobel: put the fixed grayscale + Sobel filter in front (2 input channels).
        feature_dim: width of the two fully connected layers (4096 in the paper).
    """

    arch = "alexnet"

    def __init__(self, sobel: bool = True, feature_dim: int = 4096) -> None:
        super().__init__(sobel)
        layers: list[nn.Module] = []
        channels = self.in_channels
        for spec in ALEXNET_LAYERS:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            else:
                out_channels, kernel, stride, padding = spec
                layers += conv_bn_relu(channels, out_channels, kernel, stride, padding)
                channels = out_channels
        self.features = nn.Sequential(*layers)
        # Identity at 224 px; lets other input sizes reach the same 6 x 6 grid.
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.feature_dim = feature_dim
        self.classifier = fc_classifier(channels * 6 * 6, feature_dim)
        init_weights(self)
