"""``run.py learning``: does a recipe learn? Online kNN and label scores of every epoch under
a budget (minutes of training, or epochs), beside the baselines; variants of the recipe and
another commit side by side."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lib import result as schema
from lib.trees import checkout, env_for

BENCH = schema.BENCH


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"k300: n_clusters=300 pca_dim=64"`` -> ``("k300", ["n_clusters=300", "pca_dim=64"])``."""
    label, _, settings = text.partition(":")
    label = label.strip()
    if not label or not label.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"variant {text!r}: give it a label of letters, digits, - and _ before the colon")
    items = settings.split()
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ValueError(f"variant {label}: settings are key=value, not {bad[0]!r}")
    return label, items


def overrides_of(items: list[str]) -> dict:
    from deepcluster.config import coerce

    pairs = dict(item.split("=", 1) for item in items)
    return {key: coerce(key, value) for key, value in pairs.items()}


def settings_of(args, items: list[str]) -> tuple[dict, str]:
    """The run's overrides of its recipe, and its run folder."""
    overrides = overrides_of(items)
    out = args.out or str(Path(tempfile.gettempdir()) / "deepcluster-learning" / args.name)
    overrides.update(val=args.val, out_dir=out, tensorboard=False)
    if args.train is not None:
        overrides["data"] = args.train
    overrides["epochs"] = args.epochs or overrides.get("epochs", 10000)
    from deepcluster.autorecipe import choose  # the folder's rules, as `deepcluster train` applies them

    _, overrides = choose(args.recipe, None, overrides, False, say=lambda line: print(f"deepcluster: {line}"))
    return overrides, out


def measure_baselines(args, config, earlier: dict) -> dict:
    from lib.baselines import bn_baselines, raw_pixel_baseline

    found = dict(earlier)
    if args.bn_baseline and "random_bn" not in found:
        if args.val is None:
            raise SystemExit("run.py learning: --bn-baseline needs --val")
        found["random_bn"] = bn_baselines(config, args.train, args.val)
        print("random weights, BatchNorm statistics at init / of the data:", found["random_bn"], flush=True)
    if args.raw_baseline and "raw_pixels" not in found:
        found["raw_pixels"] = raw_pixel_baseline(config, args.train, args.val)
        print("raw pixels:", found["raw_pixels"], flush=True)
    return found


def read_log(out: str) -> list[dict]:
    path = Path(out) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def add_budget(record: dict, spent: float) -> float:
    """Mark an epoch's training seconds (measuring left out) and the minutes so far."""
    record["time_budget"] = schema.budget_seconds(record)
    spent += record["time_budget"]
    record["minutes"] = spent / 60.0
    return spent


def train_in_process(args, overrides: dict, out: str, run: dict, save) -> None:
    """Train until the budget, then cluster the trained weights once more (the final record)."""
    from deepcluster.config import resolve
    from deepcluster.train import run as train

    minutes = args.minutes if args.minutes is not None else math.inf
    spent = 0.0

    def stop(record: dict) -> bool:
        nonlocal spent
        spent = add_budget(record, spent)
        run["records"].append(record)
        save()
        return spent >= 60.0 * minutes

    if args.resume:  # the committed epochs, whatever the result file had caught
        for record in read_log(out):
            stop(record)
    config = resolve(args.recipe, overrides=overrides)
    if not (args.resume and spent >= 60.0 * minutes):
        train(config, resume=args.resume, log=lambda line: print(line, flush=True), stop=stop)
    done = len(run["records"])
    train(resolve(args.recipe, overrides={**overrides, "epochs": done}), resume=True,
          log=lambda line: print(line, flush=True))


def train_torchrun(args, overrides: dict, out: str, run: dict) -> None:
    """``--processes N``: ``deepcluster train`` under torchrun (gloo), the epochs of the budget."""
    Path(out).mkdir(parents=True, exist_ok=True)
    settings = Path(out).parent / f"{Path(out).name}.settings.yaml"
    settings.write_text(yaml.safe_dump({k: v for k, v in overrides.items() if k != "out_dir"}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
               "-m", "deepcluster", "train", "--recipe", args.recipe, "--config", str(settings), "--out", out]
    code = subprocess.run(command + (["--resume"] if args.resume else []), env=env_for(None)).returncode
    if code != 0:
        raise SystemExit(f"run.py learning: torchrun exited {code}")
    spent = 0.0
    for record in read_log(out):
        spent = add_budget(record, spent)
        run["records"].append(record)


def learn_one(args) -> dict:
    """One run: ``bench/results/learning_NAME.json`` (written as it goes) and its plot."""
    from deepcluster.config import resolve

    overrides, out = settings_of(args, args.set)
    config = resolve(args.recipe, overrides=overrides)
    budget = {"epochs": args.epochs, "minutes": args.minutes}
    result = schema.new_result("learning", args.name, {
        "recipe": args.recipe, "train": args.train, "val": args.val, "set": args.set, "budget": budget,
        "processes": args.processes, "resumed": bool(args.resume)})
    path = schema.path_of("learning", args.name)
    earlier = schema.load(path) if args.resume and path.is_file() else {}
    result["baselines"] = measure_baselines(args, config, earlier.get("baselines", {}))
    run = schema.new_run(args.name, recipe=args.recipe, settings=overrides, config=config.to_dict(),
                         processes=args.processes, threads=config.threads)
    result["runs"].append(run)

    def save() -> None:
        schema.write(result, path)
        if run["records"] and not args.no_plot:
            from lib.plots import plot_learning
            plot_learning([result], path.with_suffix(".png"))

    start = time.perf_counter()
    if args.processes > 1:
        train_torchrun(args, overrides, out, run)
    else:
        train_in_process(args, overrides, out, run, save)
    final = Path(out) / "final.json"
    run["final"] = json.loads(final.read_text()) if final.is_file() else None
    run["wall_s"] = time.perf_counter() - start
    result["summary"] = {"variants": [summarise(run)]}
    result["table"] = table(result)
    save()
    print(result["table"])
    print(f"wrote {path}")
    return result


def child_command(args, name: str, items: list[str], baselines: bool) -> list[str]:
    command = [sys.executable, str(BENCH / "run.py"), "learning", "--recipe", args.recipe, "--name", name,
               "--processes", str(args.processes), "--no-plot"]
    for flag, value in (("--train", args.train), ("--val", args.val), ("--epochs", args.epochs),
                        ("--minutes", args.minutes)):
        if value is not None:
            command += [flag, str(value)]
    if args.out:
        command += ["--out", f"{args.out}_{name}"]
    if args.results:
        command += ["--results", args.results]
    if baselines:
        command += ["--bn-baseline"] * bool(args.val) + ["--raw-baseline"]
    return command + (["--set", *items] if items else [])


def side_runs(args, variants, tree: Path | None, tree_name: str, suffix: str, first: bool) -> list[tuple]:
    """Each variant in a process of its own (the package of ``tree``); its result file's run."""
    found = []
    for index, (label, items) in enumerate(variants):
        name = f"{args.name}_{label}{suffix}"
        path = schema.path_of("learning", name)
        done = path.is_file() and schema.load(path)["runs"][0].get("final") is not None
        if not done:
            print(f"[{time.strftime('%H:%M:%S')}] {label}{suffix}: {' '.join(items) or '(the recipe)'}", flush=True)
            log = schema.results_folder() / f"learning_{name}.log"  # *.log is not committed
            command = child_command(args, name, [*args.set, *items], baselines=first and index == 0)
            with open(log, "w") as handle:
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env_for(tree)).returncode
            if code != 0:
                print(f"{label}{suffix}: exited {code}; see {log}", flush=True)
                continue
        child = schema.load(path)
        run = {**child["runs"][0], "label": f"{label}{suffix}", "tree": tree_name, "variant": " ".join(items)}
        found.append((run, child.get("baselines", {})))
    return found


def learning(args) -> int:
    """Several runs (``--variant``, ``--against``): each on its own, then one result of them all."""
    if args.processes > 1 and args.minutes is not None:
        raise SystemExit("run.py learning: --processes above 1 takes its budget in --epochs, not --minutes")
    if not args.variant and not args.against:
        learn_one(args)
        return 0
    try:
        variants = [parse_variant(text) for text in args.variant] or [("recipe", [])]
    except ValueError as error:
        raise SystemExit(f"run.py learning: {error}")
    if len({label for label, _ in variants}) != len(variants):
        raise SystemExit("run.py learning: give every variant its own label")
    runs = side_runs(args, variants, None, "this tree", "", True)
    if args.against:
        with checkout(args.against) as (folder, label):
            runs += side_runs(args, variants, folder, label, "_against", False)
    result = schema.new_result("learning", args.name, {
        "recipe": args.recipe, "train": args.train, "val": args.val, "set": args.set, "against": args.against,
        "budget": {"epochs": args.epochs, "minutes": args.minutes}, "processes": args.processes,
        "variants": {label: items for label, items in variants}})
    result["runs"] = [run for run, _ in runs]
    result["baselines"] = runs[0][1] if runs else {}
    result["summary"] = {"variants": [summarise(run) for run in result["runs"]]}
    result["table"] = table(result)
    path = schema.write(result)
    if result["runs"]:
        from lib.plots import plot_learning
        plot_learning([result], path.with_suffix(".png"))
    print(result["table"])
    print(f"wrote {path}")
    return 0


def summarise(run: dict) -> dict:
    """A run's row: kNN at the start, its lowest during training, after the last epoch; ACC
    and NMI at k = classes after the last epoch; wall minutes."""
    records, final = run["records"], run.get("final") or {}
    measured = [r for r in records if r.get("knn_top1") is not None]
    knn = [r["knn_top1"] for r in measured]
    acc = [r.get("cluster_acc") for r in measured]  # percent, as log.jsonl holds it
    return {"variant": run["label"], "settings": run.get("variant") or "(the recipe)", "epochs": len(records),
            "measured_after": [r["epoch"] - 1 for r in measured], "knn_per_epoch": knn, "acc_per_epoch": acc,
            "knn_start": knn[0] if knn else None, "knn_lowest": min(knn[1:]) if len(knn) > 1 else None,
            "knn_final": final.get("knn_top1"),
            "acc_final": final.get("cluster_acc"),
            "nmi_final": final.get("cluster_nmi"), "nmi_pseudo_labels": final.get("nmi_labels"),
            "wall_minutes": run["wall_s"] / 60.0 if run.get("wall_s") else None}


def standard_error(percent: float, n: int) -> float:
    """Binomial standard error, in points, of an accuracy measured on n images."""
    p = percent / 100.0
    return 100.0 * math.sqrt(max(p * (1.0 - p), 1e-12) / max(n, 1))


def table(result: dict) -> str:
    def cell(value, digits=1):
        return "" if value is None else f"{value:.{digits}f}"

    rows = result["summary"]["variants"]
    lines = ["| variant | settings | kNN start | kNN lowest | kNN final | ACC final (k = classes) | NMI final | minutes |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['variant']} | `{row['settings']}` | {cell(row['knn_start'])} | {cell(row['knn_lowest'])} | "
                     f"{cell(row['knn_final'])} | {cell(row['acc_final'])} | {cell(row['nmi_final'], 3)} | "
                     f"{cell(row['wall_minutes'])} |")
    n_val = (result["baselines"].get("random_bn") or {}).get("n_val")
    if n_val and rows and rows[0]["knn_final"] is not None:
        lines += ["", f"One standard error of a kNN top-1 near {rows[0]['knn_final']:.0f}% on {n_val} validation "
                      f"images: {standard_error(rows[0]['knn_final'], n_val):.1f} points."]
    return "\n".join(lines) + "\n"
