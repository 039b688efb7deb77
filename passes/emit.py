"""Pass 5 -- emit: the parallel module.

Requires: a :class:`autocp.passes.rewrite.RewritePlan` (the claims), the input tags, the
mesh (output tags: those the sharded program or the engine run produces).

Guarantees: :class:`ParallelModule` --

* same ``state_dict`` keys (and shapes) as the original model, parameters *shared* (the
  same ``Parameter`` objects), the original model not mutated (a structural clone holds
  the replaced modules);
* ``forward`` accepts full tensors (sharded by the input layouts) or DTensors, runs either
  the sharded captured graph (:mod:`autocp.passes.graph_emit`) or -- the engine mode, for a
  model that cannot be captured -- the model's own python on
  :class:`autocp.passes.eager.TileTensor` inputs (every torch call through the same rule
  table, registered modules as their 2D ops), inside
  :func:`autocp.passes.context.tile_context`, and returns full tensors (default), local
  tiles (``output="local"``) or DTensors (``output="dtensor"``);
* gradient convention at the boundary: DTensor's (:mod:`autocp.tile_io`) -- an output's
  cotangent is the true one of what this rank holds (a tile's; a replicated value's --
  RowToken / ColToken blocks, full outputs, scalars -- the same on every replica, else
  :class:`autocp.tile_io.CotangentError`), and an input's gradient is its true one (equal
  on every replica). Parameter gradients are partial inside (summed over the mesh by the
  grad reducer, :mod:`autocp.grad_sync`, or :func:`autocp.ops.common.sync_grads`);
* ``explain()`` -- the report of :mod:`autocp.passes.explain`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..layout import ColToken, MsaTiles, Pair2D, Replicated, RowToken
from .context import glue_log, tile_context
from .functions import claimed_functions
from .rewrite import gather_tags, shard_tags
from .wrapper import ModuleWrapper
from ..grad_sync import GradSyncMixin
from ..tile_io import from_partial, to_partial

__all__ = ["ParallelModule", "layout_of_tags", "example_call", "leaf_tags"]


def leaf_tags(leaves, tags) -> list:
    """One layout per output leaf (None for a non-tensor leaf): ``tags`` is given either per
    leaf (a tile program's ``out_tags``: a ``None`` output is a leaf too) or per tensor leaf.
    Anything else is an internal error -- never a silently misassigned layout (a tile taken
    for a whole tensor)."""
    tags = list(tags or [])
    if len(tags) == len(leaves):
        return tags
    tpos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    if len(tags) == len(tpos):
        per = [None] * len(leaves)
        for i, t in zip(tpos, tags):
            per[i] = t
        return per
    from .eager import EagerShardingError

    raise EagerShardingError(f"autocp (internal): {len(tags)} output layouts for {len(leaves)} output leaves "
                             f"({len(tpos)} tensors); refusing to guess which output is a tile.")


def example_call(args, kwargs):
    """``(args, kwargs)`` with every tensor replaced by a fresh one of its (global) shape and
    dtype -- ones for masks, zeros for integers, normal noise for floats -- what a capture at
    that shape needs (only shapes matter to a capture; a value-dependent branch fails it).
    The noise comes from a private generator: the model's random stream is not advanced."""
    gen = torch.Generator().manual_seed(0)

    def example(x):
        if not isinstance(x, torch.Tensor):
            return x
        shape, dt = tuple(x.shape), x.dtype
        if dt == torch.bool:
            return torch.ones(shape, dtype=dt)
        return torch.zeros(shape, dtype=dt) if not dt.is_floating_point else \
            torch.randn(shape, generator=gen).to(dt)

    leaves, spec = tree_flatten((args, kwargs))
    return tree_unflatten([example(x) for x in leaves], spec)


def layout_of_tags(tags):
    """The :mod:`autocp.layout` object for a tag tuple (None if no layout describes it). The
    token dims may come in either order: tags ``(None, "c", "r", None)`` -- rank ``(r, c)``
    holds ``z[:, T_c, T_r]``, a transposed pair tile -- are ``Pair2D((2, 1))`` (DTensor
    placements ``[Shard(2), Shard(1)]``)."""
    if tags is None:
        return None
    idx = {t: i for i, t in enumerate(tags) if t is not None}
    real = sorted(t for t in tags if t is not None)
    if not real:
        return Replicated()
    if real == ["c", "r"]:
        return Pair2D((idx["r"], idx["c"]))
    if real == ["r"]:
        return RowToken(idx["r"])
    if real == ["c"]:
        return ColToken(idx["c"])
    if real == ["c", "s"]:
        return MsaTiles(idx["s"], idx["c"])
    return None


class ParallelModule(GradSyncMixin, ModuleWrapper):
    """The 2D-parallel model returned by :func:`autocp.parallelize` (holds the rewritten
    clone of the model as ``inner``; same ``state_dict`` keys as the original)."""

    autocp_parallel = True  # what autocp.guard checks (no import of this module there)

    def __init__(self, original: nn.Module, clone: nn.Module, mesh, *, input_tags, output_tags,
                 n_tokens: int, n_seq: Optional[int], report=None, plan=None,
                 engine: bool = False, strict: bool = False):
        clone.training = original.training
        super().__init__(clone, mesh)
        object.__setattr__(self, "_original_type", type(original))
        self.input_tags = list(input_tags)
        self.output_tags = list(output_tags)
        self.example_n = n_tokens
        self.example_n_seq = n_seq
        self.report = report
        self.plan = plan
        self.engine = engine  # run ``inner`` on TileTensors (autocp.passes.eager), not a captured graph
        self.strict = strict

    def __call__(self, *args, **kwargs):  # autocp.guard: binding, call checks, cross-rank agreement
        from .. import guard

        return guard.guarded_call(self, super().__call__, args, kwargs)

    def explain(self, **kw) -> str:
        from .explain import render

        return render(self.report, **kw)

    # ------------------------------------------------------------------ forward
    def _sizes(self, leaves):
        n = n_seq = None
        for leaf, tags in zip([l for l in leaves if isinstance(l, torch.Tensor)], self.input_tags):
            if not tags:
                continue
            shape = leaf.shape
            for d, t in enumerate(tags):
                if t in ("r", "c") and n is None:
                    n = int(shape[d])
                if t == "s" and n_seq is None:
                    n_seq = int(shape[d])
        return n or self.example_n, n_seq or self.example_n_seq

    def to_tiles(self, *args, **kwargs):
        """``(args, kwargs)`` with every tensor of a call's *full* inputs replaced by this rank's
        tile as a DTensor in the layout this module was built with (``input_tags``): on rank
        ``(r, c)`` a Pair2D ``z`` becomes ``z[:, T_r, T_c]``, a RowToken ``s`` ``s[:, T_r]``
        (``Layout.to_dtensor``); tensors without a token dim stay as they are. What
        ``pm(*a, output="local", **kw)`` takes -- tiles in, tiles out (docs/training.md). At
        scale, build the DTensors from tiles you load instead (``layout.to_dtensor(tile,
        mesh, N)``): this helper needs the whole tensors once."""
        leaves, spec = tree_flatten((args, kwargs))
        n, n_seq = self._sizes(leaves)
        out, k = [], 0
        for x in leaves:
            if isinstance(x, torch.Tensor):
                tags = self.input_tags[k] if k < len(self.input_tags) else None
                k += 1
                lay = layout_of_tags(tags)
                if lay is not None and lay.dims:
                    sizes = [n_seq if tags[d] == "s" else n for d in lay.dims]
                    x = lay.to_dtensor(lay.shard(x, self.mesh).contiguous(), self.mesh, sizes)
            out.append(x)
        return tree_unflatten(out, spec)

    def _warn_dropout(self) -> None:
        """Training with dropout > 0 in the model's own glue: each tile draws its own mask, so
        Boltz-style row/column-shared masks are not shared *across* tiles. Say so once."""
        if getattr(self, "_dropout_warned", False) or self.mesh.p == 1:
            return
        rates = [float(getattr(m, "p" if isinstance(m, nn.Dropout) else "dropout", 0.0) or 0.0)
                 for m in self.inner.modules()
                 if isinstance(m, nn.Dropout) or isinstance(getattr(m, "dropout", None), (int, float))]
        if any(r > 0 for r in rates):
            warnings.warn(
                f"autocp.parallelize: training with dropout (rate {max(rates)}) on a {self.mesh.p}x"
                f"{self.mesh.p} mesh: the model's own dropout masks are drawn per tile, so row-/column-"
                f"shared masks (Boltz get_dropout_mask) are not shared across tiles and differ from a "
                f"single-device run. Fix: train with dropout=0 here, or use the hand-assembled "
                f"autocp.ops.pairformer.Pairformer2D(module, mesh, reproduce_dropout=...) whose masks "
                f"follow Boltz's semantics.", stacklevel=3)
        object.__setattr__(self, "_dropout_warned", True)

    def graph_runner(self, n: int, n_seq=None):
        """The sharded tile program (:class:`~autocp.passes.graph_emit.GraphRunner`) built for
        the token length ``n`` (and MSA depth ``n_seq``); None on the eager engine. It runs on
        this rank's tiles, inside :func:`~autocp.passes.context.tile_context`:
        ``runner(local_args, local_kwargs)``; output layouts ``runner.out_tags``."""
        return (getattr(self, "_graphs", None) or {}).get((n, n_seq))

    def _graph_for(self, args, kwargs, n, n_seq):
        """The graph runner for this call's sizes (captured graphs are specialised to N:
        a new N is captured and sharded once, then cached)."""
        graphs = getattr(self, "_graphs", None)
        if graphs is None:
            return None
        key = (n, n_seq)
        if key not in graphs:
            ea, ekw = example_call(args, kwargs)
            with torch.random.fork_rng(devices=[]):  # a capture mid-run must not move the model's random stream
                graphs[key] = self._graph_builder(ea, ekw, n, n_seq)
        runner = graphs[key]
        self.output_tags = list(runner.out_tags)
        return runner

    def _run_engine(self, a, kw, n, n_seq):
        """The model's own python on TileTensors (:mod:`autocp.passes.eager`): every torch call
        on a sharded input goes through the rule table, registered modules run their 2D ops;
        the outputs' layouts are what the run produced (``output_tags`` is updated)."""
        from .eager import TileTensor, global_shape, pending_view_writes, raise_view_write, strict_mode

        leaves, spec = tree_flatten((a, kw))
        wrapped, k = [], 0
        for x in leaves:
            if isinstance(x, torch.Tensor):
                tags = self.input_tags[k] if k < len(self.input_tags) else None
                k += 1
                if tags and any(t is not None for t in tags):
                    x = TileTensor(x, tags, global_shape(x.shape, tags, n, n_seq))
            wrapped.append(x)
        a2, kw2 = tree_unflatten(wrapped, spec)
        log = getattr(self.report, "glue", None)
        with strict_mode(self.strict), claimed_functions(), \
                (glue_log(log) if log is not None else contextlib.nullcontext()):
            out = self.inner(*a2, **kw2)
        oleaves, ospec = tree_flatten(out)
        res, tags_out = [], []  # one layout per output leaf
        for o in oleaves:
            if pending_view_writes(o):
                raise_view_write(o, "returned by the model")
            if isinstance(o, TileTensor):
                res.append(o.local)
                tags_out.append(o.tags)
            else:
                tags_out.append((None,) * o.dim() if isinstance(o, torch.Tensor) else None)
                res.append(o)
        self.output_tags = tags_out
        return tree_unflatten(res, ospec)

    def forward(self, *args, output: str = "full", **kwargs):
        if output not in ("full", "local", "dtensor"):
            raise ValueError(f"output must be 'full', 'local' or 'dtensor'; given {output!r}")
        if self.training and torch.is_grad_enabled():
            self._warn_dropout()
        mesh = self.mesh
        leaves, spec = tree_flatten((args, kwargs))
        dt_cls = _dtensor_cls()
        full_leaves = leaves  # DTensors report their global shape, so N is read the same way
        n, n_seq = self._sizes(full_leaves)
        local = []
        k = 0
        for leaf in full_leaves:
            if isinstance(leaf, torch.Tensor):
                tags = self.input_tags[k] if k < len(self.input_tags) else None
                k += 1
                if dt_cls is not None and isinstance(leaf, dt_cls):
                    # a tile in: its gradient is DTensor's (true, equal on every replica)
                    lay = layout_of_tags(tags)
                    x = lay.from_dtensor(leaf, mesh) if lay is not None else leaf.full_tensor()
                    local.append(from_partial(x, tags if lay is not None else None, mesh))
                else:
                    if tags:
                        mesh.check_tokens(n, "N")
                    # a full input is replicated on every rank: its gradient is summed over the mesh
                    local.append(shard_tags(from_partial(leaf, None, mesh), tags, mesh))
            else:
                local.append(leaf)
        a, kw = tree_unflatten(local, spec)
        with tile_context(mesh, n, n_seq):
            graph = self._graph_for(args, kwargs, n, n_seq)
            if graph is not None:  # emit="graph": the sharded captured graph (autocp.passes.graph_emit)
                out = graph(a, kw)
            elif self.engine:
                out = self._run_engine(a, kw, n, n_seq)
            else:  # a root 2D op: called with the model's own arguments on tiles
                out = self.inner(*a, **kw)
        if self.grad_reducer is not None and torch.is_grad_enabled():
            self.grad_reducer.attach_output([x for x in tree_flatten(out)[0]])
        # outputs: DTensor semantics (autocp.tile_io): a cotangent is the true one of what the
        # caller holds -- a tile's, or a replicated value's, the same on every replica
        oleaves, ospec = tree_flatten(out)
        res = []
        per_leaf = leaf_tags(oleaves, self.output_tags)
        for i, leaf in enumerate(oleaves):
            if isinstance(leaf, torch.Tensor):
                tags = per_leaf[i]
                what = f"{i} of {self._original_type.__name__}"
                if output == "local":
                    res.append(to_partial(leaf, tags, mesh, n, n_seq, what=what))
                elif output == "dtensor":
                    lay = layout_of_tags(tags)
                    if lay is None and any(t is not None for t in tags or ()):
                        from ..layout import LayoutError

                        raise LayoutError(
                            f"parallelize: output {what} has the tile layout tags {tags}, which no DTensor "
                            f"placement describes; required a Pair2D / RowToken / ColToken / MsaTiles / replicated "
                            f"layout for output='dtensor'. Fix: output='local' (this rank's tiles; their layout "
                            f"is pm.output_tags) or output='full'.")
                    sizes = [n_seq if tags[d] == "s" else n for d in lay.dims] if lay else []
                    leaf = to_partial(leaf, tags, mesh, n, n_seq, what=what)
                    res.append(lay.to_dtensor(leaf, mesh, sizes) if lay is not None else leaf)
                else:
                    full = gather_tags(leaf, tags, mesh, n, n_seq)  # backward: reduce-scatter (a sum)
                    res.append(to_partial(full, None, mesh, what=what))
            else:
                res.append(leaf)
        return tree_unflatten(res, ospec)


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor

        return DTensor
    except Exception:  # noqa: BLE001
        return None
