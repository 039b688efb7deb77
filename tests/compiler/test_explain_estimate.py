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
    local = sorted(p for p in res[0]["measured"] if p.rsplit(".", 1)[-1].startswith("transition"))
    assert len(local) == 4  # 2 blocks x (transition_z, transition_s): registered for memory, no comm
    assert all(r["measured"][p] == 0 for r in res for p in local)
    paths = sorted(p for p in res[0]["measured"] if p not in local)
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


def train_memory_worker(rank, world, n, cs=16, cz=16):
    """Measured per-rank peak (params + local inputs + live tensors incl. parameter grads)
    of one training step: forward on local tiles, sum of the outputs, backward."""
    import autocp
    from autocp.api import parallelize
    from autocp.layout import Pair2D, RowToken
    from autocp.memory import MemoryTracker
    from autocp.passes.context import tile_context

    mesh = autocp.init_mesh()
    model = build_pairformer(2, blocks=2, cs=cs, cz=cz).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = parallelize(model, mesh, example_inputs=pairformer_inputs(max(2 * mesh.p, 6), cs=cs, cz=cz))
    pm.train()
    s, z, mask, pair_mask = pairformer_inputs(n, cs=cs, cz=cz)
    loc = [RowToken().shard(s, mesh).clone(), Pair2D().shard(z, mesh).clone(),
           RowToken().shard(mask, mesh).clone(), Pair2D().shard(pair_mask, mesh).clone()]
    runner = pm._graph_for((s, z, mask, pair_mask), {}, n, None)  # the sharded tile program pm runs at N
    del s, z, mask, pair_mask
    with MemoryTracker(track=[*model.parameters(), *loc]) as mt:
        with tile_context(mesh, n):
            out = runner(loc, {})
            loss = sum(o.float().sum() for o in out)
            del out
            loss.backward()
    return mt.peak_bytes


TRAIN_POINTS = [(20, 1), (20, 4), (21, 9)]


def test_estimate_training_within_15_percent_of_measured():
    from autocp.api import estimate

    ratios = {}
    for n, world in TRAIN_POINTS:
        p = int(world ** 0.5)
        model = build_pairformer(2, blocks=2, cs=16, cz=16).train()
        est = estimate(model, n_tokens=n, mesh_shape=(p, p), backward=True)
        assert est.backward and all(q.grad is None for q in model.parameters())  # no fake grads left behind
        measured = max(run_distributed(train_memory_worker, world, n, timeout=300))
        ratios[(n, world)] = est.peak_bytes / measured
        print(f"train N={n} P={world}: estimate {est.peak_bytes} B, measured {measured} B, "
              f"ratio {ratios[(n, world)]:.3f}")
    for k, r in ratios.items():
        assert 0.85 <= r <= 1.15, (k, r, ratios)


def test_smallest_mesh_that_fits_training():
    from autocp.api import estimate

    model = build_pairformer(2, blocks=2, cs=16, cz=16).train()
    peaks = {p: estimate(model, n_tokens=30, mesh_shape=(p, p), backward=True).peak_bytes for p in (1, 2, 3)}
    assert peaks[1] > peaks[2] > peaks[3], peaks  # more ranks, less per rank
    est = estimate(model, n_tokens=30, mesh_shape=(1, 1), backward=True, device_bytes=peaks[2])
    assert est.fits == (2, 2), (est.fits, peaks)  # 1x1 does not fit, 2x2 does: the smallest
    assert "smallest mesh that fits: 2x2" in str(est)
    none = estimate(model, n_tokens=30, backward=True, device_bytes=1, max_p=2)
    assert none.fits is None
