"""Eager TileTensors split by atom windows (tags "w" / "a", autocp.ops.atom_windows):
channel ops that keep those dims run tile-local, anything else runs on the gathered
tensors (exact, warned) and a window tensor (atom pairs) is refused under strict."""

import warnings

import pytest
import torch

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed


def _worker(rank, world):
    import autocp
    from autocp.ops.atom_windows import WindowPlan
    from autocp.passes.context import tile_context
    from autocp.passes.eager import EagerShardingError, TileTensor, strict_mode

    mesh = autocp.init_mesh()
    torch.manual_seed(0)
    B, K, W, H, D = 1, 5, 32, 128, 3
    p = torch.randn(B, K, W, H, D)
    ln, lin = torch.nn.LayerNorm(D), torch.nn.Linear(D, 2, bias=False)
    ref = torch.cat([lin(ln(p)), lin(ln(p))], -1).float()
    plan = WindowPlan(mesh, K * W, W, H)
    out = {}
    with tile_context(mesh, 7), torch.no_grad():
        pt = TileTensor(plan.local_windows(p), (None, "w", None, None, None), p.shape)
        y = torch.cat([lin(ln(pt)), lin(ln(pt))], -1).float()
        out["local"] = isinstance(y, TileTensor) and y.tags == pt.tags and y.local.shape[1] == plan.kb
        out["err"] = float((y.full() - ref).abs().max())
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            s = pt.sum(1)  # reduces the window dim: no window-local rule -> gathered, exact
        out["gathered_ok"] = float((s - p.sum(1)).abs().max()) < 1e-4 and any("gathered" in str(r.message) for r in rec)
        try:
            with strict_mode():
                pt.sum(1)
            out["strict"] = False
        except EagerShardingError as e:
            out["strict"] = "atom-window" in str(e)
        q = torch.randn(B, K * W, D)
        qt = TileTensor(plan.local(q), (None, "a", None), q.shape)
        with strict_mode():  # an atom vector may be gathered (O(M)), even under strict
            out["atoms"] = float((qt.mean(1) - q.mean(1)).abs().max()) < 1e-5
    return out


@pytest.mark.parametrize("world", [1, 4, 9])
def test_atom_tiles_eager(world):
    for r in run_distributed(_worker, world):
        assert r["local"] and r["err"] < 1e-5 and r["gathered_ok"] and r["strict"] and r["atoms"], r
