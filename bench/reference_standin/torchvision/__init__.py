"""Stand-in for torchvision (see ../README.md): only what the authors' code imports."""
from . import datasets, transforms  # noqa: F401
