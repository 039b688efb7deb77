"""How a tensor lives on the ``p x p`` mesh.

Token indices ``0..N-1`` are split into ``p`` contiguous blocks ``T_0..T_{p-1}`` of
``b = ceil(N / p)`` tokens; the last block(s) are padded up to ``b`` so every rank's
tile has the same shape (the padding is masked by autocp's ops: see
:func:`token_valid`). The same block rule as ``torch.chunk`` / DTensor ``Shard``.

============ ====================================== ============================
layout        rank ``(r, c)`` holds                  DTensor placements
============ ====================================== ============================
``Pair2D``    ``z[:, T_r, T_c, ...]``               ``[Shard(1), Shard(2)]``
``RowToken``  ``s[:, T_r, ...]``                    ``[Shard(1), Replicate()]``
``ColToken``  ``s[:, T_c, ...]``                    ``[Replicate(), Shard(1)]``
``Replicated`` the whole tensor                      ``[Replicate(), Replicate()]``
``MsaTiles``  ``m[:, S_r, T_c, ...]`` (S = MSA rows) ``[Shard(1), Shard(2)]``
============ ====================================== ============================

(Placement ``i`` is for mesh dim ``i``; mesh dim 0 is ``r``, dim 1 is ``c``.)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import comm
from .mesh import COL, ROW, MeshError, SquareMesh

__all__ = [
    "Layout",
    "Pair2D",
    "RowToken",
    "ColToken",
    "Replicated",
    "MsaTiles",
    "LayoutError",
    "block_size",
    "block_range",
    "token_valid",
    "pad_to",
]


class LayoutError(ValueError):
    """A tensor that does not fit the layout; the message says given / required / fix."""


def block_size(n: int, p: int) -> int:
    """Tokens per block: ``ceil(n / p)``."""
    return -(-n // p)


def block_range(n: int, p: int, t: int) -> tuple[int, int]:
    """Global ``[start, stop)`` of the *valid* tokens of block ``t`` (may be empty)."""
    b = block_size(n, p)
    return min(t * b, n), min((t + 1) * b, n)


def token_valid(n: int, p: int, t: int, device=None) -> torch.Tensor:
    """Bool ``[b]``: which of block ``t``'s (padded) slots are real tokens."""
    b = block_size(n, p)
    return torch.arange(t * b, (t + 1) * b, device=device) < n


def pad_to(x: torch.Tensor, dim: int, size: int, value: float = 0.0) -> torch.Tensor:
    """Pad ``dim`` of ``x`` at the end up to ``size`` (no copy when already that size)."""
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    if extra < 0:
        raise ValueError(f"pad_to: dim {dim} has {x.shape[dim]} > {size}")
    pad = [0, 0] * (x.dim() - dim % x.dim() - 1) + [0, extra]
    return F.pad(x, pad, value=value)


def _norm_dim(d: int, ndim: int) -> int:
    return d % ndim


class Layout:
    """Base: a map from the full tensor to rank ``(r, c)``'s local piece and back.

    ``dims`` are the sharded tensor dims, ``axes`` the mesh axis index that shards each
    (``'r'`` -> block ``r``, ``'c'`` -> block ``c``).
    """

    name = "Layout"
    dims: tuple = ()
    axes: tuple = ()  # one of 'r'/'c' per dim

    # -------------------------------------------------------------- helpers
    def _check(self, x: torch.Tensor, what: str) -> None:
        need = max(self.dims) + 1 if self.dims else 0
        if x.dim() < need:
            raise LayoutError(
                f"{self.name}: {what} has shape {tuple(x.shape)} ({x.dim()} dims); the layout shards "
                f"dims {self.dims} so it needs at least {need} dims. Fix: pass e.g. "
                f"{self._example()}, or choose another layout."
            )

    def _example(self) -> str:
        return "a tensor of the documented shape"

    def _block_index(self, mesh: SquareMesh, axis: str) -> int:
        return mesh.r if axis == "r" else mesh.c

    def _full_len(self, x: torch.Tensor, dim: int) -> int:
        return x.shape[dim]

    def _sizes(self, sizes) -> list:
        if isinstance(sizes, int):
            return [sizes] * len(self.dims)
        sizes = [int(n) for n in sizes]
        if len(sizes) != len(self.dims):
            raise LayoutError(
                f"{self.name}: given {len(sizes)} global sizes {sizes} for {len(self.dims)} sharded dims "
                f"{self.dims}. Fix: pass one global length per sharded dim (or one int for all)."
            )
        return sizes

    def _check_local(self, local: torch.Tensor, mesh: SquareMesh, sizes: list) -> None:
        """The padded local piece must have ``ceil(n / p)`` slots on every sharded dim."""
        self._check(local, "the local tile")
        for d, n in zip(self.dims, sizes):
            mesh.check_tokens(n, f"{self.name}: global size of dim {d}: N")
            b = block_size(n, mesh.p)
            if local.shape[d] != b:
                raise LayoutError(
                    f"{self.name}: the local tile has shape {tuple(local.shape)}; with global size {n} "
                    f"on a {mesh.p}x{mesh.p} mesh dim {d} must have b = ceil({n}/{mesh.p}) = {b} slots, "
                    f"got {local.shape[d]}. Fix: pass the tile made by {self.name}.shard(full, mesh) "
                    f"and the full tensor's size(s) of the sharded dims {self.dims}."
                )

    # -------------------------------------------------------------- API
    def local_shape(self, full_shape: Sequence[int], mesh: SquareMesh) -> tuple:
        """Shape of the (padded) local piece on every rank."""
        shape = list(full_shape)
        for d in self.dims:
            shape[d] = block_size(shape[d], mesh.p)
        return tuple(shape)

    def shard(self, full: torch.Tensor, mesh: SquareMesh) -> torch.Tensor:
        """This rank's local piece of ``full`` (padded with zeros; a view when possible)."""
        self._check(full, "the full tensor")
        x = full
        for d, a in zip(self.dims, self.axes):
            n = x.shape[d]
            mesh.check_tokens(n, f"{self.name}: dim {d} of the full tensor {tuple(full.shape)}: N")
            b = block_size(n, mesh.p)
            t = self._block_index(mesh, a)
            lo, hi = block_range(n, mesh.p, t)
            x = pad_to(x.narrow(d, lo, hi - lo), d, b)
        return x

    def gather(self, local: torch.Tensor, mesh: SquareMesh, sizes) -> torch.Tensor:
        """Rebuild the full tensor on every rank (differentiable), trimming the padding.

        ``sizes``: the global length of each sharded dim (an int when all are equal).
        """
        sizes = self._sizes(sizes)
        self._check_local(local, mesh, sizes)
        x = local
        for d, a, n in zip(self.dims, self.axes, sizes):
            # shard index 'r' varies along the column group, 'c' along the row group
            axis = COL if a == "r" else ROW
            x = comm.all_gather_axis(x, mesh, axis, d)
            x = x.narrow(d, 0, n)
        return x

    def valid_mask(self, mesh: SquareMesh, sizes, device=None, ndim: Optional[int] = None) -> torch.Tensor:
        """Bool mask of the local piece: False on padded slots.

        By default it has ``max(dims) + 1`` dims (e.g. ``[1, b, b]`` for ``Pair2D``: the
        shape of a pair *mask* tile). Pass ``ndim=x.dim()`` to get trailing singleton dims
        so it broadcasts against a tile ``x`` with channels (``[1, b, b, 1]`` for
        ``z[B, b, b, C]``) -- broadcasting aligns from the right, so the default shape
        does not broadcast correctly against such a tile.
        """
        sizes = self._sizes(sizes)
        need = max(self.dims) + 1
        if ndim is None:
            ndim = need
        elif ndim < need:
            raise LayoutError(f"{self.name}.valid_mask: ndim={ndim} but the layout shards dims {self.dims}")
        m = None
        for d, a, n in zip(self.dims, self.axes, sizes):
            v = token_valid(n, mesh.p, self._block_index(mesh, a), device=device)
            shape = [1] * ndim
            shape[d] = -1
            v = v.view(shape)
            m = v if m is None else (m & v)
        return m

    # -------------------------------------------------------------- DTensor
    def placements(self) -> list:
        from torch.distributed.tensor import Replicate, Shard

        pl = [Replicate(), Replicate()]
        for d, a in zip(self.dims, self.axes):
            pl[0 if a == "r" else 1] = Shard(d)
        return pl

    def to_dtensor(self, local: torch.Tensor, mesh: SquareMesh, sizes):
        """Wrap this rank's padded piece as a DTensor with :meth:`placements`."""
        from torch.distributed.tensor import DTensor

        if mesh.device_mesh is None:
            raise MeshError(
                f"{self.name}: DTensor conversion needs a DeviceMesh-backed SquareMesh; given {mesh!r} "
                f"without a DeviceMesh. Fix: init the process group and use autocp.init_mesh()."
            )
        sizes = self._sizes(sizes)
        self._check_local(local, mesh, sizes)
        x = local
        shape = list(local.shape)
        for d, a, n in zip(self.dims, self.axes, sizes):
            lo, hi = block_range(n, mesh.p, self._block_index(mesh, a))
            x = x.narrow(d, 0, hi - lo)
            shape[d] = n
        stride, acc = [], 1
        for s in reversed(shape):  # contiguous strides of the global shape
            stride.append(acc)
            acc *= max(int(s), 1)
        stride = tuple(reversed(stride))
        return DTensor.from_local(
            x.contiguous(), mesh.device_mesh, self.placements(), run_check=False,
            shape=torch.Size(shape), stride=stride,
        )

    def from_dtensor(self, dt, mesh: SquareMesh) -> torch.Tensor:
        """Redistribute a DTensor to this layout and return the padded local piece."""
        if mesh.device_mesh is None:
            raise MeshError(
                f"{self.name}: DTensor conversion needs a DeviceMesh-backed SquareMesh; given {mesh!r} "
                f"without a DeviceMesh. Fix: init the process group and use autocp.init_mesh()."
            )
        dt = dt.redistribute(mesh.device_mesh, self.placements())
        x = dt.to_local()
        for d in self.dims:
            x = pad_to(x, d, block_size(dt.shape[d], mesh.p))
        return x

    def __repr__(self) -> str:
        return f"{self.name}(dims={self.dims})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.dims == other.dims

    def __hash__(self) -> int:
        return hash((type(self), self.dims))


class Pair2D(Layout):
    """Pair tensor ``z[B, N, N, ...]``: rank ``(r, c)`` holds ``z[:, T_r, T_c]``
    of local shape ``[B, b, b, ...]`` with ``b = ceil(N/p)``."""

    name = "Pair2D"

    def __init__(self, dims: tuple = (1, 2)):
        self.dims = tuple(dims)
        self.axes = ("r", "c")

    def _example(self) -> str:
        return "z of shape [B, N, N, C] or a pair mask [B, N, N]"

    def _check(self, x, what):
        super()._check(x, what)
        d0, d1 = self.dims
        if what == "the full tensor" and x.shape[d0] != x.shape[d1]:
            raise LayoutError(
                f"Pair2D: {what} has shape {tuple(x.shape)}; dims {d0} and {d1} must both be the "
                f"token length N, got {x.shape[d0]} and {x.shape[d1]}. Fix: pass a square pair tensor."
            )
        if what == "the local tile" and x.shape[d0] != x.shape[d1]:
            raise LayoutError(
                f"Pair2D: {what} has shape {tuple(x.shape)}; a tile is b x b on dims {d0},{d1}, got "
                f"{x.shape[d0]} x {x.shape[d1]}. Fix: shard with Pair2D().shard(z, mesh)."
            )


class RowToken(Layout):
    """Token tensor ``s[B, N, ...]``: rank ``(r, c)`` holds ``s[:, T_r]`` (replicated
    across the mesh row), local shape ``[B, b, ...]``."""

    name = "RowToken"

    def __init__(self, dim: int = 1):
        self.dims = (dim,)
        self.axes = ("r",)

    def _example(self) -> str:
        return "s of shape [B, N, C] or a token mask [B, N]"


class ColToken(Layout):
    """Token tensor ``s[B, N, ...]``: rank ``(r, c)`` holds ``s[:, T_c]`` (replicated
    across the mesh column), local shape ``[B, b, ...]``."""

    name = "ColToken"

    def __init__(self, dim: int = 1):
        self.dims = (dim,)
        self.axes = ("c",)

    def _example(self) -> str:
        return "s of shape [B, N, C] or a token mask [B, N]"


class Replicated(Layout):
    """Every rank holds the whole tensor."""

    name = "Replicated"

    def __init__(self):
        self.dims = ()
        self.axes = ()

    def valid_mask(self, mesh, sizes=(), device=None, ndim=None):
        return None


class MsaTiles(Layout):
    """MSA ``m[B, S, N, ...]``: rank ``(r, c)`` holds ``m[:, S_r, T_c]`` -- sequence
    blocks ``S_r`` (``ceil(S/p)`` rows, padded) on mesh rows, token blocks on mesh
    columns; local shape ``[B, ceil(S/p), b, ...]``."""

    name = "MsaTiles"

    def __init__(self, seq_dim: int = 1, token_dim: int = 2):
        self.dims = (seq_dim, token_dim)
        self.axes = ("r", "c")

    def _example(self) -> str:
        return "m of shape [B, S, N, C] or an MSA mask [B, S, N]"
