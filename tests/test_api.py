"""The Python API: docs/api.md's example runs as written, and the calls match the commands."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_the_documented_example_runs(image_folder, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 1
    shutil.copytree(image_folder, tmp_path / "photos")
    shutil.copytree(image_folder / "rings", tmp_path / "new_photos")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)  # noqa: S102 - the project's own documentation
    run, placed = namespace["run"], namespace["placed"]
    assert run.folder == Path("runs/photos") and len(run.records) == 2
    assert namespace["page"].is_file()
    assert len(placed.paths) == 12 and (placed.clusters >= 0).all()
    assert sum(1 for _ in Path("sorted").glob("cluster_*/*")) == 12
    assert namespace["features"].shape[0] == 12


def test_train_is_both_the_module_and_the_call():
    import deepcluster as dc
    from deepcluster import train

    assert train.run is not None and callable(dc.train) and dc.train is train


@pytest.mark.slow
def test_load_gives_the_run_or_the_exported_backbone(tiny_run, tmp_path, image_folder, run_cli):
    import deepcluster as dc

    run = dc.load(tiny_run / "checkpoint.pt")
    assert run.folder == tiny_run and run.config.n_clusters == 6 and len(run.records) == 2
    assert run_cli("export", tiny_run, "--out", tmp_path / "b.safetensors")[0] == 0
    backbone = dc.load(tmp_path / "b.safetensors")
    features, paths = run.features(image_folder)
    from deepcluster.models import preprocess_images, read_backbone_metadata

    images = preprocess_images(paths[:4], read_backbone_metadata(tmp_path / "b.safetensors"))
    with torch.no_grad():
        rows = backbone.forward_clustered(images).numpy()
    np.testing.assert_allclose(rows, features[:4], rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="does not exist"):
        dc.load(tmp_path / "nothing")


def test_a_bad_setting_is_the_command_lines_one_line_error(tmp_path):
    import deepcluster as dc
    from deepcluster.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'n_clusters'"):
        dc.train(data=str(tmp_path), out=str(tmp_path / "run"), n_cluster=3)
