"""What this CPU can do, beside what the stages of an epoch do (``run.py cost --limits``): the
dense GEMM rate (``torch.matmul``) and a large 3x3 convolution's rate (oneDNN), the small
network's forward FLOPs per image (counted with hooks; training counted as 3x forward), the
training step and the eval-mode forward on synthetic batches (no data loading; with
``keep_freed_memory``, as a run), and the data pipeline's cost per image on one core (decode
only, the centre view, the training view)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from lib.baselines import source_of

# The small recipe's sizes with the paper's loop (Sobel, fc clustered, a new head each epoch).
SETTINGS = {"arch": "smallnet", "resize": 32, "crop": 32, "n_clusters": 100, "crop_scale_min": 0.2,
            "pca_dim": 128, "batch_size": 128, "sobel": True, "feature_batch_size": 256}


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
    from deepcluster.data import CenterView, Normalize, RandomResizedCropFlip
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

    config = resolve("paper", overrides={**SETTINGS, **({"data": str(data)} if data is not None else {})})
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

    source = source_of(str(data) if data is not None else None)
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


def limits_table(lim: dict, result: dict) -> str:
    """The limits beside the stages of the runs of a cost result (the last run)."""
    run = result["runs"][-1]
    n = result["settings"]["n_images"]
    flops = lim["forward_mflop_per_image"] * 1e6
    feature_rate = n / max(run["mean"]["features"], 1e-9)
    train_rate = n / max(run["mean"]["training"], 1e-9)
    lines = [f"Limits ({lim['threads']} threads): dense GEMM {lim['gemm_gflops']:.0f} GFLOP/s, 3x3 convolution "
             f"(256 channels, 16 px) {lim['conv3x3_gflops']:.0f} GFLOP/s; smallnet forward "
             f"{lim['forward_mflop_per_image']:.1f} MFLOP per image, training counted as 3x. The rows 'in the run' "
             f"are of the last side ({run['label']}) and hold for smallnet at 32 px only.", "",
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
