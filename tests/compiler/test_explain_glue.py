"""explain() says what the glue really does: the sharding notes of the tile programs that
ran (gathers, exchanges, all-reduces) with bytes per rank and the model's source line, on
the captured path and on the eager engine alike -- and no planning guess.

The module below flattens the pair tensor for a Linear (``z.reshape(-1, C)``), which the
planning analysis once reported as an uncovered pair op "mixing token axes" although it runs
tile-local; the transpose-add is an exchange, the sum over a token axis an all-reduce, and
``cumsum`` (no rule) a gather of a pair tensor.
"""

import warnings

import pytest
import torch

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed

N, C = 10, 8


class Glue(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(C, C)

    def forward(self, z):
        b, n, _, c = z.shape
        y = self.lin(z.reshape(-1, c)).reshape(b, n, n, c)
        y = y + y.transpose(1, 2)  # LINE-EXCHANGE
        w = y.sum(dim=2)  # LINE-ALLREDUCE
        q = torch.cumsum(y, dim=1)  # LINE-GATHER
        return y * w[:, :, None, :] + q


class Local(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(C, C)

    def forward(self, z):
        return torch.relu(self.lin(z)) * 2.0


def glue_worker(rank, world, emit, cls):
    import autocp

    mesh = autocp.init_mesh()
    torch.manual_seed(0)
    model = {"Glue": Glue, "Local": Local}[cls]()
    z = torch.randn(1, N, N, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=(z,), emit=emit)
        out = pm(z)
    ref = model(z)
    return {"text": pm.explain(), "err": float((out - ref).abs().max()), "p": mesh.p}


def _line_of(tag: str) -> int:
    import inspect

    src, start = inspect.getsourcelines(Glue.forward)
    return start + next(i for i, ln in enumerate(src) if tag in ln)


@pytest.mark.parametrize("emit", ["graph", "eager"])
def test_explain_lists_what_the_glue_runs(emit):
    res = run_distributed(glue_worker, 4, emit, "Glue")
    for r in res:
        assert r["err"] < 1e-5
    text = res[0]["text"]
    assert "mixes token axes" not in text and "uncovered" not in text  # no planning guess
    lines = text.splitlines()
    head = next(ln for ln in lines if ln.startswith("glue"))
    assert "1 gather" in head and "1 exchange" in head and "1 all-reduce" in head, head
    assert "1 gather(s) of a pair tensor" in head, head
    b = (N + 1) // 2  # the tile side on 2x2

    def row(kind):
        return next(ln for ln in lines if ln.strip().startswith(kind))

    exch, ar, ga = row("exchange"), row("all-reduce"), row("gather")
    assert f"[{b * b * C * 4} B/rank]" in exch, exch  # the [1, 5, 5, 8] fp32 tile sent
    assert f"[{b * C * 4} B/rank]" in ar, ar  # the [1, 5, 8] row sums
    assert "cumsum" in ga and "O(N^2/p)" in ga, ga
    fname = "test_explain_glue.py"
    assert f"{fname}:{_line_of('LINE-EXCHANGE')}:" in exch, exch
    assert f"{fname}:{_line_of('LINE-ALLREDUCE')}:" in ar, ar
    assert f"{fname}:{_line_of('LINE-GATHER')}:" in ga, ga


def test_explain_says_when_the_glue_is_local():
    res = run_distributed(glue_worker, 4, "graph", "Local")
    assert res[0]["err"] < 1e-5
    assert "every op tile-local" in res[0]["text"], res[0]["text"]
