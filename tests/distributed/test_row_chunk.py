"""``RowChunked``: Boltz's pair glue modules (contact conditioning, pairwise conditioning,
relative position encoding) run on blocks of their tiles give the single-device outputs
(and gradients) on 1x1, 2x2 and 3x3, N not divisible by p, blocks smaller than the tile;
a module that is not block-local (a transpose, a reduction over tokens, a branch on a
value) is detected and runs through the engine instead, still exact."""

import pytest
import torch
from torch import nn

from autocp.testing import run_distributed

pytest.importorskip("boltz.model.modules.encodersv2")


class Transposed(nn.Module):
    """``z + z^T``: not block-local (the mirrored tile is needed)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, z):
        return self.lin(z + z.transpose(1, 2))


class RowSoftmax(nn.Module):
    """A softmax over the key tokens: a reduction across the tile's columns."""

    def forward(self, z, mask):
        return torch.softmax(z + mask[:, None, :, None], dim=2)


class Branchy(nn.Module):
    """A python branch on a token vector's values (as Boltz's cyclic-period check): taken on
    the whole vector, then every block follows it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, feats):
        z = feats["z"]
        if torch.any(feats["mask"] > 5):
            z = z * 2
        return self.lin(z)


class PairBranch(nn.Module):
    """A python branch on a pair tensor's values: not provable per block (engine)."""

    def forward(self, z):
        return z * 2 if z.std() > 0.5 else z


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cc = torch.zeros(1, n, n, 5)
    cc.view(-1, 5)[torch.arange(n * n), torch.randint(0, 5, (n * n,), generator=g)] = 1
    feats = {
        "contact_conditioning": cc,
        "contact_threshold": torch.rand(1, n, n, generator=g) * 20,
        "asym_id": torch.randint(0, 3, (1, n), generator=g),
        "residue_index": torch.randint(0, 40, (1, n), generator=g),
        "entity_id": torch.randint(0, 2, (1, n), generator=g),
        "token_index": torch.arange(n)[None],
        "sym_id": torch.randint(0, 2, (1, n), generator=g),
        # cyclic only at the last tokens: most blocks see none, the whole vector some
        "cyclic_period": (torch.arange(n) >= n - 3).float()[None] * 7,
        "token_pad_mask": (torch.arange(n) < n - 2).float()[None],
    }
    z = torch.randn(1, n, n, 8, generator=g)
    rel = torch.randn(1, n, n, 8, generator=g)
    return feats, z, rel


def _modules(seed=0):
    from boltz.model.modules.encodersv2 import PairwiseConditioning, RelativePositionEncoder
    from boltz.model.modules.trunkv2 import ContactConditioning

    torch.manual_seed(seed)
    mods = {"contact": ContactConditioning(8, 4.0, 20.0), "pairwise": PairwiseConditioning(8, 8),
            "relpos": RelativePositionEncoder(8, fix_sym_check=True, cyclic_pos_enc=True),
            "transposed": Transposed(), "softmax": RowSoftmax(), "branchy": Branchy(), "pairbranch": PairBranch()}
    for m in mods.values():
        for q in m.parameters():
            nn.init.normal_(q, std=0.5)  # Boltz zero-inits some: re-draw all
    return mods


def _call(name, m, feats, z, rel):
    if name in ("contact", "relpos"):
        return m(feats)
    if name == "pairwise":
        return m(z, rel)
    if name == "transposed":
        return m(z[..., :4])
    if name == "softmax":
        return m(z, feats["token_pad_mask"])
    if name == "pairbranch":
        return m(z)
    return m({"z": z[..., :4], "mask": feats["residue_index"]})


def _worker(rank, world, n, chunk):
    import autocp
    from autocp.models.boltz_e2e import feature_tags
    from autocp.passes.context import tile_context
    from autocp.passes.eager import TileTensor, distribute
    from autocp.passes.row_chunk import RowChunked

    mesh = autocp.init_mesh()
    feats, z, rel = _inputs(n)
    mods = _modules()
    out = {}
    with tile_context(mesh, n, None):
        tf = {k: distribute(v, feature_tags(k, v, n)) for k, v in feats.items()}
        tz = distribute(z.clone().requires_grad_(True), (None, "r", "c", None))
        trel = distribute(rel, (None, "r", "c", None))
        for name, m in mods.items():
            ref = _call(name, m, feats, z, rel)
            w = RowChunked(m, mesh, chunk_elems=chunk)
            got = _call(name, w, tf, tz, trel)
            assert isinstance(got, TileTensor), (name, type(got))
            full = got.full()
            err = float((full - ref).abs().max())
            # backward through the blocks: d sum(out * g) / dz, this rank's tile vs the reference's
            gerr = None
            if name in ("pairwise", "transposed", "softmax"):
                zz = z.clone().requires_grad_(True)
                g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
                ref_g = torch.autograd.grad((_call(name, m, feats, zz, rel) * g).sum(), zz)[0]
                zl = distribute(z, (None, "r", "c", None)).local.clone().requires_grad_(True)
                got2 = _call(name, w, tf, TileTensor(zl, (None, "r", "c", None), z.shape), trel)
                gl = distribute(g, got2.tags).local
                dz = torch.autograd.grad((got2.local * gl).sum(), zl)[0]
                want = distribute(ref_g, (None, "r", "c", None)).local
                gerr = float((dz - want).abs().max())
            out[name] = (err, gerr, dict(w.stats))
    return out


@pytest.mark.parametrize("p,n,chunk", [(1, 7, 9), (2, 9, 6), (3, 11, 4)])
def test_row_chunked_parity(p, n, chunk):
    res = run_distributed(_worker, p * p, n, chunk)
    for rank, per in enumerate(res):
        for name, (err, gerr, stats) in per.items():
            assert err < 1e-5, (p, rank, name, err)
            assert gerr is None or gerr < 1e-5, (p, rank, name, gerr)
            blocked = {"contact": "rows", "pairwise": "rows", "relpos": "outer", "branchy": "rows"}.get(name)
            if blocked:
                assert stats[blocked] >= 1 and stats["engine"] == 0, (name, stats)
            else:
                assert stats["rows"] == stats["outer"] == 0 and stats["engine"] >= 1, (name, stats)


def test_map_rows_matches_whole_call():
    from autocp.passes.row_chunk import map_rows

    torch.manual_seed(0)
    f = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 3))
    x = torch.randn(2, 9, 5, 6, dtype=torch.bfloat16)
    ref = f(x.float())
    for chunk in (1, 7, 45, 10_000):
        got = map_rows(lambda b: f(b.float()), x, dim=1, chunk_elems=chunk)
        assert torch.equal(got, ref), chunk
    xg = x.float().requires_grad_(True)
    g = torch.autograd.grad(map_rows(f, xg, chunk_elems=7).square().sum(), xg)[0]
    xr = x.float().requires_grad_(True)
    assert torch.allclose(g, torch.autograd.grad(f(xr).square().sum(), xr)[0], atol=1e-6)
