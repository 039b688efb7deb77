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


def _inputs(n=7, c=8):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, n, n, c, generator=g)
    tok = torch.ones(1, n)
    tok[0, -2] = 0
    return z, tok[:, :, None] * tok[:, None, :]


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
    zr = z.clone().requires_grad_(True)
    ref = model(zr, mask)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    (ref * w).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    zp = z.clone().requires_grad_(True)
    out = pm(zp, mask)
    (out * w).sum().backward()
    scale = float(ref.abs().max())
    return {
        "out_err": float((out - ref).abs().max()) / scale,
        "in_grad_err": float((zp.grad - zr.grad).abs().max()) / float(zr.grad.abs().max()),
        "grad_err": max(float((p.grad - ref_grads[k]).abs().max()) / float(ref_grads[k].abs().max())
                        for k, p in pm.named_parameters()),
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
