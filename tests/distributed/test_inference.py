"""Pairformer2D / TriangleAttention2D without autograd (``torch.no_grad`` and
``torch.inference_mode``) vs the Boltz modules, on a 2x2 gloo mesh.

Boltz-2 ``PairformerModule`` (2 layers, small channels, all parameters re-drawn: AF3 init
zeroes the output projections), train mode with dropout 0 and eval mode, token + pair
masks with a masked token, N = 7 (not divisible by p = 2: the last block is padded).
Checks per rank: s and z tiles equal Boltz's (rel. 1e-4), the outputs carry no autograd
graph, the triangle-attention forward under ``row_chunk=1`` (every query row its own
chunk) equals the default, and a grad-enabled forward + backward in the same process
right after an inference run still works and matches (no inference tensor leaks into
state that a later training step would save).
"""

from __future__ import annotations

import copy

import pytest
import torch

from autocp.layout import Pair2D, RowToken
from autocp.testing import run_distributed

from ._parity import redraw, tile_err

pytestmark = pytest.mark.distributed

B, N, CS, CZ = 1, 7, 16, 8
TOL = 1e-4


def _build(train: bool, seed: int = 0):
    from boltz.model.layers.pairformer import PairformerModule

    torch.manual_seed(seed)
    mod = PairformerModule(CS, CZ, 2, num_heads=2, dropout=0.0, pairwise_head_width=4,
                           pairwise_num_heads=2, v2=True)
    redraw(mod, seed + 1, scale=0.3)
    return mod.train(train)


def _inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, CS, generator=g)
    z = torch.randn(B, N, N, CZ, generator=g)
    tok = (torch.rand(B, N, generator=g) < 0.8).float()
    tok[:, 0] = 1.0
    tok[:, 3] = 0.0  # a masked token: fully masked rows in both triangle attentions
    return s, z, tok, tok[:, :, None] * tok[:, None, :]


def _case(mesh, train: bool) -> dict:
    from autocp.ops.pairformer import Pairformer2D

    mod = _build(train)
    s, z, tok, pair = _inputs()
    with torch.no_grad():
        so_ref, zo_ref = copy.deepcopy(mod)(s, z, tok, pair)
    # the reference really depends on the layers (guards against identity branches)
    assert (zo_ref - z).abs().max() > 1e-1 and (so_ref - s).abs().max() > 1e-1

    op = Pairformer2D(mod, mesh)
    args = (RowToken().shard(s, mesh), Pair2D().shard(z, mesh), RowToken().shard(tok, mesh),
            Pair2D().shard(pair, mesh))
    res = {}
    for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        # inputs that require grad must not matter without autograd
        a = (args[0].clone().requires_grad_(), args[1].clone().requires_grad_(), args[2], args[3])
        with ctx():
            so, zo = op(*a, n_tokens=N)
        res[f"{mode}.s"] = tile_err(RowToken(), so, so_ref, mesh, N)
        res[f"{mode}.z"] = tile_err(Pair2D(), zo, zo_ref, mesh, N)
        res[f"{mode}.graph"] = float(so.requires_grad or zo.requires_grad or zo.grad_fn is not None)

    # a training step in the same process after inference: works and matches Boltz
    ref = copy.deepcopy(mod)
    rs, rz = s.clone().requires_grad_(), z.clone().requires_grad_()
    so_r, zo_r = ref(rs, rz, tok, pair)
    (so_r.sum() + zo_r.sum()).backward()
    ts, tz = args[0].clone().requires_grad_(), args[1].clone().requires_grad_()
    so, zo = op(ts, tz, args[2], args[3], n_tokens=N)
    s_seed = (so * RowToken().valid_mask(mesh, N, ndim=3)).sum() / mesh.p  # RowToken: 1/p per rank
    (s_seed + (zo * Pair2D().valid_mask(mesh, N, ndim=4)).sum()).backward()
    res["after.z"] = tile_err(Pair2D(), zo, zo_r, mesh, N)
    res["after.dz"] = tile_err(Pair2D(), tz.grad, rz.grad, mesh, N)
    return res


def _row_chunk_case(mesh) -> dict:
    """TriangleAttention2D under inference_mode: row_chunk=1 and the default agree, and
    both equal Boltz."""
    from boltz.model.layers.triangular_attention.attention import TriangleAttention

    from autocp.ops.triangle_attn import TriangleAttention2D

    torch.manual_seed(3)
    m = TriangleAttention(CZ, 4, 2, starting=True)
    redraw(m, 4, scale=0.5)
    _, z, _, pair = _inputs(5)
    with torch.no_grad():
        ref = m(z, pair, chunk_size=None)
    zt, mt = Pair2D().shard(z, mesh), Pair2D().shard(pair, mesh)
    with torch.inference_mode():
        a = TriangleAttention2D(m, mesh, row_chunk=1)(zt, mt, n_tokens=N)
        b = TriangleAttention2D(m, mesh)(zt, mt, n_tokens=N)
    return {"rc1": tile_err(Pair2D(), a, ref, mesh, N), "default": tile_err(Pair2D(), b, ref, mesh, N),
            "ref_scale": float(ref.abs().max())}


def _worker(rank, world):
    import autocp

    mesh = autocp.init_mesh()
    return {"train": _case(mesh, True), "eval": _case(mesh, False), "tri": _row_chunk_case(mesh)}


_CACHE: dict = {}


def _results():
    if "r" not in _CACHE:
        _CACHE["r"] = run_distributed(_worker, 4, timeout=300)
    return _CACHE["r"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pairformer_no_grad_and_inference_mode_parity(mode):
    for rank, res in enumerate(_results()):
        r = res[mode]
        for mname in ("no_grad", "inference_mode"):
            assert r[f"{mname}.graph"] == 0.0, f"rank {rank} {mode} {mname}: output carries an autograd graph"
            for what in ("s", "z"):
                err = r[f"{mname}.{what}"]
                assert err <= TOL, f"rank {rank} {mode} {mname}: {what} rel err {err:.3g} > {TOL}"
        for what in ("after.z", "after.dz"):
            assert r[what] <= TOL, f"rank {rank} {mode}: training after inference, {what} rel err {r[what]:.3g}"


def test_triangle_attention_inference_row_chunks():
    for rank, res in enumerate(_results()):
        r = res["tri"]
        assert r["ref_scale"] > 0.1
        assert r["rc1"] <= TOL and r["default"] <= TOL, (rank, r)
