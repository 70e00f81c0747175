"""``deepcluster eval``: judge a checkpoint by the paper's protocol and today's quick checks.

    deepcluster eval RUN --train FOLDER --val FOLDER [--out DIR] [--random-init]
                     [--baseline auto|none|REPORT.json] [--protocols linear,knn,clustering,retrieval]
                     [--probe-mode fast|reference] [--probe-epochs 90] ...

It only parses and wires; ``deepcluster.evaluation`` does the work. Results go to the
terminal as a table and to ``<out>/eval.json`` (``eval_random_init.json`` for the
baseline); ``<out>`` defaults to ``RUN/eval``. ``RUN`` is a run folder or a checkpoint file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepcluster.config import Config, ConfigError
from deepcluster.models import SCALINGS

if TYPE_CHECKING:  # the command imports torch and the suite only when it runs
    from deepcluster.evaluation.suite import EvalSettings, LabelledSplits

TRAINED_REPORT = "eval.json"
RANDOM_REPORT = "eval_random_init.json"
TABLE_NAME = "eval_table.txt"


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def integer_list(text: str) -> tuple[int, ...]:
    """``"1,10,100"`` -> ``(1, 10, 100)``."""
    return tuple(int(item) for item in _csv(text))


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` command on the ``deepcluster`` subparsers."""
    from deepcluster.evaluation.linear_probe import ProbeSettings
    from deepcluster.evaluation.suite import BASELINE_BATCHNORM, PROBE_MODES, PROTOCOLS, EvalSettings

    defaults, probe = EvalSettings(), ProbeSettings()
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: linear probes per layer, kNN, clustering scores, retrieval",
        description="Evaluate the frozen backbone of a checkpoint on a labelled training/validation pair of "
                    "class folders (e.g. CIFAR-10 train/ and test/), against the same architecture with random "
                    "weights. Prints a table and writes JSON into --out.")
    from deepcluster.cli_tools import add_run_argument

    add_run_argument(parser)  # its config gives architecture, image size, normalisation, the baseline's seed
    parser.add_argument("--train", required=True, help="training split: FOLDER/<class>/<image>")
    parser.add_argument("--val", required=True, help="validation split: FOLDER/<class>/<image>, same class names")
    parser.add_argument("--out", dest="out_dir", help="report folder (default: RUN/eval, the checkpoint's folder)")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate only the baseline: the checkpoint's architecture with the random weights "
                             "the run started from; writes eval_random_init.json")
    parser.add_argument("--baseline", default="auto",
                        help="random-init numbers to compare with: 'auto' reuses <out>/eval_random_init.json when "
                             "its settings match and computes it otherwise; 'none'; or a report file (default: auto)")
    parser.add_argument("--baseline-batchnorm", choices=BASELINE_BATCHNORM, default=defaults.baseline_batchnorm,
                        help="BatchNorm statistics of the random-init baseline: 'data', of the --train images (one "
                             "pass, no gradient: what any training leaves in a network, learned or not) or 'init', "
                             "as initialised (the network the run started from) (default: data)")
    parser.add_argument("--protocols", type=_csv, default=defaults.protocols,
                        help=f"comma-separated subset of {','.join(PROTOCOLS)} (default: all)")
    parser.add_argument("--probe-mode", choices=PROBE_MODES, default=defaults.probe_mode,
                        help="'fast': probes on features cached once from the centre view, no augmentation "
                             "(minutes on a CPU); 'reference': the authors' protocol, the backbone runs on random "
                             "crops and flips at every step (hours on a CPU) (default: fast)")
    parser.add_argument("--probe-layers", default="all",
                        help="conv layers to probe, e.g. conv1,conv3 (default: all)")
    parser.add_argument("--probe-epochs", type=int, default=probe.epochs,
                        help=f"probe epochs (paper: 90; default {probe.epochs})")
    parser.add_argument("--probe-lr", type=float, default=probe.lr, help=f"probe SGD learning rate (paper: {probe.lr})")
    parser.add_argument("--probe-momentum", type=float, default=probe.momentum, help="probe SGD momentum (paper: 0.9)")
    parser.add_argument("--probe-weight-decay", type=float, default=probe.weight_decay,
                        help="probe weight decay; also decays the rate as lr/sqrt(1 + lr*wd*step) "
                             f"(authors' script: 1e-7; default {probe.weight_decay:g})")
    parser.add_argument("--probe-batch-size", type=int, default=probe.batch_size, help="probe batch (paper: 256)")
    parser.add_argument("--pool-dim", type=int, default=defaults.pool_dim,
                        help="target length of each probed layer's average-pooled vector (paper: about 9000)")
    parser.add_argument("--feature-layers", type=_csv, default=defaults.feature_layers,
                        help="layers for kNN, clustering and retrieval: 'fc' (what DeepCluster clusters) and/or "
                             "conv layers (default: fc)")
    parser.add_argument("--knn-k", type=int, default=defaults.knn_k, help="kNN neighbours (default 20)")
    parser.add_argument("--knn-temperature", type=float, default=defaults.knn_temperature,
                        help="kNN vote temperature (default 0.07)")
    parser.add_argument("--cluster-pca", type=int, default=None,
                        help="PCA dims before k-means (default: the checkpoint's pca_dim, as DeepCluster clusters; "
                             "0: L2 normalisation only)")
    parser.add_argument("--cluster-whiten", type=float, default=defaults.cluster_whiten,
                        help="eigenvalue exponent of that PCA: 0 (default) does not whiten, -0.5 whitens as "
                             "DeepCluster's own k-means does")
    parser.add_argument("--cluster-seeds", type=int, default=defaults.cluster_seeds,
                        help="k-means restarts averaged (default 5)")
    parser.add_argument("--cluster-iters", type=int, default=defaults.cluster_iters,
                        help="Lloyd iterations per restart (default 50)")
    parser.add_argument("--retrieval-k", type=integer_list,
                        default=defaults.retrieval_ks, help="precision@k cut-offs (default 1,10,100)")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="evaluate on a random subset of this many training images")
    parser.add_argument("--val-limit", type=int, default=None, help="... and of this many validation images")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="data-loading processes")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--keep-features", action="store_true",
                        help="keep the extracted features as .npy files in <out>/features/<model>-<pid>")
    return parser


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The ``EvalSettings`` the command line asks for, validated."""
    from deepcluster.evaluation.linear_probe import ProbeSettings
    from deepcluster.evaluation.suite import EvalSettings, check_settings

    probe_layers = None if args.probe_layers.strip().lower() == "all" else _csv(args.probe_layers)
    probe = ProbeSettings(epochs=args.probe_epochs, lr=args.probe_lr, momentum=args.probe_momentum,
                          weight_decay=args.probe_weight_decay, batch_size=args.probe_batch_size)
    settings = EvalSettings(
        protocols=tuple(args.protocols), probe_mode=args.probe_mode, probe_layers=probe_layers, probe=probe,
        pool_dim=args.pool_dim, feature_layers=tuple(args.feature_layers), knn_k=args.knn_k,
        knn_temperature=args.knn_temperature, cluster_pca_dim=args.cluster_pca, cluster_whiten=args.cluster_whiten,
        cluster_seeds=args.cluster_seeds,
        cluster_iters=args.cluster_iters, retrieval_ks=tuple(args.retrieval_k), train_limit=args.train_limit,
        val_limit=args.val_limit, batch_size=args.batch_size, workers=args.workers,
        baseline_batchnorm=args.baseline_batchnorm)
    return check_settings(settings)


def fingerprint(config: Config, splits: LabelledSplits, settings: EvalSettings, train_dir: str,
                val_dir: str) -> dict[str, Any]:
    """What must match for two reports' numbers to be comparable (random init included)."""
    return {
        "train": os.path.abspath(train_dir), "val": os.path.abspath(val_dir),
        "arch": config.arch, "sobel": config.sobel, "feature_dim": config.feature_dim, "resize": config.resize,
        "crop": config.crop, "mean": list(config.mean), "std": list(config.std), "init_seed": config.seed,
        "pca_dim": config.pca_dim, "n_train": len(splits.train), "n_val": len(splits.val),
        "classes": list(splits.class_names), "settings": settings.result_defining(),
        # absent at 1 (and without init): older reports stay comparable
        **{name: getattr(config, name) for name in SCALINGS if getattr(config, name) != 1},
        **({"init": os.path.abspath(config.init)} if config.init else {}),
    }


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))


def reusable_baseline(path: Path, prints: dict[str, Any]) -> dict[str, Any] | None:
    """The random-init results stored in ``path`` when they were made with the same
    fingerprint; ``None`` otherwise (missing, unreadable or different settings)."""
    from deepcluster.evaluation import report as reporting

    if not path.is_file():
        return None
    try:
        saved = reporting.load_report(path)
    except ConfigError:
        return None
    if saved.get("fingerprint") != prints:
        return None
    return saved["results"].get("random_init")


def start_backbone(config: Config, splits: LabelledSplits, settings: EvalSettings, device):
    """The baseline column's network: the weights the run started from. Random ones (the
    suite's ``baseline_backbone``), or for a run with ``init`` that file's weights, as they
    were (their own BatchNorm statistics)."""
    from deepcluster.evaluation.suite import baseline_backbone, random_init_backbone
    from deepcluster.initial_weights import load_initial_weights

    if not config.init:
        return baseline_backbone(config, splits, settings, device)
    model = random_init_backbone(config)
    load_initial_weights(model, config.init)
    return model.to(device).eval()


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``deepcluster eval``; returns the exit code (bad input raises, see ``cli.main``)."""
    import torch

    from deepcluster.checkpoint import load_checkpoint
    from deepcluster.cli_tools import out_folder, resolve_run
    from deepcluster.evaluation import report as reporting
    from deepcluster.evaluation.suite import evaluate_backbone, open_labelled_splits, remove_dir
    from deepcluster.checkpoint import load_backbone
    from deepcluster.devices import resolve_device

    def log(line: str) -> None:
        print(line, flush=True)

    resolve_run(args)
    settings = settings_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    baseline_file = None if args.baseline in ("auto", "none") else Path(args.baseline)
    if baseline_file is not None and args.random_init:
        raise ConfigError("--baseline FILE compares a trained checkpoint; it makes no sense with --random-init")
    model, config = load_backbone(args.checkpoint)
    epochs_completed = int(load_checkpoint(args.checkpoint).get("epoch", 0))
    splits = open_labelled_splits(args.train, args.val, settings.train_limit, settings.val_limit, settings.subset_seed)
    device = resolve_device(args.device or config.device)
    out_dir = out_folder(args.out_dir or str(Path(args.checkpoint).parent / "eval"))
    prints = fingerprint(config, splits, settings, args.train, args.val)
    report: dict[str, Any] = {
        "report_version": reporting.REPORT_VERSION,
        "checkpoint": os.path.abspath(args.checkpoint),
        "data": {"train": os.path.abspath(args.train), "val": os.path.abspath(args.val), "n_train": len(splits.train),
                 "n_val": len(splits.val), "n_classes": splits.n_classes, "class_names": list(splits.class_names)},
        "model": {"arch": config.arch, "sobel": config.sobel, "feature_dim": model.feature_dim, "width": config.width,
                  "depth": config.depth,
                  "image_size": config.crop, "resize": config.resize},
        "training_budget": None if args.random_init else reporting.training_budget(args.checkpoint, epochs_completed,
                                                                                    config),
        "settings": settings.to_dict(),
        "fingerprint": prints,
        "results": {"trained": None, "random_init": None},
        "gain": None,
        **({"start": config.init} if config.init else {}),
    }
    log(f"deepcluster eval: {config.arch}, {len(splits.train)} train / {len(splits.val)} val images, "
        f"{splits.n_classes} classes, protocols {', '.join(settings.protocols)}, device {device}, report in {out_dir}")

    def evaluate(which: str):
        network = start_backbone(config, splits, settings, device) if which == "random_init" else model
        log(f"[{which.replace('_', ' ')}]" if which != "random_init" or not config.init else
            f"[baseline: the run's start, {config.init}]")
        # One folder per process: two evaluations writing into one report folder never collide.
        work_dir = out_dir / "features" / f"{which}-{os.getpid()}"
        try:
            return evaluate_backbone(network, config, splits, settings, device, work_dir, args.keep_features, log)
        finally:
            if not args.keep_features:
                remove_dir(work_dir)
                if (out_dir / "features").is_dir() and not any((out_dir / "features").iterdir()):
                    (out_dir / "features").rmdir()

    random_path = out_dir / RANDOM_REPORT
    if args.random_init:
        report["results"]["random_init"] = evaluate("random_init")
        reporting.write_report(random_path, report)
        table = reporting.format_table(report)
        (out_dir / TABLE_NAME.replace(".txt", "_random_init.txt")).write_text(table + "\n")
        log(table)
        log(f"report: {random_path}")
        return 0

    baseline = None
    if baseline_file is not None:  # checked before the long evaluation: a bad file fails fast
        saved = reporting.load_report(baseline_file)
        differ = _differences(saved.get("fingerprint") or {}, prints)
        if differ:
            raise ConfigError(f"baseline {str(baseline_file)!r} was made with other settings ({', '.join(differ)}); "
                              "rerun it with the same options or use --baseline auto")
        baseline = saved["results"].get("random_init")
        if baseline is None:
            raise ConfigError(f"baseline {str(baseline_file)!r} holds no random-init results")

    report["results"]["trained"] = evaluate("trained")
    if args.baseline == "auto":
        # Looked up only now, so a `--random-init` run that finished meanwhile is reused.
        baseline = reusable_baseline(random_path, prints)
        if baseline is not None:
            log(f"random-init baseline reused from {random_path}")
        else:
            baseline = evaluate("random_init")
            random_report = {**report, "training_budget": None, "results": {"trained": None, "random_init": baseline}}
            reporting.write_report(random_path, random_report)
    report["results"]["random_init"] = baseline
    report["gain"] = reporting.gains(report["results"]["trained"], baseline)
    report_path = out_dir / TRAINED_REPORT
    reporting.write_report(report_path, report)
    table = reporting.format_table(report)
    (out_dir / TABLE_NAME).write_text(table + "\n")
    log(table)
    log(f"report: {report_path}")
    return 0


__all__ = ["add_eval_parser", "cmd_eval", "fingerprint", "settings_from_args"]
