"""What the filters respond to, as in the paper's figures: first-layer weights, the images
that most activate a filter, and an input optimised by gradient ascent to excite it.

Tensors in, ``uint8`` image arrays out; nothing here writes files or HTML.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.signal import convolve2d
from torch.nn import functional as F

from deepcluster.data import CenterView, ImageSource, Normalize
from deepcluster.features import PassSettings, feature_pass
from deepcluster.models import ARCHITECTURES, Backbone
from deepcluster.progress import Progress


def effective_first_filters(model: Backbone) -> np.ndarray:
    """First-layer filters as they act on the input image.

    Without Sobel: the RGB weights, ``(n, kh, kw, 3)``. With Sobel the first convolution
    sees two gradient maps, not pixels; since both steps are linear, the filter it applies
    to the grayscale image is the sum over the two channels of the channel's weights
    convolved with its Sobel kernel, ``(n, kh + 2, kw + 2, 1)``. This is what the paper's
    figure of Sobel conv1 filters shows.
    """
    weights = model.first_conv().weight.detach().float().cpu().numpy()  # (n, c, kh, kw)
    if model.sobel is None:
        return weights.transpose(0, 2, 3, 1)
    kernels = model.sobel.sobel_weight.detach().float().cpu().numpy()[:, 0]  # (2, 3, 3)
    effective = np.stack([sum(convolve2d(kernels[c], w[c], mode="full") for c in range(len(kernels)))
                          for w in weights])
    # The grayscale step averages the three colours: the same filter on each, weight 1/3.
    return (effective / 3.0)[..., None]


def filter_grid(filters: np.ndarray, cell: int = 40, columns: int = 16, gap: int = 2) -> np.ndarray:
    """Tile ``(n, h, w, c)`` filters (c = 1 or 3) into one ``uint8`` RGB image.

    Each filter is scaled on its own so that 0 is mid-grey and its largest absolute weight
    is black or white (or full colour); filters are ordered by decreasing norm, the most
    developed first; each is enlarged to ``cell`` pixels without smoothing.
    """
    norms = np.sqrt((filters.reshape(len(filters), -1) ** 2).sum(axis=1))
    filters = filters[np.argsort(-norms, kind="stable")]
    n, height, width, channels = filters.shape
    scale = np.abs(filters).reshape(n, -1).max(axis=1).reshape(n, 1, 1, 1)
    images = 0.5 + 0.5 * filters / np.maximum(scale, 1e-12)
    if channels == 1:
        images = np.repeat(images, 3, axis=-1)
    factor = max(1, cell // max(height, width))
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    columns = min(columns, n)
    rows = -(-n // columns)
    tile_h, tile_w = images.shape[1] + gap, images.shape[2] + gap
    canvas = np.ones((rows * tile_h + gap, columns * tile_w + gap, 3), dtype=np.float32)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        canvas[gap + row * tile_h: gap + row * tile_h + image.shape[0],
               gap + column * tile_w: gap + column * tile_w + image.shape[1]] = image
    return (canvas.clip(0, 1) * 255).round().astype(np.uint8)


def _check_tap(model: Backbone, layer: str) -> None:
    if layer not in model.taps():
        raise ValueError(f"unknown layer {layer!r}; {model.arch} has {', '.join(model.taps())}")


def layer_channels(model: Backbone, layer: str) -> int:
    """Number of filters of tap ``layer``."""
    _check_tap(model, layer)
    return model.tap_shapes(ARCHITECTURES[model.arch].min_crop)[layer][0]


def forward_to(model: Backbone, images: torch.Tensor, layer: str, before_relu: bool = False) -> torch.Tensor:
    """The ``(B, C, h, w)`` map of tap ``layer`` (after its ReLU, or just before it)."""
    _check_tap(model, layer)
    return model.forward_taps(images, [layer], pre_activation=before_relu)[layer]


@dataclass
class FilterResponses:
    """Strongest response of every filter of a layer to a sample of images.

    Attributes:
        layer: conv layer name.
        image_indices: ``(n,)`` indices (into the source) of the sampled images that decoded.
        scores: ``(n, C)`` spatial maximum of each filter's post-ReLU map on each image.
        seconds: time of the pass.
    """

    layer: str
    image_indices: np.ndarray
    scores: np.ndarray
    seconds: float

    def top_images(self, channel: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Source indices and scores of the ``k`` images that excite ``channel`` most."""
        column = self.scores[:, channel]
        order = np.argsort(-column, kind="stable")[:k]
        return self.image_indices[order], column[order]


@torch.no_grad()
def filter_responses(model: Backbone, source: ImageSource, indices: np.ndarray, layer: str, view: CenterView,
                     normalize: Normalize, device: torch.device | str = "cpu", batch_size: int = 128,
                     workers: int = 0) -> FilterResponses:
    """Spatial-max response of every filter of ``layer`` to the images ``indices`` (eval mode)."""
    start = time.perf_counter()
    model.eval()
    _check_tap(model, layer)
    maxima, kept = [], []

    def keep(batch_indices: np.ndarray, maps: torch.Tensor, decoded: np.ndarray) -> None:
        maxima.append(maps.amax(dim=(2, 3)).float().cpu().numpy()[decoded])
        kept.append(batch_indices[decoded])

    settings = PassSettings(view, normalize, batch_size, workers, torch.device(device))
    feature_pass(lambda batch: forward_to(model, batch, layer), source, settings, keep, indices,
                 label=f"responses {layer}")
    scores = np.concatenate(maxima) if maxima else np.zeros((0, layer_channels(model, layer)), dtype=np.float32)
    image_indices = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return FilterResponses(layer, image_indices.astype(np.int64), scores, time.perf_counter() - start)


def pick_filters(scores: np.ndarray, n_filters: int, top_k: int = 9) -> list[int]:
    """The ``n_filters`` most selective filters: the largest ratio of their mean response on
    their ``top_k`` best images to their mean response over all images. Filters that never
    fire are left out; ties go to the lower index."""
    if scores.size == 0 or n_filters <= 0:
        return []
    k = max(1, min(top_k, len(scores)))
    top = -np.sort(-scores, axis=0)[:k].mean(axis=0)
    mean = scores.mean(axis=0)
    ratio = np.where(top > 0, top / np.maximum(mean, 1e-12), -np.inf)
    order = np.lexsort((np.arange(len(ratio)), -ratio))
    return [int(c) for c in order[:n_filters] if np.isfinite(ratio[c])]


@dataclass(frozen=True)
class AscentSettings:
    """Gradient ascent on the input, regularised so the images look like images.

    Attributes:
        size: side of the optimised image (px); the backbone's crop size is natural.
        steps: Adam steps.
        lr: Adam step size, in pixel units (pixels are in [0, 1]).
        jitter: random shift of the image at each step, up to this many pixels (avoids
            high-frequency patterns that only work at one alignment).
        weight_decay: L2 penalty on the image's departure from mid-grey.
        blur_every, blur_sigma: Gaussian blur of the image every few steps (smoothness).
        seed: initial noise.
    """

    size: int = 64
    steps: int = 80
    lr: float = 0.02
    jitter: int = 2
    weight_decay: float = 1e-3
    blur_every: int = 4
    blur_sigma: float = 0.5
    seed: int = 0


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), horizontal, groups=channels)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="reflect"), vertical, groups=channels)


def ascend(model: Backbone, layer: str, filters: list[int], mean: tuple[float, float, float],
           std: tuple[float, float, float], settings: AscentSettings = AscentSettings(),
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Inputs that maximise the mean response of each filter of ``layer`` (before its ReLU,
    so a filter that is silent on noise still gets a gradient).

    All filters are optimised together, one image each, in one batch per step. The model is
    in eval mode and its weights are not touched (gradients are taken w.r.t. the input only).

    Args:
        model: backbone (its Sobel filter included).
        layer: conv layer name, e.g. ``"conv5"``.
        filters: channel indices of that layer.
        mean, std: the input normalisation; pixels stay within [0, 1] after it.
        settings: regularisation and budget.
        device: where to run.

    Returns:
        ``(len(filters), 3, size, size)`` float pixels in [0, 1] (grey for Sobel networks),
        before normalisation by ``mean`` and ``std``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(settings.seed)
    n = len(filters)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    # Optimised in pixel space; a Sobel network only sees the grey level, so it gets one
    # grey channel (three would drift apart in colour the network cannot see).
    colours = 1 if model.sobel is not None else 3
    noise = torch.randn(n, colours, settings.size, settings.size, generator=generator)
    image = (0.5 + 0.05 * noise).clamp(0, 1).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([image], lr=settings.lr)
    channels = torch.tensor(filters, device=device)
    rows = torch.arange(n, device=device)
    rng = np.random.default_rng(settings.seed)
    with Progress(settings.steps, f"gradient ascent {layer}", unit="step") as bar:
        for step in range(settings.steps):
            dy, dx = (int(v) for v in rng.integers(-settings.jitter, settings.jitter + 1, size=2))
            shifted = torch.roll(image, shifts=(dy, dx), dims=(2, 3)).expand(n, 3, settings.size, settings.size)
            response = forward_to(model, (shifted - mean_t) / std_t, layer, before_relu=True)[rows, channels]
            loss = -response.mean(dim=(1, 2)).sum() + settings.weight_decay * ((image - 0.5) ** 2).sum()
            optimizer.zero_grad(set_to_none=True)
            (gradient,) = torch.autograd.grad(loss, image)
            image.grad = gradient
            optimizer.step()
            with torch.no_grad():
                if settings.blur_every and (step + 1) % settings.blur_every == 0 and settings.blur_sigma > 0:
                    image.copy_(_gaussian_blur(image, settings.blur_sigma))
                image.clamp_(0.0, 1.0)
            bar.update()
    model.train(was_training)
    return image.detach().expand(n, 3, settings.size, settings.size).cpu()


def gradient_ascent(model: Backbone, layer: str, filters: list[int], mean: tuple[float, float, float],
                    std: tuple[float, float, float], settings: AscentSettings = AscentSettings(),
                    device: torch.device | str = "cpu") -> np.ndarray:
    """:func:`ascend`, as ``(len(filters), size, size, 3)`` uint8 images contrast-stretched
    each on its own, for display."""
    if not filters:
        return np.zeros((0, settings.size, settings.size, 3), dtype=np.uint8)
    pixels = ascend(model, layer, filters, mean, std, settings, device).numpy().transpose(0, 2, 3, 1)
    return np.stack([_stretch(picture) for picture in pixels])


def _stretch(picture: np.ndarray) -> np.ndarray:
    """Percentile contrast stretch of one ``(H, W, 3)`` image to uint8."""
    low, high = np.percentile(picture, [1, 99])
    scaled = (picture - low) / max(high - low, 1e-8)
    return (scaled.clip(0, 1) * 255).round().astype(np.uint8)


__all__ = ["AscentSettings", "FilterResponses", "ascend", "effective_first_filters", "filter_grid", "filter_responses",
           "forward_to", "gradient_ascent", "layer_channels", "pick_filters"]
