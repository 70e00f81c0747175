"""``deepcluster recipes``, ``train --print-config``, and one "what is clustered" everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from deepcluster.checkpoint import save_checkpoint
from deepcluster.config import RECIPES, from_dict, resolve
from deepcluster.models import model_from_config


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_recipes_lists_one_line_each_and_prints_the_resolved_settings(run_cli):
    code, out, err = run_cli("recipes")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(RECIPES)
    assert "k=10000, 500 epochs" in lines[0] and "prototypes 3000,3000,3000, 800 epochs" in out
    code, out, err = run_cli("recipes", "small")
    assert code == 0, err
    assert "arch: smallnet  # recipe small" in out and "clustered: body  # recipe small" in out
    settings = yaml.safe_load(out)
    assert from_dict(settings) == resolve("small", overrides={"data": "FOLDER"})
    code, out, err = run_cli("recipes", "smal")
    assert code == 2 and "unknown recipe 'smal'" in err and err.count("\n") == 1


def test_print_config_prints_what_train_would_use_and_writes_nothing(run_cli, image_folder, tmp_path):
    code, out, err = run_cli("train", "--data", image_folder, "--recipe", "small", "--epochs", "3", "--out",
                             tmp_path / "run", "--print-config")
    assert code == 0, err
    assert "epochs: 3  # set" in out and "arch: smallnet  # recipe small" in out
    assert from_dict(yaml.safe_load(out)) == resolve("small", overrides={
        "data": str(image_folder), "epochs": 3, "out_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli("train", "--data", image_folder, "--n_cluster", "3", "--print-config")
    assert code == 2 and "did you mean --n_clusters" in err


# Sizes that keep each recipe's network small here; none changes what is clustered.
SMALLER = {"paper": {"resize": 72, "crop": 64, "feature_dim": 64},
           "photo": {"resize": 72, "crop": 64, "feature_dim": 64}, "v2-imagenet": {"resize": 72, "crop": 64}}
CLUSTERED = {"paper": "fc", "photo": "fc", "small": "body", "digits": "body", "v2-imagenet": "body", "v2-cifar": "body",
             "v2-small": "body"}


@pytest.mark.parametrize("recipe", [pytest.param(name, marks=pytest.mark.slow) if name in ("v2-imagenet", "v2-cifar") else name
                                    for name in RECIPES])  # ResNets: over a second each
def test_features_the_export_and_the_api_give_the_same_rows(recipe, image_folder, tmp_path, run_cli):
    import deepcluster as dc
    from deepcluster.models import preprocess_images, read_backbone_metadata

    run = tmp_path / "run"
    run.mkdir()
    config = resolve(recipe, overrides={"data": str(image_folder), "out_dir": str(run), **SMALLER.get(recipe, {})})
    torch.manual_seed(0)
    model = model_from_config(config)
    save_checkpoint(run / "checkpoint.pt", {"config": config.to_dict(), "arch": config.arch, "epoch": 1,
                                            "model": model.state_dict()})
    code, _, err = run_cli("features", run, "--data", image_folder, "--out", tmp_path / "f", "--threads", "1")
    assert code == 0, err
    meta = json.loads((tmp_path / "f" / "features.json").read_text())
    assert meta["layer"] == meta["clustered"] == CLUSTERED[recipe]
    written = np.load(tmp_path / "f" / "features.npy")
    assert written.shape[1] == model.clustered_dim
    code, _, err = run_cli("export", run, "--out", tmp_path / "b.safetensors")
    assert code == 0, err
    info = read_backbone_metadata(tmp_path / "b.safetensors")
    assert info.clustered == config.clustered
    backbone = dc.load(tmp_path / "b.safetensors")
    paths = [line.split("\t")[1] for line in (tmp_path / "f" / "paths.tsv").read_text().splitlines()[1:5]]
    with torch.no_grad():
        exported = backbone.forward_clustered(preprocess_images(paths, info)).numpy()
    np.testing.assert_allclose(exported, written[:4], rtol=1e-4, atol=1e-5)
    rows, api_paths = dc.load(run).features(image_folder)
    assert api_paths[:4] == paths
    np.testing.assert_array_equal(rows, written)
