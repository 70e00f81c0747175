"""Each torchrun process draws its own dropout masks; process 0 keeps a single process's stream.

Was: every process seeded torch's generator alike and drew identical dropout masks for
different images (and v2's crops were drawn from each process's local sample position,
so the processes cropped their different images alike).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from deepcluster import distributed

dist.init_process_group("gloo")
torch.manual_seed(7)
before = torch.rand(3).tolist()
with distributed.rank_stream(7, 2):
    mask = torch.nn.functional.dropout(torch.ones(64), 0.5).tolist()
after = torch.rand(3).tolist()
with open(sys.argv[1] + f"/rank{dist.get_rank()}.json", "w") as handle:
    json.dump({"before": before, "mask": mask, "after": after}, handle)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_each_process_draws_its_own_dropout_masks_and_process_0_those_of_one_process(tmp_path):
    script = tmp_path / "streams.py"
    script.write_text(SCRIPT)
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    torch.manual_seed(7)  # one process, as a plain `deepcluster train` draws
    single = {"before": torch.rand(3).tolist(), "mask": torch.nn.functional.dropout(torch.ones(64), 0.5).tolist(),
              "after": torch.rand(3).tolist()}
    assert ranks[0] == single  # process 0: exactly the stream of one process
    assert ranks[1]["before"] == single["before"]  # the same start (the same weights, the same head)
    assert ranks[1]["mask"] != ranks[0]["mask"]  # its own masks for its own images
    assert ranks[1]["after"] == single["after"]  # after the pass, process 0's state everywhere (resumable)


def test_v2_crops_follow_the_sample_position_in_the_whole_epoch():
    """A process's share keeps each sample's place in the epoch's list: its crops are those
    the sample gets in a single-process run."""
    from deepcluster.data.multicrop import MultiCropDataset

    class Source:
        def load(self, index):
            from PIL import Image

            return Image.new("RGB", (8, 8))

    class Crops:
        groups = []

        def __call__(self, image, rng):
            return [torch.tensor(rng.integers(0, 10**9))]

    targets = np.zeros((1, 6), dtype=np.int64)
    whole = MultiCropDataset(Source(), np.arange(6), targets, Crops(), seed=3, epoch=1)
    share = MultiCropDataset(Source(), np.arange(1, 6, 2), targets, Crops(), seed=3, epoch=1,
                             positions=np.arange(1, 6, 2))
    for local, position in enumerate(range(1, 6, 2)):
        assert share[local][0][0] == whole[position][0][0]
