"""Pass 5a -- shard: turn a captured ATen graph into the *tile program* one rank runs.

Requires: a captured graph (:mod:`autocp.passes.trace`) with ``node.meta["val"]`` (global
FakeTensors), the tags of its user inputs, the global sizes (N, MSA depth), the mesh side
p, and a resolver for its opaque nodes (registered modules -- their 2D ops or gathered --
and repeated blocks).

Guarantees (the soundness rule): every node of the emitted graph is one of

(a) the original op on local tiles, proven tile-local by its rule in :data:`RULES`
    (pointwise with broadcasting, views, channel reductions, contractions over channels,
    layer norms over channels, ...), with shape constants on token axes rewritten to the
    local block size;
(b) a redistribution the pass inserted (:mod:`autocp.passes.tile_ops`: slice a whole dim
    to this rank's block, all-gather a block dim, r<->c transpose exchange) or a
    distributed form of the op (sum / mean / amax / softmax / logsumexp / contraction /
    attention over a block-sharded token axis: local partial + all-reduce; narrow/select
    of a sharded axis: owner contribution + all-reduce; random draws at the global shape,
    sliced);
(c) a call of a matched module's distributed op (opaque node), its inputs converted to the
    layouts it requires;
(d) an op without a rule, run on *gathered* inputs (every tagged dim made whole first), so
    its result is exact and replicated. That costs memory: it is recorded in
    :attr:`TileProgram.notes`, warned about, and refused under ``strict=True`` when it
    gathers a tensor with two sharded axes (a pair tensor).

Nothing else runs; in-place writes into a value that is not a true local alias of what
the single-device program writes into are refused (:class:`ShardingError`).

Tags: one per dim -- ``None`` (whole dim, same on every rank), ``"r"`` / ``"c"`` (block
``T_r`` / ``T_c`` of the N token axis), ``"s"`` (block ``S_r`` of the MSA depth), or
``(tag, outer, inner)`` for a dim that merges ``outer`` x a tagged axis x ``inner``.
A tensor never carries two tags of the same mesh axis ('r' and 's' share the rows).
Token axes are never guessed from sizes: tags flow from the inputs through the rules, and
a whole (``None``) dim is always the complete global data, so slicing it to a block is
exact whatever it means.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..layout import block_size
from ..tile_io import FLAT_TAGS
from . import tile_ops as T
from .attention import (AttentionMismatch, attention_nodes, einsum_letters, fill_nodes, match_attention, match_sdpa,
                        pack_kv, tile_attention)
from .record import put, rec
from .tags import tag_entry

__all__ = ["canonical_tags", "standard_tags", "ShardingError", "module_path_of", "TileProgram", "Note", "shard_graph", "RULES", "covered_ops", "invoke_opaque",
           "source_line", "tag_str"]

aten = torch.ops.aten


class ShardingError(RuntimeError):
    """The rules refuse an op (an in-place write they cannot prove, strict and a pair
    gather). ``module_path``: ``(path, class)`` of the module the op belongs to (block graphs:
    under ``"block"``; :attr:`block_paths` then names the block's instances)."""

    module_path = ("", "")
    block_paths: list = []


@dataclass
class Note:
    node: str
    op: str
    what: str  # "gather" | "refused" | "exchange" | ...
    detail: str
    nbytes: int = 0
    source: str = ""
    pair: bool = False


@dataclass
class TileProgram:
    """One emitted graph: ``gm(*consts, ops, *user_inputs) -> list`` of local outputs."""

    gm: fx.GraphModule
    const_targets: list  # (kind, target) of the captured graph's params/buffers/constants
    op_keys: list  # opaque entries (OpaqueEntry) in the order of the ``ops`` argument
    out_tags: list
    notes: list = field(default_factory=list)
    n_nodes: int = 0
    src_map: dict = field(default_factory=dict)  # source node name -> emitted node name (autocp.check)
    specs: list = field(default_factory=list)  # the attention specs its nodes refer to by key (kept alive here)


def covered_ops() -> list:
    """Names of the ATen ops with an explicit rule (pointwise ops are covered by tag)."""
    return sorted(str(k) for k in RULES)


# ----------------------------------------------------------------------------- helpers
def _axis(t) -> int:
    return 0 if T.base_tag(t) in ("r", "s") else 1


def tag_str(tags) -> str:
    """``[.,r,c,.]``: one entry per dim (``.`` whole, ``outer*tag*inner`` merged)."""
    return "[" + ",".join(tag_entry(t) for t in tags) + "]"


def module_path_of(node) -> tuple:
    """``(innermost module path, class name)`` of a captured node (``nn_module_stack``; the
    block-capture wrapper skipped: a repeated block's graph gives paths under ``"block"``)."""
    path, cls = "", ""
    for _k, (p, t) in (node.meta.get("nn_module_stack") or {}).items():
        tname = t if isinstance(t, str) else getattr(t, "__qualname__", str(t))
        if tname.endswith("BoundCall"):
            continue
        path, cls = p, tname
    return path, cls.rsplit(".", 1)[-1]


def source_line(node) -> str:
    """The user's source line of a captured node (``File ..., line ...: code``) or ''."""
    return _src_line(node)


def _src_line(node) -> str:
    st = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in st.strip().splitlines() if ln.strip()]
    # the last "File ..., line ..." + code line pair is the user's line
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{lines[i]}: {code}"
    return ""


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_tensor_node(a) -> bool:
    return isinstance(a, fx.Node) and isinstance(_val(a), torch.Tensor)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


RULES: dict = {}


def canonical_tags(tags):
    """A valid tag tuple: unknown tags ('?') made whole, a second tag of the same mesh axis
    made its swap (``(r, r)`` -> ``(r, c)``, the Pair2D a pair mask built from a RowToken
    mask has) or whole."""
    if tags is None or not isinstance(tags, tuple):
        return tags
    used, out = set(), []
    for t in tags:
        if t is not None and T.base_tag(t) in T.PAIR_MERGED:  # both mesh axes
            if used:
                out.append(None)
            else:
                used.update((0, 1))
                out.append(t)
            continue
        if t is None or T.base_tag(t) not in ("r", "c", "s"):
            out.append(None)
            continue
        if _axis(t) in used:
            sw = T._swap(t)
            if T.base_tag(sw) != T.base_tag(t) and _axis(sw) not in used:
                t = sw
            else:
                out.append(None)
                continue
        used.add(_axis(t))
        out.append(t)
    return tuple(out)


def standard_tags(tags) -> tuple:
    """The layout a claimed (registered) 2D op is built for: the first token dim of a tensor
    on the mesh rows (``"r"``), the second on the columns (``"c"``), MSA rows ``"s"`` kept --
    Pair2D ``[B, N, N, C]``, RowToken ``[B, N, C]``, MsaTiles ``[B, S, N, C]``. Both runtimes
    hand a claimed op its arguments in this layout (the graph path by the converting
    redistribution of :func:`autocp.passes.rewrite.opaque_layouts`, the engine by
    ``RegisteredOp``): a transposed pair (``z.transpose(1, 2)``, tags ``(c, r)``) is
    exchanged to Pair2D first -- handed over as it was, the op read it as Pair2D (a silently
    wrong result)."""
    out, k = [], 0
    for t in tags:
        if t is None or t in FLAT_TAGS:
            out.append(t)
        elif T.base_tag(t) == "s":
            out.append("s")
        else:
            out.append(("r", "c")[min(k, 1)] if not any(x == "s" for x in tags) else "c")
            k += 1
    return tuple(out)


def rule(*ops):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


class _Sharder:
    def __init__(self, gm, in_tags, *, n, n_seq, p, resolver, strict, what):
        self.src = gm
        self.in_tags = list(in_tags)
        self.n, self.n_seq, self.p = n, n_seq, p
        self.resolver = resolver
        self.strict = strict
        self.what = what
        self.g = fx.Graph()
        self.env: dict = {}  # src node -> emitted node / python value
        self.tags: dict = {}  # src node -> tags (tuple) | list of tags | None
        self.alias_ok: dict = {}  # src node -> bool (emitted value aliases like the original)
        self.conv_cache: dict = {}
        self.notes: list = []
        self.op_keys: list = []
        self.specs: list = []
        self.ops_ph = None
        self.const_targets: list = []
        self.owner = torch.nn.Module()
        self.cur = None

    # ------------------------------------------------------------------ basics
    def local_len(self, t) -> int:
        if isinstance(t, tuple) and t[0] in T.PAIR_MERGED:
            tag, outer, inner = t
            return outer * block_size(self.n, self.p) ** 2 * inner
        if isinstance(t, tuple):
            tag, outer, inner = t
            return outer * block_size(T.global_len(tag, self.n, self.n_seq), self.p) * inner
        return block_size(T.global_len(t, self.n, self.n_seq), self.p)

    def gshape(self, a):
        v = _val(a)
        return tuple(int(s) for s in v.shape)

    def tg(self, a):
        if not isinstance(a, fx.Node):
            return None
        t = self.tags.get(a)
        if t is None and _is_tensor_node(a):
            return (None,) * _val(a).dim()
        return t

    def emit(self, fn, *args, **kwargs):
        node = self.g.call_function(fn, tuple(args), dict(kwargs))
        if self.cur is not None:
            node.meta["stack_trace"] = self.cur.meta.get("stack_trace")
            put(node, src=self.cur.name)
        return node

    def const(self, obj):
        """A python object the emitted code needs (call specs, sub-programs): a get_attr."""
        self.n_const = getattr(self, "n_const", 0) + 1
        name = f"_autocp_c{self.n_const}"
        setattr(self.owner, name, obj)
        return self.g.get_attr(name)

    def note(self, what, detail, nbytes=0, pair=False):
        n = self.cur
        self.notes.append(Note(n.name if n is not None else "?", str(n.target) if n is not None else "?", what,
                               detail, nbytes, _src_line(n) if n is not None else "", pair))

    def refuse(self, why, fix=""):
        n = self.cur
        src = _src_line(n) if n is not None else ""
        err = ShardingError(
            f"autocp: cannot run `{n.target}` (node {n.name}) of {self.what} on tiles: {why}."
            f"{' Source: ' + src + '.' if src else ''} "
            f"{fix or 'Fix: register the enclosing module with autocp.register_module(cls, op_factory), or rewrite the construct.'}"
        )
        err.module_path = module_path_of(n) if n is not None else ("", "")
        raise err

    def to_tags(self, a, dst):
        """The emitted value of src node ``a`` redistributed to ``dst`` tags."""
        if not isinstance(a, fx.Node):
            return a
        src = self.tg(a)
        dst = tuple(dst)
        if canonical_tags(dst) != dst:
            self.refuse(f"internal: requested layout {self.tag_str(dst)} for {a.name} is not a valid layout "
                        f"(two tags on one mesh axis)", "Fix: report this as an autocp bug.")
        v = self.env[a]
        if src is None or tuple(src) == dst:
            return v
        key = (a, dst)
        if key in self.conv_cache:
            return self.conv_cache[key]
        gathered = [d for d, (s, t) in enumerate(zip(src, dst)) if s is not None and s != t]
        swap = all(T._swap(s) == t for s, t in zip(src, dst)) and any(s is not None for s in src)
        if gathered and not swap:
            shape = self.gshape(a)
            # token axes held sharded, before and after (a merged pair dim "rc" counts two)
            sharded = sum(len(T.factor_tags(s)) for s in src if s is not None)
            kept = sum(len(T.factor_tags(s)) for s, t in zip(src, dst) if s is not None and s == t)
            local = list(self.local_shape(shape, src))
            for d in gathered:
                local[d] = shape[d]
            nbytes = _numel(local) * _val(a).element_size()
            pair = sharded >= 2
            order = "O(N^2): the whole tensor" if pair and kept == 0 else "O(N^2/p)"
            self.note("gather", f"{a.name} {self.tag_str(src)} -> {self.tag_str(dst)}: {nbytes / 2**20:.2f} MiB per "
                                f"rank, {order}", nbytes, pair)
            if pair and self.strict:
                self.refuse(f"it needs {a.name} (a tensor with two sharded axes, {self.tag_str(src)}) gathered "
                            f"along dim(s) {gathered} ({nbytes / 2**20:.2f} MiB per rank)",
                            "Fix: strict=False accepts the gather (exact, O(N^2/p) memory); or register the "
                            "enclosing module with a distributed op.")
        elif swap:
            nbytes = _numel(self.local_shape(self.gshape(a), src)) * _val(a).element_size()
            self.note("exchange", f"{a.name} {self.tag_str(src)} -> {self.tag_str(dst)}", nbytes)
        out = self.emit(T.convert, v, src, dst)
        self.conv_cache[key] = out
        return out

    def local_shape(self, shape, tags):
        return [self.local_len(t) if t is not None else s for s, t in zip(shape, tags)]

    tag_str = staticmethod(tag_str)  # the module-level helper (autocp.passes.check uses it too)

    def set(self, node, value, tags, alias=True):
        last = self.notes[-1] if self.notes else None
        if (last is not None and last.node == node.name and not last.nbytes and last.what in ("all-reduce", "narrow")
                and isinstance(tags, tuple) and _is_tensor_node(node)):
            # the bytes all-reduced: this rank's result tile (softmax / attention: its row statistics)
            shape = self.local_shape(self.gshape(node), tags)
            if last.detail.startswith(("softmax", "attention")):
                shape = list(shape[:-1]) + [2]  # running max and sum per row
            last.nbytes = _numel(shape) * _val(node).element_size()
        if isinstance(value, fx.Node) and value.graph is self.g:
            put(value, tags=tags)  # for the passes that run on the tile program (autocp.passes.storage)
        self.env[node] = value
        self.tags[node] = tags
        self.alias_ok[node] = alias

    def full(self, a):
        """``a`` with every dim whole."""
        t = self.tg(a)
        return self.to_tags(a, (None,) * len(t)) if t is not None else self.env.get(a, a)

    def map_args(self, args, fn):
        return fx.node.map_aggregate(args, lambda x: fn(x) if isinstance(x, fx.Node) else x)

    @staticmethod
    def fix_axes(tags):
        """At most one tag per mesh axis: a later duplicate becomes its swap, else whole."""
        return canonical_tags(tuple(tags))

    # ------------------------------------------------------------------ driver
    def run(self) -> TileProgram:
        phs = [n for n in self.src.graph.nodes if n.op == "placeholder"]
        n_user = len(self.in_tags)
        consts = phs[: len(phs) - n_user]
        users = phs[len(phs) - n_user:]
        const_nodes = []
        for ph in consts:
            new = self.g.placeholder(ph.name)
            const_nodes.append(new)
            self.set(ph, new, None)
            put(ph, param=True)  # parameters / buffers: never a key mask (match_attention)
        self._scan_attention()
        self.order = {nd: i for i, nd in enumerate(self.src.graph.nodes)}
        self.ops_ph = self.g.placeholder("autocp_ops")
        for ph, tg in zip(users, self.in_tags):
            new = self.g.placeholder(ph.name)
            v = _val(ph)
            if isinstance(v, torch.Tensor):
                tg = tuple(tg) if tg is not None else (None,) * v.dim()
            self.set(ph, new, tg, alias=True)
        for node in self.src.graph.nodes:
            if node.op == "placeholder":
                continue
            self.cur = node
            if node in self.deferred:  # part of an attention region: handled at its attn @ v node
                continue
            if node in self.attn_at:
                self.attention(node)
            elif node.op == "get_attr":
                obj = getattr(self.src, node.target)
                setattr(self.owner, node.target, obj)
                new = self.g.get_attr(node.target)
                self.set(node, new, None)
            elif node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                outs = node.args[0]
                flat, spec = tree_flatten(outs)
                self.g.output(tree_unflatten([self.env.get(o, o) if isinstance(o, fx.Node) else o for o in flat],
                                             spec))
                self.out_tags = [self.tg(o) if isinstance(o, fx.Node) else None for o in flat]
            else:
                self.refuse(f"node kind {node.op} is not supported")
        self.g.eliminate_dead_code()
        self.g.lint()
        gm = fx.GraphModule(self.owner, self.g)
        alive = {nd.name for nd in self.g.nodes}
        src_map = {k.name: v.name for k, v in self.env.items()
                   if isinstance(v, fx.Node) and v.graph is self.g and v.name in alive}
        return TileProgram(gm, [], self.op_keys, self.out_tags, self.notes, len(self.g.nodes), src_map, self.specs)

    # ------------------------------------------------------------------ attention regions
    def _scan_attention(self):
        """``softmax(q.k + terms) @ v`` regions (by structure): their nodes are deferred to
        the ``attn @ v`` node, where the layouts of q, k, v and the terms are known."""
        self.deferred, self.attn_at = set(), {}
        for nd in self.src.graph.nodes:
            res = attention_nodes(nd) if nd.op == "call_function" else None
            if res is None:
                continue
            covered, av = res
            if av in self.attn_at or any(x in self.deferred or x in self.attn_at for x in (*covered, av)):
                continue
            self.deferred.update(covered)
            self.attn_at[av] = (nd, covered)

    def _match_layout(self, node):
        t = self.tg(node)
        if not isinstance(t, tuple):
            return t
        return tuple(x if x in (None, "r", "c") else "?" for x in t)

    def attention(self, av):
        """A triangle attention over a block-sharded key axis: the ring of
        :func:`autocp.passes.attention.tile_attention` (keys over all N tokens, O(N^2/P)).
        Any other region runs op by op through the rules."""
        sm, covered = self.attn_at[av]
        try:
            sp, key = match_attention(sm, self._match_layout)
        except AttentionMismatch as e:
            sp = None
            self.note("attention-unmatched", str(e))
        if sp is None:
            for x in covered:
                self.cur = x
                self.call(x)
            self.cur = av
            self.call(av)
            return
        self.ring_attention(av, sp, key)

    def ring_attention(self, node, sp, key):
        """Emit :func:`tile_attention` for the matched spec ``sp`` at ``node``."""
        tq = dict(zip(sp.lq, self._match_layout(sp.q)))

        def term(nd):  # whole token dims sliced to the required blocks; repeated rows narrowed
            v = self.to_tags(nd, sp.term_tags.get(nd, self.tg(nd)))
            if nd in sp.term_narrow:
                v = self.emit(torch.narrow, v, sp.term_narrow[nd], 0, 1)
            return v

        self.specs.append(sp)
        kv_box = self.emit(pack_kv, self.env[sp.k], self.env[sp.v], key)
        out = self.emit(tile_attention, self.env[sp.q], kv_box,
                        [term(b) for b, _a, _m in sp.biases], [term(m) for _k, m, _a, _v in sp.masks], key,
                        [self.full(f) for f in fill_nodes(sp)])
        self.note("ring", f"triangle attention: {sp.detail}")
        self.set(node, out, tuple(tq[sp.i] if l == sp.i else (tq[sp.j] if l == sp.j else None) for l in sp.lout))

    def call(self, node):
        tgt = node.target
        if tgt is operator.getitem:
            base, idx = node.args
            bt = self.tg(base)
            val = self.emit(operator.getitem, self.env[base], idx)
            self.set(node, val, bt[idx] if isinstance(bt, list) else None, alias=True)
            return
        fn = RULES.get(tgt)
        if fn is None and isinstance(tgt, torch._ops.OpOverload):
            fn = RULES.get(tgt.overloadpacket)
            if fn is None and (torch.Tag.pointwise in tgt.tags or _pointwise_alias(tgt)):
                fn = _pointwise
        if fn is None and isinstance(tgt, torch._ops.HigherOrderOperator):
            fn = RULES.get(getattr(tgt, "__name__", ""))
        if fn is None:
            fn = _fallback
        fn(self, node)


# ----------------------------------------------------------------------------- rules
#: ATen alias ops that carry no ``pointwise`` tag of their own but are pointwise ops under
#: another name (``torch.multiply``, ``torch.greater_equal``, ...: einx and numpy-style code
#: call them) -> the op they alias. Without this they ran gathered ("no sharding rule").
POINTWISE_ALIASES = {
    "multiply": "mul", "divide": "div", "true_divide": "div", "subtract": "sub", "negative": "neg",
    "greater_equal": "ge", "greater": "gt", "less_equal": "le", "less": "lt", "not_equal": "ne",
    "absolute": "abs", "clip": "clamp", "fix": "trunc", "arccos": "acos", "arcsin": "asin", "arctan": "atan",
    "arctan2": "atan2", "arccosh": "acosh", "arcsinh": "asinh", "arctanh": "atanh", "special_expit": "sigmoid",
    "special_exp2": "exp2", "special_expm1": "expm1", "special_log1p": "log1p", "special_round": "round",
    "special_sinc": "sinc", "special_logit": "logit", "special_xlogy": "xlogy", "special_erf": "erf",
    "special_erfc": "erfc", "special_erfinv": "erfinv", "special_i0": "i0", "special_psi": "digamma",
    "special_digamma": "digamma", "special_gammaln": "lgamma", "special_ndtri": "ndtri",
}


def _pointwise_alias(op) -> bool:
    """``op`` (an OpOverload) is an alias of a pointwise op (:data:`POINTWISE_ALIASES`)."""
    target = POINTWISE_ALIASES.get(op.overloadpacket.__name__)
    if target is None:
        return False
    packet = getattr(aten, target, None)
    return packet is not None and any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


def _inputs_tensor_nodes(node):
    out = []
    for a in tree_flatten((node.args, node.kwargs))[0]:
        if _is_tensor_node(a):
            out.append(a)
    return out


def _fallback(s: _Sharder, node, why="no sharding rule"):
    """(d): gather every tagged input, run the op on whole tensors; result replicated."""
    tgt = node.target
    name = getattr(tgt, "__name__", str(tgt))
    inplace = isinstance(tgt, torch._ops.OpOverload) and tgt._schema.is_mutable
    ins = _inputs_tensor_nodes(node)
    if inplace and ins and any(t is not None for t in (s.tg(ins[0]) or ())):
        s.refuse(f"it writes in place into a sharded tensor ({why})")
    if any(t is not None for a in ins for t in (s.tg(a) or ())):
        s.note("op-gather", f"{name}: {why}")
    args = s.map_args(node.args, lambda a: s.full(a) if _is_tensor_node(a) else s.env[a])
    kwargs = s.map_args(node.kwargs, lambda a: s.full(a) if _is_tensor_node(a) else s.env[a])
    out = s.emit(tgt, *args, **kwargs)
    v = _val(node)
    if isinstance(v, torch.Tensor):
        tags = (None,) * v.dim()
    elif isinstance(v, (list, tuple)):
        tags = [(None,) * x.dim() if isinstance(x, torch.Tensor) else None for x in v]
    else:
        tags = None
    s.set(node, out, tags)


def _drop(s, node):
    s.set(node, None, None)


for _op in (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default):
    RULES[_op] = _drop


def _broadcast_tags(s: _Sharder, out_shape, tensor_args):
    """Tags of a broadcasting op's output and each input's target tags."""
    nd = len(out_shape)
    cands = [[] for _ in range(nd)]
    for a in tensor_args:
        shp, tg = s.gshape(a), s.tg(a)
        off = nd - len(shp)
        for j, (sz, t) in enumerate(zip(shp, tg)):
            if t is not None and sz == out_shape[off + j]:
                cands[off + j].append((_numel(shp), t))
    out = []
    for c in cands:
        if not c:
            out.append(None)
        else:
            out.append(max(c, key=lambda x: x[0])[1])
    out = s.fix_axes(out)
    targets = []
    for a in tensor_args:
        shp = s.gshape(a)
        off = nd - len(shp)
        targets.append(tuple(out[off + j] if sz == out_shape[off + j] else None for j, sz in enumerate(shp)))
    return out, targets


def _pointwise(s: _Sharder, node):
    tgt = node.target
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return _fallback(s, node, "pointwise op with a non-tensor result")
    tensors = _inputs_tensor_nodes(node)
    inplace = isinstance(tgt, torch._ops.OpOverload) and tgt._schema.is_mutable
    if inplace:
        return _inplace(s, node, tensors)
    out, targets = _broadcast_tags(s, tuple(v.shape), tensors)
    tmap = dict(zip(tensors, targets))
    args = s.map_args(node.args, lambda a: s.to_tags(a, tmap[a]) if a in tmap else s.env[a])
    kwargs = s.map_args(node.kwargs, lambda a: s.to_tags(a, tmap[a]) if a in tmap else s.env[a])
    s.set(node, s.emit(tgt, *args, **kwargs), out)


def _inplace(s: _Sharder, node, tensors):
    """In-place op: the target keeps its tags; every other input is converted to them."""
    target = node.args[0]
    if not s.alias_ok.get(target, True):
        s.refuse("it writes in place into a value that autocp had to redistribute (a write there would not "
                 "reach the tensor the model reads later)", "Fix: use the out-of-place op (x = x + y instead of "
                 "x += y) in that line.")
    tt = s.tg(target)
    nd = len(tt)
    tmap = {}
    for a in tensors:
        if a is target:
            continue
        shp = s.gshape(a)
        off = nd - len(shp)
        tmap[a] = tuple(tt[off + j] if sz == s.gshape(target)[off + j] else None for j, sz in enumerate(shp))
    args = s.map_args(node.args, lambda a: (s.env[a] if a is target else s.to_tags(a, tmap[a])) if a in tmap or a is target else s.env[a])
    kwargs = s.map_args(node.kwargs, lambda a: s.to_tags(a, tmap[a]) if a in tmap else s.env[a])
    s.conv_cache.clear()
    s.set(node, s.emit(node.target, *args, **kwargs), tt, alias=True)


_FACTORIES = (aten.empty.memory_format, aten.zeros.default, aten.ones.default, aten.full.default,
              aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
              aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default)


def _fresh_cover(s, dst, node):
    """``(factory, views)`` when ``dst`` is a fresh factory tensor or a full-range slice of
    one (``out = torch.empty(M, C); out[0:M] = y``) that nothing read before ``node``;
    else None."""
    views = []
    cur = dst
    while isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target == aten.slice.Tensor:
        shp = s.gshape(cur.args[0])
        d = cur.args[1] if len(cur.args) > 1 else 0
        a, b, st = _norm_slice(cur.args[2] if len(cur.args) > 2 else None, cur.args[3] if len(cur.args) > 3 else None,
                               cur.args[4] if len(cur.args) > 4 else 1, shp[d % len(shp)])
        if (a, b, st) != (0, shp[d % len(shp)], 1):
            return None
        views.append(cur)
        cur = cur.args[0]
    if not (isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in _FACTORIES):
        return None
    order = s.order
    chain = set(views) | {node}
    for x in (cur, *views):
        if any(u not in chain and order[u] < order[node] for u in x.users):
            return None
    return cur, views


@rule(aten.copy_.default)
def _copy_(s, node):
    dst, src = node.args[0], node.args[1]
    cover = _fresh_cover(s, dst, node) if isinstance(src, fx.Node) else None
    if cover is not None and s.gshape(src) == s.gshape(dst):
        # a fresh buffer overwritten whole: it *becomes* ``src`` (its layout, no gather)
        base, views = cover
        v = s.env[src]
        if _val(src).dtype != _val(dst).dtype:
            v = s.emit(torch.Tensor.to, v, _val(dst).dtype)
        else:
            v = s.emit(torch.clone, v)
        for nd in (base, *views, node):
            s.set(nd, v, s.tg(src), alias=True)
        s.conv_cache.clear()
        return
    _inplace(s, node, _inputs_tensor_nodes(node))


@rule(aten.copy.default)
def _copy(s, node):
    dst, src = node.args[0], node.args[1]
    tt = s.tg(dst)
    shp = s.gshape(src)
    off = len(tt) - len(shp)
    st = tuple(tt[off + j] if sz == s.gshape(dst)[off + j] else None for j, sz in enumerate(shp))
    s.set(node, s.emit(node.target, s.env[dst], s.to_tags(src, st), *node.args[2:], **node.kwargs), tt)


def _same_tags_unary(s, node):
    x = node.args[0]
    args = (s.env[x],) + tuple(s.env[a] if isinstance(a, fx.Node) else a for a in node.args[1:])
    kwargs = {k: (s.env[a] if isinstance(a, fx.Node) else a) for k, a in node.kwargs.items()}
    alias = node.target in (aten.alias.default, aten.detach.default)
    s.set(node, s.emit(node.target, *args, **kwargs), s.tg(x), alias=alias and s.alias_ok.get(x, True))


for _op in (aten.clone.default, aten.detach.default, aten.alias.default, aten.lift_fresh_copy.default,
            aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other,
            aten.contiguous.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
            aten.full_like.default, aten.fill.Scalar, aten.zero.default, aten.type_as.default,
            aten.masked_fill.Scalar, aten.bitwise_not.default, aten.logical_not.default):
    RULES[_op] = _same_tags_unary


@rule(aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther,
      aten.where.Scalar, aten.masked_fill.Scalar, aten.lerp.Scalar, aten.lerp.Tensor,
      # elementwise ops that ATen does not tag pointwise (found by the OpInfo sweep)
      aten.rsub.Tensor, aten.subtract.Tensor, aten.subtract.Scalar, aten.floor_divide.default,
      aten.floor_divide.Scalar, aten.isclose.default, aten.real.default, aten.log_sigmoid.default,
      aten.special_ndtr.default, aten.isreal.default, aten.__and__.Tensor, aten.__or__.Tensor,
      aten.__and__.Scalar, aten.__or__.Scalar)
def _pw_rule(s, node):
    _pointwise(s, node)


# ----------------------------------------------------------------------------- factories / RNG
@rule(aten.zeros.default, aten.ones.default, aten.full.default, aten.empty.memory_format, aten.arange.default,
      aten.arange.start, aten.arange.start_step, aten.scalar_tensor.default, aten.linspace.default,
      aten.eye.default, aten.empty_strided.default, aten.new_zeros.default, aten.new_ones.default,
      aten.new_full.default, aten.new_empty.default, aten.rand.default, aten.randn.default,
      aten.randint.default, aten.randint.low, aten.randperm.default)
def _factory(s, node):
    """Factories build the whole (global-shape) tensor on every rank: exact, and random
    draws match the single-device numbers given the same generator state."""
    args = s.map_args(node.args, lambda a: s.env[a])
    kwargs = s.map_args(node.kwargs, lambda a: s.env[a])
    v = _val(node)
    nb = v.numel() * v.element_size()
    if v.dim() >= 2 and nb > (1 << 22):
        s.note("replicated", f"{node.target} builds a whole {tuple(v.shape)} tensor on every rank", nb)
    s.set(node, s.emit(node.target, *args, **kwargs), (None,) * v.dim())


@rule(aten.rand_like.default, aten.randn_like.default, aten.randint_like.default, aten.randint_like.low_dtype)
def _rand_like(s, node):
    x = node.args[0]
    tags = s.tg(x)
    v = _val(node)
    kw = {k: (s.env[a] if isinstance(a, fx.Node) else a) for k, a in node.kwargs.items()}
    kw.setdefault("dtype", v.dtype)
    kw.setdefault("device", v.device)
    fn = {aten.rand_like.default: "rand", aten.randn_like.default: "randn"}.get(node.target)
    if fn is None:
        return _fallback(s, node, "randint_like on a sharded tensor")
    s.set(node, s.emit(T.draw_global, fn, tuple(v.shape), tags, **kw), tags)


@rule(aten.native_dropout.default)
def _native_dropout(s, node):
    x, p, train = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    tags = s.tg(x)
    out = s.emit(T.dropout_global, s.env[x], p, train, tags, s.gshape(x))
    s.set(node, out, [tags, tags])


@rule(aten.dropout.default)
def _dropout(s, node):
    x, p, train = node.args
    tags = s.tg(x)
    out = s.emit(T.dropout_global, s.env[x], p, train, tags, s.gshape(x))
    s.set(node, s.emit(operator.getitem, out, 0), tags)


@rule(aten.bernoulli.default, aten.bernoulli.p, aten.bernoulli_.float, aten.bernoulli_.Tensor,
      aten.normal.Tensor_float, aten.uniform_.default, aten.normal_.default, aten.exponential_.default)
def _rng_other(s, node):
    return _fallback(s, node, "random draw on a sharded tensor (drawn whole to match single device)")


# ----------------------------------------------------------------------------- views
def _split_factors(shape, tags, s):
    f = []
    for sz, t in zip(shape, tags):
        if isinstance(t, tuple) and t[0] in T.PAIR_MERGED:
            tag, o, i = t
            f += [(o, None), (s.n, tag[0]), (s.n, tag[1]), (i, None)]
        elif isinstance(t, tuple):
            tag, o, i = t
            L = T.global_len(tag, s.n, s.n_seq)
            f += [(o, None), (L, tag), (i, None)]
        else:
            f.append((sz, t))
    return [x for x in f if not (x[0] == 1 and x[1] is None)]


def _view_tags(s: _Sharder, in_shape, in_tags, out_shape):
    """Tags of ``out_shape`` for a view of ``in_shape`` (``None`` if a token axis would split)."""
    fac = _split_factors(in_shape, in_tags, s)
    out = []
    k = 0
    cur = None
    for S in out_shape:
        if S == 1:
            out.append(None)
            continue
        need = S
        parts = []
        while need > 1:
            if cur is None:
                if k >= len(fac):
                    return None
                cur = list(fac[k])
                k += 1
            sz, t = cur
            if sz <= need and need % sz == 0:
                parts.append((sz, t))
                need //= sz
                cur = None
            elif t is None and sz % need == 0:
                parts.append((need, None))
                cur = [sz // need, None]
                need = 1
            else:
                return None
        tagged = [(i, p) for i, p in enumerate(parts) if p[1] is not None]
        if len(tagged) == 2 and tagged[1][0] == tagged[0][0] + 1 and \
                tagged[0][1][1] + tagged[1][1][1] in T.PAIR_MERGED:
            # two adjacent token axes merged (``z.reshape(-1, C)``): the merged pair tag
            i = tagged[0][0]
            o = _numel([p[0] for p in parts[:i]])
            inn = _numel([p[0] for p in parts[i + 2:]])
            out.append((tagged[0][1][1] + tagged[1][1][1], o, inn))
        elif not tagged:
            out.append(None)
        elif len(tagged) > 1:
            return None
        else:
            i, (sz, t) = tagged[0]
            o = _numel([p[0] for p in parts[:i]])
            inn = _numel([p[0] for p in parts[i + 1:]])
            out.append(t if o == 1 and inn == 1 else (t, o, inn))
    if cur is not None or any(x[1] is not None for x in fac[k:]):
        return None
    return tuple(out)


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_copy.default)
def _view(s, node):
    x, size = node.args[0], node.args[1]
    in_shape, tags = s.gshape(x), s.tg(x)
    out_shape = tuple(int(v) for v in _val(node).shape)
    ot = _view_tags(s, in_shape, tags, out_shape) if any(t is not None for t in tags) else (None,) * len(out_shape)
    xa = x
    if ot is None:
        s.note("gather", f"view {in_shape}->{out_shape} splits a sharded axis")
        xv = s.full(x)
        ot = (None,) * len(out_shape)
        alias = False  # a gathered copy: in-place writes would not reach x
    else:
        xv = s.env[x]
        alias = s.alias_ok.get(xa, True)
    local = s.local_shape(out_shape, ot)
    s.set(node, s.emit(node.target, xv, local), ot, alias=alias)


@rule(aten.unsqueeze.default)
def _unsqueeze(s, node):
    x, d = node.args
    t = list(s.tg(x))
    d = d % (len(t) + 1)
    t.insert(d, None)
    s.set(node, s.emit(node.target, s.env[x], node.args[1]), tuple(t), alias=s.alias_ok.get(x, True))


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(s, node):
    x = node.args[0]
    shp, t = s.gshape(x), s.tg(x)
    if node.target == aten.squeeze.default:
        dims = [i for i, v in enumerate(shp) if v == 1]
    else:
        d = node.args[1]
        dims = [d] if isinstance(d, int) else list(d)
        dims = [i % len(shp) for i in dims if shp[i % len(shp)] == 1]
    if any(t[i] is not None for i in dims):
        return _fallback(s, node, "squeeze of a sharded axis")
    ot = tuple(v for i, v in enumerate(t) if i not in dims)
    s.set(node, s.emit(aten.squeeze.dims, s.env[x], dims), ot, alias=s.alias_ok.get(x, True))


@rule(aten.permute.default)
def _permute(s, node):
    x, perm = node.args
    t = s.tg(x)
    perm = [p % len(t) for p in perm]
    s.set(node, s.emit(node.target, s.env[x], perm), tuple(t[p] for p in perm), alias=s.alias_ok.get(x, True))


@rule(aten.transpose.int)
def _transpose(s, node):
    x, a, b = node.args
    t = list(s.tg(x))
    a, b = a % len(t), b % len(t)
    t[a], t[b] = t[b], t[a]
    s.set(node, s.emit(node.target, s.env[x], a, b), tuple(t), alias=s.alias_ok.get(x, True))


@rule(aten.t.default, aten.numpy_T.default)
def _t(s, node):
    x = node.args[0]
    t = tuple(reversed(s.tg(x)))
    s.set(node, s.emit(node.target, s.env[x]), t, alias=s.alias_ok.get(x, True))


@rule(aten.expand.default, aten.expand_copy.default, aten.expand_as.default)
def _expand(s, node):
    x = node.args[0]
    target = aten.expand.default if node.target == aten.expand_as.default else node.target
    shp, t = s.gshape(x), s.tg(x)
    out_shape = tuple(int(v) for v in _val(node).shape)
    off = len(out_shape) - len(shp)
    ot = [None] * off + [t[j] if shp[j] == out_shape[off + j] else None for j in range(len(shp))]
    src = s.env[x]
    # a token vector broadcast along a new token axis (``res_type[:, :, None].expand(.., N, ..)``):
    # the new axis takes the other mesh axis -- a Pair2D tile, O(N^2/P) -- instead of a whole
    # dim (O(N^2/p)). The values are equal along it, so the local expand is exact (pad slots
    # hold the same values, which every reduction masks). The first token axis goes on the rows.
    real = [(i, v) for i, v in enumerate(ot) if v is not None]
    grow = [i for i in range(off, len(out_shape)) if shp[i - off] == 1 and out_shape[i] == s.n and s.n > 1]
    if grow and len(real) == 1 and real[0][1] in ("r", "c"):
        old, new = real[0][0], grow[0]
        want = "r" if old < new else "c"
        if t[old - off] != want:
            nt = list(t)
            nt[old - off] = want
            src = s.to_tags(x, tuple(nt))  # a token vector: O(N), one exchange
        ot[old] = want
        ot[new] = "c" if want == "r" else "r"
    local = [(-1 if (i >= off and ot[i] is not None) else out_shape[i]) for i in range(len(out_shape))]
    for i in range(off, len(out_shape)):
        if ot[i] is not None:
            local[i] = s.local_len(ot[i])
    big = _numel(s.local_shape(out_shape, ot)) * _val(node).element_size()
    if sum(1 for v in ot if v is None and out_shape[ot.index(v)] > 1) and big > (1 << 24):
        s.note("replicated", f"expand to {out_shape} materialises whole dims", big)
    s.set(node, s.emit(target, src, local), tuple(ot), alias=s.alias_ok.get(x, True) and src is s.env[x])


def _norm_slice(start, end, step, L):
    start = 0 if start is None else start
    end = L if end is None else end
    if start < 0:
        start += L
    if end < 0:
        end += L
    start, end = max(0, min(start, L)), max(0, min(end, L))
    return start, max(start, end), step


@rule(aten.slice.Tensor)
def _slice(s, node):
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
    end = node.args[3] if len(node.args) > 3 else node.kwargs.get("end")
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    shp, t = s.gshape(x), s.tg(x)
    dim = dim % len(shp)
    td = t[dim]
    if td is None:
        s.set(node, s.emit(node.target, s.env[x], dim, start, end, step), t, alias=s.alias_ok.get(x, True))
        return
    L = shp[dim]
    a, b, st = _norm_slice(start, end, step, L)
    if a == 0 and b == L and st == 1:
        s.set(node, s.env[x], t, alias=s.alias_ok.get(x, True))
        return
    if st == 1 and not isinstance(td, tuple):
        ot = tuple(None if i == dim else v for i, v in enumerate(t))
        s.note("narrow", f"slice [{a}:{b}] of sharded dim {dim} (owner ranks + all-reduce)")
        s.set(node, s.emit(T.narrow_global, s.env[x], dim, td, a, b - a), ot, alias=False)
        return
    xt = tuple(None if i == dim else v for i, v in enumerate(t))
    xv = s.to_tags(x, xt)
    s.set(node, s.emit(node.target, xv, dim, start, end, step), xt, alias=False)


@rule(aten.narrow.default)
def _narrow(s, node):
    x, dim, start, length = node.args
    shp, t = s.gshape(x), s.tg(x)
    dim = dim % len(shp)
    if t[dim] is None:
        s.set(node, s.emit(node.target, s.env[x], dim, start, length), t, alias=s.alias_ok.get(x, True))
        return
    if isinstance(t[dim], tuple):
        return _fallback(s, node, "narrow of a merged sharded axis")
    ot = tuple(None if i == dim else v for i, v in enumerate(t))
    s.set(node, s.emit(T.narrow_global, s.env[x], dim, t[dim], start, length), ot, alias=False)


@rule(aten.select.int)
def _select(s, node):
    x, dim, idx = node.args
    shp, t = s.gshape(x), s.tg(x)
    dim = dim % len(shp)
    ot = tuple(v for i, v in enumerate(t) if i != dim)
    if t[dim] is None:
        s.set(node, s.emit(node.target, s.env[x], dim, idx), ot, alias=s.alias_ok.get(x, True))
    elif isinstance(t[dim], tuple):
        _fallback(s, node, "select on a merged sharded axis")
    else:
        s.set(node, s.emit(T.select_global, s.env[x], dim, t[dim], idx), ot, alias=False)


def _whole_dims(s, x, dims):
    t = s.tg(x)
    nt = tuple(None if i in dims else v for i, v in enumerate(t))
    return s.to_tags(x, nt), nt


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
      aten.split_copy.Tensor)
def _split(s, node):
    x = node.args[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if node.target == aten.unbind.int:
        dim = node.args[1] if len(node.args) > 1 else 0
    nd = len(s.gshape(x))
    dim = dim % nd
    v = _val(node)
    if node.target != aten.unbind.int and len(v) == 1:  # one piece (protenix: chunk(x, 1)): the tile itself
        s.set(node, s.emit(aten.chunk.default, s.env[x], 1, dim), [s.tg(x)], alias=s.alias_ok.get(x, True))
        return
    xv, nt = _whole_dims(s, x, {dim})
    out = s.emit(node.target, xv, *node.args[1:], **node.kwargs)
    v = _val(node)
    if node.target == aten.unbind.int:
        ot = tuple(t for i, t in enumerate(nt) if i != dim)
    else:
        ot = nt
    s.set(node, out, [ot for _ in v], alias=s.alias_ok.get(x, True) and nt == s.tg(x))


@rule(aten.cat.default, aten.stack.default)
def _cat(s, node):
    tensors = list(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    v = _val(node)
    out_nd = v.dim()
    if node.target == aten.stack.default:
        nd = out_nd - 1
        dim_in = dim % (nd + 1)
    else:
        nd = out_nd
        dim_in = dim % nd
    # a common tag per non-cat dim: the first tagged input's
    common = [None] * nd
    for a in tensors:
        for i, t in enumerate(s.tg(a)):
            if i != dim_in or node.target == aten.stack.default:
                if common[i] is None and t is not None:
                    common[i] = t
    real = [a for a in tensors if s.gshape(a) != (0,)]
    if node.target == aten.cat.default and len(real) == 1:  # one tensor (einops pack): a copy, tags kept
        s.set(node, s.emit(torch.clone, s.env[real[0]]), s.tg(real[0]))
        return
    if node.target == aten.cat.default:
        common[dim_in] = None
    common = s.fix_axes(common)
    vals = []
    for a in tensors:
        shp = s.gshape(a)
        if len(shp) == 1 and shp[0] == 0:
            vals.append(s.env[a])
            continue
        # a dim of length 1 broadcasts (kept whole) -- unless it is a sharded axis of global
        # length 1 itself (an MSA of one sequence on the "s" axis)
        tg = s.tg(a) or (None,) * len(shp)
        vals.append(s.to_tags(a, tuple(c if shp[i] > 1 or c is None or tg[i] == c else None
                                       for i, c in enumerate(common))))
    ot = list(common)
    if node.target == aten.stack.default:
        ot.insert(dim_in, None)
    s.set(node, s.emit(node.target, vals, dim), tuple(ot))


# ----------------------------------------------------------------------------- reductions
def _red_dims(dims, nd):
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(d % nd for d in dims)


@rule(aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.any.dim, aten.any.dims,
      aten.any.default, aten.all.dim, aten.all.dims, aten.all.default, aten.amax.default, aten.amin.default,
      aten.nansum.default)
def _reduce(s, node):
    x = node.args[0]
    shp, t = s.gshape(x), s.tg(x)
    nd = len(shp)
    tgt = node.target
    packet = tgt.overloadpacket
    if tgt in (aten.sum.default, aten.mean.default, aten.any.default, aten.all.default):
        dims, keep = list(range(nd)), False
        dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 and tgt != aten.any.default and tgt != aten.all.default else None)
    else:
        dims = _red_dims(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"), nd)
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dtype = node.kwargs.get("dtype")
    tagged = [(d, t[d]) for d in dims if t[d] is not None]
    out_t = tuple(v for i, v in enumerate(t) if keep or i not in dims)
    if keep:
        out_t = tuple(None if i in dims else v for i, v in enumerate(t))
    if not tagged:
        args = s.map_args(node.args, lambda a: s.env[a])
        s.set(node, s.emit(tgt, *args, **s.map_args(node.kwargs, lambda a: s.env[a])), out_t)
        return
    if any(isinstance(tt, tuple) for _, tt in tagged):
        xv, nt = _whole_dims(s, x, {d for d, _ in tagged})
        args = (xv,) + tuple(s.map_args(node.args[1:], lambda a: s.env[a]))
        s.set(node, s.emit(tgt, *args, **node.kwargs), out_t)
        return
    xv = s.env[x]
    if packet in (aten.sum, aten.mean, aten.nansum):
        count = None
        if packet is aten.mean:
            count = _numel([shp[d] for d in dims])
        if packet is aten.nansum:
            xv = s.emit(torch.nan_to_num, xv, 0.0)
        out = s.emit(T.reduce_sum, xv, dims, keep, tagged, dtype, count)
    elif packet in (aten.any, aten.all):
        # any: some element != 0; all: no element == 0 (float inputs too: 0.3 is true)
        xi = s.emit(torch.Tensor.to, s.emit(torch.eq if packet is aten.all else torch.ne, xv, 0), torch.int32)
        tot = s.emit(T.reduce_sum, xi, dims, keep, tagged, None, None)
        out = s.emit(torch.eq if packet is aten.all else torch.gt, tot, 0)
    else:
        out = s.emit(T.reduce_amax, xv, dims, keep, tagged, packet is aten.amin)
    s.note("all-reduce", f"{packet.__name__} over sharded dim(s) {[d for d, _ in tagged]}")
    s.set(node, out, out_t)


def _token_reduction(s, node, dims_arg, keep_arg, local):
    """Shared shape of the reductions below: ``local(s, x_tile, dims, keep, tagged)`` emits
    the reduction of one tile given the sharded dims (``tagged``); a reduction over no
    sharded dim, or over merged dims, runs on the op itself."""
    x = node.args[0]
    shp, t = s.gshape(x), s.tg(x)
    nd = len(shp)
    dims = _red_dims(dims_arg, nd)
    keep = bool(keep_arg)
    tagged = [(d, t[d]) for d in dims if t[d] is not None]
    out_t = tuple(None if i in dims else v for i, v in enumerate(t)) if keep else \
        tuple(v for i, v in enumerate(t) if i not in dims)
    if not tagged or any(isinstance(tt, tuple) for _, tt in tagged):
        xv = s.env[x] if not tagged else _whole_dims(s, x, {d for d, _ in tagged})[0]
        args = (xv,) + tuple(s.map_args(node.args[1:], lambda a: s.env[a]))
        s.set(node, s.emit(node.target, *args, **s.map_args(node.kwargs, lambda a: s.env[a])), out_t)
        return
    s.note("all-reduce", f"{node.target.overloadpacket.__name__} over sharded dim(s) {[d for d, _ in tagged]}")
    s.set(node, local(s, s.env[x], dims, keep, tagged), out_t)


@rule(aten.count_nonzero.default, aten.count_nonzero.dim_IntList)
def _count_nonzero(s, node):
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    _token_reduction(s, node, d, False, lambda s, xv, dims, keep, tagged: s.emit(
        T.reduce_sum, s.emit(torch.ne, xv, 0), dims, keep, tagged, torch.int64, None))


@rule(aten.nanmean.default)
def _nanmean(s, node):
    a, kw = node.args, node.kwargs
    d = a[1] if len(a) > 1 else kw.get("dim")
    keep = a[2] if len(a) > 2 else kw.get("keepdim", False)

    def local(s, xv, dims, keep, tagged):
        tot = s.emit(T.reduce_sum, s.emit(torch.nan_to_num, xv, 0.0, 0.0, 0.0), dims, keep, tagged, None, None)
        cnt = s.emit(T.reduce_sum, s.emit(torch.Tensor.to, s.emit(torch.logical_not, s.emit(torch.isnan, xv)),
                                          _val(node.args[0]).dtype), dims, keep, tagged, None, None)
        return s.emit(torch.div, tot, cnt)

    if kw.get("dtype") is not None or (len(a) > 3 and a[3] is not None):
        return _fallback(s, node, "nanmean with a dtype")
    _token_reduction(s, node, d, keep, local)


@rule(aten.linalg_vector_norm.default)
def _vector_norm(s, node):
    a, kw = node.args, node.kwargs
    ordv = a[1] if len(a) > 1 else kw.get("ord", 2)
    d = a[2] if len(a) > 2 else kw.get("dim")
    keep = a[3] if len(a) > 3 else kw.get("keepdim", False)
    dtype = a[4] if len(a) > 4 else kw.get("dtype")
    if not isinstance(ordv, (int, float)) or ordv <= 0:
        return _channel_only(2, 3)(s, node)

    def local(s, xv, dims, keep, tagged):
        ax = s.emit(torch.abs, xv if dtype is None else s.emit(torch.Tensor.to, xv, dtype))
        if ordv == float("inf"):
            return s.emit(T.reduce_amax, ax, dims, keep, tagged, False)
        tot = s.emit(T.reduce_sum, s.emit(torch.pow, ax, ordv), dims, keep, tagged, None, None)
        return s.emit(T.safe_root, tot, float(ordv))

    _token_reduction(s, node, d, keep, local)


def _channel_only(dim_arg_index, keep_index=None, multi_out=False, default_dim=None):
    """Ops correct on tiles when the dims they act along are whole (sort, cumsum, var,
    norm, argmax, ...): make those dims whole (gather if sharded), run locally.
    ``default_dim``: the op's dim when the call leaves it out (sort / topk: -1); None:
    all dims."""

    def fn(s, node):
        x = node.args[0]
        shp, t = s.gshape(x), s.tg(x)
        nd = len(shp)
        d = node.args[dim_arg_index] if len(node.args) > dim_arg_index else node.kwargs.get("dim", default_dim)
        dims = _red_dims(d, nd) if d is not None or dim_arg_index >= 0 else list(range(nd))
        keep = False
        if keep_index is not None:
            keep = node.args[keep_index] if len(node.args) > keep_index else node.kwargs.get("keepdim", False)
        xv, nt = _whole_dims(s, x, set(dims))
        args = (xv,) + tuple(s.map_args(node.args[1:], lambda a: s.env[a]))
        out = s.emit(node.target, *args, **s.map_args(node.kwargs, lambda a: s.env[a]))
        v = _val(node)
        reduces = keep_index is not None
        ot = tuple(None if i in dims else tt for i, tt in enumerate(nt)) if (keep or not reduces) else \
            tuple(tt for i, tt in enumerate(nt) if i not in dims)
        if isinstance(v, (list, tuple)):
            s.set(node, out, [ot for _ in v])
        else:
            s.set(node, out, ot)

    return fn


RULES[aten.cumsum.default] = _channel_only(1)
RULES[aten.cumprod.default] = _channel_only(1)
RULES[aten.sort.default] = _channel_only(1, default_dim=-1)
RULES[aten.sort.stable] = _channel_only(99, default_dim=-1)
RULES[aten.argsort.default] = _channel_only(1, default_dim=-1)
RULES[aten.argsort.stable] = _channel_only(99, default_dim=-1)
RULES[aten.topk.default] = _channel_only(2, default_dim=-1)
RULES[aten.flip.default] = _channel_only(1)
RULES[aten.roll.default] = _channel_only(2)


@rule(aten.max.dim, aten.min.dim)
def _max_dim(s, node):
    """max/min with dim along one sharded dim -> (values, global indices)."""
    x = node.args[0]
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    t = s.tg(x)
    d = d % len(t)
    if t[d] is None or isinstance(t[d], tuple):
        return _channel_only(1, 2)(s, node)
    out_t = tuple(None if i == d else v for i, v in enumerate(t)) if keep else tuple(v for i, v in enumerate(t) if i != d)
    s.note("all-reduce", f"{node.target.overloadpacket.__name__} over sharded dim {d}")
    s.set(node, s.emit(T.max_dim, s.env[x], d, t[d], keep, node.target is aten.max.dim), [out_t, out_t])


@rule(aten.argmax.default, aten.argmin.default)
def _argmax(s, node):
    """argmax/argmin along one sharded dim: global index of the first extremum (two small
    all-reduces); along whole dims, or over all dims (flattened index), the op itself."""
    x = node.args[0]
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    t = s.tg(x)
    if d is None or t[d % len(t)] is None or isinstance(t[d % len(t)], tuple):
        return _channel_only(1, 2)(s, node)
    d = d % len(t)
    out_t = tuple(None if i == d else v for i, v in enumerate(t)) if keep else tuple(v for i, v in enumerate(t) if i != d)
    s.note("all-reduce", f"{node.target.overloadpacket.__name__} over sharded dim {d}")
    s.set(node, s.emit(T.arg_extreme, s.env[x], d, t[d], keep, node.target is aten.argmax.default), out_t)
RULES[aten.logcumsumexp.default] = _channel_only(1)


@rule(aten.var.correction, aten.var_mean.correction, aten.std.correction, aten.std_mean.correction,
      aten.var.dim, aten.var_mean.dim, aten.std.dim, aten.std_mean.dim)
def _var(s, node):
    """var / std / var_mean: over whole dims tile-local; over block-sharded dims the global
    mean and the sum of squared deviations are all-reduced (:func:`tile_ops.reduce_var`)."""
    x = node.args[0]
    shp, t = s.gshape(x), s.tg(x)
    nd = len(shp)
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = _red_dims(d, nd)
    name = node.target.overloadpacket.__name__  # var / std / var_mean / std_mean
    if node.target.overloadpacket in (aten.var, aten.std, aten.var_mean, aten.std_mean) and \
            node.target._overloadname == "dim":  # (self, dim, unbiased=True, keepdim=False)
        unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
        keep = bool(node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False))
        corr = 1 if unbiased else 0
    else:
        keep = bool(node.kwargs.get("keepdim", False))
        corr = node.kwargs.get("correction")
        corr = 1 if corr is None else corr
    tagged = [(i, t[i]) for i in dims if t[i] is not None]
    if not tagged or any(isinstance(tt, tuple) for _, tt in tagged):
        return _channel_only(1, 3)(s, node)
    out = s.emit(T.reduce_var, s.env[x], dims, keep, tagged, corr, _numel([shp[i] for i in dims]), name)
    ot = tuple(None if i in dims else v for i, v in enumerate(t)) if keep else \
        tuple(v for i, v in enumerate(t) if i not in dims)
    s.note("all-reduce", f"{name} over sharded dim(s) {[i for i, _ in tagged]}")
    s.set(node, out, [ot, ot] if name.endswith("_mean") else ot)


@rule(aten.glu.default)
def _glu(s, node):
    """``glu(x, dim=-1)``: halves ``dim`` -- tile-local along a channel dim (token dims keep
    their tags), a token ``dim`` is made whole first."""
    x = node.args[0]
    nd = len(s.gshape(x))
    d = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)) % nd
    xv, nt = _whole_dims(s, x, {d})
    s.set(node, s.emit(node.target, xv, d), nt)


@rule(aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int,
      aten._safe_softmax.default)
def _softmax(s, node):
    x, dim = node.args[0], node.args[1]
    shp, t = s.gshape(x), s.tg(x)
    dim = dim % len(shp)
    td = t[dim]
    if td is None:
        args = s.map_args(node.args, lambda a: s.env[a])
        s.set(node, s.emit(node.target, *args, **s.map_args(node.kwargs, lambda a: s.env[a])), t)
        return
    if isinstance(td, tuple):
        xv, nt = _whole_dims(s, x, {dim})
        args = (xv,) + tuple(node.args[1:])
        s.set(node, s.emit(node.target, *args, **node.kwargs), nt)
        return
    v = _val(node)
    out_dtype = v.dtype if v.dtype != _val(x).dtype else None
    log = node.target.overloadpacket in (aten._log_softmax, aten.log_softmax)
    fn = T.log_softmax if log else T.softmax
    out = s.emit(fn, s.env[x], dim, td, out_dtype)
    if node.target == aten._safe_softmax.default:
        xm = s.emit(T.reduce_amax, s.env[x], [dim], True, [(dim, td)], False)
        out = s.emit(torch.where, s.emit(torch.isinf, xm), s.emit(torch.zeros_like, out), out)
    s.note("all-reduce", f"softmax over sharded dim {dim}")
    s.set(node, out, t)


@rule(aten.logsumexp.default)
def _logsumexp(s, node):
    x = node.args[0]
    shp, t = s.gshape(x), s.tg(x)
    dims = _red_dims(node.args[1], len(shp))
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    tagged = [d for d in dims if t[d] is not None]
    ot = tuple(None if i in dims else v for i, v in enumerate(t)) if keep else \
        tuple(v for i, v in enumerate(t) if i not in dims)
    if not tagged:
        s.set(node, s.emit(node.target, s.env[x], *node.args[1:]), ot)
        return
    if len(dims) != 1 or isinstance(t[dims[0]], tuple):
        xv, _ = _whole_dims(s, x, set(tagged))
        s.set(node, s.emit(node.target, xv, *node.args[1:]), ot)
        return
    s.set(node, s.emit(T.logsumexp, s.env[x], dims[0], t[dims[0]], keep), ot)


# ----------------------------------------------------------------------------- norms / linear
@rule(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default)
def _layer_norm(s, node):
    x, shape = node.args[0], node.args[1]
    k = len(shape)
    t = s.tg(x)
    nd = len(t)
    norm_dims = set(range(nd - k, nd))
    xv, nt = _whole_dims(s, x, norm_dims) if any(t[d] is not None for d in norm_dims) else (s.env[x], t)
    rest = [s.full(a) if _is_tensor_node(a) else a for a in node.args[2:]]
    out = s.emit(node.target, xv, shape, *rest, **node.kwargs)
    if node.target == aten.native_layer_norm.default:
        st = tuple(nt[:nd - k]) + (None,) * k
        s.set(node, out, [nt, st, st])
    else:
        s.set(node, out, nt)


@rule(aten.group_norm.default, aten.native_group_norm.default, aten.batch_norm.default,
      aten._native_batch_norm_legit_functional.default, aten._native_batch_norm_legit_no_training.default,
      aten.instance_norm.default)
def _other_norms(s, node):
    _fallback(s, node, "normalisation over a batch/group of positions")


def _letters_contract(s: _Sharder, node, operands, letters, out_letters, emit_fn):
    """Generic contraction: ``operands`` (src nodes) with index letters; letters absent
    from ``out_letters`` are summed. Chooses one tag per letter, converts the operands,
    emits ``emit_fn(*local_operands)`` (wrapped in a partial sum + all-reduce when a summed
    letter is sharded). Returns the output tags. A triangle contraction (two pair tensors
    sharing one summed token letter) runs on the Cannon ring instead (:func:`_pair_contract`)."""
    pc = _pair_contract(s, node, operands, letters, out_letters)
    if pc is None:
        pc = _msa_contract(s, node, operands, letters, out_letters)
    if pc is None:
        pc = _pair_msa_contract(s, node, operands, letters, out_letters)
    if pc is not None:
        return pc
    sizes = {}
    for a, ls in zip(operands, letters):
        for l, sz in zip(ls, s.gshape(a)):
            sizes[l] = max(sizes.get(l, 1), sz)
    cands = {}
    for a, ls in zip(operands, letters):
        nel = _numel(s.gshape(a))
        for l, sz, t in zip(ls, s.gshape(a), s.tg(a)):
            if t is not None and sz == sizes[l] and not isinstance(t, tuple):
                cands.setdefault(l, []).append((nel, t))
    order = list(out_letters) + [l for l in sizes if l not in out_letters]
    chosen = {}
    groups = [set(ls) for ls in letters] + [set(out_letters)]
    for l in order:
        if l not in cands:
            chosen[l] = None
            continue
        pref = [t for _, t in sorted(cands[l], key=lambda x: -x[0])]
        pick = None
        for t in pref + [T._swap(p) for p in pref]:
            ok = True
            for g in groups:
                if l in g and any(chosen.get(o) is not None and _axis(chosen[o]) == _axis(t) for o in g if o != l):
                    ok = False
            if ok:
                pick = t
                break
        chosen[l] = pick
    vals = []
    a_tags = []
    for a, ls in zip(operands, letters):
        tt = tuple(chosen[l] if sz == sizes[l] else None for l, sz in zip(ls, s.gshape(a)))
        vals.append(s.to_tags(a, tt))
        a_tags.append(tt)
    summed = [l for l in sizes if l not in out_letters and chosen[l] is not None]
    out_t = tuple(chosen[l] for l in out_letters)
    if not summed:
        return emit_fn(*vals), out_t
    dims_tags = [[(i, chosen[l]) for i, l in enumerate(ls) if l in summed and a_tags[k][i] is not None]
                 for k, ls in enumerate(letters)]
    s.note("all-reduce", f"contraction over sharded index {summed}")
    if len(operands) != 2:  # e.g. einsum("bijd,bwki,bwlj->bwkld", z, q_map, k_map): one partial, all-reduced
        out = s.emit(T.contract_n, s.const(_EmitFn(emit_fn, s)), list(vals), dims_tags, [chosen[l] for l in summed])
        return out, out_t
    out = s.emit(T.contract, s.const(_EmitFn(emit_fn, s)), vals[0], vals[1], dims_tags[0], dims_tags[1],
                 [chosen[l] for l in summed])
    return out, out_t


def _pair_contract(s: _Sharder, node, operands, letters, out_letters):
    """``sum_k A[.., x, k] B[.., y, k]`` (any letter order) where both operands are pair
    tensors (two r/c-tagged letters each) sharing the summed token letter ``k`` and ``x``,
    ``y`` are output letters: every rank's output tile needs one block row of A and one
    block column of B, so a local partial + all-reduce cannot do it and gathering costs
    O(N^2/p). It runs on the Cannon ring (:func:`tile_ops.pair_contract`, O(N^2/P)).
    Other letters must be untagged and in both operands (batch / channel; summed ones are
    summed after the ring). Returns ``(out, out_tags)`` or None when the pattern does not fit."""
    if len(operands) != 2 or len(set(out_letters)) != len(out_letters):
        return None
    tok, tags = [], []
    for a, ls in zip(operands, letters):
        t = s.tg(a)
        if t is None or len(t) != len(ls) or len(set(ls)) != len(ls):
            return None
        if any(isinstance(x, tuple) or x == "s" for x in t):
            return None
        tok.append([l for l, x in zip(ls, t) if x is not None])
        tags.append(dict(zip(ls, t)))
    if len(tok[0]) != 2 or len(tok[1]) != 2:
        return None
    shared = [l for l in tok[0] if l in tok[1]]
    if len(shared) != 1 or shared[0] in out_letters:
        return None
    k = shared[0]
    x = next(l for l in tok[0] if l != k)
    y = next(l for l in tok[1] if l != k)
    if x == y or x not in out_letters or y not in out_letters:
        return None
    la, lb = letters
    batch = [l for l in dict.fromkeys(la + lb) if l not in (x, y, k)]
    if any(l not in la or l not in lb for l in batch):
        return None
    if any(s.gshape(a)[ls.index(l)] != s.n for a, ls, l in ((operands[0], la, x), (operands[0], la, k),
                                                             (operands[1], lb, y), (operands[1], lb, k))):
        return None
    incoming = tags[0][k] == "r" and tags[0][x] == "c" and tags[1][k] == "r" and tags[1][y] == "c"
    direction = "incoming" if incoming else "outgoing"
    want = {"outgoing": ({x: "r", k: "c"}, {y: "r", k: "c"}), "incoming": ({x: "c", k: "r"}, {y: "c", k: "r"})}
    vals = [s.to_tags(a, tuple(w.get(l) for l in ls)) for a, ls, w in zip(operands, letters, want[direction])]
    s.note("ring", f"triangle contraction over token letter {k!r} ({direction}, Cannon ring)")
    out = s.emit(T.pair_contract, vals[0], vals[1], la, lb, out_letters, "".join(batch), x, y, k, direction,
                 _val(node).dtype)
    return out, tuple("r" if l == x else ("c" if l == y else None) for l in out_letters)


def _msa_contract(s: _Sharder, node, operands, letters, out_letters):
    """``sum_q A[.., q, x] B[.., q, y]`` where both operands are MSA tiles sharing the summed
    MSA letter ``q`` (tag ``s``) and ``x`` / ``y`` are their token letters, both in the
    output -- the outer product mean (``einsum("bsid,bsje->bijde", a, b)``): every rank's
    output tile needs a whole MSA column of both, so a local partial cannot do it and
    gathering costs O(S N / p) per operand. It runs on the sequence-block ring
    (:func:`tile_ops.msa_contract`). Returns ``(out, out_tags)`` or None when it does not fit."""
    if len(operands) != 2 or len(set(out_letters)) != len(out_letters):
        return None
    qs, toks = [], []
    for a, ls in zip(operands, letters):
        t = s.tg(a)
        if t is None or len(t) != len(ls) or len(set(ls)) != len(ls) or any(isinstance(v, tuple) for v in t):
            return None
        sq = [l for l, v in zip(ls, t) if v == "s"]
        tk = [l for l, v in zip(ls, t) if v in ("r", "c")]
        if len(sq) > 1 or len(tk) != 1:
            return None
        qs.append(sq[0] if sq else None)
        toks.append(tk[0])
    # the summed MSA letter: split on the rows in one operand at least; the other may hold it
    # whole (a token mask expanded over the MSA rows), then it is sliced to S_r (free)
    q = qs[0] or qs[1]
    if q is None or any(qq not in (None, q) for qq in qs) or any(q not in ls for ls in letters):
        return None
    (x, y) = toks
    if q in out_letters or x == y or x not in out_letters or y not in out_letters:
        return None
    la, lb = letters
    if s.gshape(operands[0])[la.index(q)] != s.gshape(operands[1])[lb.index(q)]:
        return None
    if s.gshape(operands[0])[la.index(x)] != s.n or s.gshape(operands[1])[lb.index(y)] != s.n:
        return None
    vals = [s.to_tags(a, tuple({q: "s", tok: "c"}.get(l) for l in ls))
            for a, ls, tok in zip(operands, letters, (x, y))]
    s.note("ring", f"contraction over the MSA letter {q!r} (outer product mean, sequence-block ring)")
    out = s.emit(T.msa_contract, vals[0], vals[1], la, lb, out_letters, x, y, q, _val(node).dtype)
    return out, tuple("r" if l == x else ("c" if l == y else None) for l in out_letters)


def _pair_msa_contract(s: _Sharder, node, operands, letters, out_letters):
    """``sum_j W[.., i, j] M[.., q, j, ..]`` where ``W`` is a pair tensor (token letters ``i``,
    ``j``), ``M`` an MSA tensor (MSA letter ``q`` on the rows, token letter ``j``), ``j`` summed
    and ``i``, ``q`` kept -- pair-weighted averaging (``einsum("bhij,bhsjd->bhsid", w, v)``):
    each output tile needs a whole block row of ``W`` and a whole MSA row block of ``M``, so a
    partial sum cannot do it and a gather costs O(N^2/p). It runs on a ring
    (:func:`tile_ops.pair_msa_contract`); the result is an MSA tile (``q`` on ``S_r``, ``i`` on
    ``T_c``). Returns ``(out, out_tags)`` or None when it does not fit."""
    if len(operands) != 2 or len(set(out_letters)) != len(out_letters):
        return None
    info = []
    for a, ls in zip(operands, letters):
        t = s.tg(a)
        if t is None or len(t) != len(ls) or len(set(ls)) != len(ls) or any(isinstance(v, tuple) for v in t):
            return None
        info.append(([l for l, v in zip(ls, t) if v == "s"], [l for l, v in zip(ls, t) if v in ("r", "c")]))
    kinds = ["msa" if len(sq) == 1 and len(tk) == 1 else ("pair" if not sq and len(tk) == 2 else None)
             for sq, tk in info]
    if sorted(kinds, key=str) != ["msa", "pair"]:
        return None
    mi = kinds.index("msa")
    wi = 1 - mi
    (q,), (j,) = info[mi]
    if j not in info[wi][1] or j in out_letters or q not in out_letters:
        return None
    i = next(l for l in info[wi][1] if l != j)
    lm, lw = letters[mi], letters[wi]
    if i not in out_letters or i in lm or q in lw:
        return None
    if any(s.gshape(a)[ls.index(l)] != s.n for a, ls, l in ((operands[mi], lm, j), (operands[wi], lw, i),
                                                             (operands[wi], lw, j))):
        return None
    vm = s.to_tags(operands[mi], tuple({q: "s", j: "c"}.get(l) for l in lm))
    vw = s.to_tags(operands[wi], tuple({i: "r", j: "c"}.get(l) for l in lw))
    s.note("ring", f"contraction of a pair and an MSA tensor over token letter {j!r} (pair-weighted averaging, ring)")
    eq = f"{letters[0]},{letters[1]}->{out_letters}"
    out = s.emit(T.pair_msa_contract, vm, vw, eq, mi == 0, q, i, j, lm.index(j), lw.index(j), _val(node).dtype)
    return out, tuple("s" if l == q else ("c" if l == i else None) for l in out_letters)


class _EmitFn:
    """Adapts a graph-emitting lambda to a runtime callable (the op itself)."""

    def __init__(self, emit_fn, s):
        self.op = getattr(emit_fn, "op", None)
        self.extra = getattr(emit_fn, "extra", ())

    def __call__(self, *operands):
        return self.op(*operands, *self.extra)

    def __repr__(self):
        return f"EmitFn({self.op})"


class _OpEmit:
    def __init__(self, s, op, extra=()):
        self.s, self.op, self.extra = s, op, tuple(extra)

    def __call__(self, *vals):
        return self.s.emit(self.op, *vals, *self.extra)


_LET = "abcdefghijklmnopqrstuvwxyz"


@rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _mm(s, node):
    a, b = node.args[0], node.args[1]
    na, nb = len(s.gshape(a)), len(s.gshape(b))
    if node.target == aten.matmul.default and (na < 2 or nb < 2):
        return _fallback(s, node, "matmul with a vector operand")
    nbat = max(na, nb) - 2
    bat = _LET[:nbat]
    la = bat[nbat - (na - 2):] + "MK"
    lb = bat[nbat - (nb - 2):] + "KN"
    lo = bat + "MN"
    out, ot = _letters_contract(s, node, [a, b], [la, lb], lo, _OpEmit(s, node.target))
    s.set(node, out, ot)


@rule(aten.cdist.default, aten._euclidean_dist.default, aten._cdist_forward.default)
def _pairwise_dist(s, node):
    """``torch.cdist(x1, x2)`` of two token tensors ``[.., N, M]`` (e.g. Boltz's distances of
    representative atoms): a pair tensor. x1's token dim goes to the mesh rows, x2's to the
    columns (an O(N) redistribution), and each rank computes its ``[b, b]`` tile -- instead
    of gathering both and holding the whole ``[N, N]`` (and what is built from it) on every
    rank."""
    x1, x2 = node.args[0], node.args[1]
    t1, t2 = s.tg(x1), s.tg(x2)
    ok = (t1 is not None and t2 is not None and len(t1) == len(t2) >= 2
          and t1[-2] in ("r", "c") and t2[-2] in ("r", "c")
          and all(t is None for t in (*t1[:-2], t1[-1], *t2[:-2], t2[-1]))
          and s.gshape(x1)[-2] == s.n and s.gshape(x2)[-2] == s.n)
    if not ok:
        return _fallback(s, node)
    lead = (None,) * (len(t1) - 2)
    a, b = s.to_tags(x1, lead + ("r", None)), s.to_tags(x2, lead + ("c", None))
    s.set(node, s.emit(node.target, a, b, *node.args[2:]), lead + ("r", "c"))


@rule(aten.linear.default)
def _linear(s, node):
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    t = s.tg(x)
    if t[-1] is not None:
        xv, t = _whole_dims(s, x, {len(t) - 1})
    else:
        xv = s.env[x]
    args = [xv, s.full(w)] + ([s.full(bias)] if isinstance(bias, fx.Node) else ([bias] if bias is not None else []))
    s.set(node, s.emit(node.target, *args), tuple(t[:-1]) + (None,))


@rule(aten.addmm.default, aten.baddbmm.default)
def _addmm(s, node):
    c, a, b = node.args[:3]
    beta = node.kwargs.get("beta", 1)
    alpha = node.kwargs.get("alpha", 1)
    op = aten.mm.default if node.target == aten.addmm.default else aten.bmm.default
    na = len(s.gshape(a))
    la, lb, lo = (("MK", "KN", "MN") if na == 2 else ("bMK", "bKN", "bMN"))
    prod, ot = _letters_contract(s, node, [a, b], [la, lb], lo, _OpEmit(s, op))
    cs = s.gshape(c)
    off = len(ot) - len(cs)
    ct = tuple(ot[off + j] if sz == _val(node).shape[off + j] else None for j, sz in enumerate(cs))
    cv = s.to_tags(c, ct)
    if alpha != 1:
        prod = s.emit(torch.mul, prod, alpha)
    if beta != 1:
        cv = s.emit(torch.mul, cv, beta)
    s.set(node, s.emit(torch.add, cv, prod), ot)


@rule(aten.einsum.default)
def _einsum(s, node):
    eq, ops = node.args[0], list(node.args[1])
    spec = einsum_letters(eq, [len(s.gshape(a)) for a in ops])
    if spec is None:
        return _fallback(s, node, "einsum with an implicit output")
    letters, rhs = spec
    eq = ",".join(letters) + "->" + rhs
    out, ot = _letters_contract(s, node, ops, letters, rhs, _EinsumEmit(s, eq))
    s.set(node, out, ot)


class _EinsumEmit:
    def __init__(self, s, eq):
        self.s, self.eq = s, eq
        self.op = _einsum_rt(eq)
        self.extra = ()

    def __call__(self, *vals):
        return self.s.emit(aten.einsum.default, self.eq, list(vals))


class _einsum_rt:
    def __init__(self, eq):
        self.eq = eq

    def __call__(self, *vals):
        return torch.einsum(self.eq, *vals)


@rule(aten.scaled_dot_product_attention.default)
def _sdpa(s, node):
    q, k, v = node.args[:3]
    kw = dict(node.kwargs)
    names = ["attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    for i, a in enumerate(node.args[3:]):
        kw[names[i]] = a
    mask = kw.get("attn_mask")
    try:  # a triangle attention: the ring (O(N^2/P)) rather than keys gathered along their axis
        sp, key = match_sdpa(node, s._match_layout)
    except AttentionMismatch:
        sp = None
    if sp is not None:
        return s.ring_attention(node, sp, key)
    if kw.get("enable_gqa"):
        return _fallback(s, node, "grouped-query attention")
    qs, ks = s.gshape(q), s.gshape(k)
    nb = len(qs) - 2
    bat = _LET[:nb]
    lq, lk, lv = bat + "LE", bat[nb - (len(ks) - 2):] + "SE", bat[nb - (len(s.gshape(v)) - 2):] + "SF"
    ops, lets = [q, k, v], [lq, lk, lv]
    if isinstance(mask, fx.Node):
        ms = s.gshape(mask)
        ops.append(mask)
        lets.append((bat + "LS")[len(bat) + 2 - len(ms):])
    # tags per letter (like a contraction with outputs bat+L+F and S summed)
    sizes = {}
    for a, ls in zip(ops, lets):
        for l, sz in zip(ls, s.gshape(a)):
            sizes[l] = max(sizes.get(l, 1), sz)
    chosen = {}
    used = set()
    for l in bat + "LS":
        c = [(_numel(s.gshape(a)), t) for a, ls in zip(ops, lets) for ll, sz, t in zip(ls, s.gshape(a), s.tg(a))
             if ll == l and t is not None and sz == sizes[l] and not isinstance(t, tuple)]
        pick = None
        for t in [t for _, t in sorted(c, key=lambda x: -x[0])] + [T._swap(t) for _, t in c]:
            if _axis(t) not in used:
                pick = t
                break
        chosen[l] = pick
        if pick is not None:
            used.add(_axis(pick))
    chosen["E"] = chosen["F"] = None
    vals = [s.to_tags(a, tuple(chosen[l] if sz == sizes[l] else None for l, sz in zip(ls, s.gshape(a))))
            for a, ls in zip(ops, lets)]
    ot = tuple(chosen[l] for l in bat + "LF")
    mv = vals[3] if len(vals) > 3 else mask
    if chosen["S"] is None:
        kw2 = dict(kw)
        if isinstance(mask, fx.Node):
            kw2["attn_mask"] = mv
        s.set(node, s.emit(node.target, vals[0], vals[1], vals[2], **kw2), ot)
        return
    s.note("all-reduce", "attention over sharded keys (distributed softmax)")
    out = s.emit(T.sdpa_keys_sharded, vals[0], vals[1], vals[2], mv if isinstance(mask, fx.Node) else mask,
                 kw.get("scale"), chosen["S"], kw.get("dropout_p", 0.0), kw.get("is_causal", False))
    s.set(node, out, ot)


# ----------------------------------------------------------------------------- indexing
@rule(aten.embedding.default)
def _embedding(s, node):
    w, idx = node.args[0], node.args[1]
    it = s.tg(idx)
    iv = s.emit(T.zero_pad_index, s.env[idx], it) if any(t is not None for t in it) else s.env[idx]
    s.set(node, s.emit(node.target, s.full(w), iv, *node.args[2:]), tuple(it) + (None,))


@rule(aten.one_hot.default)
def _one_hot(s, node):
    x = node.args[0]
    it = s.tg(x)
    iv = s.emit(T.zero_pad_index, s.env[x], it) if any(t is not None for t in it) else s.env[x]
    s.set(node, s.emit(node.target, iv, *node.args[1:], **node.kwargs), tuple(it) + (None,))


@rule(aten.index_select.default)
def _index_select(s, node):
    x, dim, idx = node.args
    nd = len(s.gshape(x))
    dim = dim % nd
    tx, it = s.tg(x), s.tg(idx)
    if tx[dim] is not None and not isinstance(tx[dim], tuple) and all(v is None for v in it):
        # rows of a sharded axis picked by a whole index: owners contribute + all-reduce (no gather)
        ot = tuple(None if i == dim else v for i, v in enumerate(tx))
        s.note("narrow", f"index_select of sharded dim {dim} (owner ranks + all-reduce)")
        s.set(node, s.emit(T.index_select_global, s.env[x], dim, tx[dim], s.env[idx]), ot, alias=False)
        return
    xv, nt = _whole_dims(s, x, {dim})
    it = s.tg(idx)
    ot = list(nt)
    ot[dim] = it[0]
    if ot[dim] is not None and any(o is not None and _axis(o) == _axis(ot[dim]) for i, o in enumerate(ot) if i != dim):
        iv = s.full(idx)
        ot[dim] = None
    else:
        iv = s.emit(T.zero_pad_index, s.env[idx], it) if it[0] is not None else s.env[idx]
    s.set(node, s.emit(node.target, xv, dim, iv), tuple(ot))


@rule(aten.gather.default)
def _gather(s, node):
    x, dim, idx = node.args[:3]
    nd = len(s.gshape(x))
    dim = dim % nd
    it = s.tg(idx)
    xs, ish = s.gshape(x), s.gshape(idx)
    xt = tuple(None if (i == dim or xs[i] != ish[i]) else it[i] for i in range(nd))
    if any(it[i] is not None and xt[i] is None and i != dim for i in range(nd)):
        iv = s.full(idx)
        it = (None,) * nd
        xt = (None,) * nd
    else:
        iv = s.emit(T.zero_pad_index, s.env[idx], it) if any(t is not None for t in it) else s.env[idx]
    s.set(node, s.emit(node.target, s.to_tags(x, xt), dim, iv, *node.args[3:], **node.kwargs), tuple(it))


@rule(aten.index.Tensor)
def _index(s, node):
    x, indices = node.args[0], list(node.args[1])
    xs, xt = s.gshape(x), s.tg(x)
    pos = [i for i, a in enumerate(indices) if a is not None]
    idx_nodes = [indices[i] for i in pos]
    if not pos or any(_val(a).dtype == torch.bool for a in idx_nodes):
        return _fallback(s, node, "boolean-mask indexing")
    consecutive = pos == list(range(pos[0], pos[-1] + 1))
    # broadcast tags of the index tensors
    bshape = torch.broadcast_shapes(*[tuple(_val(a).shape) for a in idx_nodes])
    bt, targets = _broadcast_tags(s, tuple(bshape), idx_nodes)
    rest = [xt[i] for i in range(len(xs)) if i not in pos]
    if consecutive:
        ot = list(xt[:pos[0]]) + list(bt) + list(xt[pos[-1] + 1:])
    else:
        ot = list(bt) + rest
    ot2 = s.fix_axes(ot)
    if tuple(ot2) != tuple(ot):
        # index tags clash with x's remaining tags: make the indices whole
        targets = [(None,) * len(s.gshape(a)) for a in idx_nodes]
        bt = (None,) * len(bshape)
        ot = list(xt[:pos[0]]) + list(bt) + list(xt[pos[-1] + 1:]) if consecutive else list(bt) + rest
    xv = s.to_tags(x, tuple(None if i in pos else t for i, t in enumerate(xt)))
    ivals = []
    for a, tt in zip(idx_nodes, targets):
        v = s.to_tags(a, tt)
        if any(t is not None for t in tt):
            v = s.emit(T.zero_pad_index, v, tt)
        ivals.append(v)
    new_idx = list(indices)
    for i, v in zip(pos, ivals):
        new_idx[i] = v
    s.set(node, s.emit(node.target, xv, new_idx), tuple(ot))


@rule(aten.flatten.using_ints, aten.unflatten.int)
def _flatten(s, node):
    """flatten(start, end) / unflatten(dim, sizes) as the view it is (merged token axes keep a
    merged tag; a channel dim split in place)."""
    x = node.args[0]
    out_shape = tuple(int(v) for v in _val(node).shape)
    in_shape, tags = s.gshape(x), s.tg(x)
    ot = _view_tags(s, in_shape, tags, out_shape) if any(t is not None for t in tags) else (None,) * len(out_shape)
    if ot is None:
        return _fallback(s, node, f"{node.target.overloadpacket.__name__} splits a sharded axis")
    xv = s.env[x]
    s.set(node, s.emit(aten.reshape.default, xv, s.local_shape(out_shape, ot)), ot)


@rule(aten.repeat_interleave.self_int)
def _repeat_interleave(s, node):
    """repeat_interleave(x, repeats, dim): tile-local along a whole dim (Boltz's
    ``multiplicity`` copies of the batch dim); along a sharded dim: that dim made whole."""
    x = node.args[0]
    t = s.tg(x)
    d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if d is None:
        return _fallback(s, node, "repeat_interleave over the flattened tensor")
    d = d % len(t)
    xv, nt = _whole_dims(s, x, {d}) if t[d] is not None else (s.env[x], t)
    s.set(node, s.emit(node.target, xv, *node.args[1:], **node.kwargs), nt)


@rule(aten.constant_pad_nd.default, aten.repeat.default)
def _pad_repeat(s, node):
    x = node.args[0]
    t = s.tg(x)
    if node.target == aten.constant_pad_nd.default:
        pad = node.args[1]
        nd = len(t)
        dims = {nd - 1 - i // 2 for i, v in enumerate(pad) if v != 0}
    else:
        reps = list(node.args[1])
        nd = len(reps)
        off = nd - len(t)
        dims = {i - off for i, r in enumerate(reps) if r != 1 and i >= off}
        if off:
            return _fallback(s, node, "repeat adding leading dims")
    xv, nt = _whole_dims(s, x, dims) if any(t[d] is not None for d in dims) else (s.env[x], t)
    s.set(node, s.emit(node.target, xv, *node.args[1:], **node.kwargs), nt)


# ----------------------------------------------------------------------------- opaque calls, HOPs
class _CallSpec:
    def __init__(self, spec, tidx, consts):
        self.spec, self.tidx, self.consts = spec, tidx, consts


def invoke_opaque(module, call, *tensors):
    """Call a replaced module like the original was called (recorded non-tensor arguments
    + local tiles); return the flat list of its tensor outputs."""
    spec, tidx, consts = call.spec, call.tidx, call.consts
    leaves = list(consts)
    for i, t in zip(tidx, tensors):
        leaves[i] = t
    a, kw = tree_unflatten(leaves, spec)
    out = module(*a, **kw)
    flat, _ = tree_flatten(out)
    return [x for x in flat if isinstance(x, torch.Tensor)]


def _opaque(s: _Sharder, node):
    from .trace import OPAQUE_OP  # noqa: F401 -- the op this rule is registered for

    entry = rec(node).opaque
    key, tensors = node.args[0], list(node.args[1])
    in_t = [s.tg(a) for a in tensors]
    res = s.resolver(entry, in_t)
    want, out_tags = res["in_tags"], res["out_tags"]
    vals = [s.to_tags(a, tuple(w) if w is not None else s.tg(a)) for a, w in zip(tensors, want)]
    k = len(s.op_keys)
    s.op_keys.append(entry)
    mod = s.emit(operator.getitem, s.ops_ph, k)
    out = s.emit(invoke_opaque, mod, s.const(_CallSpec(*entry.last_call)), *vals)
    s.set(node, out, [tuple(t) if t is not None else None for t in out_tags])


def register_opaque_rule():
    from .trace import OPAQUE_OP

    RULES[OPAQUE_OP] = _opaque


def _run_sub(call, *args):
    return call(*args)


class _SubProgram:
    """Runs a sharded sub-graph (an autocast / grad-mode region) under its context."""

    def __init__(self, prog: TileProgram, kind: str, ctx_args):
        self.prog, self.kind, self.ctx_args = prog, kind, ctx_args

    def __call__(self, *args):
        if self.kind == "autocast":
            device, dtype, enabled, cache = self.ctx_args
            with torch.autocast(device_type=device, dtype=dtype, enabled=enabled, cache_enabled=cache):
                return self.prog.gm(None, *args)
        (enabled,) = self.ctx_args
        with torch.set_grad_enabled(enabled):
            return self.prog.gm(None, *args)


def _hop(kind, n_ctx):
    def fn(s: _Sharder, node):
        sub_node = node.args[n_ctx]
        sub = getattr(s.src, sub_node.target)
        operands = list(node.args[n_ctx + 1:])
        in_t = [s.tg(a) for a in operands]
        prog = _Sharder(sub, in_t, n=s.n, n_seq=s.n_seq, p=s.p, resolver=s.resolver, strict=s.strict,
                        what=s.what).run()
        if prog.op_keys:
            s.refuse("a matched module inside an autocast/no-grad region", "Fix: move the module call out of "
                     "the region or register the enclosing module.")
        s.notes.extend(prog.notes)
        call = _SubProgram(prog, kind, tuple(node.args[:n_ctx]))
        out = s.emit(_run_sub, s.const(call), *[s.env[a] for a in operands])
        s.set(node, out, list(prog.out_tags))

    return fn


RULES["wrap_with_autocast"] = _hop("autocast", 4)
RULES["wrap_with_set_grad_enabled"] = _hop("grad", 1)


# ----------------------------------------------------------------------------- entry point
def shard_graph(gm: fx.GraphModule, in_tags, *, n: int, n_seq: Optional[int], p: int, resolver: Callable,
                strict: bool = False, what: str = "the model") -> TileProgram:
    """Emit the tile program of ``gm`` (see the module docstring). ``in_tags``: tags of
    the *user* placeholders (the last ``len(in_tags)`` placeholders; the ones before are
    parameters/buffers/constants, replicated). ``resolver(entry, input_tags) ->
    {"in_tags": [...], "out_tags": [...]}`` for opaque nodes."""
    register_opaque_rule()
    return _Sharder(gm, in_tags, n=n, n_seq=n_seq, p=p, resolver=resolver, strict=strict, what=what).run()
