"""Fault injection: make a run fail on purpose at a named point, to test recovery.

The tests kill real training processes, fill the "disk" and poison the loss at exact,
repeatable moments. They do it through one environment variable, read at every fault
point (a dictionary lookup, nothing when it is unset)::

    DEEPCLUSTER_FAULT=<action>:<point>:<count>[,<action>:<point>:<count>...]

``<count>`` is 1 for the first time this process reaches ``<point>``, 2 for the second, and
so on; counting starts anew in every process (a resumed run counts from 1 again).

Points (``POINTS``):

- ``features``: before each batch of the clustering's feature pass;
- ``clustering``: after PCA, before k-means / PIC;
- ``training``: before each optimiser step of the training pass (after its loss);
- ``assignments``, ``checkpoint``: halfway through writing the temporary file of an epoch's
  assignments / of the checkpoint, before it is renamed into place;
- ``log``: after the checkpoint, before the epoch's line is appended to ``log.jsonl``.

Actions:

- ``kill``: ``SIGKILL`` to this process, as the kernel's OOM killer or a pre-empting
  scheduler would send: no handler, no cleanup, nothing flushed;
- ``term``: ``SIGTERM`` to this process, as ``kill PID``, a job scheduler or a container
  stop sends: the command line stops as for Ctrl-C;
- an errno name such as ``ENOSPC``, ``EROFS``, ``EACCES``, ``EIO``: raise the ``OSError``
  the operating system would raise (only meaningful at the two write points);
- ``nan``: at ``training`` only, the batch's loss becomes NaN;
- ``oom``: raise the ``RuntimeError`` PyTorch's CPU allocator raises when the operating
  system refuses an allocation.

Example: ``DEEPCLUSTER_FAULT=kill:checkpoint:2`` tears the second checkpoint write.

Under ``torchrun`` every process reads the same environment; ``DEEPCLUSTER_FAULT_RANK=R``
keeps the faults to the process of rank ``R`` (e.g. kill one process of two).

The training loop never calls a fault point itself: ``instrument`` wraps the planner and the
loss it calls; the run folder's writes carry their own points.
"""

from __future__ import annotations

import errno
import math
import os
import signal
from typing import Any, Callable, TypeVar

from deepcluster.config import ConfigError

ENV_VAR = "DEEPCLUSTER_FAULT"
RANK_VAR = "DEEPCLUSTER_FAULT_RANK"
POINTS = ("features", "clustering", "training", "assignments", "checkpoint", "log")

_counts: dict[str, int] = {}
_spec_seen: str | None = None


class FaultSpecError(ConfigError):
    """``DEEPCLUSTER_FAULT`` cannot be parsed; the message says what is allowed."""


def parse(spec: str) -> list[tuple[str, str, int]]:
    """``"kill:training:3,ENOSPC:checkpoint:1"`` -> ``[("kill", "training", 3), ...]``."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        action, point, count = (item.split(":") + ["", ""])[:3]
        valid_action = action in ("kill", "term", "nan", "oom") or (action.startswith("E") and hasattr(errno, action))
        if not valid_action or point not in POINTS or not count.isdigit() or int(count) < 1:
            raise FaultSpecError(
                f"{ENV_VAR}={spec!r}: each fault is <action>:<point>:<count> with action kill, term, nan, oom or an "
                f"errno name (ENOSPC, EROFS, ...), point one of {', '.join(POINTS)}, count >= 1")
        faults.append((action, point, int(count)))
    return faults


def check_environment() -> None:
    """Parse ``DEEPCLUSTER_FAULT`` now, so that a typo stops a run before it starts.

    Raises:
        FaultSpecError: the variable is set but malformed.
    """
    parse(os.environ.get(ENV_VAR, ""))


def reset() -> None:
    """Forget how often each point was reached (for tests that inject faults in-process)."""
    global _spec_seen
    _counts.clear()
    _spec_seen = None


def fault_point(point: str, path: str | os.PathLike | None = None) -> str | None:
    """Count one pass through ``point`` and carry out the fault planned for it, if any.

    Args:
        point: one of ``POINTS``.
        path: the file being written, named in an injected ``OSError``.

    Returns:
        ``"nan"`` when the caller should poison its loss, else ``None`` (``kill`` and errno
        actions do not return).
    """
    global _spec_seen
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return None
    if os.environ.get(RANK_VAR, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return None  # the faults are planned for another process of the job
    if spec != _spec_seen:  # a new plan (tests change it in-process): count afresh
        _counts.clear()
        _spec_seen = spec
    _counts[point] = _counts.get(point, 0) + 1
    for action, planned_point, count in parse(spec):
        if planned_point != point or count != _counts[point]:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "term":
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs its handler before the next line
            return None
        if action == "nan":
            return "nan"
        if action == "oom":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")
        code = getattr(errno, action)
        raise OSError(code, os.strerror(code), None if path is None else os.fspath(path))
    return None


Planner = TypeVar("Planner")


class AtFaultPoint:
    """A network with the ``features`` point before each of its forwards: called, or through
    a ``forward...`` method (``forward_clustered``); everything else is the network's."""

    def __init__(self, network: Any) -> None:
        self.network = network

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fault_point("features")
        return self.network(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.network, name)
        return AtFaultPoint(value) if name.startswith("forward") else value


def instrument(planner: Planner, loss: Callable[..., Any]) -> tuple[Planner, Callable[..., Any]]:
    """Wrap what the training loop calls with the fault points, so the loop mentions none:
    ``features`` before each batch of the planner's feature pass (``planner.reduce``; its
    network, the first argument, wrapped in :class:`AtFaultPoint`), ``clustering`` before its
    clustering (``planner.cluster``), ``training`` after each batch's ``loss`` (a ``nan`` fault
    poisons it). Only with ``DEEPCLUSTER_FAULT`` set when the run starts; without it both are
    returned as they are. The write points live in the run folder.

    Raises:
        FaultSpecError: ``DEEPCLUSTER_FAULT`` is malformed (checked now, before the run starts).
    """
    check_environment()
    if not os.environ.get(ENV_VAR):
        return planner, loss
    reduce, cluster = planner.reduce, planner.cluster

    def reduce_at_fault_point(network: Any, *args: Any, **kwargs: Any) -> Any:
        return reduce(AtFaultPoint(network), *args, **kwargs)

    def cluster_at_fault_point(*args: Any, **kwargs: Any) -> Any:
        fault_point("clustering")
        return cluster(*args, **kwargs)

    def loss_at_fault_point(*args: Any, **kwargs: Any) -> Any:
        value = loss(*args, **kwargs)
        return value * math.nan if fault_point("training") == "nan" else value

    planner.reduce, planner.cluster = reduce_at_fault_point, cluster_at_fault_point
    return planner, loss_at_fault_point


__all__ = ["AtFaultPoint", "ENV_VAR", "POINTS", "FaultSpecError", "check_environment", "fault_point", "instrument", "parse", "reset"]
