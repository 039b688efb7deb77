"""Shared pieces of the distributed ops: tile context, input checks, LSE merges.

Contract of every 2D op module in :mod:`autocp.ops`::

    op = SomeOp2D(boltz_module, mesh)      # shares the module's parameters (same names)
    out_tile = op(z_tile, mask_tile, n_tokens=N)

``z_tile`` is the ``Pair2D`` tile ``z[:, T_r, T_c, :]`` of local shape ``[B, b, b, C]``
(``b = ceil(N / p)``; padded slots hold anything finite), ``mask_tile`` the Pair2D tile
of the pair mask ``[B, b, b]`` or ``None`` (all real tokens valid). ``n_tokens`` is the
global N: it tells which slots are padding, and padding is always masked by the op
itself, so it never leaks into real outputs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..layout import LayoutError, block_size, token_valid
from ..mesh import SquareMesh

__all__ = ["TileCtx", "broadcast_mask", "check_pair_tile", "merge_lse", "share_submodules", "adopt_module_state", "sync_grads",
           "chunking", "chunk_fraction", "chunk_spans"]

# ----------------------------------------------------------------------------- memory knob
#: The one memory knob of the chunked ops (triangle multiplication channel groups, triangle
#: attention / transition / pair-bias row chunks): the temporaries of one chunk are about
#: this fraction of the op's tile-sized tensors. Smaller: less memory, more (smaller) GEMMs
#: and messages; the results do not depend on it.
DEFAULT_CHUNK_FRACTION = 1 / 16
#: ... but a chunk is never made smaller than this (bytes of the chunked tile-sized tensor
#: per chunk): small tiles run as one chunk (fewer GEMMs and messages, nothing to save)
DEFAULT_MIN_CHUNK_BYTES = 16 * 2**20
_CHUNK = [DEFAULT_CHUNK_FRACTION, DEFAULT_MIN_CHUNK_BYTES]


def chunk_fraction() -> float:
    """The current chunk fraction (see :func:`chunking`)."""
    return _CHUNK[0]


@contextlib.contextmanager
def chunking(fraction: float = DEFAULT_CHUNK_FRACTION, min_bytes: Optional[int] = None):
    """``with autocp.chunking(1 / 16): pm(...)`` -- run the chunked ops with chunks of about
    ``fraction`` of a tile (default :data:`DEFAULT_CHUNK_FRACTION` = 1/16; ``1.0``: one
    chunk, Boltz's own unchunked formulation), but none smaller than ``min_bytes`` of the
    chunked tile (default :data:`DEFAULT_MIN_CHUNK_BYTES` = 16 MiB; ``0``: always
    ``1 / fraction`` chunks)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"chunking: given fraction={fraction!r}; required a number in (0, 1] (the share of a "
                         f"tile one chunk may hold). Fix: autocp.chunking(1 / 16).")
    if min_bytes is not None and (isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0):
        raise ValueError(f"chunking: given min_bytes={min_bytes!r}; required an int >= 0. Fix: min_bytes=0.")
    prev = list(_CHUNK)
    _CHUNK[0] = float(fraction)
    if min_bytes is not None:
        _CHUNK[1] = int(min_bytes)
    try:
        yield
    finally:
        _CHUNK[:] = prev


def chunk_spans(total: int, nbytes: Optional[int] = None, fraction: Optional[float] = None) -> list:
    """``[(lo, hi), ...]``: ``range(total)`` in about ``1 / fraction`` near-equal pieces
    (at most ``total``; default fraction: :func:`chunk_fraction`); ``nbytes``: the size of
    the tensor being chunked -- at most ``nbytes / min_bytes`` pieces (see :func:`chunking`)."""
    f = chunk_fraction() if fraction is None else float(fraction)
    k = max(1, min(int(total), math.ceil(1.0 / f - 1e-9)))
    if nbytes is not None and _CHUNK[1] > 0:
        k = max(1, min(k, math.ceil(int(nbytes) / _CHUNK[1])))
    edges = [total * i // k for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k) if edges[i + 1] > edges[i]]


@dataclass(frozen=True)
class TileCtx:
    """Mesh + global token count: which slots of each block are real tokens."""

    mesh: SquareMesh
    n: int

    @property
    def p(self) -> int:
        return self.mesh.p

    @property
    def b(self) -> int:
        return block_size(self.n, self.mesh.p)

    def valid(self, t: int, device=None) -> torch.Tensor:
        """Bool ``[b]``: real tokens of block ``t``."""
        return token_valid(self.n, self.mesh.p, t % self.mesh.p, device=device)

    def pair_valid(self, device=None) -> torch.Tensor:
        """Bool ``[b, b]``: real (i, j) slots of this rank's Pair2D tile."""
        return self.valid(self.mesh.r, device)[:, None] & self.valid(self.mesh.c, device)[None, :]


def broadcast_mask(mask: torch.Tensor, lead: torch.Size, op: str, what: str, target: str, fix: str) -> torch.Tensor:
    """``mask`` expanded to ``lead`` (a tile's leading dims) under torch's broadcasting rules,
    as the single-device module applies it (one mask for a batch of diffusion samples);
    anything that does not broadcast is a :class:`LayoutError` saying given / required / fix."""
    if mask.shape == lead:
        return mask
    try:
        ok = mask.dim() <= len(lead) and torch.broadcast_shapes(mask.shape, lead) == lead
    except RuntimeError:
        ok = False
    if not ok:
        raise LayoutError(f"{op}: {what} has shape {tuple(mask.shape)}; it must match (or broadcast to) the "
                          f"{target} {tuple(lead)}. Fix: {fix}.")
    return mask.expand(lead)


def check_pair_tile(
    z: torch.Tensor,
    mask: Optional[torch.Tensor],
    ctx: TileCtx,
    channels: Optional[int] = None,
    op: str = "op",
) -> torch.Tensor:
    """Validate a Pair2D tile (+ mask) and return the mask with padding zeroed.

    Raises :class:`LayoutError` saying what was given, what is needed and how to fix it.
    """
    ctx.mesh.check_tokens(ctx.n, "n_tokens")
    b = ctx.b
    if z.dim() != 4 or z.shape[1] != b or z.shape[2] != b:
        raise LayoutError(
            f"{op}: z tile has shape {tuple(z.shape)}; on a {ctx.p}x{ctx.p} mesh with N={ctx.n} the "
            f"Pair2D tile must be [B, {b}, {b}, C] (b = ceil(N/p)). Fix: shard z with "
            f"autocp.Pair2D().shard(z, mesh) and pass n_tokens=N."
        )
    if channels is not None and z.shape[-1] != channels:
        raise LayoutError(
            f"{op}: z tile has {z.shape[-1]} channels; the module's weights expect {channels}. "
            f"Fix: pass the pair tensor this module was built for."
        )
    valid = ctx.pair_valid(z.device)
    if mask is None:
        return valid.to(z.dtype).expand(z.shape[0], b, b)
    mask = broadcast_mask(mask, z.shape[:3], op, "mask tile", "z tile's first three dims",
                          "shard the [B, N, N] pair mask with autocp.Pair2D().shard")
    return mask.to(z.dtype) * valid.to(z.dtype)


def merge_lse(out_a, lse_a, out_b, lse_b):
    """Merge two softmax-normalised partial attentions by their log-sum-exps.

    ``out_* [..., Q, D]``, ``lse_* [..., Q]`` (``-inf`` = no keys). Exact, fp32. A row
    with no keys on either side gets ``out = 0``, ``lse = -inf`` and finite (zero)
    gradients.
    """
    # rows where both sides have no keys (lse -inf on both): logaddexp's gradient there is
    # NaN, and NaN * 0 would poison every gradient it touches. Compute those rows on safe
    # finite stand-ins and select the true result (-inf, weight 0) with torch.where.
    dead = ~(torch.isfinite(lse_a) | torch.isfinite(lse_b))
    zero = torch.zeros_like(lse_a)
    a = torch.where(dead, zero, lse_a)
    b = torch.where(dead, zero, lse_b)
    lse_live = torch.logaddexp(a, b)
    wa = torch.where(dead, zero, torch.exp(a - lse_live)).unsqueeze(-1)
    wb = torch.where(dead, zero, torch.exp(b - lse_live)).unsqueeze(-1)
    lse = torch.where(dead, torch.full_like(lse_live, float("-inf")), lse_live)
    return out_a * wa + out_b * wb, lse


def share_submodules(dst: torch.nn.Module, src: torch.nn.Module, names) -> None:
    """Register ``src``'s submodules under the same names in ``dst`` (parameters shared,
    not copied), so ``dst.state_dict()`` has the same keys as ``src.state_dict()``."""
    for name in names:
        dst.add_module(name, getattr(src, name))


def adopt_module_state(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Register ``src``'s children, direct parameters and buffers on ``dst`` under the
    same names (shared objects), so a wrapper has ``src``'s ``state_dict`` keys."""
    for name, child in src.named_children():
        dst.add_module(name, child)
    for name, prm in src.named_parameters(recurse=False):
        dst.register_parameter(name, prm)
    for name, buf in src.named_buffers(recurse=False):
        dst.register_buffer(name, buf)


def sync_grads(module: torch.nn.Module, mesh) -> None:
    """Sum every parameter's ``.grad`` over all ``P`` ranks of the mesh (in place).

    Convention of all autocp ops: after backward each rank holds the *partial*
    parameter gradient of its own tiles, and the sum over the mesh is the single-device
    gradient. ``mesh``: a :class:`SquareMesh` or a 2D DeviceMesh.

    A module from :func:`autocp.parallelize` reduces its gradients itself (``grad_sync=True``,
    the default): then this call is a documented **no-op** (gradients are already complete,
    a second sum would multiply them by ``P``), except after backwards run under
    ``pm.no_sync()``, whose accumulated gradients it reduces (like the next synced backward).
    """
    reducer = getattr(module, "grad_reducer", None)
    if reducer is not None:
        if reducer.pending and not reducer.sync_on:
            return  # inside no_sync: the next synced backward reduces
        if reducer.pending:
            reducer.reduce_now()
        return
    mesh = SquareMesh.from_any(mesh)
    if mesh.p == 1:
        return
    from .. import comm

    for prm in module.parameters():
        if prm.grad is not None:
            # over the mesh's own ranks (not the default group, which may be larger):
            # summing along the row and then along the column sums over all P ranks
            for axis in ("row", "col"):
                comm.all_reduce_(prm.grad, mesh, axis, name="sync_grads")
