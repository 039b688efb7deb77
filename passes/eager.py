"""Eager 2D tensors: a model's own python, op by op, through the shard rule table.

Some model code cannot be captured as one graph: host-side control flow on data
(``if torch.any(x > 0)``, ``.item()``, recycling and sampling loops, ``torch.unique``
loops inside a ``try``). Running such python on raw tiles is unsound (a glue op like
``mask[:, :, None] * mask[:, None, :]`` on a rank holding ``mask[T_r]`` computes
``T_r x T_r`` where ``T_r x T_c`` is needed). :class:`TileTensor` makes it sound the way
DTensor does, with autocp's rules:

* a ``TileTensor`` has the tensor's **global** shape and dtype; it holds this rank's tile
  (``.local``) and one layout tag per dim (``.tags``: ``"r"`` / ``"c"`` token blocks over
  mesh rows / columns, ``"s"`` MSA rows, ``None`` whole);
* every torch function called with a ``TileTensor`` argument (``__torch_function__``) is
  traced once per signature into an ATen graph on fake tensors of the global shapes
  (``make_fx``), sharded by :func:`autocp.passes.shard.shard_graph` -- the same rule
  table as the compiled path: tile-local, an inserted redistribution, a distributed
  reduction / contraction, or an exact gathered fallback (noted; refused under
  ``strict``) -- and the resulting tile program runs on the local tiles;
* results whose tags are all ``None`` (replicated: identical on every rank) come back as
  **plain tensors**, so ``bool(...)``, ``.item()``, ``torch.unique`` and python control
  flow on them work unchanged; the others come back as ``TileTensor``;
* autograd records on the local tiles (the tile programs' own ops and their
  communication), so gradients follow autocp's convention: summing a replicated
  value's local gradients over all ranks gives the single-device gradient (what
  :mod:`autocp.grad_sync` does).

Metadata queries (``shape``, ``dim()``, ``dtype``, ...) answer from the global metadata
without tracing. Functions that return python values of a sharded tensor (``item``,
``tolist``, ``__bool__``, ``equal``) gather it first (exact).

Use :func:`distribute` to make one, ``x.full()`` to gather it; both need an active
:func:`autocp.passes.context.tile_context` (the mesh and the global token length N).
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .context import current, log_notes
from . import tile_ops as T
from .rewrite import gather_tags, shard_tags
from .shard import ShardingError, shard_graph, standard_tags
from .storage import reinplace
from .wrapper import ModuleWrapper
from ..tile_io import FLAT_TAGS

__all__ = ["TileTensor", "distribute", "eager_stats", "EagerShardingError", "clear_cache", "strict_mode",
           "RegisteredOp", "bind_registered", "global_shape"]


class EagerShardingError(BaseException):
    """A torch function on a TileTensor that the rules refuse (strict mode, or a write
    autocp cannot prove), or that failed inside its tile program. Derives from
    ``BaseException`` on purpose: a model's own ``try/except Exception`` (Boltz's
    ``compute_ptms`` turns any exception into pTM = ipTM = 0) must not turn a refusal into
    a silent wrong result."""


_METADATA = {
    torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.is_floating_point,
    torch.Tensor.is_complex, torch.Tensor.element_size, torch.Tensor.nelement, torch.Tensor.ndimension,
    torch.Tensor.__len__, torch.Tensor.is_contiguous, torch.Tensor.get_device,
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.layout.__get__,
    torch.Tensor.is_sparse.__get__, torch.Tensor.is_quantized.__get__, torch.Tensor.is_meta.__get__,
    torch.Tensor.__hash__,
}
# python values of the data: gather (exact), then the plain call
_TO_PYTHON = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.numpy, torch.equal, torch.Tensor.equal, torch.Tensor.__format__,
    torch.Tensor.__repr__, torch.Tensor.__str__, torch.Tensor.__array__, torch.Tensor.cpu,
}


class TileTensor(torch.Tensor):
    """A tensor 2D-sharded over the mesh (see the module doc). ``shape``: global; ``local``:
    this rank's tile (on rank ``(r, c)``: block ``T_r`` of each ``"r"`` dim, ``T_c`` of each
    ``"c"`` dim, padded to ``ceil(N / p)``); ``tags``: one layout tag per dim."""

    _local: torch.Tensor
    _tags: tuple

    @staticmethod
    def __new__(cls, local: torch.Tensor, tags, shape):
        r = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=local.dtype, device=local.device,
                                                requires_grad=False)
        r._local = local
        r._tags = tuple(tags)
        return r

    @property
    def local(self) -> torch.Tensor:
        return self._local

    @property
    def tags(self) -> tuple:
        return self._tags

    @property
    def requires_grad(self):  # noqa: D401 -- the local tile's (autograd runs on the tiles)
        return self._local.requires_grad

    @property
    def grad(self):
        return self._local.grad

    @property
    def grad_fn(self):
        return self._local.grad_fn

    def full(self) -> torch.Tensor:
        """The whole tensor on every rank (differentiable all-gathers)."""
        ctx = _ctx("TileTensor.full")
        x, tags = self._local, self._tags
        if any(t in _FLAT for t in tags):  # atom windows split over the whole mesh
            from ..ops.atom_windows import gather_flat

            for d, t in enumerate(tags):
                if t in _FLAT:
                    x = gather_flat(x, ctx.mesh, d, int(self.shape[d]))
            tags = tuple(None if t in _FLAT else t for t in tags)
        return gather_tags(x, tags, ctx.mesh, ctx.n, ctx.n_seq)

    def __repr__(self):
        with torch._C.DisableTorchFunctionSubclass():
            return (f"TileTensor(shape={tuple(self.shape)}, tags={self._tags}, dtype={self.dtype}, "
                    f"local={tuple(self._local.shape)})")

    __str__ = __repr__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise EagerShardingError(
            f"autocp TileTensor: {func} reached the dispatcher with a TileTensor (a call that bypassed "
            f"__torch_function__). Fix: call the op through torch / Tensor methods, or on x.full().")


def distribute(x: torch.Tensor, tags) -> TileTensor:
    """This rank's ``TileTensor`` of the whole tensor ``x`` (same on every rank) with layout
    ``tags`` (e.g. ``(None, "r", "c", None)`` for a Pair2D ``z[B, N, N, C]``)."""
    ctx = _ctx("distribute")
    tags = tuple(tags)
    if len(tags) != x.dim():
        raise ValueError(f"distribute: given {len(tags)} tags {tags} for a {x.dim()}-dim tensor; required one per "
                         f"dim. Fix: e.g. (None, 'r', 'c', None) for z[B, N, N, C].")
    if all(t is None for t in tags):
        return x
    local = shard_tags(x, tags, ctx.mesh)
    # a view (a row block of a token feature is one) would keep the whole tensor's storage alive
    local = local.clone(memory_format=torch.contiguous_format) if local._is_view() else local.contiguous()
    return TileTensor(local, tags, x.shape)


# ----------------------------------------------------------------------------- dispatch
_STRICT = threading.local()


@contextlib.contextmanager
def strict_mode(on: bool = True):
    """Inside the block, a torch function on a TileTensor that would gather a sharded
    tensor (no rule makes it tile-local) raises :class:`EagerShardingError` naming the
    op and the fix, instead of running gathered with a warning."""
    old = getattr(_STRICT, "on", False)
    _STRICT.on = on
    try:
        yield
    finally:
        _STRICT.on = old


def _strict() -> bool:
    return getattr(_STRICT, "on", False)


_CACHE: dict = {}
_LOCK = threading.Lock()
_STATS = {"traced": 0, "calls": 0, "gathered_python": 0}


def eager_stats() -> dict:
    """Counters: distinct signatures traced, calls, python-value gathers."""
    return dict(_STATS, cached=len(_CACHE))


def clear_cache() -> None:
    _CACHE.clear()


def _ctx(what):
    return current()  # raises, naming the fix, outside a tile context


def _hashable(x):
    if isinstance(x, slice):
        return ("slice", _hashable(x.start), _hashable(x.stop), _hashable(x.step))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_hashable(a) for a in x)
    if isinstance(x, dict):
        return ("dict",) + tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    try:
        hash(x)
        return x
    except TypeError:
        return ("repr", repr(x))


def _scalar_index(a) -> bool:
    return (not isinstance(a, TileTensor) and a.numel() == 1 and not a.dtype.is_floating_point
            and not a.dtype.is_complex and not a.requires_grad and a.device.type != "meta")


def _plain_call(func, args, kwargs):
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


#: the metadata calls (shape, dtype, ...) a tensor subclass answers without running anything
METADATA_CALLS = _METADATA


def is_strict() -> bool:
    """True inside :func:`strict_mode`."""
    return _strict()


def _dispatch(func, args, kwargs):
    if func in _METADATA:
        return _plain_call(func, args, kwargs)
    leaves, spec = tree_flatten((args, kwargs))
    _check_view_writes(func, args, leaves)
    imap = next((type(a) for a in leaves if type(a).__name__ == "IndexMap"), None)
    if imap is not None:  # a one-hot map (passes/index_map.py) met a tile: its handlers decide
        return imap.__torch_function__(func, (), args, kwargs)
    if not any(isinstance(a, TileTensor) for a in leaves):
        return _plain_call(func, args, kwargs)
    if any(isinstance(a, TileTensor) and any(t in _FLAT for t in a.tags) for a in leaves):
        return _flat_dispatch(func, leaves, spec)
    if func in _TO_PYTHON:
        _STATS["gathered_python"] += 1
        leaves = [a.full() if isinstance(a, TileTensor) else a for a in leaves]
        a, kw = tree_unflatten(leaves, spec)
        return _plain_call(func, a, kw)
    ctx = _ctx(getattr(func, "__name__", str(func)))
    _STATS["calls"] += 1
    # a replicated one-element integer tensor (an index or bound: x[..., :idx]) is a value of
    # the call: traced as a constant, its value in the cache key
    tpos = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor) and not _scalar_index(a)]
    sig = []
    for i, a in enumerate(leaves):
        if isinstance(a, TileTensor):
            sig.append(("T", tuple(a.shape), a.dtype, a.tags))
        elif isinstance(a, torch.Tensor) and _scalar_index(a):
            sig.append(("i", tuple(a.shape), a.dtype, int(a.item()), a.device.type))
        elif isinstance(a, torch.Tensor):
            sig.append(("t", tuple(a.shape), a.dtype))
        else:
            sig.append(("v", _hashable(a)))
    key = (func, str(spec), tuple(sig), ctx.n, ctx.n_seq, ctx.mesh.p, torch.is_grad_enabled(),
           _strict())
    entry = _CACHE.get(key)
    if entry is None:
        with _LOCK:
            entry = _build(func, leaves, spec, tpos, ctx)
            _CACHE[key] = entry
            _STATS["traced"] += 1
    if isinstance(entry, (_PlainFallback, _InplaceFallback)):
        return entry(func, leaves, spec)
    prog, out_spec, out_meta, out_alias = entry
    if prog.notes:
        log_notes(key, prog.notes, _user_line)
    # the graph was traced on contiguous fakes (view vs reshape decided on them): give a
    # non-mutating call contiguous tiles; a mutating one keeps its tiles (aliasing)
    mutates = _mutates(func)
    locals_ = [_local_of(leaves[i], mutates) for i in tpos]
    try:
        with torch._C.DisableTorchFunctionSubclass():
            outs = prog.gm(*prog.const_targets, [], *locals_)
    except Exception as e:  # noqa: BLE001 -- ours, never the model's to swallow
        raise EagerShardingError(f"autocp: the tile program of {getattr(func, '__name__', func)} failed "
                                 f"({type(e).__name__}: {e}) at {_user_line()}") from e
    flat = tree_flatten(outs)[0]
    by_id = {id(leaves[i].local if isinstance(leaves[i], TileTensor) else leaves[i]): leaves[i] for i in tpos}
    res = []
    for o, tags, meta in zip(flat, prog.out_tags, out_meta):
        if not isinstance(o, torch.Tensor):
            res.append(o)
        elif id(o) in by_id:  # in place (x += y, x.mul_(...)): the same object back
            res.append(by_id[id(o)])
        elif tags is None or all(t is None for t in tags):
            res.append(o)
        else:
            res.append(TileTensor(o, tags, meta))
    _mark_broken_views(func, res, flat, out_alias, [leaves[i] for i in tpos], locals_)
    if mutates and tpos:
        _record_view_write(func, leaves[tpos[0]])
    return tree_unflatten(res, out_spec)


# ----------------------------------------------------------------------------- views that are copies
# A call whose single-device output is a *view* of an input (``z[:, 1:4]``, ``x.transpose``)
# may produce a new tensor here (an owner narrow across token blocks, a contiguous copy).
# Reading it is exact; writing it in place is not seen by the base, as it would be on one
# device. Such an output is marked; an in-place write into it is recorded on its (sharded)
# base; reading that base afterwards -- or returning it -- raises, unless the view was
# written back (``z[:, 1:4] *= 0.5`` is ``t = z[...]; t *= 0.5; z[...] = t``: the write-back
# clears it). A silent wrong result becomes an error naming the three lines.
def _mark_broken_views(func, res, flat, out_alias, inputs, locals_):
    for k, alias in enumerate(out_alias):
        if not alias or k >= len(res) or not isinstance(res[k], torch.Tensor):
            continue
        j = alias[0]
        base = inputs[j]
        if not isinstance(base, TileTensor) or res[k] is base:
            continue
        if not torch._C._is_alias_of(flat[k], locals_[j]):
            res[k].__dict__["_autocp_view_of"] = (base, getattr(func, "__name__", str(func)), _user_line())


def _record_view_write(func, target):
    info = getattr(target, "__dict__", {}).get("_autocp_view_of")
    if info is None:
        return
    base, view_op, view_at = info
    base.__dict__.setdefault("_autocp_view_writes", []).append(
        (id(target), view_op, view_at, getattr(func, "__name__", str(func)), _user_line()))


def _check_view_writes(func, args, leaves):
    for a in leaves:
        pending = getattr(a, "__dict__", {}).get("_autocp_view_writes") if isinstance(a, TileTensor) else None
        if not pending:
            continue
        if getattr(func, "__name__", "") == "__setitem__" and args and args[0] is a and len(args) > 2:
            pending[:] = [w for w in pending if w[0] != id(args[2])]  # the view written back
            if not pending:
                continue
        raise_view_write(a, f"read by {getattr(func, '__name__', func)} at {_user_line()}")


def raise_view_write(base, how: str):
    """Raise for a sharded tensor with an in-place write into a copy-view still pending."""
    _vid, view_op, view_at, write_op, write_at = base.__dict__["_autocp_view_writes"][0]
    raise EagerShardingError(
        f"autocp: a view of a sharded tensor was written in place, and the tensor is {how}. The view "
        f"({view_op} at {view_at}) had to be computed as a new tensor on the tiles (it crosses token blocks, or "
        f"is a copy), so the write ({write_op} at {write_at}) does not reach the tensor, as it would on one "
        f"device: the result would be silently wrong. Fix: write into the tensor itself (z[:, 1:4] *= 0.5, or "
        f"z[:, 1:4] = z[:, 1:4] * 0.5), or write out of place (z = ...).")


def pending_view_writes(t) -> bool:
    """``t`` is a TileTensor with an in-place write into a copy-view not written back."""
    return isinstance(t, TileTensor) and bool(t.__dict__.get("_autocp_view_writes"))


# ----------------------------------------------------------------------------- atom windows
#: tags of dims split over all P ranks by whole atom windows (autocp.ops.atom_windows):
#: "w" a window dim, "a" an atom dim. The shard rule table does not know them: calls on
#: such tensors are run tile-local when they provably keep those dims element-wise
#: (below), else on the gathered tensors (exact, warned; a window tensor -- an atom-pair
#: tensor -- is refused under strict).
_FLAT = FLAT_TAGS
_F = torch.nn.functional
_FLAT_CHANNEL = {_F.layer_norm, _F.linear, torch._C._nn.linear}          # act on trailing (untagged) dims
_FLAT_UNARY = {torch.Tensor.float, torch.Tensor.to, torch.Tensor.contiguous, torch.Tensor.clone,
               torch.Tensor.detach, _F.relu, torch.relu, torch.Tensor.relu, torch.sigmoid, torch.Tensor.sigmoid}
_FLAT_BINARY = {torch.Tensor.__add__, torch.Tensor.__mul__, torch.Tensor.__sub__, torch.add, torch.mul}


def _flat_local_ok(func, leaves, spec) -> bool:
    tiles = [a for a in leaves if isinstance(a, TileTensor)]
    tags, shape = tiles[0].tags, tuple(tiles[0].shape)
    if any(a.tags != tags for a in tiles):
        return False
    tagged = {d for d, t in enumerate(tags) if t is not None}
    nd = len(tags)
    plain = [a for a in leaves if isinstance(a, torch.Tensor) and not isinstance(a, TileTensor)]
    args, kwargs = tree_unflatten(leaves, spec)
    if func in _FLAT_CHANNEL:
        if len(tiles) != 1 or args[0] is not tiles[0] or (nd - 1) in tagged:
            return False
        if func is _F.layer_norm:
            k = len(args[1]) if len(args) > 1 else len(kwargs.get("normalized_shape", ()))
            return not any(d >= nd - k for d in tagged)
        return all(p.dim() <= 2 for p in plain)  # weight / bias
    if func in _FLAT_UNARY:
        return len(tiles) == 1 and args[0] is tiles[0] and not plain
    if func in _FLAT_BINARY:
        return not plain and all(tuple(a.shape) == shape for a in tiles)
    if func is torch.cat:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return not plain and (dim % nd) not in tagged and all(a.dim() == nd for a in tiles)
    if func in (torch.Tensor.repeat_interleave, torch.repeat_interleave):
        rep = args[1] if len(args) > 1 else kwargs.get("repeats")
        dim = args[2] if len(args) > 2 else kwargs.get("dim")
        return isinstance(rep, int) and isinstance(dim, int) and (dim % nd) not in tagged and \
            kwargs.get("output_size") is None
    return False


def _flat_dispatch(func, leaves, spec):
    tiles = [a for a in leaves if isinstance(a, TileTensor)]
    if _flat_local_ok(func, leaves, spec):
        ref = tiles[0]
        a, kw = tree_unflatten([x.local if isinstance(x, TileTensor) else x for x in leaves], spec)
        out = _plain_call(func, a, kw)

        def wrap(o):
            if not isinstance(o, torch.Tensor) or o.dim() != ref.dim():
                raise EagerShardingError(f"autocp: {getattr(func, '__name__', func)} on atom-window tiles returned "
                                         f"an unexpected value (internal error)")
            shape = [ref.shape[d] if t is not None else o.shape[d] for d, t in enumerate(ref.tags)]
            return TileTensor(o, ref.tags, shape)

        return tree_unflatten([wrap(o) if isinstance(o, torch.Tensor) else o for o in tree_flatten(out)[0]],
                              tree_flatten(out)[1])
    name = getattr(func, "__name__", str(func))
    if _strict() and any("w" in a.tags for a in tiles):
        raise EagerShardingError(f"autocp (strict): {name} on an atom-window tensor (an atom-pair tensor split by "
                                 f"windows) has no window-local rule; it would be gathered. At {_user_line()}")
    warnings.warn(f"autocp: {name} on atom tiles runs on the gathered tensors (exact). At {_user_line()}",
                  stacklevel=4)
    a, kw = tree_unflatten([x.full() if isinstance(x, TileTensor) and any(t in _FLAT for t in x.tags) else x
                            for x in leaves], spec)
    return func(*a, **kw)


def _local_of(a, mutates: bool):
    x = a.local if isinstance(a, TileTensor) else a
    return x if mutates or x.is_contiguous() else x.contiguous()


def _mutates(func) -> bool:
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or name in ("__setitem__", "__iadd__", "__isub__",
                                                                        "__imul__", "__itruediv__", "__ior__",
                                                                        "__iand__", "__ixor__", "__ipow__")


class _PlainFallback:
    """A call that cannot be traced to tensors (it returns python values): gather every
    sharded argument and run it on whole tensors (exact, replicated)."""

    def __init__(self, why: str):
        self.why = why

    def __call__(self, func, leaves, spec):
        leaves = [a.full() if isinstance(a, TileTensor) else a for a in leaves]
        a, kw = tree_unflatten(leaves, spec)
        return _plain_call(func, a, kw)


class _InplaceFallback:
    """An in-place call on a TileTensor (first tensor argument) that no rule proves
    tile-local: the target is gathered, the call runs on whole tensors, and this rank's
    block is written back into the target's tile (differentiable copy)."""

    def __init__(self, why: str):
        self.why = why

    def __call__(self, func, leaves, spec):
        ctx = current()
        first = next(i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor))
        target = leaves[first]
        full = target.full().clone()
        new = [full if i == first else (a.full() if isinstance(a, TileTensor) else a) for i, a in enumerate(leaves)]
        a, kw = tree_unflatten(new, spec)
        out = _plain_call(func, a, kw)
        with torch._C.DisableTorchFunctionSubclass():
            target.local.copy_(shard_tags(full, target.tags, ctx.mesh))
        return target if out is full else out


def _gathered_call(why: str, leaves, tpos, exc) -> "_PlainFallback":
    """A call that cannot run as a tile program runs on gathered tensors (exact, warned);
    refused under strict when it would gather a pair tensor (a token vector gathered for a
    python-level op is O(N): allowed)."""
    pair = any(isinstance(leaves[i], TileTensor) and _token_axes(leaves[i].tags) >= 2 for i in tpos)
    if _strict() and pair:
        raise EagerShardingError(f"autocp (strict): {why}; it would run on gathered tensors. At {_user_line()}. "
                                 f"Fix: call it on x.full() explicitly, or register the module.") from exc
    warnings.warn(f"autocp: {why}; runs on gathered tensors (exact). At {_user_line()}", stacklevel=5)
    return _PlainFallback(why)


def _build(func, leaves, spec, tpos, ctx):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    fmode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = []
    with fmode:
        for i in tpos:
            a = leaves[i]
            fakes.append(torch.empty(tuple(a.shape), dtype=a.dtype, device="cpu"))

    def f(*ts):
        new = list(leaves)
        for i, t in zip(tpos, ts):
            new[i] = t
        a, kw = tree_unflatten(new, spec)
        out = func(*a, **kw)
        return out

    try:
        with torch._C.DisableTorchFunctionSubclass():
            gm = make_fx(f, tracing_mode="fake", pre_dispatch=True)(*fakes)
    except Exception as e:  # noqa: BLE001 -- not traceable to a tensor graph: exact gathered fallback
        why = f"{getattr(func, '__name__', func)} could not be traced ({type(e).__name__}: {str(e)[:160]})"
        return _gathered_call(why, leaves, tpos, e)
    out_vals = []
    for nd in gm.graph.nodes:
        if nd.op == "output":
            out_vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a
                        for a in tree_flatten(nd.args[0])[0]]
    in_tags = []
    for i in tpos:
        a = leaves[i]
        in_tags.append(a.tags if isinstance(a, TileTensor) else (None,) * a.dim())
    try:
        prog = shard_graph(gm, in_tags, n=ctx.n, n_seq=ctx.n_seq, p=ctx.mesh.p, resolver=_no_opaque,
                           strict=_strict(), what=getattr(func, "__name__", str(func)))
    except ShardingError as e:
        first = leaves[tpos[0]] if tpos else None
        if _mutates(func) and isinstance(first, TileTensor):
            # an in-place write the rules cannot prove tile-local (a slice assignment across
            # token blocks): gather the target, write, and keep this rank's block (exact)
            pair = _token_axes(first.tags) >= 2
            if _strict() and pair:
                raise EagerShardingError(f"{e}\n  called at {_user_line()}") from e
            if pair:
                warnings.warn(f"autocp: in-place {getattr(func, '__name__', func)} into a sharded pair tensor runs "
                              f"gathered (exact, the whole tensor: O(N^2) per rank). At {_user_line()}", stacklevel=4)
            return _InplaceFallback(str(e))
        raise EagerShardingError(f"{e}\n  called at {_user_line()}") from e
    prog.const_targets = []
    reinplace(prog.gm)  # a dead redistributed / fresh operand of add / mul is written in place (no autograd)
    for nt in prog.notes:
        if nt.pair and nt.what in ("gather", "op-gather"):
            warnings.warn(f"autocp: {getattr(func, '__name__', func)} gathers a pair tensor ({nt.op}: "
                          f"{getattr(nt, 'detail', '')}); exact. At {_user_line()}", stacklevel=4)
    out_meta = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in out_vals]
    # the output pytree of the call (a tuple of tensors, a named tuple, one tensor, ...)
    try:
        with fmode, torch._C.DisableTorchFunctionSubclass():
            sample = f(*fakes)
    except Exception as e:  # noqa: BLE001 -- its output structure needs values: gathered, exact
        why = f"{getattr(func, '__name__', func)} needs values to build its output ({type(e).__name__})"
        return _gathered_call(why, leaves, tpos, e)
    out_spec = tree_flatten(sample)[1]
    # which inputs each output leaf is a view of, on one device (checked against the tiles)
    out_alias = [[j for j, fk in enumerate(fakes) if torch._C._is_alias_of(o, fk)] if isinstance(o, torch.Tensor)
                 else [] for o in tree_flatten(sample)[0]]
    return prog, out_spec, out_meta, out_alias


def _token_axes(tags) -> int:
    """Token axes a tile is sharded on (a merged pair dim ``("rc", ..)`` counts two; atom-window
    tags none)."""
    return sum(len(T.factor_tags(t)) for t in tags if t is not None and t not in _FLAT)


def _user_line() -> str:
    """The model's source line of the current torch call (first frame outside torch/autocp)."""
    import os
    import traceback

    import autocp

    ours = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, autocp.__file__))
    skip = (os.sep + "torch" + os.sep, os.sep + "autocp" + os.sep)
    for fr in reversed(traceback.extract_stack()[:-1]):
        if not (fr.filename.startswith(ours) or any(k in fr.filename for k in skip)):
            return f'File "{fr.filename}", line {fr.lineno}: {(fr.line or "").strip()}'
    return "?"


def _no_opaque(entry, in_tags):
    raise EagerShardingError("autocp TileTensor: a traced op contains an opaque module call (internal error)")


# ----------------------------------------------------------------------------- registered modules
def global_shape(local_shape, tags, n: int, n_seq) -> tuple:
    """Global shape of a tile with ``tags`` (token dims ``n``, MSA rows ``n_seq``)."""
    return tuple((n_seq if T.base_tag(t) == "s" else n) if t is not None else s for s, t in zip(local_shape, tags))


class RegisteredOp(ModuleWrapper):
    """A registered module (:func:`autocp.register_module`) called from eager TileTensor
    code: its TileTensor arguments are converted to :func:`standard_tags` (one
    redistribution each when they differ), its 2D op (``rule.build(module, mesh)``) runs on
    the tiles, and its tensor outputs come back as TileTensors in ``rule.out_layouts``
    (default: the first tensor argument's layout). Same parameters and ``state_dict``
    keys as the module. A rule without a 2D op runs the module on gathered tensors
    (exact; refused under :func:`strict_mode`)."""

    def __init__(self, module, rule, mesh, build=None, prepare=None):
        super().__init__(module, mesh)
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "_build_op", build)  # build(module, mesh) -> op, instead of rule.build
        object.__setattr__(self, "_prepare", prepare)  # prepare(module, args, kwargs) -> (args, kwargs)
        object.__setattr__(self, "_op", None)

    def _declared(self, args, kwargs, leaves, ctx):
        return _declared_tags(self.rule, self.inner.forward, args, kwargs, leaves, ctx)

    def op(self):
        if self._op is None:
            op = self._build_op(self.inner, self.mesh) if self._build_op is not None else \
                self.rule.build(self.inner, self.mesh)
            object.__setattr__(self, "_op", op or False)
        return self._op

    def forward(self, *args, **kwargs):
        if self._prepare is not None:
            args, kwargs = self._prepare(self.inner, args, kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        if not any(isinstance(a, TileTensor) for a in leaves):
            return self.inner(*args, **kwargs)  # replicated inputs (e.g. atom-window attention): the module itself
        ctx = current()
        op = self.op()
        if op is False:
            if _strict():
                raise EagerShardingError(f"autocp (strict): registered {type(self.inner).__name__} has no 2D op; it "
                                         f"would run gathered. Fix: give its rule an op_factory.")
            full = [a.full() if isinstance(a, TileTensor) else a for a in leaves]
            a, kw = tree_unflatten(full, spec)
            return self.inner(*a, **kw)
        declared = self._declared(args, kwargs, leaves, ctx)
        tiles, in_tags = [], []
        for i, a in enumerate(leaves):
            if i in declared and isinstance(a, torch.Tensor) and not isinstance(a, TileTensor):
                tags = declared[i]  # a whole (replicated) argument: this rank's block is a free slice
                tiles.append(shard_tags(a, tags, self.mesh))
                in_tags.append(tags)
            elif isinstance(a, TileTensor):
                want = standard_tags(a.tags)
                tiles.append(T.convert(a.local, a.tags, want) if want != a.tags else a.local)
                in_tags.append(want)
            else:
                tiles.append(a)
                if isinstance(a, torch.Tensor):
                    in_tags.append((None,) * a.dim())
        a, kw = tree_unflatten(tiles, spec)
        out = op(*a, **kw)
        oleaves, ospec = tree_flatten(out)
        out_tags = self.rule.out_layouts(in_tags) if self.rule.out_layouts is not None else \
            [next((t for t in in_tags if any(x is not None for x in t)), None)]
        res, k = [], 0
        for o in oleaves:
            if isinstance(o, torch.Tensor):
                tags = out_tags[k] if k < len(out_tags) else None
                k += 1
                if tags is not None and len(tags) == o.dim() and any(t is not None for t in tags):
                    o = TileTensor(o, tags, global_shape(o.shape, tags, ctx.n, ctx.n_seq))
            res.append(o)
        return tree_unflatten(res, ospec)


def _declared_tags(rule, fn, args, kwargs, leaves, ctx):
    """``{leaf index: tags}`` of the tensor arguments the rule declares a layout for."""
    decl = getattr(rule, "arg_layouts", None)
    if not decl:
        return {}
    import inspect

    try:
        bound = inspect.signature(fn).bind(*args, **kwargs).arguments
    except TypeError:
        return {}
    ids = {id(v): name for name, v in bound.items() if isinstance(v, torch.Tensor)}
    out = {}
    for i, a in enumerate(leaves):
        name = ids.get(id(a)) if isinstance(a, torch.Tensor) else None
        if name in decl:
            tags = [None] * a.dim()
            for d, t in decl[name].items():
                want = ctx.n_seq if t == "s" else ctx.n
                if d >= a.dim() or int(a.shape[d]) != int(want):
                    raise EagerShardingError(
                        f"autocp RegisteredOp {type(fn.__self__).__name__}: argument {name!r} has shape "
                        f"{tuple(a.shape)}; its op needs dim {d} of length {want} (tag {t!r}). Fix: pass the "
                        f"token-level tensor, or unregister the module for this call.")
                tags[d] = t
            out[i] = tuple(tags)
    return out


def bind_registered(model, mesh, lookup=None):
    """Replace (in place) every outermost submodule of ``model`` that has a registered rule
    by a :class:`RegisteredOp`; returns the number replaced."""
    if lookup is None:
        from ..registry import lookup_module as lookup
    count = 0
    for name, child in list(model.named_children()):
        rule = lookup(child)
        if rule is not None:
            setattr(model, name, RegisteredOp(child, rule, mesh))
            count += 1
        else:
            count += bind_registered(child, mesh, lookup)
    return count
