"""Peak resident memory of this process, stage by stage, for an epoch's log record.

``with stage("kmeans"): ...`` notes the largest resident set (in MiB) the process had while
the block ran; :func:`take` hands an epoch's notes to its record as ``peak_mib_<stage>``
fields (beside the ``time_<stage>`` ones) and starts afresh.

On Linux the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``) is reset at the
start of a stage (writing ``5`` to ``/proc/self/clear_refs``) and read at its end: an
exact peak of that stage, whatever ran before it. Where the reset is refused, or on other
systems, ``resource.getrusage``'s ``ru_maxrss`` is read instead: the peak since the process
started, which cannot be reset, so a stage shows at least the peak of every stage before
it. Where neither exists (Windows) no stage is noted.

Stages may nest: an outer stage's peak includes its inner stages'. Only this process is
measured (not the data-loading workers); with several processes, each its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
_peaks: dict[str, float] = {}  # stage -> MiB, since the last ``take``
_open: list[list] = []  # the stages in progress, outermost first: [name, running peak in MiB]
_resettable: bool | None = None  # whether the kernel lets this process reset its peak (tried once)


def _hwm_mib() -> float | None:
    """The high-water mark of the resident set since the last reset, in MiB (None: unknown)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset() -> bool:
    """Reset the high-water mark to the current resident set; False where not allowed."""
    global _resettable
    if _resettable is False:
        return False
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
        _resettable = True
    except OSError:
        _resettable = False
    return _resettable


def _maxrss_mib() -> float | None:
    """The largest resident set since the process started, in MiB (None: unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def current_peak_mib() -> float | None:
    """The peak resident set since the last reset (or since the start, where it cannot be reset)."""
    return (_hwm_mib() if _resettable else None) or _maxrss_mib()


def _fold(peak: float | None) -> None:
    """Count ``peak`` in every stage in progress."""
    if peak is not None:
        for entry in _open:
            entry[1] = max(entry[1], peak)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Note the peak resident set while the block runs as stage ``name`` (the larger, if
    the stage runs more than once before :func:`take`)."""
    if _open:
        _fold(current_peak_mib())  # the outer stages keep what they reached so far
    _reset()
    _open.append([name, 0.0])
    try:
        yield
    finally:
        _fold(current_peak_mib())
        _, peak = _open.pop()
        if peak > 0:
            _peaks[name] = max(_peaks.get(name, 0.0), round(peak, 1))


def take() -> dict[str, float]:
    """The stages noted since the last call, as ``{"peak_mib_<stage>": MiB}``; forgets them."""
    taken = {f"peak_mib_{name}": value for name, value in _peaks.items()}
    _peaks.clear()
    return taken


_trim: Any = None  # glibc's malloc_trim once looked up; False where there is none


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (looked up once), or False (another libc, another system)."""
    global _trim
    if _trim is None:
        _trim = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.gnu_get_libc_version  # glibc only: another libc has no malloc_trim
                trim = libc.malloc_trim
                trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
                _trim = trim
            except (OSError, AttributeError):
                pass
    return _trim


def release_freed() -> bool:
    """Give the system back the memory this process has freed but malloc still holds
    (glibc's ``malloc_trim(0)``: the free top of every heap, and the free pages inside
    them); False where there is no such call (nothing done).

    With ``keep_freed_memory`` glibc keeps freed blocks of up to 1 GiB for reuse: within a
    stage the blocks a batch frees fit the next batch's, but a stage's blocks seldom fit the
    next stage's (the feature pass's activations are not the training step's), so without
    this they stay resident beside the next stage's and raise its peak. The numbers do not
    change; the next stage maps its first blocks anew, once.
    """
    trim = _malloc_trim()
    if not trim:
        return False
    trim(0)
    return True


# The record keys :func:`take` can give, one per stage the loop measures: like the stage
# times, they depend on the machine's state, not on the run's settings and data.
PEAK_KEYS = ("peak_mib_features", "peak_mib_pca", "peak_mib_kmeans", "peak_mib_training")

__all__ = ["PEAK_KEYS", "current_peak_mib", "release_freed", "stage", "take"]
