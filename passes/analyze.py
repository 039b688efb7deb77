"""Pass 2 -- analyze: shapes, tensor kinds and layouts on every node.

Requires: a captured graph (:mod:`autocp.passes.trace`): ``node.meta["val"]`` (FakeTensor
from export), opaque nodes annotated with ``rec(node).opaque``; the layouts of
the user inputs and the global token length N.

A layout is a tuple of per-dim *tags*, one per tensor dim:

* ``"r"`` / ``"c"`` -- a token axis split in blocks over the mesh rows / columns (rank
  ``(r, c)`` holds block ``T_r`` / ``T_c``): Pair2D ``z[B,N,N,C]`` is ``(None,"r","c",None)``,
  RowToken ``s[B,N,C]`` is ``(None,"r",None)``, ColToken ``(None,"c",None)``;
* ``"s"`` -- the MSA sequence axis, blocks over mesh rows (MsaTiles ``(None,"s","c",None)``);
* ``"?"`` -- a dim of length N that comes from a *shape constant* (``rand([1,N,1,1])``,
  ``expand``, ``new_ones``): the model's python recomputes it from local shapes, so on
  tiles it is the block size (recorded in ``rec(node).shape_rewrite``);
* ``None`` -- not sharded (channels, heads, batch, ...).

Guarantees on every node:

* ``rec(node).layout`` -- the tag tuple (or a list of them for multi-output nodes);
* ``rec(node).kind`` -- ``"pair"`` (two token axes), ``"token"`` (one), ``"msa"``,
  ``"other"``;
* ``rec(node).needs_full`` -- ``None`` or why this op would need the full tensor
  (contraction / softmax / normalisation / slicing over a token axis, unknown op);
  only *live* nodes (that reach an output) are flagged;
* ``rec(node).comm`` -- a cheap layout conversion the op needs instead (e.g.
  ``"all_reduce(row)"`` for a sum over the column-token axis);
* ``rec(node).contracted`` -- for contractions: the tags of the contracted dims
  (what the structural matcher keys on).

Block graphs (repeated layers captured once) are analysed once per input layout and
their result reused for every instance.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch

from .tags import TOKEN_TAGS, canonical_out_tags, kind_of, layout_name, op_name
from .trace import OPAQUE_OP, Capture
from .record import put, rec

__all__ = ["Analysis", "analyze", "analyze_graph", "layout_name", "infer_input_layouts", "TOKEN_TAGS",
           "ANALYSIS_RULES", "analysis_rule", "RuleInput", "SOFTMAX"]

Tags = tuple


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


@dataclass
class Analysis:
    n_tokens: int
    input_tags: list
    needs_full: list = field(default_factory=list)  # [(graph prefix, node)]
    shape_rewrites: list = field(default_factory=list)
    comm: list = field(default_factory=list)
    block_in_tags: dict = field(default_factory=dict)  # group -> in tags
    output_tags: list = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers
def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _tags(n):
    if isinstance(n, torch.fx.Node):
        return rec(n).layout
    return None


def _shape(n):
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _merge(a, b):
    """Merge two tags of one dim; returns (tag, conflict)."""
    if a == b or b is None:
        return a, False
    if a is None:
        return b, False
    if a == "?":
        return b, False
    if b == "?":
        return a, False
    return a, True


def _broadcast(node, ins, out_shape, n):
    nd = len(out_shape)
    res = [None] * nd
    conflict = False
    for t_in, sh in ins:
        if t_in is None:
            continue
        off = nd - len(t_in)
        for i, t in enumerate(t_in):
            if off + i < 0:
                continue
            if sh is not None and sh[i] == 1 and out_shape[off + i] != 1:
                continue  # broadcast from 1: that input does not fix the dim
            res[off + i], c = _merge(res[off + i], t)
            conflict |= c
    for i, s in enumerate(out_shape):
        if res[i] is None and s == n and n > 1:
            res[i] = "?"
    return tuple(res), conflict


def _dims_arg(node, idx, ndim):
    d = node.args[idx] if len(node.args) > idx else node.kwargs.get("dim")
    if d is None:
        return list(range(ndim))
    if isinstance(d, int):
        d = [d]
    return [x % ndim for x in d]


def _view_tags(in_tags, in_shape, out_shape, n):
    """Map tags through a reshape by grouping dims whose products match."""
    out = [None] * len(out_shape)
    i = j = 0
    bad = None
    while i < len(in_shape) and j < len(out_shape):
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= len(in_shape):
                    break
                gi.append(i)
                pi *= in_shape[i]
            else:
                j += 1
                if j >= len(out_shape):
                    break
                gj.append(j)
                pj *= out_shape[j]
        tagged = [(k, in_tags[k]) for k in gi if in_tags[k] is not None]
        if tagged:
            if len(gi) == 1 and len(gj) == 1:
                out[gj[0]] = tagged[0][1]
            else:
                # a token axis merged/split with others: keep the tag on the output dim
                # that starts with it when the other dims are 1, else it is mixed
                big_in = [k for k in gi if in_shape[k] != 1]
                big_out = [k for k in gj if out_shape[k] != 1]
                if len(big_in) == 1 and len(big_out) == 1:
                    out[big_out[0]] = in_tags[big_in[0]]
                else:
                    first = gi[0]
                    if in_tags[first] is not None and len(tagged) == 1:
                        out[gj[0]] = in_tags[first]  # token axis is the outer factor
                    else:
                        bad = f"reshape {tuple(in_shape)} -> {tuple(out_shape)} mixes token axes {tagged}"
                        out[gj[0]] = tagged[0][1]
        i += 1
        j += 1
    for k, s in enumerate(out_shape):
        if out[k] is None and s == n and n > 1:
            out[k] = "?"
    return tuple(out), bad


_name = op_name  # local spelling


POINTWISE_SKIP_NAMES = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_constrain_range_for_size"}
FACTORIES = {"rand", "randn", "zeros", "ones", "full", "empty", "arange", "new_ones", "new_zeros", "new_full",
             "new_empty", "rand_like", "randn_like", "zeros_like", "ones_like", "empty_like", "full_like",
             "scalar_tensor", "bernoulli", "eye"}
REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "logsumexp", "prod", "norm", "any", "all",
              "argmax", "argmin"}
SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
CONTRACTIONS = {"einsum", "matmul", "bmm", "mm", "baddbmm", "addmm"}
NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm"}
SLICES = {"slice", "select", "narrow", "index", "index_select", "gather", "take_along_dim", "roll", "flip"}
CHANNEL_LOCAL = {"linear", "dropout", "native_dropout"}


def _einsum_contracted(eq, tags_list):
    lhs, rhs = eq.replace(" ", "").split("->")
    ins = lhs.split(",")
    letter_tags: dict = {}
    for spec, tags in zip(ins, tags_list):
        if tags is None or "." in spec:
            continue
        for ch, t in zip(spec, tags):
            if t is not None:
                letter_tags.setdefault(ch, set()).add(t)
    contracted = [ch for ch in set("".join(ins)) if ch not in rhs]
    out_tags = []
    for ch in rhs:
        ts = letter_tags.get(ch, set())
        out_tags.append(sorted(ts, key=str)[0] if ts else None)
    ctags = {ch: letter_tags.get(ch) for ch in contracted if letter_tags.get(ch)}
    return tuple(out_tags), ctags


# ----------------------------------------------------------------------------- the pass
def analyze_graph(gm, in_tags: list, n: int, analysis: Analysis, prefix: str = "", capture: Optional[Capture] = None):
    """Propagate layouts through one graph; ``in_tags`` for its user-input placeholders in
    order (parameters/buffers get ``None`` tags). Returns the output tags."""
    graph = gm.graph
    # user tensor inputs are the last tensor placeholders (export lifts params/buffers first;
    # a non-tensor user input -- use_kernels=False, chunk_size=None -- is a placeholder too,
    # holding its python value, and takes no tags)
    user_phs = [nd for nd in graph.nodes if nd.op == "placeholder" and isinstance(nd.meta.get("val"), torch.Tensor)]
    k = len(in_tags)
    user_set = {}
    if k:
        for ph, t in zip(user_phs[-k:], in_tags):
            user_set[ph] = t
    live = _live_nodes(graph)
    outputs = None
    for node in graph.nodes:
        put(node, needs_full=None)
        put(node, comm=None)
        reason = None
        v = node.meta.get("val")
        if node.op == "placeholder":
            t = user_set.get(node)
            if t is None and isinstance(v, torch.Tensor):
                t = tuple([None] * v.dim())
            put(node, layout=t)
        elif node.op == "get_attr":
            put(node, layout=None)
        elif node.op == "output":
            outs = node.args[0]
            outputs = [(_tags(o) if isinstance(o, torch.fx.Node) else None) for o in (outs if isinstance(outs, (tuple, list)) else [outs])]
            continue
        elif node.op == "call_function":
            tags, reason = _rule(node, n, analysis, prefix, capture)
            override = rec(node).layout_override
            if override is not None:
                tags = override  # the output layout of a matched distributed op
            put(node, layout=tags)
        else:
            put(node, layout=None)
        tags = rec(node).layout
        put(node, kind=kind_of(tags) if isinstance(tags, tuple) else (
            max((kind_of(t) for t in tags if isinstance(t, tuple)), key=["other", "token", "msa", "pair"].index, default="other")
            if isinstance(tags, list) else "other"))
        if reason and node in live:
            put(node, needs_full=reason)
            analysis.needs_full.append((prefix, node))
        if rec(node).comm:
            analysis.comm.append((prefix, node))
        if rec(node).shape_rewrite:
            analysis.shape_rewrites.append((prefix, node))
    return outputs


def _live_nodes(graph):
    live = set()
    work = [nd for nd in graph.nodes if nd.op == "output"]
    while work:
        nd = work.pop()
        if nd in live:
            continue
        live.add(nd)
        work.extend(nd.all_input_nodes)
    return live


# ----------------------------------------------------------------------------- the rule table
@dataclass
class RuleInput:
    """What a layout rule sees of one ``call_function`` node: the node, the global token
    length ``n``, the op name, the output value/shape, the first argument ``x`` with its
    tags ``xt`` and shape ``xs``, and every tensor argument."""

    node: torch.fx.Node
    n: int
    name: str
    v: object
    out_shape: Optional[tuple]
    x: object
    xt: Optional[tuple]
    xs: Optional[tuple]
    tensor_args: list

    @property
    def args(self):
        return self.node.args


#: op name -> rule(RuleInput) -> (output tags, needs_full reason or None). One entry per
#: op family (like DTensor's op strategies); an op with no entry is treated as pointwise /
#: broadcasting when its output is the broadcast of its inputs, else "unsupported".
ANALYSIS_RULES: dict = {}


def analysis_rule(*names):
    """Register ``fn(RuleInput) -> (tags, reason)`` as the layout rule of the named ops."""
    def deco(fn):
        for nm in names:
            ANALYSIS_RULES[nm] = fn
        return fn
    return deco


def _rule(node, n, analysis, prefix, capture):
    """(tags, needs_full reason) of one call_function node: a few structural cases, then
    the op's entry in :data:`ANALYSIS_RULES` (default: pointwise/broadcasting)."""
    tgt = node.target
    name = _name(tgt)
    v = node.meta.get("val")
    args = node.args
    if tgt is operator.getitem:
        st = _tags(args[0])
        if isinstance(st, list):
            return st[args[1]] if args[1] < len(st) else None, None
        return st, None
    if tgt is OPAQUE_OP:
        return _opaque_rule(node, n, analysis, prefix, capture)
    if name in POINTWISE_SKIP_NAMES or not (isinstance(v, torch.Tensor) or isinstance(v, (tuple, list))):
        return None, None
    tensor_args = []
    torch.fx.node.map_arg((args, node.kwargs), lambda x: tensor_args.append(x) if isinstance(_val(x), torch.Tensor) else None)
    any_tagged = any(isinstance(_tags(a), tuple) and any(t is not None for t in _tags(a)) for a in tensor_args)
    out_shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
    x = args[0] if args else None
    ri = RuleInput(node, n, name, v, out_shape, x, _tags(x) if isinstance(x, torch.fx.Node) else None,
                   _shape(x) if isinstance(x, torch.fx.Node) else None, tensor_args)
    if name in FACTORIES:
        return _factory(ri)
    if not any_tagged:
        if out_shape is None:
            return [tuple(None for _ in t.shape) if isinstance(t, torch.Tensor) else None for t in v], None
        return _unknown_len(out_shape, n), None
    return ANALYSIS_RULES.get(name, _pointwise)(ri)


def _unknown_len(shape, n):
    return tuple("?" if (s == n and n > 1) else None for s in shape)


def _factory(ri):
    if ri.out_shape is None:
        return None, None
    tags = _unknown_len(ri.out_shape, ri.n)
    if "?" in tags:
        put(ri.node, shape_rewrite=f"{ri.name} with token length {ri.n} in its shape -> block size on tiles")
    if ri.name.endswith("_like") and ri.tensor_args:
        return _tags(ri.tensor_args[0]), None
    return tags, None


@analysis_rule("permute")
def _permute(ri):
    return tuple(ri.xt[d % len(ri.xt)] for d in ri.args[1]), None


@analysis_rule("transpose", "swapaxes", "swapdims")
def _transpose(ri):
    d0, d1 = ri.args[1] % len(ri.xt), ri.args[2] % len(ri.xt)
    t = list(ri.xt)
    t[d0], t[d1] = t[d1], t[d0]
    return tuple(t), None


@analysis_rule("t")
def _t(ri):
    return tuple(reversed(ri.xt)), None


@analysis_rule("unsqueeze")
def _unsqueeze(ri):
    t = list(ri.xt)
    t.insert(ri.args[1] % (len(ri.xt) + 1), None)
    return tuple(t), None


@analysis_rule("squeeze")
def _squeeze(ri):
    xt, xs = ri.xt, ri.xs
    if len(ri.args) > 1:
        dims = [ri.args[1]] if isinstance(ri.args[1], int) else list(ri.args[1])
        dims = [d % len(xt) for d in dims if xs[d % len(xt)] == 1]
    else:
        dims = [i for i, s in enumerate(xs) if s == 1]
    return tuple(t for i, t in enumerate(xt) if i not in dims), None


@analysis_rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as", "contiguous",
               "clone", "alias", "detach", "lift_fresh_copy")
def _view(ri):
    if ri.out_shape == ri.xs:
        return ri.xt, None
    return _view_tags(ri.xt, ri.xs, ri.out_shape, ri.n)


@analysis_rule("expand", "expand_as", "broadcast_to", "repeat", "repeat_interleave")
def _expand(ri):
    xt, n, out_shape = ri.xt, ri.n, ri.out_shape
    t = [None] * (len(out_shape) - len(xt)) + list(xt)
    for i, s in enumerate(out_shape):
        if t[i] is None and s == n and n > 1:
            t[i] = "?"
            put(ri.node, shape_rewrite=f"{ri.name} to token length {n} -> block size on tiles")
    if ri.name == "repeat_interleave" and len(ri.args) > 2 and ri.args[2] is not None:
        d = ri.args[2] % len(xt)
        if xt[d] is not None:
            return tuple(t), f"repeat_interleave over token axis {xt[d]!r}"
    return tuple(t), None


@analysis_rule(*CHANNEL_LOCAL)
def _same(ri):
    return ri.xt, None


@analysis_rule("glu")
def _glu(ri):  # halves one dim: tile-local along a channel dim
    d = (ri.args[1] if len(ri.args) > 1 else ri.node.kwargs.get("dim", -1)) % len(ri.xt)
    return ri.xt, (f"glu along token axis {ri.xt[d]!r}" if ri.xt[d] not in (None, "?") else None)


@analysis_rule(*NORMS)
def _norm(ri):
    xt = ri.xt
    shape_arg = ri.args[1] if len(ri.args) > 1 else ri.node.kwargs.get("normalized_shape")
    k = len(shape_arg) if isinstance(shape_arg, (list, tuple)) else 1
    bad = [t for t in xt[-k:] if t is not None]
    reason = f"{ri.name} normalises over token axis {bad}" if bad else None
    if ri.name == "native_layer_norm":
        stat = tuple(list(xt[:-k]) + [None] * k)
        return [xt, stat, stat], reason
    return xt, reason


@analysis_rule(*SOFTMAX)
def _softmax(ri):
    xt = ri.xt
    d = ri.args[1] % len(xt)
    if xt[d] in ("r", "c", "s"):
        put(ri.node, softmax_tag=xt[d])
        return xt, f"{ri.name} over token axis {xt[d]!r} (attention over a sharded axis)"
    return xt, None


_ALL_REDUCE_OK = ("sum", "mean", "amax", "amin", "max", "min", "any", "all", "logsumexp", "prod")


@analysis_rule(*REDUCTIONS)
def _reduction(ri):
    xt, args, kw = ri.xt, ri.args, ri.node.kwargs
    dims = _dims_arg(ri.node, 1, len(xt))
    keep = bool(args[2]) if len(args) > 2 and isinstance(args[2], bool) else bool(kw.get("keepdim", False))
    red = [xt[d] for d in dims if xt[d] not in (None, "?")]
    tags = tuple(None if i in dims else t for i, t in enumerate(xt)) if keep else \
        tuple(t for i, t in enumerate(xt) if i not in dims)
    multi = isinstance(ri.v, (tuple, list))
    if red and ri.name not in _ALL_REDUCE_OK:
        return tags, f"{ri.name} over token axis {red}"
    if red:
        groups = ",".join("row" if t == "c" else "col" for t in red)
        put(ri.node, comm=f"all_reduce({groups}) of a {ri.name} over token axis {red}")
    return ([tags, tags] if multi else tags), None


@analysis_rule(*CONTRACTIONS)
def _contraction(ri):
    return _contraction_rule(ri.node, ri.name, ri.n)


@analysis_rule("scaled_dot_product_attention")
def _sdpa(ri):
    q, k = ri.args[0], ri.args[1]
    kt = _tags(k)
    put(ri.node, contracted={"key": kt[-2]} if kt and kt[-2] else {})
    if kt and kt[-2] not in (None, "?"):
        put(ri.node, softmax_tag=kt[-2])
        return _tags(q), f"attention over token axis {kt[-2]!r}"
    return _tags(q), None


@analysis_rule("chunk", "split", "split_with_sizes", "unbind", "unsafe_split", "unsafe_chunk")
def _split(ri):
    xt, args, kw = ri.xt, ri.args, ri.node.kwargs
    if ri.name == "unbind":
        d = (args[1] if len(args) > 1 else 0) % len(xt)
        out = tuple(t for i, t in enumerate(xt) if i != d)
    else:
        d = (args[2] if len(args) > 2 else kw.get("dim", 0)) % len(xt)
        out = xt
    nout = len(ri.v) if isinstance(ri.v, (tuple, list)) else 1
    reason = f"{ri.name} along token axis {xt[d]!r}" if xt[d] not in (None, "?") else None
    return [out] * nout, reason


@analysis_rule("index")
def _index(ri):
    dims = [i for i, ix in enumerate(ri.args[1]) if ix is not None]
    bad = [ri.xt[i] for i in dims if i < len(ri.xt) and ri.xt[i] not in (None, "?")]
    return (tuple([None] * len(ri.out_shape)) if ri.out_shape else None), (
        f"advanced indexing on token axis {bad}" if bad else None)


@analysis_rule("flip", "roll")
def _flip_roll(ri):  # dims lists (roll: shifts first)
    xt, args = ri.xt, ri.args
    dl = (args[2] if len(args) > 2 else ri.node.kwargs.get("dims")) if ri.name == "roll" else \
        (args[1] if len(args) > 1 else 0)
    dl = [dl] if isinstance(dl, int) else list(dl or range(len(xt)))
    bad = [xt[i % len(xt)] for i in dl if xt[i % len(xt)] not in (None, "?")]
    return xt, (f"{ri.name} along token axis {bad} (needs specific token positions)" if bad else None)


@analysis_rule(*(SLICES - {"index", "flip", "roll"}))
def _slice(ri):
    xt, args = ri.xt, ri.args
    d = (args[1] if len(args) > 1 else 0) % len(xt)
    if ri.name == "slice":
        start = args[2] if len(args) > 2 else 0
        end = args[3] if len(args) > 3 else None
        if (start in (0, None)) and (end is None or (isinstance(end, int) and end >= ri.xs[d])):
            return xt, None
    out = tuple(t for i, t in enumerate(xt) if i != d) if ri.name == "select" else xt
    if xt[d] not in (None, "?"):
        return out, f"{ri.name} on token axis {xt[d]!r} (needs specific token positions)"
    return out, None


@analysis_rule("cat", "concat", "stack")
def _cat(ri):
    args = ri.args
    d = args[1] if len(args) > 1 else ri.node.kwargs.get("dim", 0)
    tl = [_tags(a) for a in args[0]]
    base = next((t for t in tl if t), None)
    if ri.name == "stack":
        t = list(base)
        t.insert(d % (len(base) + 1), None)
        return tuple(t), None
    d = d % len(base)
    merged = list(base)
    for t in tl:
        if t:
            for i, tg in enumerate(t):
                merged[i], _ = _merge(merged[i], tg)
    if merged[d] not in (None, "?"):
        return tuple(merged), f"cat along token axis {merged[d]!r}"
    return tuple(merged), None


def _pointwise(ri):
    """The default: pointwise / broadcasting when the output is the broadcast of the inputs."""
    out_shape = ri.out_shape
    if out_shape is not None:
        ins = [(_tags(a), _shape(a)) for a in ri.tensor_args if isinstance(_tags(a), tuple)]
        try:
            bshape = torch.broadcast_shapes(*[s for _, s in ins if s is not None])
        except Exception:  # noqa: BLE001
            bshape = None
        if bshape is not None and tuple(bshape) == out_shape:
            tags, conflict = _broadcast(ri.node, ins, out_shape, ri.n)
            if conflict:
                return tags, (f"{ri.name} combines tensors whose token axes are split differently "
                              f"(needs a transpose exchange)")
            return tags, None
    return (tuple([None] * len(out_shape)) if out_shape else None), f"unsupported op {ri.name} on a sharded tensor"


def _contraction_rule(node, name, n):
    args = node.args
    if name == "einsum":
        eq = args[0]
        ops = list(args[1])
        tl = [_tags(o) for o in ops]
        out, ctags = _einsum_contracted(eq, tl)
        put(node, contracted={k: sorted(v) for k, v in ctags.items()})
        put(node, operands=ops)
        bad = sorted({t for v in ctags.values() for t in v if t != "?"})
        out = _fix_unknown(out, node, n)
        return out, (f"einsum contracts token axis {bad}" if bad else None)
    if name in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
    else:
        a, b = args[0], args[1]
    at, bt = _tags(a), _tags(b)
    if at is None or bt is None:
        return None, None
    if len(at) == 1 or len(bt) == 1:
        return tuple([None] * len(node.meta["val"].shape)), None
    ka, kb = at[-1], bt[-2]
    batch_a, batch_b = at[:-2], bt[:-2]
    nb = max(len(batch_a), len(batch_b))
    batch = []
    for i in range(nb):
        ta = batch_a[i - (nb - len(batch_a))] if i >= nb - len(batch_a) else None
        tb = batch_b[i - (nb - len(batch_b))] if i >= nb - len(batch_b) else None
        batch.append(_merge(ta, tb)[0])
    out = tuple(batch) + (at[-2], bt[-1])
    ctag = sorted({t for t in (ka, kb) if t is not None})
    put(node, contracted={"k": ctag} if ctag else {})
    put(node, operands=[a, b])
    bad = [t for t in ctag if t != "?"]
    out = _fix_unknown(out, node, n)
    return out, (f"{name} contracts token axis {bad}" if bad else None)


def _fix_unknown(out, node, n):
    shape = tuple(node.meta["val"].shape)
    return tuple(("?" if (t is None and s == n and n > 1) else t) for t, s in zip(out, shape))


def _opaque_rule(node, n, analysis, prefix, capture):
    entry = rec(node).opaque
    in_tags = [_tags(a) for a in node.args[1]]
    put(node, in_layouts=in_tags)
    if entry is None:
        return None, None
    if entry.kind == "module":
        rule = entry.rule
        if rule is not None and rule.out_layouts is not None:
            out = rule.out_layouts(in_tags)
        else:
            out = [in_tags[0]] if in_tags else [None]
        put(node, out_layouts=out)
        return list(out), None
    if entry.kind == "fallback":
        out = entry.out_tags or canonical_out_tags(entry.out_meta or [], n)
        put(node, out_layouts=out)
        return list(out), None
    # a block instance: analyse its graph once per input layout
    blk = capture.blocks[entry.group] if capture is not None else None
    if blk is None:
        return None, f"block {entry.path} was not captured"
    key = (entry.group, tuple(in_tags))
    cached = analysis.block_in_tags.get(key)
    if cached is None:
        cached = analyze_graph(blk.gm, in_tags, n, analysis, prefix=blk.rep, capture=capture)
        analysis.block_in_tags[key] = cached
    put(node, out_layouts=cached)
    return list(cached), None


def analyze(capture: Capture, input_tags: list, n_tokens: int) -> Analysis:
    """Run the analysis over the top graph (and, through it, each block graph once)."""
    an = Analysis(n_tokens=n_tokens, input_tags=input_tags)
    an.output_tags = analyze_graph(capture.top, input_tags, n_tokens, an, capture=capture)
    return an
