"""One process against P processes (torchrun, gloo) on the same data and settings: wall time
and peak memory of every process.

    python bench/processes.py --data cifar10/train --processes 1 2 --name cifar10 [--set key=value ...]

Each configuration trains the same run for ``--epochs`` epochs (recipe ``small`` unless
``--recipe``) into a fresh folder, one configuration after the other. Every process records
its own peak resident memory (``ru_maxrss``) into ``bench/results/processes_NAME.json``, with
the run's log records, the CPU model and flags. The cores (``--cores``, default all) are
shared out: one process gets them all as torch threads, each of P processes gets a P-th. On
one machine the wall time then shows the cost of splitting and communicating, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_flags, cpu_model  # noqa: E402

ENTRY = """
import json, os, resource, sys
from deepcluster.cli import main
code = main(sys.argv[2:])
rank = int(os.environ.get("RANK", "0"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
with open(os.path.join(sys.argv[1], f"rss_{rank}.json"), "w") as out:
    json.dump({"rank": rank, "peak_rss_gib": peak, "exit_code": code}, out)
sys.exit(code)
"""


def threads_each(args: argparse.Namespace, processes: int) -> int:
    """Torch threads per process: the cores shared out (``--cores``), at least one."""
    return max(1, args.cores // processes)


def run_once(processes: int, args: argparse.Namespace, scratch: Path) -> dict:
    out = scratch / f"p{processes}"
    out.mkdir()
    entry = scratch / "entry.py"
    entry.write_text(ENTRY)
    train = ["train", "--recipe", args.recipe, "--data", args.data, "--out", str(out / "run"),
             "--epochs", str(args.epochs), "--tensorboard", "false", "--threads", str(threads_each(args, processes))]
    for item in args.set:
        key, _, value = item.partition("=")
        train += [f"--{key}", value]
    if processes == 1:
        command = [sys.executable, str(entry), str(out), *train]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(29500 + processes), str(entry), str(out), *train]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads_each(args, processes))})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{processes} process(es) failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rss_*.json")), key=lambda r: r["rank"])
    records = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    return {"processes": processes, "wall_s": wall, "per_process": ranks, "epochs": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="cores shared out: each of P processes gets cores // P torch threads")
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    results = {"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(), "command": sys.argv,
               "runs": []}
    with tempfile.TemporaryDirectory(prefix="dc-processes-") as scratch:
        for processes in args.processes:
            record = run_once(processes, args, Path(scratch))
            results["runs"].append(record)
            peaks = ", ".join(f"{r['peak_rss_gib']:.2f}" for r in record["per_process"])
            last = record["epochs"][-1]
            print(f"{processes} process(es): {record['wall_s']:.0f} s wall, peak RSS per process {peaks} GiB, "
                  f"features {last.get('time_features', 0):.0f} s, training {last.get('time_training', 0):.0f} s",
                  flush=True)
    path = Path(__file__).resolve().parent / "results" / f"processes_{args.name}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"{results['cpu']} [{results['flags']}]; written {path}")


if __name__ == "__main__":
    main()
