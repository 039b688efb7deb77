"""Every differentiable comm primitive against a single-process reference.

For each mesh (1x1, 2x2, 3x3), dtype (fp32, bf16) and a token count N that is not a
multiple of p, every rank shards the same full ``X[B, N, N, C]`` with ``Pair2D``, applies
the primitive to its tile and checks

* forward: the result equals what the reference (slices of the zero-padded full tensor,
  written here independently of ``autocp.layout``) says that rank must hold;
* backward: the gradient of ``sum_ranks <out_rank, G_rank>`` (``G_rank`` a random upstream
  gradient every rank can regenerate) w.r.t. the tile equals the tile of the gradient
  that autograd computes for the same loss on the full tensor in one process;
* comm counters: bytes sent by this rank equal the analytic volume.

Pure data movement must be bit-exact (also in bf16); sums are compared with a
tolerance (bf16 sums depend on the reduction order).
"""

from __future__ import annotations

import pytest
import torch

from autocp import comm
from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed

B = 2


def _n_for(p: int) -> int:
    # not divisible by p for p > 1, with a padded last block
    return {1: 5, 2: 5, 3: 7}[p]


# ----------------------------------------------------------------------------- reference
def _pad_full(X: torch.Tensor, p: int) -> torch.Tensor:
    n = X.shape[1]
    b = -(-n // p)
    Xp = X.new_zeros(X.shape[0], p * b, p * b, *X.shape[3:])
    Xp[:, :n, :n] = X
    return Xp


def _tile(Xp: torch.Tensor, p: int, r: int, c: int) -> torch.Tensor:
    b = Xp.shape[1] // p
    r, c = r % p, c % p
    return Xp[:, r * b:(r + 1) * b, c * b:(c + 1) * b]


def _ref(prim: str, Xp: torch.Tensor, p: int, r: int, c: int) -> torch.Tensor:
    """What rank (r, c) must hold after ``prim`` applied to the Pair2D tiles of Xp."""
    b = Xp.shape[1] // p
    if prim == "transpose":
        return _tile(Xp, p, c, r)
    if prim == "ring_row_1":
        return _tile(Xp, p, r, c + 1)
    if prim == "ring_col_1":
        return _tile(Xp, p, r + 1, c)
    if prim == "ring_row_neg1":
        return _tile(Xp, p, r, c - 1)
    if prim == "ring_col_p_plus_2":
        return _tile(Xp, p, r + p + 2, c)
    if prim == "ring_row_skew_r":  # Cannon skew of A: k = r along the row
        return _tile(Xp, p, r, c + r)
    if prim == "ring_col_skew_c":  # Cannon skew of B: k = c along the column
        return _tile(Xp, p, r + c, c)
    if prim == "allreduce_row":
        return sum(_tile(Xp, p, r, cc) for cc in range(p))
    if prim == "allreduce_col":
        return sum(_tile(Xp, p, rr, c) for rr in range(p))
    if prim == "allgather_row_d2":
        return Xp[:, r * b:(r + 1) * b, :]
    if prim == "allgather_col_d1":
        return Xp[:, :, c * b:(c + 1) * b]
    if prim == "allgather_col_dneg3":  # negative dim is normalised
        return Xp[:, :, c * b:(c + 1) * b]
    C = Xp.shape[-1]
    m = C // p
    if prim == "reducescatter_row_d3":
        return sum(_tile(Xp, p, r, cc) for cc in range(p))[..., c * m:(c + 1) * m]
    if prim == "reducescatter_col_dneg1":
        return sum(_tile(Xp, p, rr, c) for rr in range(p))[..., r * m:(r + 1) * m]
    raise KeyError(prim)


def _apply(prim: str, x: torch.Tensor, mesh) -> torch.Tensor:
    p, r, c = mesh.p, mesh.r, mesh.c
    table = {
        "transpose": lambda: comm.transpose_exchange(x, mesh),
        "ring_row_1": lambda: comm.ring_shift(x, mesh, "row", 1),
        "ring_col_1": lambda: comm.ring_shift(x, mesh, "col", 1),
        "ring_row_neg1": lambda: comm.ring_shift(x, mesh, "row", -1),
        "ring_col_p_plus_2": lambda: comm.ring_shift(x, mesh, "col", p + 2),
        "ring_row_skew_r": lambda: comm.ring_shift(x, mesh, "row", r),
        "ring_col_skew_c": lambda: comm.ring_shift(x, mesh, "col", c),
        "allreduce_row": lambda: comm.all_reduce(x, mesh, "row"),
        "allreduce_col": lambda: comm.all_reduce(x, mesh, "col"),
        "allgather_row_d2": lambda: comm.all_gather_axis(x, mesh, "row", 2),
        "allgather_col_d1": lambda: comm.all_gather_axis(x, mesh, "col", 1),
        "allgather_col_dneg3": lambda: comm.all_gather_axis(x, mesh, "col", -3),
        "reducescatter_row_d3": lambda: comm.reduce_scatter_axis(x, mesh, "row", 3),
        "reducescatter_col_dneg1": lambda: comm.reduce_scatter_axis(x, mesh, "col", -1),
    }
    return table[prim]()


PRIMS = [
    "transpose",
    "ring_row_1",
    "ring_col_1",
    "ring_row_neg1",
    "ring_col_p_plus_2",
    "ring_row_skew_r",
    "ring_col_skew_c",
    "allreduce_row",
    "allreduce_col",
    "allgather_row_d2",
    "allgather_col_d1",
    "allgather_col_dneg3",
    "reducescatter_row_d3",
    "reducescatter_col_dneg1",
]
# which results are pure data movement (bit-exact) and which are sums (tolerance)
EXACT_FWD = {p for p in PRIMS if p.startswith(("transpose", "ring", "allgather"))}
EXACT_BWD = {p for p in PRIMS if p.startswith(("transpose", "ring", "reducescatter"))}


def _upstream(shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _close(got, want, exact, dtype, what):
    if exact:
        assert got.dtype == want.dtype and torch.equal(got, want), (
            f"{what}: expected bit-exact equality, max |diff| = "
            f"{(got.double() - want.double()).abs().max().item() if got.shape == want.shape else 'shape ' + str((tuple(got.shape), tuple(want.shape)))}"
        )
    else:
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got.double(), want.double(), **tol, msg=lambda m: f"{what}: {m}")


def _expected_bytes(prim, mesh, tile_bytes):
    """Bytes this rank sends for the forward of ``prim`` (backward sends the same)."""
    p, r, c = mesh.p, mesh.r, mesh.c
    if p == 1:
        return 0
    k = {"ring_row_1": 1, "ring_col_1": 1, "ring_row_neg1": -1, "ring_col_p_plus_2": p + 2,
         "ring_row_skew_r": r, "ring_col_skew_c": c}
    if prim == "transpose":
        return 0 if r == c else tile_bytes
    if prim in k:
        return 0 if k[prim] % p == 0 else tile_bytes
    if prim.startswith("allreduce"):
        return 2 * (p - 1) * tile_bytes // p
    if prim.startswith("allgather"):
        return (p - 1) * tile_bytes
    if prim.startswith("reducescatter"):
        return (p - 1) * tile_bytes // p
    raise KeyError(prim)


def _comm_worker(rank, world, n, perm=None):
    import autocp
    from autocp import Pair2D

    if perm is None:
        mesh = autocp.init_mesh()
    else:  # a DeviceMesh whose ranks are not in row-major order
        from torch.distributed.device_mesh import DeviceMesh

        mesh = autocp.SquareMesh(DeviceMesh("cpu", torch.tensor(perm)))
    p, r, c = mesh.p, mesh.r, mesh.c
    checks = 0
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(1234)
        X = torch.randn(B, n, n, 2 * p, generator=gen).to(dtype)
        Xp = _pad_full(X, p)
        shard = Pair2D().shard(X, mesh)
        assert torch.equal(shard, _tile(Xp, p, r, c)), "Pair2D.shard disagrees with the reference tile"
        tile_bytes = shard.numel() * shard.element_size()
        for i, prim in enumerate(PRIMS):
            what = f"{prim} {dtype} p={p} N={n} rank {rank}=({r},{c})"
            # ---- single-process reference on the full (padded) tensor
            Xf = Xp.detach().clone().requires_grad_(True)
            loss = 0
            for rr in range(p):
                for cc in range(p):
                    out_rc = _ref(prim, Xf, p, rr, cc)
                    g_rc = _upstream(out_rc.shape, dtype, seed=10_000 * i + 100 * rr + cc)
                    loss = loss + (out_rc.double() * g_rc.double()).sum()
            loss.backward()
            want_out = _ref(prim, Xp, p, r, c)
            want_grad = _tile(Xf.grad, p, r, c)
            # ---- distributed
            x = shard.detach().clone().requires_grad_(True)
            with comm.count_comm() as fwd:
                y = _apply(prim, x, mesh)
            _close(y.detach(), want_out, prim in EXACT_FWD, dtype, what + " forward")
            g = _upstream(y.shape, dtype, seed=10_000 * i + 100 * r + c)
            with comm.count_comm() as bwd:
                y.backward(g)
            assert x.grad is not None, f"{what}: no gradient reached the input tile"
            _close(x.grad, want_grad.to(dtype), prim in EXACT_BWD, dtype, what + " backward")
            # ---- counters
            exp_bytes = _expected_bytes(prim, mesh, tile_bytes)
            if prim.startswith("allgather"):
                bwd_bytes = (p - 1) * p * tile_bytes // p  # reduce-scatter of the gathered grad
            elif prim.startswith("reducescatter"):
                bwd_bytes = (p - 1) * (tile_bytes // p)  # all-gather of the scattered grad
            else:
                bwd_bytes = exp_bytes
            assert fwd.total_bytes == exp_bytes, f"{what}: forward sent {fwd.snapshot()}, expected {exp_bytes} bytes"
            assert bwd.total_bytes == bwd_bytes, f"{what}: backward sent {bwd.snapshot()}, expected {bwd_bytes} bytes"
            if prim == "transpose" and exp_bytes:
                assert dict(fwd.calls) == {"transpose_exchange": 1}, fwd.snapshot()
            if prim.startswith("ring") and exp_bytes:
                axis = prim.split("_")[1]
                assert dict(fwd.calls) == {f"ring_shift_{axis}": 1}, fwd.snapshot()
            checks += 1
    return checks


@pytest.mark.parametrize("world", [1, 4, 9], ids=["1x1", "2x2", "3x3"])
def test_comm_primitives_match_reference(world):
    p = {1: 1, 4: 2, 9: 3}[world]
    checks = run_distributed(_comm_worker, world, _n_for(p), timeout=120)
    assert checks == [2 * len(PRIMS)] * world


def test_comm_primitives_on_permuted_mesh():
    """Collectives answer in group-rank (= global rank) order; results must be in mesh order."""
    perm = [[7, 0, 5], [2, 4, 6], [3, 8, 1]]
    checks = run_distributed(_comm_worker, 9, 7, perm=perm, timeout=120)
    assert checks == [2 * len(PRIMS)] * 9


def test_reference_is_not_trivial():
    """The reference itself distinguishes the primitives (guards against a vacuous check)."""
    p = 3
    Xp = _pad_full(torch.randn(B, 7, 7, 2 * p), p)
    outs = {prim: _ref(prim, Xp, p, 1, 2) for prim in PRIMS}
    assert not torch.equal(outs["transpose"], _tile(Xp, p, 1, 2))
    assert not torch.equal(outs["ring_row_1"], outs["ring_row_neg1"])
    assert not torch.equal(outs["ring_row_skew_r"], outs["ring_row_neg1"])  # r=1: k=1, not -1
    assert not torch.equal(outs["ring_col_skew_c"], outs["ring_col_1"])
    assert not torch.equal(outs["allreduce_row"], outs["allreduce_col"])


# ----------------------------------------------------------------------------- raw layer
def _raw_worker(rank, world):
    import autocp

    mesh = autocp.init_mesh()
    p = mesh.p
    # start_exchange: post, then wait; the received buffer is the neighbour's tensor
    x = torch.full((3,), float(rank))
    recv, h = comm.start_exchange(x, mesh.neighbor("row", -1), mesh.neighbor("row", 1), name="t")
    h.wait()
    assert recv.tolist() == [float(mesh.neighbor("row", 1))] * 3
    # raw all_gather / reduce_scatter / all_reduce_ in group order (index 0..p-1)
    v = torch.tensor([[float(rank)]])
    gathered = comm.all_gather(v, mesh, "col", 0)
    assert gathered.flatten().tolist() == [float(mesh.rank_of(i, mesh.c)) for i in range(p)]
    a = torch.arange(p, dtype=torch.float32) + 10 * rank
    rs = comm.reduce_scatter(a, mesh, "row", 0)
    want = sum(10.0 * mesh.rank_of(mesh.r, j) for j in range(p)) + p * mesh.c
    assert rs.tolist() == [want], (rs.tolist(), want)
    s = comm.all_reduce_(torch.ones(2), mesh, "row")
    assert s.tolist() == [float(p)] * 2
    # a bad divisibility gives a clear error
    try:
        comm.reduce_scatter(torch.ones(p + 1), mesh, "row", 0)
    except ValueError as e:
        assert "divisible" in str(e)
    else:
        raise AssertionError("reduce_scatter accepted a dim not divisible by p")
    return True


def test_raw_layer_3x3():
    assert run_distributed(_raw_worker, 9, timeout=60) == [True] * 9


def test_bad_axis_name():
    import autocp

    mesh = autocp.SquareMesh.single()
    with pytest.raises(ValueError, match="'row' or 'col'"):
        comm.ring_shift(torch.ones(2), mesh, "rows", 1)
    with pytest.raises(ValueError, match="'row' or 'col'"):
        comm.all_reduce(torch.ones(2), mesh, 0)


def test_count_comm_nests_and_restores():
    base = comm.STATS.add
    with comm.count_comm() as outer:
        comm.STATS.add("x", 8)
        with comm.count_comm() as inner:
            comm.STATS.add("x", 4)
        comm.STATS.add("y", 2)
    assert comm.STATS.add == base
    assert inner.snapshot() == {"calls": {"x": 1}, "bytes": {"x": 4}, "total_bytes": 4}
    assert outer.snapshot() == {"calls": {"x": 2, "y": 1}, "bytes": {"x": 12, "y": 2}, "total_bytes": 14}
