"""`deepcluster features` and `deepcluster export` on a tiny run."""

import json

import numpy as np
import pytest
import torch

from deepcluster.cli import main
from deepcluster.data import CenterView, FolderSource, Normalize
from deepcluster.evaluation.features import probe_pooling
from deepcluster.inference import load_cluster_model
from deepcluster.models import ExportError, create_model, load_backbone_safetensors, read_backbone_metadata
from deepcluster.checkpoint import load_backbone


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def centre_batch(config, source):
    view = CenterView(config.resize, config.crop)
    images = torch.stack([view(source.load(i)) for i in range(len(source))])
    return Normalize(config.mean, config.std)(images)


@pytest.mark.slow
def test_features_are_the_clustered_features_with_paths_and_classes(tiny_run, image_folder, tmp_path):
    out = tmp_path / "fc"
    assert main(["features", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--data", str(image_folder),
                 "--out", str(out), "--batch-size", "7"]) == 0
    features = np.load(out / "features.npy")
    model, config = load_backbone(tiny_run / "checkpoint.pt")
    source = FolderSource(image_folder)
    with torch.no_grad():
        expected = model.forward_features(centre_batch(config, source)).numpy()
    assert features.dtype == np.float32 and features.shape == (36, model.feature_dim)
    assert np.allclose(features, expected, atol=1e-5)
    lines = (out / "paths.tsv").read_text().splitlines()
    assert lines[0] == "row\tpath\treadable\tclass\tproblem"
    assert [line.split("\t")[1] for line in lines[1:]] == source.paths
    assert {line.split("\t")[3] for line in lines[1:]} == {"stripes", "rings", "checkers"}
    meta = json.loads((out / "features.json").read_text())
    assert meta["layer"] == "fc" and meta["dim"] == model.feature_dim and not meta["pca_whitened_l2"]


@pytest.mark.slow
def test_conv_layer_and_pca_options(tiny_run, image_folder, tmp_path):
    checkpoint = str(tiny_run / "checkpoint.pt")
    assert main(["features", "--checkpoint", checkpoint, "--data", str(image_folder), "--out", str(tmp_path / "c"),
                 "--layer", "conv2", "--pool-dim", "500"]) == 0
    model, config = load_backbone(checkpoint)
    pooled = np.load(tmp_path / "c" / "features.npy")
    assert pooled.shape == (36, probe_pooling(model, config.crop, 500)["conv2"].dim) and pooled.min() >= 0
    assert main(["features", "--checkpoint", checkpoint, "--data", str(image_folder), "--out", str(tmp_path / "p"),
                 "--pca"]) == 0
    whitened = np.load(tmp_path / "p" / "features.npy")
    cluster_model = load_cluster_model(checkpoint)
    with torch.no_grad():
        fc = model.forward_features(centre_batch(config, FolderSource(image_folder))).numpy()
    assert whitened.shape == (36, cluster_model.pca.n_components)
    assert np.allclose(np.linalg.norm(whitened, axis=1), 1, atol=1e-5)
    assert np.allclose(whitened, cluster_model.pca.project(fc), atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--layer", "conv99"], "unknown layer 'conv99'"),
    (["--layer", "conv1", "--pca"], "applies to the clustered layer only"),
    (["--batch-size", "0"], "--batch-size must be positive"),
])
@pytest.mark.slow
def test_features_bad_input_exits_2(extra, message, tiny_run, image_folder, tmp_path, capsys):
    code = main(["features", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--data", str(image_folder),
                 "--out", str(tmp_path / "x")] + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_export_round_trip_gives_identical_features(tiny_run, tmp_path):
    path = tmp_path / "backbone.safetensors"
    assert main(["export", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--out", str(path)]) == 0
    exported = load_backbone_safetensors(path)
    original, config = load_backbone(tiny_run / "checkpoint.pt")
    assert not exported.training
    images = torch.randn(5, 3, config.crop, config.crop, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported.forward_features(images), original.forward_features(images))
        assert torch.equal(exported.forward_body(images), original.forward_body(images))
    info = read_backbone_metadata(path)
    assert (info.arch, info.sobel, info.feature_dim, info.image_size, info.resize, info.epoch) == \
        (config.arch, config.sobel, 32, config.crop, config.resize, 2)
    assert info.mean == tuple(config.mean) and info.std == tuple(config.std)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(original.state_dict())  # the backbone only: no pseudo-label head


@pytest.mark.slow
def test_exported_backbone_and_preprocess_images_give_the_features_of_the_run(tiny_run, image_folder, tmp_path):
    """The README's snippet: new image files through ``preprocess_images`` and the exported
    backbone give what ``deepcluster features`` writes for them."""
    from deepcluster.models import preprocess_images

    path = tmp_path / "backbone.safetensors"
    assert main(["export", str(tiny_run), "--out", str(path)]) == 0
    assert main(["features", str(tiny_run), "--data", str(image_folder), "--out", str(tmp_path / "f")]) == 0
    files = FolderSource(image_folder).paths
    model = load_backbone_safetensors(path)
    with torch.no_grad():
        features = model.forward_features(preprocess_images(files, read_backbone_metadata(path))).numpy()
    assert np.allclose(features, np.load(tmp_path / "f" / "features.npy"), atol=1e-5)


@pytest.mark.slow
def test_export_refuses_foreign_files_and_bad_input(tiny_run, tmp_path, capsys):
    (tmp_path / "notes.safetensors").write_text("not tensors")
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        load_backbone_safetensors(tmp_path / "notes.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ExportError, match="not a deepcluster backbone"):
        load_backbone_safetensors(tmp_path / "other.safetensors")
    for argv, message in ((["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "b")], "does not exist"),
                          (["--checkpoint", str(tiny_run / "checkpoint.pt"), "--out", str(tmp_path)], "is a folder"),
                          (["--checkpoint", str(tiny_run / "checkpoint.pt")], "--out")):
        code = main(["export"] + argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_every_command_writes_its_files_with_the_usual_mode(tiny_run, image_folder, tmp_path):
    """Files are created 0666 less the umask (0644 under the usual 022), as any tool's; was
    0600 for the exported backbone."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        checkpoint = str(tiny_run / "checkpoint.pt")
        assert main(["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "backbone.safetensors")]) == 0
        assert main(["features", "--checkpoint", checkpoint, "--data", str(image_folder),
                     "--out", str(tmp_path / "f")]) == 0
        assert main(["assign", "--checkpoint", checkpoint, "--data", str(image_folder),
                     "--out", str(tmp_path / "a")]) == 0
        assert main(["report", str(tiny_run), "--out", str(tmp_path / "r"), "--ascent-steps", "0",
                     "--activation-sample", "36"]) == 0
    finally:
        os.umask(umask)
    modes = {str(path.relative_to(tmp_path)): oct(stat.S_IMODE(path.stat().st_mode))
             for path in tmp_path.rglob("*") if path.is_file()}
    assert len(modes) >= 7 and set(modes.values()) == {"0o644"}, modes


def test_an_export_of_a_retired_wider_small_net_is_refused_in_one_line(tmp_path):
    """Exports record width and depth (always 1 now); a file from a run with the retired
    width or depth settings names the shape instead of failing on its tensors."""
    from deepcluster.models import BackboneMetadata, save_backbone_safetensors

    model, path = create_model("smallnet", sobel=False, feature_dim=32), tmp_path / "wide.safetensors"
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    save_backbone_safetensors(model, path, BackboneMetadata("smallnet", False, 32, 32, 32, mean, std, width=2))
    with pytest.raises(ExportError, match="a smallnet of width 2 and depth 1, shapes this version no longer builds"):
        load_backbone_safetensors(path)
    save_backbone_safetensors(model, path, BackboneMetadata("smallnet", False, 32, 32, 32, mean, std))
    assert read_backbone_metadata(path).width == 1 and load_backbone_safetensors(path).feature_dim == 32
