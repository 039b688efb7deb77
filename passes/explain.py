"""The explain report: every claimed module (its rule, layouts, comm), then what the glue's
tile programs do (the sharding notes: gathers, exchanges, all-reduces, rings, with bytes and
source lines), memory on request.

Requires: capture, plan and the graph runner. Produces a :class:`Report` (rows + a networkx
view of the tile programs, :mod:`autocp.passes.graphview`); :func:`render` formats it as a
table; ``report.to_graphml(path)`` / ``report.to_dot()`` export the programs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .tags import layout_name

__all__ = ["Row", "Report", "build_report", "build_root_report", "build_engine_report", "render", "comm_per_rank",
           "layer_comm", "glue_lines"]


@dataclass
class Row:
    path: str
    module_cls: str
    kind: str
    rule: str
    action: str  # op (a registered module's 2D op) | fallback (gathered) | eager (the engine runs the model)
    in_layouts: str
    out_layouts: str
    comm_bytes: Optional[int]  # op: max over ranks of the bytes sent in one forward call
    note: str = ""
    comm_per_rank: dict = field(default_factory=dict)  # (r, c) -> bytes sent in one forward call


@dataclass
class Report:
    rows: list = field(default_factory=list)
    n_tokens: int = 0
    p: int = 1
    capture_seconds: float = 0.0
    n_nodes: int = 0
    blocks: dict = field(default_factory=dict)
    peak_bytes: Optional[int] = None
    model: object = None
    dtype: torch.dtype = torch.float32
    engine: str = ""  # set when the model runs on the eager engine (why it is not captured)
    islands: object = None  # engine: () -> [(path, "captured" | "eager", detail)] of its submodules so far
    glue: object = None  # GlueLog (autocp.passes.context): the sharding notes of the tile programs that ran

    programs: list = field(default_factory=list)  # [(name, fx.GraphModule)] of the tile programs
    _view: object = None

    @property
    def view(self):
        """The networkx view of the tile programs (:mod:`autocp.passes.graphview`), built on
        first use."""
        if self._view is None:
            from .graphview import GraphView

            self._view = GraphView(self.programs)
        return self._view

    def to_graphml(self, path: str) -> None:
        self.view.to_graphml(path)

    def to_dot(self) -> str:
        return self.view.to_dot()

    @property
    def networkx(self):
        return self.view.g

    def by_kind(self, kind: str) -> list:
        return [r for r in self.rows if r.kind == kind]


def _channels(module) -> int:
    for prm in module.parameters():
        if prm.dim() >= 1:
            return int(prm.shape[0])
    return 0


def comm_per_rank(rule, module, p, n, batch, itemsize) -> dict:
    """``{(r, c): bytes sent by that rank in one forward call}`` from the rule's formula
    (the op's own analytic volume, evaluated with the module's real widths/heads, the
    global N, the batch and the pair dtype's element size); ``{}`` when it fails."""
    from ..registry import call_comm_formula

    try:
        return {(r, c): call_comm_formula(rule.comm_bytes, module, p=p, r=r, c=c, n=n, batch=batch,
                                          itemsize=itemsize, channels=_channels(module))
                for r in range(p) for c in range(p)}
    except Exception:  # noqa: BLE001 -- a formula that cannot be evaluated: no number
        return {}


def build_report(model, cap, plan, mesh, n, tensors=(), runner=None) -> Report:
    """Rows of the claimed modules (their 2D ops, layouts as the sharding pass met them, the
    op's comm formula); the glue's own sharding notes are added as the programs run
    (``report.glue``); ``runner``'s tile programs are the graph view."""
    progs = []
    if runner is not None:
        progs.append(("top", runner.prog.gm))
        seen: dict = {}
        for (g, _tags), pr in runner.block_progs.items():  # a block group sharded per input layout
            k = seen[g] = seen.get(g, -1) + 1
            progs.append((g if k == 0 else f"{g}#{k}", pr.gm))
    rep = Report(n_tokens=n, p=mesh.p, capture_seconds=cap.seconds, n_nodes=cap.n_nodes,
                 blocks={g: len(b.paths) for g, b in cap.blocks.items()}, programs=progs, model=model)
    itemsize = 4
    for t in tensors:
        if t.dtype.is_floating_point:
            itemsize = t.element_size()
            rep.dtype = t.dtype
            break
    batch = next((int(t.shape[0]) for t in tensors if t.dim() >= 3 and t.shape[1] == n and t.shape[2] == n), 1)

    def sort_key(path):
        return [int(x) if x.isdigit() else x for x in path.split(".")]

    from ..registry import lookup_module

    for path in sorted(plan.actions, key=sort_key):
        act = plan.actions[path]
        mod = model.get_submodule(path)
        rule = lookup_module(mod)
        comm = None
        per_rank = {}
        if act.action == "op" and rule is not None and rule.comm_bytes is not None:
            per_rank = comm_per_rank(rule, mod, mesh.p, n, batch, itemsize)
            comm = max(per_rank.values()) if per_rank else None
        elif act.action == "fallback":
            comm = act.full_bytes
        rep.rows.append(Row(
            path=path, module_cls=act.module_cls, kind=act.kind or "module",
            rule=act.why if act.action == "op" else f"fallback ({act.why})",
            action=act.action,
            in_layouts=", ".join(layout_name(t) for t in act.in_tags),
            out_layouts=", ".join(layout_name(t) for t in act.out_tags),
            comm_bytes=comm, note=act.op_name, comm_per_rank=per_rank,
        ))
    return rep


def build_root_report(model, rule, plan, mesh, n, tensors=()) -> Report:
    """Report of a model that is itself one registered module (no capture)."""
    rep = Report(n_tokens=n, p=mesh.p, model=model)
    for t in tensors:
        if t.dtype.is_floating_point:
            rep.dtype = t.dtype
            break
    act = plan.actions[""]
    rep.rows.append(Row(path="<root>", module_cls=act.module_cls, kind=act.kind or "module", rule=act.why,
                        action="op", in_layouts=", ".join(layout_name(t) for t in act.in_tags),
                        out_layouts=", ".join(layout_name(t) for t in act.out_tags), comm_bytes=None,
                        note=act.op_name))
    return rep


def build_engine_report(model, plan, mesh, n, tensors=(), why: str = "") -> Report:
    """Report of a model run on the eager engine (:mod:`autocp.passes.eager`): one row per
    registered module bound to its 2D op (with its comm formula), the glue op by op."""
    rep = Report(n_tokens=n, p=mesh.p, model=model, engine=why or "requested (emit='eager')")
    itemsize = 4
    for t in tensors:
        if t.dtype.is_floating_point:
            rep.dtype, itemsize = t.dtype, t.element_size()
            break
    batch = next((int(t.shape[0]) for t in tensors if t.dim() >= 3 and t.shape[1] == n and t.shape[2] == n), 1)
    from ..registry import lookup_module

    for path, act in plan.actions.items():
        mod = model.get_submodule(path)
        rule = lookup_module(mod) if act.action == "op" else None
        per_rank = comm_per_rank(rule, mod, mesh.p, n, batch, itemsize) if rule is not None and \
            rule.comm_bytes is not None else {}
        rep.rows.append(Row(path=path or "<root>", module_cls=act.module_cls, kind=act.kind or "module",
                            rule=act.why, action=act.action, in_layouts="", out_layouts="",
                            comm_bytes=max(per_rank.values()) if per_rank else None, note=act.op_name,
                            comm_per_rank=per_rank))
    return rep


def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def render(rep: Report, memory: bool = False, mesh_shape=None) -> str:
    """A readable table of the report; ``memory=True`` adds the estimated per-rank peak."""
    if rep is None:
        return "(no report)"
    if rep.engine:
        head = (f"autocp plan: N={rep.n_tokens} on a {rep.p}x{rep.p} mesh; eager engine (the model's python on "
                f"TileTensors, every torch call through the shard rule table, exact): {rep.engine}")
    else:
        head = (f"autocp plan: N={rep.n_tokens} on a {rep.p}x{rep.p} mesh; captured {rep.n_nodes} ATen nodes in "
                f"{rep.capture_seconds:.2f}s; repeated blocks captured once: "
                f"{', '.join(f'{g}' for g in rep.blocks) or 'none'}; every op not claimed by a registered module "
                f"is sharded by one rule table (the notes below)")
    cols = ["module", "class", "op kind", "matched by", "action", "in layouts", "out layouts", "comm/call"]
    # comm/call: op rows = max over ranks of the bytes one rank sends in one forward call
    # (exact: the op's own formula); fallback rows = bytes of the full tensors it gathers
    data = [[r.path, r.module_cls, r.kind, r.rule, r.action, r.in_layouts, r.out_layouts, _fmt_bytes(r.comm_bytes)]
            for r in rep.rows]
    widths = [max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(cols)]
    widths = [min(w, 48) for w in widths]

    def line(vals):
        return "  ".join(str(v)[:w].ljust(w) for v, w in zip(vals, widths))

    if data:
        out = [head, line(cols), line(["-" * w for w in widths])]
        out += [line(d) for d in data]
    else:
        out = [head, "no module claimed (no registered module): every op runs through the rule table"]
    if rep.islands is not None:
        isl = rep.islands()
        out.append(f"submodules run so far: {sum(m == 'captured' for _, m, _ in isl)} captured (their sharded tile "
                   f"programs), {sum(m == 'eager' for _, m, _ in isl)} eager (op by op)")
        out += [f"  {p}: {m} ({d})" for p, m, d in isl[:40]]
    n_op = sum(1 for r in rep.rows if r.action == "op")
    n_fb = sum(1 for r in rep.rows if r.action == "fallback")
    out.append(f"{n_op} modules run as 2D ops, {n_fb} gathered (fallback)")
    per_layer = {k: max(v.values()) for k, v in layer_comm(rep).items() if v and max(v.values())}
    if per_layer:
        first = next(iter(per_layer))
        out.append(f"comm per layer (exact, bytes sent by the busiest rank, one forward): {first}: "
                   f"{_fmt_bytes(per_layer[first])}"
                   + (f" (x{len(per_layer)} layers, total {_fmt_bytes(sum(per_layer.values()))})" if len(per_layer) > 1 else ""))
    if rep.glue is not None:
        out += glue_lines(rep.glue.notes, engine=bool(rep.engine))
    if memory and rep.model is not None:
        from .estimate import estimate

        est = estimate(rep.model, n_tokens=rep.n_tokens, mesh_shape=mesh_shape or (rep.p, rep.p), dtype=rep.dtype)
        rep.peak_bytes = est.peak_bytes
        out.append(f"estimated per-rank peak memory (forward, {rep.dtype}): {_fmt_bytes(est.peak_bytes)}")
    return "\n".join(out)


def layer_comm(rep: Report, depth: int = 2) -> dict:
    """``{layer: {(r, c): bytes}}``: bytes each rank sends in one forward of each layer
    (the op rows under the first ``depth`` components of their path, e.g. ``layers.0``),
    summed per rank. The report's per-layer line prints the max over ranks."""
    out = {}
    for r in rep.rows:
        if r.action != "op" or not r.comm_per_rank:
            continue
        key = ".".join(r.path.split(".")[:depth])
        acc = out.setdefault(key, {})
        for rk, v in r.comm_per_rank.items():
            acc[rk] = acc.get(rk, 0) + v
    return out


#: the sharding notes explain() lists, in this order (what each costs a rank)
_GLUE_KINDS = (("gather", "gather"), ("op-gather", "op gathered"), ("exchange", "exchange"),
               ("all-reduce", "all-reduce"), ("narrow", "owner narrow"), ("ring", "ring"),
               ("replicated", "replicated"), ("attention-unmatched", "attention unmatched"))


def _short_source(src: str) -> str:
    """``file.py:13: code`` of a note's ``File "/x/file.py", line 13, in f: code``."""
    import re

    m = re.match(r'File "([^"]+)", line (\d+)(?:, in \w+)?:?\s*(.*)', src or "")
    if not m:
        return src or ""
    return f"{m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}: {m.group(3)}".strip()


def glue_lines(notes, engine: bool = False, limit: int = 8) -> list:
    """Report lines of what the glue did (the notes of the tile programs that ran: each program
    once, a repeated block's once): a count per kind, then each gather, exchange, all-reduce
    and ring with its bytes per rank and the model's source line."""
    if not notes:
        return [f"glue{' run so far' if engine else ''}: every op tile-local (no gather, exchange or all-reduce)"]
    by = {}
    for nt in notes:
        by.setdefault(nt.what, []).append(nt)
    counts = ", ".join(f"{len(by[k])} {label}{'s' if len(by[k]) != 1 and not label.endswith('ed') else ''}"
                       for k, label in _GLUE_KINDS if k in by)
    pair = sum(1 for nt in notes if nt.pair and nt.what in ("gather", "op-gather"))
    out = [f"glue{' run so far' if engine else ''} (the tile programs, each once): {counts}"
           + (f"; {pair} gather(s) of a pair tensor" if pair else "")]
    for k, label in _GLUE_KINDS:
        for nt in by.get(k, [])[:limit]:
            size = f" [{_fmt_bytes(nt.nbytes)}/rank]" if nt.nbytes else ""
            src = _short_source(nt.source)
            out.append(f"  {label:<12} {nt.node} ({nt.op}){size}: {nt.detail}" + (f"  <- {src}" if src else ""))
        if len(by.get(k, [])) > limit:
            out.append(f"  ... {len(by[k]) - limit} more {label}")
    return out
