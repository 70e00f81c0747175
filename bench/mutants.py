"""Plant known bugs one at a time and see which tests catch them (mutation testing by hand).

    nice python bench/mutants.py                 # every mutant (a few minutes on 2 cores)
    nice python bench/mutants.py nmi-self pca-mean  # some of them, by name
    python bench/mutants.py --list               # names and whether each still applies

Each mutant names a file under ``src/deepcluster``, an exact snippet of it, its replacement
and the unit tests that should catch it. For each, the tree (``src/`` and ``tests/``) is
copied to a temporary folder, the snippet replaced there (the working tree is never
touched), and pytest runs on the copy twice: the named unit tests (``-x -q``, without the
recorded fixture ``tests/test_v1_fixture.py``), then the fixture alone. A mutant whose
snippet is not found (exactly once) is reported as STALE: after a refactor, update its
file and snippet. Exit status 1 when a core mutant is not caught by a unit test or any
mutant is stale.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = "tests/test_v1_fixture.py"
CORE = "tests/test_core_behaviours.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under src/deepcluster
    original: str
    replacement: str
    tests: tuple[str, ...]
    core: bool = False  # one of the behaviours a unit test must catch
    what: str = ""


MUTANTS = [
    # -- the core behaviours: each must be caught by a unit test, not only by the fixture
    Mutant("nmi-self", "methods/records.py", "None if previous is None else nmi(previous, assignments)",
           "None if previous is None else nmi(assignments, assignments)", (CORE,), True,
           "the epoch-to-epoch NMI compares an epoch with itself"),
    Mutant("donor-size", "clustering/empty.py", "weights = np.maximum(counts.astype(np.float64) - 1.0, 0.0)",
           "weights = counts.astype(np.float64)", (CORE,), True,
           "empty-cluster donors drawn in proportion to size, not size - 1"),
    Mutant("shuffle-removed", "data/pseudo.py", "    rng.shuffle(sample)\n", "", (CORE,), True,
           "the uniform sampler's batches grouped by cluster"),
    Mutant("head-keeps-old", "models/heads.py", "        self.linear = layer\n",
           "        if self.linear is not None and self.linear.weight.shape == layer.weight.shape:\n"
           "            layer.load_state_dict(self.linear.state_dict())\n"
           "        self.linear = layer\n", (CORE,), True,
           "the new head keeps the old head's weights"),
    Mutant("momentum-cleared", "train.py", "    if head_group is not None:\n        optimizer.add_param_group(head_group)\n",
           "    optimizer.state.clear()\n"
           "    if head_group is not None:\n        optimizer.add_param_group(head_group)\n", (CORE,), True,
           "the body's momentum cleared every epoch"),
    Mutant("pca-mean", "clustering/pca.py", "out[start:start + chunk_size] = (chunk - mean) @ projection",
           "out[start:start + chunk_size] = chunk @ projection", (CORE,), True,
           "PCA projects without subtracting the mean"),
    Mutant("v2-bank-unwritten", "memory_bank.py",
           "self.write(image_indices[kept].numpy(), large[:, kept.to(large.device)])", "None", (CORE,), True,
           "v2's training pass does not write the memory bank"),
    Mutant("v2-prototypes-unset", "methods/v2.py", "head.prototypes.set(index, centroids)", "pass", (CORE,), True,
           "v2's prototypes are not set to the centroids"),
    # -- more, in clustering/, data/, methods/, train.py
    Mutant("head-bias-random", "models/heads.py", "        nn.init.zeros_(layer.bias)\n", "", (CORE,),
           what="a new head's bias keeps nn.Linear's random init"),
    Mutant("head-std-x10", "models/heads.py", "std=self.std)", "std=10 * self.std)", (CORE,),
           what="a new head's weights drawn 10 times too wide"),
    Mutant("pca-no-whitening", "clustering/pca.py", "projection = eigenvectors * eigenvalues[None, :] ** whiten_power",
           "projection = eigenvectors", (CORE, "tests/test_clustering.py"),
           what="PCA rotates but does not whiten"),
    Mutant("l2-skipped", "clustering/pca.py", "return l2_normalize(self.transform(features))",
           "return self.transform(features)", (CORE, "tests/test_clustering.py"),
           what="the projected rows are not L2-normalised"),
    Mutant("donor-size-one", "clustering/empty.py", "        weights[donor] = 0.0\n", "", (CORE,),
           what="a cluster may give to several empty clusters in one round"),
    Mutant("kmeans-mean-sum", "clustering/empty.py", "    return (sums / counts[:, None]).float()",
           "    return sums.float()", ("tests/test_clustering.py", "tests/test_kmeans_backends.py"),
           what="k-means centroids are sums, not means"),
    Mutant("sampler-ignored", "methods/v1.py", "        indices = uniform_cluster_sample(assignments, usable, rng)",
           "        indices = rng.permutation(np.flatnonzero(assignments >= 0))", (CORE,),
           what="v1's loader ignores the uniform sampler (a plain shuffle)"),
    Mutant("sampler-quota", "data/pseudo.py", "quota = n_samples // len(members) + 1",
           "quota = max(1, n_samples // len(members) // 2)", (CORE, "tests/test_data.py"),
           what="clusters get half their share (the epoch padded by repetition)"),
    Mutant("same-seed-every-epoch", "methods/v1.py", "derived_seed(config.seed, epoch, STREAM_CLUSTERING),",
           "derived_seed(config.seed, 0, STREAM_CLUSTERING),", (CORE,),
           what="k-means seeded alike every epoch"),
    Mutant("v2-one-crop", "methods/v2.py", "points = bank.embeddings[head % BANK_CROPS, held].to(device)",
           "points = bank.embeddings[0, held].to(device)", (CORE, "tests/test_v2_train.py"),
           what="every v2 head clusters the first crop"),
    Mutant("nmi-final-self", "methods/records.py", "\"nmi_last_epoch\": None if last is None else nmi(last, final.assignments)",
           "\"nmi_last_epoch\": None if last is None else nmi(final.assignments, final.assignments)", (CORE,),
           what="final.json's NMI with the last epoch compares the final clustering with itself"),
]


def apply(mutant: Mutant, tree: Path) -> bool:
    """Plant ``mutant`` in ``tree`` (a copy); False when its snippet is not there exactly once."""
    path = tree / "src" / "deepcluster" / mutant.file
    if not path.is_file():
        return False
    text = path.read_text()
    if text.count(mutant.original) != 1:
        return False
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return True


def copy_tree(into: Path) -> Path:
    """``src/``, ``tests/`` and ``pyproject.toml`` of the working tree, copied into ``into``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, into / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", into / "pyproject.toml")
    return into


def pytest_fails(tree: Path, tests: list[str], extra: list[str], timeout: int) -> tuple[bool, float]:
    """Whether pytest on ``tests`` of the mutated ``tree`` fails, and its seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *tests],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        failed = done.returncode != 0
    except subprocess.TimeoutExpired:
        failed = True  # a hang counts as caught (and is shown by the time)
    return failed, time.perf_counter() - start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and whether each still applies")
    parser.add_argument("--no-fixture", action="store_true", help="skip the fixture column")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    rows, stale, missed = [], [], []
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        pristine = copy_tree(Path(scratch) / "pristine")
        for mutant in chosen:
            tree = Path(scratch) / mutant.name
            shutil.copytree(pristine, tree)
            if not apply(mutant, tree):
                stale.append(mutant)
                rows.append((mutant, "STALE", "STALE", 0.0))
                print(f"!!! STALE: {mutant.name}: snippet not found exactly once in src/deepcluster/{mutant.file}",
                      file=sys.stderr)
                shutil.rmtree(tree)
                continue
            if args.list:
                rows.append((mutant, "applies", "", 0.0))
                shutil.rmtree(tree)
                continue
            tests = [t for t in mutant.tests if t != FIXTURE]
            unit, seconds = pytest_fails(tree, tests, ["--ignore", FIXTURE], args.timeout)
            fixture = None if args.no_fixture else pytest_fails(tree, [FIXTURE], [], args.timeout)[0]
            rows.append((mutant, "caught" if unit else "NOT caught",
                         "" if fixture is None else ("caught" if fixture else "NOT caught"), seconds))
            if mutant.core and not unit:
                missed.append(mutant)
            print(f"{mutant.name}: unit {rows[-1][1]}, fixture {rows[-1][2] or '-'} ({seconds:.0f} s)", file=sys.stderr)
            shutil.rmtree(tree)
    print(f"\nMutants on {cpu_model()}, torch {_torch_version()}:\n")
    print("| mutant | core | what it breaks | unit tests | fixture | unit tests run |")
    print("|---|---|---|---|---|---|")
    for mutant, unit, fixture, seconds in rows:
        tests = ", ".join(Path(t).name for t in mutant.tests)
        print(f"| {mutant.name} | {'yes' if mutant.core else ''} | {mutant.what} | {unit} | {fixture or '-'} | "
              f"{tests} |")
    if stale:
        print(f"\n!!! {len(stale)} STALE mutant(s): {', '.join(m.name for m in stale)}; update their snippets "
              "in bench/mutants.py", file=sys.stderr)
    if missed:
        print(f"\n!!! core mutant(s) no unit test caught: {', '.join(m.name for m in missed)}", file=sys.stderr)
    return 1 if stale or missed else 0


def _torch_version() -> str:
    try:
        import torch
        return torch.__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    sys.exit(main())
