"""Triangle attention by structure: the ``softmax(q . k + pair bias + key mask) @ v`` regions
of a captured ATen graph, recognised whatever their spelling, and the tile primitive that
runs one on this rank's tiles (the ring attention of :mod:`autocp.ops.triangle_attn`).

Used by the sharding pass (:mod:`autocp.passes.shard`): ``attention_nodes`` finds a
region by structure alone (the q.k contraction, the score chain, the softmax, ``@ v``);
``match_attention`` / ``match_sdpa`` check it against the layouts the propagator proved
(keys along a block-sharded token axis, a triangle bias ``[j, k]``, key masks ``[i, k]``,
additive or ``masked_fill``) and return its letters; :func:`pack_kv` and
:func:`tile_attention` are the two nodes the region becomes. Anything that does not fit
raises :class:`AttentionMismatch` saying why (the region then runs op by op).
"""

from __future__ import annotations

import itertools
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .tags import op_name as _name
from .record import rec

__all__ = ["AttentionMismatch", "tile_attention", "pack_kv", "attention_nodes", "match_attention", "match_sdpa",
           "fill_nodes", "einsum_letters", "contraction_letters", "live_specs"]


class AttentionMismatch(RuntimeError):
    """A region is not a triangle attention the ring can run (the message says why)."""


DROP = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}
TOKEN = ("r", "c")
_LETTERS = "ABCDEFGHLMNOPQ"
#: value-flow ops an attention's score chain may pass through
PASS_THROUGH = {"add", "sub", "mul", "div", "to", "_to_copy", "masked_fill", "where", "clone", "view", "reshape",
                "_unsafe_view", "permute", "transpose", "contiguous", "unsqueeze", "squeeze", "expand",
                "dropout", "native_dropout", "type_as", "float", "alias", "neg", "detach"}
#: in-place forms carrying the same value flow as their out-of-place ops (``scores += bias``)
INPLACE_FORMS = {"add_", "sub_", "mul_", "div_", "masked_fill_"}
PASS_THROUGH |= INPLACE_FORMS


def ancestors_until(node, stop, limit=12):
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


def is_contraction(nd) -> bool:
    return nd.op == "call_function" and _name(nd.target) in ("einsum", "matmul", "bmm", "mm", "baddbmm")


def n_token_tags(tags) -> int:
    if not isinstance(tags, tuple):
        return 0
    return sum(1 for t in tags if t in ("r", "c", "?"))


def live_specs() -> int:
    """How many matched attention specs are alive (held by tile programs): a test hook."""
    return len(_ATTN_SPECS)

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
        raise AttentionMismatch(f"attention term {node.name} is not a tensor")
    if v.dim() > len(letters):
        raise AttentionMismatch(f"attention term {node.name} has more dims than the scores")
    off = len(letters) - v.dim()
    out = []
    for d, s in enumerate(v.shape):
        full = shape[off + d]
        if s == full:
            out.append(letters[off + d])
        elif s == 1:
            out.append("")
        else:
            raise AttentionMismatch(f"attention term {node.name} of shape {tuple(v.shape)} does not broadcast "
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


def _walk_scores(sm, where):
    """From the softmax input back to the q.k contraction: ``(qk, chain, mult, terms, fills)``
    (scalar scales, additive terms, masked_fill); raises when a step does not fit."""

    mult, terms, fills, chain = 1.0, [], [], []
    cur = sm.args[0]
    while True:
        if not isinstance(cur, torch.fx.Node) or cur.op != "call_function":
            raise AttentionMismatch(f"{where}: no q.k contraction feeds it")
        nm = _name(cur.target)
        if is_contraction(cur):
            return cur, chain, mult, terms, fills
        if nm in INPLACE_FORMS:
            # ``scores += bias`` (e.g. SDPA's math path: ``attn.add_(attn_mask)``): the same
            # term as the out-of-place op when the scores are the tensor written into (and
            # nothing else reads them: checked when the walk moves on to them)
            if not (isinstance(cur.args[0], torch.fx.Node) and _reaches_contraction(cur.args[0])):
                raise AttentionMismatch(f"{where}: {cur.name} ({nm}) writes a score term into a "
                                             f"non-score tensor (not supported)")
            nm = nm[:-1]
        if len(cur.users) != 1:
            raise AttentionMismatch(f"{where}: the scores {cur.name} are used elsewhere (not rewritten)")
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
                raise AttentionMismatch(f"{where}: {cur.name} adds {'two score' if on[0] else 'no score'} terms")
            ci = 0 if on[0] else 1
            sign = -1.0 if (nm == "sub" and ci == 0) else 1.0
            if nm == "sub" and ci == 1:
                raise AttentionMismatch(f"{where}: {cur.name} subtracts the scores")
            terms.append((a[1 - ci], mult * sign))
            cur = a[ci]
        elif nm == "masked_fill" and isinstance(a[1], torch.fx.Node) and _scalar(a[2]):
            if terms:  # masked_fill under an additive term: masked scores are no longer constant
                raise AttentionMismatch(f"{where}: masked_fill {cur.name} is applied before the additive "
                                             f"term {terms[-1][0].name} (supported: the mask last)")
            fills.append((a[1], float(a[2]) * mult, "fill"))
            cur = a[0]
        elif nm == "where" and len(a) == 3 and isinstance(a[0], torch.fx.Node):
            # ``where(keep, scores, fill)`` / ``where(masked, fill, scores)``: a masked_fill
            on = [isinstance(x, torch.fx.Node) and _reaches_contraction(x) for x in a[1:]]
            if on[0] == on[1]:
                raise AttentionMismatch(f"{where}: {cur.name} (where) selects between "
                                             f"{'two score' if on[0] else 'no score'} tensors")
            if terms:
                raise AttentionMismatch(f"{where}: where {cur.name} is applied before the additive term "
                                             f"{terms[-1][0].name} (supported: the mask last)")
            other = a[2] if on[0] else a[1]
            val = (other, mult) if isinstance(other, torch.fx.Node) else float(other) * mult
            fills.append((a[0], val, "keep" if on[0] else "fill"))
            cur = a[1] if on[0] else a[2]
        else:
            raise AttentionMismatch(f"{where}: {cur.name} ({nm}) between q.k and the softmax is not supported")


def _walk_weights(sm, where):
    """From the softmax forward through casts to the attn @ v contraction: ``(av, after, last)``."""

    after, cur = [], sm
    while True:
        users = [u for u in cur.users if not (u.op == "call_function" and _name(u.target) in DROP)]
        if len(users) != 1:
            raise AttentionMismatch(f"{where}: the attention weights are used {len(users)} times "
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
            raise AttentionMismatch(f"{where}: {nxt.name} ({_name(nxt.target) if nxt.op == 'call_function' else nxt.op}) "
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
    except AttentionMismatch:
        return None
    order = {nd: i for i, nd in enumerate(sm.graph.nodes)}
    covered = sorted([qk, *chain, sm, *after], key=order.__getitem__)
    inside = set(covered) | {av}
    if any(u not in inside and not (u.op == "call_function" and _name(u.target) in DROP)
           for x in covered for u in x.users):
        return None
    return covered, av


def _attention_spec(sm, layout_of, whole_ok: bool = False) -> _AttnSpec:
    """Recognise ``softmax(mult * (q . k) + pair bias + mask) @ v`` around softmax node ``sm``
    (over a token axis) -- the triangle attention the ring of
    :mod:`autocp.ops.triangle_attn` computes -- or raise saying what does not fit.
    ``layout_of(node)``: the layout tags of a node (the shard pass's proven tags). ``whole_ok``: a bias / mask term whose
    token dims are whole fits (the caller slices it to ``spec.term_tags[node]``)."""

    name = _name(sm.target)
    where = f"node {sm.name!r} (softmax)"
    if name not in ("softmax", "_softmax", "_safe_softmax"):
        raise AttentionMismatch(f"{where}: {name} (SDPA / log_softmax) is not rewritten")
    # 1. walk back from the softmax input to q.k: scalar scales, additive terms, masked_fill
    qk, chain, mult, terms, fills = _walk_scores(sm, where)
    sa, sb, so, (q, k) = contraction_letters(qk)
    lq_t, lk_t = layout_of(q), layout_of(k)
    if not (n_token_tags(lq_t) >= 2 and n_token_tags(lk_t) >= 2) or not isinstance(lq_t, tuple) \
            or not isinstance(lk_t, tuple):
        raise AttentionMismatch(f"{where}: q/k of {qk.name} are not pair-derived (pair-bias attention over "
                                     f"token tensors is not rewritten)")
    tq, tk = dict(zip(sa, lq_t)), dict(zip(sb, lk_t))
    shape = tuple(qk.meta["val"].shape)
    contracted = [ch for ch in dict.fromkeys(sa + sb) if ch not in so]
    if len(contracted) != 1 or tq.get(contracted[0]) is not None or tk.get(contracted[0]) is not None:
        raise AttentionMismatch(f"{where}: {qk.name} must contract exactly one channel letter; got {contracted}")
    d = contracted[0]
    tokq = [ch for ch in sa if tq[ch] in TOKEN]
    tokk = [ch for ch in sb if tk[ch] in TOKEN]
    shared = [ch for ch in tokq if ch in tokk]
    jq = [ch for ch in tokq if ch not in tokk]
    kq = [ch for ch in tokk if ch not in tokq]
    if len(shared) != 1 or len(jq) != 1 or len(kq) != 1:
        raise AttentionMismatch(f"{where}: {qk.name} needs one shared row token letter, one query and one key "
                                     f"token letter; got {shared}, {jq}, {kq}")
    i, j, kk = shared[0], jq[0], kq[0]
    if tq[i] != tk[i] or tq[i] == tq[j] or tk[kk] != tq[j]:
        raise AttentionMismatch(f"{where}: token layouts i={tq[i]!r} j={tq[j]!r} k={tk[kk]!r} are not a "
                                     f"triangle attention's (rows on one axis, queries and keys on the other)")
    batch = [ch for ch in so if ch not in (i, j, kk)]
    for ch in batch:
        if ch not in sa or ch not in sb or tq[ch] is not None or tk[ch] is not None:
            raise AttentionMismatch(f"{where}: batch letter {ch!r} must be in q and k, unsharded")
    sdim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
    if not isinstance(sdim, int) or so[sdim % len(so)] != kk:
        raise AttentionMismatch(f"{where}: the softmax is not over the key letter {kk!r} of {qk.name}")
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
                raise AttentionMismatch(
                    f"{where}: additive term {node.name} over [{i!r}, {kk!r}] depends on parameters: neither a key "
                    f"mask (0 / huge negative) nor the pair-derived triangle bias [query {j!r}, key {kk!r}]")
            masks.append(("add", node, al, m))
        else:
            raise AttentionMismatch(
                f"{where}: additive term {node.name} (dims {al!r}, layouts {lt}) is neither the pair-derived "
                f"triangle bias [query {j!r} on the {rtag!r} axis, key {kk!r}] nor a key mask [{i!r}, {kk!r}]")
    for cond, val, kind in fills:
        al = _align(cond, so, shape)
        lt = {ch: t for ch, t in zip(al, layout_of(cond) or ()) if ch != "."}
        if j in al or kk not in al or not fits(cond, al, lt, {kk: ktag, **({i: rtag} if i in al else {})}):
            raise AttentionMismatch(f"{where}: masked_fill condition {cond.name} is not a key mask [{i!r}, {kk!r}]")
        if not isinstance(val, tuple) and not val <= MASK_NEG:  # a tensor fill value: checked when it runs
            raise AttentionMismatch(f"{where}: masked_fill value {val} is not a huge negative (<= {MASK_NEG})")
        masks.append((kind, cond, al, val))
    bm = [ch for ch in batch if any(ch in al for _k, _n, al, _v in masks)]
    hm = [ch for ch in batch if ch not in bm]
    # 3. softmax -> (casts) -> attn @ v
    av, after, cur = _walk_weights(sm, where)
    ca, cb, co, (x0, x1) = contraction_letters(av)
    if x0 is cur:
        la, lvv, v = ca, cb, x1
    elif x1 is cur:
        la, lvv, v = cb, ca, x0
    else:
        raise AttentionMismatch(f"{where}: {av.name} does not take the weights as an operand")
    if len(la) != len(so):
        raise AttentionMismatch(f"{where}: the weights are reshaped before {av.name}")
    ren = dict(zip(la, so))
    free = [ch for ch in _LETTERS + "abcdefgh" if ch not in so]
    vonly = [ch for ch in lvv if ch not in la]
    if len(vonly) != 1:
        raise AttentionMismatch(f"{where}: v of {av.name} must have exactly one value letter; got {vonly}")
    ren[vonly[0]] = e = free[0]
    lv = "".join(ren[ch] for ch in lvv)
    lout = "".join(ren.get(ch, "?") for ch in co)
    if kk not in lv or kk in lout or sorted(lout) != sorted(batch + [i, j, e]) or sorted(lv) != sorted(batch + [i, kk, e]):
        raise AttentionMismatch(f"{where}: {av.name} ({lv!r} -> {lout!r}) is not attn @ v over the key letter")
    vt = layout_of(v) or ()
    tv = dict(zip(lv, vt))
    if tv.get(i) != rtag or tv.get(kk) != ktag:
        raise AttentionMismatch(f"{where}: v of {av.name} is not a pair tile laid out like k")
    if v.meta["val"].shape[lv.index(e)] != q.meta["val"].shape[sa.index(d)]:
        raise AttentionMismatch(f"{where}: value width differs from the q.k width (the ring packs k and v)")
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
    Raises :class:`AttentionMismatch` saying what does not fit."""
    sp = _attention_spec(sm, layout_of, whole_ok)
    return sp, _register_spec(sp)


def match_sdpa(node, layout_of) -> tuple:
    """A triangle attention spelled ``F.scaled_dot_product_attention(q, k, v, attn_mask=...)``
    (node ``node``) with the layouts ``layout_of(node)``: q ``[.., L, E]`` with the row letter
    ``i`` a batch dim on one mesh axis and the queries ``L`` on the other, k / v ``[.., S, E]``
    with ``i`` on the same axis as q's and the keys ``S`` on the queries' axis; ``attn_mask``
    None, a float triangle bias ``[.., L, S]`` (no ``i``), a float additive key mask or a
    bool keep-mask ``[.., i?, 1, S]``. Registered for :func:`tile_attention`: ``(spec, key)``;
    raises :class:`AttentionMismatch` saying what does not fit."""
    q, k, v = node.args[:3]
    kw = dict(node.kwargs)
    for name, a in zip(["attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"], node.args[3:]):
        kw[name] = a
    where = f"SDPA node {node.name!r}"
    if kw.get("enable_gqa") or kw.get("is_causal") or float(kw.get("dropout_p") or 0.0) != 0.0:
        raise AttentionMismatch(f"{where}: causal / dropout / grouped-query attention is not a triangle attention")
    mask = kw.get("attn_mask")
    qv, kv_, vv = (x.meta["val"] for x in (q, k, v))
    if not (qv.dim() == kv_.dim() == vv.dim()) or qv.dim() < 3 or qv.shape[-1] != vv.shape[-1]:
        raise AttentionMismatch(f"{where}: q / k / v ranks or widths do not fit the ring")
    nb = qv.dim() - 2
    bat = "abcdefghijk"[:nb]
    lq, lk, lv, lout = bat + "LE", bat + "SE", bat + "SF", bat + "LF"
    tq, tk, tv = (dict(zip(ls, layout_of(x) or ())) for ls, x in ((lq, q), (lk, k), (lv, v)))
    rows = [ch for ch in bat if tq.get(ch) in TOKEN]
    if len(rows) != 1 or tq.get("L") not in TOKEN or tq["L"] == tq[rows[0]]:
        raise AttentionMismatch(f"{where}: q has no row token axis and query axis on the two mesh axes")
    i = rows[0]
    rtag, ktag = tq[i], tq["L"]
    if tk.get(i) != rtag or tk.get("S") != ktag or tv.get(i) != rtag or tv.get("S") != ktag:
        raise AttentionMismatch(f"{where}: k / v are not laid out like q's rows and keys")
    biases, masks, term_tags = [], [], {}
    if isinstance(mask, torch.fx.Node):
        shape = tuple(qv.shape[:-1]) + (kv_.shape[-2],)
        al = _align(mask, bat + "LS", shape)
        if mask.meta["val"].dtype == torch.bool:
            if "L" in al or "S" not in al:
                raise AttentionMismatch(f"{where}: a bool attn_mask must be a key mask [.., 1, S]")
            masks.append(("keep", mask, al, 0.0))
        elif "L" in al and "S" in al and i not in al:
            biases.append((mask, al, 1.0))
        elif "L" not in al and "S" in al:
            if _has_param_ancestor(mask):
                raise AttentionMismatch(f"{where}: the key term depends on parameters (not a mask)")
            masks.append(("add", mask, al, 1.0))
        else:
            raise AttentionMismatch(f"{where}: attn_mask over {al!r} is neither a triangle bias [L, S] nor a "
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
        raise AttentionMismatch(f"autocp triangle attention: token sizes {sizes}; required {ctx.b} (b = "
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
                raise AttentionMismatch(
                    f"autocp triangle attention: the fill value {val[0].name} of the key mask {_n.name} is not a "
                    f"huge negative (<= {MASK_NEG}); the ring cannot follow it. Fix: register the module.")
        mt = _canon(t.detach(), al, bm + [sp.i, sp.kk], sizes).reshape(bsz, b, b)
        if kind == "add":
            mt = mt * val
            if not bool(((mt == 0) | (mt <= MASK_NEG)).all()):
                raise AttentionMismatch(
                    f"autocp triangle attention: the additive key term {_n.name} takes values other than 0 and "
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


# ----------------------------------------------------------------------------- letters
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

def contraction_letters(node):
    """(spec_a, spec_b, spec_out, operand nodes) of a two-operand contraction, or raise."""
    name = _name(node.target)
    if name == "einsum":
        eq = node.args[0].replace(" ", "")
        ops = list(node.args[1])
        spec = einsum_letters(eq, [o.meta["val"].dim() for o in ops]) if len(ops) == 2 else None
        if spec is None:
            raise AttentionMismatch(f"einsum {eq!r} with {len(ops)} operands is not supported")
        (sa, sb), rhs = spec
        return sa, sb, rhs, ops
    if name in ("matmul", "bmm", "mm"):
        a, b = node.args[0], node.args[1]
        ra, rb = a.meta["val"].dim(), b.meta["val"].dim()
        if ra < 2 or rb < 2 or ra != rb:
            raise AttentionMismatch(f"{name} of ranks {ra} x {rb} (broadcasting matmul) is not supported")
        if tuple(a.meta["val"].shape[:-2]) != tuple(b.meta["val"].shape[:-2]):
            raise AttentionMismatch(f"{name} with broadcast batch dims is not supported")
        batch = _LETTERS[: ra - 2]
        return batch + "ik", batch + "kj", batch + "ij", [a, b]
    raise AttentionMismatch(f"contraction {name} is not supported (einsum/matmul/bmm/mm are)")
