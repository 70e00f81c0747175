"""``precision: auto``: bfloat16 autocast where it is measured faster, float32 elsewhere.

At the start of a run with ``precision: auto`` (:func:`resolve_precision`), the run's own
network (built as the run builds it, then thrown away) takes a few training steps (forward,
loss, backward) on random images of the run's crop size, alternately in float32 and under
bfloat16 autocast, each timed after one untimed step of each. bf16 is chosen when its best
step is faster than float32's and the hardware computes in bf16 natively: a CPU with the
``avx512_bf16`` or ``amx_bf16`` flag (elsewhere the CPU emulates it, and no measurement is
made), or a CUDA GPU that supports bf16. The choice is written into the run's settings, so
``config.yaml`` and the checkpoint hold ``fp32`` or ``bf16`` and a resume uses the same.

The measured speed-up is cached per device (CPU model or GPU name), torch version, machine
and network (method, architecture, crop size) in ``deepcluster/precision.json`` under
``$XDG_CACHE_HOME`` (default ``~/.cache``), never in the run folder; set
``DEEPCLUSTER_PRECISION_CACHE=off`` to measure every time and keep nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from deepcluster import distributed
from deepcluster.features import autocast

if TYPE_CHECKING:
    from deepcluster.config import Config

CACHE_ENV = "DEEPCLUSTER_PRECISION_CACHE"  # "off" (or 0, no, false): no cache read or written
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute in bf16
MAX_STEPS = 3  # timed steps per precision, at most
BUDGET_S = 6.0  # no further timed steps once the calibration (building included) has taken this long
MAX_BATCH = 16  # images per calibration step, at most (at crops up to 96 px; fewer above, 4 or more)


@dataclass
class Choice:
    """What ``auto`` resolved to: ``precision`` (fp32 or bf16), bf16's speed over fp32
    (None: not measured), the timed steps per precision, and whether it came from the cache."""

    precision: str
    speedup: float | None = None
    steps: int = 0
    cached: bool = False

    def line(self, where: str) -> str:
        """One line for the terminal; ``where``: "this CPU", "this GPU"."""
        if self.speedup is None:
            lacks = "no bf16 support" if "GPU" in where else f"no native bf16: no {' or '.join(BF16_FLAGS)} flag"
            return f"precision auto: fp32 ({where} has {lacks}; not measured)"
        measured = f"measured on {self.steps} batch{'es' if self.steps != 1 else ''}" + (
            ", cached" if self.cached else "")
        if self.precision == "bf16":
            return f"precision auto: bf16 ({self.speedup:.2f}x faster than fp32 on {where}, {measured})"
        return f"precision auto: fp32 (bf16 ran at {self.speedup:.2f}x the speed of fp32 on {where}, {measured})"


def cpu_info(field: str) -> str:
    """The first ``field`` line of ``/proc/cpuinfo`` ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == field:
                return value.strip()
    except OSError:
        pass
    return ""


def native_bf16(device: torch.device, flags: str | None = None) -> bool:
    """Whether ``device`` computes in bf16 natively (``flags``: the CPU's, else read)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    present = set((cpu_info("flags") if flags is None else flags).split())
    return any(flag in present for flag in BF16_FLAGS)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_info("model name") or platform.processor() or "unknown CPU"


def cache_key(config: Config, device: torch.device) -> str:
    """What the speed-up depends on: the device, torch, the machine and the network."""
    return (f"{device_name(device)} | torch {torch.__version__} | {platform.machine()} | "
            f"{config.method} {config.arch}{' sobel' if config.sobel else ''} {config.crop}px")


def cache_path() -> Path | None:
    """The cache file, or None when ``DEEPCLUSTER_PRECISION_CACHE`` turns caching off."""
    if os.environ.get(CACHE_ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepcluster" / "precision.json"


def read_cache(key: str) -> dict | None:
    """The cached measurement for ``key`` (None: none, or an unreadable cache)."""
    path = cache_path()
    try:
        entry = json.loads(path.read_text()).get(key) if path is not None else None
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(entry, dict) and isinstance(entry.get("speedup"), (int, float)) and entry.get("steps")
    return entry if ok else None


def write_cache(key: str, speedup: float, steps: int) -> None:
    """Add ``key``'s measurement to the cache (a cache that cannot be written is left alone)."""
    path = cache_path()
    if path is None:
        return
    try:
        try:
            entries = json.loads(path.read_text())
            entries = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            entries = {}
        entries[key] = {"speedup": round(speedup, 4), "steps": steps}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        temporary.replace(path)
    except OSError:
        pass


def calibrate(config: Config, device: torch.device) -> tuple[float, int]:
    """bf16's speed over fp32 for training steps of the run's network, and the steps timed
    per precision. The global random state is left as it was."""
    from deepcluster.methods.registry import METHODS
    from deepcluster.models.heads import ClassifierHead

    method, began = METHODS[config.method], time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model, head, _ = method.build(config, device)
        if isinstance(head, ClassifierHead):  # v1's head has no layer before its first clustering
            head.reset(max(2, config.n_clusters), device)
        network = method.network(model, head).to(device).train()
        batch = min(config.batch_size, max(4, MAX_BATCH * 96**2 // config.crop**2), MAX_BATCH)
        images = torch.randn(batch, 3, config.crop, config.crop, device=device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        def step(bf16: bool) -> float:
            start = time.perf_counter()
            with autocast(device, bf16):
                _, scores = network([images])
            sum(s.float().mean() for s in scores).backward()
            network.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        times: dict[bool, list[float]] = {False: [], True: []}
        step(False), step(True)  # untimed: one-time costs (kernel choice, allocation)
        while len(times[True]) < MAX_STEPS and (not times[True] or time.perf_counter() - began < BUDGET_S):
            for bf16 in (False, True):
                times[bf16].append(step(bf16))
    return min(times[False]) / min(times[True]), len(times[True])


def choose(config: Config, device: torch.device, flags: str | None = None,
           measure: Callable[[Config, torch.device], tuple[float, int]] | None = None) -> Choice:
    """What ``auto`` means for ``config`` on ``device``: fp32 without measuring where the
    hardware has no native bf16; else bf16 when ``measure`` (default :func:`calibrate`;
    cached) finds it faster."""
    if not native_bf16(device, flags):
        return Choice("fp32")
    key = cache_key(config, device)
    cached = read_cache(key)
    if cached is not None:
        speedup, steps = float(cached["speedup"]), int(cached["steps"])
    else:
        speedup, steps = (measure or calibrate)(config, device)
        write_cache(key, speedup, steps)
    return Choice("bf16" if speedup > 1.0 else "fp32", speedup, steps, cached is not None)


def saved_precision(config: Config) -> str | None:
    """The precision a run in ``config.run_dir`` resolved when it started (None: none saved)."""
    from deepcluster.run_files import saved_settings

    try:
        saved = saved_settings(config.run_dir)
    except Exception:  # noqa: BLE001 - the run's setup reports an unreadable folder, in its words
        return None
    precision = saved.get("precision") if isinstance(saved, dict) else None
    return precision if precision in ("fp32", "bf16") else None


def resolve_precision(config: Config, device: torch.device, log: Callable[[str], None] = print,
                      resume: bool = False) -> Config:
    """``config`` with ``precision: auto`` replaced by the choice of :func:`choose` (made by
    the main process and sent to the others), or when it ``resume``s by the one the run
    saved; any other precision as it is."""
    if config.precision != "auto":
        return config
    saved = saved_precision(config) if resume else None
    if saved is not None:
        return dataclasses.replace(config, precision=saved)
    bf16 = torch.zeros(1)
    if distributed.is_main_process():
        choice = choose(config, device)
        log(choice.line("this GPU" if device.type == "cuda" else "this CPU"))
        bf16[0] = float(choice.precision == "bf16")
    if distributed.is_distributed():
        bf16 = distributed.broadcast(bf16, 0)
    return dataclasses.replace(config, precision="bf16" if bool(bf16[0]) else "fp32")


__all__ = ["BF16_FLAGS", "CACHE_ENV", "Choice", "cache_path", "calibrate", "choose", "native_bf16",
           "resolve_precision"]
