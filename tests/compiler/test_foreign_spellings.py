"""Spellings found in public AF-like code that crashed the sharded graph, each on 2x2 and
3x3 against the single-device module (N = 7, not divisible by 2 or 3):

* dropout written ``torch.rand_like(v) > p`` (was a SyntaxError: the emitted graph named
  the python function ``torch.rand``): the mask is drawn at the global shape, so a fixed
  seed gives the single-device numbers (outputs and gradients);
* an integer ``amax`` / ``amin`` over a sharded token axis (a max over per-token lengths;
  was an overflow: the padding was filled with float ``-inf``);
* non-tensor keyword flags after the tensors (``use_kernels=False``) keep the layouts;
* a gather along both token axes says it is O(N^2) per rank (not O(N^2/p));
* an outer product mean spelled as einsums over the MSA letter runs on the sequence-block
  ring (``strict=True``: no gather), outputs and input gradients exact;
* pair-weighted averaging spelled as one einsum of a pair tensor and an MSA tensor over a
  token letter (MSA-Pairformer's ``einsum(weights, values, 'b h i j, b h s j d -> b h s i d')``),
  and an MSA-axis count of a mask expanded over the MSA rows, run on rings (strict);
* ATen alias ops (``torch.multiply``, ``torch.greater_equal``, ``torch.less``, ``torch.divide``,
  ``torch.subtract``: what einx and numpy-style code call; they carry no pointwise tag) on pair
  tensors run tile-local (strict; they ran gathered as "no sharding rule" -- the outer product
  mean and the windowed masks of alphafold3-pytorch's whole model)."""

import pytest
import torch
from torch import nn

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed


class RandDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, z, bias=None, use_kernels=False):
        v = self.lin(z)
        keep = torch.rand_like(v) > 0.25
        return v * keep / 0.75


class IntLengths(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, z, lens):
        hi, lo = lens.amax(dim=-1), lens.amin(dim=-1)
        return self.lin(z) * (hi - lo)[:, None, None, None].float()


class NoneFirst(nn.Module):
    """Outputs with a ``None`` leaf before the pair tensor (as protenix's stacks return
    ``(None, z)``): a tile program's output layouts are per leaf, ``None`` included."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, z):
        return None, self.lin(z), z.sum(-1)


class EinsumOPM(nn.Module):
    """An outer product mean spelled as einsums over the MSA letter (as alphafold3-pytorch
    writes it): runs on the sequence-block ring, not gathered (strict)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 2)
        self.o = nn.Linear(6, 4)

    def forward(self, m, mask):
        m = self.norm(m)
        a = self.a(m) * mask[..., None]
        b = self.b(m) * mask[..., None]
        o = torch.einsum("bsid,bsje->bijde", a, b)
        count = torch.einsum("bsi,bsj->bij", mask, mask)
        return self.o(o.flatten(-2)) / (count[..., None] + 1e-3)


class EinsumPWA(nn.Module):
    """Pair-weighted averaging as MSA-Pairformer writes it (pairwise_operations.py:398): weights
    = softmax over j of a pair bias, contracted with the MSA values over j in one einsum; and
    its normaliser (outer_product.py:295): a contraction over the MSA rows with a token mask
    expanded over them (whole along the MSA axis)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Linear(4, 2)
        self.val = nn.Linear(4, 6)

    def forward(self, m, z, mask):
        w = self.bias(z).permute(0, 3, 1, 2)  # [b, h, i, j]
        w = w.masked_fill(mask[:, None, None, :] < 0.5, -1e9).softmax(-1)
        v = self.val(m).unflatten(-1, (2, 3)).permute(0, 3, 1, 2, 4)  # [b, h, s, j, d]
        o = torch.einsum("bhij,bhsjd->bhsid", w, v)
        full = mask[:, None, :].expand(-1, m.shape[1], -1)  # [b, s, j], whole along s
        cnt = torch.einsum("bsi,bsj->bij", m[..., 0] * mask[:, None, :], full.float())
        return o.permute(0, 2, 3, 1, 4).flatten(-2) + cnt.sum(-1)[:, None, :, None]


class AliasOps(nn.Module):
    """Pointwise ops called by their alias names, on a pair tensor and a pair mask built from a
    token mask (einx.multiply / einx.logical_and and numpy-style comparisons)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, z, mask):
        pair = torch.logical_and(mask[:, :, None] > 0.5, mask[:, None, :] > 0.5)
        v = torch.multiply(self.lin(z), pair[..., None].to(z.dtype))
        band = torch.logical_and(torch.greater_equal(v, -1.0), torch.less(v, 1.0))
        return torch.subtract(torch.divide(v, 2.0), torch.multiply(band.to(v.dtype), z))


class WholeScan(nn.Module):
    """A cumulative sum over the flattened pair: needs the whole tensor on every rank."""

    def forward(self, z):
        return z.flatten(1, 2).cumsum(1).view(z.shape)


def spellings_worker(rank, world):
    import warnings

    import autocp
    from autocp.layout import MsaTiles, Pair2D, RowToken

    mesh = autocp.init_mesh()
    n = 7
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, n, n, 4, generator=g)
    lens = torch.randint(1, 30, (1, n), generator=g)
    msa = torch.randn(1, 5, n, 4, generator=g)
    msa_mask = (torch.rand(1, 5, n, generator=g) > 0.2).float()
    out = {}
    tok_mask = torch.ones(1, n)
    tok_mask[0, 5] = 0
    for name, model, args, kwargs in (("pwa", EinsumPWA(), (msa, z, tok_mask), {}),
                                      ("opm", EinsumOPM(), (msa, msa_mask), {}),
                                      ("alias", AliasOps(), (z, tok_mask), {}), ("drop", RandDrop().train(), (z,), {"bias": None, "use_kernels": False}),
                                      ("lens", IntLengths(), (z, lens), {}), ("scan", WholeScan(), (z,), {}),
                                      ("none", NoneFirst(), (z,), {})):
        torch.manual_seed(0)
        for p in model.parameters():
            p.data.copy_(torch.randn(p.shape))
        with warnings.catch_warnings(record=True) as wl:
            warnings.simplefilter("always")
            lays = {"opm": {"m": MsaTiles(), "mask": MsaTiles()},
                    "pwa": {"m": MsaTiles(), "z": Pair2D(), "mask": RowToken()},
                    "alias": {"z": Pair2D(), "mask": RowToken()}}.get(name)
            pm = autocp.parallelize(model, mesh, example_inputs=(args, kwargs), strict=name in ("opm", "pwa", "alias"),
                                    input_layouts=lays)
            zp = args[0].clone().requires_grad_(True)
            torch.manual_seed(3)
            got = pm(zp, *args[1:], **kwargs)
        zr = args[0].clone().requires_grad_(True)
        torch.manual_seed(3)
        ref = model(zr, *args[1:], **kwargs)
        if name == "none":  # (None, pair, pair): compare the tensors
            assert got[0] is None and ref[0] is None
            got, ref = torch.cat([got[1].flatten(), got[2].flatten()]), torch.cat([ref[1].flatten(), ref[2].flatten()])
        got.sum().backward()
        ref.sum().backward()
        got, ref = got.detach(), ref.detach()
        # relative to the reference's scale (the outer product mean divides by small counts)
        out[name] = {"err": float((got - ref).abs().max()) / max(float(ref.abs().max()), 1.0),
                     "gerr": float((zp.grad - zr.grad).abs().max()) / max(float(zr.grad.abs().max()), 1.0),
                     "tags": pm.input_tags, "warnings": [str(w.message) for w in wl]}
    return out


@pytest.mark.parametrize("world", [4, 9])
def test_foreign_spellings(world):
    for r in run_distributed(spellings_worker, world, timeout=300):
        for name, c in r.items():
            assert c["err"] < 1e-5 and c["gerr"] < 1e-5, (name, c)
        assert r["drop"]["tags"] == [(None, "r", "c", None)]
        assert not r["opm"]["warnings"], r["opm"]["warnings"]
        assert not [w for w in r["alias"]["warnings"] if "autocp" in w], r["alias"]["warnings"]
        assert not [w for w in r["pwa"]["warnings"] if "autocp" in w], r["pwa"]["warnings"]
        assert r["lens"]["tags"] == [(None, "r", "c", None), (None, "r")]
        gathers = [w for w in r["scan"]["warnings"] if "gather a pair tensor" in w]
        assert gathers and "O(N^2): the whole tensor" in gathers[0], r["scan"]["warnings"]
