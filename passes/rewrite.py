"""Claims: decide, per registered module, what runs on the tiles.

Requires: a capture (:mod:`autocp.passes.trace`) with registered modules opaque.

Guarantees: a :class:`RewritePlan` with one :class:`Action` per registered module instance:

* ``"op"`` -- replaced by its 2D op (``rule.build(module, mesh)``), called with the
  module's own arguments on local tiles, its inputs in the layouts the sharding pass met
  them in (:func:`opaque_layouts`);
* ``"fallback"`` -- a registered module without an available op: :class:`GatherFallback`
  gathers its inputs to full tensors, runs the original module and re-shards its outputs.
  Exact (forward and backward) but ``O(N^2)`` memory per rank: warned with the MiB it costs.

Everything else -- the model's python glue, LayerNorms, Linears, transitions, residuals,
dropout masks, and every unregistered module's ops (triangle updates and attentions in any
spelling included) -- is the sharding pass's: one rule table (:mod:`autocp.passes.shard`)
proves each op tile-local, redistributes it, runs it as a ring or gathers it exactly
(refused under ``strict=True`` for a pair tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .. import comm
from ..layout import block_size, pad_to
from ..mesh import COL, ROW
from .shard import canonical_tags, standard_tags
from .tags import canonical_out_tags, map_tagged
from .wrapper import ModuleWrapper
from .record import rec

__all__ = ["Action", "RewritePlan", "plan_rewrite", "opaque_layouts", "entry_full_bytes", "refused_module_paths",
           "GatherFallback",
           "gather_tags", "shard_tags"]


@dataclass
class Action:
    path: str
    action: str  # "op" | "fallback" (gathered) | "eager" (the root, on the engine)
    why: str
    kind: str = ""
    module_cls: str = ""
    full_bytes: int = 0  # fallback: bytes of the full tensors it materialises per rank
    in_tags: list = field(default_factory=list)
    out_tags: list = field(default_factory=list)
    op_name: str = ""
    builder: Optional[Callable] = None  # (module, mesh) -> replacement; None = the registry's op
    entry_path: str = ""  # the opaque call's path in its captured graph (a block's representative)


@dataclass
class RewritePlan:
    actions: dict = field(default_factory=dict)  # path -> Action
    warnings: list = field(default_factory=list)


# ----------------------------------------------------------------------------- tag gather/shard
def _axis_and_index(tag, mesh):
    # 'r' / 's' blocks are indexed by r and vary along the column group; 'c' by c along the row
    if tag in ("r", "s"):
        return COL, mesh.r
    return ROW, mesh.c


def gather_tags(x: torch.Tensor, tags, mesh, n: int, n_seq: Optional[int] = None) -> torch.Tensor:
    """Local piece -> full tensor (differentiable; backward = reduce-scatter, exact under the
    partial-gradient convention), trimming padding."""
    if tags is None:
        return x
    for d, t in enumerate(tags):
        if t in ("r", "c", "s"):
            axis, _ = _axis_and_index(t, mesh)
            x = comm.all_gather_axis(x, mesh, axis, d)
            size = n_seq if t == "s" else n
            x = x.narrow(d, 0, size)
    return x


def shard_tags(x: torch.Tensor, tags, mesh) -> torch.Tensor:
    """Full tensor -> this rank's (zero-padded) block."""
    if tags is None:
        return x
    for d, t in enumerate(tags):
        if t in ("r", "c", "s"):
            _, idx = _axis_and_index(t, mesh)
            size = x.shape[d]
            b = block_size(size, mesh.p)
            lo, hi = min(idx * b, size), min((idx + 1) * b, size)
            x = pad_to(x.narrow(d, lo, hi - lo), d, b)
    return x


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class GatherFallback(ModuleWrapper):
    """Runs ``module`` on gathered full tensors and returns this rank's blocks.

    Same parameters and state_dict keys as ``module`` (its children and direct
    parameters are registered here). The layouts are its plan :class:`Action`'s
    ``in_tags`` / ``out_tags`` (one tag tuple per tensor leaf of the call's ``(args,
    kwargs)`` / of the output, in ``tree_flatten`` order), filled in when the graph runner
    shards the call (:func:`opaque_layouts`).
    """

    def __init__(self, module: nn.Module, mesh, action, path: str = ""):
        super().__init__(module, mesh, path)
        self.action = action

    def forward(self, *args, **kwargs):
        from .context import current

        ctx = current()
        a, kw = map_tagged((args, kwargs), self.action.in_tags,
                           lambda x, tags: gather_tags(x, tags, self.mesh, ctx.n, ctx.n_seq))
        out = self.inner(*a, **kw)
        return map_tagged(out, self.action.out_tags, lambda x, tags: shard_tags(x, tags, self.mesh))


# ----------------------------------------------------------------------------- planning
def plan_rewrite(capture, mesh) -> RewritePlan:
    """One action per registered module the capture kept opaque: ``"op"`` (its 2D op) when
    the rule builds one for this module and mesh, else ``"fallback"`` (gathered, exact,
    warned). Everything else -- every ATen op of the model's glue and of unregistered
    modules -- is the sharding pass's (:mod:`autocp.passes.shard`, the one rule table). The
    boundary layouts of each action are the ones the sharding pass meets at its call
    (:func:`opaque_layouts`, filled in by the graph runner)."""
    plan = RewritePlan()
    for _prefix, gm, blk in capture.graphs():
        for nd in gm.graph.nodes:
            entry = rec(nd).opaque
            if entry is None or entry.kind not in ("module", "fallback"):
                continue
            paths = [entry.path] if blk is None else [p + entry.path[len(blk.rep):] for p in blk.paths]
            full = entry_full_bytes(entry)
            rule = entry.rule
            for path in paths:
                if entry.kind == "module" and rule is not None and rule.op_factory is not None \
                        and _op_available(rule, entry.module, mesh):
                    plan.actions[path] = Action(path, "op", f"registry:{entry.cls_name}", rule.kind, entry.cls_name,
                                                op_name=getattr(rule.op_factory, "__qualname__", ""),
                                                entry_path=entry.path)
                else:
                    why = (f"registered {entry.cls_name} has no 2D op in this checkout" if entry.kind == "module"
                           else f"{entry.cls_name} was asked to run gathered")
                    plan.actions[path] = Action(path, "fallback", why, rule.kind if rule else "unsupported",
                                                entry.cls_name, full_bytes=full, entry_path=entry.path)
    return plan


def entry_full_bytes(entry) -> int:
    """Bytes of the whole tensors an opaque call takes and returns (what running it gathered
    materialises on every rank)."""
    return sum(_nbytes(s, d) for s, d in (entry.in_meta or [])) + sum(
        _nbytes(s, d) for s, d in (entry.out_meta or [(entry.in_meta or [((), torch.float32)])[0]]))


def refused_module_paths(err) -> list:
    """The module instance paths a :class:`~autocp.passes.shard.ShardingError` names (the
    innermost module of the refused op; a repeated block's module in every instance), or
    ``[]`` when the op is the model's own top-level python."""
    path, _cls = err.module_path
    if err.block_paths:
        if path != "block" and not path.startswith("block."):
            return []
        return [p + path[len("block"):] for p in err.block_paths]
    return [path] if path else []


def opaque_layouts(entry, in_tags, n: int):
    """``(in_tags, out_tags)`` of an opaque call whose tensor inputs arrive with ``in_tags``
    (the sharding pass's tags): a registered module takes each in its standard layout
    (:func:`~autocp.passes.shard.standard_tags`, the same as the engine's ``RegisteredOp``:
    a transposed pair is exchanged to Pair2D first) and returns ``rule.out_layouts(in_tags)``
    (default: its first input's layout); a module run gathered returns its token-length dims
    as ``r``, ``c`` in order."""
    in_tags = [standard_tags(canonical_tags(t)) if isinstance(t, tuple) else None for t in in_tags]
    if entry.kind == "module":
        rule = entry.rule
        if rule is not None and rule.out_layouts is not None:
            out = list(rule.out_layouts(in_tags))
        else:
            out = [in_tags[0]] if in_tags else [None]
    else:
        out = canonical_out_tags(entry.out_meta or [], n)
    return in_tags, [canonical_tags(t) if isinstance(t, tuple) else t for t in out]


def _op_available(rule, module, mesh) -> bool:
    try:
        return rule.op_factory(module, mesh) is not None
    except Exception:  # noqa: BLE001 -- an op that refuses the module -> fallback
        return False
