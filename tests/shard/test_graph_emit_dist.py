"""parallelize(emit="graph") -- the default -- on Boltz-2 (train) / Boltz-1 (eval) Pairformer and
an unregistered AF3-like trunk: the sharded captured graph runs, not the model's python.
N=7 on 1x1, 2x2, 3x3, masks, all parameters re-drawn; outputs and every parameter grad."""

import pytest

from autocp.testing import run_distributed
from tests.shard._emit_workers import graph_parity_worker

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", [1, 4, 9])
def test_graph_emit_parity(world):
    res = run_distributed(graph_parity_worker, world, timeout=400)
    for rank, r in enumerate(res):
        for case, c in r.items():
            assert c["same_keys"] and c["missing"] == [], case
            for err, scale in zip(c["out_err"], c["scale"]):
                assert err <= 1e-5 * scale, (world, rank, case, c["out_err"])
            assert c["grad_err"] < 1e-4, (world, rank, case, c["grad_err"])
            assert min(c["moved"]) > 1e-1, case


@pytest.mark.parametrize("world", [4, 9])
def test_wrapper_that_builds_the_pair_mask(world):
    """Was silently wrong (relative error 0.85) when the python ran on tiles."""
    from tests.shard._emit_workers import wrapper_parity_worker

    for r in run_distributed(wrapper_parity_worker, world, timeout=400):
        assert r["oerr"] < 1e-5 and r["gerr"] < 1e-4, r


def test_unbound_module_the_shard_pass_refuses_runs_gathered():
    from tests.shard._emit_workers import refused_glue_falls_back_worker

    for r in run_distributed(refused_glue_falls_back_worker, 4, timeout=300):
        assert r["action"] == "fallback" and r["warned"], r
        assert r["err"] < 1e-5, r


def test_engine_in_place_write_into_a_copied_view_is_an_error():
    from tests.shard._emit_workers import view_write_worker

    for r in run_distributed(view_write_worker, 4, timeout=300):
        msg = r["lost_write"]
        assert "written in place" in msg and "part = z[:, 1:4]" in msg and "part.mul_(0.5)" in msg, msg
        assert "silently wrong" in msg and "Fix" in msg, msg
        assert r["write_back"][0] < 1e-5 and r["write_back"][1] < 1e-5, r["write_back"]
