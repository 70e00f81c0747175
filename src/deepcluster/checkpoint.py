"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint holds only tensors, numbers, strings, lists and dicts, and is loaded with
``torch.load(weights_only=True)``: a file that tries to smuggle code in is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deepcluster.faults import fault_point
from deepcluster.messages import one_line

if TYPE_CHECKING:
    from deepcluster.config import Config
    from deepcluster.models import Backbone
    from deepcluster.models.heads import ClassifierHead

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit; the message says why."""


def temp_path(path: Path) -> Path:
    """A fresh temporary name next to ``path``: hidden, unique to this process, and
    recognisable (``TEMP_GLOB``) so a later run can remove what a killed one left."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


TEMP_GLOB = ".*.tmp-*"


def atomic_write_bytes(path: str | Path, payload: bytes, fault: str | None = None) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the new one,
    never a torn mix: temporary file in the same folder, flush, fsync, rename, fsync
    the folder. On any error the temporary file is removed and ``path`` is untouched.

    Args:
        path: destination file.
        payload: its whole new content.
        fault: name of the ``deepcluster.faults`` point reached halfway through the write.

    Raises:
        OSError: as the operating system reports it (full disk, read-only folder, ...).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        # O_EXCL: never write through a file or symlink planted at the temporary name.
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            view, half = memoryview(payload), len(payload) // 2
            handle.write(view[:half])
            if fault is not None:
                handle.flush()  # so that a kill here leaves a real, half-written file
                fault_point(fault, tmp)
            handle.write(view[half:])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    # Make the rename itself durable. Best effort: some file systems refuse to fsync a
    # folder, and by now the new file is in place whatever happens.
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that a killed writer left in ``folder``; returns them."""
    removed = []
    for stale in sorted(Path(folder).glob(TEMP_GLOB)):
        if stale.is_file() and not stale.is_symlink():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


CHECKSUM_KEY = "checksum"


def tensor_digest(tensor: torch.Tensor, digest: Any) -> None:
    """Feed ``tensor``'s dtype, shape and raw bytes into ``digest`` (a hashlib object)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"T{flat.dtype}{tuple(tensor.shape)}:".encode())
    digest.update(flat.view(torch.uint8).numpy())


def state_checksum(state: dict[str, Any]) -> str:
    """SHA-256 of everything in a checkpoint (tensors byte for byte, plain values by their
    ``repr``), in order, leaving out ``format_version`` and the checksum itself: a bit that
    changes on disk after the write changes it."""
    digest = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor_digest(value, digest)
        elif isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                digest.update(repr(key).encode("utf-8", "surrogatepass") + b":")
                walk(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                walk(item)
                digest.update(b",")
            digest.update(b"]")
        else:
            digest.update(repr(value).encode("utf-8", "surrogatepass") + b";")

    walk({key: value for key, value in state.items() if key not in ("format_version", CHECKSUM_KEY)})
    return "sha256:" + digest.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise ``state`` (tensors and plain containers only) with its checksum
    (``state_checksum``) and write it atomically."""
    buffer = io.BytesIO()
    state = {key: value for key, value in state.items() if key not in ("format_version", CHECKSUM_KEY)}
    torch.save({"format_version": FORMAT_VERSION, **state, CHECKSUM_KEY: state_checksum(state)}, buffer)
    atomic_write_bytes(path, buffer.getvalue(), fault="checkpoint")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``, checking its layout.

    Only tensors, numbers, strings and plain containers can come out: a file that holds any
    other pickled object (which could run code when unpickled) is refused, not executed. The
    checksum written with it is verified (a file from before checksums has none) and left
    out of the returned state.

    Raises:
        CheckpointError: missing, truncated or tampered file, or not a deepcluster checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # a damaged file can look like another pickle protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure means the same to the user
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if first_line.startswith("Weights only load failed"):  # torch's advice to load unsafely: not ours
            first_line = "a pickled object other than tensors and plain values"
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded safely: it is truncated, corrupt or holds "
                              f"objects other than tensors ({one_line(first_line, 160)})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} is not a deepcluster checkpoint (format {FORMAT_VERSION})")
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is not None and stored != state_checksum(state):
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its content does not match the checksum written "
                              "with it (a bit changed on disk or in a copy); restore it from a copy of the run folder")
    problem = _layout_problem(state, BACKBONE_LAYOUT)
    if problem:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged or tampered with: {problem}")
    return state


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


# What each entry must be. A checkpoint passes through ``torch.load(weights_only=True)``,
# which guarantees harmless types but not the right ones: a hand-edited file could still
# make the run fail later with a traceback, so it is checked here with a clear message.
BACKBONE_LAYOUT: dict[str, tuple[str, Any]] = {
    "config": ("a mapping of settings", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)),
    "arch": ("a string", lambda v: isinstance(v, str)),
    "epoch": ("a count of epochs", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "model": ("a mapping of parameter names to tensors", _is_tensor_dict),
}
RESUME_LAYOUT: dict[str, tuple[str, Any]] = {
    "optimizer": ("an optimizer state", lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list)),
    "torch_rng": ("a uint8 random-generator state", lambda v: isinstance(v, torch.Tensor)
                  and v.dtype == torch.uint8 and v.dim() == 1),
    "assignments": ("None or a 1-d integer tensor", lambda v: v is None or (
        isinstance(v, torch.Tensor) and v.dim() == 1 and not v.dtype.is_floating_point)),
    "skipped": ("a mapping of file to reason", lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(r, str) for k, r in v.items())),
    "head": ("a mapping of the head's parameter names to tensors", _is_tensor_dict),
}


def _layout_problem(state: dict[str, Any], layout: dict[str, tuple[str, Any]]) -> str | None:
    for key, (what, fits) in layout.items():
        if key not in state:
            return f"entry {key!r} is missing"
        if not fits(state[key]):
            return f"entry {key!r} is not {what}"
    return None


def check_resumable(state: dict[str, Any], path: str | Path) -> None:
    """Check the entries a resume needs beyond the weights (see ``RESUME_LAYOUT``).

    Raises:
        CheckpointError: naming the first missing or malformed entry.
    """
    problem = _layout_problem(state, RESUME_LAYOUT)
    if problem:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be resumed: {problem}")


def weights_mismatch(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str | None:
    """The first difference between a model's ``state_dict`` and saved weights, in words
    (``None`` when every name, shape and dtype matches)."""
    missing = [name for name in expected if name not in saved]
    if missing:
        return f"parameter {missing[0]!r} is missing ({len(missing)} missing in all)"
    extra = [name for name in saved if name not in expected]
    if extra:
        return f"parameter {extra[0]!r} is not part of this model ({len(extra)} unknown in all)"
    for name, tensor in expected.items():
        if saved[name].shape != tensor.shape:
            return (f"parameter {name!r} has shape {tuple(saved[name].shape)} in the checkpoint, "
                    f"the model expects {tuple(tensor.shape)}")
        if saved[name].dtype != tensor.dtype:
            return f"parameter {name!r} is {saved[name].dtype} in the checkpoint, the model expects {tensor.dtype}"
    return None


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load saved weights into ``model``, every name, shape and dtype checked.

    Raises:
        CheckpointError: a missing, extra or differently shaped tensor.
    """
    mismatch = weights_mismatch(model.state_dict(), weights)
    if mismatch:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {mismatch}")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {str(error).splitlines()[0]}") from None


def load_head(head: ClassifierHead, weights: dict[str, torch.Tensor], path: str | Path,
              device: torch.device | str | None = None) -> None:
    """Load a saved pseudo-label head, re-created at its saved width on ``device`` (none saved
    before the first clustering: the head stays without a layer).

    Raises:
        CheckpointError: weights that do not fit the head.
    """
    if weights:
        saved = weights.get("linear.weight")
        if saved is None or saved.dim() != 2:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: the head has no 2-d "
                                  "'linear.weight'")
        head.reset(saved.shape[0], device)
    load_weights(head, weights, path)


def load_backbone(path: str | Path) -> tuple[Backbone, Config]:
    """The trained backbone of a checkpoint, in eval mode, and the run's configuration."""
    from deepcluster.config import from_dict
    from deepcluster.models import model_from_config

    saved = load_checkpoint(path)
    config = from_dict(saved["config"])
    model = model_from_config(config)
    load_weights(model, saved["model"], path)
    return model.eval(), config
