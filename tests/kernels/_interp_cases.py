"""Triton kernels vs the torch reference, run as a script (not collected by pytest).

``tests/kernels/test_triton_kernels.py`` runs this file in a subprocess with
``TRITON_INTERPRET=1`` and ``AUTOCP_TRITON_INTERPRET=1`` (the interpreter must be chosen
before triton is imported, and the rest of the test session imports triton normally).
On a CUDA machine it can also be run directly (``python tests/kernels/_interp_cases.py``)
and then checks the compiled kernels on the GPU.

Prints one line per case with the max abs errors; exits 1 if any case fails.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
if INTERP:
    os.environ.setdefault("AUTOCP_TRITON_INTERPRET", "1")

import torch  # noqa: E402

from autocp import kernels  # noqa: E402
from autocp.kernels import reference as R  # noqa: E402
from autocp.kernels import triton_impl as T  # noqa: E402

DEV = "cpu" if INTERP else "cuda"
RESULTS: list[tuple[str, bool, str]] = []


def tol(dtype):
    # interpreter: every operand is cast to fp32 after the load, so bf16 inputs give
    # fp32-exact math; on a GPU the dots run in bf16/fp16 (tensor cores).
    if INTERP or dtype == torch.float32:
        return 2e-5, 1e-4
    return 3e-2, 3e-2


def err(a, b):
    """Max abs difference, treating equal infinities as equal; NaN anywhere -> inf."""
    a, b = a.float().cpu(), b.float().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    if (torch.isinf(a) ^ torch.isinf(b)).any():
        return float("inf")
    d = (a - b).abs()
    d[both_inf] = 0
    return d.max().item() if d.numel() else 0.0


def close(name, got, ref, dtype, scale_ref=None):
    atol, rtol = tol(dtype)
    e = err(got, ref)
    mag = ref.float().abs()
    mag = mag[torch.isfinite(mag)].max().item() if torch.isfinite(mag).any() else 0.0
    assert e <= atol + rtol * mag, f"{name}: max abs err {e:.3e} > {atol + rtol * mag:.3e}"
    return e


def case(name):
    def deco(fn):
        def run():
            t0 = time.time()
            try:
                msg = fn()
                RESULTS.append((name, True, f"{msg}  [{time.time() - t0:.1f}s]"))
            except Exception:  # noqa: BLE001
                RESULTS.append((name, False, traceback.format_exc()))
        run.__name__ = name
        CASES.append(run)
        return fn
    return deco


CASES = []


def attn_inputs(qshape, kshape, dv, bias_shape, kv_shape, dtype, seed=0, invalid_row=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*qshape, generator=g).to(dtype)
    k = torch.randn(*kshape, generator=g).to(dtype)
    v = torch.randn(*kshape[:-1], dv, generator=g).to(dtype)
    bias = torch.randn(*bias_shape, generator=g).to(dtype) if bias_shape else None
    kv = None
    if kv_shape:
        kv = torch.rand(*kv_shape, generator=g) > 0.3
        kv[..., 0] = True
        if invalid_row is not None:
            kv[invalid_row] = False  # these rows see no key at all
    to = lambda t: t.to(DEV) if t is not None else None  # noqa: E731
    return to(q), to(k), to(v), to(bias), to(kv)


def check_attention(q, k, v, bias, kv, scale, dtype, expect_empty_rows=False):
    assert "runs 'triton'" in kernels.explain("tile_attention_fwd", q, k, v, bias, kv, scale), \
        kernels.explain("tile_attention_fwd", q, k, v, bias, kv, scale)
    out, lse = kernels.tile_attention_fwd(q, k, v, bias, kv, scale)
    rout, rlse = R.tile_attention_fwd(q, k, v, bias, kv, scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    e_out = close("out", out, rout, dtype)
    e_lse = close("lse", lse, rlse, dtype)
    if expect_empty_rows:
        empty = torch.isinf(rlse)
        assert empty.any(), "test setup: expected a query row with no valid key"
        assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all(), "empty rows must give out 0, lse -inf"
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(rout.shape, generator=g).to(DEV)
    delta = (dout * rout).sum(-1)
    args = (q, k, v, bias, kv, scale, rlse, dout, delta)
    assert "runs 'triton'" in kernels.explain("tile_attention_bwd", *args)
    got = kernels.tile_attention_bwd(*args)
    ref = R.tile_attention_bwd(*args)
    errs = [close(n, a, b, dtype) for n, a, b in zip(("dq", "dk", "dv", "dbias"), got, ref)]
    if bias is not None:  # the caller reduces dbias over broadcast dims: must match autograd
        qa, ka, va, ba = (t.detach().float().requires_grad_() for t in (q, k, v, bias))
        o2, _ = R.tile_attention_fwd(qa, ka, va, ba, kv, scale)
        (o2 * dout).sum().backward()
        db = got[3].sum_to_size(bias.shape)
        errs.append(close("dbias(reduced) vs autograd", db, ba.grad, dtype))
        errs.append(close("dq vs autograd", got[0], qa.grad, dtype))
    return f"out {e_out:.1e} lse {e_lse:.1e} dq {errs[0]:.1e} dk {errs[1]:.1e} dv {errs[2]:.1e} dbias {errs[3]:.1e}"


# ---- attention: shapes not multiples of the 16-wide interpreter blocks, broadcasts, masks
for dtype in (torch.float32, torch.bfloat16):
    dn = str(dtype).split(".")[-1]

    @case(f"attn 3d no-bias no-mask Q19 K37 D24 Dv20 {dn}")
    def _(dtype=dtype):
        q, k, v, b, kv = attn_inputs((2, 19, 24), (2, 37, 24), 20, None, None, dtype)
        return check_attention(q, k, v, b, kv, 0.25, dtype)

    @case(f"attn triangle [B,I,H,Q,D] bias [B,1,H,Q,K] key_valid [B,I,1,K] + empty row {dn}")
    def _(dtype=dtype):
        q, k, v, b, kv = attn_inputs((1, 3, 2, 17, 16), (1, 3, 2, 33, 16), 16,
                                     (1, 1, 2, 17, 33), (1, 3, 1, 33), dtype, invalid_row=(0, 1))
        return check_attention(q, k, v, b, kv, 16 ** -0.5, dtype, expect_empty_rows=True)


@case("attn bias [Q,K] + key_valid [K], multiples of block Q32 K32 D32")
def _():
    q, k, v, b, kv = attn_inputs((2, 2, 32, 32), (2, 2, 32, 32), 32, (32, 32), (32,), torch.float32)
    return check_attention(q, k, v, b, kv, 32 ** -0.5, torch.float32)


@case("attn tiny Q1 K5 D8 (pad to 16) fp16 bias fp32")
def _():
    q, k, v, _, kv = attn_inputs((3, 1, 8), (3, 5, 8), 8, None, (3, 5), torch.float16)
    b = torch.randn(3, 1, 5).to(DEV)  # fp32 bias with fp16 q/k/v
    return check_attention(q, k, v, b, kv, 1.0, torch.float16)


@case("attn strided views (q/k/v from [B,Q,H,D].transpose, bias permuted) large bias values")
def _():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 21, 3, 3, 8, generator=g).to(DEV)  # [B, Q, {q,k,v}, H, D]
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, Q, D] non-contiguous
    b = (8 * torch.randn(2, 21, 21, 3, generator=g)).to(DEV).permute(0, 3, 1, 2)  # [B, H, Q, K]
    assert not q.is_contiguous() and not b.is_contiguous()
    return check_attention(q, k, v, b, None, 0.5, torch.float32)


@case("attn ring merge: two key blocks merged by lse == full attention, bwd per block")
def _():
    q, k, v, b, kv = attn_inputs((2, 2, 19, 16), (2, 2, 40, 16), 16, (2, 1, 19, 40), (2, 1, 40), torch.float32)
    sc = 0.25
    parts = [(slice(0, 23), slice(0, 23)), (slice(23, 40), slice(23, 40))]
    outs = [kernels.tile_attention_fwd(q, k[..., s, :], v[..., s, :], b[..., s], kv[..., s], sc) for s, _ in parts]
    lse = torch.logaddexp(outs[0][1], outs[1][1])
    out = sum(o * torch.exp(l - lse).unsqueeze(-1) for o, l in outs)
    qa, ka, va, ba = (t.detach().clone().requires_grad_() for t in (q, k, v, b))
    rout, _ = R.tile_attention_fwd(qa, ka, va, ba, kv, sc)
    e_out = close("merged out", out, rout, torch.float32)
    dout = torch.randn(rout.shape, generator=torch.Generator().manual_seed(5))
    (rout * dout).sum().backward()
    delta = (dout * out).sum(-1)
    grads = [kernels.tile_attention_bwd(q, k[..., s, :], v[..., s, :], b[..., s], kv[..., s], sc, lse, dout, delta)
             for s, _ in parts]
    dq = grads[0][0] + grads[1][0]
    dk = torch.cat([grads[0][1], grads[1][1]], -2)
    dv = torch.cat([grads[0][2], grads[1][2]], -2)
    db = torch.cat([grads[0][3], grads[1][3]], -1).sum(1, keepdim=True)
    e = [close(n, a, r, torch.float32) for n, a, r in
         (("dq", dq, qa.grad), ("dk", dk, ka.grad), ("dv", dv, va.grad), ("dbias", db, ba.grad))]
    return f"out {e_out:.1e} dq {e[0]:.1e} dk {e[1]:.1e} dv {e[2]:.1e} dbias {e[3]:.1e}"


@case("registry fallback: force_reference gives the reference; triton result equal within tol")
def _():
    q, k, v, b, kv = attn_inputs((2, 9, 8), (2, 11, 8), 8, (2, 9, 11), (2, 11), torch.float32)
    out, lse = kernels.tile_attention_fwd(q, k, v, b, kv, 0.5)
    with kernels.force_reference():
        assert "runs 'torch-reference'" in kernels.explain("tile_attention_fwd", q, k, v, b, kv, 0.5)
        rout, rlse = kernels.tile_attention_fwd(q, k, v, b, kv, 0.5)
    ref = R.tile_attention_fwd(q, k, v, b, kv, 0.5)
    assert torch.equal(rout, ref[0]) and torch.equal(rlse, ref[1])
    # a head dim the kernel rejects falls back to the reference transparently
    qb, kb, vb = (torch.randn(1, 3, 200, device=DEV) for _ in range(3))
    assert "runs 'torch-reference'" in kernels.explain("tile_attention_fwd", qb, kb, vb)
    fb = kernels.tile_attention_fwd(qb, kb, vb)
    assert torch.equal(fb[0], R.tile_attention_fwd(qb, kb, vb)[0])
    return f"out {close('out', out, rout, torch.float32):.1e} lse {close('lse', lse, rlse, torch.float32):.1e}"


# ---- tri_mm
def check_tri(a, b, out=None, dtype=torch.float32):
    assert "runs 'triton'" in kernels.explain("tri_mm", a, b, out), kernels.explain("tri_mm", a, b, out)
    if out is None:
        got = kernels.tri_mm(a, b)
        ref = R.tri_mm(a, b)
        assert got.dtype == torch.float32
    else:
        ref_out = out.clone()
        got = kernels.tri_mm(a, b, out)
        assert got is out, "tri_mm(out=...) must accumulate in place and return out"
        ref = R.tri_mm(a, b, ref_out)
    return close("tri_mm", got, ref, dtype)


for dtype in (torch.float32, torch.bfloat16):
    dn = str(dtype).split(".")[-1]

    @case(f"tri_mm [C,I,K]x[C,J,K] I21 J18 K33 {dn}")
    def _(dtype=dtype):
        g = torch.Generator().manual_seed(7)
        a = torch.randn(3, 21, 33, generator=g).to(dtype).to(DEV)
        b = torch.randn(3, 18, 33, generator=g).to(dtype).to(DEV)
        return f"err {check_tri(a, b, dtype=dtype):.1e}"

    @case(f"tri_mm accumulate into out, {dn}")
    def _(dtype=dtype):
        g = torch.Generator().manual_seed(8)
        a = torch.randn(2, 3, 17, 20, generator=g).to(dtype).to(DEV)
        b = torch.randn(2, 3, 17, 20, generator=g).to(dtype).to(DEV)
        out = torch.randn(2, 3, 17, 17, generator=g).to(DEV)
        return f"err {check_tri(a, b, out, dtype=dtype):.1e}"


@case("tri_mm channel-last views (z[B,I,K,C].permute -> [B,C,I,K]), batch broadcast of b")
def _():
    g = torch.Generator().manual_seed(9)
    za = torch.randn(1, 19, 23, 4, generator=g).to(DEV)
    zb = torch.randn(1, 18, 23, 1, generator=g).to(DEV)
    a = za.permute(0, 3, 1, 2)  # [B, C, I, K] strided
    b = zb.permute(0, 3, 1, 2)  # [B, 1, J, K] broadcast over C
    e1 = check_tri(a, b)
    out = torch.zeros(1, 4, 19, 18, device=DEV).permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    e2 = check_tri(a, b, out)  # strided out
    # backward as tri_mm calls: g [.., I, J]; da = g @ b = tri_mm(g, b^T), db = g^T @ a = tri_mm(g^T, a^T)
    aa, ba_ = a.detach().clone().requires_grad_(), b.detach().expand(1, 4, 18, 23).clone().requires_grad_()
    gr = torch.randn(1, 4, 19, 18, generator=g).to(DEV)
    (R.tri_mm(aa, ba_) * gr).sum().backward()
    da = kernels.tri_mm(gr, b.expand(1, 4, 18, 23).transpose(-1, -2))
    db = kernels.tri_mm(gr.transpose(-1, -2), a.transpose(-1, -2))
    e3 = close("da", da, aa.grad, torch.float32)
    e4 = close("db", db, ba_.grad, torch.float32)
    return f"err {e1:.1e} out {e2:.1e} da {e3:.1e} db {e4:.1e}"


# ---- the distributed ops (1x1 mesh, in process) use the Triton kernels and agree with
#      the same ops on the torch reference (force_reference), forward and backward
CALLS: dict = {}


def _count_triton_calls():
    from autocp.kernels import registry

    for op in ("tile_attention_fwd", "tile_attention_bwd", "tri_mm"):
        impl = next(i for i in registry.implementations(op) if i.name == "triton")
        if getattr(impl.fn, "_counted", False):
            continue

        def fn(*a, _f=impl.fn, _op=op, **k):
            CALLS[_op] = CALLS.get(_op, 0) + 1
            return _f(*a, **k)

        fn._counted = True
        registry.register(op, "triton", fn, impl.checker, impl.priority)


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():  # Boltz zero-inits some output projections
            prm.copy_(torch.randn(prm.shape, generator=g) * (prm.shape[-1] ** -0.5 if prm.dim() > 1 else 0.3))
    return module.to(DEV)


def _op_vs_reference(op, z, mask, n, names):
    res = {}
    for mode in ("triton", "reference"):
        CALLS.clear()
        zz = z.clone().requires_grad_()
        op.zero_grad()
        if mode == "reference":
            with kernels.force_reference():
                out = op(zz, mask, n_tokens=n)
                (out * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
        else:
            out = op(zz, mask, n_tokens=n)
            (out * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
            for nm in names:
                assert CALLS.get(nm, 0) > 0, f"the op never called the Triton {nm}: {CALLS}"
        res[mode] = (out.detach(), zz.grad.clone(), {k: p.grad.clone() for k, p in op.named_parameters()})
    (o, g, pg), (ro, rg, rpg) = res["triton"], res["reference"]
    assert ro.abs().max() > 1e-3 and rg.abs().max() > 1e-3, "degenerate op output"
    e = [close("op out", o, ro, torch.float32), close("op grad z", g, rg, torch.float32)]
    e.append(max(close(f"grad {k}", pg[k], rpg[k], torch.float32) for k in rpg))
    return f"out {e[0]:.1e} grad z {e[1]:.1e} max param grad {e[2]:.1e}"


def _pair_inputs(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, n, n, c, generator=g)
    tok = torch.ones(1, n)
    tok[:, 1] = 0.0  # a masked token: fully masked query rows
    mask = tok[:, :, None] * tok[:, None, :] * (torch.rand(1, n, n, generator=g) > 0.25).float()
    return z.to(DEV), mask.to(DEV)


@case("ops: TriangleAttention2D starting+ending (1x1 mesh) on Triton == on reference, fwd+bwd")
def _():
    from boltz.model.layers.triangular_attention.attention import TriangleAttention, TriangleAttentionEndingNode

    from autocp.mesh import SquareMesh
    from autocp.ops.triangle_attn import TriangleAttention2D

    _count_triton_calls()
    msgs = []
    for i, cls in enumerate((TriangleAttention, TriangleAttentionEndingNode)):
        op = TriangleAttention2D(_randomize(cls(8, 4, 2), i), SquareMesh.single())
        z, mask = _pair_inputs(6, 8, i)
        msgs.append(_op_vs_reference(op, z, mask, 6, ("tile_attention_fwd", "tile_attention_bwd")))
    return " | ".join(msgs)


@case("ops: TriangleMultiplication2D outgoing+incoming (1x1 mesh) on Triton == on reference, fwd+bwd")
def _():
    from boltz.model.layers.triangular_mult import TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing

    from autocp.mesh import SquareMesh
    from autocp.ops.triangle_mult import TriangleMultiplication2D

    _count_triton_calls()
    msgs = []
    for i, cls in enumerate((TriangleMultiplicationOutgoing, TriangleMultiplicationIncoming)):
        op = TriangleMultiplication2D(_randomize(cls(8), 10 + i), SquareMesh.single())
        z, mask = _pair_inputs(7, 8, 10 + i)
        msgs.append(_op_vs_reference(op, z, mask, 7, ("tri_mm",)))
    return " | ".join(msgs)


def main():
    if INTERP:
        assert T.INTERPRET, "TRITON_INTERPRET=1 was set but the kernels are not interpreted"
    elif not torch.cuda.is_available():
        print("no CUDA and TRITON_INTERPRET!=1: nothing to run the Triton kernels on")
        return 2
    print(f"device {DEV} interpreter={T.INTERPRET}")
    for run in CASES:
        run()
    bad = 0
    for name, ok, msg in RESULTS:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {msg}")
        bad += not ok
    print(f"{len(RESULTS) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
