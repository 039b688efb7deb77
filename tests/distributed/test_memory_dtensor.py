"""MemoryTracker counts a DTensor at its *local* bytes (the shard this rank holds), for
tracked inputs and for DTensors created inside the block."""

from __future__ import annotations

from autocp.testing import run_distributed


def _worker(rank, world):
    import torch
    from torch.distributed.tensor import DTensor, Shard

    import autocp
    from autocp.memory import MemoryTracker

    dm = autocp.SquareMesh.from_any(autocp.init_mesh()).device_mesh
    local = torch.randn(5, 10)  # 200 B here; the global tensor is 4x that on 2x2
    dt = DTensor.from_local(local, dm, [Shard(0), Shard(1)], run_check=False)
    assert tuple(dt.shape) == (10, 20)
    with MemoryTracker(track=[dt]) as mt:
        tracked = mt.live_bytes
        out = dt * 2.0  # a DTensor output: a new 200 B local tensor
        after = mt.live_bytes
        del out
    with MemoryTracker() as mt2:
        made = DTensor.from_local(torch.ones(3, 4), dm, [Shard(0), Shard(1)], run_check=False)
        made_bytes = mt2.live_bytes
        del made
    return {"tracked": tracked, "after": after, "peak": mt.peak_bytes, "made": made_bytes}


def test_dtensor_counted_at_local_size():
    res = run_distributed(_worker, 4, timeout=120)
    for r in res:
        assert r["tracked"] == 200, r  # not 800 (the global size)
        assert r["after"] == 400 and r["peak"] == 400, r
        assert r["made"] == 48, r
