"""Hand-assembled 2D Pairformer / MSA layer vs the Boltz modules.

* Boltz-2 ``PairformerModule`` (2 layers, v2, small channels) on 3x3 (and 1x1), train mode
  with dropout 0.25 reproduced bit for bit (debug dropout masks), token + pair masks,
  N not divisible by p: s and z outputs, input gradients and all parameter gradients.
* Boltz-1 ``trunk.PairformerModule`` (2 layers) on 2x2 in eval mode.
* Boltz-2 ``MSALayer`` on 2x2 (train, dropout reproduced; MSA mask, S not divisible by p).
* Same state_dict keys; bad inputs raise clear errors.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from autocp.layout import LayoutError, MsaTiles, Pair2D, RowToken
from autocp.testing import run_distributed

from ._parity import param_grad_err, redraw, row_grad_err, tile_err

pytestmark = pytest.mark.distributed

B = 1
TOL = 1e-4


def _masks(g, n):
    tok = (torch.rand(B, n, generator=g) < 0.8).float()
    tok[:, 0] = 1.0
    return tok, tok[:, :, None] * tok[:, None, :]


def case_pairformer(mesh, boltz: int, train: bool, seed=0):
    from autocp.ops.pairformer import Pairformer2D

    n = {1: 7, 2: 7, 3: 8}[mesh.p]
    cs, cz = 16, 8
    torch.manual_seed(seed)
    if boltz == 2:
        from boltz.model.layers.pairformer import PairformerModule

        mod = PairformerModule(cs, cz, 2, num_heads=2, dropout=0.25, pairwise_head_width=4,
                               pairwise_num_heads=2, v2=True)
    else:
        from boltz.model.modules.trunk import PairformerModule

        mod = PairformerModule(cs, cz, 2, num_heads=2, dropout=0.25, pairwise_head_width=4, pairwise_num_heads=2)
    redraw(mod, seed + 1, scale=0.3)
    mod.train(train)
    g = torch.Generator().manual_seed(seed + 2)
    s = torch.randn(B, n, cs, generator=g)
    z = torch.randn(B, n, n, cz, generator=g)
    tok, pair = _masks(g, n)
    Ws, Wz = torch.randn(B, n, cs, generator=g), torch.randn(B, n, n, cz, generator=g)

    ref = copy.deepcopy(mod)
    rs, rz = s.clone().requires_grad_(), z.clone().requires_grad_()
    torch.manual_seed(seed + 5)
    so, zo = ref(rs, rz, tok, pair)
    ((so * Ws).sum() + (zo * Wz).sum()).backward()
    # the layers do something (re-drawn output projections) and s depends on z
    assert (zo - z).abs().max() > 1e-1 and (so - s).abs().max() > 1e-1
    assert rz.grad.abs().max() > 1e-3

    op = Pairformer2D(mod, mesh, reproduce_dropout=True)
    assert list(op.state_dict()) == list(mod.state_dict()) or set(op.state_dict()) == set(mod.state_dict())
    ts = RowToken().shard(s, mesh).detach().requires_grad_()
    tz = Pair2D().shard(z, mesh).detach().requires_grad_()
    torch.manual_seed(seed + 5)
    os_, oz = op(ts, tz, RowToken().shard(tok, mesh), Pair2D().shard(pair, mesh), n_tokens=n)
    ((os_ * RowToken().shard(Ws, mesh)).sum() / mesh.p + (oz * Pair2D().shard(Wz, mesh)).sum()).backward()
    return {
        "s": tile_err(RowToken(), os_, so, mesh, n),
        "z": tile_err(Pair2D(), oz, zo, mesh, n),
        "ds": row_grad_err(ts.grad, rs.grad, mesh, n),
        "dz": tile_err(Pair2D(), tz.grad, rz.grad, mesh, n),
        "dparams": param_grad_err(dict(op.named_parameters()), {k: v.grad for k, v in ref.named_parameters()}, mesh),
        "keys_equal": float(set(op.state_dict()) != set(mod.state_dict())),
    }


def case_msa(mesh, seed=100):
    from boltz.model.modules.trunkv2 import MSALayer

    from autocp.ops.msa import MSALayer2D

    n, S, cm, cz = 7, 5, 8, 8
    torch.manual_seed(seed)
    mod = MSALayer(cm, cz, msa_dropout=0.15, z_dropout=0.25, pairwise_head_width=4, pairwise_num_heads=2)
    redraw(mod, seed + 1, scale=0.3)
    mod.train(True)
    g = torch.Generator().manual_seed(seed + 2)
    z = torch.randn(B, n, n, cz, generator=g)
    m = torch.randn(B, S, n, cm, generator=g)
    tok, pair = _masks(g, n)
    msa_mask = (torch.rand(B, S, n, generator=g) < 0.8).float()
    Wz, Wm = torch.randn(B, n, n, cz, generator=g), torch.randn(B, S, n, cm, generator=g)

    ref = copy.deepcopy(mod)
    rz, rm = z.clone().requires_grad_(), m.clone().requires_grad_()
    torch.manual_seed(seed + 5)
    zo, mo = ref(rz, rm, pair, msa_mask)
    ((zo * Wz).sum() + (mo * Wm).sum()).backward()
    assert (zo - z).abs().max() > 1e-1 and (mo - m).abs().max() > 1e-1 and rm.grad.abs().max() > 1e-3

    op = MSALayer2D(mod, mesh, reproduce_dropout=True)
    tz = Pair2D().shard(z, mesh).detach().requires_grad_()
    tm = MsaTiles().shard(m, mesh).detach().requires_grad_()
    torch.manual_seed(seed + 5)
    oz, om = op(tz, tm, Pair2D().shard(pair, mesh), MsaTiles().shard(msa_mask, mesh), n_tokens=n, n_seq=S)
    ((oz * Pair2D().shard(Wz, mesh)).sum() + (om * MsaTiles().shard(Wm, mesh)).sum()).backward()
    return {
        "z": tile_err(Pair2D(), oz, zo, mesh, n),
        "m": tile_err(MsaTiles(), om, mo, mesh, [S, n]),
        "dz": tile_err(Pair2D(), tz.grad, rz.grad, mesh, n),
        "dm": tile_err(MsaTiles(), tm.grad, rm.grad, mesh, [S, n]),
        "dparams": param_grad_err(dict(op.named_parameters()), {k: v.grad for k, v in ref.named_parameters()}, mesh),
        "keys_equal": float(set(op.state_dict()) != set(mod.state_dict())),
    }


CASES = {
    "boltz2_train": functools.partial(case_pairformer, boltz=2, train=True),
    "boltz1_eval": functools.partial(case_pairformer, boltz=1, train=False),
    "msa_train": case_msa,
}
PLAN = {1: ("boltz2_train", "boltz1_eval", "msa_train"), 2: ("boltz1_eval", "msa_train"), 3: ("boltz2_train",)}


def _worker(rank, world, names):
    import autocp

    mesh = autocp.init_mesh()
    return {name: CASES[name](mesh) for name in names}


@functools.lru_cache(maxsize=None)
def _results(p):
    return run_distributed(_worker, p * p, PLAN[p], timeout=600)


@pytest.mark.parametrize("p,case", [(p, c) for p, cs in PLAN.items() for c in cs])
def test_pairformer_parity(p, case):
    for rank, res in enumerate(_results(p)):
        for what, err in res[case].items():
            assert err <= TOL, f"{case} p={p} rank {rank}: {what} rel err {err:.3g} > {TOL}"


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    from boltz.model.layers.outer_product_mean import OuterProductMean
    from boltz.model.layers.pair_averaging import PairWeightedAveraging
    from boltz.model.layers.attentionv2 import AttentionPairBias

    from autocp.mesh import SquareMesh
    from autocp.ops.outer_product import OuterProductMean2D
    from autocp.ops.pair_averaging import PairWeightedAveraging2D
    from autocp.ops.pair_bias_attn import AttentionPairBias2D
    from autocp.ops.pairformer import Pairformer2D

    mesh = SquareMesh.single()
    n, S = 5, 3
    opm = OuterProductMean2D(OuterProductMean(8, 4, 8), mesh)
    m = torch.randn(1, S, n, 8)
    with pytest.raises(LayoutError, match="MSA depth mismatch"):
        opm(m, None, n_tokens=n, n_seq=S + 2)
    with pytest.raises(LayoutError, match="mask tile has shape"):
        opm(m, torch.ones(1, S, n + 1), n_tokens=n, n_seq=S)
    with pytest.raises(LayoutError, match="channels"):
        opm(torch.randn(1, S, n, 6), None, n_tokens=n, n_seq=S)
    pwa = PairWeightedAveraging2D(PairWeightedAveraging(8, 8, 4, 2), mesh)
    with pytest.raises(LayoutError, match="pair mask dtype"):
        pwa(m, torch.randn(1, n, n, 8), torch.ones(1, n, n, dtype=torch.int64), n_tokens=n, n_seq=S)
    with pytest.raises(LayoutError, match="mask tile has shape"):
        pwa(m, torch.randn(1, n, n, 8), torch.ones(1, n, n + 1), n_tokens=n, n_seq=S)
    att = AttentionPairBias2D(AttentionPairBias(16, 8, 2), mesh)
    s = torch.randn(1, n, 16)
    with pytest.raises(LayoutError, match="token mask must be the RowToken tile"):
        att(s, torch.randn(1, n, n, 8), torch.ones(1, n, n), n_tokens=n, k_in=s)
    with pytest.raises(LayoutError, match="RowToken tile"):
        att(torch.randn(1, n + 1, 16), torch.randn(1, n, n, 8), None, n_tokens=n, k_in=s)
    with pytest.raises(TypeError, match="k_in is required"):
        att(s, torch.randn(1, n, n, 8), None, n_tokens=n)
    with pytest.raises(TypeError, match="PairformerLayer2D"):
        Pairformer2D(torch.nn.Linear(2, 2), mesh)
