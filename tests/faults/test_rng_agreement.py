"""Random draws must agree across the mesh (every rank holds the same sample): a model that
draws random numbers while the ranks' generators differ (seeded per rank, as data loaders
often are) is warned after the call (once), naming the ranks and the fix -- a warning, not
an error, since a draw whose value cannot matter (a dropout mask at rate 0) is common; a
model that draws nothing is not warned; equal seeds give the single-device numbers."""

import pytest
import torch
from torch import nn

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed


class Noisy(nn.Module):
    """Adds noise drawn in its python, as a diffusion sampler does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, z):
        return self.lin(z) + torch.randn(z.shape[-1])


def rng_worker(rank, world):
    import random

    import warnings

    import autocp

    mesh = autocp.init_mesh()
    z = torch.randn(1, 7, 7, 4, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, model in (("noisy", Noisy()), ("plain", nn.Sequential(nn.Linear(4, 4)))):
        torch.manual_seed(0)
        pm = autocp.parallelize(model, mesh, example_inputs=(z,))
        torch.manual_seed(100 + rank)  # per-rank seeds
        random.seed(rank)
        with warnings.catch_warnings(record=True) as wl:
            warnings.simplefilter("always")
            pm(z)
        out[name + "_per_rank"] = " ".join(str(w.message) for w in wl if "random" in str(w.message)) or "ran"
        torch.manual_seed(7)
        random.seed(7)
        got = pm(z)
        torch.manual_seed(7)
        ref = model(z)
        out[name + "_same_err"] = float((got - ref).abs().max())
    return out


def test_per_rank_seeds_with_random_draws_raise():
    for r in run_distributed(rng_worker, 4, timeout=300):
        assert "drew random numbers" in r["noisy_per_rank"] and "Fix" in r["noisy_per_rank"], r
        assert r["plain_per_rank"] == "ran", r
        assert r["noisy_same_err"] < 1e-6 and r["plain_same_err"] < 1e-6, r
