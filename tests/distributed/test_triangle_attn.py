"""TriangleAttention2D (autocp.ops.triangle_attn) vs Boltz's own modules.

Meshes 1x1 (in process), 2x2 and 3x3 (gloo ranks; one spawn per mesh, all cases run
inside it, the tests below check the collected numbers). Every case re-draws ALL
parameters (Boltz zero-inits linear_o), uses a random binary pair mask that masks one
whole token (=> a fully masked query row in both the starting and the ending node) plus
random pair entries, N in {p*k, p*k+1} (the latter pads the last block). The padded-N
train cases run the ring steps over query rows in chunks of 3 (``row_chunk=3``, uneven
last chunk), the eval cases (no_grad path) one row at a time.

Tolerances: fp32 max abs error <= 1e-4 * max|reference| (output, grad z, every param
grad after sync_grads). bf16 (documented, loose): the bf16 autocp output / grad z is
compared with the fp32 Boltz result and must be within max(3 x Boltz-bf16's own error,
3e-2 * scale) of it.
"""

from __future__ import annotations

import copy

import contextlib

import pytest
import torch

import autocp
import autocp.testing
from autocp import comm
from autocp.layout import LayoutError, Pair2D, block_size
from autocp.mesh import SquareMesh
from autocp.ops.common import sync_grads
from autocp.ops.triangle_attn import TriangleAttention2D, comm_bytes
from autocp.testing import run_distributed

from boltz.model.layers.triangular_attention.attention import (
    TriangleAttention,
    TriangleAttentionEndingNode,
)

B, C, H, D = 1, 8, 2, 4

# Importing boltz's primitives pulls in torch._dynamo (~5 s of CPU per process); have the
# harness's forkserver preload it once instead of every rank importing it. No effect
# (just slower) when the forkserver already runs; preload ImportErrors are ignored.
_BOLTZ_ATTN = "boltz.model.layers.triangular_attention.attention"
_ctx = autocp.testing._context()
if _ctx.get_start_method() == "forkserver":
    _ctx.set_forkserver_preload(["torch", "torch.distributed", "autocp", _BOLTZ_ATTN])
FP32_TOL = 1e-4
BF16_REL = 3e-2


# ----------------------------------------------------------------------------- helpers
def build_module(starting: bool, seed: int = 0) -> torch.nn.Module:
    cls = TriangleAttention if starting else TriangleAttentionEndingNode
    m = cls(C, D, H)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name == "layer_norm.weight":
                prm.copy_(1.0 + 0.3 * torch.randn(prm.shape, generator=g))
            elif prm.dim() == 1:
                prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
            else:
                prm.copy_(torch.randn(prm.shape, generator=g) * prm.shape[-1] ** -0.5)
    return m


def make_inputs(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, n, n, C, generator=g)
    tok = torch.ones(B, n)
    tok[:, 1] = 0.0  # a masked token: its row (and column) of the pair mask is all zero
    mask = tok[:, :, None] * tok[:, None, :] * (torch.rand(B, n, n, generator=g) > 0.25).float()
    w = torch.randn(B, n, n, C, generator=g)
    return z, mask, w


def boltz_ref(module, z, mask, w, dtype=torch.float32, grad=True):
    m = copy.deepcopy(module)
    zz = z.to(dtype).clone().requires_grad_(grad)
    out = m(zz, mask.to(dtype), chunk_size=None)
    res = {"out": out.detach().float()}
    if grad:
        (out.float() * w).sum().backward()
        res["gz"] = zz.grad.float()
        res["params"] = {k: p.grad.clone() for k, p in m.named_parameters()}
    return res


def _err(a, b):
    return (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()


def run_case(mesh: SquareMesh, case: dict) -> dict:
    """One case on this rank; returns errors (and comm counts) as floats/dicts."""
    starting, n, kind = case["starting"], case["n"], case["kind"]
    module = build_module(starting)
    z, mask, w = make_inputs(n)
    lay = Pair2D()
    op = TriangleAttention2D(module, mesh, row_chunk=case.get("row_chunk"), recompute=case.get("recompute", True))
    res = {"case": case}
    if kind == "eval":
        module.eval()
        with torch.no_grad():
            ref = module(z, mask, chunk_size=None)
            chunked = module(z, mask, chunk_size=2)  # Boltz's eval path chunks; same numbers
            out = op(lay.shard(z, mesh), lay.shard(mask, mesh), n_tokens=n)
            import autocp

            with autocp.chunking(1 / 3, min_bytes=0):  # the row-chunked path in 3 chunks (small tiles: 1)
                out3 = op(lay.shard(z, mesh), lay.shard(mask, mesh), n_tokens=n)
        res["out"] = max(_err(out, lay.shard(ref, mesh)), _err(out3, lay.shard(ref, mesh)))
        res["chunked_vs_plain"] = _err(chunked, ref)
        return res
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    ref = boltz_ref(module, z, mask, w)
    zt = lay.shard(z, mesh).to(dtype).clone().requires_grad_(True)
    import autocp

    # "chunks": query rows in 3 chunks (forward and backward); tiles this small run as one
    # chunk by default
    knob = autocp.chunking(1 / 3, min_bytes=0) if case.get("chunks") else contextlib.nullcontext()
    with knob:
        with comm.count_comm() as st_f:
            out = op(zt, lay.shard(mask, mesh).to(dtype), n_tokens=n)
        loss = (out.float() * lay.shard(w, mesh)).sum()
        with comm.count_comm() as st_b:
            loss.backward()
    res["out"] = _err(out, lay.shard(ref["out"], mesh))
    res["gz"] = _err(zt.grad, lay.shard(ref["gz"], mesh))
    res["out_dtype"] = str(out.dtype)
    res["comm_fwd"] = dict(st_f.bytes)
    res["comm_bwd"] = dict(st_b.bytes)
    f = comm_bytes(mesh.p, mesh.r, mesh.c, batch=B, b=block_size(n, mesh.p), heads=H, head_dim=D,
                   elem=torch.tensor([], dtype=dtype).element_size(), starting=starting)
    res["formula_fwd"], res["formula_bwd"] = f["fwd"], f["bwd"]
    if kind == "bf16":
        rb = boltz_ref(module, z, mask, w, dtype=torch.bfloat16)
        res["boltz_bf16_out"] = _err(lay.shard(rb["out"], mesh), lay.shard(ref["out"], mesh))
        res["boltz_bf16_gz"] = _err(lay.shard(rb["gz"], mesh), lay.shard(ref["gz"], mesh))
        return res
    sync_grads(op, mesh)
    res["params"] = {k: _err(p.grad, ref["params"][k]) for k, p in op.named_parameters()}
    res["param_names"] = sorted(k for k, _ in op.named_parameters())
    return res


def cases_for(p: int, k: int):
    cs = []
    for starting in (True, False):
        for n in (p * k, p * k + 1):
            # padded N: query rows in uneven chunks of 3 inside each ring step (b = k + 1 = 4
            # or 6); the default chunk covers these tiny tiles whole
            cs.append({"starting": starting, "n": n, "kind": "train", "row_chunk": 3 if n == p * k + 1 else None})
        cs.append({"starting": starting, "n": p * k + 1, "kind": "train", "chunks": True})
        # autograd keeping the projections (no recomputation in backward)
        cs.append({"starting": starting, "n": p * k + 1, "kind": "train", "recompute": False})
        cs.append({"starting": starting, "n": p * k + 1, "kind": "eval", "row_chunk": 1})
        cs.append({"starting": starting, "n": p * k + 1, "kind": "bf16"})
    return cs


def _bad_inputs(mesh: SquareMesh, n: int) -> dict:
    """Error messages of bad calls (checked before any communication)."""
    op = TriangleAttention2D(build_module(True), mesh)
    b = block_size(n, mesh.p)
    msgs = {}
    for key, call in {
        "shape": lambda: op(torch.randn(B, b + 1, b + 1, C), None, n_tokens=n),
        "mask": lambda: op(torch.randn(B, b, b, C), torch.ones(B, b, b + 1), n_tokens=n),
        "channels": lambda: op(torch.randn(B, b, b, C + 2), None, n_tokens=n),
    }.items():
        try:
            call()
            msgs[key] = None
        except LayoutError as e:
            msgs[key] = str(e)
    return msgs


def saved_bytes(mesh: SquareMesh, n: int, starting: bool, recompute: bool = True) -> int:
    """Bytes of every tensor autograd saves during one forward of the op on this rank."""
    op = TriangleAttention2D(build_module(starting), mesh, recompute=recompute)
    z, mask, _ = make_inputs(n)
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    zt = Pair2D().shard(z, mesh).clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(zt, Pair2D().shard(mask, mesh), n_tokens=n)
    return total[0]


def _worker(rank, world, k):
    mesh = autocp.init_mesh()
    torch.manual_seed(0)
    out = [run_case(mesh, c) for c in cases_for(mesh.p, k)]
    n = mesh.p * k + 1
    b = block_size(n, mesh.p)
    saved = {st: (saved_bytes(mesh, n, st), saved_bytes(SquareMesh.single(), b, st)) for st in (True, False)}
    saved["no_recompute"] = saved_bytes(mesh, n, True, recompute=False)
    return {"coord": mesh.coord, "cases": out, "bad": _bad_inputs(mesh, n), "saved": saved}


# ----------------------------------------------------------------------------- fixtures
_CACHE: dict = {}


def mesh_results(p: int):
    """Per-rank results of every case on a p x p mesh (computed once per session)."""
    if p not in _CACHE:
        k = 5 if p == 1 else (3 if p == 2 else 3)
        if p == 1:
            mesh = SquareMesh.single()
            _CACHE[p] = [{"coord": (0, 0), "cases": [run_case(mesh, c) for c in cases_for(1, k)],
                          "bad": _bad_inputs(mesh, k + 1)}]  # no "saved": compared on p > 1 only
        else:
            _CACHE[p] = run_distributed(_worker, p * p, k, timeout=240)
    return _CACHE[p]


def _label(rank_res, case):
    return f"rank {rank_res['coord']} {'starting' if case['starting'] else 'ending'} N={case['n']} {case['kind']}"


# ----------------------------------------------------------------------------- tests
def test_reference_depends_on_the_op():
    """Guard against the zero-init trap: the Boltz output is nonzero and really depends on
    the attention (triangle bias, mask, node type)."""
    n = 7
    z, mask, _ = make_inputs(n)
    for starting in (True, False):
        m = build_module(starting)
        assert m.mha.linear_o.weight.abs().max() > 0.1  # re-drawn (Boltz init is zero)
        with torch.no_grad():
            ref = m(z, mask, chunk_size=None)
            assert ref.abs().max() > 0.1
            no_mask = m(z, None, chunk_size=None)
            assert (ref - no_mask).abs().max() > 1e-2
            m2 = copy.deepcopy(m)
            m2.linear.weight.zero_()
            assert (ref - m2(z, mask, chunk_size=None)).abs().max() > 1e-2
    with torch.no_grad():
        a = build_module(True)(z, mask, chunk_size=None)
        b = build_module(False)(z, mask, chunk_size=None)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("p", [1, 2, 3])
def test_fp32_parity_forward_and_grads(p):
    res = mesh_results(p)
    seen = 0
    for rr in res:
        for r in rr["cases"]:
            case = r["case"]
            if case["kind"] not in ("train", "eval"):
                continue
            seen += 1
            e, s = r["out"]
            assert s > 0.1, _label(rr, case)
            assert e <= FP32_TOL * s, f"{_label(rr, case)}: out err {e} scale {s}"
            if case["kind"] == "eval":
                ce, cs = r["chunked_vs_plain"]
                assert ce <= 1e-5 * cs
                continue
            assert r["out_dtype"] == "torch.float32"
            e, s = r["gz"]
            assert e <= FP32_TOL * s, f"{_label(rr, case)}: grad z err {e} scale {s}"
            names = r["param_names"]
            assert names == sorted(
                ["layer_norm.weight", "layer_norm.bias", "linear.weight", "mha.linear_q.weight",
                 "mha.linear_k.weight", "mha.linear_v.weight", "mha.linear_o.weight", "mha.linear_g.weight"]
            )
            for name, (e, s) in r["params"].items():
                assert s > 0, name
                assert e <= FP32_TOL * s, f"{_label(rr, case)}: grad {name} err {e} scale {s}"
    assert seen == p * p * 10  # incl. the forced-chunk train cases


@pytest.mark.parametrize("p", [1, 2, 3])
def test_bf16_loose(p):
    for rr in mesh_results(p):
        for r in rr["cases"]:
            if r["case"]["kind"] != "bf16":
                continue
            assert r["out_dtype"] == "torch.bfloat16"
            for key in ("out", "gz"):
                e, s = r[key]
                eb, _ = r[f"boltz_bf16_{key}"]
                assert e <= max(3 * eb, BF16_REL * s), f"{_label(rr, r['case'])} {key}: err {e}, boltz bf16 err {eb}, scale {s}"


@pytest.mark.parametrize("p", [1, 2, 3])
def test_comm_volume_matches_formula(p):
    for rr in mesh_results(p):
        for r in rr["cases"]:
            if r["case"]["kind"] not in ("train", "bf16"):  # bf16: K/V/bias travel as 2-byte elements
                continue
            assert r["comm_fwd"] == r["formula_fwd"], _label(rr, r["case"])
            bwd, want = dict(r["comm_bwd"]), dict(r["formula_bwd"])
            if r["case"].get("chunks") and p > 1:
                # backward by 3 row chunks: K/V, mask and dK/dV travel chunk by chunk (same
                # bytes); the bias tile and its gradient go round once per chunk
                k = min(3, block_size(r["case"]["n"], p))
                for name in ("triattn.bias", "triattn.dbias"):
                    if name in want:
                        assert bwd.pop(name) == k * want.pop(name), (name, _label(rr, r["case"]))
            assert bwd == want, _label(rr, r["case"])
            if p == 1:
                assert r["comm_fwd"] == {} and r["comm_bwd"] == {}


def test_comm_formula_values():
    """The formula itself on a 3x3 mesh: skew-exempt ranks and the ending-node swap."""
    kw = dict(batch=1, b=2, heads=2, head_dim=4, elem=4)
    s_kv, s_m, s_b = 2 * 4 * 2 * 4 * 4, 4, 4 * 2 * 4
    f00 = comm_bytes(3, 0, 0, **kw)
    assert f00["fwd"] == {"triattn.kv": 2 * s_kv, "triattn.mask": 2 * s_m, "triattn.bias": 2 * s_b}
    f21 = comm_bytes(3, 2, 1, **kw)
    assert f21["fwd"] == {"triattn.kv": 3 * s_kv, "triattn.mask": 3 * s_m, "triattn.bias": 3 * s_b}
    f11 = comm_bytes(3, 1, 1, **kw)
    assert f11["bwd"]["triattn.dkv"] == 2 * s_kv and f11["bwd"]["triattn.dbias"] == 2 * s_b
    assert comm_bytes(3, 0, 2, starting=False, **kw) == comm_bytes(3, 2, 0, **kw)
    assert comm_bytes(1, 0, 0, **kw) == {"fwd": {}, "bwd": {}}


@pytest.mark.parametrize("p", [2, 3])
def test_saved_tensors_are_tile_local(p):
    """What autograd keeps per rank on a p x p mesh equals what the op keeps on one device
    for an N = b problem (one tile): no received K/V/bias block is saved, so per-rank
    memory is O(N^2 / P) and does not grow with the number of ring steps."""
    for rr in mesh_results(p):
        saved = dict(rr["saved"])
        # recomputing the projections keeps less than autograd keeping them
        assert saved[True][0] < saved.pop("no_recompute"), rr["saved"]
        for starting, (dist_bytes, single_bytes) in saved.items():
            assert dist_bytes > 0
            assert dist_bytes == single_bytes, (rr["coord"], starting, dist_bytes, single_bytes)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_bad_input_clear_errors(p):
    for rr in mesh_results(p):
        bad = rr["bad"]
        assert bad["shape"] is not None and "must be [B, " in bad["shape"] and "n_tokens=N" in bad["shape"]
        assert bad["mask"] is not None and "mask tile has shape" in bad["mask"]
        assert bad["channels"] is not None and "channels" in bad["channels"] and "expect 8" in bad["channels"]


def test_bad_module_and_missing_n_tokens():
    with pytest.raises(TypeError, match="TriangleAttention"):
        TriangleAttention2D(torch.nn.Linear(3, 3), SquareMesh.single())
    op = TriangleAttention2D(build_module(True), SquareMesh.single())
    with pytest.raises(LayoutError, match="n_tokens"):
        op(torch.randn(B, 6, 6, C), None, n_tokens=7)
