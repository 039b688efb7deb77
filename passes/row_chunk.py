"""Pair-local glue modules on row chunks of their tiles: bounded transients, exact.

A module whose output pair entry ``(i, j)`` depends only on its inputs at ``(i, j)`` (pair
features, token features of ``i``) -- or, an *outer* module, only on token features of
``i`` and ``j`` (a relative-position encoding) -- can run on any block of its local tile
on its own. Run op by op through the TileTensor engine, such a module materialises every
intermediate at the whole tile (a concatenation of 256 channels, a one-hot of 66 classes:
several GiB each at 30,000 tokens on 8x8). :class:`RowChunked` runs the module's *own
python* on plain blocks of the local tiles instead, so the intermediates exist for one
block at a time and only the output is whole.

Nothing is taken on trust: the first call per input signature traces the module on fake
tensors of the global shapes (``make_fx``) and shards the graph with the rule table
(:func:`autocp.passes.shard.shard_graph`). The module is run in blocks only when the
sharded program is provably block-local:

* **rows** -- every op is tile-local (no communication, no padding fix-up, no random
  draw): the module runs on row blocks of its ``"r"`` dims (``"c"`` dims whole);
* **outer** -- the only non-local steps exchange *token vectors* from the mesh rows to the
  columns (``x[:, :, None] == x[:, None, :]``) and every tensor input is a token vector:
  the module runs on ``R + C`` tokens (``R`` of this rank's row block, ``C`` of its column
  block) and the ``R x C`` corner of its output is kept (4x the arithmetic of the block,
  a bounded transient).

Python reads of token vectors' values (``if torch.any(feats["cyclic_period"] > 0):``) are
taken once on the whole (gathered, O(N)) vectors and replayed in the trace and in every
block, so each block takes the branch the whole tensor takes.

Anything else -- a reduction over tokens, a transpose of a pair tensor, a python read of a
pair tensor's value, dropout in training -- runs
through the TileTensor engine as before (exact), so declaring a module here can cost
memory, never correctness.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .context import current
from .eager import EagerShardingError
from .wrapper import ModuleWrapper

__all__ = ["RowChunked", "DEFAULT_CHUNK_ELEMS", "map_rows"]

#: pair entries per block (rows x columns of the local tile): 256 Ki (Boltz's glue keeps up to
#: ~2 KB of intermediates per entry: ~0.5 GiB per block)
DEFAULT_CHUNK_ELEMS = 1 << 18


class _Hidden:
    """Stands in for a feature a block run must not read (a token <-> atom index map): a
    module that touches it fails its trace, and runs through the engine instead."""

    def __repr__(self):
        return "<autocp: not available to a row-chunked module>"


def _swap(tags):
    return tuple({"r": "c", "c": "r"}.get(t, t) for t in tags)


class _Plan:
    __slots__ = ("kind", "out_tags", "why", "unused", "decisions")

    def __init__(self, kind, out_tags=None, why="", unused=(), decisions=None):
        self.kind, self.out_tags, self.why, self.unused = kind, out_tags, why, frozenset(unused)
        self.decisions = decisions  # the module's python reads of tensor values, taken on the whole inputs


_SCALAR_READS = (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
                 torch.Tensor.__index__, torch.Tensor.tolist)


class _Diverged(EagerShardingError):
    """A block read a different number of values than the whole inputs did (not an
    ``Exception``: a model's own ``except Exception`` must not swallow it)."""


class _Decisions(torch.overrides.TorchFunctionMode):
    """The python-level reads of tensor values (``if torch.any(x > 0):``, ``.item()``):
    recorded on the whole inputs (``values`` None), then answered from the record in the
    trace and in every block, so each block takes the branch the whole tensor takes."""

    def __init__(self, values=None):
        super().__init__()
        self.values, self.seen, self.i = values, [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SCALAR_READS:
            return func(*args, **kwargs)
        if self.values is None:
            out = func(*args, **kwargs)
            self.seen.append(out)
            return out
        if self.i >= len(self.values):
            raise _Diverged(f"{func.__name__}: more value reads than on the whole inputs")
        self.i += 1
        return self.values[self.i - 1]


class _Hybrid(torch.utils._python_dispatch.TorchDispatchMode):
    """Real ops on small real tensors (token vectors: their values steer the python), fake
    ops for anything larger or touching a fake (the pair tensors)."""

    def __init__(self, fm, limit: int):
        super().__init__()
        self.fm, self.limit = fm, limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor

        kwargs = kwargs or {}
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(isinstance(t, FakeTensor) and t.fake_mode is not self.fm for t in flat):
            return func(*args, **kwargs)  # an enclosing fake mode's tensor (an estimate): its business
        if any(isinstance(t, FakeTensor) for t in flat):
            with self.fm:
                return func(*args, **kwargs)
        try:
            with self.fm:
                probe = func(*args, **kwargs)
        except Exception:  # noqa: BLE001 -- a data-dependent shape: run it (its input is small and real)
            return func(*args, **kwargs)
        sizes = [t.numel() for t in tree_flatten(probe)[0] if isinstance(t, torch.Tensor)]
        return probe if sizes and max(sizes) > self.limit else func(*args, **kwargs)


def _record_decisions(module, leaves, spec, ctx):
    """The module's value reads on the whole inputs: token vectors gathered (``O(N)``), pair
    tensors fake (a read of one: ``None``, not provable)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .eager import TileTensor

    fm = FakeTensorMode(allow_non_fake_inputs=True)
    whole = []
    for a in leaves:
        if isinstance(a, TileTensor) and sum(t is not None for t in a.tags) == 1:
            whole.append(a.full())  # a collective: every rank plans the same call in the same order
        elif isinstance(a, TileTensor):
            with fm:
                whole.append(torch.empty(tuple(a.shape), dtype=a.dtype))
        else:
            whole.append(a)
    a, kw = tree_unflatten(whole, spec)
    rec = _Decisions()
    try:
        with torch._C.DisableTorchFunctionSubclass(), rec, _Hybrid(fm, 4 * ctx.n + 64):
            module(*a, **kw)
    except Exception:  # noqa: BLE001 -- a read of a pair tensor's values (fake): not provable
        return None
    return rec.seen


def _plan(module, leaves, spec, ctx) -> _Plan:
    """How ``module`` may run on blocks for these inputs (``kind`` None: through the engine)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from . import tile_ops as T
    from .eager import TileTensor
    from .shard import shard_graph

    tpos = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor)]
    in_tags = [leaves[i].tags if isinstance(leaves[i], TileTensor) else (None,) * leaves[i].dim() for i in tpos]
    fm = FakeTensorMode(allow_non_fake_inputs=True)
    with fm:
        fakes = [torch.empty(tuple(leaves[i].shape), dtype=leaves[i].dtype) for i in tpos]

    decisions = None

    def f(*ts):
        new = list(leaves)
        for i, t in zip(tpos, ts):
            new[i] = t
        a, kw = tree_unflatten(new, spec)
        if decisions is None:
            return module(*a, **kw)
        with _Decisions(decisions):
            return module(*a, **kw)

    def trace():
        with torch._C.DisableTorchFunctionSubclass():
            return make_fx(f, tracing_mode="fake", pre_dispatch=True)(*fakes)

    try:
        try:
            gm = trace()
        except (torch._subclasses.fake_tensor.DataDependentOutputException,
                torch._subclasses.fake_tensor.DynamicOutputShapeException):
            decisions = _record_decisions(module, leaves, spec, ctx)  # python reads a value: take it whole
            if decisions is None:
                raise
            gm = trace()
        places = [nd for nd in gm.graph.nodes if nd.op == "placeholder"]
        unused = {i for i, nd in zip(tpos, places[-len(tpos):] if tpos else []) if not nd.users}
        gm.graph.eliminate_dead_code()  # what only fed a recorded read (still computed in each block)
        gm.recompile()

        def refuse(entry, tags):
            raise RuntimeError("opaque call")

        prog = shard_graph(gm, in_tags, n=ctx.n, n_seq=ctx.n_seq, p=ctx.mesh.p, resolver=refuse,
                           what=type(module).__name__)
    except (Exception, _Diverged) as e:  # noqa: BLE001 -- not provable: the engine runs it (exact)
        return _Plan(None, why=f"{type(e).__name__}: {str(e)[:120]}")
    odd = [tg for i, tg in zip(tpos, in_tags) if i not in unused and any(t not in (None, "r", "c") for t in tg)]
    if odd:
        return _Plan(None, why=f"input tags {odd[0]}")
    exchanges = 0
    for nd in prog.gm.graph.nodes:
        if nd.op != "call_function" or isinstance(nd.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            continue
        if nd.target is T.convert:
            src, dst = tuple(nd.args[1]), tuple(nd.args[2])
            if sum(t is not None for t in src) == 1 and dst == _swap(src):
                exchanges += 1  # a token vector from the mesh rows to the columns
                continue
        if nd.target is T.zero_pad_index:
            continue  # padded rows' indices set to 0: per element
        if getattr(nd.target, "__module__", "").startswith("_operator"):
            continue  # getitem of a multi-output op
        return _Plan(None, why=f"non-local step {getattr(nd.target, '__name__', nd.target)}")
    if any(nt.what != "exchange" or nt.pair for nt in prog.notes):
        return _Plan(None, why="gathers")
    outs = prog.out_tags
    if not outs or any(t is None or list(t).count("r") != 1 or list(t).count("c") > 1 for t in outs):
        return _Plan(None, why=f"outputs {outs}")
    if exchanges:
        if any(sum(t is not None for t in tg) > 1 for i, tg in zip(tpos, in_tags) if i not in unused) or \
                any(list(t).count("c") != 1 for t in outs):
            return _Plan(None, why="outer module with pair inputs")
        return _Plan("outer", outs, unused=unused, decisions=decisions)
    return _Plan("rows", outs, unused=unused, decisions=decisions)


class RowChunked(ModuleWrapper):
    """``module`` (same parameters and ``state_dict`` keys) that runs on blocks of its local
    tiles when its sharded graph proves that exact (see the module doc), else through the
    TileTensor engine. Outputs are TileTensors with the engine's layout (on rank ``(r, c)``
    a pair output holds ``[B, T_r, T_c, ...]``). ``chunk_elems``: pair entries per block.
    ``stats``: calls run by ``"rows"`` / ``"outer"`` blocks or by the ``"engine"``."""

    def __init__(self, module: nn.Module, mesh, chunk_elems: int = DEFAULT_CHUNK_ELEMS):
        super().__init__(module, mesh)
        self.chunk_elems = int(chunk_elems)
        object.__setattr__(self, "_plans", {})  # per wrapper: freed with it
        object.__setattr__(self, "stats", {"rows": 0, "outer": 0, "engine": 0})

    def forward(self, *args, **kwargs):
        from .eager import TileTensor

        leaves, spec = tree_flatten((args, kwargs))
        if not any(isinstance(a, TileTensor) for a in leaves):
            return self.inner(*args, **kwargs)
        ctx = current()
        hidden = [_Hidden() if type(a).__name__ == "IndexMap" else a for a in leaves]
        key = (tuple((tuple(a.shape), a.dtype, getattr(a, "tags", None)) if isinstance(a, torch.Tensor)
                     else (type(a).__name__, a if isinstance(a, (int, float, bool, str, type(None))) else None)
                     for a in hidden), str(spec), ctx.n, ctx.n_seq, ctx.mesh.p, torch.is_grad_enabled(),
               self.inner.training, torch.is_autocast_enabled("cpu"))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _plan(self.inner, hidden, spec, ctx)
        if plan.kind is None or (plan.kind == "outer" and _tile_entries(hidden) <= self.chunk_elems):
            self.stats["engine"] += 1  # not provable, or an outer module whose tile is one block already
            return self.inner(*args, **kwargs)
        self.stats[plan.kind] += 1
        hidden = [_Hidden() if i in plan.unused else a for i, a in enumerate(hidden)]  # not sliced, not read
        outs, ospec = (self._rows if plan.kind == "rows" else self._outer)(hidden, spec, plan)
        res = [TileTensor(o, tags, _global(o.shape, tags, ctx)) for o, tags in zip(outs, plan.out_tags)]
        return tree_unflatten(res, ospec)

    def _call(self, leaves, spec, decisions):
        a, kw = tree_unflatten(leaves, spec)
        if decisions is None:
            out = self.inner(*a, **kw)
        else:
            with _Decisions(decisions) as d:
                out = self.inner(*a, **kw)
            if d.i != len(decisions):
                raise _Diverged(f"{d.i} value reads in a block, {len(decisions)} on the whole inputs")
        flat, ospec = tree_flatten(out)
        if not all(isinstance(o, torch.Tensor) for o in flat):
            raise EagerShardingError(f"autocp RowChunked({type(self.inner).__name__}): a block returned a non-tensor output; "
                            f"its trace promised tensors only (internal error)")
        return flat, ospec

    def _rows(self, leaves, spec, plan):
        out_tags = plan.out_tags
        from .eager import TileTensor

        rdim = {i: a.tags.index("r") for i, a in enumerate(leaves) if isinstance(a, TileTensor) and "r" in a.tags}
        locs = [a.local if isinstance(a, TileTensor) else a for a in leaves]
        i0 = next(iter(rdim))
        rows = int(locs[i0].shape[rdim[i0]])
        cols = max((int(a.local.shape[a.tags.index("c")]) for a in leaves if isinstance(a, TileTensor)
                    and "c" in a.tags), default=1)
        step = max(1, self.chunk_elems // cols)
        if step >= rows:  # one block: the module on the whole local tiles
            return self._call(locs, spec, plan.decisions)
        outs, ospec = None, None
        for lo in range(0, rows, step):
            ln = min(step, rows - lo)
            blk = [x.narrow(rdim[i], lo, ln) if i in rdim else x for i, x in enumerate(locs)]
            flat, ospec = self._call(blk, spec, plan.decisions)
            if outs is None:
                outs = [_Out(o, t.index("r"), rows, t.index("c") if "c" in t else None, cols)
                        for o, t in zip(flat, out_tags)]
            for o, piece in zip(outs, flat):
                o.put(piece, lo, 0, ln, o.shape[o.cdim] if o.cdim is not None else None)
        return [o.done() for o in outs], ospec

    def _outer(self, leaves, spec, plan):
        out_tags = plan.out_tags
        from . import tile_ops as T
        from .eager import TileTensor

        tok = {i: a.tags.index("r") for i, a in enumerate(leaves) if isinstance(a, TileTensor)}
        row = {i: leaves[i].local for i in tok}
        col = {i: T.convert(leaves[i].local, leaves[i].tags, _swap(leaves[i].tags)) for i in tok}
        i0 = next(iter(tok))
        rows, cols = int(row[i0].shape[tok[i0]]), int(col[i0].shape[tok[i0]])
        # R + C tokens per block: (R + C)^2 entries, never more than the tile itself
        side = max(1, min(math.isqrt(self.chunk_elems) // 2, rows // 2, cols // 2))
        outs, ospec = None, None
        for r0 in range(0, rows, side):
            rn = min(side, rows - r0)
            for c0 in range(0, cols, side):
                cn = min(side, cols - c0)
                blk = [torch.cat([row[i].narrow(tok[i], r0, rn), col[i].narrow(tok[i], c0, cn)], tok[i])
                       if i in tok else a for i, a in enumerate(leaves)]
                flat, ospec = self._call(blk, spec, plan.decisions)
                if outs is None:
                    outs = [_Out(o, t.index("r"), rows, t.index("c"), cols) for o, t in zip(flat, out_tags)]
                for o, t, piece in zip(outs, out_tags, flat):  # the rows x columns corner of the R + C tokens
                    o.put(piece.narrow(t.index("r"), 0, rn).narrow(t.index("c"), rn, cn), r0, c0, rn, cn)
        return [o.done() for o in outs], ospec


class _Out:
    """One output tile filled block by block: written into a preallocated tile without
    autograd; concatenated (differentiable) with it."""

    def __init__(self, first, rdim, rows, cdim, cols):
        self.rdim, self.cdim = rdim, cdim
        self.grad = torch.is_grad_enabled()
        shape = list(first.shape)
        shape[rdim] = rows
        if cdim is not None:
            shape[cdim] = cols
        self.shape = shape
        self.buf = None if self.grad else first.new_empty(shape)
        self.lines: list = []  # grad: [(row offset, [blocks])]

    def put(self, piece, r0, c0, rn, cn):
        want = list(self.shape)
        want[self.rdim] = rn
        if self.cdim is not None:
            want[self.cdim] = cn
        if list(piece.shape) != want:
            raise EagerShardingError(f"autocp RowChunked: a block's output has shape {tuple(piece.shape)}; its trace "
                               f"promised {tuple(want)} (internal error: the module is not block-local)")
        if self.buf is not None:
            view = self.buf.narrow(self.rdim, r0, piece.shape[self.rdim])
            if self.cdim is not None:
                view = view.narrow(self.cdim, c0, piece.shape[self.cdim])
            view.copy_(piece)
            return
        if not self.lines or self.lines[-1][0] != r0:
            self.lines.append((r0, []))
        self.lines[-1][1].append(piece)

    def done(self):
        if self.buf is not None:
            return self.buf
        rows = [torch.cat(b, self.cdim) if len(b) > 1 else b[0] for _, b in self.lines]
        return torch.cat(rows, self.rdim) if len(rows) > 1 else rows[0]


def _tile_entries(leaves) -> int:
    """Rows x columns of the local tile the outputs will have (token vectors' blocks)."""
    from .eager import TileTensor

    sizes = [int(a.local.shape[a.tags.index("r")]) for a in leaves if isinstance(a, TileTensor) and "r" in a.tags]
    return max(sizes, default=1) ** 2


def map_rows(fn, x: torch.Tensor, dim: int = 1, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> torch.Tensor:
    """``fn(x)`` for a ``fn`` that acts on each index of ``dim`` on its own (a LayerNorm /
    Linear over the channels of a local pair tile), computed on blocks of ``dim`` so its
    intermediates exist for one block at a time: the local-tile form of :class:`RowChunked`."""
    rows = int(x.shape[dim])
    per_row = max(1, x.numel() // max(1, rows) // max(1, int(x.shape[-1])))  # entries per row, channels aside
    step = max(1, chunk_elems // per_row)
    if step >= rows:
        return fn(x)
    out = None
    for lo in range(0, rows, step):
        ln = min(step, rows - lo)
        piece = fn(x.narrow(dim, lo, ln))
        if out is None:
            out = _Out(piece, dim, rows, None, 0)
        out.put(piece, lo, 0, ln, None)
    return out.done()


def _global(local_shape, tags, ctx):
    from .eager import global_shape

    return global_shape(local_shape, tags, ctx.n, ctx.n_seq)
