"""DeepCluster (Caron et al., ECCV 2018) in plain PyTorch.

Stages, one package each: ``models`` (backbones, Sobel filter), ``data`` (image sources,
transforms, pseudo-labelled data and the uniform sampler), ``clustering`` (PCA-whitening,
k-means, metrics), and ``train`` (the loop). ``config`` holds every setting.

From Python (``deepcluster.api``, docs/api.md)::

    import deepcluster as dc
    run = dc.train(data="photos/", recipe="small", epochs=3, out="runs/photos")   # a Run
    dc.load("runs/photos")                                                          # the same Run

``deepcluster.train`` is also the module of the training loop: it is callable, and calling it
is ``deepcluster.api.train``.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

from deepcluster._openblas import prefer_avx512_openblas as _prefer_avx512_openblas

_prefer_avx512_openblas()

# The rest of the Python API, loaded on first use (PEP 562): `import deepcluster` stays light.
_API = ("load", "Run", "Assigned")


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("deepcluster.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableTrainModule(types.ModuleType):
    """The ``deepcluster.train`` module, which ``dc.train(...)`` calls: ``deepcluster.api.train``."""

    def __call__(self, *args, **kwargs):
        return importlib.import_module("deepcluster.api").train(*args, **kwargs)


class _Package(types.ModuleType):
    """This package: its ``train`` attribute is the training module, made callable when the
    import system binds it (whoever imports it first)."""

    @property
    def train(self):
        return importlib.import_module("deepcluster.train")

    @train.setter
    def train(self, module):
        if isinstance(module, types.ModuleType) and not isinstance(module, _CallableTrainModule):
            module.__class__ = _CallableTrainModule


sys.modules[__name__].__class__ = _Package
