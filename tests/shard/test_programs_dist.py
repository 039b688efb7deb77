"""Tile programs of AF3-like glue (tests/shard/programs.py) vs single device on 1x1, 2x2, 3x3.

N=7 (not divisible by 2 or 3), a masked token, all parameters re-drawn. These are the
spellings that were silently wrong when the model's python ran on tiles: a pair mask built
from a token mask, outer sums of token features, relative positions from arange(N),
in-place residuals with a transposed read, einsum / permute+matmul triangle updates,
SDPA over a token axis, unregistered single-representation attention with pair bias.
"""

import pytest

from autocp.testing import run_distributed
from tests.shard._workers import all_cases_worker

pytestmark = pytest.mark.distributed

# cases whose tile program must not gather any tensor with two sharded axes
NO_PAIR_GATHER = {"pair_mask_glue", "outer_sum_relpos", "token_attention", "trimul_einsum", "trimul_ellipsis_std",
                  "trimul_matmul_sdpa",
                  "triattn_decomposed", "transition_flat_chunked"}
# cases whose triangle contractions / attentions must run on the rings (notes "ring")
RINGS = {"trimul_einsum": 1, "trimul_matmul_sdpa": 2, "trimul_ellipsis_std": 2, "triattn_decomposed": 2}


@pytest.mark.parametrize("world", [1, 4, 9])
def test_tile_programs_match_single_device(world):
    res = run_distributed(all_cases_worker, world, 7, timeout=400)
    assert sum(c["inplace"] for c in res[0].values()) > 0  # the in-place pass rewrote something
    for rank, r in enumerate(res):
        for name, c in r.items():
            assert c["moved"] > 1e-2, name
            assert c["oerr"] < 1e-5, (world, rank, name, c["oerr"])
            assert c["gerr"] < 1e-4, (world, rank, name, c["gerr"])
            assert c["nograd_err"] < 1e-5, (world, rank, name, c["nograd_err"])  # in-place storage pass
            assert c["input_changed"] == 0.0, (world, rank, name)
            if name in NO_PAIR_GATHER:
                assert not any(pair for what, _, pair in c["notes"] if what == "gather"), (name, c["notes"])
            if name in RINGS:
                assert sum(what == "ring" for what, _, _ in c["notes"]) == RINGS[name], (name, c["notes"])


def test_strict_and_inplace_refusals():
    from tests.shard._workers import strict_worker

    for r in run_distributed(strict_worker, 4, timeout=200):
        assert "gathered" in r["strict"] and "programs.py" in r["strict"] and "Fix" in r["strict"], r["strict"]
        assert "in place" in r["inplace"] and "Fix" in r["inplace"], r["inplace"]


@pytest.mark.parametrize("world", [1, 4])
def test_check_names_first_diverging_node(world):
    from tests.shard._workers import check_worker

    for r in run_distributed(check_worker, world, timeout=300):
        assert r["ok"].startswith("autocp.check:") and "match" in r["ok"], r["ok"]
        assert r["blocks_ok"]
        ok, node, where, source, text = r["bad"]
        assert not ok and node.startswith("tanh") and where.startswith("block blocks.0"), r["bad"]
        assert "programs.py" in source and "torch.tanh" in source and "Fix" in text, r["bad"]


def test_rule_table_lists_ops():
    from autocp.passes.shard import covered_ops

    ops = covered_ops()
    assert len(ops) > 100 and "aten.einsum.default" in ops and "aten.scaled_dot_product_attention.default" in ops
