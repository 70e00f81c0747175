"""Kill a run at every commit point and at random moments, resume it, compare every file.

    python bench/fault_matrix.py [--methods v1,v2] [--random 3] [--epochs 2] [--torchrun]

For each method, a tiny run (36 synthetic 24 px images in three classes, smallnet, one
thread, no loader workers) is first made without interruption, under ``strace`` to count
its renames: every file of a run folder reaches its place by a rename (the commit point of
``checkpoint.atomic_write_bytes``). Then, for every rename k, a fresh run is started with
the kernel told to kill it with ``SIGKILL`` at its k-th rename (``strace -e
inject=rename:signal=SIGKILL:when=k``), plus ``--random`` runs killed from outside at a
random moment (seeded). Each killed run is resumed with ``--resume`` (resumed again if a
resume is itself interrupted, never the case here) and its folder compared with the
uninterrupted one, file by file, bit for bit: every assignments file, ``checkpoint.pt``'s
tensors and values, ``images.json``, ``skipped.tsv``, ``config.yaml``, and ``log.jsonl`` and
``final.json`` but for their timings. A run that ends with every file equal survived; one
with a file missing or different is lost, and its difference is printed.

With ``--torchrun`` the v1 run is also made with two gloo processes (``torchrun
--nproc_per_node=2``), killed at the renames of process 0 (the writer).

Prints one line per trial and a table: method, trials, survived, lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deepcluster.methods.records import MACHINE_KEYS

TIMINGS = set(MACHINE_KEYS)
COMMON = ["--feature_batch_size", "16", "--workers", "0", "--feature_dim", "32", "--threads", "1",
          "--tensorboard", "false", "--device", "cpu"]
METHOD_ARGS = {
    "v1": ["--recipe", "small", "--n_clusters", "6", "--batch_size", "8", "--pca_dim", "8", "--kmeans_iters", "5"],
    "v2": ["--recipe", "v2-cifar", "--arch", "smallnet", "--stem", "imagenet", "--resize", "24", "--crop", "24",
           "--crop_sizes", "24,16", "--crop_counts", "2,2", "--crop_min_scales", "0.3,0.1", "--crop_max_scales",
           "1,0.3", "--prototypes", "6,6,4", "--projection_hidden", "32", "--projection_dim", "16",
           "--batch_size", "8", "--warmup_epochs", "1", "--lr", "0.3", "--final_lr", "0.003"],
}
RENAMES = "rename,renameat,renameat2"


def images(root: Path) -> Path:
    """36 PNGs of three kinds (stripes, rings, checkers) with random phase and colour."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:24, 0:24].astype(np.float32)
    for i in range(36):
        kind, phase = i % 3, rng.uniform(0, 2 * np.pi)
        base = [np.sin(x * 0.8 + phase), np.sin(np.hypot(x - 12, y - 12) * 0.9 + phase),
                np.sign(np.sin(x * 0.6 + phase) * np.sin(y * 0.6 + phase))][kind]
        pixels = (base[..., None] * 0.5 + 0.5) * rng.uniform(0.3, 1.0, 3) * 255
        (root / str(kind)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / str(kind) / f"{i:02d}.png")
    return root


def command(method: str, data: Path, out: Path, epochs: int, processes: int) -> list[str]:
    args = ["train", *METHOD_ARGS[method], *COMMON, "--data", str(data), "--out", str(out), "--epochs", str(epochs)]
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m", "deepcluster", *args]
    return [sys.executable, "-m", "deepcluster", *args]


def environment() -> dict[str, str]:
    drop = ("DEEPCLUSTER_FAULT", "DEEPCLUSTER_FAULT_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


def strace(args: list[str], extra: list[str], log: str = os.devnull) -> subprocess.CompletedProcess:
    return subprocess.run(["strace", "-f", "-qq", "-o", log, "-e", f"trace={RENAMES}", *extra, *args],
                          env=environment(), capture_output=True, text=True, timeout=900)


def count_renames(args: list[str], log: Path, processes: int) -> int:
    """Renames done by the writing process (process 0 under torchrun: the one that writes)."""
    result = strace(args, [], str(log))
    if result.returncode != 0:
        sys.exit(f"the uninterrupted run failed:\n{result.stderr[-2000:]}")
    lines = [line for line in log.read_text().splitlines() if "rename" in line and "= 0" in line]
    return len(lines)


def records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in path.read_text().splitlines() if line.strip()]


def same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_value, a, b))
    return a == b


def difference(run: Path, reference: Path) -> str | None:
    """The first file of ``reference`` that ``run`` lacks or holds otherwise (None: all equal)."""
    names = sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file() and p.name != ".lock")
    have = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name != ".lock")
    if names != have:
        return f"files differ: missing {sorted(set(names) - set(have))}, extra {sorted(set(have) - set(names))}"
    for name in names:
        ours, theirs = run / name, reference / name
        if name in ("log.jsonl", "final.json"):
            equal = records(ours) == records(theirs)
        elif name == "checkpoint.pt":
            a, b = (torch.load(p, weights_only=True) for p in (ours, theirs))
            records_a, records_b = a.pop("records", []), b.pop("records", [])
            drop = lambda rs: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rs]  # noqa: E731
            a.pop("checksum", None), b.pop("checksum", None)
            equal = same_value(a, b) and drop(records_a) == drop(records_b)
        else:
            equal = ours.read_bytes() == theirs.read_bytes()
        if not equal:
            return f"{name} differs"
    return None


def resume(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*args, "--resume"], env=environment(), capture_output=True, text=True, timeout=900)


def trial(name: str, kill: callable, args: list[str], reference: Path, out: Path) -> bool | None:
    """Kill, resume, compare: True (survived), False (lost), None (the run ended before the
    kill came: not a trial)."""
    shutil.rmtree(out, ignore_errors=True)
    killed = kill()
    if killed == 0:
        print(f"  {name}: the run had already ended; not counted", flush=True)
        return None
    resumed = resume(args)
    problem = (f"resume failed ({resumed.returncode}): {resumed.stderr.strip()[-300:]}" if resumed.returncode
               else difference(out, reference))
    print(f"  {name}: killed (exit {killed}), resumed, {'survived' if problem is None else 'LOST: ' + problem}",
          flush=True)
    return problem is None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so
    they are not in its process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def random_kill(args: list[str], delay: float) -> int:
    """Kill the run and every process it started at once, as a scheduler ends a job (SLURM kills
    the job's whole cgroup): killing the torchrun launcher alone leaves its workers running, and
    their run folder rightly refuses a resume while they write it."""
    process = subprocess.Popen(args, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        victims = [process.pid, *descendants(process.pid)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in victims[1:]) and time.monotonic() < deadline:
            time.sleep(0.1)  # orphans are reaped by init
    return process.returncode


def matrix(method: str, data: Path, scratch: Path, epochs: int, n_random: int, processes: int,
           rng: random.Random) -> tuple[int, int]:
    label = method if processes == 1 else f"{method}, {processes} processes"
    # Every run uses the same folder (its path is one of the settings a run stores): the
    # uninterrupted one is moved aside once done.
    out = scratch / f"{method}-{processes}-run"
    args = command(method, data, out, epochs, processes)
    started = time.monotonic()
    total = count_renames(args, scratch / f"{method}-{processes}-renames.log", processes)
    duration = time.monotonic() - started
    reference = out.rename(scratch / f"{method}-{processes}-reference")
    print(f"{label}: {total} renames in an uninterrupted run of {duration:.0f} s", flush=True)
    outcomes = []
    for when in range(1, total + 1):
        inject = ["-e", f"inject={RENAMES}:signal=SIGKILL:when={when}"]
        outcomes.append(trial(f"SIGKILL at rename {when}", lambda: strace(args, inject).returncode, args,
                              reference, out))
    for _ in range(n_random):
        delay = rng.uniform(1.0, duration / 2)  # the run under strace is slower than without
        outcomes.append(trial(f"SIGKILL from outside after {delay:.1f} s", lambda: random_kill(args, delay), args,
                              reference, out))
    counted = [outcome for outcome in outcomes if outcome is not None]
    return len(counted), sum(counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="v1,v2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--random", type=int, default=3, help="kills at random moments per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torchrun", action="store_true", help="also v1 with two torchrun processes")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("strace is needed (apt-get install strace)")
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dc-faults-") as scratch:
        root = Path(scratch)
        data = images(root / "images")
        runs = [(method, 1) for method in args.methods.split(",")] + ([("v1", 2)] if args.torchrun else [])
        for method, processes in runs:
            tried, survived = matrix(method, data, root, args.epochs, args.random, processes, rng)
            rows.append((method if processes == 1 else f"{method}, torchrun x{processes}", tried, survived))
    print("\n| run | tried | survived | lost |\n|---|---|---|---|")
    for name, tried, survived in rows:
        print(f"| {name} | {tried} | {survived} | {tried - survived} |")


if __name__ == "__main__":
    main()
