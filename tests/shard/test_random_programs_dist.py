"""Random AF3-like programs (tests/shard/random_programs.py): seeded trunks assembled from
glue and triangle / attention pieces in several spellings, through
``autocp.parallelize(strict=True)`` (no op may gather a pair tensor) on 2x2 and 3x3, N=7,
a masked token: outputs and every parameter gradient vs the single device."""

import pytest

from autocp.testing import run_distributed
from tests.shard.random_programs import random_worker

pytestmark = pytest.mark.distributed

SEEDS = list(range(6))


@pytest.mark.parametrize("world", [4, 9])
def test_random_programs_match_single_device(world):
    res = run_distributed(random_worker, world, SEEDS, timeout=900)
    for rank, r in enumerate(res):
        for seed, (oerr, gerr, names) in r.items():
            assert oerr < 1e-5, (world, rank, seed, names, oerr)
            assert gerr < 1e-4, (world, rank, seed, names, gerr)
