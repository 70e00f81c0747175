"""The small-image epoch, side by side with another commit of this package, and how far each
stage is from what the CPU can do.

    git worktree add /tmp/wt114 114fbff
    python bench/small_epoch.py --baseline /tmp/wt114 --data /tmp/data/cifar10/train \
        --images 10000 --epochs 2 --repeats 2 --name cifar10_10k

Both trees run ``deepcluster train`` in fresh processes, one after the other and in turn
(``--repeats`` rounds), on the same images with the same settings, threads and loader
workers: the `small` recipe's network and sizes (smallnet, 32 px, k = 100, batch 128, PCA
128) with the paper's loop (Sobel, fc clustered, a new head each epoch), which both trees
know, given as one YAML file. Stage seconds come from each run's own ``log.jsonl``; the
first epoch warms up and is left out of the means. The pseudo-labels of every epoch and the
losses are compared: the same maths gives the same numbers.

Then, in this process, what the stages could do: the dense GEMM rate (``torch.matmul``) and
a large 3x3 convolution's rate (oneDNN), the network's forward FLOPs per image (counted
with hooks; training counted as 3x forward), the training step and the eval-mode forward on
synthetic batches (no data loading; with ``keep_freed_memory``, as a run), and the data
pipeline's cost per image on one core (decode only, the centre view, the training view).
``--also KEY=VALUE`` adds a third side: this tree with one setting changed, e.g.
``keep_freed_memory=false`` to see what keeping freed memory is worth. Peak memory is the
largest summed PSS of each run's processes. Writes
``bench/results/small_epoch_NAME.json`` and prints the tables with the CPU model and flags.
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

import numpy as np
import torch
import yaml

from machine import PeakSampler, cpu_flags, cpu_model, write_result
from vs_reference import folder_to_use

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve().parent.parent
STAGES = ("features", "clustering", "training")
# The small recipe's sizes with the paper's loop: settings both trees read the same way.
SETTINGS = {"arch": "smallnet", "resize": 32, "crop": 32, "n_clusters": 100, "crop_scale_min": 0.2,
            "pca_dim": 128, "batch_size": 128, "sobel": True, "feature_batch_size": 256}


def run_tree(tree: Path, config: Path, data: Path, out: Path, threads: int, log: Path) -> dict:
    """One ``deepcluster train`` of the package in ``tree``; its per-epoch stage seconds,
    losses and pseudo-labels."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "deepcluster", "train", "--recipe", "paper", "--config", str(config),
               "--data", str(data), "--out", str(out)]
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=tree)
        sampler = PeakSampler(process.pid)
        sampler.start()
        returncode = process.wait()
        peak = sampler.stop()
    if returncode != 0:
        raise SystemExit(f"small_epoch: the run of {tree} failed (exit {returncode}); its output is in {log}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    epochs = [{"features": r["time_features"], "clustering": r["time_clustering"], "training": r["time_training"],
               "loss": r["train_loss"], "train_images_per_s": r["train_images_per_s"]} for r in records]
    labels = [np.load(path) for path in sorted((out / "assignments").glob("epoch_*.npy"))]
    return {"wall_s": time.perf_counter() - start, "epochs": epochs, "labels": labels, "peak_pss_gib": peak}


def forward_flops(model: torch.nn.Module, size: int) -> float:
    """Multiply-adds x 2 of one image through ``model.forward_features`` (convolutions and
    linear layers; BatchNorm, ReLU and pooling are not counted)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model.eval()
    with torch.no_grad():
        model.forward_features(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return 2.0 * total


def best_rate(step, repeats: int = 3, seconds: float = 3.0) -> float:
    """The best calls per second of ``step`` over ``repeats`` timings of about ``seconds``."""
    step()
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            calls += 1
        rates.append(calls / (time.perf_counter() - start))
    return max(rates)


def limits(data: Path, threads: int) -> dict:
    """What this CPU can do: GEMM and convolution rates, the network's compute-only speeds,
    and the data pipeline's cost per image on one core."""
    from deepcluster.config import resolve
    from deepcluster.data import CenterView, FolderSource, Normalize, RandomResizedCropFlip
    from deepcluster.models import model_from_config
    from deepcluster.models.heads import WithHead, ClassifierHead

    from deepcluster.devices import keep_freed_memory

    keep_freed_memory()  # as a run of this tree does by default
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = best_rate(lambda: a @ b) * 2 * 2048 ** 3 / 1e9
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(64, 256, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv_rate = best_rate(lambda: conv(x)) * 2 * 64 * 256 * 256 * 9 * 16 * 16 / 1e9

    config = resolve("paper", overrides={**SETTINGS, "data": str(data)})
    torch.manual_seed(config.seed)
    model = model_from_config(config).to(memory_format=torch.channels_last)
    flops = forward_flops(model, config.crop)
    head = ClassifierHead.for_backbone(model)
    head.reset(config.n_clusters)
    network = WithHead(model, head)
    normalize = Normalize(config.mean, config.std)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    batch = torch.randint(0, 256, (config.batch_size, 3, config.crop, config.crop), dtype=torch.uint8)
    targets = torch.randint(0, config.n_clusters, (config.batch_size,))

    def train_step():
        network.train()
        loss = torch.nn.functional.cross_entropy(network(normalize(batch, "cpu", True)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_rate = best_rate(train_step) * config.batch_size
    model.eval()
    feature_batch = torch.randint(0, 256, (config.feature_batch_size, 3, config.crop, config.crop), dtype=torch.uint8)
    with torch.no_grad():
        eval_rate = best_rate(lambda: model.forward_features(normalize(feature_batch, "cpu", True))) \
            * config.feature_batch_size

    source = FolderSource(str(data))
    n = min(2000, len(source))
    view = CenterView(config.resize, config.crop)
    crop = RandomResizedCropFlip(config.crop, (config.crop_scale_min, 1.0))
    rng = np.random.default_rng(0)
    timings = {}
    torch.set_num_threads(1)
    for name, load in (("decode", source.load), ("centre_view", lambda i: view(source.load(i))),
                       ("training_view", lambda i: crop(source.load(i), rng))):
        start = time.perf_counter()
        for index in range(n):
            load(index)
        timings[name] = (time.perf_counter() - start) / n * 1e3
    torch.set_num_threads(threads)
    return {"threads": threads, "gemm_gflops": gemm, "conv3x3_gflops": conv_rate, "forward_mflop_per_image": flops / 1e6,
            "train_step_images_per_s": train_rate, "train_step_gflops": train_rate * 3 * flops / 1e9,
            "eval_forward_images_per_s": eval_rate, "eval_forward_gflops": eval_rate * flops / 1e9,
            "ms_per_image_one_core": timings}


def tables(result: dict) -> str:
    base, ours = result["baseline"], result["ours"]
    lim = result["limits"]
    n = result["n_images"]
    lines = [f"{result['cpu']} ({result['cpu_flags']}), {result['threads']} thread(s), {result['workers']} loader "
             f"worker(s); {n} images, smallnet + Sobel, 32 px, k = 100, {result['epochs']} epochs x "
             f"{result['repeats']} rounds, first epoch of each run left out",
             ""]
    variant = result.get("variant")
    header = f"| stage | {result['baseline_label']} (s) | this tree (s) | ratio |"
    if variant:
        header += f" this tree, {result['also']} (s) | ratio |"
    lines += [header, "|---|---:|---:|---:|" + ("---:|---:|" if variant else "")]
    for key in (*STAGES, "epoch"):
        row = (f"| {key if key != 'epoch' else 'whole epoch'} | {base[key]:.2f} | {ours[key]:.2f} | "
               f"{ours[key] / max(base[key], 1e-9):.2f} |")
        if variant:
            row += f" {variant[key]:.2f} | {variant[key] / max(base[key], 1e-9):.2f} |"
        lines.append(row)
    cells = [f"{base['peak_pss_gib']:.2f}", f"{ours['peak_pss_gib']:.2f}", ""]
    cells += [f"{variant['peak_pss_gib']:.2f}", ""] if variant else []
    lines.append("| peak memory of the run (GiB, PSS of its processes) | " + " | ".join(cells) + " |")
    lines.append(f"| same pseudo-labels, every epoch and round | {result['same_labels']} | | |")
    lines.append(f"| largest loss difference | {result['loss_difference']:.2e} | | |")
    flops = lim["forward_mflop_per_image"] * 1e6
    feature_rate, train_rate = n / ours["features"], n / ours["training"]
    lines += ["", f"Limits ({lim['threads']} threads): dense GEMM {lim['gemm_gflops']:.0f} GFLOP/s, 3x3 convolution "
              f"(256 channels, 16 px) {lim['conv3x3_gflops']:.0f} GFLOP/s; smallnet forward "
              f"{lim['forward_mflop_per_image']:.1f} MFLOP per image, training counted as 3x.", "",
              "| stage | images/s | GFLOP/s | of GEMM | of the 3x3 conv |", "|---|---:|---:|---:|---:|"]
    rows = [("feature pass, in the run", feature_rate, feature_rate * flops / 1e9),
            ("eval forward alone (no loading)", lim["eval_forward_images_per_s"], lim["eval_forward_gflops"]),
            ("training, in the run", train_rate, train_rate * 3 * flops / 1e9),
            ("training step alone (no loading)", lim["train_step_images_per_s"], lim["train_step_gflops"])]
    for label, rate, gflops in rows:
        lines.append(f"| {label} | {rate:.0f} | {gflops:.1f} | {gflops / lim['gemm_gflops']:.0%} | "
                     f"{gflops / lim['conv3x3_gflops']:.0%} |")
    ms = lim["ms_per_image_one_core"]
    lines += ["", "Data pipeline, one core, ms per image: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}"
                                                                      for k, v in ms.items())]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a checkout (worktree) of the commit to compare with")
    parser.add_argument("--data", required=True, help="image folder with class sub-folders")
    parser.add_argument("--images", type=int, default=None, help="use this many images of --data (default all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (baseline, this tree)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--also", default=None, metavar="KEY=VALUE",
                        help="a third side: this tree with one setting changed (e.g. keep_freed_memory=false)")
    parser.add_argument("--name", default="cifar10")
    args = parser.parse_args()
    baseline = Path(args.baseline).resolve()
    label = subprocess.run(["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True).stdout.strip() or baseline.name
    with tempfile.TemporaryDirectory(prefix="small_epoch_") as scratch:
        scratch = Path(scratch)
        data, n_images = folder_to_use(args.data, args.images, scratch)
        config = scratch / "settings.yaml"
        config.write_text(yaml.safe_dump({**SETTINGS, "epochs": args.epochs, "workers": args.workers,
                                          "threads": args.threads}))
        sides = [("baseline", baseline, config), ("ours", HERE, config)]
        if args.also:
            key, _, value = args.also.partition("=")
            variant = scratch / "variant.yaml"
            variant.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), key: yaml.safe_load(value)}))
            sides.append(("variant", HERE, variant))
        runs: dict[str, list] = {side: [] for side, _, _ in sides}
        RESULTS.mkdir(exist_ok=True)
        for round_ in range(args.repeats):
            for side, tree, settings in sides:
                print(f"small_epoch: round {round_ + 1}, {side} ...", flush=True)
                runs[side].append(run_tree(tree, settings, data, scratch / f"{side}_{round_}", args.threads,
                                           scratch / f"{side}_{round_}.log"))
    others = [run for side in runs if side != "baseline" for run in runs[side]]
    same = all(np.array_equal(a, b) for base in runs["baseline"] for run in others
               for a, b in zip(base["labels"], run["labels"]))
    loss_difference = max(abs(a["loss"] - b["loss"]) for base in runs["baseline"] for run in others
                          for a, b in zip(base["epochs"], run["epochs"]))
    result = {"name": args.name, "command": " ".join(["python", "bench/small_epoch.py"] + sys.argv[1:]),
              "cpu": cpu_model(), "cpu_flags": cpu_flags(), "torch": torch.__version__, "threads": args.threads,
              "workers": args.workers, "n_images": n_images, "epochs": args.epochs, "repeats": args.repeats,
              "settings": SETTINGS, "baseline_label": label, "same_labels": same, "loss_difference": loss_difference}
    result["also"] = args.also
    for side in runs:
        epochs = [e for run in runs[side] for e in run["epochs"][1:]] or [e for run in runs[side] for e in run["epochs"]]
        stages = {key: float(np.mean([e[key] for e in epochs])) for key in STAGES}
        stages["epoch"] = sum(stages.values())
        result[side] = {**stages, "peak_pss_gib": max(run["peak_pss_gib"] for run in runs[side]),
                        "runs": [{"wall_s": run["wall_s"], "epochs": run["epochs"], "peak_pss_gib": run["peak_pss_gib"]}
                                 for run in runs[side]]}
    result["ratios"] = {key: result["ours"][key] / max(result["baseline"][key], 1e-9) for key in (*STAGES, "epoch")}
    print("small_epoch: measuring the limits ...", flush=True)
    result["limits"] = limits(data if not args.images else Path(args.data).resolve(), args.threads)
    result["table"] = tables(result)
    write_result(RESULTS / f"small_epoch_{args.name}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
