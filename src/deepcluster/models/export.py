"""The backbone alone as a safetensors file, and back.

The file holds the body and fully connected weights (Sobel buffers and BatchNorm
statistics included; the pseudo-label top layer left out, it means nothing outside its
epoch) and, as safetensors string metadata, all that is needed to rebuild and feed it:
architecture, Sobel, feature width, input size and normalisation. Loading needs neither
the checkpoint nor its configuration:

    from deepcluster.models import load_backbone_safetensors, preprocess_images, read_backbone_metadata
    model = load_backbone_safetensors("backbone.safetensors")    # eval mode, on the CPU
    info = read_backbone_metadata("backbone.safetensors")
    images = preprocess_images(["a.jpg", "b.png"], info)          # as the run fed its network
    features = model.forward_clustered(images)                    # what the run clustered (info.clustered)

safetensors stores raw tensors only, so loading a file cannot run code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from deepcluster.messages import one_line

FORMAT = "deepcluster-backbone"
FORMAT_VERSION = "1"


class ExportError(ValueError):
    """A file is not a deepcluster backbone or does not fit its metadata; the message says why."""


@dataclass(frozen=True)
class BackboneMetadata:
    """How to rebuild an exported backbone and prepare its input.

    Attributes:
        arch: registry name (``deepcluster.models.ARCHITECTURES``).
        sobel: the fixed grayscale + Sobel filter is part of the model (give it RGB).
        feature_dim: width of ``forward_features``' output.
        image_size: side of the square centre crop the backbone was trained on (px).
        resize: shorter side before that crop (px).
        mean, std: per-channel normalisation of RGB values in [0, 1].
        epoch: training epochs behind these weights.
        source: the checkpoint it came from (for the record).
        stem: a ResNet's first layers (``imagenet`` or ``cifar``).
        width: the small net's channel multiplier (1 for every other architecture).
        depth: the small net's conv layer repeats (1 for every other architecture).
        clustered: what the run clustered, and what ``forward_clustered`` of the loaded
            backbone returns: ``fc`` (the last fully connected layer, ``feature_dim`` wide) or
            ``body`` (the pooled convolutional output; a ResNet's only output). Files written
            before this entry existed read as ``fc``.
    """

    arch: str
    sobel: bool
    feature_dim: int
    image_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    epoch: int = 0
    source: str = ""
    stem: str = "imagenet"
    width: int = 1
    depth: int = 1
    clustered: str = "fc"

    def to_strings(self) -> dict[str, str]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": self.arch,
                "sobel": json.dumps(self.sobel), "feature_dim": str(self.feature_dim),
                "image_size": str(self.image_size), "resize": str(self.resize), "mean": json.dumps(list(self.mean)),
                "std": json.dumps(list(self.std)), "epoch": str(self.epoch), "source": self.source,
                "stem": self.stem, "width": str(self.width), "depth": str(self.depth),
                "clustered": self.clustered}

    @staticmethod
    def from_strings(values: dict[str, str], where: str = "file") -> "BackboneMetadata":
        if values.get("format") != FORMAT:
            raise ExportError(f"{where} is not a deepcluster backbone (no '{FORMAT}' metadata); "
                              "write one with `deepcluster export`")
        try:
            return BackboneMetadata(
                arch=values["arch"], sobel=bool(json.loads(values["sobel"])), feature_dim=int(values["feature_dim"]),
                image_size=int(values["image_size"]), resize=int(values["resize"]),
                mean=tuple(float(v) for v in json.loads(values["mean"])),  # type: ignore[arg-type]
                std=tuple(float(v) for v in json.loads(values["std"])),  # type: ignore[arg-type]
                epoch=int(values.get("epoch", "0")), source=values.get("source", ""),
                stem=values.get("stem", "imagenet"), width=int(values.get("width", "1")),
                depth=int(values.get("depth", "1")), clustered=values.get("clustered", "fc"))
        except (KeyError, ValueError, TypeError) as error:
            raise ExportError(f"{where} has damaged backbone metadata ({type(error).__name__}: {error})") from None


def backbone_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors that share no memory."""
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()}


CHECKSUM_KEY = "sha256"  # metadata entry: SHA-256 of every tensor, in name order


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order."""
    import hashlib

    from deepcluster.checkpoint import tensor_digest

    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode("utf-8", "surrogatepass") + b"=")
        tensor_digest(tensors[name], digest)
    return digest.hexdigest()


def save_backbone_safetensors(model: torch.nn.Module, path: str | Path, metadata: BackboneMetadata) -> Path:
    """Write the backbone ``model`` and ``metadata`` (with the tensors' checksum) to
    ``path``, atomically and with the usual file mode (``safetensors.save_file`` creates its
    files 0600)."""
    from safetensors.torch import save

    from deepcluster.checkpoint import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = backbone_tensors(model)
    strings = {**metadata.to_strings(), CHECKSUM_KEY: tensors_checksum(tensors)}
    atomic_write_bytes(path, save(tensors, metadata=strings))
    return path


def read_backbone_metadata(path: str | Path) -> BackboneMetadata:
    """The metadata of an exported backbone, without loading its weights.

    Raises:
        ExportError: missing file, not safetensors, or not a deepcluster backbone.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"backbone file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            values = handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 - any parse failure means the same to the user
        detail = one_line(str(error).splitlines()[0], 200) if str(error) else type(error).__name__
        raise ExportError(f"{str(path)!r} is not a readable safetensors file ({detail})") from None
    return BackboneMetadata.from_strings(values, repr(str(path)))


def _stored_checksum(path: str | Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get(CHECKSUM_KEY)


def preprocess_images(images, info: BackboneMetadata) -> torch.Tensor:
    """Images as the run fed its backbone for the features it clustered: converted to RGB
    (EXIF rotation, alpha, 16-bit, CMYK handled as in training), shorter side resized to
    ``info.resize``, centre-cropped to ``info.image_size``, scaled to [0, 1] and normalised
    with ``info.mean`` / ``info.std``.

    Args:
        images: image file paths and/or Pillow images.
        info: the backbone's metadata (:func:`read_backbone_metadata`).

    Returns:
        ``(B, 3, image_size, image_size)`` float32 batch for ``forward_features``.
    """
    from PIL import Image

    from deepcluster.data import CenterView, Normalize, to_rgb

    view = CenterView(info.resize, info.image_size)

    def opened(image) -> Image.Image:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        with Image.open(image) as file:
            file.load()
            return to_rgb(file)

    batch = torch.stack([view(opened(image)) for image in images])
    return Normalize(info.mean, info.std)(batch)


def load_backbone_safetensors(path: str | Path, device: torch.device | str = "cpu"):
    """A ready backbone from a file written by ``deepcluster export``: built from the file's
    metadata, weights loaded strictly, in eval mode, on ``device``.

    Its input: RGB images resized (shorter side ``resize``), centre-cropped to ``image_size``,
    scaled to [0, 1] and normalised with ``mean`` / ``std``, which :func:`preprocess_images` does;
    ``forward_clustered`` gives the features DeepCluster clustered (``clustered`` of the
    metadata), ``forward_features`` the last fully connected layer, ``forward_body`` the conv map.

    Raises:
        ExportError: missing or foreign file, or weights that do not fit the architecture.
    """
    from safetensors.torch import load_file

    from deepcluster.models import create_model

    info = read_backbone_metadata(path)
    if (info.width, info.depth) != (1, 1):
        raise ExportError(f"{str(path)!r} holds a {info.arch} of width {info.width} and depth {info.depth}, shapes "
                          "this version no longer builds (the width and depth settings were removed)")
    try:
        model = create_model(info.arch, sobel=info.sobel, feature_dim=info.feature_dim, stem=info.stem,
                             clustered=info.clustered)
    except ValueError as error:
        raise ExportError(f"{str(path)!r}: {error}") from None
    try:
        tensors = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - a damaged file, whatever the parser says
        raise ExportError(f"{str(path)!r} is not a readable safetensors file ({one_line(str(error), 200)})") from None
    expected = _stored_checksum(path)
    if expected is not None and expected != tensors_checksum(tensors):
        raise ExportError(f"{str(path)!r} is damaged: its weights do not match the checksum written with them (a bit "
                          "changed on disk or in a copy); export it again")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:2]) or str(error)
        raise ExportError(f"{str(path)!r} does not fit architecture {info.arch!r}: {one_line(detail, 300)}") from None
    return model.to(device).eval()


__all__ = ["BackboneMetadata", "ExportError", "backbone_tensors", "load_backbone_safetensors", "preprocess_images",
           "read_backbone_metadata", "save_backbone_safetensors"]
