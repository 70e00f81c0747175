"""The fixed input filter of DeepCluster: grayscale, then two Sobel gradients.

Clustering raw RGB lets k-means group images by colour, a cue the convnet can learn
trivially. The paper removes it: each image is turned to grayscale and replaced by its
horizontal and vertical Sobel responses, so the first convolution sees 2 channels.
"""

from __future__ import annotations

import torch
from torch import nn


class SobelFilter(nn.Module):
    """Fixed (never trained) grayscale + Sobel filter.

    Grayscale is the plain mean of the three input channels, as in the authors'
    implementation (a 1x1 convolution with weights 1/3), applied to the already
    mean/std-normalised image.

    Shapes:
        input: ``(B, 3, H, W)``; output: ``(B, 2, H, W)`` with channel 0 the horizontal
        gradient (responds to vertical edges) and channel 1 the vertical gradient.
    """

    def __init__(self) -> None:
        super().__init__()
        gray = torch.full((1, 3, 1, 1), 1.0 / 3.0)
        dx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        sobel = torch.stack([dx, dx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
        # Buffers, not parameters: the optimiser never sees them, checkpoints carry them.
        self.register_buffer("gray_weight", gray)
        self.register_buffer("sobel_weight", sobel)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gray = nn.functional.conv2d(images, self.gray_weight.to(images.dtype))
        return nn.functional.conv2d(gray, self.sobel_weight.to(images.dtype), padding=1)
