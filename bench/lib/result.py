"""The one result schema of ``bench/run.py`` (described in ``bench/README.md``), and reading
the result files the older scripts wrote into it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from lib.machine import machine_info

SCHEMA = "deepcluster-bench/1"
KINDS = ("learning", "cost", "memory", "drift", "page_faults")
BENCH = Path(__file__).resolve().parent.parent
RESULTS = BENCH / "results"
ROOT = BENCH.parent


def tree_label(tree: Path = ROOT) -> str:
    """A checkout's short commit, with ``+changes`` when its tracked files differ from it."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return tree.name
    dirty = subprocess.run(["git", "-C", str(tree), "diff", "--quiet", "HEAD", "--", "src"], capture_output=True)
    return head.stdout.strip() + ("+changes" if dirty.returncode == 1 else "")


def new_result(kind: str, name: str, settings: dict) -> dict:
    """An empty result: what was asked, where, on what; ``runs`` and ``summary`` to fill."""
    assert kind in KINDS, kind
    return {"schema": SCHEMA, "kind": kind, "name": name,
            "command": " ".join(["python", "bench/run.py"] + sys.argv[1:]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tree": tree_label(),
            "machine": machine_info(), "settings": settings, "baselines": {}, "runs": [], "summary": {}, "table": ""}


def new_run(label: str, tree: str = "this tree", **fields) -> dict:
    """One run of a result: its label, the code it ran (``this tree``, a commit, ``authors' code``)."""
    return {"label": label, "tree": tree, "recipe": None, "settings": {}, "processes": 1, "records": [],
            "final": None, "wall_s": None, "memory": {}, **fields}


def path_of(kind: str, name: str) -> Path:
    return results_folder() / f"{kind}_{name}.json"


def results_folder() -> Path:
    """Where results go: ``bench/results``, or ``run.py --results``."""
    return RESULTS


def write(result: dict, path: Path | None = None) -> Path:
    path = path or path_of(result["kind"], result["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return path


def budget_seconds(record: dict) -> float:
    """An epoch's training seconds: features, clustering and training, not the measuring."""
    return float(record.get("time_features", 0.0)) + float(record.get("time_clustering", 0.0)) + float(
        record.get("time_training", 0.0))


def load(path: str | Path) -> dict:
    """A result file in this schema; a file of the older scripts is converted on the way."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") == SCHEMA:
        return data
    return convert(data, Path(path))


def _old_machine(data: dict) -> dict:
    machine = data.get("machine")
    cpu = data.get("cpu") or (machine if isinstance(machine, str) else (machine or {}).get("cpu"))
    return {"cpu": cpu, "cpu_flags": data.get("cpu_flags") or data.get("flags"), "cores": data.get("cores"),
            "torch": data.get("torch"), "threads": data.get("threads")}


def in_percent(record: dict | None) -> dict | None:
    """An older log record with its accuracies as fractions (``cluster_acc``, ``purity``), in
    percent as log.jsonl holds them now."""
    if not record:
        return record
    return {**record, **{key: 100.0 * record[key] for key in ("cluster_acc", "purity") if record.get(key) is not None}}


def convert(data: dict, path: Path) -> dict:
    """An older script's result as this schema (``learning_*``, ``sweep_*``, ``epoch_cost_*``,
    ``paper_epoch_*``, ``processes_*``, ``small_epoch_*``, ``vs_reference_*``)."""
    stem = path.stem
    result = {"schema": SCHEMA, "name": data.get("name", stem), "command": data.get("command"), "created": None,
              "tree": None, "machine": _old_machine(data), "settings": {}, "baselines": {}, "runs": [],
              "summary": {}, "table": data.get("table", ""), "converted_from": path.name}
    if "records" in data:  # learning.py
        result.update(kind="learning", settings={"recipe": data.get("recipe"), "set": data.get("settings"),
                                                 "budget": {"minutes": data.get("budget_minutes")}})
        result["baselines"] = {k: data[k] for k in ("random_bn", "raw_pixels") if data.get(k)}
        result["runs"] = [new_run(data.get("name", stem), recipe=data.get("recipe"), settings=data.get("settings", {}),
                                  records=[in_percent(r) for r in data["records"]], final=in_percent(data.get("final")),
                                  wall_s=60.0 * data["wall_minutes"] if data.get("wall_minutes") else None)]
    elif "rows" in data:  # sweep.py: the per-epoch points of every variant
        result.update(kind="learning", settings={"recipe": data.get("recipe"), "train": data.get("train"),
                                                 "val": data.get("val"), "budget": {"epochs": data.get("epochs")}})
        result["baselines"] = {k: data[k] for k in ("random_bn", "raw_pixels") if data.get(k)}
        result["summary"] = {"variants": data["rows"]}
        for row in data["rows"]:
            records = [{"epoch": e + 1, "knn_top1": k, "cluster_acc": a}
                       for e, k, a in zip(row["measured_after"], row["knn_per_epoch"], row["acc_per_epoch"])]
            final = {"knn_top1": row["knn_final"], "cluster_nmi": row["nmi_final"],
                     "cluster_acc": row["acc_final"]}
            result["runs"].append(new_run(row["variant"], settings={"variant": row["settings"]}, records=records,
                                          final=final, epochs=row["epochs"]))
    else:
        result.update(kind="cost", runs=_old_cost_runs(data, stem))
        result["summary"] = {key: value for key, value in data.items()
                             if key not in ("table", "command", "runs", "reference", "ours", "baseline", "variant")}
    return result


def _old_cost_runs(data: dict, stem: str) -> list[dict]:
    """The runs of ``epoch_cost``/``processes`` (``runs``), ``small_epoch`` (``baseline``, ``ours``,
    ``variant``), ``vs_reference`` (``reference``, ``ours``) and ``paper_epoch`` (one flat record)."""
    if "runs" in data:
        return [new_run(str(entry.get("recipe", f"{entry.get('processes')} process(es)")),
                        records=entry.get("epochs", []), wall_s=entry.get("wall_seconds", entry.get("wall_s")),
                        processes=entry.get("processes", 1),
                        memory={"per_process": entry["per_process"]} if "per_process" in entry else {})
                for entry in data["runs"]]
    sides = [(key, label) for key, label in (("baseline", data.get("baseline_label", "baseline")),
                                             ("reference", "authors' code"), ("ours", "this tree"),
                                             ("variant", f"this tree, {data.get('also')}")) if data.get(key)]
    if sides:
        return [new_run(label, label if key != "variant" else "this tree",
                        records=[e for run in data[key].get("runs", []) for e in run.get("epochs", [])]
                        or data[key].get("epochs", []), wall_s=data[key].get("wall_s"),
                        mean={k: v for k, v in data[key].items() if isinstance(v, float)},
                        memory={k: v for k, v in data[key].items() if k.startswith("peak")})
                for key, label in sides]
    return [new_run(stem, records=[{k: v for k, v in data.items() if not k.startswith("peak")}],
                    wall_s=data.get("wall_s"), memory={k: v for k, v in data.items() if k.startswith("peak")})]
