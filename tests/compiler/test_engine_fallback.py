"""A block whose python cannot be captured runs on the eager engine, exactly.

``StdGuardTriMul`` is a triangle update with a python branch on a global statistic (the
``if a_std != 0 and b_std != 0:`` rescale guard of openfold-style triangle updates):
``torch.export`` refuses it (data-dependent), so ``parallelize`` warns, naming module and
line, and runs the model's own python on TileTensors. Under ``strict=True`` (a pair
gather would raise) the outputs, the input gradient and every parameter gradient equal
the single-device ones on 1x1, 2x2 and 3x3, N = 7 (not divisible by 2 or 3), with a
masked token and re-drawn weights."""

import pytest
import torch
from torch import nn

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed


class StdGuardTriMul(nn.Module):
    def __init__(self, c=8, h=6):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.pa = nn.Linear(c, h)
        self.pb = nn.Linear(c, h)
        self.g = nn.Linear(c, c)
        self.out = nn.Linear(h, c)
        self.norm_out = nn.LayerNorm(h)

    def forward(self, z, mask):
        x = self.norm(z)
        a = self.pa(x) * mask[..., None]
        b = self.pb(x) * mask[..., None]
        a_std, b_std = a.std(), b.std()
        if a_std != 0 and b_std != 0:  # a branch on a value: not capturable
            a = a / a_std
            b = b / b_std
        p = torch.einsum("bikc,bjkc->bijc", a, b)
        return z + torch.sigmoid(self.g(x)) * self.out(self.norm_out(p))


class FeatDict(nn.Module):
    """A model that takes one feature dict, as AF3-like models do, with an ``if not
    mask.any()`` guard (not capturable) and an outer sum of token features (a layout
    conversion in the glue)."""

    def __init__(self):
        super().__init__()
        self.lin_s = nn.Linear(3, 4)
        self.lin_z = nn.Linear(4, 4)

    def forward(self, feats):
        z, s, mask = feats["pair"], feats["single"], feats["token_mask"]
        if not mask.any():
            return z
        e = self.lin_s(s)
        z = z + e[:, :, None] + e[:, None, :]
        return self.lin_z(z) * (mask[:, :, None] * mask[:, None, :])[..., None]


class WithIslands(nn.Module):
    """An uncapturable top level (``if not mask.any()``) around a capturable triangle
    attention (af3like ``RowAttention``, matmul + permutes + masked_fill: run as autocp's
    ring attention only when captured as a unit) and the uncapturable ``StdGuardTriMul``."""

    def __init__(self):
        from tests.compiler.af3like import RowAttention

        super().__init__()
        self.tri = StdGuardTriMul()
        self.att = RowAttention(8, 2, 4)

    def forward(self, z, mask):
        if not mask.any():
            return z
        pair_mask = mask[:, :, None] * mask[:, None, :]
        z = self.tri(z, pair_mask)
        return z + self.att(z, pair_mask)


def _inputs(n=7, c=8):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, n, n, c, generator=g)
    tok = torch.ones(1, n)
    tok[0, -2] = 0
    return z, tok[:, :, None] * tok[:, None, :]


def _parity(model, pm, z, other, w):
    """``model`` and ``pm`` on ``(z, other)``, loss ``sum(out * w)``: relative errors of the
    output, of z's gradient and (max) of every parameter gradient."""
    def rel(a, b):
        return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)

    zr = z.clone().requires_grad_(True)
    ref = model(zr, other)
    (ref * w).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    zp = z.clone().requires_grad_(True)
    out = pm(zp, other)
    (out * w).sum().backward()
    return {"out_err": rel(out.detach(), ref.detach()), "in_grad_err": rel(zp.grad, zr.grad),
            "grad_err": max(rel(p.grad, grads[k]) for k, p in pm.named_parameters())}


def engine_worker(rank, world):
    import warnings

    import autocp
    from autocp.api import parallelize

    mesh = autocp.init_mesh()
    torch.manual_seed(0)
    model = StdGuardTriMul()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    z, mask = _inputs()
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        pm = parallelize(model, mesh, example_inputs=(z, mask), strict=True)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    first = _parity(model, pm, z, mask, w)
    # a feature dict with per-key layouts (input_layouts mirrors the argument)
    from autocp.layout import Pair2D, RowToken

    fd = FeatDict()
    g = torch.Generator().manual_seed(5)
    feats = {"pair": torch.randn(1, 7, 7, 4, generator=g), "single": torch.randn(1, 7, 3, generator=g),
             "token_mask": torch.tensor([[1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)}
    with warnings.catch_warnings(record=True) as wl2:
        warnings.simplefilter("always")
        pf = parallelize(fd, mesh, example_inputs=((feats,), {}), strict=True,
                         input_layouts={"feats": {"pair": Pair2D(), "single": RowToken(), "token_mask": RowToken()}})
    fr = dict(feats, single=feats["single"].clone().requires_grad_(True))
    ref2 = fd(fr)
    (ref2 * ref2).sum().backward()
    fref = {k: p.grad.clone() for k, p in fd.named_parameters()}
    fd.zero_grad()
    fp = dict(feats, single=feats["single"].clone().requires_grad_(True))
    out2 = pf(fp)
    (out2 * out2).sum().backward()
    # islands: the triangle attention captured alone (its ring, no gather under strict), the
    # triangle update op by op; parameter gradients complete
    wi = WithIslands()
    with torch.no_grad():
        for p in wi.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    tok = torch.tensor([[1.0, 1, 1, 1, 1, 0, 1]])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pw = parallelize(wi, mesh, example_inputs=(z, tok), strict=True)
    return {
        **first,
        **{f"isl_{k}": v for k, v in _parity(wi, pw, z, tok, w).items()},
        "isl_explain": pw.explain(),
        "dict_out_err": float((out2 - ref2).abs().max()) / float(ref2.abs().max()),
        "dict_in_grad_err": float((fp["single"].grad - fr["single"].grad).abs().max()),
        "dict_grad_err": max(float((p.grad - fref[k]).abs().max()) / float(fref[k].abs().max())
                             for k, p in pf.named_parameters()),
        "dict_warnings": [str(x.message) for x in wl2],
        "dict_input_tags": pf.input_tags,
        "warnings": [str(x.message) for x in wl],
        "explain": pm.explain(),
        "actions": sorted(a.action for a in pm.plan.actions.values()),
    }


@pytest.mark.parametrize("world", [1, 4, 9])
def test_uncapturable_block_runs_on_engine_exactly(world):
    for r in run_distributed(engine_worker, world, timeout=300):
        assert r["out_err"] < 1e-5 and r["in_grad_err"] < 1e-4 and r["grad_err"] < 1e-4, r
        eng = [w for w in r["warnings"] if "eager engine" in w]
        assert len(eng) == 1, r["warnings"]
        assert "test_engine_fallback.py" in eng[0] and "if a_std != 0" in eng[0]  # module and line named
        assert not [w for w in r["warnings"] if "gather" in w], r["warnings"]  # strict: no pair gather
        assert "eager engine" in r["explain"] and r["actions"] == ["eager"]
        assert r["dict_out_err"] < 1e-5 and r["dict_in_grad_err"] < 1e-4 and r["dict_grad_err"] < 1e-4, r
        assert r["isl_out_err"] < 1e-5 and r["isl_in_grad_err"] < 1e-4 and r["isl_grad_err"] < 1e-4, r
        assert "att: captured" in r["isl_explain"] and "tri: eager (capture failed" in r["isl_explain"], \
            r["isl_explain"]
        assert r["dict_input_tags"] == [(None, "r", "c", None), (None, "r", None), (None, "r")]
        assert any("if not mask.any()" in w for w in r["dict_warnings"]), r["dict_warnings"]
        assert not [w for w in r["dict_warnings"] if "gather" in w], r["dict_warnings"]


def test_input_layouts_mirror_the_argument():
    """Bad per-key layouts are refused with given / required / fix."""
    from autocp.layout import Pair2D
    from autocp.passes.pipeline import resolve_input_tags

    feats = {"pair": torch.zeros(1, 5, 5, 4), "single": torch.zeros(1, 5, 3)}
    tags, n = resolve_input_tags(FeatDict(), (feats,), {}, {"feats": {"pair": Pair2D()}})
    assert n == 5 and tags == [(None, "r", "c", None), (None, None, None)]
    for bad, words in [({"feats": {"pairs": Pair2D()}}, "not have"), ({"feats": Pair2D()}, "one per tensor"),
                       ({"feats": {"pair": "Pair2D"}}, "required a Layout")]:
        with pytest.raises(ValueError) as ei:
            resolve_input_tags(FeatDict(), (feats,), {}, bad)
        assert words in str(ei.value) and "Fix" in str(ei.value), str(ei.value)
