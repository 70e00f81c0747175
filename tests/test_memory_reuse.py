"""``keep_freed_memory``: glibc keeps the blocks a batch frees for the next batch instead of
returning them to the kernel. Its effect on page faults is measured by
``bench/run.py memory --page-faults`` (a measurement, not a test: the machine adds noise)."""

import ctypes.util
import platform


def test_it_is_a_setting_a_resume_may_change():
    from deepcluster.config import RESUMABLE, Config

    assert Config().keep_freed_memory is True and "keep_freed_memory" in RESUMABLE


def test_it_takes_effect_with_glibc():
    from deepcluster.devices import keep_freed_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and bool(ctypes.util.find_library("c"))
    assert keep_freed_memory() is expected
