"""Kernel registry basics with the torch reference: select, dispatch, explain, force_reference."""

from __future__ import annotations

import pytest
import torch

from autocp import kernels
from autocp.kernels import registry


@pytest.fixture
def toy_op():
    """A private op with a reference and a picky 'fast' implementation."""
    op = "_unit_test_toy_op"
    calls = []
    kernels.register(op, "reference", lambda x: ("ref", x * 2), priority=-1000)
    kernels.register(op, "fast", lambda x: ("fast", x * 2),
                     checker=lambda x: True if x.dtype == torch.float32 else f"dtype {x.dtype} unsupported",
                     priority=10)
    kernels.register(op, "broken", lambda x: ("broken", None), checker=lambda x: 1 / 0, priority=20)
    yield op
    registry._REGISTRY.pop(op, None)


def test_select_by_priority_and_checker(toy_op):
    x32, x64 = torch.ones(2), torch.ones(2, dtype=torch.float64)
    assert [i.name for i in kernels.implementations(toy_op)] == ["broken", "fast", "reference"]
    assert kernels.select(toy_op, x32).name == "fast"  # 'broken' rejects by raising
    assert kernels.select(toy_op, x64).name == "reference"
    assert kernels.dispatch(toy_op, x32)[0] == "fast"
    assert kernels.dispatch(toy_op, x64)[0] == "ref"


def test_explain_says_why(toy_op):
    text = kernels.explain(toy_op, torch.ones(2, dtype=torch.float64))
    assert text.splitlines()[0] == f"{toy_op}: runs 'reference'"
    assert "fast: skipped: dtype torch.float64 unsupported" in text
    assert "broken: skipped: checker raised ZeroDivisionError" in text
    assert "reference: selected" in text


def test_force_reference(toy_op, monkeypatch):
    x = torch.ones(2)
    with kernels.force_reference():
        assert kernels.select(toy_op, x).name == "reference"
        assert "AUTOCP_KERNELS=reference" in kernels.explain(toy_op, x)
    assert kernels.select(toy_op, x).name == "fast"
    with kernels.force_reference(enabled=False):
        assert kernels.select(toy_op, x).name == "fast"
    monkeypatch.setenv("AUTOCP_KERNELS", "reference")
    assert kernels.select(toy_op, x).name == "reference"


def test_register_replaces_by_name(toy_op):
    kernels.register(toy_op, "fast", lambda x: ("fast2", x), priority=10)
    assert [i.name for i in kernels.implementations(toy_op)].count("fast") == 1
    assert kernels.dispatch(toy_op, torch.ones(2))[0] == "fast2"


def test_unknown_op():
    with pytest.raises(KeyError, match="unknown kernel op"):
        kernels.implementations("no_such_op")


def test_reference_ops_on_cpu():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    with kernels.force_reference():
        assert kernels.select("tri_mm", a, b, None).name == "torch-reference"
        out = kernels.tri_mm(a, b)
        torch.testing.assert_close(out, a @ b.transpose(-1, -2))
        q, k, v = torch.randn(2, 4, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 3, generator=g)
        bias = torch.randn(2, 4, 5, generator=g)
        valid = torch.tensor([True, True, False, True, True])
        o, lse = kernels.tile_attention_fwd(q, k, v, bias, valid, 0.5)
    s = (q @ k.transpose(-1, -2)) * 0.5 + bias
    s[..., ~valid] = float("-inf")
    torch.testing.assert_close(o, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    # the reference is always registered as the lowest-priority fallback
    for op in ("tile_attention_fwd", "tile_attention_bwd", "tri_mm"):
        assert kernels.implementations(op)[-1].name == "torch-reference"


def test_merge_lse_of_key_blocks_equals_full_attention():
    """Two key blocks attended separately (reference kernel) and merged by LSE = attention
    over all keys; rows with no valid key anywhere stay 0 / -inf with finite gradients."""
    from autocp.ops.common import merge_lse

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    bias[1, 2, :] = float("-inf")  # query (1, 2) has no key at all
    with kernels.force_reference():
        oa, la = kernels.tile_attention_fwd(q, k[:, :3], v[:, :3], bias[..., :3], None, 0.3)
        ob, lb = kernels.tile_attention_fwd(q, k[:, 3:], v[:, 3:], bias[..., 3:], None, 0.3)
    # gradients through merge_lse itself (the kernels have their own explicit backward)
    oa, la, ob, lb = (t.detach().requires_grad_(True) for t in (oa, la, ob, lb))
    out, lse = merge_lse(oa, la, ob, lb)
    s = q @ k.transpose(-1, -2) * 0.3 + bias
    want = torch.nan_to_num(torch.softmax(s, -1)) @ v
    torch.testing.assert_close(out, want.float() if out.dtype == torch.float32 else want)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).to(lse.dtype))
    assert out[1, 2].abs().max() == 0 and lse[1, 2] == float("-inf")
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for t in (oa, la, ob, lb):
        assert torch.isfinite(t.grad).all(), "NaN gradient from a row with no keys"
    assert (la.grad[1, 2], lb.grad[1, 2]) == (0, 0)
