"""Pass 4 -- rewrite: decide, per module, what runs on the tiles.

Requires: capture + analysis + match (``autocp.match``, uncovered nodes).

Guarantees: a :class:`RewritePlan` mapping module paths to actions, every live node that
needs a full tensor covered by exactly one action:

* ``"op"`` -- a registered module replaced by its 2D op (``rule.build(module, mesh)``),
  called with the module's own arguments on local tiles; or an unregistered module whose
  only full-tensor ops are structurally matched triangle multiplications / triangle
  attentions, replaced by :class:`autocp.passes.structural.StructuralOp` (its own graph on
  tiles; ``why`` = ``structural:triangle_mult`` / ``structural:triangle_attn``);
* ``"fallback"`` -- a module (registered without an available op, or containing pair
  ops no rule covers) replaced by :class:`GatherFallback`: gather its inputs to full
  tensors, run the original module, re-shard its outputs. Exact (forward and backward)
  but it costs full ``O(N^2)`` memory on every rank: a warning says how much, and
  ``strict=True`` raises instead, naming the node and how to register the module.

Everything else -- the model's own python glue, LayerNorms, Linears, transitions,
residuals, dropout masks -- runs unchanged on the tiles: those ops are tile-local, and
shape constants on token axes (``rand([1, N, 1, 1])``, ``new_ones(x.shape[:-1])``) come
out at the tile size because the python recomputes them from local shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .. import comm
from ..layout import block_size, pad_to
from ..mesh import COL, ROW
from .tags import canonical_out_tags, map_tagged
from .wrapper import ModuleWrapper
from .record import rec

__all__ = ["UnsupportedPairOpError", "Action", "RewritePlan", "plan_rewrite", "GatherFallback",
           "gather_tags", "shard_tags"]


class UnsupportedPairOpError(RuntimeError):
    """strict=True and a pair op has no distributed implementation."""


@dataclass
class Action:
    path: str
    action: str  # "op" | "fallback" | "glue" (graph emit: unbound, sharded op by op)
    why: str
    kind: str = ""
    module_cls: str = ""
    full_bytes: int = 0  # fallback: bytes of the full tensors it materialises per rank
    in_tags: list = field(default_factory=list)
    out_tags: list = field(default_factory=list)
    op_name: str = ""
    builder: Optional[Callable] = None  # (module, mesh) -> replacement; None = the registry's op


@dataclass
class RewritePlan:
    actions: dict = field(default_factory=dict)  # path -> Action
    fallback_paths: set = field(default_factory=set)  # need an opaque re-capture
    boundary: dict = field(default_factory=dict)  # fallback path -> [(shape, tags)] of its outputs
    reasons: dict = field(default_factory=dict)  # fallback path -> why (first pair op / structural match)
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
    parameters are registered here). ``in_tags`` / ``out_tags``: one tag tuple per tensor
    leaf of the call's ``(args, kwargs)`` / of the output, in ``tree_flatten`` order.
    """

    def __init__(self, module: nn.Module, mesh, in_tags, out_tags, path: str = ""):
        super().__init__(module, mesh, path)
        self.in_tags = list(in_tags)
        self.out_tags = list(out_tags)

    def forward(self, *args, **kwargs):
        from .context import current

        ctx = current()
        a, kw = map_tagged((args, kwargs), self.in_tags,
                           lambda x, tags: gather_tags(x, tags, self.mesh, ctx.n, ctx.n_seq))
        out = self.inner(*a, **kw)
        return map_tagged(out, self.out_tags, lambda x, tags: shard_tags(x, tags, self.mesh))


# ----------------------------------------------------------------------------- planning
def _tags_list(tags):
    if tags is None:
        return []
    return list(tags) if isinstance(tags, list) else [tags]


def plan_rewrite(capture, match_result, mesh, *, strict: bool = False, n_tokens: int = 0,
                 reasons: Optional[dict] = None) -> RewritePlan:
    """Decide the action of every registered module and every uncovered pair op."""
    plan = RewritePlan()
    # 1. registered modules -> op, else fallback (exact)
    for prefix, gm, blk in capture.graphs():
        for nd in gm.graph.nodes:
            entry = rec(nd).opaque
            if entry is None or entry.kind not in ("module", "fallback"):
                continue
            paths = [entry.path]
            if blk is not None:
                paths = [p + entry.path[len(blk.rep):] for p in blk.paths]
            in_tags = rec(nd).in_layouts or []
            out_tags = _tags_list(rec(nd).out_layouts)
            if entry.kind == "fallback":
                out_tags = entry.out_tags or canonical_out_tags(entry.out_meta or [], n_tokens)
            full = sum(_nbytes(s, d) for s, d in (entry.in_meta or [])) + sum(
                _nbytes(s, d) for s, d in (entry.out_meta or [(entry.in_meta or [((), torch.float32)])[0]]))
            structural, s_err = None, None
            if entry.kind == "fallback":
                structural, s_err = _try_structural(entry, in_tags, out_tags, mesh, n_tokens)
            for path in paths:
                rule = entry.rule
                if structural is not None:
                    kinds, detail, s_rule, prog = structural
                    plan.actions[path] = Action(path, "op", s_rule, kinds, entry.cls_name,
                                                in_tags=in_tags, out_tags=out_tags,
                                                op_name=f"StructuralOp ({detail})",
                                                builder=_structural_builder(entry, in_tags, out_tags, n_tokens,
                                                                            prog))
                    continue
                if entry.kind == "fallback" and strict:
                    why = (reasons or {}).get(path) or f"{entry.cls_name} contains pair ops no rule covers"
                    raise UnsupportedPairOpError(
                        f"autocp (strict): module {path} ({entry.cls_name}) needs the full pair tensor: {why}. "
                        f"Given: no registered module covers it, and the structural rewrite (which ports "
                        f"triangle multiplications and triangle attentions without registration) failed: "
                        f"{s_err}. Required: a distributed implementation of every pair op in it. Fix: "
                        f"autocp.register_module({entry.cls_name}, "
                        f"lambda module, mesh: My2DOp(module, mesh)) (call='pair' for the op(z, mask, n_tokens=N) "
                        f"contract), or run with strict=False to gather -> run -> re-shard that module."
                    )
                if entry.kind == "module" and rule is not None and rule.op_factory is not None and _op_available(rule, entry.module, mesh):
                    plan.actions[path] = Action(path, "op", f"registry:{entry.cls_name}", rule.kind, entry.cls_name,
                                                in_tags=in_tags, out_tags=out_tags,
                                                op_name=getattr(rule.op_factory, "__qualname__", ""))
                else:
                    why = (f"registered {entry.cls_name} has no 2D op in this checkout" if entry.kind == "module"
                           else (reasons or {}).get(path) or f"{entry.cls_name} contains pair ops no rule covers")
                    if s_err:
                        why += f" (structural rewrite: {s_err})"
                    plan.actions[path] = Action(path, "fallback", why, rule.kind if rule else "unsupported",
                                                entry.cls_name, full_bytes=full, in_tags=in_tags, out_tags=out_tags)
    # 2. uncovered pair ops and structural matches without an op -> the innermost module
    reasons: dict = {}
    for prefix, nd, path, reason in match_result.uncovered:
        reasons.setdefault((prefix, path), []).append((nd, reason))
    for m in match_result.matches:
        if m.rule.startswith("structural:"):
            reasons.setdefault((m.graph, m.path), []).append((None, f"structural match {m.kind} ({m.rule}) "
                                                                   f"in {m.module_cls or 'glue'} has no 2D op bound"))
    for (prefix, path), items in reasons.items():
        blk = next((b for b in capture.blocks.values() if b.rep == prefix), None) if prefix else None
        inst = [p + path[len(blk.rep):] for p in blk.paths] if blk is not None and path.startswith(blk.rep) else [path]
        first = items[0]
        node_name = first[0].name if first[0] is not None else "-"
        # only structural matches (no uncovered node) and a module to capture: the second round
        # tries the structural rewrite first (strict raises there if it fails)
        deferred = path != "" and all(nd is None for nd, _r in items)
        if strict and not deferred:
            cls = next((m.module_cls for m in match_result.matches if m.path == path), "") or path or "<top level>"
            raise UnsupportedPairOpError(
                f"autocp (strict): node {node_name!r} in module {path or '<top level>'} needs the full pair "
                f"tensor: {first[1]}. Given: no registered module or structural rule with a 2D op covers it. "
                f"Required: a distributed implementation. Fix: autocp.register_module({cls.split('.')[-1]}, "
                f"lambda module, mesh: My2DOp(module, mesh)) (call='pair' for the op(z, mask, n_tokens=N) "
                f"contract), or run with strict=False to gather -> run -> re-shard that module."
            )
        bnd = _boundary(capture, prefix, path)
        for p in inst:
            if p in plan.actions:
                continue
            plan.fallback_paths.add(p)
            plan.boundary[p] = bnd
            plan.reasons[p] = "; ".join(sorted({r for _n, r in items}))
    return plan


def _boundary(capture, prefix, path):
    """[(shape, tags)] of the values a module hands to the rest of the graph (its outputs),
    from the analysis -- the layouts the surrounding glue expects back from a fallback."""
    from .match import module_path_of

    gm = next((g for pre, g, _b in capture.graphs() if pre == prefix), None)
    if gm is None:
        return []

    def inside(nd):
        p = module_path_of(nd, prefix)[0]
        return p == path or p.startswith(path + ".") if path else True

    out = []
    for nd in gm.graph.nodes:
        if nd.op != "call_function" or not inside(nd):
            continue
        v = nd.meta.get("val")
        tags = rec(nd).layout
        if not isinstance(v, torch.Tensor) or not isinstance(tags, tuple):
            continue
        if any(not inside(u) or u.op == "output" for u in nd.users):
            out.append((tuple(v.shape), tags))
    return out


def fallback_out_tags(meta, boundary, n):
    """Output tags of a fallback module: the analysed layout of the matching boundary value
    (same shape), else token-length dims -> r, c in order."""
    canon = canonical_out_tags(meta, n)
    res = []
    for (shape, _d), c in zip(meta, canon):
        hit = next((t for s, t in reversed(boundary or []) if tuple(s) == tuple(shape)
                    and _token_tags_fit(t, s, n)), None)
        res.append(tuple(x if x in ("r", "c", "s", None) else None for x in hit) if hit else c)
    return res


def _token_tags_fit(tags, shape, n) -> bool:
    """A boundary layout is usable only if it puts the token tags 'r' / 'c' on dims of
    length N (a layout analysed for a differently shaped value must not be reused)."""
    return len(tags) == len(shape) and all(t not in ("r", "c") or s == n for t, s in zip(tags, shape))


def _try_structural(entry, in_tags, out_tags, mesh, n_tokens):
    """((kind, detail, rules, program), None) if the fallback module's graph can be rewritten
    to run on tiles (:mod:`autocp.passes.structural`), else (None, why not)."""
    from .structural import StructuralRewriteError, get_program

    try:
        prog = get_program(entry.module, entry.last_call, entry.in_meta or [], in_tags, n_tokens, mesh.p,
                           out_tags, share_key=entry.key)
    except StructuralRewriteError as exc:
        return None, str(exc)
    dirs = sorted({d for _n, d, _x in prog.contractions})
    kind = "triangle_mult_out" if dirs == ["outgoing"] else ("triangle_mult_in" if dirs == ["incoming"]
                                                             else "triangle_mult")
    detail = "; ".join(f"{nm} -> Cannon {d}" for nm, d, _x in prog.contractions)
    rules = ["structural:triangle_mult"] if prog.contractions else []
    if prog.attentions:  # triangle attention -> the ring attention of autocp.ops.triangle_attn
        akinds = sorted({k for _n, k, _x in prog.attentions})
        akind = akinds[0] if len(akinds) == 1 else "triangle_attn"
        kind = akind if not prog.contractions else f"{kind}+{akind}"
        detail = "; ".join([detail] * bool(detail) + [f"{nm} -> ring attention ({x})" for nm, _k, x in prog.attentions])
        rules.append("structural:triangle_attn")
    return (kind, detail, "+".join(rules), prog), None


def _structural_builder(entry, in_tags, out_tags, n_tokens, prog):
    """The plan's builder of the StructuralOp; it holds the program built while planning
    (the program cache is weak), so building the op does not capture the module again."""
    from .structural import StructuralOp

    def build(module, mesh):
        return StructuralOp(module, mesh, entry.last_call, entry.in_meta or [], in_tags, n_tokens,
                            path=entry.path, out_tags=out_tags, share_key=entry.key)

    return build


def _op_available(rule, module, mesh) -> bool:
    try:
        return rule.op_factory(module, mesh) is not None
    except Exception:  # noqa: BLE001 -- an op that refuses the module -> fallback
        return False
