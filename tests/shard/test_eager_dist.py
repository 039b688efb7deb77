"""Eager TileTensors (autocp.passes.eager): AF3-style glue with host-side control flow on
data (``if torch.any(...)``, ``.item()``) run op by op through the shard rules on 1x1,
2x2 and 3x3 (N=7, masked tokens), outputs and every parameter gradient vs single device;
strict mode refuses a gathering op with its source line."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed


class Glue(nn.Module):
    """Pair mask from a token mask, outer sum, relative positions with a data-dependent
    branch and a python int from .item(), one-hot, in-place transposed residual,
    LayerNorm, a triangle einsum, a masked mean over (i, j)."""

    def __init__(self, cs=8, cz=6):
        super().__init__()
        self.a, self.b = nn.Linear(cs, cz), nn.Linear(cs, cz)
        self.rel, self.ln, self.o = nn.Linear(11, cz), nn.LayerNorm(cz), nn.Linear(cz, 3)

    def forward(self, x, mask, res_idx, cyc):
        pm = mask[:, :, None] * mask[:, None, :]
        z = self.a(x)[:, :, None] + self.b(x)[:, None, :]
        d = res_idx[:, :, None] - res_idx[:, None, :]
        if torch.any(cyc > 0):
            d = d % 5
        k = int(cyc.max().item()) + 5
        oh = F.one_hot((d.clamp(-k, k) + 5).clamp(0, 10), 11).float()
        z = z + self.rel(oh)
        z += 0.5 * z.transpose(1, 2)
        z = self.ln(z) * pm[..., None]
        tri = torch.einsum("bikc,bjkc->bijc", z, z) / z.shape[1]
        logits = self.o(tri + z)
        agg = (logits * pm[..., None]).sum(dim=(1, 2)) / pm.sum(dim=(1, 2))[:, None]
        return logits, agg


def _inputs(n, cyclic):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, n, 8, generator=g)
    mask = (torch.rand(1, n, generator=g) > 0.25).float()
    cyc = torch.zeros(1, n)
    if cyclic:
        cyc[0, 2] = 3.0
    return x, mask, torch.arange(n)[None], cyc


def eager_worker(rank, world, n, cyclic):
    import torch.distributed as dist

    import autocp
    from autocp.passes.context import tile_context
    from autocp.passes.eager import distribute, eager_stats

    torch.manual_seed(0)
    m = Glue()
    for p in m.parameters():  # re-drawn: no vacuous parity
        torch.nn.init.normal_(p, std=0.5)
    x, mask, ri, cyc = _inputs(n, cyclic)
    ref_l, ref_a = m(x, mask, ri, cyc)
    w = torch.randn(ref_l.shape, generator=torch.Generator().manual_seed(2))
    ((ref_l * w).sum() + ref_a.sum()).backward()
    ref_g = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    mesh = autocp.init_mesh()
    with tile_context(mesh, n):
        lt, at = m(distribute(x, (None, "r", None)), distribute(mask, (None, "r")), distribute(ri, (None, "r")),
                   distribute(cyc, (None, "r")))
        kinds = (type(lt).__name__, getattr(lt, "tags", None), type(at).__name__)
        lf = lt.full()
        ((lf * w).sum() + at.sum()).div(mesh.p ** 2).backward()
    gerr = 0.0
    for k, p in m.named_parameters():
        g = p.grad.clone()
        if mesh.p > 1:
            dist.all_reduce(g)
        gerr = max(gerr, float((g - ref_g[k]).abs().max() / (ref_g[k].abs().max() + 1e-12)))
    oerr = max(float((lf - ref_l).abs().max() / ref_l.abs().max()), float((at - ref_a).abs().max() / ref_a.abs().max()))
    return oerr, gerr, kinds, eager_stats()["traced"]


@pytest.mark.parametrize("world", [1, 4, 9])
def test_eager_glue_matches_single_device(world):
    for cyclic in (False, True):
        for rank, (oerr, gerr, kinds, traced) in enumerate(run_distributed(eager_worker, world, 7, cyclic, timeout=600)):
            assert oerr < 1e-5 and gerr < 1e-4, (world, rank, cyclic, oerr, gerr)
            # the pair output stays a Pair2D TileTensor; the (i, j) mean comes back replicated (plain)
            assert kinds == ("TileTensor", (None, "r", "c", None), "Tensor"), kinds
            assert traced > 10


def strict_worker(rank, world):
    import autocp
    from autocp.passes.context import tile_context
    from autocp.passes.eager import EagerShardingError, distribute, strict_mode

    mesh = autocp.init_mesh()
    z0 = torch.randn(1, 7, 7, 4)
    with tile_context(mesh, 7):
        z = distribute(z0, (None, "r", "c", None))
        ok = torch.allclose(torch.cumsum(z, dim=1).full(), torch.cumsum(z0, dim=1), atol=1e-6)  # default: exact (gathered)
        try:
            with strict_mode():
                torch.cumsum(z, dim=1)  # no rule over a token axis
            msg = ""
        except EagerShardingError as e:
            msg = str(e)
    return ok, msg


def test_eager_strict_refuses_a_gather_naming_the_line():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_distributed(strict_worker, 4, timeout=300)
    for ok, msg in res:
        assert ok
        assert "cumsum" in msg and "Fix" in msg and "test_eager_dist.py" in msg, msg


def cdist_worker(rank, world):
    import autocp
    from autocp.passes.context import tile_context
    from autocp.passes.eager import TileTensor, distribute, strict_mode

    mesh, n = autocp.init_mesh(), 11
    torch.manual_seed(0)
    x, y = torch.randn(2, n, 3) * 5, torch.randn(2, n, 3)
    ref = torch.cdist(x, y)
    with tile_context(mesh, n), strict_mode(True):
        d = torch.cdist(distribute(x, (None, "r", None)), distribute(y, (None, "c", None)))
        bins = (d.unsqueeze(-1) > torch.linspace(0, 10, 5)).sum(-1)  # Boltz's distance bins stay tiles
        return (type(d).__name__, d.tags, float((d.full() - ref).abs().max()), bins.tags,
                bool((bins.full() == (ref.unsqueeze(-1) > torch.linspace(0, 10, 5)).sum(-1)).all()))


# torch.cdist of two token tensors is a pair tensor: each rank computes its [b, b] tile (it
# ran gathered, leaving a whole [N, N] -- and Boltz's distance-bin embedding of it,
# O(N^2 * C) -- on every rank of the confidence and template modules)
def test_cdist_of_token_tensors_is_a_pair_tile():
    for r in run_distributed(cdist_worker, 4, timeout=300):
        kind, tags, err, bin_tags, same = r
        assert kind == "TileTensor" and tags == (None, "r", "c") and bin_tags == (None, "r", "c"), r
        assert err < 1e-5 and same, r


def one_row_msa_worker(rank, world):
    import autocp
    from autocp.passes.context import tile_context
    from autocp.passes.eager import distribute, strict_mode

    mesh, n = autocp.init_mesh(), 11
    torch.manual_seed(0)
    msa = torch.nn.functional.one_hot(torch.randint(0, 33, (1, 1, n)), 33).float()
    dv = torch.rand(1, 1, n)
    with tile_context(mesh, n, 1), strict_mode(True):
        m = torch.cat([distribute(msa, (None, "s", "c", None)), distribute(dv, (None, "s", "c")).unsqueeze(-1)], -1)
        return m.tags, bool(torch.equal(m.full(), torch.cat([msa, dv.unsqueeze(-1)], -1)))


# an MSA of one sequence (`msa: empty`): its "s" axis has global length 1 and is no broadcast
# dim (Boltz-1's MSA features were gathered by torch.cat, refused under strict)
def test_cat_keeps_a_sharded_axis_of_length_one():
    for tags, same in run_distributed(one_row_msa_worker, 4, timeout=300):
        assert tags == (None, "s", "c", None) and same, (tags, same)
