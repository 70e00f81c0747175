"""``run.py cost``: what an epoch costs. Every side (a recipe, a recipe with settings of its
own, P torchrun processes, another commit, this tree with one setting changed) is a fresh
``deepcluster train`` process, one after the other and in turn (``--repeats`` rounds), on the
same images; stage seconds from each run's ``log.jsonl``, peak memory of every process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from lib import result as schema
from lib.learning import overrides_of
from lib.machine import PeakSampler
from lib.trees import checkout, env_for, folder_to_use

STAGES = ("time_features", "time_pca", "time_kmeans", "time_clustering", "time_training", "time_monitor")

# Runs ``deepcluster train`` (argv[2:]) of whichever package is importable, then records this
# process's peak resident memory and its children's (data-loading workers) beside the run.
ENTRY = """
import json, os, resource, sys
from deepcluster.cli import main


def record(code):
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(sys.argv[1], f"rss_{rank}.json"), "w") as out:
        json.dump({"rank": rank, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                   "children_peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
                   "exit_code": code}, out)


leave = os._exit  # a torchrun process of the package ends through os._exit (deepcluster.distributed.leave)
os._exit = lambda code: (record(code), leave(code))
code = main(sys.argv[2:])
record(code)
sys.exit(code)
"""

def parse_entry(entry: str) -> tuple[str, dict]:
    """``RECIPE`` or ``RECIPE:key=value,key=value`` -> (recipe, its own settings)."""
    from deepcluster.config import coerce

    recipe, _, pairs = entry.partition(":")
    items = (item.split("=", 1) for item in pairs.split(",") if item)
    return recipe, {key: coerce(key, value) for key, value in items}


def sides_of(args, common: dict, against: tuple[Path, str] | None) -> list[dict]:
    """Every side to run: (label, tree, recipe, settings, processes, threads)."""
    sides = []
    many = len(args.processes) > 1
    for entry in args.recipes:
        recipe, own = parse_entry(entry)
        for processes in args.processes:
            threads = max(1, args.cores // processes) if (many or processes > 1) else args.threads
            settings = {**common, **own, **({"threads": threads} if threads else {})}
            label = entry + (f", {processes} process(es)" if many else "")
            side = {"label": label, "tree": None, "tree_name": "this tree", "recipe": recipe, "settings": settings,
                    "processes": processes, "threads": threads}
            if against:
                sides.append({**side, "label": f"{label} @{against[1]}", "tree": against[0], "tree_name": against[1]})
            sides.append(side)
            for also in args.also:
                key, _, value = also.partition("=")
                sides.append({**side, "label": f"{label}, {also}", "settings": {**settings, key: yaml.safe_load(value)}})
    return sides


def run_side(side: dict, data: Path | None, scratch: Path, round_: int) -> dict:
    """One ``deepcluster train`` of a side; its records, pseudo-labels and peak memory."""
    out = scratch / f"side{abs(hash(side['label'])) % 10**8}_{round_}"
    out.mkdir(parents=True)
    settings = out / "settings.yaml"
    settings.write_text(yaml.safe_dump(side["settings"]))
    entry = scratch / "entry.py"
    entry.write_text(ENTRY)
    train = ["train", "--recipe", side["recipe"], "--config", str(settings), "--out", str(out / "run")]
    train += ["--data", str(data)] if data is not None else []
    launcher = [sys.executable] if side["processes"] == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={side['processes']}"]
    start = time.perf_counter()
    with (out / "output.log").open("w") as handle:
        process = subprocess.Popen([*launcher, str(entry), str(out), *train], stdout=handle, stderr=subprocess.STDOUT,
                                   env=env_for(side["tree"], side["threads"]), cwd=side["tree"] or schema.ROOT)
        sampler = PeakSampler(process.pid)
        sampler.start()
        code = process.wait()
        peak = sampler.stop()
    if code != 0:
        tail = (out / "output.log").read_text()[-2000:]
        raise SystemExit(f"run.py cost: {side['label']} failed (exit {code}):\n{tail}")
    records = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
    for record in records:
        record["time_budget"] = schema.budget_seconds(record)
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rss_*.json")), key=lambda r: r["rank"])
    labels = [np.load(p) for p in sorted((out / "run" / "assignments").glob("epoch_*.npy"))]
    return {"wall_s": time.perf_counter() - start, "records": records, "labels": labels,
            "memory": {"peak_pss_gib": peak, "per_process": ranks}}


def mean_stages(records: list[dict]) -> dict:
    """Mean seconds per stage, the first epoch left out when there are more (it warms up)."""
    chosen = records[1:] if len(records) > 1 else records
    means = {key[len("time_"):]: float(np.mean([r.get(key, 0.0) for r in chosen])) for key in STAGES}
    means["epoch"] = float(np.mean([r["time_budget"] for r in chosen])) if chosen else 0.0
    return means


def compare_labels(runs: list[dict]) -> dict:
    """Do the sides give the same pseudo-labels every epoch, and how far apart are their losses?"""
    first, others = runs[0], runs[1:]
    same = all(np.array_equal(a, b) for run in others for base in first["rounds"] for other in run["rounds"]
               for a, b in zip(base["labels"], other["labels"]))
    diffs = [abs(a.get("train_loss", 0.0) - b.get("train_loss", 0.0)) for run in others
             for base in first["rounds"] for other in run["rounds"] for a, b in zip(base["records"], other["records"])]
    return {"same_labels": same, "loss_difference": max(diffs) if diffs else None}


def cost(args) -> int:
    if args.reference:
        from lib.reference import versus_reference
        return versus_reference(args)
    common = {"epochs": args.epochs, "tensorboard": False, "val": None, "final_clustering": False}
    common.update({k: v for k, v in (("workers", args.workers),) if v is not None})
    common.update(overrides_of(args.set))
    result = schema.new_result("cost", args.name, {
        "recipes": args.recipes, "data": args.data, "images": args.images, "epochs": args.epochs, "set": args.set,
        "processes": args.processes, "cores": args.cores, "against": args.against, "also": args.also,
        "repeats": args.repeats})
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as scratch, \
            (checkout(args.against) if args.against else contextlib.nullcontext()) as against:
        scratch = Path(scratch)
        data, n_images = folder_to_use(args.data, args.images, scratch)
        result["settings"]["n_images"] = n_images
        sides = sides_of(args, common, against)
        rounds: dict[str, list] = {side["label"]: [] for side in sides}
        for round_ in range(args.repeats):
            for side in sides:
                print(f"cost: round {round_ + 1}, {side['label']} ...", flush=True)
                rounds[side["label"]].append(run_side(side, data, scratch, round_))
        if args.limits:
            from lib.limits import limits
            print("cost: measuring the limits ...", flush=True)
            result["summary"]["limits"] = limits(Path(args.data).resolve() if args.data else None,
                                                 args.threads or os.cpu_count() or 1)
    result["runs"] = [run_of(side, rounds[side["label"]], n_images) for side in sides]
    finish(result, against is not None or bool(args.also))
    print(result["table"])
    print(f"wrote {schema.write(result)}")
    return 0


def run_of(side: dict, got: list[dict], n_images: int) -> dict:
    """A side's run of the result: its first round's records, every round, the means."""
    return schema.new_run(
        side["label"], side["tree_name"], recipe=side["recipe"], settings=side["settings"],
        processes=side["processes"], threads=side["threads"], records=got[0]["records"],
        rounds=[{"wall_s": g["wall_s"], "records": g["records"], "memory": g["memory"]} for g in got],
        wall_s=float(np.mean([g["wall_s"] for g in got])), mean=_mean_rounds(got), images=n_images,
        memory={"peak_pss_gib": max(g["memory"]["peak_pss_gib"] for g in got),
                "per_process": got[-1]["memory"]["per_process"]}, labels_rounds=got)


def _mean_rounds(got: list[dict]) -> dict:
    means = [mean_stages(g["records"]) for g in got]
    return {key: float(np.mean([m[key] for m in means])) for key in means[0]}


def finish(result: dict, compare: bool) -> None:
    """Ratios to the first side, the pseudo-label comparison, the table; labels dropped."""
    runs = result["runs"]
    if compare and len(runs) > 1:
        result["summary"].update(compare_labels([{"rounds": run["labels_rounds"]} for run in runs]))
    for run in runs:
        run.pop("labels_rounds")
    base = runs[0]["mean"]
    result["summary"]["ratios"] = {run["label"]: {k: run["mean"][k] / max(base[k], 1e-9) for k in base}
                                   for run in runs[1:]}
    result["table"] = table(result)


def table(result: dict) -> str:
    m = result["machine"]
    n = result["settings"]["n_images"]
    lines = [f"{m['cpu']} ({m['cpu_flags']}), torch {m['torch']}; {n} images, {result['settings']['epochs']} epoch(s); "
             "means leave the first epoch out when there are more",
             "", "| side | tree | features s | clustering s | training s | epoch s | ms/image | ratio | peak GiB "
             "(PSS, all processes) | peak RSS per process GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = result["runs"][0]["mean"]["epoch"] if result["runs"] else 1.0
    for run in result["runs"]:
        mean, memory = run["mean"], run["memory"]
        ranks = ", ".join(f"{p['peak_rss_gib']:.2f}" for p in memory["per_process"])
        lines.append(f"| {run['label']} | {run['tree']} | {mean['features']:.2f} | {mean['clustering']:.2f} | "
                     f"{mean['training']:.2f} | {mean['epoch']:.2f} | {1000 * mean['epoch'] / max(n, 1):.2f} | "
                     f"{mean['epoch'] / max(base, 1e-9):.2f} | {memory['peak_pss_gib']:.2f} | {ranks} |")
    summary = result["summary"]
    if "same_labels" in summary:
        lines += ["", f"Same pseudo-labels every epoch and round: {summary['same_labels']}; largest loss difference "
                      f"{summary['loss_difference']:.2e}"]
    if "limits" in summary:
        from lib.limits import limits_table
        lines += ["", limits_table(summary["limits"], result)]
    return "\n".join(lines)
