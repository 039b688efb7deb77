"""Structural rewrite: run an UNREGISTERED module's own ATen graph on local tiles.

Requires: a module that the first compile round matched structurally (a contraction over
a token axis between two pair-derived tensors -- :func:`autocp.passes.match.rule_triangle_mult`
-- or a triangle attention -- :func:`autocp.passes.match._rule_attention`),
the call it receives (``OpaqueEntry.last_call`` / ``in_meta`` from the fallback capture),
the layouts of its tensor inputs and the global token count N.

Guarantees: :func:`build_tile_program` returns a :class:`TileProgram` -- the module's
``torch.export`` graph (captured alone, at global N) transformed to run on this rank's
tiles -- or raises :class:`StructuralRewriteError` saying which node cannot run on tiles
(then the caller falls back to gather, or raises under ``strict=True``):

* every tile-local node (LayerNorm / Linear on channels, sigmoid, masks, chunk/split on
  channels, permutes, views) is kept;
* token-axis shape constants (``view`` / ``reshape`` / ``expand`` / ``new_zeros`` /
  ``zeros`` / ``full`` / ``rand`` ... arguments equal to N on a dim whose analysed layout
  is a token axis) are rewritten to the block size ``b = ceil(N / p)`` -- the idea of
  PyTorch's ``torch/distributed/tensor/parallel/_tp_transform.py``;
* each matched contraction node (``einsum`` / ``matmul`` / ``bmm`` / ``mm``, after
  whatever permutes and views) is replaced by :func:`tile_contract`: its two operands are
  permuted to canonical channel-first tiles, their padded token slots zeroed (the model
  need not mask them), and contracted by the distributed Cannon ring
  (:func:`autocp.ops.triangle_mult.trimul_contract`; column-token axis contracted:
  outgoing, row-token axis: incoming), the result permuted back to the node's output
  order and dtype;
* shape/dtype assertion nodes of the capture are dropped.

* each triangle attention -- softmax over a token axis of ``mult * (q . k) + triangle bias
  [j, k] + key mask [i, k]`` (additive or ``masked_fill``), then ``@ v`` -- is replaced by
  :func:`tile_attention` (q, k, v, bias and mask nodes stay tile-local; the ring attention
  of :mod:`autocp.ops.triangle_attn` runs the keys over all N tokens); see
  :func:`_attention_spec` for what fits.

Any other node that needs a full tensor (a softmax that is not such an attention,
token-axis slicing, ``arange`` over tokens, ...) makes the build fail with that node's
name and reason.

:class:`StructuralOp` is the drop-in module: same children / parameters / ``state_dict``
keys as the original (shared objects), reads the global N from
:func:`autocp.passes.context.current`, re-captures per distinct global N (cached, shared
by all instances of the same module type and call signature).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .export import export
from .analyze import Analysis, analyze_graph
from .match import INPLACE_FORMS, ancestors_until, is_contraction, n_token_tags, rule_triangle_mult
from .tags import op_name as _name
from .trace import BoundCall, example_like, param_sig
from .wrapper import ModuleWrapper
from .record import put, rec

__all__ = ["StructuralRewriteError", "TileProgram", "build_tile_program", "StructuralOp", "tile_contract",
           "tile_attention", "pack_kv", "attention_nodes", "match_attention", "match_sdpa", "fill_nodes", "einsum_letters",
           "live_counts"]


class StructuralRewriteError(RuntimeError):
    """The module's graph contains a node that cannot run on tiles (message says which)."""


# ops whose argument ``idx`` is a shape list with one entry per output dim
SHAPE_ARGS = {"view": 1, "reshape": 1, "_unsafe_view": 1, "expand": 1, "new_zeros": 1, "new_ones": 1,
              "new_empty": 1, "new_full": 1, "zeros": 0, "ones": 0, "empty": 0, "full": 0, "rand": 0,
              "randn": 0, "broadcast_to": 1}
DROP = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}
TOKEN = ("r", "c")
_LETTERS = "ABCDEFGHLMNOPQ"


@dataclass
class _ContractSpec:
    x_operand: int  # which operand (0/1) holds the first output token letter
    perm_x: list
    perm_y: list
    perm_out: list  # canonical [batch.., x, y] -> the node's output order
    direction: str
    detail: str


@dataclass
class TileProgram:
    gm: torch.fx.GraphModule
    input_specs: list  # [(kind, target)] in placeholder order: PARAMETER/BUFFER/CONSTANT_TENSOR/USER_INPUT
    constants: dict
    out_spec: Any
    n: int
    p: int
    contractions: list = field(default_factory=list)  # [(node name, direction, detail)]
    shape_rewrites: list = field(default_factory=list)  # [node name]
    attentions: list = field(default_factory=list)  # [(softmax node name, kind, detail)]
    specs: list = field(default_factory=list)  # the attention specs its nodes refer to by key (kept alive here)


# ----------------------------------------------------------------------------- the runtime primitive
def tile_contract(a: torch.Tensor, b: torch.Tensor, x_operand: int, perm_x, perm_y, perm_out, direction: str,
                  out_dtype: torch.dtype):
    """The distributed replacement of one matched contraction node, on local tiles.

    ``a``, ``b``: the node's operands (this rank's tiles). The operand holding the first
    output token letter ``x`` is permuted by ``perm_x`` to ``[batch.., x, k]`` (outgoing)
    or ``[batch.., k, x]`` (incoming), the other by ``perm_y`` likewise -- both canonical
    Pair2D tiles ``[.., T_r, T_c]`` --, padded token slots are zeroed, the Cannon ring
    contracts ``k`` over all N tokens, and ``perm_out`` puts ``[batch.., x, y]`` back in
    the node's output order.
    """
    from ..ops.common import TileCtx
    from ..ops.triangle_mult import trimul_contract
    from .context import current

    info = current()
    mesh, n = info.mesh, info.n
    xs, ys = (a, b) if x_operand == 0 else (b, a)
    x = xs.permute(perm_x).float()
    y = ys.permute(perm_y).float()
    ctx = TileCtx(mesh, n)
    if x.shape != y.shape or x.shape[-1] != ctx.b or x.shape[-2] != ctx.b:
        raise StructuralRewriteError(
            f"autocp structural contraction: operand tiles {tuple(x.shape)} / {tuple(y.shape)}; required two equal "
            f"[..., {ctx.b}, {ctx.b}] tiles (b = ceil(N={n} / p={mesh.p})). Fix: register the module with "
            f"autocp.register_module(cls, op_factory).")
    if n != ctx.b * mesh.p:  # the op zeroes its own padding: the model may not mask it
        valid = ctx.pair_valid(x.device).to(x.dtype)
        x = x * valid
        y = y * valid
    out = trimul_contract(x.contiguous(), y.contiguous(), mesh, direction)
    return out.permute(perm_out).to(out_dtype)


# ----------------------------------------------------------------------------- triangle attention
#: an additive mask term / masked_fill value must be at most this (a "huge negative"): masked
#: keys then get exactly zero weight in fp32, as in the ring's key mask
MASK_NEG = -1e4
#: key -> matched attention spec, for the graph nodes that name it by key; held weakly (the
#: tile program that embeds a key keeps its spec in ``specs``), so dropped programs free them
_ATTN_SPECS = weakref.WeakValueDictionary()
_SPEC_KEYS = itertools.count()


def _register_spec(sp) -> int:
    key = next(_SPEC_KEYS)
    _ATTN_SPECS[key] = sp
    return key
_CASTS = {"to", "_to_copy", "clone", "alias", "contiguous", "type_as", "float"}
_SHAPE_ONLY = {"new_ones", "new_zeros", "new_full", "new_empty", "ones_like", "zeros_like", "full_like",
               "empty_like", "sym_size", "size"}


@dataclass
class _AttnSpec:
    """Letters of one matched triangle attention (see :func:`_attention_spec`)."""

    qk: Any  # the q.k node
    sm: Any  # the softmax node
    av: Any  # the attn @ v node
    covered: list  # nodes replaced (qk .. av)
    q: Any
    k: Any
    v: Any
    lq: str  # letters of q / k / v operands (v: logits letters + the value letter)
    lk: str
    lv: str
    lout: str  # letters of av's output
    i: str  # row letter (token axis shared by q and k: independent rows)
    j: str  # query letter
    kk: str  # key letter
    d: str  # q.k contracted letter
    e: str  # value letter
    bm: list  # batch letters the mask varies along (ring B)
    hm: list  # other batch letters (ring H)
    qk_mult: float
    biases: list  # [(node, letters aligned with the node's dims ('' = broadcast), mult)]
    masks: list  # [("add" | "fill" | "keep", node, letters, mult or fill value or (fill node, mult))]
    transposed: bool  # keys along the row-token axis (ending node): transposed mesh view
    out_dtype: Any
    detail: str
    term_tags: dict = field(default_factory=dict)  # bias / mask node -> the tags it must have
    term_narrow: dict = field(default_factory=dict)  # bias node -> a broadcast dim to take index 0 of


def _scalar(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _align(node, letters: str, shape) -> str:
    """Letters of ``node``'s dims, right-aligned against ``letters`` / ``shape`` (the logits);
    '' marks a broadcast (size-1 against a larger) dim."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        raise StructuralRewriteError(f"attention term {node.name} is not a tensor")
    if v.dim() > len(letters):
        raise StructuralRewriteError(f"attention term {node.name} has more dims than the scores")
    off = len(letters) - v.dim()
    out = []
    for d, s in enumerate(v.shape):
        full = shape[off + d]
        if s == full:
            out.append(letters[off + d])
        elif s == 1:
            out.append("")
        else:
            raise StructuralRewriteError(f"attention term {node.name} of shape {tuple(v.shape)} does not broadcast "
                                         f"to the scores {tuple(shape)}")
    return "".join(l or "." for l in out)


def _reaches_contraction(node, limit=16) -> bool:

    return any(is_contraction(a) for a in ancestors_until(node, is_contraction, limit=limit))


def broadcast_dim(node, d: int, depth: int = 12) -> bool:
    """True when ``node``'s values provably do not change along dim ``d``: the dim was made
    by an ``expand`` of size 1 (through views, reshapes that merge it only with size-1 dims,
    unsqueeze, permute, clone / casts). E.g. einops ``repeat(bias, 'b ... -> (b r) ...')``
    with b = 1."""
    v = node.meta.get("val")
    if depth <= 0 or not isinstance(v, torch.Tensor) or node.op != "call_function":
        return False
    d = d % v.dim()
    nm = _name(node.target)
    a0 = node.args[0] if node.args else None
    if not isinstance(a0, torch.fx.Node) or not isinstance(a0.meta.get("val"), torch.Tensor):
        return False
    src = a0.meta["val"]
    if nm in ("expand", "expand_copy"):
        off = v.dim() - src.dim()
        if d < off:
            return True
        return src.shape[d - off] == 1 or broadcast_dim(a0, d - off, depth - 1)
    if nm in _CASTS:
        return broadcast_dim(a0, d, depth - 1)
    if nm == "unsqueeze":
        u = node.args[1] % v.dim()
        return d == u or broadcast_dim(a0, d - (d > u), depth - 1)
    if nm == "permute":
        return broadcast_dim(a0, list(node.args[1])[d] % v.dim(), depth - 1)
    if nm in ("view", "reshape", "_unsafe_view"):
        # the input dims whose product is output dim d (ignoring size-1 factors)
        out_shape, in_shape = list(v.shape), list(src.shape)
        i = j = 0
        while i < len(out_shape) or j < len(in_shape):
            if i < len(out_shape) and out_shape[i] == 1 and i != d:
                i += 1
                continue
            if j < len(in_shape) and in_shape[j] == 1:
                j += 1
                continue
            if i >= len(out_shape) or j >= len(in_shape):
                return False
            if out_shape[i] == in_shape[j]:
                if i == d:
                    return broadcast_dim(a0, j, depth - 1)
                i += 1
                j += 1
                continue
            return False  # a real merge / split: not followed
        return False
    return False


def _has_param_ancestor(node, limit=64) -> bool:
    work, seen = [node], set()
    while work and len(seen) < 4096:
        nd = work.pop()
        if nd in seen:
            continue
        seen.add(nd)
        if nd.op == "placeholder" and rec(nd).param:
            return True
        if nd.op == "call_function" and _name(nd.target) in _SHAPE_ONLY:
            continue  # reads only the shape / dtype of its tensor argument
        work.extend(nd.all_input_nodes)
    return False


def _layout_meta(node):
    return rec(node).layout


def _walk_scores(sm, where):
    """From the softmax input back to the q.k contraction: ``(qk, chain, mult, terms, fills)``
    (scalar scales, additive terms, masked_fill); raises when a step does not fit."""

    mult, terms, fills, chain = 1.0, [], [], []
    cur = sm.args[0]
    while True:
        if not isinstance(cur, torch.fx.Node) or cur.op != "call_function":
            raise StructuralRewriteError(f"{where}: no q.k contraction feeds it")
        nm = _name(cur.target)
        if is_contraction(cur):
            return cur, chain, mult, terms, fills
        if nm in INPLACE_FORMS:
            # ``scores += bias`` (e.g. SDPA's math path: ``attn.add_(attn_mask)``): the same
            # term as the out-of-place op when the scores are the tensor written into (and
            # nothing else reads them: checked when the walk moves on to them)
            if not (isinstance(cur.args[0], torch.fx.Node) and _reaches_contraction(cur.args[0])):
                raise StructuralRewriteError(f"{where}: {cur.name} ({nm}) writes a score term into a "
                                             f"non-score tensor (not supported)")
            nm = nm[:-1]
        if len(cur.users) != 1:
            raise StructuralRewriteError(f"{where}: the scores {cur.name} are used elsewhere (not rewritten)")
        chain.append(cur)
        a = cur.args
        if nm in _CASTS:
            cur = a[0]
        elif nm in ("mul", "div") and len(a) == 2 and _scalar(a[1]) and isinstance(a[0], torch.fx.Node):
            mult = mult * float(a[1]) if nm == "mul" else mult / float(a[1])
            cur = a[0]
        elif nm == "mul" and len(a) == 2 and _scalar(a[0]):
            mult, cur = mult * float(a[0]), a[1]
        elif nm in ("add", "sub") and len(a) == 2 and all(isinstance(x, torch.fx.Node) for x in a) \
                and cur.kwargs.get("alpha", 1) == 1:
            on = [_reaches_contraction(x) for x in a]
            if on[0] == on[1]:
                raise StructuralRewriteError(f"{where}: {cur.name} adds {'two score' if on[0] else 'no score'} terms")
            ci = 0 if on[0] else 1
            sign = -1.0 if (nm == "sub" and ci == 0) else 1.0
            if nm == "sub" and ci == 1:
                raise StructuralRewriteError(f"{where}: {cur.name} subtracts the scores")
            terms.append((a[1 - ci], mult * sign))
            cur = a[ci]
        elif nm == "masked_fill" and isinstance(a[1], torch.fx.Node) and _scalar(a[2]):
            if terms:  # masked_fill under an additive term: masked scores are no longer constant
                raise StructuralRewriteError(f"{where}: masked_fill {cur.name} is applied before the additive "
                                             f"term {terms[-1][0].name} (supported: the mask last)")
            fills.append((a[1], float(a[2]) * mult, "fill"))
            cur = a[0]
        elif nm == "where" and len(a) == 3 and isinstance(a[0], torch.fx.Node):
            # ``where(keep, scores, fill)`` / ``where(masked, fill, scores)``: a masked_fill
            on = [isinstance(x, torch.fx.Node) and _reaches_contraction(x) for x in a[1:]]
            if on[0] == on[1]:
                raise StructuralRewriteError(f"{where}: {cur.name} (where) selects between "
                                             f"{'two score' if on[0] else 'no score'} tensors")
            if terms:
                raise StructuralRewriteError(f"{where}: where {cur.name} is applied before the additive term "
                                             f"{terms[-1][0].name} (supported: the mask last)")
            other = a[2] if on[0] else a[1]
            val = (other, mult) if isinstance(other, torch.fx.Node) else float(other) * mult
            fills.append((a[0], val, "keep" if on[0] else "fill"))
            cur = a[1] if on[0] else a[2]
        else:
            raise StructuralRewriteError(f"{where}: {cur.name} ({nm}) between q.k and the softmax is not supported")


def _walk_weights(sm, where):
    """From the softmax forward through casts to the attn @ v contraction: ``(av, after, last)``."""

    after, cur = [], sm
    while True:
        users = [u for u in cur.users if not (u.op == "call_function" and _name(u.target) in DROP)]
        if len(users) != 1:
            raise StructuralRewriteError(f"{where}: the attention weights are used {len(users)} times "
                                         f"(only attn @ v is rewritten)")
        nxt = users[0]
        if is_contraction(nxt):
            return nxt, after, cur
        if nxt.op == "call_function" and _name(nxt.target) == "dropout" and \
                (not nxt.args[2] or float(nxt.args[1]) == 0.0):  # eval / p=0 dropout: the identity
            after.append(nxt)
            cur = nxt
            continue
        if nxt.op != "call_function" or _name(nxt.target) not in _CASTS:
            raise StructuralRewriteError(f"{where}: {nxt.name} ({_name(nxt.target) if nxt.op == 'call_function' else nxt.op}) "
                                         f"on the attention weights is not supported (only attn @ v)")
        after.append(nxt)
        cur = nxt


def attention_nodes(sm):
    """The nodes of ``softmax(scores) @ v`` around softmax node ``sm``, by structure alone:
    ``(covered, av)`` -- ``covered`` = the q.k contraction, the score chain, the softmax and
    the casts after it, in graph order, each read only by the next (so the whole region can
    be replaced by one op at ``av``) -- or None when the structure does not fit."""
    if sm.op != "call_function" or _name(sm.target) not in ("softmax", "_softmax", "_safe_softmax"):
        return None
    try:
        qk, chain, _m, _t, _f = _walk_scores(sm, "")
        av, after, _last = _walk_weights(sm, "")
    except StructuralRewriteError:
        return None
    order = {nd: i for i, nd in enumerate(sm.graph.nodes)}
    covered = sorted([qk, *chain, sm, *after], key=order.__getitem__)
    inside = set(covered) | {av}
    if any(u not in inside and not (u.op == "call_function" and _name(u.target) in DROP)
           for x in covered for u in x.users):
        return None
    return covered, av


def _attention_spec(sm, layout_of=_layout_meta, whole_ok: bool = False) -> _AttnSpec:
    """Recognise ``softmax(mult * (q . k) + pair bias + mask) @ v`` around softmax node ``sm``
    (over a token axis) -- the triangle attention the ring of
    :mod:`autocp.ops.triangle_attn` computes -- or raise saying what does not fit.
    ``layout_of(node)``: the layout tags of a node (the analysis' ``autocp.layout`` meta by
    default; the shard pass passes its own tags). ``whole_ok``: a bias / mask term whose
    token dims are whole fits (the caller slices it to ``spec.term_tags[node]``)."""

    name = _name(sm.target)
    where = f"node {sm.name!r} (softmax over token axis {rec(sm).softmax_tag!r})"
    if name not in ("softmax", "_softmax", "_safe_softmax"):
        raise StructuralRewriteError(f"{where}: {name} (SDPA / log_softmax) is not rewritten")
    # 1. walk back from the softmax input to q.k: scalar scales, additive terms, masked_fill
    qk, chain, mult, terms, fills = _walk_scores(sm, where)
    sa, sb, so, (q, k) = _contraction_letters(qk)
    lq_t, lk_t = layout_of(q), layout_of(k)
    if not (n_token_tags(lq_t) >= 2 and n_token_tags(lk_t) >= 2) or not isinstance(lq_t, tuple) \
            or not isinstance(lk_t, tuple):
        raise StructuralRewriteError(f"{where}: q/k of {qk.name} are not pair-derived (pair-bias attention over "
                                     f"token tensors is not rewritten)")
    tq, tk = dict(zip(sa, lq_t)), dict(zip(sb, lk_t))
    shape = tuple(qk.meta["val"].shape)
    contracted = [ch for ch in dict.fromkeys(sa + sb) if ch not in so]
    if len(contracted) != 1 or tq.get(contracted[0]) is not None or tk.get(contracted[0]) is not None:
        raise StructuralRewriteError(f"{where}: {qk.name} must contract exactly one channel letter; got {contracted}")
    d = contracted[0]
    tokq = [ch for ch in sa if tq[ch] in TOKEN]
    tokk = [ch for ch in sb if tk[ch] in TOKEN]
    shared = [ch for ch in tokq if ch in tokk]
    jq = [ch for ch in tokq if ch not in tokk]
    kq = [ch for ch in tokk if ch not in tokq]
    if len(shared) != 1 or len(jq) != 1 or len(kq) != 1:
        raise StructuralRewriteError(f"{where}: {qk.name} needs one shared row token letter, one query and one key "
                                     f"token letter; got {shared}, {jq}, {kq}")
    i, j, kk = shared[0], jq[0], kq[0]
    if tq[i] != tk[i] or tq[i] == tq[j] or tk[kk] != tq[j]:
        raise StructuralRewriteError(f"{where}: token layouts i={tq[i]!r} j={tq[j]!r} k={tk[kk]!r} are not a "
                                     f"triangle attention's (rows on one axis, queries and keys on the other)")
    batch = [ch for ch in so if ch not in (i, j, kk)]
    for ch in batch:
        if ch not in sa or ch not in sb or tq[ch] is not None or tk[ch] is not None:
            raise StructuralRewriteError(f"{where}: batch letter {ch!r} must be in q and k, unsharded")
    sdim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
    if not isinstance(sdim, int) or so[sdim % len(so)] != kk:
        raise StructuralRewriteError(f"{where}: the softmax is not over the key letter {kk!r} of {qk.name}")
    rtag, ktag = tq[i], tk[kk]
    # 2. classify the additive terms: triangle bias [j, k] (the pair tensor's row axis as query
    # index), key mask [i, k] (broadcast over queries); anything else does not fit
    biases, masks = [], []
    term_tags = {}

    def fits(node, al, lt, want):
        """``node``'s letters have the layouts ``want`` ({letter: tag}). With ``whole_ok``
        (the shard pass) any layout fits: the caller converts the term to
        ``term_tags[node]`` (a whole dim is sliced for free; a swapped one exchanged)."""
        if not whole_ok and any(lt.get(ch) != tag for ch, tag in want.items()):
            return False
        axes = {"r" if t == "r" else "c" for t in want.values()}
        term_tags[node] = tuple(want[ch] if ch in want else (None if t in (None, "?") or t in axes or
                                                             ({"r": "c", "c": "r"}.get(t) in axes) else t)
                                for ch, t in zip(al, layout_of(node) or (None,) * len(al)))
        return True

    term_narrow = {}
    for node, m in terms:
        al = _align(node, so, shape)
        if whole_ok and i in al and j in al and kk in al and broadcast_dim(node, al.index(i)):
            # the triangle bias repeated over the rows (einops repeat): its first row
            term_narrow[node] = al.index(i)
            al = al.replace(i, ".")
        lt = {ch: t for ch, t in zip(al, layout_of(node) or ()) if ch != "."}
        if i not in al and j in al and kk in al and fits(node, al, lt, {j: rtag, kk: ktag}):
            biases.append((node, al, m))
        elif j not in al and kk in al and fits(node, al, lt, {kk: ktag, **({i: rtag} if i in al else {})}):
            if _has_param_ancestor(node):
                raise StructuralRewriteError(
                    f"{where}: additive term {node.name} over [{i!r}, {kk!r}] depends on parameters: neither a key "
                    f"mask (0 / huge negative) nor the pair-derived triangle bias [query {j!r}, key {kk!r}]")
            masks.append(("add", node, al, m))
        else:
            raise StructuralRewriteError(
                f"{where}: additive term {node.name} (dims {al!r}, layouts {lt}) is neither the pair-derived "
                f"triangle bias [query {j!r} on the {rtag!r} axis, key {kk!r}] nor a key mask [{i!r}, {kk!r}]")
    for cond, val, kind in fills:
        al = _align(cond, so, shape)
        lt = {ch: t for ch, t in zip(al, layout_of(cond) or ()) if ch != "."}
        if j in al or kk not in al or not fits(cond, al, lt, {kk: ktag, **({i: rtag} if i in al else {})}):
            raise StructuralRewriteError(f"{where}: masked_fill condition {cond.name} is not a key mask [{i!r}, {kk!r}]")
        if not isinstance(val, tuple) and not val <= MASK_NEG:  # a tensor fill value: checked when it runs
            raise StructuralRewriteError(f"{where}: masked_fill value {val} is not a huge negative (<= {MASK_NEG})")
        masks.append((kind, cond, al, val))
    bm = [ch for ch in batch if any(ch in al for _k, _n, al, _v in masks)]
    hm = [ch for ch in batch if ch not in bm]
    # 3. softmax -> (casts) -> attn @ v
    av, after, cur = _walk_weights(sm, where)
    ca, cb, co, (x0, x1) = _contraction_letters(av)
    if x0 is cur:
        la, lvv, v = ca, cb, x1
    elif x1 is cur:
        la, lvv, v = cb, ca, x0
    else:
        raise StructuralRewriteError(f"{where}: {av.name} does not take the weights as an operand")
    if len(la) != len(so):
        raise StructuralRewriteError(f"{where}: the weights are reshaped before {av.name}")
    ren = dict(zip(la, so))
    free = [ch for ch in _LETTERS + "abcdefgh" if ch not in so]
    vonly = [ch for ch in lvv if ch not in la]
    if len(vonly) != 1:
        raise StructuralRewriteError(f"{where}: v of {av.name} must have exactly one value letter; got {vonly}")
    ren[vonly[0]] = e = free[0]
    lv = "".join(ren[ch] for ch in lvv)
    lout = "".join(ren.get(ch, "?") for ch in co)
    if kk not in lv or kk in lout or sorted(lout) != sorted(batch + [i, j, e]) or sorted(lv) != sorted(batch + [i, kk, e]):
        raise StructuralRewriteError(f"{where}: {av.name} ({lv!r} -> {lout!r}) is not attn @ v over the key letter")
    vt = layout_of(v) or ()
    tv = dict(zip(lv, vt))
    if tv.get(i) != rtag or tv.get(kk) != ktag:
        raise StructuralRewriteError(f"{where}: v of {av.name} is not a pair tile laid out like k")
    if v.meta["val"].shape[lv.index(e)] != q.meta["val"].shape[sa.index(d)]:
        raise StructuralRewriteError(f"{where}: value width differs from the q.k width (the ring packs k and v)")
    covered = [qk, *chain, sm, *after, av]
    node = "starting" if ktag == "c" else "ending"
    return _AttnSpec(qk, sm, av, covered, q, k, v, sa, sb, lv, lout, i, j, kk, d, e, bm, hm, mult, biases, masks,
                     ktag == "r", av.meta["val"].dtype,
                     f"{_name(qk.target)}/{name}/{_name(av.target)} over the "
                     f"{'column' if ktag == 'c' else 'row'}-token axis ({node} node), "
                     f"{len(biases)} triangle bias, {len(masks)} key mask term(s)", term_tags=term_tags,
                     term_narrow=term_narrow)


def fill_nodes(sp) -> list:
    """The tensor fill values of ``sp``'s masked fills (``where(mask, scores, fill)``)."""
    return [val[0] for _k, _n, _a, val in sp.masks if isinstance(val, tuple)]


def match_attention(sm, layout_of, whole_ok: bool = True) -> _AttnSpec:
    """The triangle attention around softmax node ``sm`` with the layouts ``layout_of(node)``
    (see :func:`_attention_spec`), registered for :func:`tile_attention`: ``(spec, key)``.
    Raises :class:`StructuralRewriteError` saying what does not fit."""
    sp = _attention_spec(sm, layout_of, whole_ok)
    return sp, _register_spec(sp)


def match_sdpa(node, layout_of) -> tuple:
    """A triangle attention spelled ``F.scaled_dot_product_attention(q, k, v, attn_mask=...)``
    (node ``node``) with the layouts ``layout_of(node)``: q ``[.., L, E]`` with the row letter
    ``i`` a batch dim on one mesh axis and the queries ``L`` on the other, k / v ``[.., S, E]``
    with ``i`` on the same axis as q's and the keys ``S`` on the queries' axis; ``attn_mask``
    None, a float triangle bias ``[.., L, S]`` (no ``i``), a float additive key mask or a
    bool keep-mask ``[.., i?, 1, S]``. Registered for :func:`tile_attention`: ``(spec, key)``;
    raises :class:`StructuralRewriteError` saying what does not fit."""
    q, k, v = node.args[:3]
    kw = dict(node.kwargs)
    for name, a in zip(["attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"], node.args[3:]):
        kw[name] = a
    where = f"SDPA node {node.name!r}"
    if kw.get("enable_gqa") or kw.get("is_causal") or float(kw.get("dropout_p") or 0.0) != 0.0:
        raise StructuralRewriteError(f"{where}: causal / dropout / grouped-query attention is not a triangle attention")
    mask = kw.get("attn_mask")
    qv, kv_, vv = (x.meta["val"] for x in (q, k, v))
    if not (qv.dim() == kv_.dim() == vv.dim()) or qv.dim() < 3 or qv.shape[-1] != vv.shape[-1]:
        raise StructuralRewriteError(f"{where}: q / k / v ranks or widths do not fit the ring")
    nb = qv.dim() - 2
    bat = "abcdefghijk"[:nb]
    lq, lk, lv, lout = bat + "LE", bat + "SE", bat + "SF", bat + "LF"
    tq, tk, tv = (dict(zip(ls, layout_of(x) or ())) for ls, x in ((lq, q), (lk, k), (lv, v)))
    rows = [ch for ch in bat if tq.get(ch) in TOKEN]
    if len(rows) != 1 or tq.get("L") not in TOKEN or tq["L"] == tq[rows[0]]:
        raise StructuralRewriteError(f"{where}: q has no row token axis and query axis on the two mesh axes")
    i = rows[0]
    rtag, ktag = tq[i], tq["L"]
    if tk.get(i) != rtag or tk.get("S") != ktag or tv.get(i) != rtag or tv.get("S") != ktag:
        raise StructuralRewriteError(f"{where}: k / v are not laid out like q's rows and keys")
    biases, masks, term_tags = [], [], {}
    if isinstance(mask, torch.fx.Node):
        shape = tuple(qv.shape[:-1]) + (kv_.shape[-2],)
        al = _align(mask, bat + "LS", shape)
        if mask.meta["val"].dtype == torch.bool:
            if "L" in al or "S" not in al:
                raise StructuralRewriteError(f"{where}: a bool attn_mask must be a key mask [.., 1, S]")
            masks.append(("keep", mask, al, 0.0))
        elif "L" in al and "S" in al and i not in al:
            biases.append((mask, al, 1.0))
        elif "L" not in al and "S" in al:
            if _has_param_ancestor(mask):
                raise StructuralRewriteError(f"{where}: the key term depends on parameters (not a mask)")
            masks.append(("add", mask, al, 1.0))
        else:
            raise StructuralRewriteError(f"{where}: attn_mask over {al!r} is neither a triangle bias [L, S] nor a "
                                         f"key mask [{i}, S]")
        want = {"L": rtag, "S": ktag, i: rtag}
        term_tags[mask] = tuple(want.get(ch) if ch != "." else None for ch in al)
    scale = kw.get("scale")
    mult = float(scale) if scale is not None else qv.shape[-1] ** -0.5
    bm = [ch for ch in bat if ch != i and any(ch in al_ for _k, _n, al_, _v in masks)]
    hm = [ch for ch in bat if ch != i and ch not in bm]
    sp = _AttnSpec(node, node, node, [node], q, k, v, lq, lk, lv, lout, i, "L", "S", "E", "F", bm, hm, mult, biases,
                   masks, ktag == "r", node.meta["val"].dtype,
                   f"scaled_dot_product_attention over the {'column' if ktag == 'c' else 'row'}-token axis, "
                   f"{len(biases)} triangle bias, {len(masks)} key mask term(s)", term_tags=term_tags)
    return sp, _register_spec(sp)


def _canon(t: torch.Tensor, letters: str, order: list, sizes: dict) -> torch.Tensor:
    """``t`` (dims labelled by ``letters``, '.' = size-1 broadcast) -> dims ``order``, expanded."""
    keep = [ch for ch in letters if ch != "."]
    t = t.reshape([s for s, ch in zip(t.shape, letters) if ch != "."])
    t = t.permute([keep.index(ch) for ch in order if ch in keep])
    t = t.reshape([sizes[ch] if ch in keep else 1 for ch in order])
    return t.expand([sizes[ch] for ch in order])


def pack_kv(k, v, key: int) -> list:
    """k and v of a matched triangle attention packed for the attention ring: one buffer
    ``[B, b_i, b_k, 2, H, D]`` (k already multiplied by the score scale,
    ``q . (m k) = m (q . k)``, so q is not copied), returned in a one-element list (a
    *box*): :func:`tile_attention` pops it, so in no-grad inference the packed block is
    freed as soon as the ring has sent it, and the model's own k / v tiles are dead once
    this node ran (the graph frees them after their last use)."""
    sp = _ATTN_SPECS[key]
    sizes = dict(zip(sp.lk, k.shape))
    sizes.update(zip(sp.lv, v.shape))
    bm, hm = list(sp.bm), list(sp.hm)
    bsz = int(torch.Size([sizes[c] for c in bm]).numel())
    hsz = int(torch.Size([sizes[c] for c in hm]).numel())
    bi, bk, dd = sizes[sp.i], sizes[sp.kk], sizes[sp.d]
    dt = torch.promote_types(k.dtype, v.dtype)
    kv = torch.empty(bsz, bi, bk, 2, hsz, dd, dtype=dt, device=k.device)
    split = [sizes[c] for c in bm] + [bi, bk] + [sizes[c] for c in hm] + [dd]
    kv.select(3, 0).view(split).copy_(_canon(k, sp.lk, bm + [sp.i, sp.kk] + hm + [sp.d], sizes))
    kv.select(3, 1).view(split).copy_(_canon(v, sp.lv, bm + [sp.i, sp.kk] + hm + [sp.e], sizes))
    if sp.qk_mult != 1.0:
        kv.select(3, 0).mul_(sp.qk_mult)
    return [kv]


def tile_attention(q, kv_box: list, biases, masks, key: int, fill_values=()):
    """The distributed replacement of one matched triangle attention, on local tiles.

    ``q``: the q.k operand (this rank's tile), ``kv_box``: :func:`pack_kv` of the k and v
    operands, ``biases``: the
    triangle bias term(s) (local tile: query block = the tile's row-token block, keys its
    other block -- exactly the ``tri`` tile :class:`autocp.ops.triangle_attn.TriAttnRing`
    takes), ``masks``: the key-mask terms (``fill`` / ``where`` conditions: True = masked /
    kept), ``fill_values``: the tensor fill values of those (checked: all huge negatives). All are permuted to the ring's canonical layout,
    the keys run on the ring over all N tokens (padding keys get no weight; masked keys --
    the model's own mask, 0 / huge negative -- none either; fully masked rows the model's
    uniform average), the output goes back to the attn @ v node's order and dtype.
    """
    from ..layout import token_valid
    from ..ops.common import TileCtx
    from ..ops.triangle_attn import SCORE_CHUNK_ELEMS, MeshView, TriAttnRing, ring_forward, row_chunk_for
    from .context import current

    sp = _ATTN_SPECS[key]
    info = current()
    mesh, n = info.mesh, info.n
    ctx = TileCtx(mesh, n)
    kv = kv_box.pop()
    sizes = dict(zip(sp.lq, q.shape))
    sizes[sp.kk] = kv.shape[2]
    if sizes[sp.i] != ctx.b or sizes[sp.j] != ctx.b or sizes[sp.kk] != ctx.b:
        raise StructuralRewriteError(f"autocp structural attention: token sizes {sizes}; required {ctx.b} (b = "
                                     f"ceil(N={n} / p={mesh.p})). Fix: register the module.")
    bm, hm = list(sp.bm), list(sp.hm)
    bsz = int(torch.Size([sizes[c] for c in bm]).numel())
    hsz = int(torch.Size([sizes[c] for c in hm]).numel())
    b = ctx.b
    dd = sizes[sp.d]
    qc = _canon(q, sp.lq, bm + [sp.i] + hm + [sp.j, sp.d], sizes).reshape(bsz, b, hsz, b, dd)
    dt = kv.dtype
    tri = None
    for t, al, m in zip(biases, [a for _n, a, _m in sp.biases], [m for _n, _a, m in sp.biases]):
        tb = _canon(t, al, bm + hm + [sp.j, sp.kk], sizes).reshape(bsz, hsz, b, b) * m
        tri = tb if tri is None else tri + tb
    tri = (torch.zeros(bsz, hsz, b, b, dtype=dt, device=q.device) if tri is None else tri.to(dt)).contiguous()
    valid = torch.ones(bsz, b, b, dtype=torch.bool, device=q.device)
    fills = iter(fill_values)
    for t, (kind, _n, al, val) in zip(masks, sp.masks):
        if isinstance(val, tuple):
            fv = next(fills).detach().float() * val[1]
            if not bool((fv <= MASK_NEG).all()):
                raise StructuralRewriteError(
                    f"autocp structural attention: the fill value {val[0].name} of the key mask {_n.name} is not a "
                    f"huge negative (<= {MASK_NEG}); the ring cannot follow it. Fix: register the module.")
        mt = _canon(t.detach(), al, bm + [sp.i, sp.kk], sizes).reshape(bsz, b, b)
        if kind == "add":
            mt = mt * val
            if not bool(((mt == 0) | (mt <= MASK_NEG)).all()):
                raise StructuralRewriteError(
                    f"autocp structural attention: the additive key term {_n.name} takes values other than 0 and "
                    f"<= {MASK_NEG} (not a binary mask bias); the ring cannot follow it. Fix: register the module.")
            valid = valid & (mt == 0)
        elif kind == "keep":
            valid = valid & mt.bool()
        else:
            valid = valid & ~mt.bool()
    key_mask = valid.to(torch.uint8).contiguous()
    view = MeshView(mesh, transposed=sp.transposed)
    # rows per kernel call: a score chunk at most a quarter of the q tile (and the global
    # cap), so the ring's temporaries stay a small fraction of the resident tiles
    rc = row_chunk_for(bsz, b, hsz, b, b, budget_elems=min(SCORE_CHUNK_ELEMS, max(1, qc.numel() // 4)))
    v_keys = kv.select(3, 1) if any(kind in ("fill", "keep") for kind, _n, _a, _v in sp.masks) else None
    if torch.is_grad_enabled():
        o = TriAttnRing.apply(qc, kv, tri, key_mask, view, n, rc)
    else:
        box = [kv]
        del kv
        o = ring_forward(qc, box, tri, key_mask, view, n, rc)[0]
    if any(kind in ("fill", "keep") for kind, _n, _a, _v in sp.masks):
        # masked_fill: a fully masked row's scores are all the fill value -> the uniform average
        # of v over the N real keys, and NO gradient into q, k or the bias (the ring's uniform
        # path follows an additive mask, whose gradient does flow): take those rows from a
        # separate differentiable mean of v (summed over the keys' mesh axis), so the ring
        # sees dout = 0 there. Every rank runs the two small all-reduces (no data-dependent
        # collectives).
        from .. import comm
        from ..mesh import COL, ROW

        axis = COL if sp.transposed else ROW  # the ranks holding the other key blocks of these rows
        real_k = token_valid(n, mesh.p, view.c, device=o.device)
        cnt = (valid & real_k[None, None, :]).sum(-1).float()
        comm.all_reduce_(cnt, mesh, axis, name="triattn.rowmask")
        vsum = comm.all_reduce((v_keys.float() * real_k[None, None, :, None, None]).sum(2), mesh, axis)
        dead = (cnt == 0)[:, :, None, None, None]
        o = torch.where(dead, (vsum / n)[:, :, :, None, :].to(o.dtype), o)
    # padded query slots (i or j padding) -> 0, like the registered op
    vi = token_valid(n, mesh.p, view.r, device=o.device)
    vj = token_valid(n, mesh.p, view.c, device=o.device)
    o = o * (vi[None, :, None, None, None] & vj[None, None, None, :, None]).to(o.dtype)
    o = o.reshape([sizes[c] for c in bm] + [b] + [sizes[c] for c in hm] + [b, dd])
    canon = bm + [sp.i] + hm + [sp.j, sp.e]
    return o.permute([canon.index(ch) for ch in sp.lout]).to(sp.out_dtype)


# ----------------------------------------------------------------------------- build
def einsum_letters(eq: str, ranks) -> tuple:
    """``(operand letters, output letters)`` of an explicit einsum equation, its ellipsis
    spelled out with unused letters (right-aligned, as einsum broadcasts); None when the
    equation has no ``->`` or the ranks do not fit."""
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, rhs = eq.split("->")
    letters = lhs.split(",")
    if len(letters) != len(ranks):
        return None
    if "..." in eq:
        used = set(eq) - {".", ",", "-", ">"}
        free = [ch for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if ch not in used]
        widths = [r - (len(ls) - 3) for ls, r in zip(letters, ranks) if "..." in ls]
        nell = max(widths + [0])
        ell = "".join(free[:nell])
        letters = [ls.replace("...", ell[nell - (r - (len(ls) - 3)):]) if "..." in ls else ls
                   for ls, r in zip(letters, ranks)]
        rhs = rhs.replace("...", ell)
    if any(len(ls) != r for ls, r in zip(letters, ranks)):
        return None
    return letters, rhs


def _contraction_letters(node):
    """(spec_a, spec_b, spec_out, operand nodes) of a two-operand contraction, or raise."""
    name = _name(node.target)
    if name == "einsum":
        eq = node.args[0].replace(" ", "")
        ops = list(node.args[1])
        spec = einsum_letters(eq, [o.meta["val"].dim() for o in ops]) if len(ops) == 2 else None
        if spec is None:
            raise StructuralRewriteError(f"einsum {eq!r} with {len(ops)} operands is not supported")
        (sa, sb), rhs = spec
        return sa, sb, rhs, ops
    if name in ("matmul", "bmm", "mm"):
        a, b = node.args[0], node.args[1]
        ra, rb = a.meta["val"].dim(), b.meta["val"].dim()
        if ra < 2 or rb < 2 or ra != rb:
            raise StructuralRewriteError(f"{name} of ranks {ra} x {rb} (broadcasting matmul) is not supported")
        if tuple(a.meta["val"].shape[:-2]) != tuple(b.meta["val"].shape[:-2]):
            raise StructuralRewriteError(f"{name} with broadcast batch dims is not supported")
        batch = _LETTERS[: ra - 2]
        return batch + "ik", batch + "kj", batch + "ij", [a, b]
    raise StructuralRewriteError(f"contraction {name} is not supported (einsum/matmul/bmm/mm are)")


def _contract_spec(node) -> _ContractSpec:
    sa, sb, so, ops = _contraction_letters(node)
    tags = [rec(ops[0]).layout, rec(ops[1]).layout]
    if not all(isinstance(t, tuple) for t in tags):
        raise StructuralRewriteError(f"operands of {node.name} have no analysed layout")
    lt = [dict(zip(sa, tags[0])), dict(zip(sb, tags[1]))]
    contracted = [ch for ch in dict.fromkeys(sa + sb) if ch not in so]
    if len(contracted) != 1 or not (contracted[0] in sa and contracted[0] in sb):
        raise StructuralRewriteError(f"{node.name} contracts {contracted}; exactly one shared token letter is supported")
    k = contracted[0]
    kt = {lt[0][k], lt[1][k]}
    if len(kt) != 1 or next(iter(kt)) not in TOKEN:
        raise StructuralRewriteError(f"{node.name}: contracted letter {k!r} has layouts {sorted(map(str, kt))}")
    ktag = next(iter(kt))
    direction = "outgoing" if ktag == "c" else "incoming"
    free = "r" if ktag == "c" else "c"
    tok = [ch for ch in so if (lt[0].get(ch) in TOKEN or lt[1].get(ch) in TOKEN)]
    if len(tok) != 2:
        raise StructuralRewriteError(f"{node.name}: output {so!r} has token letters {tok}; two are required")
    x, y = tok
    xo = 0 if x in sa else 1
    yo = 1 - xo
    specs = (sa, sb)
    if x not in specs[xo] or x in specs[yo] or y not in specs[yo] or y in specs[xo]:
        raise StructuralRewriteError(f"{node.name}: output token letters {x!r}, {y!r} must come one from each operand")
    if lt[xo][x] != free or lt[yo][y] != free:
        raise StructuralRewriteError(
            f"{node.name}: free token axes have layouts {lt[xo][x]!r}, {lt[yo][y]!r}; a {direction} triangle "
            f"contraction needs {free!r} on both")
    batch = [ch for ch in so if ch not in (x, y)]
    for ch in batch:
        if ch not in sa or ch not in sb or lt[0][ch] is not None or lt[1][ch] is not None:
            raise StructuralRewriteError(f"{node.name}: batch letter {ch!r} must be in both operands, unsharded")
    extra = [ch for ch in sa + sb if ch not in so and ch != k]
    if extra:
        raise StructuralRewriteError(f"{node.name}: letters {extra} are summed besides the token axis")

    def perm(spec, tokl):
        order = batch + ([tokl, k] if direction == "outgoing" else [k, tokl])
        return [spec.index(ch) for ch in order]

    canon = batch + [x, y]
    perm_out = [canon.index(ch) for ch in so]
    return _ContractSpec(xo, perm(specs[xo], x), perm(specs[yo], y), perm_out, direction,
                         f"{_name(node.target)} contracts the {'column' if ktag == 'c' else 'row'}-token axis")


def build_tile_program(module: nn.Module, call, in_meta, in_tags, n: int, p: int,
                       expected_out_tags=None) -> TileProgram:
    """Capture ``module`` alone at global ``n`` and transform its graph to run on tiles of a
    ``p x p`` mesh; see the module docstring. ``call``: ``(spec, tensor indices, consts)``
    of its call; ``in_meta``: ``[(shape, dtype)]`` of the tensor inputs at global N."""
    from ..layout import block_size

    if call is None:
        raise StructuralRewriteError("the module was never called during capture")
    if any(t and "s" in t for t in in_tags):
        raise StructuralRewriteError("MSA-tiled inputs are not supported by the structural rewrite")
    spec, tidx, consts = call
    bound = BoundCall(module, spec, tidx, consts)
    ex = [example_like(s, d) for s, d in in_meta]
    try:
        ep = export(bound, ex)
    except Exception as exc:  # noqa: BLE001
        raise StructuralRewriteError(f"capture of the module alone failed: {type(exc).__name__}: {exc}") from exc
    gm = ep.graph_module
    outs = [s for s in ep.graph_signature.output_specs]
    if any(s.kind.name != "USER_OUTPUT" for s in outs):
        raise StructuralRewriteError("the module mutates buffers or inputs (not supported on tiles)")
    an = Analysis(n_tokens=n, input_tags=list(in_tags))
    tags = [tuple(t) if t is not None else None for t in in_tags]
    analyze_graph(gm, tags, n, an)
    phs = [nd for nd in gm.graph.nodes if nd.op == "placeholder"]
    for nd, s_ in zip(phs, ep.graph_signature.input_specs):  # parameters / buffers / constants
        put(nd, param=s_.kind.name != "USER_INPUT")
    # triangle attentions: every softmax over a token axis must be one (else: why not)
    attn = [_attention_spec(nd) for nd in gm.graph.nodes
            if nd.op == "call_function" and rec(nd).softmax_tag in TOKEN]
    covered = {x for sp in attn for x in sp.covered}
    matched = []
    for nd in gm.graph.nodes:
        if nd.op == "call_function" and nd not in covered and rule_triangle_mult(None, nd):
            matched.append(nd)
    for round_ in (1, 2):
        if round_ == 2:
            an = Analysis(n_tokens=n, input_tags=list(in_tags))
            out_tags = analyze_graph(gm, tags, n, an)  # matched contractions now output Pair2D tiles
        bad = [nd for _pre, nd in an.needs_full if nd not in matched and nd not in covered]
        # name the root cause first (an attention's softmax rather than the ops it disturbs)
        bad.sort(key=lambda nd: 0 if "attention" in str(rec(nd).needs_full) else 1)
        if bad and (round_ == 2 or not (matched or attn)):  # round 1: downstream layouts not final yet
            raise StructuralRewriteError(f"node {bad[0].name!r} cannot run on tiles: "
                                         f"{rec(bad[0]).needs_full}")
        if not (matched or attn):
            raise StructuralRewriteError("no triangle multiplication or triangle attention found in the module's "
                                         "graph")
    if expected_out_tags is not None:
        got = [tuple(t) if isinstance(t, tuple) else None for t in (out_tags or [])]
        exp = [tuple(t) if t is not None else None for t in expected_out_tags]
        norm = lambda ts: [tuple(x if x in TOKEN else None for x in t) if t else t for t in ts]  # noqa: E731
        if norm(got) != norm(exp):
            raise StructuralRewriteError(f"the rewritten graph's output layouts {got} differ from what the caller "
                                         f"expects {exp}")
    b = block_size(n, p)
    prog = TileProgram(gm=gm, input_specs=[(s.kind.name, s.target) for s in ep.graph_signature.input_specs],
                       constants=dict(ep.constants), out_spec=ep.call_spec.out_spec, n=n, p=p)
    g = gm.graph
    for sp in attn:
        key = _register_spec(sp)
        prog.specs.append(sp)
        with g.inserting_before(sp.av):
            box = g.call_function(pack_kv, (sp.k, sp.v, key))
            new = g.call_function(tile_attention, (sp.q, box, [x for x, _a, _m in sp.biases],
                                                   [x for _k, x, _a, _v in sp.masks], key, fill_nodes(sp)))
        new.meta = dict(sp.av.meta)
        sp.av.replace_all_uses_with(new)
        todo = list(sp.covered)
        while todo:
            dead = [x for x in todo if not x.users]
            if not dead:
                raise StructuralRewriteError(f"attention nodes {[x.name for x in todo]} are still used elsewhere")
            for x in dead:
                g.erase_node(x)
                todo.remove(x)
        kind = "triangle_attn_end" if sp.transposed else "triangle_attn_start"
        prog.attentions.append((sp.sm.name, kind, sp.detail))
    for nd in list(g.nodes):
        if nd.op != "call_function":
            continue
        name = _name(nd.target)
        if name in DROP and not nd.users:
            g.erase_node(nd)
            continue
        if name == "arange":
            lay = rec(nd).layout or ()
            if any(t is not None for t in lay):
                raise StructuralRewriteError(f"node {nd.name!r}: arange over the token axis (token positions) "
                                             f"is not tile-local")
        if nd in matched:
            cs = _contract_spec(nd)
            a, bb = _contraction_letters(nd)[3]
            with g.inserting_before(nd):
                new = g.call_function(tile_contract, (a, bb, cs.x_operand, cs.perm_x, cs.perm_y, cs.perm_out,
                                                      cs.direction, nd.meta["val"].dtype))
            new.meta = dict(nd.meta)
            nd.replace_all_uses_with(new)
            g.erase_node(nd)
            prog.contractions.append((nd.name, cs.direction, cs.detail))
            continue
        idx = SHAPE_ARGS.get(name)
        if idx is None or len(nd.args) <= idx or b == n:
            continue
        shape = nd.args[idx]
        lay = rec(nd).layout
        if not isinstance(shape, (list, tuple)) or not isinstance(lay, tuple) or len(shape) != len(lay):
            continue
        new_shape = [b if (isinstance(s, int) and s == n and t in ("r", "c", "?")) else s
                     for s, t in zip(shape, lay)]
        if new_shape != list(shape):
            args = list(nd.args)
            args[idx] = new_shape
            nd.args = tuple(args)
            prog.shape_rewrites.append(nd.name)
    g.lint()
    gm.recompile()
    return prog


# ----------------------------------------------------------------------------- the module
#: one program per module (or shared block key), call signature, N and p; held weakly: the
#: StructuralOps that run a program keep it (``_held``), so dropping them frees it
_PROGRAMS = weakref.WeakValueDictionary()


def live_counts() -> tuple:
    """``(attention specs, tile programs)`` alive in the structural caches (both weak)."""
    return len(_ATTN_SPECS), len(_PROGRAMS)


def _program_key(share_key, module, call, in_meta, in_tags, n, p):

    spec, tidx, consts = call
    return (share_key, param_sig(module), str(spec), tuple(tidx), repr(consts), tuple(in_meta),
            tuple(map(repr, in_tags)), n, p)


def get_program(module, call, in_meta, in_tags, n, p, expected_out_tags=None, share_key=None) -> TileProgram:
    """Cached :func:`build_tile_program`: one capture per ``share_key`` (default: the module
    object; the instances of a repeated block share their representative's key, as the
    block capture does), call signature, N and p."""
    key = _program_key(share_key if share_key is not None else ("id", id(module)), module, call, in_meta, in_tags,
                       n, p)
    prog = _PROGRAMS.get(key)
    if prog is None:
        prog = build_tile_program(module, call, in_meta, in_tags, n, p, expected_out_tags)
        _PROGRAMS[key] = prog
    return prog


class StructuralOp(ModuleWrapper):
    """Runs ``module``'s rewritten graph (:class:`TileProgram`) on this rank's tiles.

    Same children, parameters and ``state_dict`` keys as ``module`` (shared objects).
    ``call`` / ``in_meta`` / ``in_tags``: the captured call (non-tensor arguments, tensor
    shapes at the example N, input layouts); a call at another global N re-captures.
    """

    def __init__(self, module: nn.Module, mesh, call, in_meta, in_tags, example_n: int, path: str = "",
                 out_tags=None, share_key=None):
        super().__init__(module, mesh, path)
        self.call = call
        self.in_meta = list(in_meta)
        self.in_tags = list(in_tags)
        self.example_n = example_n
        self.out_tags = out_tags
        self.share_key = share_key
        object.__setattr__(self, "_held", {})
        self.program(example_n)  # build (or fetch) now: errors surface at parallelize time

    def program(self, n: int) -> TileProgram:
        meta = self.in_meta
        if n != self.example_n:
            meta = [(tuple(n if (t is not None and d < len(t) and t[d] in TOKEN) else s for d, s in enumerate(shape)),
                     dt) for (shape, dt), t in zip(self.in_meta, self.in_tags)]
        prog = get_program(self.inner, self.call, meta, self.in_tags, n, self.mesh.p, self.out_tags,
                           self.share_key)
        self._held[n] = prog
        return prog

    def extra_repr(self) -> str:
        return f"path={self.path!r}, structural rewrite of {type(self.inner).__name__}, p={self.mesh.p}"

    def forward(self, *args, **kwargs):
        from .context import current

        n = current().n
        prog = self.program(n)
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [l for l in leaves if isinstance(l, torch.Tensor)]
        if str(spec) != str(self.call[0]) or len(tensors) != len(self.call[1]):
            raise StructuralRewriteError(
                f"autocp: {self.path} ({type(self.inner).__name__}) was rewritten for calls shaped like "
                f"{self.call[0]}; given {spec}. Fix: call it as during parallelize's example run, or register it.")
        flat = []
        it = iter(tensors)
        for kind, target in prog.input_specs:
            if kind == "USER_INPUT":
                flat.append(next(it))
            elif kind == "PARAMETER":
                flat.append(self.inner.get_parameter(target[len("block."):]))
            elif kind == "BUFFER":
                flat.append(self.inner.get_buffer(target[len("block."):]))
            else:
                flat.append(prog.constants[target])
        outs = prog.gm(*flat)
        return tree_unflatten(list(outs), prog.out_spec)
