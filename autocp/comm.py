"""Communication on the square mesh: raw point-to-point/collectives with counters, and
differentiable primitives (each an ``autograd.Function`` whose backward communicates).

Raw layer (no autograd; what the distributed ops in :mod:`autocp.ops` build on):

* :func:`start_exchange` / :func:`exchange` -- send one tensor to a rank and receive one
  from another with batched ``isend/irecv`` (the double-buffering primitive of ring
  algorithms: post the next transfer, compute, then ``wait()``).
* :func:`all_reduce_`, :func:`all_gather`, :func:`reduce_scatter` along a mesh axis.

Differentiable layer:

* :func:`transpose_exchange` -- tile of ``(r, c)`` <-> tile of ``(c, r)``.
* :func:`ring_shift` -- along the mesh row/column by ``k`` (``k`` may differ per rank
  as long as it is the same inside the group, as in a Cannon skew: ``k = r`` on a row).
* :func:`all_reduce`, :func:`all_gather_axis`, :func:`reduce_scatter_axis` along a
  mesh axis.

Every transfer is counted per primitive in :data:`STATS` (calls and bytes *sent* by
this rank) so tests can check an algorithm against its analytic volume; see
:func:`count_comm`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from .mesh import SquareMesh, check_axis

__all__ = [
    "CommStats",
    "STATS",
    "count_comm",
    "start_exchange",
    "exchange",
    "all_reduce_",
    "all_gather",
    "reduce_scatter",
    "all_to_all_uneven",
    "transpose_exchange",
    "ring_shift",
    "all_reduce",
    "all_gather_axis",
    "reduce_scatter_axis",
    "simulate",
    "simulating",
]


# ----------------------------------------------------------------------------- counters
@dataclass
class CommStats:
    """Calls and bytes sent by this rank, per primitive name."""

    calls: dict = field(default_factory=lambda: defaultdict(int))
    bytes: dict = field(default_factory=lambda: defaultdict(int))
    enabled: bool = True

    def add(self, name: str, nbytes: int) -> None:
        if self.enabled:
            self.calls[name] += 1
            self.bytes[name] += int(nbytes)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def snapshot(self) -> dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes), "total_bytes": self.total_bytes}


STATS = CommStats()


@contextlib.contextmanager
def count_comm():
    """Count communication inside the block: ``with count_comm() as st: ...; st.bytes``.

    Yields a fresh :class:`CommStats`; the global counters keep running too.
    """
    local = CommStats()
    prev_add = STATS.add

    def add(name, nbytes):
        prev_add(name, nbytes)
        local.add(name, nbytes)

    STATS.add = add  # type: ignore[method-assign]
    try:
        yield local
    finally:
        STATS.add = prev_add  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- simulation
# the global rank this process plays while simulating (``None``: real communication)
_SIM_RANK = [None]


@contextlib.contextmanager
def simulate(mesh: SquareMesh):
    """Run autocp's communication as shape-correct no-ops, as rank ``mesh.rank`` of ``mesh``.

    For :func:`autocp.estimate`: the real tile programs run on FakeTensors on one process
    with a :meth:`SquareMesh.simulated` mesh; every primitive allocates exactly the buffers
    it allocates for real (receive buffers, gathered parts) and counts the bytes it would
    send, but moves no data and needs no process group. Values are meaningless.
    """
    prev = _SIM_RANK[0]
    _SIM_RANK[0] = mesh.rank
    try:
        yield
    finally:
        _SIM_RANK[0] = prev


def _sim_fill(buf: torch.Tensor, like: Optional[torch.Tensor]) -> None:
    """A simulated receive: a real buffer gets this rank's own values (``like``, when the
    shapes agree; else zeros) -- the other ranks are taken to hold data like this one's, so
    index-like values stay valid; a fake buffer (the estimator's large tensors) is left."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(buf, FakeTensor) or buf.device.type == "meta":
        return
    if like is not None and like.shape == buf.shape and not isinstance(like, FakeTensor):
        buf.copy_(like)
    else:
        buf.zero_()


def simulating() -> bool:
    """True inside :func:`simulate`."""
    return _SIM_RANK[0] is not None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------- raw p2p
class _Handle:
    def __init__(self, works):
        self._works = works

    def wait(self) -> None:
        from .mesh import p2p_wait_timeout  # autocp.guard: bounded p2p waits (gloo's wait() has no timeout)

        t = p2p_wait_timeout()
        for w in self._works:
            w.wait(t) if t is not None else w.wait()
        self._works = []


def start_exchange(
    send: torch.Tensor,
    dst: int,
    src: int,
    *,
    recv: Optional[torch.Tensor] = None,
    name: str = "exchange",
):
    """Post ``send -> dst`` and ``recv <- src`` (global ranks); return ``(recv, handle)``.

    Call ``handle.wait()`` before reading ``recv``. When ``dst == src == self`` the
    tensor is returned as is (no copy, no count).
    """
    send = send.contiguous()
    if recv is None:
        recv = torch.empty_like(send)
    sim = _SIM_RANK[0]
    me = sim if sim is not None else (dist.get_rank() if dist.is_initialized() else 0)
    if dst == me and src == me:
        return send, _Handle([])
    if sim is not None:
        STATS.add(name, _nbytes(send))
        _sim_fill(recv, send)
        return recv, _Handle([])
    ops = [dist.P2POp(dist.isend, send, dst), dist.P2POp(dist.irecv, recv, src)]
    STATS.add(name, _nbytes(send))
    return recv, _Handle(dist.batch_isend_irecv(ops))


def exchange(send: torch.Tensor, dst: int, src: int, *, name: str = "exchange") -> torch.Tensor:
    """Blocking :func:`start_exchange`."""
    out, h = start_exchange(send, dst, src, name=name)
    h.wait()
    return out


# ----------------------------------------------------------------------------- raw collectives
def all_reduce_(x: torch.Tensor, mesh: SquareMesh, axis: str, *, name: str = "all_reduce",
                op: str = "sum") -> torch.Tensor:
    """In-place sum (``op="max"``: maximum) over the ``axis`` group (ring all-reduce counted
    as 2(p-1)/p of x)."""
    check_axis(axis)
    if op not in ("sum", "max"):
        raise ValueError(f"all_reduce_: given op={op!r}; required 'sum' or 'max'.")
    if mesh.p == 1:
        return x
    STATS.add(name, 2 * (mesh.p - 1) * _nbytes(x) // mesh.p)
    if not simulating():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=mesh.group(axis))
    return x


def all_gather(x: torch.Tensor, mesh: SquareMesh, axis: str, dim: int, *, name: str = "all_gather") -> torch.Tensor:
    """Concatenate the ``axis`` group's tensors along ``dim`` in mesh order (index 0..p-1)."""
    check_axis(axis)
    if mesh.p == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(mesh.p)]
    STATS.add(name, (mesh.p - 1) * _nbytes(x))
    if not simulating():
        dist.all_gather(parts, x, group=mesh.group(axis))
    else:
        for part in parts:
            _sim_fill(part, x)
    order = mesh.group_order(axis)  # parts[j] comes from mesh index order[j]
    if order != list(range(mesh.p)):
        parts = [parts[order.index(i)] for i in range(mesh.p)]
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, mesh: SquareMesh, axis: str, dim: int, *, name: str = "reduce_scatter") -> torch.Tensor:
    """Sum over the ``axis`` group, keep chunk ``index(axis)`` of ``dim`` (needs size % p == 0)."""
    check_axis(axis)
    if mesh.p == 1:
        return x
    p = mesh.p
    if x.shape[dim] % p:
        raise ValueError(
            f"reduce_scatter: dim {dim} of shape {tuple(x.shape)} has size {x.shape[dim]}, which is not "
            f"divisible by the mesh side p={p}. Fix: pad that dim to a multiple of p (e.g. with "
            f"autocp.layout.pad_to) or scatter another dim."
        )
    # all_to_all: chunk j goes to group member j; then sum what we received.
    pieces = torch.chunk(x, p, dim=dim)  # piece i belongs to mesh index i
    order = mesh.group_order(axis)  # group rank j has mesh index order[j]
    chunks = torch.stack([pieces[i] for i in order], 0).contiguous()
    out = torch.empty_like(chunks)
    STATS.add(name, (p - 1) * _nbytes(chunks) // p)
    if not simulating():
        dist.all_to_all_single(out, chunks, group=mesh.group(axis))
    else:
        _sim_fill(out, chunks)
    return out.sum(0)


def all_to_all_uneven(x: torch.Tensor, out_splits: list, in_splits: list, group, *,
                      name: str = "all_to_all") -> torch.Tensor:
    """Uneven all-to-all over ``group``: rows ``in_splits[j]`` of ``x`` go to member ``j``,
    ``out_splits[j]`` rows come from it (concatenated in member order). Under
    :func:`simulate` the receive buffer is allocated and the bytes counted, nothing moves."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    row = _nbytes(x) // max(x.shape[0], 1) if x.dim() else 0
    STATS.add(name, row * (sum(in_splits)))
    if not simulating():
        dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
    else:
        _sim_fill(out, None)
    return out


# ----------------------------------------------------------------------------- autograd
class _TransposeExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        partner = mesh.transpose_partner
        return exchange(x, partner, partner, name="transpose_exchange")

    @staticmethod
    def backward(ctx, g):
        partner = ctx.mesh.transpose_partner
        return exchange(g, partner, partner, name="transpose_exchange"), None


def transpose_exchange(x: torch.Tensor, mesh: SquareMesh) -> torch.Tensor:
    """Return the tensor held by the transpose partner ``(c, r)`` (same shape as ``x``).

    Tile contents are *not* transposed; do that locally (e.g. ``z.transpose(1, 2)``)
    to turn a ``Pair2D`` tile of ``z`` into the ``Pair2D`` tile of ``z^T``.
    Diagonal ranks (r == c) keep their tensor without communicating.
    """
    if mesh.p == 1 or mesh.r == mesh.c:
        return x
    return _TransposeExchange.apply(x, mesh)


class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, k):
        ctx.mesh, ctx.axis, ctx.k = mesh, axis, k
        return exchange(x, mesh.neighbor(axis, -k), mesh.neighbor(axis, k), name=f"ring_shift_{axis}")

    @staticmethod
    def backward(ctx, g):
        m, a, k = ctx.mesh, ctx.axis, ctx.k
        return exchange(g, m.neighbor(a, k), m.neighbor(a, -k), name=f"ring_shift_{a}"), None, None, None


def ring_shift(x: torch.Tensor, mesh: SquareMesh, axis: str, k: int = 1) -> torch.Tensor:
    """Ring shift along the mesh row (``axis='row'``) or column (``'col'``) by ``k``.

    After the shift rank ``(r, c)`` holds what ``(r, c+k)`` held (row) or what
    ``(r+k, c)`` held (column), i.e. data moves ``k`` steps towards lower indices.
    ``k`` may depend on the rank as long as it is equal inside each group (a Cannon
    skew uses ``k = r`` along rows and ``k = c`` along columns).
    """
    check_axis(axis)
    if mesh.p == 1 or k % mesh.p == 0:
        return x
    return _RingShift.apply(x, mesh, axis, k)


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis):
        ctx.mesh, ctx.axis = mesh, axis
        return all_reduce_(x.clone(), mesh, axis)

    @staticmethod
    def backward(ctx, g):
        return all_reduce_(g.clone(), ctx.mesh, ctx.axis), None, None


def all_reduce(x: torch.Tensor, mesh: SquareMesh, axis: str) -> torch.Tensor:
    """Differentiable sum over the ``axis`` group (backward: sum of the groups' grads)."""
    check_axis(axis)
    if mesh.p == 1:
        return x
    return _AllReduce.apply(x, mesh, axis)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, dim):
        ctx.mesh, ctx.axis, ctx.dim = mesh, axis, dim
        return all_gather(x, mesh, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g.contiguous(), ctx.mesh, ctx.axis, ctx.dim), None, None, None


def all_gather_axis(x: torch.Tensor, mesh: SquareMesh, axis: str, dim: int) -> torch.Tensor:
    """Differentiable all-gather along a mesh axis, concatenating on ``dim``."""
    check_axis(axis)
    if mesh.p == 1:
        return x
    return _AllGather.apply(x, mesh, axis, dim % x.dim())


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, dim):
        ctx.mesh, ctx.axis, ctx.dim = mesh, axis, dim
        return reduce_scatter(x, mesh, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.mesh, ctx.axis, ctx.dim), None, None, None


def reduce_scatter_axis(x: torch.Tensor, mesh: SquareMesh, axis: str, dim: int) -> torch.Tensor:
    """Differentiable reduce-scatter along a mesh axis (sum, keep chunk ``index(axis)``)."""
    check_axis(axis)
    if mesh.p == 1:
        return x
    return _ReduceScatter.apply(x, mesh, axis, dim % x.dim())


