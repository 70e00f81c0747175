"""Safe loading: checkpoints are read with ``torch.load(weights_only=True)``; a file that
would run code, a damaged file or a hand-edited one is refused with one line, exit code 2."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import deepcluster
from deepcluster.checkpoint import CheckpointError, load_checkpoint
from deepcluster.checkpoint import load_backbone

from conftest import REFERENCE_LOOP


class RunsCode:
    """Unpickling this runs ``exec``: the classic malicious-pickle payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


@pytest.fixture(scope="module")
def good_run(image_folder, tmp_path_factory):
    """A finished one-epoch run; tests copy its checkpoint before damaging it."""
    from deepcluster.config import resolve
    from deepcluster.train import run

    out = tmp_path_factory.mktemp("good") / "run"
    threads = torch.get_num_threads()
    config = resolve("small", overrides={"data": str(image_folder), "out_dir": str(out), "epochs": 1, "n_clusters": 6,
                                         "batch_size": 8, "workers": 0, "pca_dim": 8, "kmeans_iters": 5,
                                         "feature_dim": 32, "threads": 1, **REFERENCE_LOOP})
    run(config, log=lambda _: None)
    torch.set_num_threads(threads)
    return out


def copy_run(good_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "assignments").mkdir(parents=True)
    for path in good_run.rglob("*"):
        if path.is_file():
            (run / path.relative_to(good_run)).parent.mkdir(parents=True, exist_ok=True)
            (run / path.relative_to(good_run)).write_bytes(path.read_bytes())
    return run


def resume(cli, image_folder, run):
    return cli("train", "--data", image_folder, "--out", run, "--epochs", "2", "--resume")


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(cli, good_run, image_folder,
                                                                              tmp_path):
    run = copy_run(good_run, tmp_path)
    marker = tmp_path / "code_ran.txt"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["skipped"] = {"innocent.png": RunsCode(marker)}
    torch.save(state, run / "checkpoint.pt")
    tampered = (run / "checkpoint.pt").read_bytes()

    with pytest.raises(CheckpointError, match="cannot be loaded safely") as caught:
        load_checkpoint(run / "checkpoint.pt")
    assert "\n" not in str(caught.value)
    code, out, err = resume(cli, image_folder, run)
    assert code == 2 and err.count("\n") == 1 and "cannot be loaded safely" in err and "Traceback" not in err
    code, out, err = cli("eval", run / "checkpoint.pt", "--train", image_folder, "--val", image_folder)
    assert code == 2 and err.count("\n") == 1 and "cannot be loaded safely" in err
    assert not marker.exists()
    assert (run / "checkpoint.pt").read_bytes() == tampered

    # The payload is real: an unsafe load does run it.
    torch.load(run / "checkpoint.pt", weights_only=False)
    assert marker.read_text() == "code ran"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _edit(change):
    def apply(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        state.pop("checksum", None)  # edited by hand: without the checksum, which would refuse it first
        change(state)
        torch.save(state, path)
    return apply


def _reshape_first_conv(state: dict) -> None:
    name = next(k for k, v in state["model"].items() if k.startswith("features.") and v.dim() == 4)
    state["model"][name] = torch.zeros(7, *state["model"][name].shape[1:])


@pytest.mark.parametrize("damage, message", [
    (_truncate, "cannot be loaded safely"),
    (_random_bytes, "cannot be loaded safely"),
    (lambda path: path.write_bytes(b""), "cannot be loaded safely"),
    (lambda path: torch.save([1, 2, 3], path), "is not a deepcluster checkpoint"),
    (_edit(lambda s: s.pop("format_version")), "is not a deepcluster checkpoint"),
    (_edit(lambda s: s.update(epoch="three")), "entry 'epoch' is not a count of epochs"),
    (_edit(lambda s: s.pop("model")), "entry 'model' is missing"),
    (_edit(lambda s: s.update(torch_rng=torch.zeros(3))), "entry 'torch_rng' is not a uint8"),
    (_edit(lambda s: s.update(optimizer={"state": []})), "entry 'optimizer' is not an optimizer state"),
    (_edit(_reshape_first_conv), "has shape (7, 2, 3, 3) in the checkpoint, the model expects (32, 2, 3, 3)"),
    (_edit(lambda s: s["model"].pop("classifier.1.weight")), "parameter 'classifier.1.weight' is missing"),
    (_edit(lambda s: s["config"].update(n_clusters="many")), "the checkpoint's settings are invalid"),
], ids=["truncated", "random-bytes", "empty", "not-a-dict", "no-format", "epoch-text", "no-model", "bad-rng",
        "bad-optimizer", "tensor-shape", "missing-weight", "bad-config"])
def test_a_damaged_checkpoint_is_refused_with_one_line(damage, message, cli, good_run, image_folder, tmp_path):
    run = copy_run(good_run, tmp_path)
    damage(run / "checkpoint.pt")
    damaged = (run / "checkpoint.pt").read_bytes()
    code, out, err = resume(cli, image_folder, run)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err
    assert (run / "checkpoint.pt").read_bytes() == damaged


def test_load_backbone_refuses_a_changed_shape(good_run, tmp_path):
    run = copy_run(good_run, tmp_path)
    _edit(_reshape_first_conv)(run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"does not fit this model: parameter .* has shape \(7, 2, 3, 3\)"):
        load_backbone(run / "checkpoint.pt")


def test_everything_a_run_writes_loads_without_pickle(good_run):
    state = torch.load(good_run / "checkpoint.pt", weights_only=True)  # would raise on any other object
    assert state["epoch"] == 1 and isinstance(state["records"][0]["train_loss"], float)
    for path in (good_run / "assignments").iterdir():
        assert np.load(path, allow_pickle=False).dtype == np.int32


def _calls(tree: ast.AST, module_names: set[str], function: str):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == function
                and isinstance(node.func.value, ast.Name) and node.func.value.id in module_names):
            yield node


@pytest.mark.slow
def test_the_source_never_loads_a_pickle():
    """Every ``torch.load`` passes ``weights_only=True``, every ``np.load``
    ``allow_pickle=False``, YAML is read with ``safe_load``, and nothing imports pickle."""
    root = Path(deepcluster.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        where = os.path.relpath(path, root)
        for call in _calls(tree, {"torch"}, "load"):
            assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in call.keywords), \
                f"{where}:{call.lineno}"
        for call in _calls(tree, {"np", "numpy"}, "load"):
            assert any(k.arg == "allow_pickle" and getattr(k.value, "value", None) is False for k in call.keywords), \
                f"{where}:{call.lineno}"
        for name in ("load", "unsafe_load", "full_load"):
            assert not list(_calls(tree, {"yaml"}, name)), f"{where}: yaml.{name}"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for n in names), where
