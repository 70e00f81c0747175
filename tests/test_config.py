import pytest

from deepcluster.config import RECIPES, Config, ConfigError, coerce, from_dict, resolve


def test_paper_recipe_is_the_reference_settings():
    config = resolve("paper")
    assert (config.arch, config.sobel, config.crop, config.resize) == ("alexnet", True, 224, 256)
    assert (config.n_clusters, config.pca_dim, config.whiten_power, config.kmeans_iters) == (10000, 256, -0.5, 20)
    assert (config.lr, config.momentum, config.weight_decay, config.batch_size) == (0.05, 0.9, 1e-5, 256)
    assert (config.epochs, config.seed, config.crop_scale_min, config.sampler) == (500, 31, 0.08, "uniform")


def test_every_recipe_resolves():
    for name in RECIPES:
        assert isinstance(resolve(name), Config)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: small\nn_clusters: 50\nsobel: false\n")
    config = resolve(None, path, {"lr": "0.01", "epochs": "3"})
    assert (config.arch, config.n_clusters, config.sobel, config.lr, config.epochs) == ("smallnet", 50, False, 0.01, 3)


@pytest.mark.parametrize("overrides, message", [
    ({"n_cluster": "5"}, "unknown setting 'n_cluster' \\(did you mean 'n_clusters'\\?\\)"),
    ({"lr": "-1"}, "setting 'lr' must be a positive number"),
    ({"batch_size": "0"}, "setting 'batch_size' must be a positive integer"),
    ({"batch_size": "1.5"}, "setting 'batch_size' must be an integer"),
    ({"n_clusters": "1"}, "setting 'n_clusters' must be at least 2"),
    ({"arch": "resnet"}, "setting 'arch' is 'resnet'; choose one of"),
    ({"sobel": "maybe"}, "setting 'sobel' must be true or false"),
])
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve("paper", overrides=overrides)


def test_bad_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("n_clusters: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        resolve(None, path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        resolve(None, path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve(None, tmp_path / "missing.yaml")


def test_roundtrip_through_dict():
    config = resolve("small", overrides={"head_lr": "0.1"})
    assert from_dict(config.to_dict()) == config
    assert coerce("head_lr", "none") is None
