"""Spellings found in public AF-like code that crashed the sharded graph, each on 2x2 and
3x3 against the single-device module (N = 7, not divisible by 2 or 3):

* dropout written ``torch.rand_like(v) > p`` (was a SyntaxError: the emitted graph named
  the python function ``torch.rand``): the mask is drawn at the global shape, so a fixed
  seed gives the single-device numbers (outputs and gradients);
* an integer ``amax`` / ``amin`` over a sharded token axis (a max over per-token lengths;
  was an overflow: the padding was filled with float ``-inf``);
* non-tensor keyword flags after the tensors (``use_kernels=False``) keep the layouts;
* a gather along both token axes says it is O(N^2) per rank (not O(N^2/p))."""

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


class WholeScan(nn.Module):
    """A cumulative sum over the flattened pair: needs the whole tensor on every rank."""

    def forward(self, z):
        return z.flatten(1, 2).cumsum(1).view(z.shape)


def spellings_worker(rank, world):
    import warnings

    import autocp

    mesh = autocp.init_mesh()
    n = 7
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, n, n, 4, generator=g)
    lens = torch.randint(1, 30, (1, n), generator=g)
    out = {}
    for name, model, args, kwargs in (("drop", RandDrop().train(), (z,), {"bias": None, "use_kernels": False}),
                                      ("lens", IntLengths(), (z, lens), {}), ("scan", WholeScan(), (z,), {}),
                                      ("none", NoneFirst(), (z,), {})):
        torch.manual_seed(0)
        for p in model.parameters():
            p.data.copy_(torch.randn(p.shape))
        with warnings.catch_warnings(record=True) as wl:
            warnings.simplefilter("always")
            pm = autocp.parallelize(model, mesh, example_inputs=(args, kwargs))
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
        out[name] = {"err": float((got - ref).abs().max()), "gerr": float((zp.grad - zr.grad).abs().max()),
                     "tags": pm.input_tags, "warnings": [str(w.message) for w in wl]}
    return out


@pytest.mark.parametrize("world", [4, 9])
def test_foreign_spellings(world):
    for r in run_distributed(spellings_worker, world, timeout=300):
        for name, c in r.items():
            assert c["err"] < 1e-5 and c["gerr"] < 1e-5, (name, c)
        assert r["drop"]["tags"] == [(None, "r", "c", None)]
        assert r["lens"]["tags"] == [(None, "r", "c", None), (None, "r")]
        gathers = [w for w in r["scan"]["warnings"] if "gather a pair tensor" in w]
        assert gathers and "O(N^2): the whole tensor" in gathers[0], r["scan"]["warnings"]
