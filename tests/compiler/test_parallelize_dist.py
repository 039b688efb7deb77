"""autocp.parallelize on Boltz-1/Boltz-2 PairformerModule over gloo ranks: 1x1, 2x2, 3x3.

N=7 is not divisible by 2 or 3 (padding), masks have zeros, all parameters re-drawn
(AF3 init zeroes the output projections), Boltz-2 in train mode (dropout 0), Boltz-1
in eval mode. Outputs and every parameter gradient (after sync_grads) are compared
with the original model on one process.
"""

import pytest

from autocp.testing import run_distributed
from tests.compiler._workers import combined_parity_worker, nonsquare_worker

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", [1, 4, 9])
def test_parity_boltz_pairformer(world):
    res = run_distributed(combined_parity_worker, world, timeout=400)
    for rank, r in enumerate(res):
        for case in ("v2_train", "v1_eval"):
            c = r[case]
            assert c["same_keys"], case
            # the eager engine: every registered module ran as a 2D op, the glue op by op
            assert c["actions"] == ["eager", "op"], (case, c["actions"])
            assert c["missing"] == [], (case, c["missing"])
            for err, scale in zip(c["out_err"], c["scale"]):
                assert err <= 1e-5 * scale, (world, rank, case, c["out_err"])
            assert c["grad_err"] < 1e-4, (world, rank, case, c["grad_err"])
            assert min(c["moved"]) > 1e-1  # the reference really changed s and z
        assert r["shared"] and r["not_mutated"]
        if world > 1:
            assert "smaller than the mesh side" in r["small_n_error"], r["small_n_error"]


def test_non_square_mesh_is_refused():
    res = run_distributed(nonsquare_worker, 2, timeout=120)
    assert all("square" in r and "Fix" in r for r in res), res
