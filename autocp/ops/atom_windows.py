"""Sequence-local atom attention split over the whole mesh: window blocks, halo exchange,
the atom-pair bias band read from Pair2D tiles, token <-> atom maps by index.

AF3-style atom transformers attend within windows: window ``k`` has the queries
``[W k, W k + W)`` and the keys ``[W k - h, W k + W + h)`` (``h = (H - W) / 2``; W=32, H=128,
h=48 in Boltz), keys outside ``[0, M)`` are zero. The atoms are split over all ``P = p*p``
ranks by **whole windows**: the rank at mesh position ``(r, c)`` (flat index
``f = r p + c``) owns windows ``[f kb, (f + 1) kb)`` with ``kb = ceil(K / P)`` (``K = M / W``),
i.e. the atoms ``[f kb W, (f + 1) kb W)``, zero-padded to ``kb`` windows. Two layout tags
name such dims (:data:`FLAT_TAGS`): ``"w"`` a window dim (local length ``kb``) and ``"a"`` an
atom dim (local length ``kb W``).

* keys of the local windows need ``h`` atoms of the neighbours on each side:
  :meth:`WindowPlan.exchange` all-gathers every rank's first and last ``min(h, kb W)``
  atoms (``P * 2h`` rows, not the atoms) and picks the halo from them (a halo atom is
  always within ``h`` of its owner's block edge);
* the atom-pair bias ``z[token(q), token(k)]`` of the local windows is a band of the pair
  tensor crossing tile borders: :func:`band_gather` sends every rank exactly the distinct
  token pairs its windows read, from the rank that holds them (one uneven all-to-all),
  so no rank holds more than its own windows' pairs;
* the token <-> atom maps use the atom -> token **index** (:func:`atom_token_index`, from
  the sharded one-hot), never a dense ``[M, N]`` product.

All functions are differentiable and keep autocp's gradient convention (summing a
value's local gradients over the ranks that hold a copy gives its gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from ..layout import LayoutError, block_size
from ..mesh import COL, ROW, SquareMesh

__all__ = ["FLAT_TAGS", "WindowPlan", "gather_flat", "all_reduce_flat", "band_gather", "atom_token_index",
           "tokens_to_atoms", "atoms_to_tokens", "window_keys"]

#: layout tags of a dim split over all P ranks by whole atom windows (window dim / atom dim)
FLAT_TAGS = ("w", "a")


def gather_flat(x: torch.Tensor, mesh: SquareMesh, dim: int, length: int) -> torch.Tensor:
    """The local blocks of a dim split over the flat mesh index ``r p + c`` -> the whole dim
    (first ``length`` slots; differentiable: all-gather over the row group, then the column group)."""
    if mesh.p == 1:
        return x.narrow(dim, 0, length)
    y = comm.all_gather_axis(x, mesh, ROW, dim)   # blocks r p + 0 .. r p + p-1
    y = comm.all_gather_axis(y, mesh, COL, dim)   # all rows, in flat order
    return y.narrow(dim, 0, length)


def all_reduce_flat(x: torch.Tensor, mesh: SquareMesh) -> torch.Tensor:
    """Differentiable sum over all ``p*p`` ranks."""
    if mesh.p == 1:
        return x
    return comm.all_reduce(comm.all_reduce(x, mesh, ROW), mesh, COL)


def window_keys(x: torch.Tensor, W: int, H: int) -> torch.Tensor:
    """Boltz's ``single_to_keys`` on a whole ``[B, M, D]`` tensor, without its ``[2K, hK]``
    indexing matrix: ``[B, K, H, D]``, the keys of window ``k`` are the atoms
    ``[W k - h, W k + W + h)`` (zero outside ``[0, M)``)."""
    h = (H - W) // 2
    ext = torch.nn.functional.pad(x, (0, 0, h, h))
    return ext.unfold(1, H, W).permute(0, 1, 3, 2)


class WindowPlan:
    """The window block of this rank for ``n_atoms`` atoms (see the module doc)."""

    def __init__(self, mesh: SquareMesh, n_atoms: int, W: int, H: int):
        if W <= 0 or n_atoms % W:
            raise LayoutError(f"atom windows: given {n_atoms} atoms and {W} queries per window; required a "
                              f"multiple of the window. Fix: pad the atoms to a multiple of {W} (Boltz's featurizer does).")
        if H < W or (H - W) % 2:
            raise LayoutError(f"atom windows: given {H} keys per window for {W} queries; required H >= W with "
                              f"an even difference (a symmetric halo).")
        self.mesh, self.W, self.H, self.M = mesh, W, H, n_atoms
        self.K = n_atoms // W
        self.P = mesh.p * mesh.p
        self.kb = max(1, block_size(self.K, self.P))
        self.f = mesh.r * mesh.p + mesh.c
        self.na = self.kb * W              # local atoms (padded)
        self.a0 = self.f * self.na         # first global atom of this block
        self.h = (H - W) // 2
        self._halo = None

    # -- replicated -> local (no communication)
    def atom_range(self, f: int | None = None) -> torch.Tensor:
        f = self.f if f is None else f
        return torch.arange(self.na) + f * self.na

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """A whole atom dim -> this rank's atoms (zero-padded to ``kb W``)."""
        return _slice_pad(x, dim, self.a0, self.na)

    def local_windows(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """A whole window dim -> this rank's windows (zero-padded to ``kb``)."""
        return _slice_pad(x, dim, self.f * self.kb, self.kb)

    def ext(self, x: torch.Tensor) -> torch.Tensor:
        """A whole ``[B, M, ...]`` atom tensor -> this rank's atoms with an ``h``-atom halo on
        each side ``[B, kb W + 2h, ...]`` (zero outside ``[0, M)``)."""
        return _slice_pad(x, 1, self.a0 - self.h, self.na + 2 * self.h)

    def keys(self, ext: torch.Tensor) -> torch.Tensor:
        """``[B, kb W + 2h, D]`` -> the keys of the local windows ``[B, kb, H, D]``."""
        return ext.unfold(1, self.H, self.W).permute(0, 1, 3, 2)

    # -- local -> halo (communication)
    def _halo_index(self):
        if self._halo is None:
            e = min(self.h, self.na)
            g = torch.cat([torch.arange(self.a0 - self.h, self.a0), torch.arange(self.a0 + self.na, self.a0 + self.na + self.h)])
            valid = (g >= 0) & (g < self.M)
            gc = g.clamp(0, self.M - 1)
            o = gc // self.na
            off = gc - o * self.na
            in_last = off >= self.na - e
            pos = torch.where(in_last, o * 2 * e + e + (off - (self.na - e)), o * 2 * e + off)
            pos = torch.where(valid, pos, 0)  # outside [0, M): zeroed below, any index will do
            self._halo = (e, pos, valid)
        return self._halo

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's atoms ``[B, kb W, D]`` -> with the neighbours' halo atoms
        ``[B, kb W + 2h, D]``: one all-gather of every rank's edge atoms (zero outside
        ``[0, M)``, this rank's own padding zeroed)."""
        e, pos, valid = self._halo_index()
        own_ok = (self.atom_range() < self.M).to(x.device, x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        x = x * own_ok
        edges = torch.cat([x[:, :e], x[:, self.na - e:]], 1).unsqueeze(0)      # [1, B, 2e, D]
        allg = gather_flat(edges, self.mesh, 0, self.P)                        # [P, B, 2e, D]
        flat = allg.transpose(0, 1).reshape(x.shape[0], self.P * 2 * e, *x.shape[2:])
        halo = flat.index_select(1, pos.to(x.device)) * valid.to(x.device, x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        return torch.cat([halo[:, :self.h], x, halo[:, self.h:]], 1)

    def halo_keys(self, x: torch.Tensor) -> torch.Tensor:
        """The ``to_keys`` of the local windows: ``[B, kb W, D]`` -> ``[B, kb, H, D]``."""
        return self.keys(self.exchange(x)).contiguous()

    def gather_atoms(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's atoms -> the whole atom dim (differentiable)."""
        return gather_flat(x, self.mesh, dim, self.M)


def _slice_pad(x: torch.Tensor, dim: int, lo: int, size: int) -> torch.Tensor:
    L = x.shape[dim]
    a, b = max(lo, 0), min(lo + size, L)
    if b <= a:
        shape = list(x.shape)
        shape[dim] = size
        return x.new_zeros(shape)
    part = x.narrow(dim, a, b - a)
    before, after = a - lo, size - (b - lo)
    if before or after:
        pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [before, after]
        part = torch.nn.functional.pad(part, pad)
    return part


# ----------------------------------------------------------------------------- token <-> atom
def atom_token_index(atom_to_token_tile: torch.Tensor, mesh: SquareMesh, n: int) -> torch.Tensor:
    """The atom -> token index ``[B, M]`` (``-1`` for an atom of no token) from the
    one-hot ``atom_to_token`` whose token dim is block ``T_r`` (tag ``"r"``, local
    ``[B, M, ceil(N/p)]``); one all-reduce of ``B M`` integers over the column group."""
    a = atom_to_token_tile
    b = a.shape[-1]
    nz = a != 0
    idx = torch.where(nz.any(-1), nz.to(torch.int8).argmax(-1) + mesh.r * b + 1, 0).to(torch.int64)
    if mesh.p > 1:
        idx = comm.all_reduce_(idx.clone(), mesh, COL)
    return idx - 1


def tokens_to_atoms(x_tile: torch.Tensor, mesh: SquareMesh, n: int, idx: torch.Tensor) -> torch.Tensor:
    """``atom_to_token @ x`` by index: a RowToken tile ``[B', b, C]`` (block ``T_r``) -> the
    atoms ``idx`` (``[B', A]`` global token ids, ``-1``: zero) ``[B', A, C]``."""
    full = comm.all_gather_axis(x_tile, mesh, COL, 1).narrow(1, 0, n) if mesh.p > 1 else x_tile.narrow(1, 0, n)
    valid = idx >= 0
    g = torch.gather(full, 1, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    return g * valid.unsqueeze(-1).to(g.dtype)


def atoms_to_tokens(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, mesh: SquareMesh, n: int) -> torch.Tensor:
    """``(atom_to_token * weight)^T @ x`` over all atoms: this rank's atoms ``x [B', A, C]``
    with global token ids ``idx [B', A]`` (``-1``: none) and per-atom weights
    ``weight [B', A]`` -> the RowToken tile ``[B', ceil(N/p), C]`` (block ``T_r``); one
    all-reduce of ``B' N C`` over the mesh."""
    valid = idx >= 0
    w = (weight * valid.to(weight.dtype)).unsqueeze(-1)
    out = x.new_zeros(x.shape[0], n, x.shape[-1])
    out = out.scatter_add(1, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]), x * w)
    out = all_reduce_flat(out, mesh)
    b = block_size(n, mesh.p)
    return _slice_pad(out, 1, mesh.r * b, b)


# ----------------------------------------------------------------------------- the pair band
class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return comm.all_to_all_uneven(x, out_splits, in_splits, group, name="band_gather")

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return comm.all_to_all_uneven(g, in_splits, out_splits, ctx.group, name="band_gather"), None, None, None


def _window_pair_ids(plan: WindowPlan, idx: torch.Tensor, f: int, n: int):
    """Distinct token pairs ``(b, i, j)`` read by the windows of flat rank ``f``: sorted
    ids ``(b N + i) N + j``, the inverse map of its ``[B, kb, W, H]`` pairs, the validity."""
    B = idx.shape[0]
    tq = _slice_pad(idx + 1, 1, f * plan.na, plan.na) - 1                       # [B, kb W]
    tk = plan.keys(_slice_pad(idx + 1, 1, f * plan.na - plan.h, plan.na + 2 * plan.h).unsqueeze(-1)).squeeze(-1) - 1
    tq = tq.view(B, plan.kb, plan.W)
    valid = (tq >= 0).unsqueeze(-1) & (tk >= 0).unsqueeze(-2)                   # [B, kb, W, H]
    bb = torch.arange(B, device=idx.device).view(B, 1, 1, 1)
    ids = (bb * n + tq.unsqueeze(-1).clamp(min=0)) * n + tk.unsqueeze(-2).clamp(min=0)
    uniq, inv = torch.unique(ids[valid], sorted=True, return_inverse=True)
    return uniq, inv, valid


def band_gather(z_tile: torch.Tensor, idx: torch.Tensor, plan: WindowPlan, n: int) -> torch.Tensor:
    """``z[b, token(q), token(k), :]`` for the query / key atoms of this rank's windows:
    ``[B, kb, W, H, D]`` (zero where an atom has no token), from the Pair2D tiles
    ``z_tile [B, b, b, D]`` (``z[T_r, T_c]``) and the replicated atom -> token index
    ``idx [B, M]``. Every rank computes from ``idx`` which distinct token pairs each rank's
    windows read and which rank holds them; one uneven all-to-all moves exactly those."""
    mesh = plan.mesh
    B, D = idx.shape[0], z_tile.shape[-1]
    bn = block_size(n, mesh.p)
    if mesh.p == 1:
        uniq, inv, valid = _window_pair_ids(plan, idx, 0, n)
        zf = z_tile.reshape(-1, D)
        bi, rest = uniq // (n * n), uniq % (n * n)
        loc = (bi * bn + rest // n) * bn + rest % n
        u = zf.index_select(0, loc)
    else:
        order = mesh.flat_order()                       # group rank -> (r, c)
        send, in_splits = [], []
        zf = z_tile.reshape(-1, D)
        mine = None
        for (r, c) in order:                             # destinations, in group-rank order
            f = r * mesh.p + c
            uniq, inv, valid = _window_pair_ids(plan, idx, f, n)
            rest = uniq % (n * n)
            i, j, bi = rest // n, rest % n, uniq // (n * n)
            owner = (i // bn) * mesh.p + (j // bn)       # flat index of the holder
            if f == plan.f:
                mine = (uniq, inv, valid, owner)
            sel = owner == plan.f
            loc = (bi[sel] * bn + (i[sel] - mesh.r * bn)) * bn + (j[sel] - mesh.c * bn)
            send.append(zf.index_select(0, loc))
            in_splits.append(int(sel.sum()))
        uniq, inv, valid, owner = mine
        perm, out_splits = [], []
        for (r, c) in order:                             # senders, in group-rank order
            pos = torch.nonzero(owner == r * mesh.p + c).flatten()
            perm.append(pos)
            out_splits.append(int(pos.numel()))
        recv = _AllToAll.apply(torch.cat(send, 0), out_splits, in_splits, mesh.flat_group())
        perm = torch.cat(perm)
        u = recv.new_zeros(uniq.numel(), D).index_copy(0, perm, recv)
    out = z_tile.new_zeros(B, plan.kb, plan.W, plan.H, D)
    out = out.masked_scatter(valid.unsqueeze(-1), u.index_select(0, inv))
    return out
