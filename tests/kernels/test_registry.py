"""Kernel registry: selection, reasons, forced reference, fallback equality (in-process).

Nothing here runs the Triton interpreter: this process imports triton normally, so the
Triton checkers must reject CPU tensors and dispatch must give the torch reference.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from autocp import kernels
from autocp.kernels import reference as R
from autocp.kernels import registry

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: no Triton implementation to check")


def attn(dtype=torch.float32, d=16, shape=(2, 3)):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(*shape, 7, d, generator=g).to(dtype)
    k = torch.randn(*shape, 9, d, generator=g).to(dtype)
    v = torch.randn(*shape, 9, d, generator=g).to(dtype)
    bias = torch.randn(shape[0], 1, 7, 9, generator=g)
    kv = torch.rand(shape[0], 1, 9, generator=g) > 0.3
    return q, k, v, bias, kv


@pytest.fixture
def interp_optin(monkeypatch):
    """Pretend the interpreter is active + opted in, so checks past the device run.

    Only checkers/explain may be called under it (the compiled kernels cannot run on CPU).
    """
    from autocp.kernels import triton_impl as T

    monkeypatch.setattr(T, "INTERPRET", True)
    monkeypatch.setenv("AUTOCP_TRITON_INTERPRET", "1")
    monkeypatch.delenv("AUTOCP_KERNELS", raising=False)
    return T


def test_reference_is_registered_last_with_lowest_priority():
    for op in ("tile_attention_fwd", "tile_attention_bwd", "tri_mm"):
        impls = kernels.implementations(op)
        assert impls[-1].name == "torch-reference" and impls[-1].priority == min(i.priority for i in impls)
    with pytest.raises(KeyError, match="unknown kernel op"):
        kernels.implementations("no_such_op")


@needs_triton
def test_triton_registered_above_reference():
    assert kernels.TRITON_IMPORT_ERROR is None, kernels.TRITON_IMPORT_ERROR
    for op in ("tile_attention_fwd", "tile_attention_bwd", "tri_mm"):
        names = [i.name for i in kernels.implementations(op)]
        assert names == ["triton", "torch-reference"], names


@needs_triton
def test_cpu_tensors_rejected_without_interpreter(monkeypatch):
    from autocp.kernels import triton_impl as T

    monkeypatch.delenv("AUTOCP_KERNELS", raising=False)
    monkeypatch.delenv("AUTOCP_TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(T, "INTERPRET", False)  # as when triton was imported without TRITON_INTERPRET
    q, k, v, bias, kv = attn()
    why = T.check_tile_attention_fwd(q, k, v, bias, kv, 0.5)
    assert isinstance(why, str) and "CUDA" in why and "TRITON_INTERPRET" in why
    monkeypatch.setenv("AUTOCP_TRITON_INTERPRET", "1")  # the opt-in alone is not enough
    assert "TRITON_INTERPRET" in T.check_tile_attention_fwd(q, k, v, bias, kv, 0.5)
    text = kernels.explain("tile_attention_fwd", q, k, v, bias, kv, 0.5)
    assert "runs 'torch-reference'" in text and "triton: skipped: CPU tensors" in text
    a, b = torch.randn(2, 5, 4), torch.randn(2, 6, 4)
    assert "CPU tensors" in T.check_tri_mm(a, b)
    assert kernels.select("tri_mm", a, b).name == "torch-reference"


@needs_triton
def test_cpu_needs_explicit_optin_even_in_interpreter(monkeypatch):
    from autocp.kernels import triton_impl as T

    monkeypatch.setattr(T, "INTERPRET", True)
    monkeypatch.delenv("AUTOCP_TRITON_INTERPRET", raising=False)
    q, k, v, bias, kv = attn()
    why = T.check_tile_attention_fwd(q, k, v, bias, kv, 0.5)
    assert "AUTOCP_TRITON_INTERPRET=1" in why
    monkeypatch.setenv("AUTOCP_TRITON_INTERPRET", "1")
    assert T.check_tile_attention_fwd(q, k, v, bias, kv, 0.5) is True


@needs_triton
def test_checker_reasons(interp_optin):
    T = interp_optin
    q, k, v, bias, kv = attn()
    assert T.check_tile_attention_fwd(q, k, v, bias, kv, 0.5) is True
    # unsupported dtypes
    q64, k64, v64, _, _ = attn(torch.float64)
    assert "dtype torch.float64 unsupported" in T.check_tile_attention_fwd(q64, k64, v64, None, None)
    assert "dtypes differ" in T.check_tile_attention_fwd(q, k.bfloat16(), v, None, None)
    assert "key_valid dtype" in T.check_tile_attention_fwd(q, k, v, None, kv.float())
    assert "dtype torch.int64 unsupported" in T.check_tri_mm(torch.ones(2, 3, 4, dtype=torch.long),
                                                             torch.ones(2, 3, 4, dtype=torch.long))
    # head dim limit
    qb, kb, vb, _, _ = attn(d=256)
    assert "head dim 256 > 128" in T.check_tile_attention_fwd(qb, kb, vb)
    assert T.check_tile_attention_fwd(*attn(d=128)[:3]) is True
    # shapes
    assert "bias (7, 8) not broadcastable" in T.check_tile_attention_fwd(q, k, v, torch.randn(7, 8), None)
    assert "key_valid (8,) not broadcastable" in T.check_tile_attention_fwd(q, k, v, None, torch.ones(8, dtype=torch.bool))
    assert "do not broadcast" in T.check_tile_attention_fwd(q, k, v, torch.randn(5, 7, 9), None)
    assert "shape mismatch" in T.check_tile_attention_fwd(q, k[..., :8], v, None, None)
    # autograd: the raw kernel is not differentiable
    qg = q.clone().requires_grad_()
    assert "require grad" in T.check_tile_attention_fwd(qg, k, v, None, None)
    with torch.no_grad():
        assert T.check_tile_attention_fwd(qg, k, v, None, None) is True
    # too many non-mergeable batch dims (alternating broadcast pattern)
    qm = torch.randn(2, 1, 2, 1, 2, 1, 3, 4)
    km = torch.randn(1, 2, 1, 2, 1, 2, 5, 4)
    assert "non-mergeable batch dims" in T.check_tile_attention_fwd(qm, km, km, None, None)
    # bwd: lse/delta/dout shapes
    lse, delta, dout = torch.randn(2, 3, 7), torch.randn(2, 3, 7), torch.randn(2, 3, 7, 16)
    assert T.check_tile_attention_bwd(q, k, v, bias, kv, 0.5, lse, dout, delta) is True
    assert "lse" in T.check_tile_attention_bwd(q, k, v, bias, kv, 0.5, lse[..., :6], dout, delta)
    assert "dout" in T.check_tile_attention_bwd(q, k, v, bias, kv, 0.5, lse, dout[..., :8], delta)
    # tri_mm out
    a, b = torch.randn(2, 5, 4), torch.randn(2, 6, 4)
    assert T.check_tri_mm(a, b) is True and T.check_tri_mm(a, b, torch.zeros(2, 5, 6)) is True
    assert "full shape" in T.check_tri_mm(a, b, torch.zeros(1, 5, 6))
    assert "stride 0" in T.check_tri_mm(a, b, torch.zeros(1, 5, 6).expand(2, 5, 6))
    assert "contracted dims differ" in T.check_tri_mm(a, b[..., :3])
    # explain lists the chosen implementation and the reason the other was skipped
    text = kernels.explain("tile_attention_fwd", qb, kb, vb)
    assert "runs 'torch-reference'" in text and "head dim 256 > 128" in text
    text = kernels.explain("tile_attention_fwd", q, k, v, bias, kv, 0.5)
    assert "runs 'triton'" in text and "torch-reference: skipped: lower priority" in text


@needs_triton
def test_force_reference_overrides_triton(interp_optin, monkeypatch):
    q, k, v, bias, kv = attn()
    assert kernels.select("tile_attention_fwd", q, k, v, bias, kv, 0.5).name == "triton"
    with kernels.force_reference():
        assert kernels.select("tile_attention_fwd", q, k, v, bias, kv, 0.5).name == "torch-reference"
        assert "force_reference" in kernels.explain("tile_attention_fwd", q, k, v, bias, kv, 0.5)
    monkeypatch.setenv("AUTOCP_KERNELS", "reference")
    assert kernels.select("tri_mm", torch.randn(2, 3, 4), torch.randn(2, 3, 4)).name == "torch-reference"


def test_fallback_gives_reference_results(monkeypatch):
    """On CPU without the opt-in every op dispatches to the reference, bit for bit."""
    monkeypatch.delenv("AUTOCP_TRITON_INTERPRET", raising=False)
    if HAS_TRITON:
        assert kernels.select("tri_mm", torch.randn(1, 2, 3), torch.randn(1, 2, 3)).name == "torch-reference"
    q, k, v, bias, kv = attn()
    kv[0, 0] = False  # batch 0 sees no key at all
    out, lse = kernels.tile_attention_fwd(q, k, v, bias, kv, 0.5)
    rout, rlse = R.tile_attention_fwd(q, k, v, bias, kv, 0.5)
    assert torch.equal(out, rout) and torch.equal(lse, rlse)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    dout = torch.randn_like(out)
    delta = (dout * out).sum(-1)
    got = kernels.tile_attention_bwd(q, k, v, bias, kv, 0.5, lse, dout, delta)
    ref = R.tile_attention_bwd(q, k, v, bias, kv, 0.5, lse, dout, delta)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    a, b = torch.randn(3, 5, 4), torch.randn(3, 6, 4)
    assert torch.equal(kernels.tri_mm(a, b), a @ b.transpose(-1, -2))
    o = torch.ones(3, 5, 6)
    res = kernels.tri_mm(a, b, o)
    assert res is o and torch.allclose(o, 1 + a @ b.transpose(-1, -2))


def test_register_and_checker_semantics():
    """A custom implementation: priority order, string reasons, raising checkers reject."""
    op = "tri_mm"
    calls = []

    def fast(a, b, out=None):
        calls.append(1)
        return R.tri_mm(a, b, out)

    try:
        registry.register(op, "test-fast", fast, lambda a, b, out=None: True if a.shape[-1] == 4 else "need K == 4",
                          priority=10_000)
        a, b = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
        assert kernels.select(op, a, b).name == "test-fast"
        kernels.tri_mm(a, b)
        assert calls == [1]
        a3, b3 = torch.randn(2, 3, 3), torch.randn(2, 5, 3)
        assert "need K == 4" in kernels.explain(op, a3, b3)
        registry.register(op, "test-fast", fast, lambda *a: 1 / 0, priority=10_000)
        assert "checker raised ZeroDivisionError" in kernels.explain(op, a, b)
        assert kernels.select(op, a, b).name != "test-fast"
    finally:
        registry._REGISTRY[op] = [i for i in registry._REGISTRY[op] if i.name != "test-fast"]
    assert "test-fast" not in [i.name for i in kernels.implementations(op)]
