"""The built-in dataset: scikit-learn's 1,797 labelled 8x8 handwritten digits.

It ships inside scikit-learn, so ``deepcluster train`` runs with no download and no data
argument. Pixels (0-16) are scaled to 0-255 and kept at 8x8; the transforms upsample them
to the network's input size.
"""

from __future__ import annotations

import numpy as np

from deepcluster.data.sources import ArraySource


def load_digits_source() -> ArraySource:
    """All 1,797 digits as an in-memory source with labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    rgb = np.repeat(images[..., None], 3, axis=-1)
    return ArraySource(rgb, digits.target, [str(d) for d in range(10)])
