"""DeepCluster (Caron et al., ECCV 2018) in plain PyTorch.

Stages, one package each: ``models`` (backbones, Sobel filter), ``data`` (image sources,
transforms, pseudo-labelled data and the uniform sampler), ``clustering`` (PCA-whitening,
k-means, metrics), and ``train`` (the loop). ``config`` holds every setting.
"""

__version__ = "0.1.0"

from deepcluster._openblas import prefer_avx512_openblas as _prefer_avx512_openblas

_prefer_avx512_openblas()
