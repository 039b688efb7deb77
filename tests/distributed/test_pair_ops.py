"""Parity of the 2D pair ops with the Boltz modules on 1x1, 2x2 and 3x3 meshes.

One ``run_distributed`` call per mesh size runs every case (keeps the 2-core CI fast);
each case computes the single-device Boltz reference in every rank (tiny shapes),
runs the 2D op on this rank's tiles and returns relative errors (see ``_parity``):
forward tiles, input gradients (Pair2D/MsaTiles tiles; RowToken summed over the row)
and every parameter gradient (summed over all ranks). All parameters are re-drawn
first and each case asserts its reference actually depends on the op.

N (and the MSA depth S) are not divisible by p; token, pair and MSA masks have zeros.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from autocp.layout import MsaTiles, Pair2D, RowToken
from autocp.testing import run_distributed

from ._parity import param_grad_err, redraw, rel_err, row_grad_err, tile_err

pytestmark = pytest.mark.distributed

B = 2
FP32_TOL = 1e-4


def _n_for(p: int) -> int:
    return {1: 6, 2: 7, 3: 8}[p]


def _s_for(p: int) -> int:
    return {1: 3, 2: 5, 3: 7}[p]


# ----------------------------------------------------------------------------- generic
def _sizes(layout, n, S):
    return [S, n] if isinstance(layout, MsaTiles) else n


def _compare(mesh, mod, ref_call, op_call, inputs, out_layout, dtype, seed, dep_check):
    """Run the Boltz module (full tensors) and the 2D op (tiles), backward of
    ``<out, W>``; return relative errors of the op vs the fp32 reference and, for bf16,
    of the Boltz bf16 run vs the fp32 reference (the yardstick of the loose tolerance).

    ``inputs``: name -> (full fp32 tensor, layout, differentiable); ``n``/``S`` in ``sizes``.
    """
    n, S = inputs.pop("_sizes")
    p = mesh.p
    g = torch.Generator().manual_seed(seed)

    def run_ref(module, dt):
        full = {k: (v.to(dt) if v.is_floating_point() else v).clone().requires_grad_(d)
                for k, (v, lay, d) in inputs.items()}
        out = ref_call(module, full)
        return out, full

    ref32 = copy.deepcopy(mod).float()
    out32, full32 = run_ref(ref32, torch.float32)
    W = torch.randn(out32.shape, generator=g)
    (out32 * W).sum().backward()
    dep_check(out32, full32)
    res = {}

    op_mod = mod.to(dtype)
    if dtype != torch.float32:
        refbf = copy.deepcopy(op_mod)
        outbf, fullbf = run_ref(refbf, dtype)
        (outbf.float() * W).sum().backward()

    op = op_call[0](op_mod, mesh)
    tiles = {}
    for k, (v, lay, d) in inputs.items():
        x = v.to(dtype) if v.is_floating_point() else v
        tiles[k] = lay.shard(x, mesh).detach().requires_grad_(d) if lay is not None else x
    out = op_call[1](op, tiles, n, S)
    scale = 1.0 / p if isinstance(out_layout, RowToken) else 1.0
    ((out.float() * out_layout.shard(W, mesh)).sum() * scale).backward()

    def both(name, ours, boltz_err):
        res[name] = (ours, boltz_err)

    both("out", tile_err(out_layout, out, out32, mesh, _sizes(out_layout, n, S)),
         rel_err(outbf, out32) if dtype != torch.float32 else 0.0)
    # the inference path (no autograd: chunked formulations), forced into 3 chunks
    import autocp

    with torch.no_grad(), autocp.chunking(1 / 3, min_bytes=0):
        out_ng = op_call[1](op, {k: (t.detach() if isinstance(t, torch.Tensor) else t) for k, t in tiles.items()}, n, S)
    both("out_nograd", tile_err(out_layout, out_ng, out32, mesh, _sizes(out_layout, n, S)),
         rel_err(outbf, out32) if dtype != torch.float32 else 0.0)
    for k, (v, lay, d) in inputs.items():
        if not d:
            continue
        if isinstance(lay, RowToken):
            e = row_grad_err(tiles[k].grad, full32[k].grad, mesh, n)
        else:
            e = tile_err(lay, tiles[k].grad, full32[k].grad, mesh, _sizes(lay, n, S))
        both("d" + k, e, rel_err(fullbf[k].grad, full32[k].grad) if dtype != torch.float32 else 0.0)
    ref_grads = {k: v.grad for k, v in ref32.named_parameters()}
    pe = param_grad_err(dict(op.named_parameters()), ref_grads, mesh)
    pb = 0.0
    if dtype != torch.float32:
        pb = param_grad_err(dict(refbf.named_parameters()), ref_grads, type("M", (), {"p": 1})())
    both("dparams", pe, pb)
    return res


def _mask_tokens(g, *shape, keep=0.75):
    m = (torch.rand(*shape, generator=g) < keep).float()
    m[..., 0] = 1.0
    return m


# ----------------------------------------------------------------------------- cases
def case_attention(mesh, version: int, dtype=torch.float32, seed=0):
    from boltz.model.layers.attention import AttentionPairBias as V1
    from boltz.model.layers.attentionv2 import AttentionPairBias as V2

    from autocp.ops.pair_bias_attn import AttentionPairBias2D

    n, cs, cz, h = _n_for(mesh.p), 16, 8, 2
    torch.manual_seed(seed)
    mod = V1(cs, cz, h) if version == 1 else V2(cs, cz, h)
    redraw(mod, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    inputs = {
        "s": (torch.randn(B, n, cs, generator=g), RowToken(), True),
        "z": (torch.randn(B, n, n, cz, generator=g), Pair2D(), True),
        "mask": (_mask_tokens(g, B, n), RowToken(), False),
        "_sizes": (n, 1),
    }
    if version == 2:
        inputs["k_in"] = (torch.randn(B, n, cs, generator=g), RowToken(), True)
        ref_call = lambda M, f: M(f["s"], f["z"], f["mask"], f["k_in"])  # noqa: E731
        op_fn = lambda op, t, n, S: op(t["s"], t["z"], t["mask"], n_tokens=n, k_in=t["k_in"])  # noqa: E731
    else:
        ref_call = lambda M, f: M(f["s"], f["z"], f["mask"])  # noqa: E731
        op_fn = lambda op, t, n, S: op(t["s"], t["z"], t["mask"], n_tokens=n)  # noqa: E731

    def dep(out, full):  # the update is non-trivial and depends on the pair bias
        assert out.abs().max() > 1e-2 and full["z"].grad.abs().max() > 1e-4

    return _compare(mesh, mod, ref_call, (AttentionPairBias2D, op_fn), inputs, RowToken(), dtype, seed + 3, dep)


def case_opm(mesh, dtype=torch.float32, seed=10):
    from boltz.model.layers.outer_product_mean import OuterProductMean

    from autocp.ops.outer_product import OuterProductMean2D

    n, S, cm, chid, cz = _n_for(mesh.p), _s_for(mesh.p), 8, 4, 8
    mod = OuterProductMean(cm, chid, cz)
    redraw(mod, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    msa_mask = _mask_tokens(g, B, S, n, keep=0.7)
    msa_mask[:, :, -1] = 0.0  # one token with no MSA coverage: count clamps to 1
    inputs = {
        "m": (torch.randn(B, S, n, cm, generator=g), MsaTiles(), True),
        "mask": (msa_mask, MsaTiles(), False),
        "_sizes": (n, S),
    }

    def dep(out, full):
        assert out.abs().max() > 1e-2 and full["m"].grad.abs().max() > 1e-4

    return _compare(mesh, mod, lambda M, f: M(f["m"], f["mask"]),
                    (OuterProductMean2D, lambda op, t, n, S: op(t["m"], t["mask"], n_tokens=n, n_seq=S)),
                    inputs, Pair2D(), dtype, seed + 3, dep)


def case_pwa(mesh, dtype=torch.float32, seed=20):
    from boltz.model.layers.pair_averaging import PairWeightedAveraging

    from autocp.ops.pair_averaging import PairWeightedAveraging2D

    n, S, cm, cz, ch, h = _n_for(mesh.p), _s_for(mesh.p), 8, 8, 4, 2
    mod = PairWeightedAveraging(cm, cz, ch, h)
    redraw(mod, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    tok = _mask_tokens(g, B, n)
    inputs = {
        "m": (torch.randn(B, S, n, cm, generator=g), MsaTiles(), True),
        "z": (torch.randn(B, n, n, cz, generator=g), Pair2D(), True),
        "mask": (tok[:, :, None] * tok[:, None, :], Pair2D(), False),
        "_sizes": (n, S),
    }

    def dep(out, full):
        assert out.abs().max() > 1e-2 and full["z"].grad.abs().max() > 1e-4

    return _compare(mesh, mod, lambda M, f: M(f["m"], f["z"], f["mask"]),
                    (PairWeightedAveraging2D,
                     lambda op, t, n, S: op(t["m"], t["z"], t["mask"], n_tokens=n, n_seq=S)),
                    inputs, MsaTiles(), dtype, seed + 3, dep)


def case_transition(mesh, dtype=torch.float32, seed=30):
    from boltz.model.layers.transition import Transition

    from autocp.ops.transition import Transition2D

    n, cz = _n_for(mesh.p), 8
    mod = Transition(cz, 4 * cz)
    redraw(mod, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    inputs = {"z": (torch.randn(B, n, n, cz, generator=g), Pair2D(), True), "_sizes": (n, 1)}

    def dep(out, full):
        assert out.abs().max() > 1e-2

    # chunk_rows=1 exercises the chunked + recomputed path
    return _compare(mesh, mod, lambda M, f: M(f["z"]),
                    (lambda M, mesh: Transition2D(M, mesh, chunk_rows=1), lambda op, t, n, S: op(t["z"])),
                    inputs, Pair2D(), dtype, seed + 3, dep)


def case_dropout(mesh, seed=40):
    """Debug mode reproduces Boltz's masks bit for bit; default mode keeps row/column
    sharing (equal along the shared axis, consistent across the ranks of a mesh row)."""
    from boltz.model.layers.dropout import get_dropout_mask

    from autocp.ops.transition import dropout_mask

    n, p = _n_for(mesh.p), mesh.p
    z = torch.zeros(B, n, n, 1)
    zt = Pair2D().shard(z, mesh)
    res = {}
    for cw in (False, True):
        torch.manual_seed(seed)
        ref = get_dropout_mask(0.4, z, True, columnwise=cw).expand(B, n, n, 1)
        torch.manual_seed(seed)
        mine = dropout_mask(0.4, zt, True, mesh, n, columnwise=cw, reproduce_single_device=True)
        err = tile_err(Pair2D(), mine.expand_as(zt), ref, mesh, n)
        assert 0 < float(ref.eq(0).float().mean()) < 1
        res[f"debug_cw{int(cw)}"] = (err, 0.0)
        torch.manual_seed(seed)
        d = dropout_mask(0.4, zt, True, mesh, n, columnwise=cw)
        assert d.shape == ((B, 1, zt.shape[2], 1) if cw else (B, zt.shape[1], 1, 1))
        # the ranks sharing the block (mesh row for row-wise, column for column-wise) agree
        full = torch.zeros(p, *d.shape)
        full[mesh.c if not cw else mesh.r] = d
        from autocp import comm
        from autocp.mesh import COL, ROW
        comm.all_reduce_(full, mesh, ROW if not cw else COL)
        res[f"default_shared_cw{int(cw)}"] = (float((full - d).abs().max()), 0.0)
        # values are 0 or 1/(1-p) and some are dropped somewhere (B*b draws)
        vals = set(torch.unique(d).tolist()) - {0.0, torch.tensor(1.0 / 0.6).item()}
        res[f"default_values_cw{int(cw)}"] = (float(len(vals)), 0.0)
    return res


CASES = {
    "attn_v1": functools.partial(case_attention, version=1),
    "attn_v2": functools.partial(case_attention, version=2),
    "attn_v2_bf16": functools.partial(case_attention, version=2, dtype=torch.bfloat16),
    "opm": case_opm,
    "opm_bf16": functools.partial(case_opm, dtype=torch.bfloat16),
    "pwa": case_pwa,
    "pwa_bf16": functools.partial(case_pwa, dtype=torch.bfloat16),
    "transition": case_transition,
    "dropout": case_dropout,
}


def _worker(rank, world, names):
    import autocp

    mesh = autocp.init_mesh()
    out = {}
    for name in names:
        out[name] = CASES[name](mesh)
    return out


@functools.lru_cache(maxsize=None)
def _results(p: int):
    return run_distributed(_worker, p * p, tuple(CASES))


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_parity(p, case):
    """fp32: relative error <= 1e-4. bf16: the op's error against the fp32 reference must
    be within ``2 x`` Boltz's own bf16 error against it (+ 1e-2)."""
    for rank, res in enumerate(_results(p)):
        for what, (err, boltz_bf16) in res[case].items():
            tol = 2 * boltz_bf16 + 1e-2 if "bf16" in case else FP32_TOL
            assert err <= tol, f"{case} p={p} rank {rank}: {what} rel err {err:.3g} > {tol:.3g}"
