"""Freed memory handed back between stages (``memory.release_freed``) and the paper recipe's
allocator setting: memory only, the numbers stay the same."""

import ctypes.util
import sys

import numpy as np
import pytest

from deepcluster import memory
from deepcluster.config import resolve
from deepcluster.data import CenterView, ImageSource, Normalize
from deepcluster.features import PassSettings, feature_pass

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                           reason="glibc's malloc_trim")


def test_release_freed_is_safe_to_call_again_and_again():
    first = memory.release_freed()
    assert isinstance(first, bool) and memory.release_freed() is first


def test_without_malloc_trim_nothing_is_done(monkeypatch):
    monkeypatch.setattr(memory, "_trim", False)  # another libc, another system
    assert memory.release_freed() is False


@glibc
def test_freed_heap_memory_goes_back_to_the_system():
    """Blocks freed inside glibc's heap stay resident until handed back."""
    if not memory._malloc_trim():
        pytest.skip("not glibc")
    from deepcluster.devices import keep_freed_memory

    keep_freed_memory()  # 1 GiB thresholds: the 64 MiB blocks below come from the heap, not mmap
    memory.release_freed()
    before = resident_mib()
    blocks = [np.ones(8 << 20) for _ in range(4)]  # 4 x 64 MiB, every page touched
    keep = np.ones(1 << 10)  # above them: the heap cannot shrink from its top alone
    del blocks
    assert memory.release_freed() is True
    assert resident_mib() < before + 64, "the freed 256 MiB stayed resident"
    del keep


def resident_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Blank(ImageSource):
    def __len__(self) -> int:
        return 5

    def load(self, index: int):
        from PIL import Image

        return Image.new("RGB", (12, 12), (index * 40, 0, 0))

    def name(self, index: int) -> str:
        return f"{index}.png"


def test_every_feature_pass_hands_back_its_freed_memory(monkeypatch):
    calls, seen = [], []
    monkeypatch.setattr(memory, "release_freed", lambda: calls.append(len(seen)) or True)
    settings = PassSettings(CenterView(8, 8), Normalize((0.5,) * 3, (0.5,) * 3), batch_size=2)
    feature_pass(lambda batch: batch.mean(dim=(2, 3)), Blank(), settings,
                 lambda rows, out, ok: seen.append(len(rows)))
    assert seen == [2, 2, 1] and calls == [3]  # once, after the last batch


def test_the_paper_recipe_keeps_no_freed_memory():
    """Kept, glibc's heap holds the training step's freed blocks and their gaps: a paper epoch
    then peaks 1.4 times as high as the authors' code (docs/results.md)."""
    assert resolve("paper").keep_freed_memory is False and resolve("small").keep_freed_memory is True

