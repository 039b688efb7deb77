"""Pass 3 -- match: typed match records, by registry and by structure.

Requires: the analysis (:mod:`autocp.passes.analyze`): ``autocp.layout``,
``autocp.kind``, ``autocp.needs_full``, ``autocp.contracted``, ``autocp.softmax_tag``.

Guarantees: ``rec(node).match`` is a :class:`Match` on every node that a rule
covers, and :func:`match` returns all matches plus the *uncovered* nodes (live nodes
that need a full tensor and no rule covers).

Rules
-----
* ``registry:<Class>`` -- an opaque registered module (match by class through the
  capture; :mod:`autocp.registry`).
* ``structural:triangle_mult`` -- a contraction (``einsum`` / ``matmul`` / ``bmm`` / ``mm``,
  after whatever permutes and views) over a token axis between two pair-derived tensors,
  not fed by a softmax. Contracting the column-token axis (``sum_k a[i,k] b[j,k]``) is
  *outgoing*, the row-token axis (``sum_k a[k,i] b[k,j]``) *incoming*.
* ``structural:attention`` -- a softmax (or SDPA) over a token axis of ``q . k`` (+ bias):
  if q/k are pair-derived it is triangle attention -- over the column axis *starting*
  node, over the row axis *ending* node (also when the model transposes outside the
  module); if q/k are token tensors and a pair-derived bias is added, pair-bias
  attention. The ``attn @ v`` contraction that consumes it is part of the match.
* ``structural:outer_product_mean`` -- a contraction over the MSA sequence axis.

The rules work on the ATen graph, so spelling (einsum vs matmul + permute, hand-written
vs library attention) does not matter. :class:`GraphView` is the networkx view used by
the matchers and by ``explain`` (GraphML / DOT export).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch

from .analyze import SOFTMAX
from .tags import layout_name, op_name as _name
from .trace import OPAQUE_OP, Capture
from .record import put, rec

__all__ = ["Match", "MatchResult", "GraphView", "match", "register_default_patterns", "module_path_of",
           "ancestors_until", "is_contraction", "n_token_tags", "rule_triangle_mult", "INPLACE_FORMS"]


@dataclass
class Match:
    """One match: what computes it (``kind``), which rule found it, where."""

    kind: str  # triangle_mult_out | triangle_mult_in | triangle_attn_start | ... | module
    rule: str  # "registry:<Class>" | "structural:<name>"
    path: str  # module path (innermost module containing the match), "" = top level
    graph: str  # "" for the top graph, else the block representative path
    nodes: list = field(default_factory=list)  # fx node names
    in_layouts: list = field(default_factory=list)
    out_layouts: list = field(default_factory=list)
    module_cls: str = ""
    detail: str = ""

    @property
    def is_triangle(self) -> bool:
        return self.kind.startswith("triangle_")


@dataclass
class MatchResult:
    matches: list = field(default_factory=list)
    uncovered: list = field(default_factory=list)  # [(graph prefix, node, module path, reason)]
    view: Optional["GraphView"] = None


# ----------------------------------------------------------------------------- module paths
def module_path_of(node, graph_prefix: str = "", skip_root_block: bool = True) -> tuple:
    """(innermost module path, class name) of a node from ``nn_module_stack``, with the
    block-capture wrapper (``BoundCall.block``) mapped back to the block's path."""
    stack = node.meta.get("nn_module_stack") or {}
    path, cls = "", ""
    for _k, (p, t) in stack.items():
        tname = t if isinstance(t, str) else getattr(t, "__qualname__", str(t))
        if tname.endswith("BoundCall"):
            continue
        path, cls = p, tname
    if graph_prefix:
        if path == "block":
            path = graph_prefix
        elif path.startswith("block."):
            path = graph_prefix + path[len("block"):]
    return path, cls.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------- networkx view
class GraphView:
    """A networkx ``DiGraph`` over all captured graphs (node id ``"<graph>/<node>"``)."""

    def __init__(self, capture: Capture):
        import networkx as nx

        self.g = nx.DiGraph()
        self.fx = {}
        for prefix, gm, _blk in capture.graphs():
            for nd in gm.graph.nodes:
                nid = f"{prefix or 'top'}/{nd.name}"
                self.fx[nid] = nd
                path, cls = module_path_of(nd, prefix)
                self.g.add_node(
                    nid,
                    op=nd.op,
                    target=_name(nd.target) if nd.op == "call_function" else str(nd.target),
                    layout=layout_name(rec(nd).layout),
                    kind=(rec(nd).kind or "other"),
                    needs_full=str(rec(nd).needs_full or ""),
                    module=path,
                    module_cls=cls,
                    graph=prefix or "top",
                )
                for inp in nd.all_input_nodes:
                    self.g.add_edge(f"{prefix or 'top'}/{inp.name}", nid)

    def annotate(self, matches):
        for m in matches:
            for name in m.nodes:
                nid = f"{m.graph or 'top'}/{name}"
                if nid in self.g:
                    self.g.nodes[nid]["match"] = m.kind
                    self.g.nodes[nid]["rule"] = m.rule

    def to_graphml(self, path: str) -> None:
        import networkx as nx

        nx.write_graphml(self.g, path)

    def to_dot(self) -> str:
        lines = ["digraph autocp {"]
        for nid, a in self.g.nodes(data=True):
            if a.get("op") not in ("call_function", "placeholder", "output"):
                continue
            label = f"{a.get('target')}\\n{a.get('layout')}"
            extra = ""
            if a.get("match"):
                label += f"\\n{a['match']}"
                extra = ", style=filled, fillcolor=lightblue"
            elif a.get("needs_full"):
                extra = ", style=filled, fillcolor=salmon"
            lines.append(f'  "{nid}" [label="{label}"{extra}];')
        for u, v in self.g.edges():
            if self.g.nodes[u].get("op") == "call_function" or self.g.nodes[u].get("op") == "placeholder":
                lines.append(f'  "{u}" -> "{v}";')
        lines.append("}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers
PASS_THROUGH = {"add", "sub", "mul", "div", "to", "_to_copy", "masked_fill", "where", "clone", "view", "reshape",
                "_unsafe_view", "permute", "transpose", "contiguous", "unsqueeze", "squeeze", "expand",
                "dropout", "native_dropout", "type_as", "float", "alias", "neg", "detach"}
#: in-place forms carrying the same value flow as their out-of-place ops (``scores += bias``)
INPLACE_FORMS = {"add_", "sub_", "mul_", "div_", "masked_fill_"}
PASS_THROUGH |= INPLACE_FORMS


def _ancestors_until(node, stop, limit=12):
    """Nodes reachable backwards through PASS_THROUGH ops (including ``node``)."""
    out, work, seen = [], [(node, 0)], set()
    while work:
        nd, d = work.pop()
        if nd in seen or d > limit:
            continue
        seen.add(nd)
        out.append(nd)
        if nd.op != "call_function" or stop(nd):
            continue
        if _name(nd.target) in PASS_THROUGH or nd.target is operator.getitem:
            for a in nd.all_input_nodes:
                work.append((a, d + 1))
    return out


def _is_contraction(nd) -> bool:
    return nd.op == "call_function" and _name(nd.target) in ("einsum", "matmul", "bmm", "mm", "baddbmm")


def _is_softmax(nd) -> bool:
    return nd.op == "call_function" and (_name(nd.target) in SOFTMAX or _name(nd.target) == "scaled_dot_product_attention")


def _n_token_tags(tags) -> int:
    if not isinstance(tags, tuple):
        return 0
    return sum(1 for t in tags if t in ("r", "c", "?"))


def _pair_derived(nd) -> bool:
    return _n_token_tags(rec(nd).layout) >= 2


def _softmax_fed(nd) -> bool:
    return any(_is_softmax(a) for a in _ancestors_until(nd, _is_softmax))


def _descendant_contraction(sm, tag):
    """The ``attn @ v`` contraction fed by softmax ``sm`` (through pass-through ops)."""
    work, seen = list(sm.users), set()
    while work:
        nd = work.pop()
        if nd in seen:
            continue
        seen.add(nd)
        if _is_contraction(nd):
            return nd
        if nd.op == "call_function" and (_name(nd.target) in PASS_THROUGH):
            work.extend(nd.users)
    return None


def _between(src, dst):
    """Nodes on forward paths src -> dst (exclusive) through pass-through ops."""
    out, work, seen = [], list(src.users), set()
    while work:
        nd = work.pop()
        if nd in seen or nd is dst:
            continue
        seen.add(nd)
        if nd.op == "call_function" and _name(nd.target) in PASS_THROUGH:
            out.append(nd)
            work.extend(nd.users)
    return out


# ----------------------------------------------------------------------------- default rules
def _rule_triangle_mult(view, nd):
    if not _is_contraction(nd):
        return None
    ct = rec(nd).contracted or {}
    tags = sorted({t for v in ct.values() for t in v if t in ("r", "c")})
    if len(tags) != 1:
        return None
    ops = rec(nd).operands or []
    if len(ops) != 2 or not all(_pair_derived(o) for o in ops):
        return None
    if any(_softmax_fed(o) for o in ops):
        return None
    kind = "triangle_mult_out" if tags[0] == "c" else "triangle_mult_in"
    # the distributed op returns a canonical Pair2D tile of out[i, j]
    out = list(rec(nd).layout or ())
    tok = [i for i, t in enumerate(out) if t in ("r", "c", "?")]
    if len(tok) == 2:
        out[tok[0]], out[tok[1]] = "r", "c"
        put(nd, layout_override=tuple(out))
    return {"kind": kind, "nodes": [nd], "detail": f"{_name(nd.target)} contracts the {'column' if tags[0] == 'c' else 'row'}-token axis"}


def _rule_attention(view, nd):
    if not _is_softmax(nd):
        return None
    tag = rec(nd).softmax_tag
    if tag not in ("r", "c"):
        return None
    nodes = [nd]
    if _name(nd.target) == "scaled_dot_product_attention":
        q = nd.args[0]
        qk = nd
        bias = nd.args[3] if len(nd.args) > 3 else nd.kwargs.get("attn_mask")
        bias_pair = isinstance(bias, torch.fx.Node) and _pair_derived(bias)
        av = None
    else:
        anc = _ancestors_until(nd.args[0], _is_contraction)
        qks = [a for a in anc if _is_contraction(a)]
        if not qks:
            return None
        qk = qks[0]
        nodes.append(qk)
        ops = rec(qk).operands or []
        q = ops[0] if ops else None
        bias_nodes = [a for a in anc if a is not qk and a.op in ("call_function", "placeholder")
                      and a not in _ancestors_until(qk, lambda x: True, limit=0)
                      and _pair_derived(a) and not _is_contraction(a)]
        bias_pair = bool(bias_nodes)
        av = _descendant_contraction(nd, tag)
        # everything between q.k / bias and the softmax is part of the attention
        nodes.extend(a for a in anc if a.op == "call_function" and a is not qk)
        if av is not None:
            nodes.extend(_between(nd, av))
            nodes.append(av)
    q_pair = q is not None and _pair_derived(q)
    if q_pair:
        kind = "triangle_attn_start" if tag == "c" else "triangle_attn_end"
        detail = f"softmax over the {'column' if tag == 'c' else 'row'}-token axis of pair-derived q.k"
    elif bias_pair:
        kind = "pair_bias_attn"
        detail = "softmax over tokens of token q.k plus a pair-derived bias"
    else:
        kind = "token_attn"
        detail = "softmax over tokens of token q.k (no pair bias)"
    return {"kind": kind, "nodes": nodes, "detail": detail}


def _rule_outer_product(view, nd):
    if not _is_contraction(nd):
        return None
    ct = rec(nd).contracted or {}
    if not any("s" in v for v in ct.values()):
        return None
    return {"kind": "outer_product_mean", "nodes": [nd], "detail": "contraction over the MSA sequence axis"}


def register_default_patterns() -> None:
    from ..registry import register_pattern

    register_pattern("structural:attention", _rule_attention, kind="attention", priority=10)
    register_pattern("structural:triangle_mult", _rule_triangle_mult, kind="triangle_mult", priority=5)
    register_pattern("structural:outer_product_mean", _rule_outer_product, kind="outer_product_mean", priority=5)


# ----------------------------------------------------------------------------- the pass
def match(capture: Capture, analysis=None) -> MatchResult:
    """Annotate matches on every captured graph; return them with the uncovered nodes."""
    from ..registry import pattern_rules

    res = MatchResult()
    view = GraphView(capture)
    res.view = view
    patterns = pattern_rules()
    for prefix, gm, _blk in capture.graphs():
        covered = set()
        for nd in gm.graph.nodes:
            put(nd, match=None)
        for nd in gm.graph.nodes:
            if nd.op != "call_function":
                continue
            if nd.target is OPAQUE_OP:
                entry = rec(nd).opaque
                if entry is None or entry.kind != "module":
                    continue
                m = Match(
                    kind=entry.rule.kind if entry.rule else "module",
                    rule=f"registry:{entry.cls_name}",
                    path=entry.path,
                    graph=prefix,
                    nodes=[nd.name],
                    in_layouts=[layout_name(t) for t in rec(nd).in_layouts or []],
                    out_layouts=[layout_name(t) for t in rec(nd).out_layouts or []],
                    module_cls=entry.cls_name,
                    detail=f"op {getattr(entry.rule.op_factory, '__qualname__', None) if entry.rule else None}",
                )
                put(nd, match=m)
                res.matches.append(m)
                covered.add(nd)
                continue
            if nd in covered:
                continue
            for rule in patterns:
                r = rule.matcher(view, nd)
                if not r:
                    continue
                nodes = r["nodes"]
                paths = [module_path_of(x, prefix) for x in nodes]
                path, cls = _common_module(paths)
                m = Match(
                    kind=r["kind"],
                    rule=rule.name,
                    path=path,
                    graph=prefix,
                    nodes=[x.name for x in nodes],
                    in_layouts=[layout_name(rec(a).layout) for a in nodes[0].all_input_nodes
                                if isinstance(a.meta.get("val"), torch.Tensor)],
                    out_layouts=[layout_name(rec(nodes[-1]).layout)],
                    module_cls=cls,
                    detail=r.get("detail", ""),
                )
                for x in nodes:
                    put(x, match=m)
                    covered.add(x)
                res.matches.append(m)
                break
        for nd in gm.graph.nodes:
            reason = rec(nd).needs_full
            if reason and nd not in covered:
                path, cls = module_path_of(nd, prefix)
                res.uncovered.append((prefix, nd, path, reason))
    view.annotate(res.matches)
    return res


def _common_module(paths):
    if not paths:
        return "", ""
    parts = [p.split(".") if p else [] for p, _ in paths]
    common = []
    for items in zip(*parts):
        if all(x == items[0] for x in items):
            common.append(items[0])
        else:
            break
    path = ".".join(common)
    cls = next((c for p, c in paths if p == path), paths[0][1])
    return path, cls


# public names of the graph predicates the structural rewrite shares
ancestors_until = _ancestors_until
is_contraction = _is_contraction
n_token_tags = _n_token_tags
rule_triangle_mult = _rule_triangle_mult
