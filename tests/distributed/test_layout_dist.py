"""Layouts on real meshes (2x2, 3x3): shard/gather round trip, DTensor conversion both
ways, valid masks, and gather's gradient -- with N not divisible by p (and N=4 on 3x3,
where the last token block is all padding)."""

from __future__ import annotations

import pytest
import torch

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed


def _cases(n):
    from autocp import ColToken, MsaTiles, Pair2D, Replicated, RowToken

    s_msa = 5  # MSA depth, not divisible by 2 or 3
    return [
        ("Pair2D", Pair2D(), (2, n, n, 3), n),
        ("Pair2D-mask", Pair2D(), (2, n, n), n),
        ("RowToken", RowToken(), (2, n, 3), n),
        ("ColToken", ColToken(), (2, n, 3), n),
        ("RowToken-mask", RowToken(), (2, n), n),
        ("MsaTiles", MsaTiles(), (2, s_msa, n, 3), [s_msa, n]),
        ("Replicated", Replicated(), (2, n, 3), []),
    ]


def _full(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _expected_grad(name, layout, shape, mesh, world, sizes):
    """Grad of sum_q <gather_q(local), W_q> w.r.t. rank (r, c)'s local piece.

    gather on rank q reads every piece it gathers; the pieces that reach rank q are those
    of its column group (dims sharded by 'r'), its row group (dims sharded by 'c'), or
    both. Summing the W_q of every rank that reads this piece, then sharding, gives the
    reference.
    """
    p, r, c = mesh.p, mesh.r, mesh.c
    total = torch.zeros(shape, dtype=torch.float64)
    for q in range(world):
        qr, qc = divmod(q, p)
        reads = True  # Pair2D / MsaTiles: every rank gathers every tile
        if layout.axes == ("r",):  # gathered along the column: ranks with the same c
            reads = qc == c
        elif layout.axes == ("c",):
            reads = qr == r
        elif layout.axes == ():
            reads = q == mesh.rank
        if reads:
            total += _full(shape, 100 + q)
    return layout.shard(total, mesh)


def _layout_worker(rank, world, n):
    from torch.distributed.tensor import Replicate, distribute_tensor

    import autocp

    mesh = autocp.init_mesh()
    done = []
    for name, layout, shape, sizes in _cases(n):
        what = f"{name} {shape} p={mesh.p} ({mesh.r},{mesh.c})"
        full = _full(shape, 7)
        local = layout.shard(full, mesh)
        assert tuple(local.shape) == layout.local_shape(shape, mesh), what
        # padding is zero / masked
        if sizes != []:
            vm = layout.valid_mask(mesh, sizes, ndim=local.dim()).expand(local.shape)
            assert bool((local[~vm] == 0).all()), what
        # round trip
        back = layout.gather(local, mesh, sizes)
        assert torch.equal(back, full), f"{what}: gather(shard(x)) != x"
        # DTensor: ours -> DTensor -> full, and DTensor -> ours
        dt = layout.to_dtensor(local, mesh, sizes)
        assert list(dt.placements) == layout.placements(), what
        assert tuple(dt.shape) == shape, what
        assert torch.equal(dt.full_tensor(), full), f"{what}: to_dtensor(...).full_tensor() != full"
        dt2 = distribute_tensor(full, mesh.device_mesh, layout.placements())
        assert torch.equal(layout.from_dtensor(dt2, mesh), local), f"{what}: from_dtensor(distribute_tensor)"
        # from a DTensor in another placement (redistributed on the way in)
        dt3 = distribute_tensor(full, mesh.device_mesh, [Replicate(), Replicate()])
        assert torch.equal(layout.from_dtensor(dt3, mesh), local), f"{what}: from_dtensor(replicated)"
        # gather is differentiable: each rank's loss <gather(local), W_rank>
        leaf = local.detach().clone().requires_grad_(True)
        g = layout.gather(leaf, mesh, sizes)
        (g * _full(shape, 100 + rank)).sum().backward()
        want = _expected_grad(name, layout, shape, mesh, world, sizes)
        torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what} grad: {m}")
        done.append(name)
    return done


def _layouts_worker(rank, world, ns):
    return [_layout_worker(rank, world, n) for n in ns]


# N=4 on 3x3: b=2, blocks [0,2) [2,4) and an all-padding block
@pytest.mark.parametrize("world,ns", [(4, (5,)), (9, (7, 4))], ids=["2x2-N5", "3x3-N7-N4"])
def test_layout_round_trip_and_dtensor(world, ns):
    res = run_distributed(_layouts_worker, world, ns, timeout=150)
    assert res == [[[c[0] for c in _cases(n)] for n in ns]] * world
