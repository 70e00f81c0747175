"""``run.py cost --reference CHECKOUT``: side by side with the authors' code, the same images,
settings and threads on this machine, one after the other; seconds per stage and their ratios.

The authors' code (github.com/facebookresearch/deepcluster; never copied into this
repository, never downloaded by it) is copied into a temporary folder and patched to run
on current Python, PyTorch and faiss on a CPU. Every patch is listed in ``PATCHES`` with
its reason and must apply exactly (the run stops if the checkout differs); none touches
the algorithm or its settings. The few torchvision pieces it imports come from
``bench/reference_standin/`` (torchvision has no CPU build that imports here).

Both programs run in fresh processes with the same ``--threads`` (torch, OpenMP, BLAS) and
``--workers``, optionally pinned to the same cores (``--cpus``). Stage times of the
reference are taken by wrapping its own functions (``compute_features``,
``preprocess_features``, ``run_kmeans``, ``train``) with timers; ours come from its
per-epoch log. Ratios below 1 mean ours is faster. Peak memory: the largest resident set of
each main process over the run (``ru_maxrss``), and per stage (``VmHWM``, reset through
``/proc/self/clear_refs`` as the stage starts: the same wrapped functions on the reference's
side, the ``peak_mib_<stage>`` fields of its log on ours); the data-loading workers are
processes of their own and not counted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from lib import result as schema
from lib.trees import folder_to_use

STANDIN = schema.BENCH / "reference_standin"
STAGES = ("features", "pca", "kmeans", "training")

# (file, text in the authors' code, replacement, why). Each must occur exactly `count` times.
PATCHES = [
    ("main.py", "target.cuda(async=True)", "target",
     "CPU device; `async` is a keyword since Python 3.7", 1),
    ("main.py", ".cuda()", "",
     "CPU device: the model, loss, head and batches stay on the CPU", 6),
    ("main.py", "aux = model(input_var).data.cpu().numpy()",
     "with torch.no_grad(): aux = model(input_var).data.cpu().numpy()",
     "`volatile=True` (no autograd in the feature pass) has no effect since PyTorch 0.4; no_grad() is its successor",
     1),
    ("main.py", "loss.data[0]", "loss.item()", "0-dim tensors are read with .item() since PyTorch 0.4", 1),
    ("clustering.py",
     "    res = faiss.StandardGpuResources()\n    flat_config = faiss.GpuIndexFlatConfig()\n"
     "    flat_config.useFloat16 = False\n    flat_config.device = 0\n"
     "    index = faiss.GpuIndexFlatL2(res, d, flat_config)\n",
     "    index = faiss.IndexFlatL2(d)\n",
     "faiss on the CPU: the same exact L2 index, not on a GPU", 1),
    ("clustering.py", "faiss.PCAMatrix (ndim, pca, eigen_power=-0.5)", "faiss.PCAMatrix(ndim, pca, -0.5)",
     "faiss's Python constructors take the eigen power by position only", 1),
    ("clustering.py", "losses = faiss.vector_to_array(clus.obj)",
     "losses = np.array([clus.iteration_stats.at(i).obj for i in range(clus.iteration_stats.size())])",
     "faiss >= 1.6 keeps the per-iteration objective in iteration_stats", 1),
]
REFERENCE_FILES = ("main.py", "clustering.py", "util.py", "models/__init__.py", "models/alexnet.py",
                   "models/vgg16.py")

REFERENCE_DRIVER = """
import json, resource, sys, time
import torch
torch.set_num_threads({threads})
sys.path[:0] = [{standin!r}, {code!r}]
sys.argv = ["main.py"] + {argv!r}
import clustering
import main as reference

epochs = []
def hwm_mib():  # the resident set's high-water mark since the last reset (VmHWM), in MiB
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
def timed(module, name, stage):
    inner = getattr(module, name)
    def wrapper(*args, **kwargs):
        if stage == "features":
            epochs.append({{"start": time.perf_counter()}})
        start = time.perf_counter()
        reset_hwm()
        out = inner(*args, **kwargs)
        peak = hwm_mib()
        epochs[-1][stage] = epochs[-1].get(stage, 0.0) + time.perf_counter() - start
        epochs[-1]["peak_mib_" + stage] = max(epochs[-1].get("peak_mib_" + stage, 0.0), peak)
        return out
    setattr(module, name, wrapper)
timed(reference, "compute_features", "features")
timed(clustering, "preprocess_features", "pca")
timed(clustering, "run_kmeans", "kmeans")
timed(reference, "train", "training")
reference.args = reference.parse_args()
reference.main(reference.args)
end = time.perf_counter()
for epoch, following in zip(epochs, epochs[1:] + [{{"start": end}}]):
    epoch["epoch"] = following["start"] - epoch.pop("start")
json.dump({{"epochs": epochs, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}},
          open({out!r}, "w"))
"""

OURS_DRIVER = """
import json, resource, time
import torch
torch.set_num_threads({threads})
from deepcluster.config import resolve
from deepcluster.train import run
config = resolve("paper", overrides={overrides!r})
marks = [time.perf_counter()]
records = run(config, log=lambda line: None, stop=lambda record: marks.append(time.perf_counter()) and False)
epochs = [{{"features": r["time_features"], "pca": r["time_pca"], "kmeans": r["time_kmeans"],
            "training": r["time_training"], "monitor": r.get("time_monitor", 0.0), "epoch": b - a,
            **{{key: value for key, value in r.items() if key.startswith("peak_mib_")}}}}
          for r, a, b in zip(records, marks, marks[1:])]
json.dump({{"epochs": epochs, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}},
          open({out!r}, "w"))
"""


def patch_reference(source: Path, target: Path) -> list[dict]:
    """Copy the authors' files into ``target`` and apply PATCHES; returns what was applied."""
    for name in REFERENCE_FILES:
        if not (source / name).is_file():
            raise SystemExit(f"run.py cost: {source / name} not found; --reference must be a checkout of "
                             "facebookresearch/deepcluster")
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)
    applied = []
    for file, old, new, why, count in PATCHES:
        text = (target / file).read_text()
        if text.count(old) != count:
            raise SystemExit(f"run.py cost: patch for {file} expects {count} x {old!r}, found {text.count(old)}; "
                             "is this the authors' last commit (2d1927e)?")
        (target / file).write_text(text.replace(old, new))
        applied.append({"file": file, "old": old, "new": new, "why": why})
    return applied


def run_side(name: str, script: str, threads: int, cpus: str | None, log: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    command = ([] if cpus is None else ["taskset", "-c", cpus]) + [sys.executable, "-c", script]
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"run.py cost: the {name} run failed (exit {done.returncode}); its output is in {log}")
    return time.perf_counter() - start


def mean_stages(epochs: list[dict], skip_first: bool) -> dict[str, float]:
    chosen = epochs[1:] if skip_first and len(epochs) > 1 else epochs
    keys = STAGES + ("epoch",)
    return {key: sum(e.get(key, 0.0) for e in chosen) / len(chosen) for key in keys}


def stage_peaks(epochs: list[dict]) -> dict[str, float]:
    """The largest resident set of the main process in each stage over the epochs, in MiB
    (``VmHWM`` reset as the stage starts; absent where the kernel does not allow the reset)."""
    return {stage: max(e[f"peak_mib_{stage}"] for e in epochs if f"peak_mib_{stage}" in e)
            for stage in STAGES if any(f"peak_mib_{stage}" in e for e in epochs)}


def table(result: dict) -> str:
    ours, ref = result["ours"]["mean"], result["reference"]["mean"]
    lines = [f"{result['cpu']} ({result['cpu_flags']}), {result['threads']} thread(s), {result['workers']} "
             f"loader worker(s){', cpus ' + result['cpus'] if result['cpus'] else ''}; {result['n_images']} images, "
             f"{result['arch']}{' + Sobel' if result['sobel'] else ''}, k = {result['k']}, "
             f"{result['epochs']} epoch(s), {result['averaged']}",
             "", "| stage | authors' code (s) | deepcluster (s) | ratio |", "|---|---:|---:|---:|"]
    for key in STAGES + ("epoch",):
        lines.append(f"| {key if key != 'epoch' else 'whole epoch'} | {ref[key]:.2f} | {ours[key]:.2f} | "
                     f"{ours[key] / max(ref[key], 1e-9):.2f} |")
    lines.append(f"| peak RSS of the main process (GiB) | {result['reference']['memory']['peak_rss_gib']:.2f} | "
                 f"{result['ours']['memory']['peak_rss_gib']:.2f} | "
                 f"{result['ours']['memory']['peak_rss_gib'] / max(result['reference']['memory']['peak_rss_gib'], 1e-9):.2f} |")
    peaks = {side: result[side]["memory"].get("stages_mib", {}) for side in ("reference", "ours")}
    for stage in STAGES:
        if stage in peaks["reference"] or stage in peaks["ours"]:
            ref_peak, our_peak = peaks["reference"].get(stage), peaks["ours"].get(stage)
            lines.append(f"| peak RSS in {stage} (MiB) | {'' if ref_peak is None else f'{ref_peak:.0f}'} | "
                         f"{'' if our_peak is None else f'{our_peak:.0f}'} | |")
    rates = result.get("rates")
    if rates:
        lines += ["", f"Effective rates ({rates['forward_gflop_per_image']:.2f} GFLOP per image forward, training "
                  f"counted as 3x; dense GEMM here: {rates['gemm_gflops']:.0f} GFLOP/s with {result['threads']} "
                  "threads):", "", "| stage | authors' code (GFLOP/s) | deepcluster (GFLOP/s) | of GEMM (ours) |",
                  "|---|---:|---:|---:|"]
        for stage in ("features", "training"):
            ref_rate, our_rate = rates["reference"][stage], rates["ours"][stage]
            lines.append(f"| {stage} | {ref_rate:.1f} | {our_rate:.1f} | {our_rate / rates['gemm_gflops']:.0%} |")
    return "\n".join(lines)


def effective_rates(result: dict) -> dict:
    """GFLOP/s of the feature pass and the training of both sides, beside the GEMM rate."""
    import torch

    from deepcluster.config import resolve
    from deepcluster.models import model_from_config
    from lib.limits import best_rate, forward_flops

    config = resolve("paper", overrides={"arch": result["arch"], "sobel": result["sobel"]})
    flops = forward_flops(model_from_config(config), config.crop)
    torch.set_num_threads(result["threads"])
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = best_rate(lambda: a @ b) * 2 * 2048 ** 3 / 1e9
    n = result["n_images"]
    return {"forward_gflop_per_image": flops / 1e9, "gemm_gflops": gemm,
            **{side: {"features": n * flops / 1e9 / result[side]["mean"]["features"],
                      "training": 3 * n * flops / 1e9 / result[side]["mean"]["training"]}
               for side in ("reference", "ours")}}


def versus_reference(args) -> int:
    """The authors' code and this tree on the same images; one ``cost`` result of two runs."""
    if args.data is None:
        raise SystemExit("run.py cost: --reference needs --data (an image folder with class sub-folders)")
    threads = args.threads or 2
    workers = args.workers if args.workers is not None else 2
    with tempfile.TemporaryDirectory(prefix="vs_reference_") as scratch:
        scratch = Path(scratch)
        data, n_images = folder_to_use(args.data, args.images, scratch)
        code = scratch / "reference"
        patches = patch_reference(Path(args.reference), code)
        reference_argv = [str(data), "--arch", args.arch, "--k", str(args.k), "--epochs", str(args.epochs),
                          "--batch", str(args.batch), "--workers", str(workers), "--exp",
                          str(scratch / "reference_exp"), "--seed", "31"] + (["--sobel"] if args.sobel else [])
        scripts = {
            "reference": REFERENCE_DRIVER.format(threads=threads, standin=str(STANDIN), code=str(code),
                                                 argv=reference_argv, out=str(scratch / "reference.json")),
            "ours": OURS_DRIVER.format(threads=threads, out=str(scratch / "ours.json"), overrides={
                "data": str(data), "out_dir": str(scratch / "ours_run"), "arch": args.arch, "sobel": args.sobel,
                "n_clusters": args.k, "epochs": args.epochs, "batch_size": args.batch, "workers": workers,
                "feature_batch_size": args.batch, "threads": threads, "final_clustering": False,
                "tensorboard": False}),
        }
        order = ["reference", "ours"] if args.first == "reference" else ["ours", "reference"]
        result = schema.new_result("cost", args.name, {
            "reference": "authors' code", "data": args.data, "images": args.images, "n_images": n_images,
            "threads": threads, "workers": workers, "cpus": args.cpus, "arch": args.arch, "sobel": args.sobel,
            "k": args.k, "epochs": args.epochs, "batch": args.batch, "order": order,
            "averaged": "epochs 2 on averaged (the first warms up)" if args.epochs > 1 else "one epoch"})
        sides = {}
        for side in order:
            print(f"cost: running {side} ...", flush=True)
            wall = run_side(side, textwrap.dedent(scripts[side]), threads, args.cpus,
                            schema.results_folder() / f"cost_{args.name}_{side}.log")
            got = json.loads((scratch / f"{side}.json").read_text())
            sides[side] = schema.new_run("authors' code" if side == "reference" else "deepcluster",
                                         "authors' code" if side == "reference" else "this tree",
                                         records=got["epochs"], wall_s=wall, threads=threads,
                                         mean=mean_stages(got["epochs"], skip_first=True),
                                         memory={"peak_rss_gib": got["peak_rss_gib"],
                                                 "stages_mib": stage_peaks(got["epochs"])})
    result["runs"] = [sides["reference"], sides["ours"]]
    flat = {**result["settings"], "cpu": result["machine"]["cpu"], "cpu_flags": result["machine"]["cpu_flags"],
            "reference": sides["reference"], "ours": sides["ours"]}
    result["summary"] = {"patches": patches, "ratios": {
        key: sides["ours"]["mean"][key] / max(sides["reference"]["mean"][key], 1e-9) for key in STAGES + ("epoch",)}}
    result["summary"]["rates"] = flat["rates"] = effective_rates(flat)
    result["table"] = table(flat)
    print(result["table"])
    print(f"wrote {schema.write(result)}")
    return 0
