"""``deepcluster eval``: judge a checkpoint by the paper's protocol and today's quick checks.

    deepcluster eval RUN --train FOLDER --val FOLDER [--out DIR] [--random-init]
                     [--baseline auto|none|REPORT.json] [--protocols linear,knn,clustering,retrieval]
                     [--probe-mode fast|reference] [--probe-epochs 90] [--layers conv3,body,fc]
                     [--pca-widths 64,128,256] [--baseline-batchnorm init,data] ...

It only parses and wires; ``deepcluster.evaluation.compare`` does the work. Results go to
the terminal as a table and to ``<out>/eval.json`` (``eval_random_init.json`` for the
baseline); ``<out>`` defaults to ``RUN/eval``. ``RUN`` is a run folder or a checkpoint file.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from deepcluster.cli.common import UsageError, add_run_argument, check_device, csv_items, int_list, resolve_run
from deepcluster.config import ConfigError

if TYPE_CHECKING:  # the command imports torch and the suite only when it runs
    from deepcluster.evaluation.suite import EvalSettings



def _batchnorm_modes(text: str) -> str:
    """``--baseline-batchnorm``: ``data``, ``init`` or both, comma-separated."""
    from deepcluster.evaluation.suite import BASELINE_BATCHNORM

    modes = csv_items(text.lower())
    if not modes or any(mode not in BASELINE_BATCHNORM for mode in modes) or len(set(modes)) < len(modes):
        raise argparse.ArgumentTypeError(f"give init, data or both (comma-separated), got {text!r}")
    return ",".join(modes)


def _layer_list(text: str) -> tuple[str, ...]:
    layers = csv_items(text)
    if not layers:
        raise argparse.ArgumentTypeError(f"give at least one layer, e.g. conv3,body,fc; got {text!r}")
    return layers


def _width_list(text: str) -> tuple[int, ...]:
    widths = int_list(text)
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"give positive PCA widths, e.g. 64,128,256; got {text!r}")
    return widths


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` command on the ``deepcluster`` subparsers."""
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: linear probes per layer, kNN, clustering scores, retrieval",
        description="Evaluate the frozen backbone of a checkpoint on a labelled training/validation pair of "
                    "class folders (e.g. CIFAR-10 train/ and test/), against the same architecture with random "
                    "weights. Prints a table and writes JSON into --out.")
    add_run_argument(parser)  # its config gives architecture, image size, normalisation, the baseline's seed
    parser.add_argument("--train", required=True, help="training split: FOLDER/<class>/<image>")
    parser.add_argument("--val", required=True, help="validation split: FOLDER/<class>/<image>, same class names")
    parser.add_argument("--out", dest="out_dir", help="report folder (default: RUN/eval, the checkpoint's folder)")
    _add_baseline_options(parser)
    _add_layer_options(parser)
    _add_probe_options(parser)
    _add_feature_options(parser)
    _add_data_options(parser)
    return parser


def _add_baseline_options(parser: argparse.ArgumentParser) -> None:
    from deepcluster.evaluation.suite import PROTOCOLS, EvalSettings

    defaults = EvalSettings()
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate only the baseline: the checkpoint's architecture with the random weights "
                             "the run started from; writes eval_random_init.json")
    parser.add_argument("--baseline", default="auto",
                        help="random-init numbers to compare with: 'auto' reuses <out>/eval_random_init.json when "
                             "its settings match and computes it otherwise; 'none'; or a report file (default: auto)")
    parser.add_argument("--baseline-batchnorm", type=_batchnorm_modes, default=defaults.baseline_batchnorm,
                        help="BatchNorm statistics of the random-init baseline: 'data', of the --train images (one "
                             "pass, no gradient: what any training leaves in a network, learned or not) or 'init', "
                             "as initialised (the network the run started from); 'init,data' shows both as two "
                             "columns, the gain over the first (default: data)")
    parser.add_argument("--protocols", type=csv_items, default=defaults.protocols,
                        help=f"comma-separated subset of {','.join(PROTOCOLS)} (default: all)")


def _add_layer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=_layer_list, default=None,
                        help="layers every protocol reads, in one table, e.g. conv3,conv5,body,fc1,fc: convN (pooled "
                             "to about --pool-dim numbers), body (the pooled convolutional output, the fc layers' "
                             "input), fcN (a hidden fully connected layer after its ReLU), fc (what DeepCluster "
                             "clusters). Replaces --probe-layers and --feature-layers")
    parser.add_argument("--probe-layers", default=None,
                        help="layers of the linear probes, e.g. conv1,conv3 (default: every conv layer)")
    parser.add_argument("--feature-layers", type=csv_items, default=None,
                        help="layers for kNN, clustering and retrieval: 'fc' (what DeepCluster clusters), 'body', "
                             "'fcN' and/or conv layers (default: fc)")


def _add_probe_options(parser: argparse.ArgumentParser) -> None:
    from deepcluster.evaluation.linear_probe import ProbeSettings
    from deepcluster.evaluation.suite import PROBE_MODES, EvalSettings

    defaults, probe = EvalSettings(), ProbeSettings()
    parser.add_argument("--probe-mode", choices=PROBE_MODES, default=defaults.probe_mode,
                        help="'fast': probes on features cached once from the centre view, no augmentation "
                             "(minutes on a CPU); 'reference': the authors' protocol, the backbone runs on random "
                             "crops and flips at every step (hours on a CPU; conv layers only) (default: fast)")
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


def _add_feature_options(parser: argparse.ArgumentParser) -> None:
    from deepcluster.evaluation.suite import EvalSettings

    defaults = EvalSettings()
    parser.add_argument("--knn-k", type=int, default=defaults.knn_k, help="kNN neighbours (default 20)")
    parser.add_argument("--knn-temperature", type=float, default=defaults.knn_temperature,
                        help="kNN vote temperature (default 0.07)")
    parser.add_argument("--cluster-pca", type=int, default=None,
                        help="PCA dims before k-means (default: the checkpoint's pca_dim, as DeepCluster clusters; "
                             "0: L2 normalisation only)")
    parser.add_argument("--cluster-whiten", type=float, default=defaults.cluster_whiten,
                        help="eigenvalue exponent of that PCA: 0 (default) does not whiten, -0.5 whitens as "
                             "DeepCluster's own k-means does")
    parser.add_argument("--pca-widths", type=_width_list, default=(),
                        help="also k-means (training images) after a PCA of each of these widths, e.g. 64,128,256, "
                             "whitened and not, and after L2 normalisation alone: rows of the clustering protocol")
    parser.add_argument("--cluster-seeds", type=int, default=defaults.cluster_seeds,
                        help="k-means restarts averaged (default 5)")
    parser.add_argument("--cluster-iters", type=int, default=defaults.cluster_iters,
                        help="Lloyd iterations per restart (default 50)")
    parser.add_argument("--retrieval-k", type=int_list,
                        default=defaults.retrieval_ks, help="precision@k cut-offs (default 1,10,100)")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    from deepcluster.evaluation.suite import EvalSettings

    defaults = EvalSettings()
    parser.add_argument("--train-limit", type=int, default=None,
                        help="evaluate on a random subset of this many training images")
    parser.add_argument("--val-limit", type=int, default=None, help="... and of this many validation images")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="data-loading processes")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--keep-features", action="store_true",
                        help="keep the extracted features as .npy files in <out>/features/<model>-<pid>")


def chosen_layers(args: argparse.Namespace) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """``(probe layers, feature layers)``: ``--layers`` for both, else the two options
    (``None`` probe layers: every conv layer)."""
    if args.layers is not None:
        if args.probe_layers is not None or args.feature_layers is not None:
            raise UsageError("--layers replaces --probe-layers and --feature-layers; give one or the other")
        return tuple(args.layers), tuple(args.layers)
    probe = args.probe_layers
    probe_layers = None if probe is None or probe.strip().lower() == "all" else csv_items(probe)
    from deepcluster.evaluation.suite import EvalSettings

    return probe_layers, tuple(args.feature_layers or EvalSettings().feature_layers)


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The ``EvalSettings`` the command line asks for, validated."""
    from deepcluster.evaluation.linear_probe import ProbeSettings
    from deepcluster.evaluation.suite import EvalSettings, check_settings

    probe_layers, feature_layers = chosen_layers(args)
    probe = ProbeSettings(epochs=args.probe_epochs, lr=args.probe_lr, momentum=args.probe_momentum,
                          weight_decay=args.probe_weight_decay, batch_size=args.probe_batch_size)
    settings = EvalSettings(
        protocols=tuple(args.protocols), probe_mode=args.probe_mode, probe_layers=probe_layers, probe=probe,
        pool_dim=args.pool_dim, feature_layers=feature_layers, knn_k=args.knn_k,
        knn_temperature=args.knn_temperature, cluster_pca_dim=args.cluster_pca, cluster_whiten=args.cluster_whiten,
        cluster_seeds=args.cluster_seeds,
        cluster_iters=args.cluster_iters, retrieval_ks=tuple(args.retrieval_k), train_limit=args.train_limit,
        val_limit=args.val_limit, batch_size=args.batch_size, workers=args.workers,
        baseline_batchnorm=args.baseline_batchnorm, pca_widths=tuple(args.pca_widths))
    return check_settings(settings)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``deepcluster eval``; returns the exit code (bad input raises, see ``deepcluster.cli.main``)."""
    import torch

    from deepcluster.evaluation.compare import EvalRequest, compare

    resolve_run(args)
    if args.device is not None:
        check_device(args.device)
    settings = settings_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    request = EvalRequest(args.checkpoint, args.train, args.val, settings, args.out_dir, args.random_init,
                          args.baseline, args.keep_features, args.device)
    path = compare(request, log=lambda line: print(line, flush=True))
    print(f"report: {path}", flush=True)
    return 0


__all__ = ["add_eval_parser", "chosen_layers", "cmd_eval", "settings_from_args"]
