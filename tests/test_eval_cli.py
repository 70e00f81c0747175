import json
import shutil

import pytest
import torch

from deepcluster.checkpoint import save_checkpoint
from deepcluster.cli import main
from deepcluster.config import resolve
from deepcluster.evaluation.suite import (EvalSettings, baseline_backbone, open_labelled_splits,
                                          random_init_backbone)
from deepcluster.models import model_from_config

FAST = ["--probe-epochs", "2", "--probe-batch-size", "12", "--cluster-seeds", "1", "--cluster-pca", "0",
        "--workers", "0", "--batch-size", "16", "--retrieval-k", "1,5", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    """``--threads`` sets torch's global thread count; put it back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, image_folder):
    """A small-recipe checkpoint whose weights differ from the random init."""
    run = tmp_path_factory.mktemp("run")
    config = resolve("small", overrides={"data": str(image_folder), "out_dir": str(run), "epochs": 3})
    torch.manual_seed(123)
    model = model_from_config(config)
    save_checkpoint(run / "checkpoint.pt", {"config": config.to_dict(), "arch": config.arch, "epoch": 3,
                                            "model": model.state_dict()})
    records = [{"epoch": e, "time_features": 1.0, "time_clustering": 0.5, "time_training": 10.0, "n_images": 36,
                "train_loss": 4.0 - e, "nmi_labels": 0.1 * e, "nmi_prev": None} for e in range(1, 4)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run / "checkpoint.pt"


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_missing_checkpoint_exits_2_with_one_line(tmp_path, image_folder, capsys):
    code, out, err = run_cli(["eval", str(tmp_path / "nope.pt"), "--train", str(image_folder),
                              "--val", str(image_folder)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "does not exist" in err and err.startswith("deepcluster: error:")


def test_missing_folder_exits_2_with_one_line(checkpoint, tmp_path, image_folder, capsys):
    code, _, err = run_cli(["eval", str(checkpoint), "--train", str(tmp_path / "missing"),
                            "--val", str(image_folder)], capsys)
    assert code == 2 and err.count("\n") == 1 and "missing" in err


def test_unlabelled_folder_and_bad_options_exit_2(checkpoint, tmp_path, image_folder, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(image_folder / "rings" / "01.jpg", flat / "a.jpg")
    for args in (["--train", str(flat), "--val", str(image_folder)],
                 ["--train", str(image_folder), "--val", str(image_folder), "--protocols", "knn,magic"],
                 ["--train", str(image_folder), "--val", str(image_folder), "--knn-k", "zero"],
                 ["--train", str(image_folder), "--val", str(image_folder), "--no-such-option", "1"],
                 ["--train", str(image_folder), "--val", str(image_folder), "--probe-layers", "conv99"],
                 ["--train", str(image_folder), "--val", str(image_folder), "--cluster-whiten", "0.5"]):
        code, _, err = run_cli(["eval", str(checkpoint), *args, "--out", str(tmp_path / "o"), *FAST], capsys)
        assert code == 2 and err.count("\n") == 1, (args, err)


@pytest.mark.slow
def test_eval_reports_every_protocol_and_the_gain_over_random_init(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(checkpoint), "--train", str(image_folder), "--val", str(image_folder), "--out", str(out),
            "--probe-layers", "conv1,conv7", *FAST]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    trained, random_init = report["results"]["trained"], report["results"]["random_init"]
    assert set(trained["linear"]["layers"]) == {"conv1", "conv7"}
    assert trained["linear"]["layers"]["conv1"]["dim"] == 9248
    assert set(trained) >= {"linear", "knn", "clustering", "retrieval"}
    assert random_init is not None and report["gain"]["knn/fc/top1"] == pytest.approx(
        trained["knn"]["fc"]["top1"] - random_init["knn"]["fc"]["top1"])
    assert report["training_budget"]["epochs_completed"] == 3
    assert report["training_budget"]["hours"] == pytest.approx(3 * 11.5 / 3600)
    assert (out / "eval_random_init.json").is_file() and not (out / "features").exists()
    for text in ("random init", "trained", "gain", "selected on val", "kNN fc top-1 (k=20, T=0.07)"):
        assert text in stdout
    # A second run reuses the stored baseline instead of recomputing it.
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "baseline reused" in stdout and "[random init]" not in stdout
    assert report["settings"]["baseline_batchnorm"] == "data"
    assert "BatchNorm statistics of the training images" in stdout
    # ... but not for a baseline with other BatchNorm statistics.
    code, stdout, _ = run_cli([*args, "--baseline-batchnorm", "init"], capsys)
    assert code == 0 and "[random init]" in stdout and "BatchNorm statistics as initialised" in stdout


def test_random_init_alone_and_reference_probe_mode(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, _ = run_cli(["eval", str(checkpoint), "--train", str(image_folder), "--val", str(image_folder),
                               "--out", str(out), "--random-init", "--protocols", "linear,knn",
                               "--probe-mode", "reference", "--probe-layers", "conv2", *FAST], capsys)
    assert code == 0
    report = json.loads((out / "eval_random_init.json").read_text())
    assert report["results"]["trained"] is None and report["gain"] is None
    assert report["results"]["random_init"]["linear"]["mode"] == "reference"
    assert "reference, augmented" in stdout


def test_random_init_is_the_network_the_run_started_from():
    config = resolve("small")
    torch.manual_seed(config.seed)
    start = model_from_config(config)
    state = torch.get_rng_state()
    twin = random_init_backbone(config)
    assert torch.equal(state, torch.get_rng_state())  # global random state untouched
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), twin.state_dict().values()))
    assert not twin.training


@pytest.mark.slow
def test_the_baseline_has_the_random_weights_and_the_training_images_batchnorm_statistics(image_folder):
    """``--baseline-batchnorm data``: the weights the run started from, and in each BatchNorm
    the mean and variance of what reaches it over the training split's centre views."""
    config = resolve("small", overrides={"data": str(image_folder)})
    splits = open_labelled_splits(str(image_folder), str(image_folder))
    start = random_init_backbone(config)
    settings = EvalSettings(batch_size=7, workers=0)  # batches of unequal size: a plain average of batch statistics
    model = baseline_backbone(config, splits, settings, "cpu")
    assert not model.training
    weights = {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in weights.items())
    # The first BatchNorm sees the first convolution's output: its statistics over all images.
    from deepcluster.data import CenterView, Normalize
    view, normalize = CenterView(config.resize, config.crop), Normalize(config.mean, config.std)
    images = normalize(torch.stack([view(splits.train.load(i)) for i in range(len(splits.train))]))
    with torch.no_grad():
        conv = start.features[0](images)
    batches = torch.split(conv, 7)
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.var(dim=(0, 2, 3)) for b in batches]).mean(0)  # unbiased, as BatchNorm keeps
    bn = model.features[1]
    assert torch.allclose(bn.running_mean, means, atol=1e-5)
    assert torch.allclose(bn.running_var, variances, rtol=1e-4)
    assert bn.momentum == start.features[1].momentum  # restored after the pass
    # ``init`` keeps the statistics the network was initialised with.
    init = baseline_backbone(config, splits, EvalSettings(baseline_batchnorm="init", workers=0), "cpu")
    assert torch.equal(init.features[1].running_mean, torch.zeros_like(bn.running_mean))


def test_the_table_header_names_a_v2_runs_prototypes_not_the_unused_k():
    from deepcluster.evaluation.report import clusters_of

    assert clusters_of({"n_clusters": 100, "prototypes": None}) == "k=100"
    assert clusters_of({"n_clusters": None, "prototypes": [3000, 3000, 3000]}) == "v2, prototypes 3000,3000,3000"


def test_layers_reads_every_protocol_on_each_layer_in_one_table(checkpoint, image_folder, tmp_path, capsys):
    """``--layers``: linear probes and kNN on conv, body, hidden fc and fc, one table."""
    out = tmp_path / "eval"
    layers = ["conv1", "body", "fc1", "fc"]
    code, stdout, err = run_cli(["eval", str(checkpoint), "--train", str(image_folder), "--val", str(image_folder),
                                 "--out", str(out), "--protocols", "linear,knn", "--layers", ",".join(layers),
                                 "--baseline", "none", *FAST], capsys)
    assert code == 0, err
    trained = json.loads((out / "eval.json").read_text())["results"]["trained"]
    assert list(trained["linear"]["layers"]) == layers and list(trained["knn"]) == layers
    assert trained["linear"]["layers"]["body"]["pooling"] == "none"
    for layer in layers:
        assert f"kNN {layer} top-1" in stdout and f"linear {layer} top-1" in stdout


def test_body_and_hidden_fc_layers_are_what_the_backbone_computes():
    from deepcluster.evaluation.features import forward_layers, head_layers

    images = torch.randn(3, 3, 32, 32)
    for clustered, heads in (("fc", ["body", "fc1"]), ("body", ["body", "fc1", "fc2"])):
        model = model_from_config(resolve("small", overrides={"clustered": clustered})).eval()
        assert head_layers(model) == heads
        with torch.no_grad():
            out = forward_layers(model, images, {}, include_fc=True, heads=tuple(heads))
            body = torch.flatten(model.pool(model.forward_body(images)), 1)
            assert torch.allclose(out["body"], body)
            assert torch.allclose(out["fc1"], torch.relu(model.classifier[1](body)))
            assert torch.allclose(out["fc"], model.forward_clustered(images))
            if clustered == "body":  # fc is the body: the classifier's output is fc2
                assert torch.allclose(out["fc2"], model.forward_features(images))


def test_pca_widths_adds_whitened_and_plain_rows_to_the_clustering(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, err = run_cli(["eval", str(checkpoint), "--train", str(image_folder), "--val", str(image_folder),
                                 "--out", str(out), "--protocols", "clustering", "--pca-widths", "4,8",
                                 "--baseline", "none", *FAST], capsys)
    assert code == 0, err
    report = json.loads((out / "eval.json").read_text())
    widths = report["results"]["trained"]["pca_widths"]["fc"]
    assert widths["l2"]["pca_dim"] == 0 and list(widths["widths"]) == ["4", "8"]
    assert widths["widths"]["4"]["whitened"]["whiten_power"] == -0.5 and widths["widths"]["4"]["not"]["pca_dim"] == 4
    assert report["settings"]["pca_widths"] == [4, 8]
    for text in ("ACC train, L2 only", "ACC train, PCA 4 whitened", "ACC train, PCA 8 not whitened"):
        assert text in stdout


def test_baseline_batchnorm_init_and_data_are_two_baseline_columns(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(checkpoint), "--train", str(image_folder), "--val", str(image_folder), "--out", str(out),
            "--protocols", "knn", "--layers", "body,fc", "--baseline-batchnorm", "init,data", *FAST]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    results = json.loads((out / "eval.json").read_text())["results"]
    assert list(results["baselines"]) == ["init", "data"] and results["random_init"] == results["baselines"]["init"]
    assert "random BN init" in stdout and "random BN data" in stdout and "gain is over random BN init" in stdout
    assert "[random init, BatchNorm statistics data]" in stdout
    # The init column is the baseline --baseline-batchnorm init computes alone.
    code, _, _ = run_cli([*args[:-len(FAST) - 1], "init", *FAST, "--out", str(tmp_path / "alone")], capsys)
    alone = json.loads((tmp_path / "alone" / "eval.json").read_text())["results"]["random_init"]
    assert code == 0 and alone["knn"] == results["baselines"]["init"]["knn"]
    # A second run reuses both columns.
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "baseline reused" in stdout and "random BN data" in stdout


@pytest.mark.parametrize("bad", [["--layers", ","], ["--layers", "conv1,nope"],
                                 ["--layers", "fc", "--feature-layers", "fc"], ["--layers", "fc", "--probe-mode", "reference"],
                                 ["--pca-widths", "0"], ["--pca-widths", "abc"],
                                 ["--pca-widths", "8", "--protocols", "knn"],
                                 ["--baseline-batchnorm", "init,init"], ["--baseline-batchnorm", "fresh"],
                                 ["--baseline-batchnorm", ""]])
def test_bad_values_of_the_layer_width_and_baseline_options_exit_2(bad, checkpoint, image_folder, tmp_path, capsys):
    code, _, err = run_cli(["eval", str(checkpoint), "--train", str(image_folder), "--val", str(image_folder),
                            "--out", str(tmp_path / "o"), *FAST, *bad], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("deepcluster: error:"), (bad, err)
