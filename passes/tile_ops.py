"""Runtime of the emitted tile programs: the redistributions and distributed reductions
that :mod:`autocp.passes.shard` inserts into a rewritten graph.

Every function here runs on one rank, on local tiles, inside
:func:`autocp.passes.context.tile_context` (it reads the mesh, the global token count N
and the MSA depth from it). All are differentiable and keep the project's gradient
convention: for any value, summing the local gradients over every rank that holds a copy
of an element gives that element's single-device gradient.

Tags (one per tensor dim, see :mod:`autocp.passes.shard`): ``None`` -- the dim is whole
(replicated); ``"r"`` / ``"c"`` -- block ``T_r`` / ``T_c`` of the N token axis (zero-padded to
``ceil(N/p)``); ``"s"`` -- block ``S_r`` of the MSA depth axis; ``(tag, outer, inner)`` -- a
dim that merges ``outer`` x tagged axis x ``inner`` (row-major).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import comm
from ..layout import block_size
from ..mesh import COL, ROW
from .context import current

__all__ = [
    "base_tag", "axis_of", "index_of", "global_len",
    "slice_block", "gather_dim", "convert", "valid_1d", "mask_pad", "masked_copy", "contract_n", "safe_root", "arg_extreme", "max_dim",
    "reduce_sum", "reduce_amax", "softmax", "log_softmax", "logsumexp", "contract", "pair_contract",
    "reduce_var",
    "sdpa_keys_sharded", "msa_contract", "pair_msa_contract", "skewed_ring", "zero_out_pad", "narrow_global", "select_global", "index_select_global", "draw_global", "dropout_global",
    "zero_pad_index",
]


def base_tag(t):
    return t[0] if isinstance(t, tuple) else t


#: merged tags of a dim that merges two token axes, row-major (a pair ``[.., i, j, ..]``
#: reshaped to ``[.., i*j, ..]``): ``("rc", outer, inner)`` = outer x T_r x T_c x inner
PAIR_MERGED = ("rc", "cr")


def factor_tags(t) -> list:
    """The token tags a (merged) tag is made of: ``"r"`` -> ``["r"]``, ``("rc", o, i)`` ->
    ``["r", "c"]``."""
    b = base_tag(t)
    return list(b) if b in PAIR_MERGED else [b]


def axis_of(t) -> str:
    """The mesh group over which blocks of tag ``t`` vary ('r'/'s' along the column group)."""
    return COL if base_tag(t) in ("r", "s") else ROW


def index_of(t, mesh) -> int:
    return mesh.r if base_tag(t) in ("r", "s") else mesh.c


def global_len(t, n: int, n_seq: Optional[int]) -> int:
    return n_seq if base_tag(t) == "s" else n


def _ctx():
    info = current()
    return info.mesh, info.n, info.n_seq


def valid_1d(t, device=None) -> torch.Tensor:
    """Bool ``[b]``: which slots of this rank's block of tag ``t`` are real tokens."""
    mesh, n, n_seq = _ctx()
    L = global_len(t, n, n_seq)
    b = block_size(L, mesh.p)
    lo = index_of(t, mesh) * b
    return (torch.arange(b, device=device) + lo) < L


def _valid_for(x: torch.Tensor, dim: int, t) -> torch.Tensor:
    """A bool tensor broadcastable to ``x``: False on padding slots of ``dim`` (tag ``t``)."""
    if base_tag(t) in PAIR_MERGED:
        tag, outer, inner = t
        va, vb = valid_1d(tag[0], x.device), valid_1d(tag[1], x.device)
        v = (va[:, None] & vb[None, :]).reshape(-1)
        v = v[None, :, None].expand(outer, v.shape[0], inner).reshape(-1)
    else:
        v = valid_1d(base_tag(t), x.device)
    if isinstance(t, tuple) and base_tag(t) not in PAIR_MERGED:
        _, outer, inner = t
        v = v[None, :, None].expand(outer, v.shape[0], inner).reshape(-1)
    shape = [1] * x.dim()
    shape[dim] = v.shape[0]
    return v.view(shape)


def mask_pad(x: torch.Tensor, dims_tags, fill=0.0) -> torch.Tensor:
    """``x`` with the padding slots of the given ``[(dim, tag)]`` set to ``fill`` (NaN-safe)."""
    keep = None
    for d, t in dims_tags:
        v = _valid_for(x, d, t)
        keep = v if keep is None else (keep & v)
    if keep is None:
        return x
    return torch.where(keep, x, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def masked_copy(x: torch.Tensor, dims_tags, dtype=None, fill=0.0) -> torch.Tensor:
    """A fresh contiguous copy of ``x`` (cast to ``dtype``) with the padding slots of
    ``[(dim, tag)]`` set to ``fill``: one copy, where ``mask_pad(x).contiguous()`` makes
    two when ``x`` is a permuted view (the fill is in place on the fresh copy; NaN-safe)."""
    y = x.to(dtype or x.dtype, copy=True, memory_format=torch.contiguous_format)
    keep = None
    for d, t in dims_tags:
        v = _valid_for(y, d, t)
        keep = v if keep is None else (keep & v)
    if keep is not None:
        y.masked_fill_(~keep, fill)
    return y


def zero_pad_index(x: torch.Tensor, tags) -> torch.Tensor:
    """Index tensors: padding slots set to 0 so an embedding / one-hot / gather never sees
    an out-of-range value computed in padding."""
    dt = [(d, t) for d, t in enumerate(tags) if t is not None]
    return mask_pad(x, dt, 0) if dt else x


def _per_factor(x: torch.Tensor, dim: int, t, fn, length) -> torch.Tensor:
    """``fn(y, d, tag)`` on each token factor of the merged tag ``t`` = ``(tag, outer, inner)``
    of ``dim`` (``"rc"``: two factors), ``length(tag)``: a factor's current length."""
    _, outer, inner = t
    tags = factor_tags(t)
    shp = list(x.shape)
    y = x.reshape(shp[:dim] + [outer] + [length(tg) for tg in tags] + [inner] + shp[dim + 1:])
    for k, tg in enumerate(tags):
        y = fn(y, dim + 1 + k, tg)
    return y.reshape(shp[:dim] + [-1] + shp[dim + 1:])


def slice_block(x: torch.Tensor, dim: int, t) -> torch.Tensor:
    """Whole dim -> this rank's block of tag ``t`` (no communication). Its padding slots hold
    a constant copy of the dim's last element (detached: no gradient), not zeros: a value
    computed before the slice (``mask.sum(-1) + eps``) stays a value the model itself
    produces, so ``x / it`` on padding is finite, and its backward cannot turn the zero
    gradient of a padding slot into ``0 / 0 = NaN``. What reads padding (sums, softmax,
    contractions over a sharded dim) masks it explicitly."""
    mesh, n, n_seq = _ctx()
    if isinstance(t, tuple):
        return _per_factor(x, dim, t, slice_block, lambda tg: global_len(tg, n, n_seq))
    L = x.shape[dim]
    b = block_size(L, mesh.p)
    idx = index_of(t, mesh)
    lo, hi = min(idx * b, L), min((idx + 1) * b, L)
    part = x.narrow(dim, lo, hi - lo)
    if hi - lo == b or L == 0:
        return part
    shape = list(x.shape)
    shape[dim] = b - (hi - lo)
    fill = x.narrow(dim, L - 1, 1).detach().expand(shape)
    return torch.cat([part, fill], dim)


def gather_dim(x: torch.Tensor, dim: int, t) -> torch.Tensor:
    """This rank's block of tag ``t`` on ``dim`` -> the whole dim (all-gather along the mesh
    axis the blocks vary over; backward: reduce-scatter)."""
    mesh, n, n_seq = _ctx()
    if isinstance(t, tuple):
        return _per_factor(x, dim, t, gather_dim, lambda tg: block_size(global_len(tg, n, n_seq), mesh.p))
    L = global_len(t, n, n_seq)
    y = comm.all_gather_axis(x, mesh, axis_of(t), dim)
    return y.narrow(dim, 0, L)


def _swap(t):
    m = {"r": "c", "c": "r", "rc": "cr", "cr": "rc"}
    if isinstance(t, tuple):
        return (m.get(t[0], t[0]),) + tuple(t[1:])
    return m.get(t, t)


def convert(x: torch.Tensor, src, dst) -> torch.Tensor:
    """Redistribute ``x`` from tags ``src`` to tags ``dst`` (same global shape)."""
    src, dst = tuple(src), tuple(dst)
    if src == dst:
        return x
    mesh = current().mesh
    # a pure r<->c swap on every tagged dim is one transpose exchange with rank (c, r)
    if (any(s is not None for s in src) and all(_swap(s) == d for s, d in zip(src, dst))
            and not any(base_tag(s) == "s" for s in src)):
        return comm.transpose_exchange(x, mesh)
    cur = list(src)
    for d, (s, t) in enumerate(zip(src, dst)):
        if s != t and s is not None:
            x = gather_dim(x, d, s)
            cur[d] = None
    for d, (s, t) in enumerate(zip(cur, dst)):
        if s != t:
            x = slice_block(x, d, t)
    return x


# ----------------------------------------------------------------------------- reductions
def reduce_sum(x: torch.Tensor, dims, keepdim: bool, tagged, dtype=None, mean_count=None):
    """``sum`` over ``dims`` of which ``tagged = [(dim, tag)]`` are block-sharded: padding
    masked, local sum, then one all-reduce per mesh axis involved. ``mean_count``: divide
    by the global element count (``mean``)."""
    mesh = current().mesh
    if tagged:
        x = mask_pad(x, tagged, 0)
    y = torch.sum(x, dims, keepdim=keepdim, dtype=dtype) if dims else torch.sum(x, dtype=dtype)
    for ax in sorted({axis_of(t) for _, t in tagged}):
        y = comm.all_reduce(y, mesh, ax)
    if mean_count is not None:
        y = y / mean_count
    return y


def safe_root(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x ** (1/p)`` for ``x >= 0`` with a zero (not NaN) gradient where ``x == 0`` (what
    ``torch.linalg.vector_norm``'s backward gives for an all-zero vector)."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)) ** (1.0 / p), torch.zeros_like(x))


def reduce_var(x: torch.Tensor, dims, keepdim: bool, tagged, correction, count: int, kind: str = "var"):
    """``var`` / ``std`` / ``var_mean`` / ``std_mean`` over ``dims`` of which ``tagged`` are block-sharded:
    the global mean by one all-reduced sum, then the all-reduced sum of squared deviations
    (two passes, as numerically safe as torch's), divided by ``count - correction``
    (``count``: the global element count of the reduced dims)."""
    mean = reduce_sum(x, dims, True, tagged, None, count)
    d = x - mean
    var = reduce_sum(d * d, dims, keepdim, tagged) / (count - correction)
    out = var.sqrt() if kind.startswith("std") else var
    if kind.endswith("_mean"):
        return out, (mean if keepdim else mean.squeeze(dims))
    return out


class _AllReduceMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis):
        y = x.clone()
        return comm.all_reduce_(y, mesh, axis, name="all_reduce_max", op="max")

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def _allmax(x, mesh, axis):
    return _AllReduceMax.apply(x, mesh, axis) if mesh.p > 1 else x


def reduce_amax(x: torch.Tensor, dims, keepdim: bool, tagged, neg: bool = False):
    """``amax`` (or ``amin`` with ``neg``) over ``dims`` with block-sharded ``tagged`` dims.
    Backward: the gradient goes to the (global) arg-extremum positions, split among ties."""
    mesh = current().mesh
    if not x.dtype.is_floating_point:  # integers / bools (no gradient): the global extremum itself
        xs = -x.to(torch.int64) if neg else x.to(torch.int64)
        xm = mask_pad(xs, tagged, torch.iinfo(torch.int64).min) if tagged else xs
        glob = torch.amax(xm, dims, keepdim=True)
        if mesh.p > 1:
            for ax in sorted({axis_of(t) for _, t in tagged}):
                glob = comm.all_reduce_(glob.clone(), mesh, ax, name="all_reduce_max", op="max")
        glob = (-glob if neg else glob).to(x.dtype)
        return glob if keepdim else (glob.squeeze(tuple(dims)) if dims else glob.reshape(()))
    xs = -x if neg else x
    xm = mask_pad(xs, tagged, float("-inf")) if tagged else xs
    loc = torch.amax(xm, dims, keepdim=True)
    glob = loc
    for ax in sorted({axis_of(t) for _, t in tagged}):
        glob = _allmax(glob.detach(), mesh, ax)
    glob = glob.detach()
    hit = (xm == glob).to(x.dtype)
    cnt = hit.sum(dims, keepdim=True)
    for ax in sorted({axis_of(t) for _, t in tagged}):
        cnt = comm.all_reduce(cnt, mesh, ax)
    # value = glob, gradient = sum(x * hit) / cnt (exact at the extremum)
    val = ((xs * hit).sum(dims, keepdim=True))
    for ax in sorted({axis_of(t) for _, t in tagged}):
        val = comm.all_reduce(val, mesh, ax)
    out = val / cnt
    if not keepdim:
        out = out.squeeze(tuple(dims)) if dims else out.reshape(())
    return -out if neg else out


def arg_extreme(x: torch.Tensor, dim: int, t, keepdim: bool = False, largest: bool = True) -> torch.Tensor:
    """``argmax`` / ``argmin`` along one block-sharded dim: the *global* index of the first
    extremum (as ``torch.argmax``), identical on every rank of the mesh axis."""
    mesh, n, n_seq = _ctx()
    if t is None or isinstance(t, tuple):
        raise ValueError(f"arg_extreme: given tag {t!r}; required one block-sharded axis tag")
    xs = x if largest else -x
    if not xs.dtype.is_floating_point:
        xs = xs.to(torch.float64)
    xm = mask_pad(xs, [(dim, t)], float("-inf"))
    loc, idx = torch.max(xm, dim, keepdim=True)
    b = block_size(global_len(t, n, n_seq), mesh.p)
    gidx = idx + index_of(t, mesh) * b
    glob = loc
    if mesh.p > 1:
        glob = comm.all_reduce_(loc.clone(), mesh, axis_of(t), name="all_reduce_max", op="max")
    big = torch.iinfo(torch.int64).max
    cand = torch.where(loc == glob, -gidx, torch.full_like(gidx, -big))  # first index: max of -index
    if mesh.p > 1:
        cand = comm.all_reduce_(cand, mesh, axis_of(t), name="all_reduce_max", op="max")
    out = -cand
    return out if keepdim else out.squeeze(dim)


def max_dim(x: torch.Tensor, dim: int, t, keepdim: bool = False, largest: bool = True):
    """``torch.max(x, dim)`` / ``torch.min`` along one block-sharded dim: ``(values, global
    indices)``; the gradient goes to the returned index, as in torch."""
    mesh, n, n_seq = _ctx()
    idx = arg_extreme(x, dim, t, True, largest)
    b = block_size(global_len(t, n, n_seq), mesh.p)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    pos = (torch.arange(x.shape[dim], device=x.device) + index_of(t, mesh) * b).view(shape)
    hit = pos == idx
    val = torch.where(hit, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim, keepdim=True)
    if mesh.p > 1:
        val = comm.all_reduce(val, mesh, axis_of(t))
    if not keepdim:
        val, idx = val.squeeze(dim), idx.squeeze(dim)
    return val, idx


def _stable_max(x, dim, t):
    mesh = current().mesh
    xm = mask_pad(x, [(dim, t)], float("-inf"))
    m = torch.amax(xm.detach(), dim, keepdim=True)
    m = _allmax(m, mesh, axis_of(t))
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m)), xm


def logsumexp(x: torch.Tensor, dim: int, t, keepdim: bool = True) -> torch.Tensor:
    mesh = current().mesh
    m, xm = _stable_max(x, dim, t)
    s = comm.all_reduce(torch.exp(xm - m).sum(dim, keepdim=True), mesh, axis_of(t))
    out = torch.log(s) + m
    return out if keepdim else out.squeeze(dim)


def softmax(x: torch.Tensor, dim: int, t, out_dtype=None) -> torch.Tensor:
    """Softmax over a block-sharded dim (padding gets weight 0). ``out_dtype``: the result
    dtype (``_softmax(half_to_float=True)``)."""
    mesh = current().mesh
    xf = x if out_dtype is None else x.to(out_dtype)
    m, xm = _stable_max(xf, dim, t)
    e = torch.exp(xm - m)
    s = comm.all_reduce(e.sum(dim, keepdim=True), mesh, axis_of(t))
    return e / s


def log_softmax(x: torch.Tensor, dim: int, t, out_dtype=None) -> torch.Tensor:
    xf = x if out_dtype is None else x.to(out_dtype)
    return xf - logsumexp(xf, dim, t, keepdim=True)


def contract(fn, a: torch.Tensor, b: torch.Tensor, a_dims_tags, b_dims_tags, tags, *extra):
    """``fn(a, b, *extra)`` where the contracted dims are block-sharded with ``tags``: both
    operands' padding zeroed (NaN-safe), local product = a partial sum, all-reduced over
    the mesh axes of the contracted tags."""
    mesh = current().mesh
    a = mask_pad(a, a_dims_tags, 0)
    b = mask_pad(b, b_dims_tags, 0)
    y = fn(a, b, *extra)
    for ax in sorted({axis_of(t) for t in tags}):
        y = comm.all_reduce(y, mesh, ax)
    return y


def contract_n(fn, operands: list, dims_tags: list, tags):
    """``fn(*operands)`` (three or more operands) where the contracted dims are
    block-sharded with ``tags``: each operand's padding along its sharded summed dims
    zeroed, the local product is a partial sum, all-reduced over those mesh axes."""
    mesh = current().mesh
    ops = [mask_pad(x, dt, 0) if dt else x for x, dt in zip(operands, dims_tags)]
    y = fn(*ops)
    for ax in sorted({axis_of(t) for t in tags}):
        y = comm.all_reduce(y, mesh, ax)
    return y


def pair_contract(a: torch.Tensor, b: torch.Tensor, la: str, lb: str, lo: str, batch: str, x: str, y: str,
                  k: str, direction: str, out_dtype) -> torch.Tensor:
    """``einsum(f"{la},{lb}->{lo}", a, b)`` where ``a`` holds token letters ``x, k`` and ``b``
    ``y, k`` as Pair2D tiles and ``k`` is summed over all N tokens: the triangle contraction,
    by the Cannon ring of :func:`autocp.ops.triangle_mult.trimul_contract` (O(N^2/P) per rank;
    the whole rows/columns are never gathered).

    ``direction="outgoing"``: ``a``'s tile is ``[x: T_r, k: T_c]`` and ``b``'s ``[y: T_r, k: T_c]``;
    ``"incoming"``: ``a`` ``[k: T_r, x: T_c]``, ``b`` ``[k: T_r, y: T_c]``. ``batch``: the letters
    carried through (in both operands; size-1 broadcast allowed); those absent from ``lo``
    are summed after the ring. Padding of ``k`` is zeroed in both operands. Result:
    ``lo`` with ``x`` on ``T_r`` and ``y`` on ``T_c``, cast to ``out_dtype``."""
    from ..ops.triangle_mult import trimul_contract

    mesh = current().mesh
    kk = (x + k) if direction == "outgoing" else (k + x)
    ky = (y + k) if direction == "outgoing" else (k + y)
    a2 = torch.einsum(f"{la}->{batch}{kk}", a)
    b2 = torch.einsum(f"{lb}->{batch}{ky}", b)
    nb = len(batch)
    bshape = [max(u, v) for u, v in zip(a2.shape[:nb], b2.shape[:nb])]
    a2 = a2.expand(*bshape, *a2.shape[nb:])
    b2 = b2.expand(*bshape, *b2.shape[nb:])
    kdim, ktag = (nb + 1, "c") if direction == "outgoing" else (nb, "r")
    a2 = masked_copy(a2, [(kdim, ktag)], torch.float32)
    b2 = masked_copy(b2, [(kdim, ktag)], torch.float32)
    with torch.autocast(a.device.type, enabled=False):
        out = trimul_contract(a2, b2, mesh, direction)
    return zero_out_pad(torch.einsum(f"{batch}{x}{y}->{lo}", out), lo, {x: "r", y: "c"}).to(out_dtype)


def msa_contract(a: torch.Tensor, b: torch.Tensor, la: str, lb: str, lo: str, x: str, y: str, q: str,
                 out_dtype) -> torch.Tensor:
    """``einsum(f"{la},{lb}->{lo}", a, b)`` where both operands are MSA tiles -- the MSA letter
    ``q`` on the mesh rows (``S_r``), token letter ``x`` (of ``a``) / ``y`` (of ``b``) on the
    columns (``T_c``) -- and ``q`` is summed: the outer product mean's contraction, by the
    sequence-block ring of :class:`autocp.ops.outer_product.OuterProductMean2D` (``a``
    transposed across the grid once, then ``a`` rings along the mesh row and ``b`` along the
    column, skewed so both hold the same sequence block; ``p`` steps). MSA padding rows are
    zeroed. Result: ``lo`` with ``x`` on ``T_r`` and ``y`` on ``T_c`` (other letters as the
    einsum puts them), cast to ``out_dtype``; differentiable (the ring's explicit backward)."""
    mesh = current().mesh
    ra = "".join(ch for ch in la if ch not in (q, x))
    rb = "".join(ch for ch in lb if ch not in (q, y))
    a2 = masked_copy(torch.einsum(f"{la}->{ra}{q}{x}", a), [(len(ra), "s")], torch.float32)
    b2 = masked_copy(torch.einsum(f"{lb}->{rb}{q}{y}", b), [(len(rb), "s")], torch.float32)
    a2 = comm.transpose_exchange(a2, mesh)            # a[S_c, T_r]
    # a[S_{r+c+step}, T_r] along the row, b[S_{r+c+step}, T_c] along the column
    out = skewed_ring(a2, b2, lambda u, v: torch.einsum(f"{ra}{q}{x},{rb}{q}{y}->{lo}", u, v))
    return zero_out_pad(out, lo, {x: "r", y: "c"}).to(out_dtype)


def skewed_ring(row_x: torch.Tensor, col_x: torch.Tensor, product) -> torch.Tensor:
    """``sum_k product(row_x_k, col_x_k)`` over the ``p`` blocks ``k`` of a summed axis:
    ``row_x`` (whose block varies along the mesh row) is skewed by ``r`` and ``col_x`` (varying
    along the column) by ``c``, so rank ``(r, c)`` holds the same block ``k = r + c + step`` of
    both; then ``p`` steps, each one ring shift of both (fp32, autocast off; O(tile) memory;
    differentiable: the shifts have explicit backwards)."""
    mesh = current().mesh
    row_x = comm.ring_shift(row_x, mesh, ROW, mesh.r)
    col_x = comm.ring_shift(col_x, mesh, COL, mesh.c)
    out = None
    with torch.autocast(row_x.device.type, enabled=False):
        for step in range(mesh.p):
            if step:
                row_x = comm.ring_shift(row_x, mesh, ROW, 1)
                col_x = comm.ring_shift(col_x, mesh, COL, 1)
            prod = product(row_x, col_x)
            out = prod if out is None else out + prod
    return out


def pair_msa_contract(m: torch.Tensor, w: torch.Tensor, eq: str, msa_first: bool, q: str, i: str, j: str, jm: int,
                      jw: int, out_dtype) -> torch.Tensor:
    """``einsum(eq, ...)`` of an MSA tile ``m`` (its MSA letter on the mesh rows ``S_r``, token
    letter ``j`` on the columns ``T_c``) and a Pair2D tile ``w`` (token letters ``i`` on ``T_r``,
    ``j`` on ``T_c``), ``j`` summed over all N tokens, ``i`` kept: pair-weighted averaging
    (``einsum("bhij,bhsjd->bhsid", weights, values)``). The result is an MSA tile: its MSA
    letter on ``S_r``, ``i`` on ``T_c``. Rank ``(r, c)`` needs ``m[S_r, T_k]`` and
    ``w[T_c, T_k]`` for every ``k``: ``w`` is exchanged across the grid once (``w[T_c, T_r]``),
    then ``m`` rings along the mesh row and ``w`` along the column, skewed so both hold the
    same block ``k = r + c + step`` (``p`` steps, O(tile) memory). ``jm`` / ``jw``: the dim of
    ``j`` in each (its padding zeroed). ``msa_first``: ``m`` is the equation's first operand.
    Differentiable (the ring's communication has explicit backwards)."""
    mesh = current().mesh
    m2 = masked_copy(m, [(jm, "c")], torch.float32)
    w2 = masked_copy(w, [(jw, "c")], torch.float32)
    w2 = comm.transpose_exchange(w2, mesh)           # w[T_c, T_r]
    # m[S_r, T_{r+c+step}] along the row, w[T_c, T_{r+c+step}] along the column
    out = skewed_ring(m2, w2, lambda u, v: torch.einsum(eq, u, v) if msa_first else torch.einsum(eq, v, u))
    return zero_out_pad(out, eq.split("->")[1], {q: "s", i: "c"}).to(out_dtype)


def zero_out_pad(out: torch.Tensor, letters: str, tags: dict) -> torch.Tensor:
    """A ring contraction's output with its padding slots zeroed (``torch.where``): what the
    model computes downstream on padding (a count of 0, then ``x / count``) may be inf / NaN,
    and its gradient must not reach the ring's operands (``NaN * 0`` is NaN)."""
    return mask_pad(out, [(letters.index(ch), t) for ch, t in tags.items() if ch in letters])


def sdpa_keys_sharded(q, k, v, mask, scale, key_tag, dropout_p=0.0, is_causal=False):
    """``scaled_dot_product_attention`` whose key/value sequence dim (-2) is block-sharded
    with ``key_tag``: local scores, one max and two sum all-reduces (exact softmax over all
    keys; padding keys get weight 0). ``mask``: bool (True = attend) or additive float,
    already in local layout (or None)."""
    if dropout_p:
        raise NotImplementedError("attention dropout over sharded keys")
    if is_causal:
        raise NotImplementedError("causal attention over sharded keys")
    mesh = current().mesh
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-2, -1)) * sc
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask
    m, sm = _stable_max(s, s.dim() - 1, key_tag)
    e = torch.exp(sm - m)
    den = comm.all_reduce(e.sum(-1, keepdim=True), mesh, axis_of(key_tag))
    vz = mask_pad(v, [(v.dim() - 2, key_tag)], 0)
    num = comm.all_reduce(torch.matmul(e.to(v.dtype), vz), mesh, axis_of(key_tag))
    return num / den.to(num.dtype)


# ----------------------------------------------------------------------------- indexing
def narrow_global(x: torch.Tensor, dim: int, t, start: int, length: int) -> torch.Tensor:
    """``x.narrow(dim, start, length)`` on a block-sharded dim: the owning ranks contribute
    their part, one all-reduce along the axis; the result dim is whole."""
    mesh, n, n_seq = _ctx()
    L = global_len(t, n, n_seq)
    b = block_size(L, mesh.p)
    lo = index_of(t, mesh) * b
    a0, a1 = max(start, lo), min(start + length, lo + b, L)
    if a1 > a0:
        part, left, right = x.narrow(dim, a0 - lo, a1 - a0), a0 - start, start + length - a1
    else:
        # not an owner: an empty part still ties the result to x, so that the all-reduce's
        # backward runs on every rank of the group (a rank without it would hang the others)
        part, left, right = x.narrow(dim, 0, 0), length, 0

    def zeros(k):
        shape = list(x.shape)
        shape[dim] = k
        return x.new_zeros(shape)

    pieces = ([zeros(left)] if left else []) + [part] + ([zeros(right)] if right else [])
    out = torch.cat(pieces, dim) if len(pieces) > 1 else part
    return comm.all_reduce(out, mesh, axis_of(t))


def index_select_global(x: torch.Tensor, dim: int, t, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, idx)`` on a block-sharded dim with a whole index: each rank
    contributes the indices it owns, one all-reduce along the axis; the result dim is whole
    (``len(idx)``). Every rank's result depends on ``x`` (the backward all-reduce runs on all)."""
    mesh, n, n_seq = _ctx()
    b = block_size(global_len(t, n, n_seq), mesh.p)
    rel = idx - index_of(t, mesh) * b
    own = (rel >= 0) & (rel < b)
    picked = x.index_select(dim, rel.clamp(0, b - 1))
    shape = [1] * x.dim()
    shape[dim] = idx.numel()
    picked = torch.where(own.view(shape), picked, torch.zeros((), dtype=x.dtype, device=x.device))
    return comm.all_reduce(picked, mesh, axis_of(t))


def select_global(x: torch.Tensor, dim: int, t, index: int) -> torch.Tensor:
    mesh, n, n_seq = _ctx()
    L = global_len(t, n, n_seq)
    return narrow_global(x, dim, t, index % L, 1).squeeze(dim)


# ----------------------------------------------------------------------------- random numbers
_DRAWS = {"rand": torch.rand, "randn": torch.randn}


def draw_global(kind: str, global_shape, tags, *args, **kwargs) -> torch.Tensor:
    """Draw a random tensor (``kind`` ``"rand"`` / ``"randn"``: a name, so the emitted graph's
    code can spell it) at its *global* shape (the same numbers as the single-device run,
    given the same generator state on every rank) and keep this rank's block."""
    x = _DRAWS[kind](list(global_shape), *args, **kwargs)
    for d, t in enumerate(tags):
        if t is not None:
            x = slice_block(x, d, t)
    return x


def dropout_global(x: torch.Tensor, p: float, train, tags, global_shape):
    """``aten.native_dropout`` with the mask drawn at the global shape (single-device
    numbers), then sliced to this rank's block. Returns ``(out, mask)``."""
    if not train or p == 0:
        return x.clone(), torch.ones_like(x, dtype=torch.bool)
    keep = torch.empty(list(global_shape), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    for d, t in enumerate(tags):
        if t is not None:
            keep = slice_block(keep, d, t)
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    return x * keep * scale, keep.bool()
