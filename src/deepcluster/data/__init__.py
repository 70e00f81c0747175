"""Image sources, transforms, and the pseudo-labelled training data."""

from deepcluster.data.digits import load_digits_source
from deepcluster.data.multicrop import CropGroup, MultiCrop, MultiCropDataset
from deepcluster.data.pseudo import FeatureDataset, PseudoLabelDataset, uniform_cluster_sample
from deepcluster.data.sources import (ArraySource, DataError, FolderSource, ImageSource, decode_problem, scan_folder,
                                     to_rgb, walk_relative)
from deepcluster.data.transforms import CenterView, ColorJitter, Normalize, RandomResizedCropFlip, color_jitter

__all__ = [
    "ArraySource", "CenterView", "CropGroup", "MultiCrop",
    "MultiCropDataset", "DataError", "decode_problem", "FeatureDataset", "FolderSource", "ImageSource",
    "ColorJitter", "Normalize", "PseudoLabelDataset", "RandomResizedCropFlip", "load_digits_source",
    "scan_folder", "to_rgb", "uniform_cluster_sample", "walk_relative", "color_jitter",
]
