"""The one training loop: the method registry, v1's head as a parameter group for one epoch,
the monitor's request to the feature pass."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import REFERENCE_LOOP

SRC = Path(__file__).resolve().parent.parent / "src" / "deepcluster"


def test_no_module_outside_the_methods_and_the_settings_names_a_method():
    named = re.compile(r"""\.method\s*(==|!=|in\b)|(["'])v[12]\2""")
    offenders = [f"{path.relative_to(SRC)}:{number}" for path in SRC.rglob("*.py")
                 if path.parent.name not in ("methods", "settings") and path.name != "config.py"
                 for number, line in enumerate(path.read_text().splitlines(), start=1) if named.search(line)]
    assert offenders == []


def test_the_registry_has_both_methods_and_v1_trains_one_head_at_temperature_1():
    from deepcluster.config import resolve
    from deepcluster.methods.registry import METHODS

    assert sorted(METHODS) == ["v1", "v2"] and all(METHODS[name].name == name for name in METHODS)
    assert METHODS["v1"].temperature(resolve("small")) == 1.0
    assert METHODS["v2"].temperature(resolve("v2-small")) == resolve("v2-small").temperature
    assert METHODS["v2"].head_group(None, resolve("v2-small")) is None


@pytest.mark.slow
def test_v1s_head_steps_at_its_own_rate_for_one_epoch_and_leaves_the_optimiser_as_it_was(tmp_path):
    from deepcluster.config import resolve
    from deepcluster.methods.registry import METHODS
    from deepcluster.train import train_one_epoch

    config = resolve("small", overrides={"out_dir": str(tmp_path), "feature_dim": 16, "n_clusters": 3, "lr": 0.05,
                                         "head_lr": 0.5, **REFERENCE_LOOP})
    method = METHODS["v1"]
    model, head, optimizer = method.build(config, torch.device("cpu"))
    head.reset(3)
    before = optimizer.state_dict()
    images = torch.randint(0, 255, (8, 3, config.crop, config.crop), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 2, 0, 1, 2, -1, 0]), torch.arange(8)), batch_size=4)
    head_before = head.linear.weight.detach().clone()
    trained = train_one_epoch(method.network(model, head), loader, optimizer, method.loss, config, 0,
                              torch.device("cpu"), 1.0, method.head_group(head, config), None)
    assert trained.unreadable == (6,) and trained.seen == 7 and np.isfinite(trained.loss) and trained.lr == 0.05
    assert len(optimizer.param_groups) == len(before["param_groups"])  # the head's group is gone again
    assert optimizer.state_dict()["param_groups"] == before["param_groups"]
    assert not torch.equal(head.linear.weight, head_before)


def test_the_monitor_asks_the_feature_pass_for_its_memory_only_when_it_measures(image_folder, tmp_path):
    from deepcluster.config import resolve
    from deepcluster.data import FolderSource
    from deepcluster.models import model_from_config
    from deepcluster.monitor import KnnMonitor, Monitor

    config = resolve("small", overrides={"data": str(image_folder), "out_dir": str(tmp_path), "epochs": 5,
                                         "val_every": 2, "feature_dim": 16})
    source = FolderSource(image_folder)
    model = model_from_config(config)
    monitor = Monitor(KnnMonitor.open(image_folder, source), source, config, torch.device("cpu"))
    asked = [monitor.request(model, epoch) is not None for epoch in range(5)]
    assert asked == [True, False, True, False, True]  # every val_every epochs, and the last
    assert monitor.request(model, 1, final=True).rows.all()
    assert Monitor(None, source, config, torch.device("cpu")).request(model, 0) is None
