"""What the benchmarks say about the machine they ran on, and how much memory a process
tree holds. Every speed figure in docs/notebook/ is printed beside these."""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
from pathlib import Path


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The vector flags that decide which kernels PyTorch, oneDNN and BLAS pick."""
    flags = (_cpuinfo_field("flags") or "").split()
    return " ".join(f for f in flags if f.startswith(("avx", "amx", "fma")))


def machine_info() -> dict:
    """The machine a result was measured on: every result file's ``machine``."""
    import torch

    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "platform": sys.platform}


def tree_pss_gib(root: int) -> float:
    """Summed proportional set size of ``root`` and its descendants, GiB (pages shared
    between a process and its forked workers counted once)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total_kib, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 2**20


def write_result(path: Path, result: dict) -> None:
    """Write a benchmark's result as JSON, then print its table and where it went."""
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(result["table"])
    print(f"wrote {path}")


class PeakSampler(threading.Thread):
    """Samples a process tree's total PSS until stopped; ``peak`` is the largest seen."""

    def __init__(self, root: int | None = None, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root = os.getpid() if root is None else root
        self.interval, self.peak, self._stop_event = interval, 0.0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_pss_gib(self.root))
            self._stop_event.wait(self.interval)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.peak
