"""Differential op sweep (tests/shard/op_sweep.py): every rule family on 1x1, 2x2 and 3x3,
Pair2D inputs (on 2x2 also one other layout per case), N=7, forward and input gradients against the single-device op;
the pair-tensor rules never gather; ops without a token-axis rule are exact (gathered)
and refused by strict=True, naming the op."""

import pytest

from autocp.testing import run_distributed
from tests.shard.op_sweep import CASES, GATHERED, LAYOUTS, sweep_worker

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", [1, 4, 9])
def test_every_rule_matches_single_device(world):
    extra = world == 4  # 2x2: a second layout per case (swapped / one axis / whole); 3x3 and 1x1: Pair2D
    res = run_distributed(sweep_worker, world, extra, timeout=900)
    assert len(res[0]) == len(CASES) * (2 if extra else 1)
    assert {lay for _n, lay in res[0]} == (set(LAYOUTS) if extra else {"pair2d"})
    for rank, r in enumerate(res):
        for (name, layout), (oerr, gerr, pair, strict) in r.items():
            where = (world, rank, name, layout)
            assert oerr < 1e-5, (where, oerr)
            assert gerr < 1e-4, (where, gerr)
            if layout == "pair2d" and world > 1:
                if name in GATHERED:
                    assert pair and "Fix" in strict and "gathered" in strict, (where, strict)
                else:
                    assert not pair, (where, "gathered a pair tensor")
