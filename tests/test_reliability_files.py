"""Reliability of what a run reads and writes: file names that are not UTF-8, checkpoints
and exports damaged on disk, a config file that expands, damaged run files under
``report``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_pattern
from deepcluster.cli import EXIT_DIVERGED

ODD = os.fsdecode(b"\xff\xfe-odd.png")  # a name whose bytes are not UTF-8
BROKEN = os.fsdecode(b"broken-\xe9t\xe9.jpg")  # Latin-1 bytes, and not an image either


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def odd_folder(image_folder, tmp_path_factory) -> Path:
    """The 36 test images plus a good image and a broken file whose names are not UTF-8."""
    root = tmp_path_factory.mktemp("odd") / "images"
    shutil.copytree(image_folder, root)
    Image.fromarray(make_pattern(0, np.random.default_rng(7))).save(root / "stripes" / ODD, format="PNG")
    (root / "rings" / BROKEN).write_text("not an image")
    return root


def tiny_run(data: Path, out: Path) -> Path:
    from deepcluster.cli import main

    threads = torch.get_num_threads()
    try:
        code = main(["train", "--recipe", "small", "--data", str(data), "--out", str(out), "--epochs", "1",
                     "--n_clusters", "6", "--batch_size", "8", "--feature_batch_size", "16", "--workers", "0",
                     "--pca_dim", "8", "--kmeans_iters", "5", "--feature_dim", "32", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


@pytest.fixture(scope="module")
def odd_run(odd_folder, tmp_path_factory) -> Path:
    return tiny_run(odd_folder, tmp_path_factory.mktemp("odd-run") / "run")


@pytest.fixture(scope="module")
def plain_run(image_folder, tmp_path_factory) -> Path:
    return tiny_run(image_folder, tmp_path_factory.mktemp("plain-run") / "run")


# -- item: file names that are not UTF-8 ------------------------------------------------------

@pytest.mark.slow
def test_names_that_are_not_utf8_reach_every_output_escaped_the_same_way(odd_folder, odd_run, run_cli, tmp_path):
    """Was: ``UnicodeEncodeError`` tracebacks in ``train`` (the ``skipped.tsv`` write),
    ``assign``, ``features`` and ``report``. Every output now writes the bytes that are
    not UTF-8 as ``\\xNN``."""
    skipped = (odd_run / "skipped.tsv").read_text(encoding="utf-8")
    assert "broken-\\xe9t\\xe9.jpg\t" in skipped
    code, out, err = run_cli("assign", str(odd_run), "--data", str(odd_folder), "--out", str(tmp_path / "a"))
    assert code == 0, err
    csv = (tmp_path / "a" / "assignments.csv").read_text(encoding="utf-8")
    assert "\\xff\\xfe-odd.png," in csv and "broken-\\xe9t\\xe9.jpg," in csv
    if (tmp_path / "a" / "assignments.parquet").is_file():
        import pyarrow.parquet as pq

        paths = pq.read_table(tmp_path / "a" / "assignments.parquet").column("path").to_pylist()
        assert any(path.endswith("\\xff\\xfe-odd.png") for path in paths)
    code, out, err = run_cli("features", str(odd_run), "--data", str(odd_folder), "--out", str(tmp_path / "f"))
    assert code == 0, err
    assert "\\xff\\xfe-odd.png\t1" in (tmp_path / "f" / "paths.tsv").read_text(encoding="utf-8")
    code, out, err = run_cli("report", str(odd_run), "--activation-sample", "40", "--ascent-steps", "0",
                             "--n-filters", "2", "--top-images", "40", "--images-per-cluster", "40")
    assert code == 0, err
    (odd_run / "report" / "index.html").read_text(encoding="utf-8")  # valid UTF-8


def test_the_escaping_keeps_valid_names_and_marks_each_foreign_byte():
    from deepcluster.messages import shown_path

    assert shown_path("plain/été.png") == "plain/été.png"
    assert shown_path(os.fsdecode(b"a/\xff\xc3\xa9\xfe.jpg")) == "a/\\xffé\\xfe.jpg"


# -- item: damage on disk ---------------------------------------------------------------------

def _flip(path: Path, tensor: torch.Tensor, byte: int, bit: int) -> None:
    """Flip one bit of ``tensor``'s stored bytes inside ``path``."""
    payload = bytearray(path.read_bytes())
    where = payload.find(tensor.contiguous().numpy().tobytes())
    assert where >= 0
    payload[where + byte] ^= 1 << bit
    path.write_bytes(bytes(payload))


def _a_weight(state: dict) -> tuple[str, torch.Tensor]:
    return next((name, value) for name, value in state["model"].items()
                if value.is_floating_point() and value.numel() > 8 and name.startswith("classifier"))


@pytest.mark.parametrize("byte, bit", [(0, 0), (3, 6)], ids=["low-bit", "exponent-bit"])
@pytest.mark.slow
def test_a_flipped_bit_in_a_checkpoint_is_refused_by_resume_and_export(byte, bit, plain_run, run_cli,
                                                                       tmp_path):
    """Was: a flipped low bit passed ``export`` and ``--resume`` silently; a flipped exponent
    bit passed ``export`` and ended ``--resume`` in a traceback from the PCA."""
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    _flip(run / "checkpoint.pt", _a_weight(state)[1], byte, bit)
    damaged = (run / "checkpoint.pt").read_bytes()
    code, out, err = run_cli("export", str(run), "--out", str(tmp_path / "b.safetensors"))
    assert code == 2 and err.count("\n") == 1 and "does not match the checksum" in err, err
    assert not (tmp_path / "b.safetensors").exists()
    code, out, err = run_cli("train", "--out", str(run), "--epochs", "2", "--resume")
    assert code == 2 and err.count("\n") == 1 and "does not match the checksum" in err, err
    assert (run / "checkpoint.pt").read_bytes() == damaged


def test_huge_finite_weights_stop_with_exit_3_before_the_pca(plain_run, run_cli, tmp_path):
    """A weight of -4.9e37 in a checkpoint without a checksum (hand-made, or written before
    checksums): the features stay finite but their float32 covariance overflows. Was: a
    traceback from the PCA (``array must not contain infs or NaNs``)."""
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state.pop("checksum")
    first_conv = next(value for value in state["model"].values() if value.dim() == 4)
    first_conv[0, 0, 0, 0] = -4.9e37  # features up to 1.5e38, all finite
    torch.save(state, run / "checkpoint.pt")
    code, out, err = run_cli("train", "--out", str(run), "--epochs", "2", "--resume")
    assert code == EXIT_DIVERGED and err.count("\n") == 1 and "Traceback" not in err, err
    assert "features became" in err


def test_a_flipped_bit_in_an_exported_backbone_is_refused(plain_run, run_cli, tmp_path):
    from deepcluster.models import load_backbone_safetensors
    from deepcluster.models.export import ExportError

    path = tmp_path / "backbone.safetensors"
    code, out, err = run_cli("export", str(plain_run), "--out", str(path))
    assert code == 0, err
    model = load_backbone_safetensors(path)
    weight = next(value for value in model.state_dict().values() if value.is_floating_point() and value.numel() > 8)
    _flip(path, weight, 0, 0)
    with pytest.raises(ExportError, match="do not match the checksum"):
        load_backbone_safetensors(path)


def test_checkpoints_written_before_checksums_still_load(plain_run, tmp_path):
    from deepcluster.checkpoint import load_checkpoint

    state = torch.load(plain_run / "checkpoint.pt", weights_only=True)
    state.pop("checksum")
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["epoch"] == 1


# -- item: a config that expands --------------------------------------------------------------

LAUGHS = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"]
                   + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
                   + ["lr: *i", ""])


@pytest.mark.slow
def test_a_config_of_nested_yaml_aliases_is_refused_at_once(tmp_path):
    """Was: more than 3 minutes and 4.7 GB before being killed (the expanded value's
    ``repr`` went into the error)."""
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "deepcluster", "train", "--config", str(path), "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "uses a YAML alias (*a) at line 2" in result.stderr
    assert time.monotonic() - started < 30 and not (tmp_path / "run").exists()


def test_a_setting_error_never_carries_a_whole_value():
    from deepcluster.config import ConfigError, coerce

    nested = [[list(range(1000))] * 1000] * 1000  # shared lists: a billion items once expanded
    with pytest.raises(ConfigError, match=r"^setting 'lr' must be a finite number, got \[\[\[0, 1, 2, 3, \.\.\.\]") as error:
        coerce("lr", nested)
    assert len(str(error.value)) < 200 and "..." in str(error.value)


def test_a_config_file_over_a_megabyte_is_refused(tmp_path):
    from deepcluster.config import ConfigError, load_yaml

    path = tmp_path / "big.yaml"
    path.write_text("lr: 0.1\n" + "# padding\n" * 120_000)
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_yaml(path)


# -- item: damaged run files under report -----------------------------------------------------

def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _objects(path: Path) -> None:
    np.save(path, np.array([{"cluster": 1}] * 37, dtype=object), allow_pickle=True)


def _short(path: Path) -> None:
    np.save(path, np.load(path)[:5])


def _floats(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float32))


@pytest.mark.parametrize("damage, words", [(_truncated, "not a readable .npy file"), (_objects, "not a readable"),
                                           (_short, "5 rows for the run's 36 images"),
                                           (_floats, "not one integer per image")],
                         ids=["truncated", "object-dtype", "too-short", "floats"])
def test_report_on_damaged_assignments_is_one_line_naming_the_file(damage, words, plain_run, run_cli, tmp_path):
    """Was: a traceback (truncated, object dtype), or exit 0 with a wrong page (too short)."""
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    damage(run / "assignments" / "final.npy")
    code, out, err = run_cli("report", str(run), "--activation-sample", "8", "--ascent-steps", "0", "--n-filters", "2")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(run / "assignments" / "final.npy") in err and words in err


def test_report_on_a_damaged_final_json_is_one_line_naming_it(plain_run, run_cli, tmp_path):
    """Was: silently ignored."""
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    (run / "final.json").write_text('{"n_nonempty": 6, "nmi_la')
    code, out, err = run_cli("report", str(run), "--activation-sample", "8", "--ascent-steps", "0", "--n-filters", "2")
    assert code == 2 and err.count("\n") == 1 and str(run / "final.json") in err and "is damaged" in err
