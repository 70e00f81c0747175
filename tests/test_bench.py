"""``bench/run.py`` writes its one result schema, and ``bench/plot.py`` reads it and the result
files of the older scripts that the documentation cites."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

from lib import result as schema  # noqa: E402

RUN_KEYS = {"label", "tree", "recipe", "settings", "processes", "records", "final", "wall_s", "memory"}
TOP_KEYS = {"schema", "kind", "name", "command", "created", "tree", "machine", "settings", "baselines", "runs",
            "summary", "table"}


def test_bench_holds_at_most_eight_scripts():
    assert len(list(BENCH.glob("*.py"))) <= 8


@pytest.mark.parametrize("name", ["learning_v2_small_28ep.json", "sweep_mnist10.json", "epoch_cost_cifar10_10k.json",
                                  "vs_reference_imagenette1500.json"])
def test_older_result_files_read_into_the_schema(name):
    result = schema.load(BENCH / "results" / name)
    assert TOP_KEYS <= set(result) and result["schema"] == schema.SCHEMA and result["runs"]
    assert all(RUN_KEYS <= set(run) for run in result["runs"])


def test_plot_draws_older_learning_files_together(tmp_path):
    out = tmp_path / "compare.png"
    done = subprocess.run([sys.executable, str(BENCH / "plot.py"), "v1_small_1core", "v2_smallnet_1core", "--out",
                           str(out), "--epoch-minutes", "v2_smallnet_1core=9.6,7.2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0


def test_a_variant_needs_a_label():
    from lib.learning import parse_variant

    assert parse_variant("k300: n_clusters=300 pca_dim=64") == ("k300", ["n_clusters=300", "pca_dim=64"])
    with pytest.raises(ValueError):
        parse_variant(": n_clusters=300")


@pytest.mark.slow
def test_learning_one_epoch_on_the_digits_writes_the_schema(tmp_path):
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "learning", "--epochs", "1", "--name", "toy",
                           "--out", str(tmp_path / "run"), "--results", str(results), "--raw-baseline"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((results / "learning_toy.json").read_text())
    assert TOP_KEYS <= set(result)
    assert result["schema"] == schema.SCHEMA and result["kind"] == "learning" and result["name"] == "toy"
    assert {"cpu", "cpu_flags", "torch", "threads"} <= set(result["machine"])
    assert result["settings"]["recipe"] == "digits" and result["settings"]["budget"]["epochs"] == 1
    assert {"cluster_acc", "cluster_nmi"} <= set(result["baselines"]["raw_pixels"])
    (run,) = result["runs"]
    assert RUN_KEYS <= set(run) and len(run["records"]) == 1
    record = run["records"][0]
    assert record["epoch"] == 1 and 0.0 <= record["cluster_acc"] <= 100.0  # percent
    assert record["time_budget"] == pytest.approx(record["time_features"] + record["time_clustering"]
                                                  + record["time_training"])
    assert run["final"] is not None and "cluster_acc" in run["final"]
    assert result["summary"]["variants"][0]["epochs"] == 1
    assert (results / "learning_toy.png").stat().st_size > 0


def test_cost_refuses_sides_of_this_tree_beside_the_authors_code():
    """``--also``/``--against`` with ``--reference`` would be silently dropped: one line, exit 2."""
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "cost", "--name", "x", "--reference", "ref",
                           "--also", "keep_freed_memory=true"], capture_output=True, text=True)
    assert done.returncode == 2 and "run them without --reference" in done.stderr
    assert "Traceback" not in done.stderr


def _png(path: Path, size: int, shade: int, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), shade if mode == "L" else (shade, shade, shade)).save(path)


def test_folders_split_a_folder_of_classes(tmp_path):
    for c in ("a", "b"):
        for i in range(5):
            _png(tmp_path / "src" / c / f"img{i}.jpg", 100, 20 * i)
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "folders", "split", str(tmp_path / "src"), "--out",
                           str(tmp_path / "out"), "--size", "40", "--val-per-class", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 classes, 6 training and 4 validation images of 40 px" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out" / "val" / "a").iterdir()) == ["img3.png", "img4.png"]
    from PIL import Image

    assert Image.open(tmp_path / "out" / "train" / "b" / "img0.png").size == (40, 40)


def test_folders_join_omniglot_zips_and_count_a_character_once(tmp_path):
    import zipfile

    for n, alphabets in ((1, ("Greek", "Korean")), (2, ("Greek", "Tagalog"))):
        with zipfile.ZipFile(tmp_path / f"small{n}.zip", "w") as archive:
            for alphabet in alphabets:
                for drawer in range(1, 5):
                    png = tmp_path / "p.png"
                    _png(png, 105, 255, mode="L")
                    archive.write(png, f"images_background_small{n}/{alphabet}/character01/0001_{drawer:02d}.png")
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "folders", "omniglot", str(tmp_path / "small1.zip"),
                           str(tmp_path / "small2.zip"), "--out", str(tmp_path / "out"), "--size", "32",
                           "--val-per-class", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "3 classes, 9 training and 3 validation images of 32 px" in done.stdout
    assert (tmp_path / "out" / "val" / "Greek__character01" / "0001_04.png").is_file()


def test_learning_applies_the_folder_rules_of_train(tmp_path, capsys):
    """A benchmark measures what ``deepcluster train`` runs: the folder's k and carry rules."""
    import argparse

    from lib.learning import settings_of

    for i in range(60):
        _png(tmp_path / "photos" / f"c{i % 2}" / f"{i}.png", 64, i)
    args = argparse.Namespace(recipe="photo", out=str(tmp_path / "run"), val=None, train=str(tmp_path / "photos"),
                              epochs=1)
    overrides, _ = settings_of(args, [])
    assert overrides["carry_clusters"] is False and overrides["n_clusters"] <= 60
    assert "carry_clusters" in capsys.readouterr().out
