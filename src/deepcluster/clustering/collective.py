"""The collectives distributed k-means needs, re-exported from :mod:`deepcluster.distributed`.

No-ops without a process group, so the same k-means code runs on one CPU and on many
processes.
"""

from deepcluster.distributed import (all_gather_floats, all_gather_ints, all_gather_rows, all_reduce_sum,
                                     is_distributed, rank, world_size)

__all__ = ["all_gather_floats", "all_gather_ints", "all_gather_rows", "all_reduce_sum", "is_distributed", "rank",
           "world_size"]
