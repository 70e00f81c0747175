"""Pick OpenBLAS's AVX-512 kernels on CPUs that its bundled copies do not recognise.

The OpenBLAS 0.3.15 inside the faiss-cpu wheel predates AMD Zen 5 (CPU family 26) and falls
back to its SSE3 kernels there, which makes faiss's k-means about 2x slower
(docs/notebook/2026-11-23.md, "OpenBLAS core type"). OpenBLAS reads ``OPENBLAS_CORETYPE`` when it loads,
so this must run before faiss is imported; a value the user set is never changed.
"""

from __future__ import annotations

import os
import sys


def cpu_info(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open(path) as handle:
            for line in handle:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def openblas_coretype(info: dict[str, str]) -> str | None:
    """``SkylakeX`` for AVX-512 AMD CPUs of family 26 or later, else None (let OpenBLAS decide)."""
    try:
        family = int(info.get("cpu family", "0"))
    except ValueError:
        return None
    flags = info.get("flags", "").split()
    if info.get("vendor_id") == "AuthenticAMD" and family >= 26 and "avx512f" in flags:
        return "SkylakeX"
    return None


def prefer_avx512_openblas() -> None:
    """Set ``OPENBLAS_CORETYPE`` when the CPU needs it and faiss is not loaded yet."""
    if "OPENBLAS_CORETYPE" in os.environ or not sys.platform.startswith("linux") or "faiss" in sys.modules:
        return
    coretype = openblas_coretype(cpu_info())
    if coretype is not None:
        os.environ["OPENBLAS_CORETYPE"] = coretype
