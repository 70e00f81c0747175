"""Progress bars for the long stages (feature pass, clustering, training).

A bar is drawn on stderr only when stderr is a terminal, and only by the main process of a
distributed run; redirected to a file or a pipe, nothing is written at all. A bar redraws
one line with a carriage return at most ten times a second and erases that line when it
closes, so the one line per epoch that ``train`` prints to stdout (and ``log.jsonl``) is
never interleaved with bar fragments.

``DEEPCLUSTER_PROGRESS=0`` turns the bars off, ``=1`` forces them on (e.g. for a test).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

from deepcluster import distributed

T = TypeVar("T")
ENV_SWITCH = "DEEPCLUSTER_PROGRESS"
CLEAR_LINE = "\r\033[K"
_DRAWN: list["Progress"] = []  # bars on screen now, erased by ``erase_bars`` before an error message


def bars_enabled(stream: IO[str] | None = None) -> bool:
    """Whether bars are drawn on ``stream`` (default stderr): the environment switch, else
    "is it a terminal, and are we the main process"."""
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return False
    if not distributed.is_main_process():
        return False
    if switch in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """One progress bar: ``with Progress(total, "features") as bar: ... bar.update(n)``.

    Args:
        total: number of steps, or ``None`` when unknown (a counter without a bar).
        description: short name of the stage, drawn first.
        unit: what a step is (``"img"``, ``"it"``), for the rate.
        stream: where to draw (default stderr).
        enabled: force on or off; default :func:`bars_enabled` on ``stream``.
        min_interval: seconds between redraws.
    """

    def __init__(self, total: int | None, description: str, unit: str = "it", stream: IO[str] | None = None,
                 enabled: bool | None = None, min_interval: float = 0.1) -> None:
        self.total = total
        self.description = description
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bars_enabled(self.stream) if enabled is None else enabled
        self.min_interval = min_interval
        self.count = 0
        self.note = ""
        self.start = time.perf_counter()
        self._last_draw = -1.0
        self._drawn = False

    def __enter__(self) -> "Progress":
        self.draw(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, steps: int = 1, note: str | None = None) -> None:
        """Advance by ``steps``; ``note`` replaces the text after the counts (e.g. a loss)."""
        self.count += steps
        if note is not None:
            self.note = note
        self.draw()

    def render(self, width: int) -> str:
        """The bar as one line of at most ``width`` characters."""
        elapsed = time.perf_counter() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if self.total:
            share = min(self.count / self.total, 1.0)
            eta = _duration((self.total - self.count) / rate) if rate > 0 else "?"
            counts = f"{self.count}/{self.total} {100 * share:3.0f}% {rate:.1f} {self.unit}/s eta {eta}"
        else:
            share = None
            counts = f"{self.count} {rate:.1f} {self.unit}/s {_duration(elapsed)}" if self.count else _duration(elapsed)
        tail = f" {counts}" + (f" {self.note}" if self.note else "")
        head = f"{self.description} "
        room = width - len(head) - len(tail) - 2
        if share is not None and room >= 10:
            filled = int(round(share * min(room, 30)))
            bar = "[" + "#" * filled + "." * (min(room, 30) - filled) + "]"
            line = head + bar + tail
        else:
            line = head.rstrip() + tail
        return line[:max(width - 1, 1)]

    def draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval and self.count != self.total:
            return
        self._last_draw = now
        width = shutil.get_terminal_size((100, 24)).columns
        try:
            self.stream.write(CLEAR_LINE + self.render(width))
            self.stream.flush()
            if not self._drawn:
                _DRAWN.append(self)
            self._drawn = True
        except (OSError, ValueError):  # a closed terminal must not stop a run
            self.enabled = False

    def close(self) -> None:
        """Erase the bar's line, leaving the cursor at its start."""
        if self.enabled and self._drawn:
            try:
                self.stream.write(CLEAR_LINE)
                self.stream.flush()
            except (OSError, ValueError):
                pass
        if self in _DRAWN:
            _DRAWN.remove(self)
        self.enabled = False


def erase_bars() -> None:
    """Erase every bar still on screen (a stage stopped by an error leaves its bar drawn);
    the command line calls this before printing an error, so the message starts its own line."""
    for bar in list(_DRAWN):
        bar.close()


def track(items: Iterable[T], total: int | None, description: str, unit: str = "it",
          size=None, enabled: bool | None = None) -> Iterator[T]:
    """Yield ``items`` while drawing a bar; ``size(item)`` steps per item (default 1).

    The bar is erased when the loop ends, breaks or raises.
    """
    with Progress(total, description, unit=unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(size(item) if size is not None else 1)


__all__ = ["ENV_SWITCH", "Progress", "bars_enabled", "erase_bars", "track"]
