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


def test_small_and_digits_train_without_flips_as_measured():
    # docs/notebook/2026-11-30.md: flips cost 3.4 kNN points on MNIST-5k and 2.4 on CIFAR-10 (10,000 images).
    assert resolve("small").hflip is False and resolve("digits").hflip is False
    assert resolve("paper").hflip is True and resolve("v2-cifar").hflip is True


def test_v2_small_is_v2_cifar_on_the_small_net_as_measured():
    """The settings of the 2026-11-29 notebook run (`v2-cifar` with these five changed)."""
    small, cifar = resolve("v2-small").to_dict(), resolve("v2-cifar").to_dict()
    changed = {key: small[key] for key in small if small[key] != cifar[key]}
    assert changed == {"arch": "smallnet", "stem": "imagenet", "clustered": "body", "epochs": 11, "warmup_epochs": 1}


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: small\nn_clusters: 50\nsobel: false\n")
    config = resolve(None, path, {"lr": "0.01", "epochs": "3"})
    assert (config.arch, config.n_clusters, config.sobel, config.lr, config.epochs) == ("smallnet", 50, False, 0.01, 3)


def test_one_rule_picks_the_recipe_when_none_is_named(tmp_path):
    """--recipe, else the file's recipe:, else digits without a data folder, paper with one;
    the same whether or not a --config file is given (a file without recipe: was the paper
    recipe even on the digits: AlexNet at 224 px on 8 x 8 images)."""
    plain = tmp_path / "plain.yaml"
    plain.write_text("lr: 0.01\n")
    for config_file in (None, plain):
        digits = resolve(None, config_file)
        assert (digits.arch, digits.crop, digits.n_clusters, digits.out_dir) == ("smallnet", 32, 50, "runs/digits")
        photos = resolve(None, config_file, {"data": str(tmp_path)})
        assert (photos.arch, photos.crop, photos.out_dir) == ("alexnet", 224, "runs/deepcluster")
    with_data = tmp_path / "data.yaml"
    with_data.write_text(f"data: {tmp_path}\nout_dir: {tmp_path / 'run'}\n")
    assert resolve(None, with_data).arch == "alexnet" and resolve(None, with_data).out_dir == str(tmp_path / "run")
    assert resolve("small", plain).arch == "smallnet" and resolve("small", plain).out_dir == "runs/digits"
    named = tmp_path / "named.yaml"
    named.write_text("recipe: small\n")
    assert resolve(None, named, {"data": str(tmp_path)}).n_clusters == 100


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


def test_list_settings_come_from_yaml_lists_or_comma_separated_command_line_values(tmp_path):
    """Settings annotated ``tuple[...]`` (the colour statistics today; v2's prototypes and
    multi-crop sizes next) take a YAML list or ``--key a,b,c``, and are stored as lists."""
    from deepcluster.config import SettingType

    counts = SettingType.of(tuple[int, ...])  # e.g. prototypes: [3000, 3000, 3000]
    assert counts.parse("3000,3000,3000") == (3000, 3000, 3000) == counts.parse([3000, 3000, 3000])
    assert counts.parse("224") == (224,) and counts.describe() == "one or more comma-separated integers"
    # (the command line turns these into its one-line error; here the parser's own exception)
    for bad in ("3000,1.5", "", "a,b", [True]):
        with pytest.raises((ValueError, TypeError), match=r"^$|could not convert string"):
            counts.parse(bad)
    assert SettingType.of(tuple[int, ...] | None).parse("none") is None
    path = tmp_path / "lists.yaml"
    path.write_text("mean: [0.5, 0.4, 0.3]\n")
    config = resolve("small", path, overrides={"std": "0.2,0.2,0.25"})
    assert config.mean == (0.5, 0.4, 0.3) and config.std == (0.2, 0.2, 0.25)
    assert config.to_dict()["mean"] == [0.5, 0.4, 0.3] and from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="'std' must be three comma-separated finite numbers"):
        resolve("small", overrides={"std": "0.2,0.2"})
