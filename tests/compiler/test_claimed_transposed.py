"""A registered module called on a transposed pair (``tm(z.transpose(1, 2))``): both runtimes
hand its 2D op the argument in the op's standard layout (Pair2D of the argument: one
transpose exchange). The graph path used to hand it the transposed tiles as they were
(tags ``(c, r)``) and the op read them as Pair2D: relative error 0.41, no error."""

import pytest
import torch
from torch import nn

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed


class TransposedCall(nn.Module):
    def __init__(self):
        super().__init__()
        from boltz.model.layers.triangular_mult import TriangleMultiplicationOutgoing

        self.tm = TriangleMultiplicationOutgoing(8)

    def forward(self, z, pair_mask):
        return z + self.tm(z.transpose(1, 2), mask=pair_mask.transpose(1, 2)).transpose(1, 2)


def transposed_worker(rank, world):
    import autocp

    torch.manual_seed(0)
    model = TransposedCall()
    for p in model.parameters():  # Boltz zero-inits its output projections
        p.data.normal_(0, 0.3)
    z = torch.randn(1, 7, 7, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 7)
    mask[0, 5] = 0
    pm = mask[:, :, None] * mask[:, None, :]
    mesh = autocp.init_mesh()
    res = {}
    for emit in ("graph", "eager"):
        par = autocp.parallelize(model, mesh, example_inputs=(z, pm), emit=emit, strict=True)
        zp, zr = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        out, ref = par(zp, pm), model(zr, pm)
        out.sum().backward()
        ref.sum().backward()
        res[emit] = (float((out - ref).abs().max() / ref.abs().max()),
                     float((zp.grad - zr.grad).abs().max() / zr.grad.abs().max()),
                     [a.in_tags for p, a in par.plan.actions.items() if p == "tm"])
    return res


@pytest.mark.parametrize("world", [4, 9])
def test_registered_op_on_a_transposed_pair(world):
    for r in run_distributed(transposed_worker, world, timeout=300):
        for emit, (err, gerr, tags) in r.items():
            assert err < 1e-5 and gerr < 1e-5, (world, emit, err, gerr)
        assert r["graph"][2] == [[(None, "r", "c", None), (None, "r", "c")]], r["graph"][2]
