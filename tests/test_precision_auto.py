"""``precision: auto``: bf16 where a short calibration finds it faster on hardware with native
bf16, else fp32; cached outside the run folder; the choice saved with the run."""

import json

import pytest
import torch
import yaml

from deepcluster import precision
from deepcluster.config import resolve
from deepcluster.settings.resolve import resolve_resume

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test its own cache folder; caching on."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(precision.CACHE_ENV, raising=False)


def config_of(**overrides):
    return resolve("digits", overrides={"precision": "auto", **overrides})


def never(*_):
    raise AssertionError("calibrated where it should not")


def test_a_cpu_without_bf16_flags_chooses_fp32_without_calibrating():
    choice = precision.choose(config_of(), CPU, flags="fpu sse avx2 avx512f", measure=never)
    assert choice == precision.Choice("fp32")
    assert "no native bf16" in choice.line("this CPU") and "not measured" in choice.line("this CPU")


@pytest.mark.parametrize("flag", precision.BF16_FLAGS)
def test_with_native_bf16_the_faster_precision_wins(flag):
    faster = precision.choose(config_of(), CPU, flags=f"avx2 {flag}", measure=lambda *_: (1.46, 3))
    assert faster.precision == "bf16" and not faster.cached
    assert faster.line("this CPU") == ("precision auto: bf16 (1.46x faster than fp32 on this CPU, "
                                       "measured on 3 batches)")
    slower = precision.choose(config_of(crop=40), CPU, flags=flag, measure=lambda *_: (0.8, 2))
    assert slower.precision == "fp32" and "0.80x the speed of fp32" in slower.line("this CPU")


def test_the_measurement_is_cached_per_network_outside_the_run_folder(tmp_path, monkeypatch):
    config = config_of(out_dir=str(tmp_path / "run"))
    precision.choose(config, CPU, flags="amx_bf16", measure=lambda *_: (1.3, 3))
    cache = tmp_path / "cache" / "deepcluster" / "precision.json"
    [(key, entry)] = json.loads(cache.read_text()).items()
    assert entry == {"speedup": 1.3, "steps": 3} and "torch" in key and "smallnet" in key
    again = precision.choose(config, CPU, flags="amx_bf16", measure=never)
    assert again.cached and again.precision == "bf16" and "cached" in again.line("this CPU")
    # another network is measured anew
    assert precision.choose(config_of(crop=48), CPU, flags="amx_bf16", measure=lambda *_: (0.9, 1)).precision == "fp32"
    monkeypatch.setenv(precision.CACHE_ENV, "off")  # neither read nor written
    assert precision.choose(config, CPU, flags="amx_bf16", measure=lambda *_: (0.5, 1)).precision == "fp32"
    assert len(json.loads(cache.read_text())) == 2


def test_a_damaged_cache_is_measured_over():
    path = precision.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert precision.choose(config_of(), CPU, flags="amx_bf16", measure=lambda *_: (1.2, 3)).precision == "bf16"
    assert len(json.loads(path.read_text())) == 1


def test_fp32_and_bf16_are_left_as_they_are():
    for fixed in ("fp32", "bf16"):
        config = config_of(precision=fixed)
        assert precision.resolve_precision(config, CPU, log=never) is config


def test_the_calibration_times_a_few_steps_and_leaves_the_random_state():
    config = config_of(crop=24, batch_size=4)
    state = torch.get_rng_state()
    speedup, steps = precision.calibrate(config, CPU)
    assert speedup > 0 and 1 <= steps <= precision.MAX_STEPS
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
def test_the_run_saves_the_choice_and_a_resume_keeps_it(cli, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_info", lambda field: "avx512_bf16" if field == "flags" else "test CPU")
    monkeypatch.setattr(precision, "calibrate", lambda *_: (1.5, 3))
    run = tmp_path / "run"
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "1", "--precision", "auto")
    assert code == 0, err
    assert "precision auto: bf16 (1.50x faster than fp32 on this CPU, measured on 3 batches)" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "bf16"

    # The hardware "changed": a resume still uses what the run chose, and measures nothing.
    monkeypatch.setattr(precision, "cpu_info", lambda field: "")
    monkeypatch.setattr(precision, "calibrate", never)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolve_resume(saved, run, overrides={"precision": "auto", "epochs": 2}).precision == "bf16"
    code, out, err = cli("train", "--out", run, "--resume", "--epochs", "2", "--precision", "auto")
    assert code == 0, err
    assert "resuming after epoch 1" in out and "precision auto" not in out
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "bf16"
    assert precision.resolve_precision(config_of(out_dir=str(run)), CPU, never, resume=True).precision == "bf16"


def test_auto_on_a_cpu_without_bf16_trains_in_fp32(cli, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_info", lambda field: "fpu avx2" if field == "flags" else "test CPU")
    monkeypatch.setattr(precision, "calibrate", never)
    run = tmp_path / "run"
    code, out, err = cli("train", "--data", image_folder, "--out", run, "--epochs", "1", "--precision", "auto",
                         "--final_clustering", "false")
    assert code == 0, err
    assert "precision auto: fp32 (this CPU has no native bf16" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "fp32"
