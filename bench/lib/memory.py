"""``run.py memory``: peak memory of a training run, stage by stage, and (``--page-faults``)
whether ``keep_freed_memory`` keeps the blocks a batch frees for the next batch.

The stages are the loop's own: every epoch's record in log.jsonl (and final.json, for the
final clustering) holds ``peak_mib_<stage>`` for the feature pass, the PCA, k-means and
training, the main process's largest resident set in that stage (``VmHWM``, reset through
``/proc/self/clear_refs`` as the stage starts; ``deepcluster.memory``). Per stage the
table shows the largest over the epochs, and the stage's seconds. Beside them: the whole
run's peak resident set of this process and of its largest child (a data-loading worker:
a process of its own, not in the stage peaks), and the largest summed PSS of the process
tree (workers included, pages they share counted once), sampled every 0.2 s.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib import result as schema
from lib.learning import overrides_of
from lib.machine import PeakSampler

# The loop's stages (log.jsonl's ``peak_mib_<stage>`` and ``time_<stage>``), in order.
LOOP_STAGES = ("features", "pca", "kmeans", "training")


def memory(args) -> int:
    if args.page_faults:
        return page_faults(args)
    from deepcluster.config import resolve
    from deepcluster.train import run as train_run

    overrides = {**overrides_of(args.set), "epochs": args.epochs or 1, "tensorboard": False, "val": args.val}
    if args.train is not None:
        overrides["data"] = args.train
    result = schema.new_result("memory", args.name, {"recipe": args.recipe, "train": args.train, "val": args.val,
                                                     "set": args.set, "budget": {"epochs": overrides["epochs"]}})
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as out:
        config = resolve(args.recipe, overrides={**overrides, "out_dir": out})
        sampler = PeakSampler()
        sampler.start()
        start = time.perf_counter()
        records = train_run(config, log=lambda line: print(line, flush=True))
        wall = time.perf_counter() - start
        pss = sampler.stop()
        final = Path(out) / "final.json"
        stages = stages_of(records, json.loads(final.read_text()) if final.is_file() else None)
    for record in records:
        record["time_budget"] = schema.budget_seconds(record)
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    result["runs"].append(schema.new_run(args.name, recipe=args.recipe, settings=overrides, records=records,
                                         wall_s=wall, threads=config.threads, memory={
                                             "stages": stages, "peak_rss_main_gib": usage,
                                             "peak_rss_children_gib": children, "peak_pss_gib": pss}))
    result["table"] = table(result)
    print(result["table"])
    print(f"wrote {schema.write(result)}")
    return 0


def stages_of(records: list[dict], final: dict | None) -> dict:
    """Per loop stage, the largest ``peak_mib_<stage>`` over the epochs (as ``peak_rss_gib``;
    None where no record has it) and the stage's seconds; then the final clustering's
    largest stage peak (``final``: final.json's summary, None when there is none)."""
    stages = {}
    for stage in LOOP_STAGES:
        peaks = [r[f"peak_mib_{stage}"] for r in records if isinstance(r.get(f"peak_mib_{stage}"), (int, float))]
        stages[stage] = {"peak_rss_gib": max(peaks) / 1024 if peaks else None,
                         "seconds": sum(float(r.get(f"time_{stage}") or 0.0) for r in records)}
    if final is not None:
        peaks = [value for key, value in final.items() if key.startswith("peak_mib_") and isinstance(value, (int, float))]
        stages["final clustering"] = {"peak_rss_gib": max(peaks) / 1024 if peaks else None,
                                      "seconds": sum(float(final.get(key) or 0.0)
                                                     for key in ("time_features", "time_clustering"))}
    return stages


def table(result: dict) -> str:
    m, run = result["machine"], result["runs"][0]
    memory = run["memory"]
    lines = [f"{m['cpu']} ({m['cpu_flags']}), torch {m['torch']}; recipe {run['recipe']}, "
             f"{len(run['records'])} epoch(s)", "",
             "| stage | seconds | peak RSS, main process (GiB) |", "|---|---:|---:|"]
    for name, stage in memory["stages"].items():
        rss = "" if stage["peak_rss_gib"] is None else f"{stage['peak_rss_gib']:.2f}"
        lines.append(f"| {name} | {stage['seconds']:.1f} | {rss} |")
    lines.append(f"| whole run | {run['wall_s']:.1f} | {memory['peak_rss_main_gib']:.2f} |")
    lines.append(f"\nLargest resident set of any one child process (data-loading workers): "
                 f"{memory['peak_rss_children_gib']:.2f} GiB; largest summed PSS of the process and its "
                 f"workers (sampled): {memory['peak_pss_gib']:.2f} GiB")
    return "\n".join(lines)


FAULTS = """
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


def faults_of(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept == "1", int(faults)


def page_faults(args) -> int:
    """Minor page faults of five 64 MiB allocate-use-free steps (as a training step's
    activations) in a fresh process, ``keep_freed_memory`` on and off. Kept, the same block
    comes back already mapped (a few faults); by glibc's default every block is mapped anew,
    page by page. Something outside the allocator now and then faults one whole block in
    once, so the kept case is measured up to five times and its best run counts. Exit status
    1 when the kept case does not fault less than 1/20 of the pages or the default does not
    fault more than half of them; 0 (with a note) where malloc cannot be tuned."""
    kept, faults_kept = faults_of("on")
    if not kept:
        print("not glibc: malloc's thresholds cannot be set here; nothing to measure")
        return 0
    pages = 5 * (64 << 20) // 4096
    for _ in range(4):
        if faults_kept < pages // 20:
            break
        faults_kept = min(faults_kept, faults_of("on")[1])
    _, faults_default = faults_of("off")
    ok = faults_default > pages // 2 and faults_kept < pages // 20
    result = schema.new_result("page_faults", args.name, {"steps": 5, "block_mib": 64, "pages": pages})
    result["summary"] = {"faults_kept": faults_kept, "faults_default": faults_default, "as_expected": ok}
    result["table"] = (f"minor page faults over 5 steps of 64 MiB ({pages} pages touched): "
                       f"keep_freed_memory on {faults_kept}, off {faults_default}\n"
                       + ("as expected" if ok else "NOT as expected: kept < 1/20 of the pages and default > 1/2 wanted"))
    print(result["table"])
    print(f"wrote {schema.write(result)}")
    return 0 if ok else 1
