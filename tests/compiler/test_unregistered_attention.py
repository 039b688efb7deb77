"""Porting without registration, triangle attention: unregistered modules whose ATen graph
holds ``softmax(q.k + pair bias + key mask) @ v`` over a token axis run the ring attention
of ``autocp.ops.triangle_attn`` on their own tiles (recognised by the sharding pass,
passes/attention.py), not gathered.

Spellings: af3like's ``RowAttention`` (matmul + permutes, scaled scores, ``masked_fill``;
the ending node by transposing z outside the module) and ``EinsumTriAttn`` below (einsum,
pre-scaled q, additive ``inf * (mask - 1)``, argument order (mask, z), the ending node
spelled inside the module with the bias read transposed; and in-place ``scores += bias``). 3x3 and 2x2 gloo meshes, N=7
(not divisible by 2 or 3), a pair mask with a masked token (fully masked rows included),
all parameters re-drawn; forward, input gradient and every parameter gradient (after
sync_grads) against the single-device model. The plan must say "op" /
``structural:triangle_attn`` and the per-rank peak of a forward must be a fraction of the
single-device one (gathered execution holds at least the full working set). Modules whose
attention does not fit (bias not a triangle bias, pair-bias attention over token tensors)
fall back with the reason stated.
"""

import warnings

import pytest
import torch
from torch import nn

from autocp.testing import run_distributed
from tests.compiler.test_unregistered_trimul import _check_case, _nograd_peaks, _pair_inputs, _parity, _redraw, _rings


class EinsumTriAttn(nn.Module):
    """Triangle attention via einsum, pre-scaled q, additive ``inf * (mask - 1)``."""

    def __init__(self, c, heads=2, dim=4, starting=True, inplace=False):
        super().__init__()
        self.h, self.d, self.starting, self.inplace = heads, dim, starting, inplace
        self.norm = nn.LayerNorm(c)
        self.q = nn.Linear(c, heads * dim, bias=False)
        self.k = nn.Linear(c, heads * dim, bias=False)
        self.v = nn.Linear(c, heads * dim, bias=False)
        self.b = nn.Linear(c, heads, bias=False)
        self.g = nn.Linear(c, heads * dim)
        self.o = nn.Linear(heads * dim, c)
        self.inf = 1e9

    def forward(self, mask, z):
        B, N = z.shape[:2]
        x = self.norm(z)
        q = self.q(x).view(B, N, N, self.h, self.d) * self.d ** -0.5
        k = self.k(x).view(B, N, N, self.h, self.d)
        v = self.v(x).view(B, N, N, self.h, self.d)
        tri = self.b(x)  # [B, N, N, H]
        mb = self.inf * (mask - 1)
        if self.starting and self.inplace:  # ``scores += bias`` (protenix; SDPA's math path)
            s = torch.einsum("bijhd,bikhd->bihjk", q, k)
            s += tri.permute(0, 3, 1, 2)[:, None]
            s += mb[:, :, None, None, :]
            o = torch.einsum("bihjk,bikhd->bijhd", s.softmax(-1), v)
        elif self.starting:  # row i: query (i, j) attends keys (i, k), bias tri[j, k]
            s = torch.einsum("bijhd,bikhd->bihjk", q, k) + tri.permute(0, 3, 1, 2)[:, None]
            s = s + mb[:, :, None, None, :]
            o = torch.einsum("bihjk,bikhd->bijhd", s.softmax(-1), v)
        else:  # column j: query (i, j) attends keys (k, j), bias tri[k, i]
            s = torch.einsum("bijhd,bkjhd->bjhik", q, k) + tri.permute(0, 3, 2, 1)[:, None]
            s = s + mb.transpose(1, 2)[:, :, None, None, :]
            o = torch.einsum("bjhik,bkjhd->bijhd", s.softmax(-1), v)
        o = o.reshape(B, N, N, self.h * self.d) * torch.sigmoid(self.g(x))
        return self.o(o)


class AttnLayer(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        from tests.compiler.af3like import RowAttention

        self.att_row = RowAttention(c, 2, 4)
        self.att_col = RowAttention(c, 2, 4)
        self.e_start = EinsumTriAttn(c, starting=True)
        self.e_end = EinsumTriAttn(c, starting=False)
        self.e_inplace = EinsumTriAttn(c, starting=True, inplace=True)
        self.ff = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.ReLU(), nn.Linear(2 * c, c))

    def forward(self, z, pair_mask):
        z = z + self.att_row(z, pair_mask)
        z = z + self.att_col(z.transpose(1, 2), pair_mask.transpose(1, 2)).transpose(1, 2)
        z = z + self.e_start(pair_mask, z)
        z = z + self.e_end(pair_mask, z)
        z = z + self.e_inplace(pair_mask, z)
        return z + self.ff(z)


def _kind(ring_detail: str) -> str:
    """The note of a triangle attention ring -> triangle_attn_start / _end."""
    return "triangle_attn_start" if "starting node" in ring_detail else "triangle_attn_end"


EXPECTED = {"layer.att_row": "triangle_attn_start", "layer.att_col": "triangle_attn_end",
            "layer.e_start": "triangle_attn_start", "layer.e_end": "triangle_attn_end",
            "layer.e_inplace": "triangle_attn_start"}


class AttnModel(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.layer = AttnLayer(c)

    def forward(self, z, pair_mask):
        return self.layer(z, pair_mask)


def attention_worker(rank, world):
    import autocp
    from autocp.api import parallelize

    mesh = autocp.init_mesh()
    res = {}
    model = _redraw(AttnModel()).train()
    z, pm, _ = _pair_inputs(7)
    res["parity"] = _parity(model, (z, pm), mesh, grad_inputs=(0,))
    if world == 9:  # per-rank peak of a no-grad forward, N=13, vs the single-device model
        big = _redraw(AttnModel(c=16)).eval()
        zb, pmb, _ = _pair_inputs(13, c=16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a gather would warn
            pmod = parallelize(big, mesh, example_inputs=(zb, pmb), strict=True)
        res["peak"] = _nograd_peaks(big, pmod, (zb, pmb))
    return res


@pytest.mark.distributed
@pytest.mark.parametrize("world", [9, 4])
def test_unregistered_attention_parity_strict(world):
    res = run_distributed(attention_worker, world, timeout=400)
    for rank, r in enumerate(res):
        a = r["parity"]
        if rank == 0:
            print(f"\n{world} ranks: out {max(e / s for e, s in zip(a['out_err'], a['scale'])):.1e} rel, input grad "
                  f"{a['in_err']:.1e} rel, param grads {a['grad_err']:.1e} rel"
                  + (f"; peak/rank {r['peak'][0]} B vs single-device {r['peak'][1]} B" if "peak" in r else ""))
        assert sorted(_kind(x) for x in a["rings"]) == sorted(EXPECTED.values()), a["rings"]
        _check_case(a, world, rank)
        if "peak" in r:
            peak, single = r["peak"]
            assert peak < 0.5 * single, (world, rank, peak, single)


class TokenBiasAttn(EinsumTriAttn):
    """Starting-node attention whose bias is read at [i, k] (the scores' own row/key slots),
    not the triangle bias [j, k]: the ring does not compute it."""

    def forward(self, mask, z):
        B, N = z.shape[:2]
        x = self.norm(z)
        q = self.q(x).view(B, N, N, self.h, self.d)
        k = self.k(x).view(B, N, N, self.h, self.d)
        v = self.v(x).view(B, N, N, self.h, self.d)
        s = torch.einsum("bijhd,bikhd->bihjk", q, k) + self.b(x).permute(0, 1, 3, 2)[:, :, :, None, :]
        o = torch.einsum("bihjk,bikhd->bijhd", s.softmax(-1), v)
        return self.o(o.reshape(B, N, N, self.h * self.d))


def test_one_process_rings_and_unfit_attention_gathers():
    from autocp.api import parallelize

    model = _redraw(AttnModel())
    z, pm, _ = _pair_inputs(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing gathered
        pmod = parallelize(model, None, example_inputs=(z, pm), strict=True)
    assert sorted(_kind(x) for x in _rings(pmod)) == sorted(EXPECTED.values())
    assert (pmod(z, pm) - model(z, pm)).abs().max() < 1e-5

    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = TokenBiasAttn(8)

        def forward(self, z, m):
            return z + self.att(m, z)

    bad = _redraw(T())
    with pytest.warns(UserWarning, match=r"glue op\(s\) gather a pair tensor"):
        pb = parallelize(bad, None, example_inputs=(z, pm))
    unmatched = [nt.detail for nt in pb.report.glue.notes if nt.what == "attention-unmatched"]
    assert unmatched and "triangle bias" in unmatched[0], unmatched  # why the ring does not apply
    assert (pb(z, pm) - bad(z, pm)).abs().max() < 1e-5
