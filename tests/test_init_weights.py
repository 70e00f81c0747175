"""``init``: start from weights in torchvision's ResNet layout, or from the package's own files.

The expected layout is written down in tests/fixtures/torchvision_resnet{18,50}_keys.txt
(every name and shape of ``torchvision.models.resnetNN().state_dict()``, in order, read off
torchvision's source); torchvision itself is not imported.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from deepcluster.checkpoint import CheckpointError
from deepcluster.initial_weights import load_initial_weights
from deepcluster.models import create_model
from deepcluster.models.torchvision_layout import to_torchvision

FIXTURES = Path(__file__).parent / "fixtures"


def written_layout(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (FIXTURES / f"torchvision_{arch}_keys.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape = line.split(" ", 1)
        rows.append((name, tuple(int(v) for v in shape.strip("()").split(",") if v.strip())))
    return rows


@pytest.mark.parametrize("arch,count", [("resnet18", 122), ("resnet50", 320)])
def test_the_package_resnet_maps_onto_torchvision_names_and_shapes_exactly(arch, count):
    expected = written_layout(arch)
    assert len(expected) == count
    model = create_model(arch, sobel=False)
    ours = to_torchvision(model, classes=1000)
    assert [(name, tuple(t.shape)) for name, t in ours.items()] == expected


def torchvision_like(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """A state dict in torchvision's layout with non-trivial values everywhere (BatchNorm
    statistics too), built from the written key list alone."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in written_layout(arch):
        if name.endswith("num_batches_tracked"):
            tensors[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            tensors[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            tensors[name] = torch.randn(shape, generator=generator) * 0.05
    return tensors


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.slow
def test_a_torchvision_file_round_trips_to_the_same_forward_output(tmp_path, suffix):
    torch.manual_seed(0)
    source = create_model("resnet18", sobel=False).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"resnet18{suffix}"
    tensors = to_torchvision(source, classes=10)
    if suffix == ".pt":
        torch.save(tensors, path)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    torch.manual_seed(1)
    target = create_model("resnet18", sobel=False)
    assert "torchvision" in load_initial_weights(target, path)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(images), target.eval()(images))


@pytest.mark.slow
def test_values_land_under_the_right_names(tmp_path):
    tensors = torchvision_like("resnet50", seed=3)
    torch.save(tensors, tmp_path / "r50.pth")
    model = create_model("resnet50", sobel=False)
    load_initial_weights(model, tmp_path / "r50.pth")
    state = model.state_dict()
    assert torch.equal(state["features.stem.conv.weight"], tensors["conv1.weight"])
    assert torch.equal(state["features.layer3.0.residual.7.running_var"], tensors["layer3.0.bn3.running_var"])
    assert torch.equal(state["features.layer4.0.shortcut.0.weight"], tensors["layer4.0.downsample.0.weight"])


@pytest.mark.parametrize("change,words", [
    (lambda t: t.pop("layer2.1.bn2.running_var"), "key 'layer2.1.bn2.running_var' is missing (the model expects "
                                                   "shape (128))"),
    (lambda t: t.__setitem__("layer1.0.conv2.weight", torch.zeros(64, 64, 1, 1)),
     "key 'layer1.0.conv2.weight' has shape (64, 64, 1, 1), the model expects (64, 64, 3, 3)"),
    (lambda t: t.__setitem__("layer5.0.conv1.weight", torch.zeros(1)), "key 'layer5.0.conv1.weight' (shape (1)) is "
                                                                        "not part of the model"),
    (lambda t: t.__setitem__("fc.weight", torch.zeros(1000, 2048)), "key 'fc.weight' has shape (1000, 2048)"),
])
def test_a_mismatching_file_is_refused_naming_the_first_mismatching_key_and_shape(tmp_path, change, words):
    tensors = torchvision_like("resnet18", seed=0)
    change(tensors)
    torch.save(tensors, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=re.escape(words)) as caught:
        load_initial_weights(create_model("resnet18", sobel=False), tmp_path / "bad.pt")
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
def test_resnet50_weights_on_resnet18_and_sobel_are_refused_with_the_fix(tmp_path):
    torch.save(torchvision_like("resnet50", seed=0), tmp_path / "r50.pt")
    with pytest.raises(CheckpointError, match="'layer1.0.conv1.weight' has shape"):
        load_initial_weights(create_model("resnet18", sobel=False), tmp_path / "r50.pt")
    torch.save(torchvision_like("resnet18", seed=0), tmp_path / "r18.pt")
    with pytest.raises(CheckpointError, match="set sobel false"):
        load_initial_weights(create_model("resnet18", sobel=True), tmp_path / "r18.pt")
    with pytest.raises(CheckpointError, match="fits arch resnet18 or resnet50 only"):
        load_initial_weights(create_model("smallnet", sobel=False), tmp_path / "r18.pt")


class Payload:
    """Any object other than tensors and plain containers."""


def test_a_pickled_object_is_not_run(tmp_path):
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_initial_weights(create_model("resnet18", sobel=False), tmp_path / "evil.pt")


@pytest.mark.slow
def test_the_package_checkpoint_and_export_start_a_run(tiny_run, tmp_path, run_cli):
    from deepcluster.checkpoint import load_backbone

    trained, _ = load_backbone(tiny_run / "checkpoint.pt")
    assert run_cli("export", tiny_run, "--out", tmp_path / "b.safetensors")[0] == 0
    for path in (tiny_run / "checkpoint.pt", tmp_path / "b.safetensors"):
        fresh = create_model("smallnet", sobel=True, feature_dim=32)
        load_initial_weights(fresh, path)
        for name, tensor in trained.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], tensor), name


@pytest.mark.slow
def test_train_with_init_starts_from_the_file_and_says_so(image_folder, tmp_path, run_cli):
    torch.manual_seed(5)
    start = create_model("resnet18", sobel=False, stem="imagenet")
    torch.save(to_torchvision(start, classes=1000), tmp_path / "start.pt")
    args = ["train", "--data", image_folder, "--arch", "resnet18", "--sobel", "false", "--resize", "32", "--crop", "32",
            "--epochs", "1", "--n_clusters", "4", "--pca_dim", "8", "--batch_size", "12", "--workers", "0",
            "--threads", "1", "--kmeans_iters", "3", "--lr", "1e-9", "--momentum", "0", "--weight_decay", "0",
            "--init", tmp_path / "start.pt"]
    code, out, err = run_cli(*args, "--out", tmp_path / "run")
    assert code == 0, err
    assert f"start: {tmp_path / 'start.pt'} (torchvision state dict)" in out
    from deepcluster.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    # lr 1e-9: the conv weights are still the file's (BatchNorm statistics moved in training)
    assert torch.allclose(saved["features.stem.conv.weight"], start.state_dict()["features.stem.conv.weight"],
                          atol=1e-6)
    code, out, err = run_cli(*args[:-1], tmp_path / "missing.pt", "--out", tmp_path / "run2")
    assert code == 2 and err.count("\n") == 1 and "missing.pt" in err and "does not exist" in err
    assert not (tmp_path / "run2").exists()


def test_eval_compares_with_the_init_weights_not_random_ones(image_folder, tmp_path, run_cli):
    import json

    from deepcluster.checkpoint import save_checkpoint
    from deepcluster.config import resolve
    from deepcluster.models import model_from_config

    config = resolve("small", overrides={"data": str(image_folder), "out_dir": str(tmp_path / "run"), "epochs": 1,
                                         "init": str(tmp_path / "start.pt"), "feature_dim": 32})
    torch.manual_seed(11)
    start = model_from_config(config)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    torch.manual_seed(12)
    trained = model_from_config(config)
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", {"config": config.to_dict(), "arch": config.arch, "epoch": 1,
                                                          "model": trained.state_dict()})
    code, out, err = run_cli("eval", tmp_path / "run", "--train", image_folder, "--val", image_folder, "--protocols",
                             "knn", "--workers", "0", "--batch-size", "16", "--threads", "1")
    assert code == 0, err
    assert f"[baseline: the run's start, {tmp_path / 'start.pt'}]" in out and "start: the weights the run" in out
    report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert report["start"] == str(tmp_path / "start.pt")
    from deepcluster.evaluation.compare import start_backbone

    baseline = start_backbone(config, None, None, "cpu")
    for name, tensor in start.state_dict().items():
        assert torch.equal(baseline.state_dict()[name], tensor), name
