"""Pass 5c -- storage: how the glue of a tile program holds its pair tensors.

Requires: a :class:`autocp.passes.shard.TileProgram` (its emitted nodes carry
``rec(node).tags``, the tags the sharding pass proved) and the kinds of its
opaque calls.

Two rewrites of the emitted graph, both value-preserving where they apply:

* :func:`pair_storage_dtype` (opt-in, ``parallelize(..., pair_dtype=torch.bfloat16)``):
  pair tensors of the glue stay in ``pair_dtype``. A pointwise op whose pair operand is
  in ``pair_dtype`` computes in it (its small broadcast operands -- a ``[B, b, 1, 1]`` fp32
  dropout mask, a scalar tensor -- are cast down instead of the tile being promoted to
  fp32), and ``x.to(float32)`` of a pair tensor keeps ``pair_dtype`` (``.float()`` before
  a distributed op: the ops accumulate in fp32 inside their chunks anyway). This changes
  numerics the way bf16 storage does (documented in docs/memory.md); it is never on by
  default.
* :func:`reinplace` (always; acts only without autograd): ``add`` / ``mul`` whose result
  has the shape and dtype of an operand that is *fresh* (produced by a non-aliasing ATen
  op or returned by a registered distributed op) and dead after the op write into that
  operand (``z = z + dropout * op(z)`` then allocates no new tile). Proven statically: the
  operand's other users all come earlier and none of them can alias it (non-aliasing ATen
  ops or registered distributed ops); shape, dtype and grad mode are checked at run time
  (out of place otherwise, so training is untouched).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from .record import put, rec

__all__ = ["pair_storage_dtype", "reinplace", "apply_storage_passes"]

aten = torch.ops.aten

_FLOAT_CASTS = (aten.to.dtype, aten._to_copy.default)
_BINARY = {aten.add.Tensor: "add", aten.mul.Tensor: "mul"}


def _is_pair(tags) -> bool:
    if not isinstance(tags, tuple):
        return False
    from .tile_ops import base_tag

    return sum(1 for t in tags if t is not None and base_tag(t) in ("r", "c")) >= 2


def _aten_fresh(target) -> bool:
    """An ATen op that returns a new tensor (no alias annotation, not mutating)."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    sch = target._schema
    if sch.is_mutable or len(sch.returns) != 1:
        return False
    return sch.returns[0].alias_info is None


def _mutating(node) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable


# ----------------------------------------------------------------------------- runtime helpers
def _storage_cast(args, dtype):
    """The operands with the storage rule applied: when the largest floating operand (the
    pair tile) is in ``dtype``, the other floating operands are cast to ``dtype``."""
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if floats:
        big = max(a.numel() for a in floats)
        if any(a.numel() == big and a.dtype == dtype for a in floats):
            return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype
                         else a for a in args)
    return tuple(args)


def pointwise_in_storage_dtype(fn, dtype, *args, **kwargs):
    """``fn(*args)`` computed in ``dtype`` when its largest floating operand (the pair tile)
    is in ``dtype``: the smaller floating operands are cast to ``dtype`` first."""
    return fn(*_storage_cast(args, dtype), **kwargs)


def keep_storage_dtype(x, dtype):
    """``x.to(float32)`` of a pair tensor under the storage policy: stays in ``dtype``."""
    return x if x.dtype == dtype else x.to(dtype)


def binary_maybe_inplace(kind: str, target: int, a, b, storage_dtype=None):
    """``a + b`` / ``a * b``, written into operand ``target`` (0: ``a``, 1: ``b``) when no
    autograd records and the result has that operand's shape and dtype (``storage_dtype``:
    the pair storage rule of :func:`pointwise_in_storage_dtype` applied first)."""
    if storage_dtype is not None:
        a, b = _storage_cast((a, b), storage_dtype)
    out_of_place = torch.add if kind == "add" else torch.mul
    dst = (a, b)[target]
    other = (a, b)[1 - target]
    if not isinstance(dst, torch.Tensor) or (torch.is_grad_enabled() and (
            dst.requires_grad or (isinstance(other, torch.Tensor) and other.requires_grad))):
        return out_of_place(a, b)
    oshape = other.shape if isinstance(other, torch.Tensor) else ()
    if (torch.broadcast_shapes(dst.shape, oshape) != dst.shape or torch.result_type(a, b) != dst.dtype
            or not _writable(dst)):
        return out_of_place(a, b)
    return dst.add_(other) if kind == "add" else dst.mul_(other)


def binary_into_unaliased(kind: str, target: int, a, b, *inputs):
    """:func:`binary_maybe_inplace` when operand ``target`` shares storage with none of
    ``inputs`` (the program's inputs), else out of place: a redistribution's result is
    fresh on most ranks, but on a diagonal rank a transpose exchange returns its input."""
    dst = (a, b)[target]
    if isinstance(dst, torch.Tensor):
        key = dst.untyped_storage()._cdata
        if any(isinstance(x, torch.Tensor) and x.untyped_storage()._cdata == key for x in inputs):
            return torch.add(a, b) if kind == "add" else torch.mul(a, b)
    return binary_maybe_inplace(kind, target, a, b)


def _writable(t: torch.Tensor) -> bool:
    """No two elements share memory (an expanded tensor is not)."""
    return all(s != 0 or n == 1 for s, n in zip(t.stride(), t.shape))


# ----------------------------------------------------------------------------- passes
def pair_storage_dtype(gm: fx.GraphModule, dtype: torch.dtype) -> int:
    """Rewrite ``gm`` so its pair tensors stay in ``dtype`` (see the module doc); returns
    the number of rewritten nodes."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        tags = rec(node).tags
        if not _is_pair(tags):
            continue
        tgt = node.target
        if tgt in _FLOAT_CASTS:
            to = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 and tgt is aten.to.dtype else None)
            if to is not torch.float32 or (tgt is aten._to_copy.default and any(_mutating(u) for u in node.users)):
                continue
            src = node.args[0]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(keep_storage_dtype, (src, dtype))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
        elif (isinstance(tgt, torch._ops.OpOverload) and torch.Tag.pointwise in tgt.tags
              and not tgt._schema.is_mutable):
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(pointwise_in_storage_dtype, (tgt, dtype, *node.args), dict(node.kwargs))
            new.meta.update(node.meta)
            put(new, fresh=True)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def reinplace(gm: fx.GraphModule, opaque_kinds=None) -> int:
    """Make dead-operand ``add`` / ``mul`` of pair tensors in place (inference only, decided
    at run time); returns the number of rewritten nodes. ``opaque_kinds[k]``: the kind of
    the ``k``-th opaque call (only ``"module"`` -- a registered distributed op -- is trusted
    not to return or keep an alias of its inputs)."""
    from . import tile_ops as T
    from .shard import invoke_opaque

    kinds = list(opaque_kinds or [])  # "module": trusted
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def trusted_opaque(node) -> bool:
        if node.op != "call_function" or node.target is not invoke_opaque:
            return False
        mod = node.args[0]
        if not (isinstance(mod, fx.Node) and mod.target is operator.getitem and isinstance(mod.args[1], int)):
            return False
        k = mod.args[1]
        return k < len(kinds) and kinds[k] == "module"

    def from_input(node) -> bool:
        """``node`` is a program input or a view chain of one (its storage is an input's)."""
        while isinstance(node, fx.Node) and node.op == "call_function":
            t = node.target
            if not (isinstance(t, torch._ops.OpOverload) and len(t._schema.returns) == 1
                    and t._schema.returns[0].alias_info is not None and not t._schema.is_mutable):
                return False
            node = node.args[0]
        return isinstance(node, fx.Node) and node.op == "placeholder"

    def redistributed(node) -> bool:
        """A tile_ops redistribution of an input (or a view of one): fresh unless it returned
        that input itself (a diagonal rank's transpose exchange; checked at run time)."""
        return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is T.convert
                and from_input(node.args[0]))

    def fresh(node) -> bool:
        if redistributed(node):
            return True
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
        if rec(node).fresh:
            return True
        if node.target is operator.getitem:
            return trusted_opaque(node.args[0])
        return _aten_fresh(node.target)

    def safe_user(u) -> bool:
        return u.op == "call_function" and (_aten_fresh(u.target) or trusted_opaque(u)
                                            or u.target is pointwise_in_storage_dtype)

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target in _BINARY and len(node.args) == 2:
            kind, operands, sdt = _BINARY[node.target], tuple(node.args), None
        elif (node.target is pointwise_in_storage_dtype and len(node.args) == 4 and node.args[0] in _BINARY):
            kind, operands, sdt = _BINARY[node.args[0]], tuple(node.args[2:]), node.args[1]
        else:
            continue
        if not _is_pair(rec(node).tags):
            continue
        pick = None
        for i, a in enumerate(operands):
            if not fresh(a):
                continue
            others = [u for u in a.users if u is not node]
            if all(order[u] < order[node] and safe_user(u) for u in others) and operands[1 - i] is not a:
                pick = i
                break
        if pick is None:
            continue
        with gm.graph.inserting_before(node):
            if redistributed(operands[pick]) and sdt is None:
                new = gm.graph.call_function(binary_into_unaliased, (kind, pick, *operands, *places))
            elif redistributed(operands[pick]):
                continue
            else:
                new = gm.graph.call_function(binary_maybe_inplace, (kind, pick, *operands, sdt))
        new.meta.update(node.meta)
        put(new, fresh=True)  # writes into a fresh tensor nobody else reads: owned like one
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        order[new] = order[node]
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def apply_storage_passes(prog, trusted, pair_dtype=None) -> dict:
    """Both passes on a :class:`TileProgram` (storage dtype first); ``trusted[k]``: the
    ``k``-th opaque call is a distributed op (never returns or keeps an alias of its
    inputs). Returns the counts of rewritten nodes."""
    kinds = ["module" if t else "other" for t in trusted]
    out = {"pair_dtype": 0, "inplace": 0}
    if pair_dtype is not None:
        out["pair_dtype"] = pair_storage_dtype(prog.gm, pair_dtype)
    out["inplace"] = reinplace(prog.gm, kinds)
    return out
