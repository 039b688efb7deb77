"""The eager engine writes ``a + b`` / ``a * b`` into a redistributed operand when nothing
else reads it (``z + z.transpose(1, 2)``: the exchanged tile), never into the caller's tile:
on a diagonal rank the transpose exchange returns its input, so the write must not happen
there. Values and inputs checked on every rank of 1x1 / 2x2 / 3x3."""

import pytest
import torch

from autocp.testing import run_distributed


def _worker(rank, world, n):
    import autocp
    from autocp.passes.context import tile_context
    from autocp.passes.eager import distribute

    mesh = autocp.init_mesh()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, n, n, 3, generator=g)
    errs = []
    with tile_context(mesh, n, None), torch.no_grad():
        for f in (lambda x: x + x.transpose(1, 2), lambda x: x.transpose(1, 2) + x,
                  lambda x: x * x.transpose(1, 2), lambda x: (x + x.transpose(1, 2)) * 2):
            tz = distribute(z, (None, "r", "c", None))
            before = tz.local.clone()
            out = f(tz)
            errs.append((float((out.full() - f(z)).abs().max()), bool(torch.equal(tz.local, before))))
    return errs


@pytest.mark.parametrize("p,n", [(1, 5), (2, 7), (3, 8)])
def test_transpose_add_parity_and_inputs_untouched(p, n):
    for rank, errs in enumerate(run_distributed(_worker, p * p, n)):
        for k, (err, same) in enumerate(errs):
            assert err < 1e-6, (p, rank, k, err)
            assert same, (p, rank, k, "the input tile was written")
