"""One-hot maps held as indices: ``IndexMap``.

AF3-style featurizers give token <-> atom maps as dense one-hot tensors (Boltz:
``atom_to_token [B, M, N]``, ``token_to_rep_atom [B, N, M]``, int64). Tiled like any token
feature they still cost ``M N / p`` per rank -- 8 GiB each at 30,000 tokens and
270,000 atoms on 8x8 -- and every ``.float()`` of one makes a 4-byte copy. An
:class:`IndexMap` keeps only the column of each row's one (``idx [B, R]``, ``-1``: an
all-zero row; replicated, O(M)) and answers the calls models make on such maps without
building them:

* ``.float() / .long() / .to(dtype) / .bool() / .int()``: the same map in that dtype;
* ``repeat_interleave(k, dim=0)``: the batch repeated;
* ``torch.bmm(map, x)`` / ``map @ x``: row ``r`` of the result is ``x[idx[r]]`` (a gather);
  sharded rows give this rank's row block (a :class:`~autocp.passes.eager.TileTensor`),
  a sharded ``x`` is gathered along the contracted token dim first (O(N C));
* ``.sum(dim)``: over rows, the per-column counts; over columns, ``idx >= 0``.

Anything else builds this rank's dense tile (exactly the tile the dense layout would
hold; warned, refused under strict mode) and runs as before. Values are exact: the map
is built from the dense tensor only when every row has at most one non-zero, equal to 1
(:func:`index_map_of` returns ``None`` otherwise and the caller keeps the dense tile).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

__all__ = ["IndexMap", "index_map_of"]


class IndexMap(torch.Tensor):
    """A one-hot ``[B, R, K]`` map as ``idx [B, R]`` (global column per row, -1: none).
    ``tags``: the layout the dense tensor has on the mesh (one tag per dim, e.g.
    ``(None, None, "r")`` for ``atom_to_token``: its token columns are block ``T_r``)."""

    @staticmethod
    def __new__(cls, idx: torch.Tensor, k: int, dtype: torch.dtype, tags):
        shape = (int(idx.shape[0]), int(idx.shape[1]), int(k))
        r = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=idx.device, requires_grad=False)
        r._idx = idx
        r._tags = tuple(tags)
        return r

    @property
    def idx(self) -> torch.Tensor:
        return self._idx

    # a traceable wrapper: memory trackers count the index it holds, not a dense map
    def __tensor_flatten__(self):
        return ["_idx"], (int(self.shape[2]), self.dtype, self._tags)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return IndexMap(inner["_idx"], *ctx)

    @property
    def tags(self) -> tuple:
        return self._tags

    def __repr__(self):
        with torch._C.DisableTorchFunctionSubclass():
            return f"IndexMap(shape={tuple(self.shape)}, tags={self._tags}, dtype={self.dtype})"

    __str__ = __repr__

    def _with(self, idx=None, dtype=None) -> "IndexMap":
        return IndexMap(self._idx if idx is None else idx, self.shape[2], dtype or self.dtype, self._tags)

    def dense_tile(self):
        """This rank's tile of the dense map (a TileTensor when a dim is sharded)."""
        from .context import current
        from .eager import TileTensor
        from .rewrite import shard_tags

        ctx = current()
        b, r, k = self.shape
        dense = torch.zeros((b, r, k + 1), dtype=self.dtype, device=self._idx.device)
        dense.scatter_(2, (self._idx % (k + 1)).unsqueeze(-1), 1)  # -1 -> the dropped column k
        dense = dense[:, :, :k]
        if all(t is None for t in self._tags):
            return dense
        return TileTensor(shard_tags(dense, self._tags, ctx.mesh).contiguous(), self._tags, dense.shape)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from .eager import METADATA_CALLS

        if func in METADATA_CALLS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        out = _handle(func, args, kwargs)
        if out is not NotImplemented:
            return out
        from .eager import is_strict

        name = getattr(func, "__name__", str(func))
        if is_strict():
            from .eager import EagerShardingError

            raise EagerShardingError(f"autocp (strict): {name} on a one-hot map held as indices would build its "
                                     f"dense tile (O(M N / p)). Fix: use bmm / sum / repeat_interleave on it, or "
                                     f"run without strict.")
        warnings.warn(f"autocp: {name} on a one-hot map builds its dense tile (exact, O(M N / p) per rank)",
                      stacklevel=3)
        from torch.utils._pytree import tree_map

        a, kw = tree_map(lambda x: x.dense_tile() if isinstance(x, IndexMap) else x, (args, kwargs))
        return func(*a, **kw)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from .eager import EagerShardingError

        raise EagerShardingError(f"autocp IndexMap: {func} reached the dispatcher (a call that bypassed "
                                 f"__torch_function__). Fix: call it through torch / Tensor methods.")


_CASTS = {torch.Tensor.float: torch.float32, torch.Tensor.long: torch.int64, torch.Tensor.int: torch.int32,
          torch.Tensor.bool: torch.bool, torch.Tensor.double: torch.float64, torch.Tensor.half: torch.float16,
          torch.Tensor.bfloat16: torch.bfloat16}


def _handle(func, args, kwargs):
    m = args[0] if args else None
    if func in _CASTS and isinstance(m, IndexMap) and not kwargs:
        return m._with(dtype=_CASTS[func])
    if func is torch.Tensor.to and isinstance(m, IndexMap):
        dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
        rest = [a for a in args[1:] if not isinstance(a, torch.dtype)]
        if dtype is not None and not rest and set(kwargs) <= {"dtype"}:
            return m._with(dtype=dtype)
        return NotImplemented
    if func in (torch.Tensor.repeat_interleave, torch.repeat_interleave) and isinstance(m, IndexMap):
        reps = args[1] if len(args) > 1 else kwargs.get("repeats")
        dim = args[2] if len(args) > 2 else kwargs.get("dim")
        if isinstance(reps, int) and dim in (0, -3):
            return m._with(idx=m._idx.repeat_interleave(reps, 0))
        return NotImplemented
    if func in (torch.bmm, torch.matmul, torch.Tensor.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__) \
            and isinstance(m, IndexMap) and len(args) == 2 and not kwargs:
        return _apply(m, args[1])
    if func in (torch.sum, torch.Tensor.sum) and isinstance(m, IndexMap):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = bool(kwargs.get("keepdim", False))
        if isinstance(dim, int) and not keep and set(kwargs) <= {"dim", "keepdim"}:
            return _sum(m, dim % 3)
        return NotImplemented
    return NotImplemented


def _rows_block(m: IndexMap):
    """``(idx of the rows this rank holds, row tag)``."""
    from ..layout import block_size
    from .context import current

    t = m.tags[1]
    if t is None:
        return m._idx, None
    ctx = current()
    n = m.shape[1]
    b = block_size(n, ctx.mesh.p)
    i = ctx.mesh.r if t in ("r", "s") else ctx.mesh.c
    lo, hi = min(i * b, n), min((i + 1) * b, n)
    blk = m._idx[:, lo:hi]
    if hi - lo < b:
        blk = torch.cat([blk, blk.new_full((blk.shape[0], b - (hi - lo)), -1)], 1)
    return blk, t


def _apply(m: IndexMap, x):
    """``bmm(map, x)``: row ``r`` -> ``x[:, idx[r]]`` (zero for -1)."""
    from .eager import TileTensor

    if isinstance(x, IndexMap):
        return NotImplemented
    if isinstance(x, TileTensor):
        if x.dim() != 3 or any(t is not None for i, t in enumerate(x.tags) if i != 1):
            return NotImplemented
        x = x.full()  # the contracted dim whole: O(K C)
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != m.shape[2]:
        return NotImplemented
    if x.dtype != m.dtype:
        raise RuntimeError(f"expected m1 and m2 to have the same dtype, but got: {m.dtype} != {x.dtype}")
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))  # as autocast runs bmm: a 0/1 map times x in low precision
    idx, tag = _rows_block(m)
    bsz = max(idx.shape[0], x.shape[0])
    idx = idx.expand(bsz, -1) if idx.shape[0] != bsz else idx
    xx = x.expand(bsz, -1, -1) if x.shape[0] != bsz else x
    g = torch.gather(xx, 1, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, xx.shape[-1]))
    out = g * (idx >= 0).unsqueeze(-1).to(g.dtype)
    if tag is None:
        return out
    return TileTensor(out, (None, tag, None), (bsz, m.shape[1], x.shape[-1]))


def _sum(m: IndexMap, dim: int):
    from .eager import TileTensor

    if dim == 2:  # over columns: 1 where the row has its one
        idx, tag = _rows_block(m)
        out = (idx >= 0).to(_sum_dtype(m.dtype))
        return out if tag is None else TileTensor(out, (None, tag), (m.shape[0], m.shape[1]))
    if dim == 1:  # over rows: how many rows point at each column
        k = m.shape[2]
        cnt = torch.zeros((m._idx.shape[0], k + 1), dtype=torch.int64, device=m._idx.device)
        cnt.scatter_add_(1, m._idx % (k + 1), torch.ones_like(m._idx))
        cnt = cnt[:, :k].to(_sum_dtype(m.dtype))
        tag = m.tags[2]
        if tag is None:
            return cnt
        from .context import current
        from .rewrite import shard_tags

        ctx = current()
        return TileTensor(shard_tags(cnt, (None, tag), ctx.mesh).contiguous(), (None, tag), tuple(cnt.shape))
    return NotImplemented


def _sum_dtype(dtype):
    return torch.int64 if (dtype == torch.bool or not dtype.is_floating_point) else dtype


def index_map_of(dense: torch.Tensor, tags) -> Optional[IndexMap]:
    """The :class:`IndexMap` of a whole dense one-hot ``[B, R, K]``, or ``None`` when it is
    not one (a row with more than one non-zero, or a value other than 0 / 1): the caller
    keeps the dense tensor then."""
    if dense.dim() != 3 or dense.dtype.is_complex:
        return None
    nz = dense != 0
    if bool((nz.sum(-1) > 1).any()) or bool((dense[nz] != 1).any()):
        return None
    idx = torch.where(nz.any(-1), nz.to(torch.int8).argmax(-1), -1).to(torch.int64)
    return IndexMap(idx, dense.shape[2], dense.dtype, tags)
