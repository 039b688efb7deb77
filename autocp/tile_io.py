"""Tiles in, tiles out: DTensor's gradient semantics at the boundary of a parallel module.

Inside autocp every value that several ranks hold (a ``RowToken`` tile on the ``p`` ranks of
a mesh row, a replicated scalar on all ``P = p*p`` ranks) carries a **partial** gradient: the
sum over its replicas is the true one (that is what lets the 2D ops skip a reduction in
backward). Outside, the user sees DTensor's convention: a tensor and its gradient are
*global* per placement --

* a sharded tile (``Pair2D``, ``MsaTiles``, atom windows) carries the true gradient of that
  tile;
* a replicated value (``RowToken`` / ``ColToken`` along one mesh axis, ``Replicated`` and
  scalars such as a loss along both) carries the true gradient, **the same on every
  replica** (DTensor's ``Replicate``).

:func:`to_partial` (outputs) and :func:`from_partial` (inputs) convert between the two:

============== ========================================= ===========================================
boundary        forward                                   backward
============== ========================================= ===========================================
output          identity                                  check the cotangent is replicated (one tiny
                                                          all-reduce), zero its padded slots, divide
                                                          by the number of replicas
input           identity                                  sum the partial gradient over the replicas
============== ========================================= ===========================================

A cotangent that differs between the replicas of a replicated output (a partial cotangent, a
loss counted once per rank, a bug) cannot be interpreted: backward raises
:class:`CotangentError` (a ``BaseException``: no ``except Exception`` in user or model code
turns it into a silently wrong gradient).

:func:`tile_sum` is the loss-side helper for padded local tiles (``output="local"``): the
global sum, each element counted once, as a replicated scalar with the same semantics.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import comm
from .layout import Layout, block_size
from .mesh import COL, ROW

__all__ = ["CotangentError", "replica_axes", "to_partial", "from_partial", "tile_sum", "tags_of_layout", "padded_slots"]

#: tags of dims split over the whole mesh (atom windows, :mod:`autocp.ops.atom_windows`)
FLAT_TAGS = ("w", "a")


class CotangentError(BaseException):
    """The cotangent of a replicated output differs between its replicas (it cannot be
    read as DTensor's ``Replicate``). Derives from ``BaseException`` on purpose, like
    :class:`autocp.passes.eager.EagerShardingError`."""


def replica_axes(tags) -> tuple:
    """Mesh axes (``"row"``: ranks with the same ``r``; ``"col"``: the same ``c``) along which a
    tensor with layout ``tags`` is replicated. ``()`` for a ``Pair2D`` / ``MsaTiles`` / atom
    tile, ``("row",)`` for ``RowToken``, ``("col",)`` for ``ColToken``, both for a replicated
    tensor (``tags`` None or all None)."""
    used = set()
    for t in tags or ():
        if t in ("r", "s"):  # block index r: varies along the column group
            used.add(COL)
        elif t == "c":
            used.add(ROW)
        elif t in FLAT_TAGS:
            used.update((ROW, COL))
    return tuple(a for a in (ROW, COL) if a not in used)


def tags_of_layout(layout: Layout, ndim: int) -> tuple:
    """The tag tuple (one per dim) of an :mod:`autocp.layout` object for an ``ndim``-dim tensor."""
    tags = [None] * ndim
    names = {"MsaTiles": ("s", "c")}.get(layout.name)
    for i, (d, a) in enumerate(zip(layout.dims, layout.axes)):
        tags[d % ndim] = names[i] if names else a
    return tuple(tags)


def padded_slots(tags, mesh, n, n_seq):
    """``[(dim, valid, size)]`` of this rank's tile dims that carry padded slots."""
    out = []
    for d, t in enumerate(tags or ()):
        if t not in ("r", "c", "s"):
            continue
        size = n_seq if t == "s" else n
        if size is None:
            continue
        b = block_size(size, mesh.p)
        idx = mesh.r if t in ("r", "s") else mesh.c
        valid = max(0, min(size - idx * b, b))
        if valid < b:
            out.append((d, valid, b))
    return out


def _check_replicated(g: torch.Tensor, mesh, axes, what: str) -> None:
    """Raise :class:`CotangentError` unless ``g`` agrees on the replicas along ``axes``
    (two weighted sums compared by one all-reduce of 5 numbers per axis)."""
    if mesh.p == 1 or not axes:
        return
    flat = g.detach().reshape(-1)
    m = flat.numel() // 97
    ramp = torch.arange(97, device=flat.device, dtype=torch.float64).sub_(48).div_(48)
    cols = flat[:m * 97].view(m, 97).sum(0, dtype=torch.float64) if m else torch.zeros(97, dtype=torch.float64, device=flat.device)
    tail = flat[m * 97:].to(torch.float64)
    s0 = flat.sum(dtype=torch.float64)
    s1 = (cols * ramp).sum() + (tail * ramp[:tail.numel()]).sum()
    scale = torch.linalg.vector_norm(flat, ord=1, dtype=torch.float64)
    stats = torch.stack([s0, s1, -s0, -s1, scale])
    for axis in axes:
        comm.all_reduce_(stats, mesh, axis, name="cotangent_check", op="max")
    hi0, hi1, lo0, lo1, top = stats.tolist()
    tol = max(1e-3, 16 * torch.finfo(g.dtype).eps if g.dtype.is_floating_point else 0.0) * top + 1e-30
    spread = max(hi0 + lo0, hi1 + lo1)
    if spread > tol:
        raise CotangentError(
            f"autocp tile output {what}: given a cotangent that differs between the ranks holding the same "
            f"(replicated) values -- spread {spread:.3g} over {'/'.join(axes)} group(s) against a tolerance of "
            f"{tol:.3g} (|cotangent| sum {top:.3g}); required: DTensor's Replicate semantics, the true cotangent "
            f"of these values, the same on every replica. Fix: compute the loss as one replicated scalar "
            f"(autocp.tile_io.tile_sum on local tiles, or DTensor ops + full_tensor() on output='dtensor'), or "
            f"take the cotangent from the same data on every replica; a partial cotangent (the true one split "
            f"over the replicas) is not accepted.")


class _ToPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tags, mesh, n, n_seq, check, what):
        ctx.tags, ctx.mesh, ctx.n, ctx.n_seq, ctx.check, ctx.what = tags, mesh, n, n_seq, check, what
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        mesh = ctx.mesh
        axes = replica_axes(ctx.tags)
        if ctx.check:
            _check_replicated(g, mesh, axes, ctx.what)
        pads = padded_slots(ctx.tags, mesh, ctx.n, ctx.n_seq)
        k = 1
        for _ in axes:
            k *= mesh.p
        if pads or k > 1:
            g = g / k if k > 1 else g.clone()
            for d, valid, b in pads:  # padded slots are not values of the tensor
                g.narrow(d, valid, b - valid).zero_()
        return g, None, None, None, None, None, None


class _FromPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axes, mesh):
        ctx.axes, ctx.mesh = axes, mesh
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        for axis in ctx.axes:
            comm.all_reduce_(g, ctx.mesh, axis, name="input_grad")
        return g, None, None


def to_partial(x: torch.Tensor, tags, mesh, n: Optional[int] = None, n_seq: Optional[int] = None, *,
               check: bool = True, what: str = "") -> torch.Tensor:
    """Output boundary: identity forward; backward reads the cotangent of ``x`` (layout
    ``tags``; on rank ``(r, c)`` the padded local tile) as DTensor's -- the true one, equal on
    every replica -- checks that (``check``), zeroes padded slots (``n`` / ``n_seq``: global
    lengths) and hands the internal partial gradient (divided by the replica count) on."""
    if not isinstance(x, torch.Tensor) or not x.requires_grad or not torch.is_grad_enabled():
        return x
    if (mesh.p == 1 or not replica_axes(tags)) and not padded_slots(tags, mesh, n, n_seq):
        return x  # nothing to convert: no replicas (or one rank), no padding
    return _ToPartial.apply(x, tuple(tags) if tags is not None else None, mesh, n, n_seq, check, what)


def from_partial(x: torch.Tensor, tags, mesh) -> torch.Tensor:
    """Input boundary: identity forward; backward sums the partial gradient over the replicas
    of ``x`` (layout ``tags``), so the input's gradient is the true one on every replica."""
    axes = replica_axes(tags)
    if (not isinstance(x, torch.Tensor) or not x.requires_grad or not torch.is_grad_enabled() or not axes
            or mesh.p == 1):
        return x
    return _FromPartial.apply(x, axes, mesh)


class _TileSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tags, mesh, n, n_seq):
        ctx.tags, ctx.mesh, ctx.n, ctx.n_seq, ctx.shape = tags, mesh, n, n_seq, x.shape
        v = x
        for d, valid, b in padded_slots(tags, mesh, n, n_seq):
            v = v.narrow(d, 0, valid)
        axes = replica_axes(tags)
        out = v.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32).reshape(1)
        # sharded axes: every rank holds other elements -> sum over them; replica axes: the same
        # elements -> count once (the sum of value / p over the replicas: their mean)
        for axis in (ROW, COL):
            if axis in axes:
                out = out / mesh.p
            comm.all_reduce_(out, mesh, axis, name="tile_sum")
        return out.reshape(()).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        _check_replicated(g, ctx.mesh, (ROW, COL), "tile_sum")
        gx = g.expand(ctx.shape).clone()
        for d, valid, b in padded_slots(ctx.tags, ctx.mesh, ctx.n, ctx.n_seq):
            gx.narrow(d, valid, b - valid).zero_()
        return gx, None, None, None, None


def tile_sum(x: torch.Tensor, layout, mesh, n: int, n_seq: Optional[int] = None) -> torch.Tensor:
    """The global sum of the tensor whose padded local tile on this rank is ``x`` (layout:
    an :mod:`autocp.layout` object or a tag tuple; ``n`` / ``n_seq`` the global token / MSA
    lengths), every element counted once and padded slots ignored, as a replicated scalar
    (the same on every rank; one all-reduce per mesh axis). Its backward gives ``x`` the
    true cotangent, equal on every replica: the building block of a loss on tiles.

        loss = tile_sum((z_tile - target_tile) ** 2, Pair2D(), mesh, n) / n**2 \\
               + tile_sum(s_tile * w_tile, RowToken(), mesh, n)
        loss.backward()          # the single-device gradients (with grad_sync)
    """
    tags = tags_of_layout(layout, x.dim()) if isinstance(layout, Layout) else tuple(layout)
    if len(tags) != x.dim():
        raise ValueError(f"tile_sum: given {len(tags)} tags {tags} for a {x.dim()}-dim tile; required one per dim. "
                         f"Fix: pass the layout object (e.g. autocp.Pair2D()) or one tag per dim.")
    return _TileSum.apply(x, tags, mesh, n, n_seq)
