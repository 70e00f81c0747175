"""Size and reading-path statistics of the package's source (a development aid).

Usage::

    python tools/code_stats.py                 # the working tree's src/
    python tools/code_stats.py PATH            # a checkout (its src/) or a src/ folder
    python tools/code_stats.py --commit be15a14

With ``--commit`` the commit's ``src/`` is unpacked into a temporary folder
(``git archive COMMIT src | tar -x``) and measured there.

What it prints, for ``src/deepcluster``:

- the number of ``.py`` files and their lines;
- the modules over 500 lines and the functions over 60 lines (longest first);
- for each module, how many of the package's own modules it imports at its top level
  (``import``/``from`` statements outside functions, ``if TYPE_CHECKING:`` blocks left out;
  ``from deepcluster.x import y`` counts ``deepcluster.x.y`` when that is a module, else
  ``deepcluster.x``);
- "lines a v1 epoch reads" and "lines a v2 epoch reads".

The reading rule. An epoch's reading path is an explicit list of qualified function names
(``EPOCH_PATHS`` below, one list per layout of the code, since names moved between
commits): the functions and methods a reader follows from the body of the epoch loop
through the method's plan, the monitor's entry points, the epoch's data loader, the
training pass and its loss, to the epoch's record and commit, for the paper's settings
(``clustering: kmeans``, one process, no fault planned; code under an option the paper's
settings do not take is read only where it sits inline). Building blocks with their own
documentation and tests are not followed: ``clustering/`` (k-means, PCA), ``data/``,
``models/``, ``distributed``, ``checkpoint``, ``faults``, ``optim``, ``progress``,
``health``, ``messages``, ``memory`` (peak memory per stage), ``collapse`` (its
indicators), ``budget`` (only with ``minutes``), THE feature pass (``features.feature_pass``,
``features.Keeper``), the monitor's scores, and the run folder's file writing below
``RunFolder.commit_epoch`` (what goes into the checkpoint, made there, is read).
What the run shows on the terminal after an epoch (``startup.epoch_said``, called by the
caller's loop with the returned record) is not part of the epoch.

A function counts its lines from its ``def`` line to its last line (decorators left out;
docstrings and comments in). ``name#loop`` counts only the first ``for epoch``
statement in the function's body, inside a ``try`` or ``with`` too (the epoch loop of a
``fit`` that also sets the run up and makes the final clustering). The layout used is the first whose names all resolve
(else the one with the fewest missing, which are listed). Both the total and the total
without docstrings are printed.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

PACKAGE = "deepcluster"
BIG_MODULE, BIG_FUNCTION = 500, 60

# Earlier layouts of the epoch path, newest first (EPOCH_PATHS below puts the current one, derived
# from the newest of them, in front). Names are "module:qualified.name", module relative to the package.
_OLDER_PATHS: dict[str, dict[str, list[str]]] = {
    "fewer wrappers (no colours, no cluster_and_gather)": {
        "v1": [
            "train:run_epoch", "train:train_one_epoch",
            "methods.v1:V1Planner.plan", "methods.v1:V1Planner.cluster_images", "methods:derived_seed",
            "methods.v1:reduce_features", "methods.v1:pca_stream", "methods.v1:pca_dim_for",
            "methods.common:stage", "methods.v1:cluster_points",
            "methods.common:kmeans_partition", "methods.records:clustering_record", "methods.v1:monitored",
            "monitor:Monitor.request", "monitor:Monitor.due", "monitor:Monitor.__call__",
            "methods.v1:pseudo_label_loader", "methods.common:epoch_draw",
            "methods.v1:OneCrop.__init__", "methods.v1:OneCrop.forward", "methods.v1:head_group",
            "losses:per_head_losses", "methods.records:epoch_record",
            "methods.v1:V1Planner.checkpoint_entries", "runfolder:checkpoint_state", "runfolder:RunFolder.commit_epoch",
        ],
        "v2": [
            "train:run_epoch", "train:train_one_epoch",
            "methods.v2:V2Planner.plan", "memory_bank:fill_bank", "memory_bank:fill_batches",
            "memory_bank:MemoryBank.empty", "methods.common:stage",
            "memory_bank:MemoryBank.all_decoded", "methods.v2:cluster_bank",
            "methods:derived_seed", "methods.common:kmeans_partition",
            "methods.records:clustering_record",
            "monitor:Monitor.request", "monitor:Monitor.due", "monitor:Monitor.__call__",
            "methods.v2:multi_crop_loader", "methods.common:epoch_draw", "methods.v2:multi_crop",
            "losses:per_head_losses",
            "memory_bank:MemoryBank.write_batch", "memory_bank:MemoryBank.write", "memory_bank:MemoryBank._store",
            "memory_bank:MemoryBank.synchronise", "methods.records:epoch_record",
            "methods.v2:V2Planner.checkpoint_entries", "memory_bank:MemoryBank.full", "runfolder:checkpoint_state",
            "runfolder:RunFolder.commit_epoch",
        ],
    },
    "shared blocks (methods.common)": {
        "v1": [
            "train:run_epoch", "train:train_one_epoch",
            "methods.v1:V1Planner.plan", "methods.v1:V1Planner.cluster_images", "methods:derived_seed",
            "methods.v1:reduce_features", "methods.v1:pca_stream", "methods.v1:pca_dim_for",
            "methods.common:stage", "methods.v1:cluster_points",
            "methods.common:kmeans_partition", "methods.records:clustering_record", "methods.v1:monitored",
            "monitor:Monitor.request", "monitor:Monitor.due", "monitor:Monitor.__call__",
            "methods.v1:pseudo_label_loader", "methods.common:epoch_draw", "methods.common:colours",
            "methods.v1:OneCrop.__init__", "methods.v1:OneCrop.forward", "methods.v1:head_group",
            "losses:per_head_losses", "methods.records:epoch_record",
            "methods.v1:V1Planner.checkpoint_entries", "runfolder:checkpoint_state", "runfolder:RunFolder.commit_epoch",
        ],
        "v2": [
            "train:run_epoch", "train:train_one_epoch",
            "methods.v2:V2Planner.plan", "memory_bank:fill_bank", "memory_bank:fill_batches",
            "memory_bank:MemoryBank.empty", "methods.common:stage",
            "memory_bank:MemoryBank.all_decoded", "methods.v2:cluster_bank",
            "methods.v2:cluster_and_gather", "methods:derived_seed", "methods.common:kmeans_partition",
            "methods.records:clustering_record",
            "monitor:Monitor.request", "monitor:Monitor.due", "monitor:Monitor.__call__",
            "methods.v2:multi_crop_loader", "methods.common:epoch_draw", "methods.v2:multi_crop",
            "methods.common:colours", "losses:per_head_losses",
            "memory_bank:MemoryBank.write_batch", "memory_bank:MemoryBank.write", "memory_bank:MemoryBank._store",
            "memory_bank:MemoryBank.synchronise", "methods.records:epoch_record",
            "methods.v2:V2Planner.checkpoint_entries", "memory_bank:MemoryBank.full", "runfolder:checkpoint_state",
            "runfolder:RunFolder.commit_epoch",
        ],
    },
    "reshaped (one run_epoch)": {
        "v1": [
            "train:run_epoch", "train:train_one_epoch", "train:epoch_record",
            "startup:note_unreadable", "startup:epoch_lines",
            "methods.v1:V1Planner.plan", "methods.v1:V1Planner.cluster_images", "methods.v1:reduce_features",
            "methods.v1:pca_stream", "methods.v1:cluster_points", "methods.v1:monitored", "methods.v1:V1Planner.checkpoint_entries",
            "methods.v1:pseudo_label_loader", "methods.v1:OneCrop.__init__", "methods.v1:OneCrop.forward",
            "methods.v1:head_group",
            "methods.records:epoch_record", "losses:per_head_losses",
            "monitor:Monitor.request", "monitor:Monitor.due", "monitor:Monitor.__call__",
            "runfolder:RunFolder.commit_epoch", "runfolder:checkpoint_state",
        ],
        "v2": [
            "train:run_epoch", "train:train_one_epoch", "train:epoch_record",
            "startup:note_unreadable", "startup:epoch_lines",
            "methods.v2:V2Planner.plan", "methods.v2:fill_bank", "methods.v2:cluster_bank",
            "methods.v2:cluster_and_gather", "methods.v2:head_seed", "methods.v2:V2Planner.clustering_device",
            "methods.v2:V2Planner.checkpoint_entries", "methods.v2:multi_crop_loader", "methods.v2:multi_crop",
            "memory_bank:MemoryBank.write_batch", "memory_bank:MemoryBank.write", "memory_bank:MemoryBank._store",
            "memory_bank:MemoryBank.synchronise",
            "methods.records:epoch_record", "losses:per_head_losses",
            "monitor:Monitor.request", "monitor:Monitor.due", "monitor:Monitor.__call__",
            "runfolder:RunFolder.commit_epoch", "runfolder:checkpoint_state",
        ],
    },
    "one loop, planners (436b567)": {
        "v1": [
            "train:fit#loop", "train:train_one_epoch", "train:step_on", "train:epoch_record",
            "startup:note_unreadable", "startup:epoch_lines",
            "methods.v1:V1Planner.plan", "methods.v1:V1Planner.cluster_images", "methods.v1:reduce_features",
            "methods.v1:visiting_order", "methods.v1:streaming_pca", "methods.v1:cluster_points",
            "methods.v1:clustering_device", "methods.v1:monitored", "methods.v1:V1Planner.checkpoint_entries",
            "methods.v1:pseudo_label_loader", "methods.v1:OneCrop.__init__", "methods.v1:OneCrop.forward",
            "methods.v1:head_group",
            "methods.records:epoch_record", "losses:per_head_losses",
            "monitor:Monitor.request", "monitor:Monitor.due", "monitor:Monitor.__call__",
            "runfolder:RunFolder.commit_epoch", "runfolder:checkpoint_state",
        ],
        "v2": [
            "train:fit#loop", "train:train_one_epoch", "train:step_on", "train:epoch_record",
            "startup:note_unreadable", "startup:epoch_lines",
            "methods.v2:V2Planner.plan", "methods.v2:fill_bank", "methods.v2:cluster_bank",
            "methods.v2:cluster_and_gather", "methods.v2:head_seed", "methods.v2:V2Planner.clustering_device",
            "methods.v2:V2Planner.checkpoint_entries", "methods.v2:multi_crop_loader", "methods.v2:multi_crop",
            "memory_bank:MemoryBank.write_batch", "memory_bank:MemoryBank.write", "memory_bank:MemoryBank._store",
            "memory_bank:MemoryBank.synchronise",
            "methods.records:epoch_record", "losses:per_head_losses",
            "monitor:Monitor.request", "monitor:Monitor.due", "monitor:Monitor.__call__",
            "runfolder:RunFolder.commit_epoch", "runfolder:checkpoint_state",
        ],
    },
    "two loops (be15a14)": {
        "v1": [
            "train:fit#loop", "train:pseudo_label_loader", "train:color_jitter", "train:pseudo_label_loss",
            "train:train_one_epoch", "train:epoch_record", "train:note_unreadable", "train:epoch_lines",
            "methods.v1:V1Planner.plan", "methods.v1:V1Planner.cluster_images", "methods.v1:reduce_features",
            "methods.v1:cluster_points", "methods.v1:clustering_device", "methods.v1:class_points",
            "methods.v1:union", "methods.v1:knn_scores", "methods.v1:V1Planner.keeps_body",
            "methods.v1:V1Planner.checkpoint_entries", "losses:pseudo_label_loss",
            "runfolder:RunFolder.commit_epoch", "runfolder:checkpoint_state",
        ],
        "v2": [
            "train:fit#loop", "train:epoch_record", "train:note_unreadable", "train:epoch_lines",
            "methods.v2:V2Planner.plan", "methods.v2:V2Planner.knn_scores", "methods.v2:V2Planner.train_one_epoch",
            "methods.v2:fill_bank", "methods.v2:cluster_bank", "methods.v2:head_seed",
            "methods.v2:V2Planner.clustering_device", "methods.v2:V2Planner.checkpoint_entries",
            "methods.v2:multi_crop_loader", "methods.v2:multi_crop",
            "methods.v2:MemoryBank.write", "methods.v2:MemoryBank._store", "methods.v2:MemoryBank.synchronise",
            "losses:per_head_losses",
            "runfolder:RunFolder.commit_epoch", "runfolder:checkpoint_state",
        ],
    },
}


def _without(layout: dict[str, list[str]], names: set[str]) -> dict[str, list[str]]:
    """``layout`` with the functions ``names`` gone from every method's path."""
    return {method: [name for name in path if name not in names] for method, path in layout.items()}


EPOCH_PATHS: dict[str, dict[str, list[str]]] = {
    "checkpoint made in commit_epoch, faults around the network":
        _without(_OLDER_PATHS["fewer wrappers (no colours, no cluster_and_gather)"], {"runfolder:checkpoint_state"}),
    **_OLDER_PATHS,
}


@dataclass
class Function:
    """One function or method: its qualified name, first and last line, docstring lines,
    and the lines of its ``for epoch`` loop."""

    name: str
    first: int
    last: int
    doc_lines: int
    loop: tuple[int, int] | None

    @property
    def lines(self) -> int:
        return self.last - self.first + 1


def functions_of(tree: ast.Module) -> dict[str, Function]:
    """Every function and method of a module by qualified name (nested ones included)."""
    found: dict[str, Function] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = 0
                body = child.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                                         ast.Constant) \
                        and isinstance(body[0].value.value, str):
                    doc = body[0].end_lineno - body[0].lineno + 1
                found[prefix + child.name] = Function(prefix + child.name, child.lineno, child.end_lineno, doc,
                                                      _first_for(body))
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return found


def _first_for(body: list[ast.stmt]) -> tuple[int, int] | None:
    """The lines of the first ``for epoch`` statement of ``body`` (looking inside ``try``/``with``)."""
    for statement in body:
        if isinstance(statement, ast.For) and isinstance(statement.target, ast.Name) and statement.target.id == "epoch":
            return statement.lineno, statement.end_lineno
        if isinstance(statement, (ast.Try, ast.With)):
            inner = _first_for(statement.body)
            if inner is not None:
                return inner
    return None


def top_level_imports(tree: ast.Module, module: str, modules: set[str]) -> set[str]:
    """The package's modules ``module`` imports outside functions and ``TYPE_CHECKING`` blocks."""
    imported: set[str] = set()

    def add(name: str) -> None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            imported.add(name)

    def walk(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                walk(node.body)
                walk(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    walk(handler.body)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level or base.split(".")[0] != PACKAGE:  # the package imports absolutely
                    continue
                for alias in node.names:
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)

    walk(tree.body)
    return imported


def measure(src: Path) -> None:
    root = src / PACKAGE
    files = sorted(root.rglob("*.py"))
    trees, sizes, funcs = {}, {}, {}
    for path in files:
        relative = path.relative_to(src).with_suffix("")
        name = ".".join(relative.parts)
        name = name[: -len(".__init__")] if name.endswith(".__init__") else name
        text = path.read_text()
        trees[name] = ast.parse(text)
        sizes[name] = len(text.splitlines())
        funcs[name] = functions_of(trees[name])
    print(f"src/: {len(files)} .py files, {sum(sizes.values())} lines")
    big = sorted(((n, s) for n, s in sizes.items() if s > BIG_MODULE), key=lambda item: -item[1])
    print(f"modules over {BIG_MODULE} lines: " + (", ".join(f"{n} ({s})" for n, s in big) or "none"))
    long = sorted(((f"{m}:{f.name}", f.lines) for m, fs in funcs.items() for f in fs.values()
                   if f.lines > BIG_FUNCTION), key=lambda item: -item[1])
    print(f"functions over {BIG_FUNCTION} lines: " + (", ".join(f"{n} ({s})" for n, s in long) or "none"))
    modules = set(trees)
    print("package modules imported at top level (module: count):")
    counts = {name: len(top_level_imports(tree, name, modules)) for name, tree in trees.items()}
    for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if count:
            print(f"  {name.removeprefix(PACKAGE + '.')}: {count}")
    reading_paths(funcs)


def resolve(funcs: dict[str, dict[str, Function]], entry: str) -> tuple[int, int] | None:
    """``(lines, docstring lines)`` of one path entry, or None when it does not exist."""
    module, _, name = entry.partition(":")
    name, _, part = name.partition("#")
    function = funcs.get(f"{PACKAGE}.{module}", {}).get(name)
    if function is None:
        return None
    if part == "loop":
        if function.loop is None:
            return None
        return function.loop[1] - function.loop[0] + 1, 0
    return function.lines, function.doc_lines


def reading_paths(funcs: dict[str, dict[str, Function]]) -> None:
    def missing(layout: dict[str, list[str]]) -> list[str]:
        return [entry for path in layout.values() for entry in path if resolve(funcs, entry) is None]

    name = min(EPOCH_PATHS, key=lambda key: len(missing(EPOCH_PATHS[key])))
    layout = EPOCH_PATHS[name]
    print(f"reading paths (layout: {name}):")
    for method, path in layout.items():
        found = [(entry, resolve(funcs, entry)) for entry in path]
        total = sum(size[0] for _, size in found if size)
        docs = sum(size[1] for _, size in found if size)
        print(f"  lines a {method} epoch reads: {total} ({total - docs} without docstrings) in "
              f"{sum(1 for _, size in found if size)} functions")
        for entry, size in found:
            print(f"    {entry:48s} {'missing' if size is None else f'{size[0]:3d} ({size[0] - size[1]})'}")


def unpack(commit: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", commit, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=".", help="a checkout or its src/ folder (default: here)")
    parser.add_argument("--commit", help="measure this commit's src/ instead")
    args = parser.parse_args(argv)
    if args.commit:
        with tempfile.TemporaryDirectory() as folder:
            measure(unpack(args.commit, Path(folder)))
        return 0
    path = Path(args.path)
    measure(path / "src" if (path / "src" / PACKAGE).is_dir() else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
