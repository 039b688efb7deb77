"""OpInfo-driven differential sweep (tests/shard/opinfo_sweep.py): every elementwise
unary/binary ufunc and reduction of PyTorch's op_db with a float32 kernel, on a Pair2D
tensor, on 1x1, 2x2 and 3x3 (N=7), forward and input gradients vs the single device; the
ops with no token-axis rule are exact by gathering and refused by strict=True."""

import pytest
import torch

pytest.importorskip("expecttest")  # torch.testing._internal needs it (in the test extra)

from autocp.testing import run_distributed  # noqa: E402
from tests.shard.opinfo_sweep import N, OpInfoProgram, build_cases, opinfo_worker  # noqa: E402

pytestmark = pytest.mark.distributed

# reductions along a token axis that have no rule: run gathered (exact), refused by strict
GATHERED_OPS = {"aten.hash_tensor.default": "hash_tensor", "aten.prod.dim_int": "prod"}


@pytest.fixture(scope="module")
def cases():
    cs, skipped = build_cases()
    print(f"\n{len(cs)} OpInfo cases; left out: {skipped}")
    return cs


def test_sweep_covers_the_op_families(cases):
    kinds = {c[1] for c in cases}
    assert kinds == {"unary", "binary", "reduction"}
    assert len(cases) >= 150, len(cases)
    labels = {c[0] for c in cases}
    assert {"tanh", "add", "div.floor_rounding", "sum", "amax", "var", "argmax", "any"} <= labels


@pytest.mark.parametrize("world", [1, 4, 9])
def test_every_opinfo_case_matches_single_device(cases, world):
    res = run_distributed(opinfo_worker, world, cases, timeout=900)
    for rank, (r, pair_ops) in enumerate(res):
        assert set(r) == {c[0] for c in cases}
        bad = {k: v for k, v in r.items() if not (v[0] < 1e-5 and (v[1] is None or v[1] < 1e-4))}
        assert not bad, (world, rank, bad)
        if world > 1:
            assert set(pair_ops) == set(GATHERED_OPS), (world, rank, pair_ops)


def test_ops_without_a_token_rule_are_refused_under_strict(cases):
    from autocp.passes.program import compile_tile_program
    from autocp.passes.shard import ShardingError

    by_label = {c[0]: c for c in cases}
    z0 = torch.randn(1, N, N, 4)
    for op, label in GATHERED_OPS.items():
        m = OpInfoProgram([by_label[label]])
        with pytest.raises(ShardingError) as e:
            compile_tile_program(m, (z0,), [(None, "r", "c", None)], n=N, p=2, strict=True)
        assert op.split(".")[1] in str(e.value) and "Fix" in str(e.value), str(e.value)
