"""Peak resident memory per stage (``deepcluster.memory``) in every epoch's log record."""

import json
import mmap
import sys

import numpy as np
import pytest

from deepcluster import memory
from deepcluster.report.build import peak_memory_text

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def touch_fresh(mib: int) -> None:
    """Make ``mib`` MiB of new pages resident, then give them back (fresh pages: the heap may
    hold freed memory that an allocation would reuse without growing the resident set)."""
    block = mmap.mmap(-1, mib * 2**20)
    np.frombuffer(block, dtype=np.uint8)[::4096] = 1  # every page touched
    block.close()


@linux
def test_a_stage_that_allocates_200_mib_peaks_200_mib_higher():
    memory.take()
    with memory.stage("idle"):
        np.zeros(1).sum()
    with memory.stage("busy"):
        touch_fresh(210)  # the resident set drifts by a few MiB besides
    peaks = memory.take()
    assert set(peaks) == {"peak_mib_idle", "peak_mib_busy"} and peaks["peak_mib_idle"] > 0
    assert peaks["peak_mib_busy"] >= peaks["peak_mib_idle"] + 200
    assert memory.take() == {}  # taken once


@linux
def test_an_outer_stage_includes_its_inner_stages_peak():
    memory.take()
    with memory.stage("outer"):
        with memory.stage("inner"):
            touch_fresh(110)
        with memory.stage("after"):
            pass
    peaks = memory.take()
    assert peaks["peak_mib_outer"] >= peaks["peak_mib_inner"] >= peaks["peak_mib_after"] + 100


def test_every_epoch_of_a_run_logs_its_stages_peaks(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    stages = ("features", "pca", "kmeans", "training") if sys.platform.startswith("linux") else ()
    for record in records:
        for stage in stages:
            assert 10 < record[f"peak_mib_{stage}"] < 64 * 1024, (stage, record)
    if stages:
        assert peak_memory_text(records).startswith("features ") and "training" in peak_memory_text(records)


def test_the_report_line_of_peaks():
    records = [{"peak_mib_features": 900.0, "peak_mib_kmeans": 1200.4, "peak_mib_training": 2100.0},
               {"peak_mib_kmeans": 1300.0, "peak_mib_training": 2000.0}]
    assert peak_memory_text(records) == ("features 900, clustering 1,300, training 2,100 MiB "
                                         "(main process, largest over the epochs)")
    assert peak_memory_text([{"time_training": 1.0}]) == ""
