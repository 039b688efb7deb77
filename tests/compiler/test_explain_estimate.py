"""explain()'s comm column against bytes counted by autocp.comm.count_comm() in a real
forward (gloo ranks, 2x2 and 3x3), and autocp.estimate(training=True) (forward + backward)
against the MemoryTracker-measured per-rank peak.

Comm convention (docs/compiler.md): a row's ``comm_per_rank[(r, c)]`` is the bytes rank
``(r, c)`` *sends* in one forward call of that op; the printed ``comm/call`` column and the
per-layer line are the max over ranks. The test checks every rank exactly (so the max too).
"""

import warnings

import pytest
import torch

from autocp.testing import run_distributed
from tests.compiler._workers import build_pairformer, pairformer_inputs

pytestmark = pytest.mark.distributed


def comm_worker(rank, world, n):
    """Per registered module: bytes this rank sent during its forward (hooks around the
    replaced module under count_comm), and the report's formula for this rank."""
    import autocp
    from autocp.api import parallelize
    from autocp.comm import count_comm
    from autocp.passes.explain import layer_comm

    mesh = autocp.init_mesh()
    model = build_pairformer(2, blocks=2).eval()
    inputs = pairformer_inputs(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = parallelize(model, mesh, example_inputs=inputs)
    measured, hooks = {}, []
    with count_comm() as st:
        for path, act in pm.plan.actions.items():
            mod = pm.get_submodule(path)

            def pre(m, a, path=path):
                measured[path] = -st.total_bytes

            def post(m, a, o, path=path):
                measured[path] += st.total_bytes

            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        with torch.no_grad():
            pm(*inputs, output="local")  # no gather at the end: only the ops' own traffic
        total = st.total_bytes
    for h in hooks:
        h.remove()
    rows = {r.path: r for r in pm.report.rows if r.action == "op"}
    return {
        "measured": measured,
        "formula": {p: r.comm_per_rank.get((mesh.r, mesh.c)) for p, r in rows.items()},
        "column": {p: r.comm_bytes for p, r in rows.items()},
        "layers": {k: v.get((mesh.r, mesh.c)) for k, v in layer_comm(pm.report).items()},
        "total": total,
        "text": pm.explain(),
    }


@pytest.mark.parametrize("world,n", [(4, 7), (9, 10)])  # N != channels (8)
def test_explain_comm_equals_counted_bytes(world, n):
    res = run_distributed(comm_worker, world, n, timeout=300)
    paths = sorted(res[0]["measured"])
    assert len(paths) == 10  # 2 blocks x (2 tri mult + 2 tri attn + pair-bias attn)
    for rank, r in enumerate(res):
        for p in paths:
            assert r["measured"][p] > 0, (rank, p)
            assert r["formula"][p] == r["measured"][p], (world, rank, p, r["formula"][p], r["measured"][p])
        # everything the forward sent is inside the registered ops
        assert sum(r["measured"].values()) == r["total"], (rank, r["total"])
        assert sum(r["layers"].values()) == r["total"]
    for p in paths:  # the printed column = max over ranks
        assert res[0]["column"][p] == max(r["measured"][p] for r in res), p
    assert "comm per layer (exact, bytes sent by the busiest rank" in res[0]["text"]
    print({p: [r["measured"][p] for r in res] for p in paths[:5]})
