"""``run.py memory``: peak memory of a training run, stage by stage, and (``--page-faults``)
whether ``keep_freed_memory`` keeps the blocks a batch frees for the next batch.

Stages are told apart by wrapping, in this process, what the training loop calls: the
planner's ``plan`` (feature pass and clustering), the monitor's measuring (what lies between
the plan and training), ``train_one_epoch``, the commit of the epoch, and the final
clustering. Per stage: the main process's peak resident set (``VmHWM``, reset at every stage
change through ``/proc/self/clear_refs``; None where the kernel does not allow it), and the
largest summed PSS of the process and its data-loading workers, sampled every 0.1 s.
The loop resets the same mark at its own stages (``deepcluster.memory``, the
``peak_mib_<stage>`` fields of log.jsonl and final.json), so a stage's peak here is the larger
of the meter's reading and the log's peaks of the loop's stages inside it.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lib import result as schema
from lib.learning import overrides_of
from lib.machine import tree_pss_gib


def vm_hwm_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StageMeter:
    """Peak memory per stage; ``enter(name)`` closes the stage in progress."""

    def __init__(self, interval: float = 0.1):
        self.stage, self.stages, self.interval = "setup", {}, interval
        self.exact = reset_peak()
        self._since = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _entry(self, name: str) -> dict:
        return self.stages.setdefault(name, {"peak_rss_gib": None, "sampled_pss_gib": 0.0, "seconds": 0.0})

    def _sample(self) -> None:
        while not self._stop.is_set():
            entry = self._entry(self.stage)
            entry["sampled_pss_gib"] = max(entry["sampled_pss_gib"], tree_pss_gib(os.getpid()))
            self._stop.wait(self.interval)

    def enter(self, name: str) -> None:
        entry = self._entry(self.stage)
        if self.exact:
            entry["peak_rss_gib"] = max(entry["peak_rss_gib"] or 0.0, vm_hwm_gib())
            reset_peak()
        now = time.perf_counter()
        entry["seconds"] += now - self._since
        self._since, self.stage = now, name

    def stop(self) -> dict:
        self.enter("done")
        self._stop.set()
        self._thread.join()
        self.stages.pop("done", None)
        return self.stages


def wrap(meter: StageMeter, function, stage: str, after: str):
    def wrapped(*args, **kwargs):
        meter.enter(stage)
        try:
            return function(*args, **kwargs)
        finally:
            meter.enter(after)
    return wrapped


def instrumented(meter: StageMeter):
    """Patch the loop's names in ``deepcluster.train`` (where they exist) to tell the stages."""
    import deepcluster.train as loop

    found = []
    if hasattr(loop, "train_one_epoch"):
        loop.train_one_epoch = wrap(meter, loop.train_one_epoch, "training", "commit")
        found.append("training")
    if hasattr(loop, "instrument"):
        inner = loop.instrument

        def instrument(planner, loss):
            planner, loss = inner(planner, loss)
            planner.plan = wrap(meter, planner.plan, "features and clustering", "monitor")
            planner.final_clustering = wrap(meter, planner.final_clustering, "final clustering", "commit")
            return planner, loss
        loop.instrument = instrument
        found.append("features and clustering")
    return found


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
        meter = StageMeter()
        patched = instrumented(meter)
        start = time.perf_counter()
        records = train_run(config, log=lambda line: print(line, flush=True))
        wall = time.perf_counter() - start
        stages = with_log_peaks(meter.stop(), records, Path(out) / "final.json")
    for record in records:
        record["time_budget"] = schema.budget_seconds(record)
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    result["runs"].append(schema.new_run(args.name, recipe=args.recipe, settings=overrides, records=records,
                                         wall_s=wall, threads=config.threads, memory={
                                             "stages": stages, "stages_told_apart": patched,
                                             "exact_per_stage": meter.exact, "peak_rss_main_gib": usage,
                                             "peak_rss_children_gib": children,
                                             "peak_pss_gib": max((s["sampled_pss_gib"] for s in stages.values()),
                                                                 default=0.0)}))
    result["table"] = table(result)
    print(result["table"])
    print(f"wrote {schema.write(result)}")
    return 0


# The meter's stages and the loop's (log.jsonl's ``peak_mib_<stage>``) inside each.
LOOP_STAGES = {"features and clustering": ("features", "pca", "kmeans"), "training": ("training",)}


def with_log_peaks(stages: dict, records: list[dict], final: Path) -> dict:
    """``stages`` with each peak RSS raised to the run's own peaks of the stages inside it."""
    import json

    summaries = {"final clustering": [json.loads(final.read_text())] if final.is_file() else []}
    for name, entry in stages.items():
        inner = LOOP_STAGES.get(name, ("features", "pca", "kmeans"))
        peaks = [r[f"peak_mib_{stage}"] / 1024 for r in summaries.get(name, records) for stage in inner
                 if isinstance(r.get(f"peak_mib_{stage}"), (int, float))]
        if peaks and name in (*LOOP_STAGES, *summaries):
            entry["peak_rss_gib"] = max([entry["peak_rss_gib"] or 0.0, *peaks])
    return stages


def table(result: dict) -> str:
    m, run = result["machine"], result["runs"][0]
    memory = run["memory"]
    lines = [f"{m['cpu']} ({m['cpu_flags']}), torch {m['torch']}; recipe {run['recipe']}, "
             f"{len(run['records'])} epoch(s)", "",
             "| stage | seconds | peak RSS, main process (GiB) | peak PSS, with workers (GiB, sampled) |",
             "|---|---:|---:|---:|"]
    for name, stage in memory["stages"].items():
        rss = "" if stage["peak_rss_gib"] is None else f"{stage['peak_rss_gib']:.2f}"
        lines.append(f"| {name} | {stage['seconds']:.1f} | {rss} | {stage['sampled_pss_gib']:.2f} |")
    lines.append(f"| whole run | {run['wall_s']:.1f} | {memory['peak_rss_main_gib']:.2f} | "
                 f"{memory['peak_pss_gib']:.2f} |")
    lines.append(f"\nLargest resident set of any one child process (data-loading workers): "
                 f"{memory['peak_rss_children_gib']:.2f} GiB")
    for record in run["records"]:  # the run's own per-stage peaks (log.jsonl's peak_mib_<stage>)
        peaks = ", ".join(f"{key[9:]} {value / 1024:.2f}" for key, value in record.items() if key.startswith("peak_mib_"))
        if peaks:
            lines.append(f"Epoch {record['epoch']} in log.jsonl, peak RSS per stage (GiB): {peaks}")
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
