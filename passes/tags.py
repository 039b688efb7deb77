"""Per-tensor layout tags of a call's pytree (``(args, kwargs)`` or an output).

A *tag tuple* gives, for each dim of one tensor leaf, ``'r'`` / ``'c'`` (token axis split
over mesh rows / columns), ``'s'`` (MSA rows) or ``None``; a call carries one tag tuple per
tensor leaf in ``tree_flatten`` order (missing trailing entries mean ``None``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["map_tagged", "op_name", "tag_entry", "layout_name", "kind_of", "canonical_out_tags", "TOKEN_TAGS",
           "infer_input_layouts", "tags_of_layout"]

TOKEN_TAGS = ("r", "c")


def map_tagged(tree, tags: Sequence[Optional[tuple]], fn: Callable[[torch.Tensor, Optional[tuple]], torch.Tensor]):
    """Rebuild ``tree`` with every tensor leaf replaced by ``fn(leaf, its tag tuple)``."""
    leaves, spec = tree_flatten(tree)
    out, k = [], 0
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            leaf = fn(leaf, tags[k] if k < len(tags) else None)
            k += 1
        out.append(leaf)
    return tree_unflatten(out, spec)


def op_name(target) -> str:
    """The op's overload-packet name (``aten.add.Tensor`` -> ``"add"``), else its ``__name__``."""
    if hasattr(target, "_overloadpacket"):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def tag_entry(t) -> str:
    """One dim's tag as text: ``.`` whole, ``r`` / ``c`` / ``s``, ``outer*tag*inner`` merged."""
    return "." if t is None else (t if isinstance(t, str) else f"{t[1]}*{t[0]}*{t[2]}")


def layout_name(tags) -> str:
    """Human name of a tag tuple: Pair2D / Pair2D^T / RowToken / ColToken / MsaTiles / ..."""
    if tags is None:
        return "-"
    if isinstance(tags, list):
        return ", ".join(layout_name(t) for t in tags)
    real = [t for t in tags if t is not None]
    body = "[" + ",".join(tag_entry(t) for t in tags) + "]"
    if not real:
        return "Replicated"
    if real == ["r", "c"]:
        return "Pair2D"
    if real == ["c", "r"]:
        return "Pair2D^T"
    if real == ["r"]:
        return "RowToken"
    if real == ["c"]:
        return "ColToken"
    if real == ["s", "c"]:
        return "MsaTiles"
    return "Mixed" + body


def kind_of(tags) -> str:
    """``"pair"`` (two token axes), ``"token"`` (one), ``"msa"`` or ``"other"``."""
    if not isinstance(tags, tuple):
        return "other"
    if "s" in tags:
        return "msa"
    n = sum(1 for t in tags if t in ("r", "c", "?"))
    return "pair" if n >= 2 else ("token" if n == 1 else "other")


def canonical_out_tags(meta, n):
    """Output tags of a fallback module from its output ``(shape, dtype)`` list: dims of
    length ``n`` after the batch dim become ``r``, ``c`` in order (the documented
    convention of a gathered module's outputs)."""
    out = []
    for shape, _dtype in meta:
        tags = [None] * len(shape)
        order = iter(("r", "c"))
        for d, s in enumerate(shape):
            if d >= 1 and s == n:
                tags[d] = next(order, None)
        out.append(tuple(tags))
    return out


def infer_input_layouts(inputs: list, n_tokens: Optional[int] = None):
    """Guess tag tuples for the flattened tensor inputs: ``[B,N,N,...]`` -> Pair2D,
    ``[B,S,N,...]`` / ``[B,S,N]`` (S != N) -> MsaTiles, ``[B,N,...]`` -> RowToken, else Replicated.
    N is the first square pair tensor's length when not given."""
    if n_tokens is None:
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[1] == t.shape[2]:
                n_tokens = int(t.shape[1])
                break
    if n_tokens is None:
        raise ValueError(
            "autocp: cannot tell the token length N from the inputs (no [B, N, N, ...] pair tensor). "
            "Fix: pass input_layouts={name: autocp.Pair2D() | RowToken() | ...} to parallelize."
        )
    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor):
            out.append(None)
            continue
        tags = [None] * t.dim()
        if t.dim() >= 3 and t.shape[1] == n_tokens and t.shape[2] == n_tokens:
            tags[1], tags[2] = "r", "c"
        elif t.dim() >= 3 and t.shape[2] == n_tokens and t.shape[1] != n_tokens:  # [B,S,N(,C)]
            tags[1], tags[2] = "s", "c"
        elif t.dim() >= 2 and t.shape[1] == n_tokens:
            tags[1] = "r"
        out.append(tuple(tags))
    return out, n_tokens


def tags_of_layout(layout, ndim: int):
    """Tag tuple of an :class:`autocp.layout.Layout` for a tensor with ``ndim`` dims."""
    tags = [None] * ndim
    name = type(layout).__name__
    for d, a in zip(layout.dims, layout.axes):
        if name == "MsaTiles" and a == "r":
            tags[d] = "s"
        else:
            tags[d] = a
    return tuple(tags)
