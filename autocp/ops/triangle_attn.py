"""2D-parallel triangle attention (Boltz ``TriangleAttention`` starting / ending node).

Layout
------
Rank ``(r, c)`` of a ``p x p`` mesh holds the Pair2D tile ``z[:, T_r, T_c, :]`` of local
shape ``[B, b, b, C]`` (``b = ceil(N/p)``, last block zero-padded) and the pair-mask tile
``mask[:, T_r, T_c]`` of shape ``[B, b, b]``; it returns the output tile
``out[:, T_r, T_c, :]`` of shape ``[B, b, b, C]`` (padded slots are 0).

Starting node (Boltz Algorithm 13, the non-chunked, non-kernel path)
--------------------------------------------------------------------
``x = LN(z)``; for every row ``i`` the query ``(i, j)`` attends the keys ``(i, k)`` of
the same row with bias ``tri[h, j, k] = linear(x)[j, k, h]`` and
``mask_bias[i, k] = 1e9 * (mask[i, k] - 1)``; gating + output projection per query.

Distributed algorithm (rank ``(r, c)``, queries ``i in T_r, j in T_c`` stay local):

* K/V (and the key mask) of rows ``T_r`` for key block ``T_t`` are computed on rank
  ``(r, t)``: they travel on a ring along the mesh **row**.
* The bias tile ``tri[T_c, T_t]`` is the local ``linear(x)`` tile of rank ``(c, t)``.
  One fused "transpose + skew" send puts ``tri[T_c, T_{r+c}]`` on rank ``(r, c)`` (rank
  ``(a, b)`` sends its tile to ``(b - a, a)``); after that it travels on a ring along the
  mesh **column**.
* Both rings are skewed so step ``s`` uses key block ``t = (r + c + s) mod p``; the
  next exchange is posted before the current block is computed (double buffering); the
  per-block ``(out, lse)`` from :func:`autocp.kernels.tile_attention_fwd` merge by
  :func:`autocp.ops.common.merge_lse`.
* Backward (explicit, :class:`TriAttnRing`) recomputes every block's scores: the same
  rings run again, the K/V gradient accumulator ``(dk, dv)`` (fp32) travels with its
  block along the row and the bias gradient ``dtri`` (fp32) along the column; after the
  last step one fused send returns each accumulator to its home rank (``dk, dv`` to
  ``(r, t)``; ``dtri[T_c, T_t]`` to ``(c, t)``, i.e. un-skew + transpose in one message).

Fully masked rows: in fp32 Boltz every score of a row ``i`` whose keys are all masked
equals ``-1e9`` exactly (the ``1e9`` swamps ``q.k + tri``), so Boltz returns the
*uniform* average of ``v[i, k]`` over all ``N`` real keys, and its backward still sends
``ds = (dout.v_k - dout.out) / N`` into ``q``, ``k`` and ``tri``. This op reproduces
that: a row with no valid key takes the uniform path (forward: running sum of ``v``
over real keys; backward: the tile kernel with a zero query, no bias, ``lse = log N``,
plus the ``ds^T q`` term for ``dk``). autocp's own padding keys never get any weight
(``key_valid=False``). Masks must be binary (0/1), as in Boltz.

Ending node = the starting node on ``z^T``. Here it runs as the **axis-swapped ring**:
the local tile is transposed (no communication) and the same algorithm runs on the
transposed mesh view (virtual rank ``(c, r)``; the K/V ring then runs along the mesh
*column* and the bias ring along the mesh *row*). This costs exactly the starting
node's volume. The alternative, ``transpose_exchange`` of ``z`` (and the mask) in and of
the output out, would add ``B b^2 C E`` bytes in + ``B b^2 C E`` out (+ the mask) in the
forward and ``2 B b^2 C E`` in the backward on every off-diagonal rank, for no gain.

Communication (bytes *sent* by one rank; ``(r', c')`` = ``(r, c)`` for the starting node
and ``(c, r)`` for the ending node; ``E`` = element size of z's dtype, ``H`` heads of
width ``D``, ``[x]`` = 1 if x else 0). See :func:`comm_bytes`.

* ``S_kv = 2 B b^2 H D E`` (k and v packed), ``S_m = B b^2`` (uint8 key mask),
  ``S_b = B b^2 H E`` (bias tile), ``S_dkv = 2 B b^2 H D * 4``, ``S_db = B b^2 H * 4``
  (fp32 gradient accumulators).
* forward: ``triattn.kv = (p - 1 + [r' != 0]) S_kv``, ``triattn.mask = (p - 1 + [r' != 0]) S_m``,
  ``triattn.bias = (p - 1 + [(r', c') != (0, 0)]) S_b``.
* backward: the same three again (recompute rings), plus
  ``triattn.dkv = (p - 1 + [r' != 1 mod p]) S_dkv`` and
  ``triattn.dbias = (p - 1 + [(r', c') != (1 mod p, 1 mod p)]) S_db``.
* ``p = 1``: nothing.
* backward with ``k`` row chunks (large tiles; :func:`autocp.chunking`): the bias tile
  and its gradient go round once per chunk, so ``triattn.bias`` and ``triattn.dbias`` of
  the backward are ``k`` times the above (``S_b`` is ``1 / (2 D)`` of ``S_kv``); K/V,
  mask and dK/dV travel chunk by chunk (the same bytes in ``k`` times the messages).

Memory per rank: with ``recompute=True`` (the default) backward keeps the input tile
``z [B, b, b, C]``, the mask tile, the fp32 ring output ``[B, b, H, b, D]`` and its LSE
``[B, b, H, b]`` (``O(B b^2 (C + H D + H))``) and recomputes LayerNorm and the projections
from ``z`` (one forward attention pass and its rings fewer than checkpointing the op).
With ``recompute=False`` saved for backward are only local tensors -- ``q [B, b, H, b, D]``,
the packed ``kv [B, b, b, 2, H, D]`` (which is itself the K/V ring buffer), the bias tile
``[B, H, b, b]``, the key mask ``[B, b, b]``, the fp32 output ``[B, b, H, b, D]`` and LSE
``[B, b, H, b]`` -- i.e. ``O(B b^2 (4 H D + H + 1))`` = ``O(N^2 / P)``; received blocks are
dropped after use (at most two received K/V/bias blocks live at a time, plus the two
travelling gradient accumulators in backward). Each ring step processes the query rows
``i`` (independent rows of the triangle) in chunks of ``row_chunk`` rows (default: a
score chunk ``[B, rows, H, b, b]`` of at most :data:`SCORE_CHUNK_ELEMS` elements), so the
reference kernel never materialises the whole ``[B, b, H, b, b]`` score block; chunking
changes neither the results nor the communication. Without autograd (``no_grad`` /
``inference_mode``) nothing is saved and the local K/V block is freed once sent.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .. import comm
from .. import kernels
from ..layout import LayoutError, token_valid
from ..mesh import SquareMesh
from .common import TileCtx, check_pair_tile, chunk_spans, merge_lse, share_submodules

__all__ = ["TriangleAttention2D", "comm_bytes", "row_chunk_for", "SCORE_CHUNK_ELEMS", "NAME"]

NAME = "triattn"


# ----------------------------------------------------------------------------- mesh view
class MeshView:
    """The mesh seen by the algorithm: the real mesh, or its transpose (ending node)."""

    def __init__(self, mesh: SquareMesh, transposed: bool):
        self.mesh = mesh
        self.p = mesh.p
        self.transposed = transposed
        self.r, self.c = (mesh.c, mesh.r) if transposed else (mesh.r, mesh.c)

    def rank(self, r: int, c: int) -> int:
        r, c = r % self.p, c % self.p
        return self.mesh.rank_of(c, r) if self.transposed else self.mesh.rank_of(r, c)

    # (dst, src) pairs of every transfer of the algorithm; None on a 1x1 mesh (no comm,
    # also right for a single-process mesh used inside a multi-rank process group)
    def _peers(self, dst, src):
        if self.p == 1:
            return None
        return self.rank(*dst), self.rank(*src)

    def kv_skew(self):
        r, c = self.r, self.c
        return self._peers((r, c - r), (r, c + r))

    def bias_skew(self):  # fused transpose + skew: (a, b) -> (b - a, a)
        r, c = self.r, self.c
        return self._peers((c - r, r), (c, r + c))

    def row_next(self):
        return self._peers((self.r, self.c - 1), (self.r, self.c + 1))

    def col_next(self):
        return self._peers((self.r - 1, self.c), (self.r + 1, self.c))

    def kv_home(self):  # block t = r + c - 1 after the last step goes home to (r, t)
        r, c = self.r, self.c
        return self._peers((r, r + c - 1), (r, c - r + 1))

    def bias_home(self):  # tri[T_c, T_t], t = r + c - 1, goes home to (c, t)
        r, c = self.r, self.c
        return self._peers((c, r + c - 1), (c - r + 1, r))


class _Done:
    def wait(self) -> None:
        pass


_DONE = _Done()


def _post(x: torch.Tensor, peers, what: str):
    """Post ``x -> dst``, ``recv <- src``; ``peers=None`` (1x1 mesh) is the identity."""
    if peers is None:  # p == 1: also right for a single-process mesh inside a process group
        return x, _DONE
    dst, src = peers
    return comm.start_exchange(x, dst, src, name=f"{NAME}.{what}")


# ----------------------------------------------------------------------------- ring core
#: default budget of one score chunk ``[B, rows, H, b, b]`` (elements; 2**19 fp32 = 2 MiB):
#: the ring step processes the tile's query rows ``i`` (independent rows of the triangle)
#: in chunks of ``row_chunk_for(...)`` rows so at most a few such arrays live at a time.
SCORE_CHUNK_ELEMS = 1 << 19


def row_chunk_for(batch: int, b_rows: int, heads: int, b_q: int, b_k: int,
                  budget_elems: Optional[int] = None) -> int:
    """Rows ``i`` per chunk so one score chunk ``[B, rows, H, b_q, b_k]`` has at most
    ``budget_elems`` (default :data:`SCORE_CHUNK_ELEMS`) elements (at least 1 row)."""
    budget = SCORE_CHUNK_ELEMS if budget_elems is None else int(budget_elems)
    per_row = max(1, batch * heads * b_q * b_k)
    return max(1, min(b_rows, budget // per_row))


def _row_starts(bi: int, rc: int, like: torch.Tensor):
    """Start rows of the row chunks. Under a FakeTensor memory simulation
    (:func:`autocp.estimate`) only the first and last chunk run: every chunk allocates the
    same temporaries into preallocated buffers, so the peak is the same, and a 30,000-token
    estimate does not replay thousands of identical chunk iterations."""
    starts = range(0, bi, rc)
    if is_fake(like) and len(starts) > 2:
        return [starts[0], starts[-1]]
    return starts


def _k_v(kv: torch.Tensor):
    """Views ``k, v [B, b_i, H, b_k, D]`` of a packed ``kv [B, b_i, b_k, 2, H, D]``."""
    return kv[:, :, :, 0].transpose(2, 3), kv[:, :, :, 1].transpose(2, 3)


def _key_valid(valid: torch.Tensor):
    """The kernels' ``key_valid`` ``[B, b_i, 1, b_k]`` for one key block, or ``None`` when
    every key is valid (the kernel then skips its masking pass over the score block)."""
    if not is_fake(valid) and bool(valid.all()):
        return None
    return valid.unsqueeze(2)


def _gather_bias(tri, view: MeshView) -> list:
    """Every bias block this rank's queries use: ``blocks[t] = tri[T_c, T_t]`` (the tile of
    rank ``(c, t)``), by the forward's own bias ring (skew + column shifts) run once."""
    p = view.p
    blocks = [None] * p
    b_t, h_b = _post(tri, view.bias_skew(), "bias")
    for s in range(p):
        h_b.wait()
        cur = b_t
        if s + 1 < p:
            b_t, h_b = _post(cur, view.col_next(), "bias")
        blocks[(view.r + view.c + s) % p] = cur
    return blocks


def ring_forward(q, kv_box: list, tri, mask, view: MeshView, n: int, rc: int, bias_blocks=None):
    """Forward ring of :class:`TriAttnRing` -> ``(out, lse, masked)`` (see there).

    ``kv_box = [kv]``: the list is emptied, so when the caller keeps no other reference
    (no-grad inference) the local K/V block is freed as soon as its skew send is done.
    ``bias_blocks``: the blocks of :func:`_gather_bias` (``tri`` is then unused and no bias
    travels) -- the row-chunked inference path rings K/V once per row chunk.
    """
    p = view.p
    dev = q.device
    B, bi, H, bj, D = q.shape
    kv = kv_box.pop()
    kv_t, h_kv = _post(kv, view.kv_skew(), "kv")
    m_t, h_m = _post(mask, view.kv_skew(), "mask")
    if bias_blocks is None:
        b_t, h_b = _post(tri, view.bias_skew(), "bias")
    else:
        b_t, h_b = None, _DONE
    out = torch.zeros(B, bi, bj, H, D, dtype=torch.float32, device=dev).transpose(2, 3)
    lse = torch.empty(B, bi, H, bj, dtype=torch.float32, device=dev)
    vsum = torch.zeros(B, bi, H, D, dtype=torch.float32, device=dev)
    nvalid = torch.zeros(B, bi, dtype=torch.long, device=dev)
    for s in range(p):
        t = (view.r + view.c + s) % p
        h_kv.wait()
        h_m.wait()
        h_b.wait()
        kv = None  # the caller's K/V block is sent: our reference goes (see kv_box)
        cur_kv, cur_m = kv_t, m_t
        cur_b = b_t if bias_blocks is None else bias_blocks[t]
        if s + 1 < p:  # double buffering: post the next block before computing
            kv_t, h_kv = _post(cur_kv, view.row_next(), "kv")
            m_t, h_m = _post(cur_m, view.row_next(), "mask")
            if bias_blocks is None:
                b_t, h_b = _post(cur_b, view.col_next(), "bias")
        real = token_valid(n, p, t, device=dev)
        realf = real[:, None].float()
        valid = cur_m.bool() & real  # [B, b_i, b_k]
        kval = _key_valid(valid)
        kk, vv = _k_v(cur_kv)
        bias = cur_b.unsqueeze(1)
        for i0 in _row_starts(bi, rc, q):  # rows i are independent: chunk them
            sl = slice(i0, min(i0 + rc, bi))
            o_c, l_c = kernels.tile_attention_fwd(q[:, sl], kk[:, sl], vv[:, sl], bias,
                                                  None if kval is None else kval[:, sl], 1.0)
            if s > 0:
                o_c, l_c = merge_lse(out[:, sl], lse[:, sl], o_c, l_c)
            out[:, sl] = o_c
            lse[:, sl] = l_c
            del o_c, l_c
            vsum[:, sl] += (vv[:, sl].float() * realf).sum(-2)  # [B, rows, H, D]
        nvalid += valid.sum(-1)
        del cur_kv, cur_m, cur_b, kk, vv, bias, valid
    # rows with no valid key at all: Boltz's uniform average over the N real keys
    masked = nvalid == 0  # [B, b_i]
    if bool(masked.any()):
        out[masked] = (vsum[masked] / n).unsqueeze(-2).to(out.dtype)  # [m, H, 1, D] -> [m, H, b_j, D]
    del vsum
    return out, lse, masked


class TriAttnRing(torch.autograd.Function):
    """Ring attention of the local queries over the whole row, explicit backward.

    Inputs on (virtual) rank ``(r, c)``: ``q [B, b, H, b, D]`` (already scaled; rows
    ``T_r``, queries ``T_c``; any strides), ``kv [B, b, b, 2, H, D]`` contiguous (k and v
    packed in the projection's own layout: rows ``T_r``, keys ``T_c``; this is the
    buffer that travels on the K/V ring), ``tri [B, H, b, b]`` (this rank's ``linear(x)``
    tile: query block ``T_r``, key block ``T_c``), ``mask [B, b, b]`` uint8 (key mask of
    rows ``T_r``, keys ``T_c``; padding already 0), ``row_chunk`` rows ``i`` per kernel
    call. Output: fp32 ``[B, b, H, b, D]`` (a transposed view of a ``[B, b, b, H, D]``
    buffer, so the caller's ``transpose(-2, -3)`` is contiguous).
    """

    @staticmethod
    def forward(ctx, q, kv, tri, mask, view: MeshView, n: int, row_chunk: int):
        rc = max(1, int(row_chunk))
        out, lse, masked = ring_forward(q, [kv], tri, mask, view, n, rc)
        ctx.save_for_backward(q, kv, tri, mask, out, lse, masked)
        ctx.view, ctx.n, ctx.row_chunk = view, n, rc
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, tri, mask, out, lse, masked = ctx.saved_tensors
        dq, dkv, dtri = _ring_backward(q, kv, tri, mask, out, lse, masked, ctx.view, ctx.n, ctx.row_chunk, dout)
        return dq, dkv, dtri, None, None, None, None


def _ring_backward(q, kv, tri, mask, out, lse, masked, view: MeshView, n: int, rc: int, dout):
    """Backward ring of :class:`TriAttnRing` -> ``(dq, dkv, dtri)`` in the dtypes of
    ``q, kv, tri`` (the attention is recomputed block by block; see the module docstring)."""
    p = view.p
    dev = q.device
    B, bi, H, bj, D = q.shape
    f32 = torch.float32
    dout = dout.float()
    delta = torch.empty(B, bi, H, bj, dtype=f32, device=dev)
    for i0 in _row_starts(bi, rc, q):
        sl = slice(i0, min(i0 + rc, bi))
        delta[:, sl] = (dout[:, sl] * out[:, sl]).sum(-1)
    dq = torch.zeros(B, bi, bj, H, D, dtype=f32, device=dev).transpose(2, 3)

    # rows on the uniform (fully masked) path, flattened over (B, b_i), in chunks
    idx_all = masked.reshape(-1).nonzero().squeeze(1)
    m_chunks = list(torch.split(idx_all, max(1, B * rc))) if idx_all.numel() else []
    q_r, dout_r, delta_r, dq_r = (x.flatten(0, 1) for x in (q, dout, delta, dq))  # views

    kv_t, h_kv = _post(kv, view.kv_skew(), "kv")
    m_t, h_m = _post(mask, view.kv_skew(), "mask")
    b_t, h_b = _post(tri, view.bias_skew(), "bias")
    acc_kv = acc_b = h_acc_kv = h_acc_b = None
    for s in range(p):
        t = (view.r + view.c + s) % p
        h_kv.wait()
        h_m.wait()
        h_b.wait()
        cur_kv, cur_m, cur_b = kv_t, m_t, b_t
        if s + 1 < p:
            kv_t, h_kv = _post(cur_kv, view.row_next(), "kv")
            m_t, h_m = _post(cur_m, view.row_next(), "mask")
            b_t, h_b = _post(cur_b, view.col_next(), "bias")
        real = token_valid(n, p, t, device=dev)
        valid = cur_m.bool() & real
        kval = _key_valid(valid)
        kk, vv = _k_v(cur_kv)
        bk = kk.shape[-2]
        bias = cur_b.unsqueeze(1)
        # [B, b_i, b_k, 2, H, D]; every slot is written by the row chunks below
        dkv = torch.empty(cur_kv.shape, dtype=f32, device=dev)
        dk_all, dv_all = _k_v(dkv)
        dbias = torch.zeros(B, H, bj, bk, dtype=f32, device=dev)
        for i0 in _row_starts(bi, rc, q):  # rows i are independent: chunk them
            sl = slice(i0, min(i0 + rc, bi))
            dq_c, dk_c, dv_c, ds_c = kernels.tile_attention_bwd(
                q[:, sl], kk[:, sl], vv[:, sl], bias, None if kval is None else kval[:, sl], 1.0,
                lse[:, sl], dout[:, sl], delta[:, sl]
            )
            dq[:, sl] += dq_c
            dk_all[:, sl] = dk_c
            dv_all[:, sl] = dv_c
            dbias += ds_c.float().sum(1)
            del dq_c, dk_c, dv_c, ds_c
        if m_chunks:
            kk_r, vv_r = kk.flatten(0, 1), vv.flatten(0, 1)
            dk_r, dv_r = dk_all.flatten(0, 1), dv_all.flatten(0, 1)
            for idx in m_chunks:
                q_m = q_r[idx].float()
                delta_m = delta_r[idx]
                lse_m = torch.full_like(delta_m, math.log(n))
                dq_m, _, dv_m, ds_m = kernels.tile_attention_bwd(
                    torch.zeros_like(q_m), kk_r[idx], vv_r[idx], None, real, 1.0, lse_m, dout_r[idx], delta_m
                )
                dk_m = torch.matmul(ds_m.transpose(-1, -2), q_m)  # the q-term the zero query dropped
                dq_r.index_add_(0, idx, dq_m.float())
                dk_r.index_add_(0, idx, dk_m.float())
                dv_r.index_add_(0, idx, dv_m.float())
                dbias.index_add_(0, torch.div(idx, bi, rounding_mode="floor"), ds_m.float())
                del q_m, delta_m, lse_m, dq_m, dv_m, ds_m, dk_m
        del cur_kv, cur_m, cur_b, kk, vv, bias, valid, dk_all, dv_all
        if s > 0:  # add what the previous holders of this block accumulated (in place)
            h_acc_kv.wait()
            h_acc_b.wait()
            dkv += acc_kv
            dbias += acc_b
            acc_kv = acc_b = None
        if s + 1 < p:
            acc_kv, h_acc_kv = _post(dkv, view.row_next(), "dkv")
            acc_b, h_acc_b = _post(dbias, view.col_next(), "dbias")
        else:  # complete: send home (fused un-skew; for the bias also the transpose back)
            dkv_home, h1 = _post(dkv, view.kv_home(), "dkv")
            db_home, h2 = _post(dbias, view.bias_home(), "dbias")
            h1.wait()
            h2.wait()
        del dkv, dbias
    return dq.to(q.dtype), dkv_home.to(kv.dtype), db_home.to(tri.dtype)


# ----------------------------------------------------------------------------- module
class TriangleAttention2D(nn.Module):
    """2D-parallel Boltz ``TriangleAttention`` (starting node) / ``TriangleAttentionEndingNode``.

    ``TriangleAttention2D(module, mesh)`` shares ``module``'s parameters (same names:
    ``layer_norm``, ``linear``, ``mha.linear_q/k/v/o/g``), so a state_dict loads into
    either. ``forward(z_tile, mask_tile=None, n_tokens=N)``: ``z_tile [B, b, b, C]`` is
    ``z[:, T_r, T_c]`` on rank ``(r, c)``, ``mask_tile [B, b, b]`` the pair-mask tile
    (binary; ``None`` = all real tokens valid); returns the output tile ``[B, b, b, C]``,
    equal to ``module(z, mask, chunk_size=None)[:, T_r, T_c]`` (0 on padded slots).
    Algorithm, communication and memory: see the module docstring. ``recompute=True``
    (default): in training only ``z``, the mask tile, the fp32 ring output and its LSE are
    kept for backward, the projections are recomputed there (``recomputes_itself``: the
    compiler does not checkpoint it again); ``False``: autograd keeps the projections.
    """

    def __init__(self, module: nn.Module, mesh=None, row_chunk: Optional[int] = None,
                 score_chunk_elems: Optional[int] = None, recompute: bool = True):
        super().__init__()
        missing = [a for a in ("layer_norm", "linear", "mha", "starting") if not hasattr(module, a)]
        if missing:
            raise TypeError(
                f"TriangleAttention2D needs a boltz TriangleAttention / TriangleAttentionEndingNode "
                f"module; given {type(module).__name__}, which lacks {missing}."
            )
        share_submodules(self, module, ["layer_norm", "linear", "mha"])
        self.starting = bool(module.starting)
        self.inf = float(getattr(module, "inf", 1e9))
        self.no_heads = module.mha.no_heads
        self.c_hidden = module.mha.c_hidden
        self.c_in = module.layer_norm.weight.shape[0]
        self.mesh = SquareMesh.from_any(mesh)
        self.row_chunk = row_chunk
        self.score_chunk_elems = score_chunk_elems
        # training: keep z, the ring output and its LSE; recompute the projections in
        # backward (see _TriAttnRecompute). The compiler's recompute policy leaves it alone.
        self.recomputes_itself = bool(recompute)

    def extra_repr(self) -> str:
        node = "starting" if self.starting else "ending"
        return f"{node} node, c_in={self.c_in}, heads={self.no_heads}x{self.c_hidden}, p={self.mesh.p}"

    def forward(
        self,
        z: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        n_tokens: Optional[int] = None,
        chunk_size: Optional[int] = None,  # accepted for Boltz signature compatibility; unused
        use_kernels: bool = False,  # idem
    ) -> torch.Tensor:
        mesh = self.mesh
        name = type(self).__name__
        if n_tokens is None:
            if mesh.p != 1:
                raise LayoutError(
                    f"{name}: n_tokens (the global N) is required on a {mesh.p}x{mesh.p} mesh: it says "
                    f"which slots of the [B, b, b, C] tile are padding. Fix: call op(z_tile, mask_tile, n_tokens=N)."
                )
            n_tokens = z.shape[1] if z.dim() == 4 else 0
        ctx = TileCtx(mesh, int(n_tokens))
        mask = check_pair_tile(z, mask, ctx, channels=self.c_in, op=name)
        if self.recomputes_itself and torch.is_grad_enabled():
            params = [q for q in self.parameters() if q.requires_grad]
            if z.requires_grad or params:
                return _TriAttnRecompute.apply(self, ctx.n, z, mask, *params)
        if not torch.is_grad_enabled() or not (z.requires_grad or any(q.requires_grad for q in self.parameters())):
            return self.forward_rows(z, mask, ctx.n)
        st = self._project(z, mask, ctx.n)
        o = TriAttnRing.apply(st["q"], st["kv"], st["tri"], st["key_mask"], st["view"], ctx.n, st["rc"])
        del st["q"], st["tri"]  # (autograd keeps what backward needs)
        return self._finish(o, st)

    def forward_rows(self, z, mask, n: int, keep: bool = False):
        """Inference (no autograd), one chunk of query rows ``i`` at a time
        (:func:`autocp.ops.common.chunk_spans` of ``b``): rows are independent in triangle
        attention, so each chunk's LayerNorm, q/k/v/gate projections, K/V ring and output
        projection run on ``rows x b`` slots only, written into the output tile. The bias
        ``tri[T_c, T_t]`` of every key block (``[B, H, b, b]`` each, ``H / C`` of a tile) is
        ringed once and kept. Live at the peak: ``z``, the output tile, the ``p`` bias blocks
        and one row chunk's tensors. Communication: the same K/V and mask bytes (in more,
        smaller messages) and the same bias bytes as the whole-tile ring. ``keep``: also
        return the ring's fp32 output ``[B, b, H, b, D]``, its LSE and the fully-masked rows
        (what :class:`_TriAttnRecompute` saves for backward), assembled chunk by chunk."""
        view = MeshView(self.mesh, transposed=not self.starting)
        pair_valid = TileCtx(self.mesh, n).pair_valid(z.device)
        zt, mt = z, mask
        if not self.starting:  # ending node: starting node on z^T, on the transposed mesh view
            zt, mt = z.transpose(1, 2), mask.transpose(1, 2)
            pair_valid = pair_valid.transpose(0, 1)
        B, bi, bj = zt.shape[:3]
        H, mha = self.no_heads, self.mha
        spans = chunk_spans(bi, 4 * zt.numel() * zt.element_size())  # q + packed k/v + output per chunk
        tri = None
        for r0, r1 in spans:  # the bias tile [B, H, b_j, b_k] (its rows j are the tile's rows)
            t_c = self.linear(self.layer_norm(zt[:, r0:r1])).permute(0, 3, 1, 2)
            if tri is None:
                tri = torch.empty((B, H, bi, bj), dtype=t_c.dtype, device=z.device)
            tri[:, :, r0:r1] = t_c
            del t_c
        blocks = _gather_bias(tri, view) if view.p > 1 else [tri]
        del tri
        out = None
        for r0, r1 in spans:
            x = self.layer_norm(zt[:, r0:r1])
            q = self._heads(mha.linear_q(x)) / math.sqrt(self.c_hidden)
            kv = torch.stack([mha.linear_k(x), mha.linear_v(x)], dim=3).view(B, r1 - r0, bj, 2, H, -1)
            key_mask = (mt[:, r0:r1] > 0.5).to(torch.uint8).contiguous()
            rc = self.row_chunk or row_chunk_for(B, r1 - r0, H, bj, bj, self.score_chunk_elems)
            box = [kv]
            del kv
            o, l_c, m_c = ring_forward(q, box, None, key_mask, view, n, rc, bias_blocks=blocks)
            del q, key_mask
            if keep:
                if r0 == 0:
                    # under autocast kept in the autocast dtype (as flash attention keeps O): the
                    # backward only forms delta = sum(dO * O) and the gated projection from it
                    dev = z.device.type
                    odt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else o.dtype
                    keep_o = torch.empty((B, bi, bj, H, o.shape[-1]), dtype=odt, device=z.device).transpose(2, 3)
                    keep_l = torch.empty((B, bi, H, bj), dtype=l_c.dtype, device=z.device)
                    keep_m = torch.empty((B, bi), dtype=m_c.dtype, device=z.device)
                keep_o[:, r0:r1], keep_l[:, r0:r1], keep_m[:, r0:r1] = o, l_c, m_c
            del l_c, m_c
            o = self._finish(o, {"x": x, "pair_valid": pair_valid[r0:r1]}, transpose=False)
            del x
            if out is None:
                out = torch.empty((B, bi, bj, o.shape[-1]), dtype=o.dtype, device=z.device)
            out[:, r0:r1] = o
            del o
        res = out if self.starting else out.transpose(1, 2)
        return (res, keep_o, keep_l, keep_m) if keep else res

    def _project(self, z, mask, n: int) -> dict:
        """LayerNorm and projections of the (virtual) rank's tile: ``q`` (scaled), packed
        ``kv``, bias ``tri``, uint8 ``key_mask``, gate input ``x``; the ending node works
        on the transposed tile."""
        view = MeshView(self.mesh, transposed=not self.starting)
        pair_valid = TileCtx(self.mesh, n).pair_valid(z.device)
        if not self.starting:  # ending node: starting node on z^T, on the transposed mesh view
            z = z.transpose(1, 2)
            mask = mask.transpose(1, 2)
            pair_valid = pair_valid.transpose(0, 1)
        H = self.no_heads
        mha = self.mha
        x = self.layer_norm(z)
        tri = self.linear(x).permute(0, 3, 1, 2)  # [B, H, b_j, b_k]
        B, bi, bj = x.shape[:3]
        q = self._heads(mha.linear_q(x)) / math.sqrt(self.c_hidden)
        # k and v packed [B, b_i, b_k, 2, H, D] in the projections' own layout: this is the
        # K/V ring buffer itself (k, v die right away; no second stacked copy during the ring)
        kv = torch.stack([mha.linear_k(x), mha.linear_v(x)], dim=3)
        kv = kv.view(B, bi, bj, 2, H, -1)
        key_mask = (mask > 0.5).to(torch.uint8).contiguous()
        rc = self.row_chunk or row_chunk_for(B, bi, H, bj, bj, self.score_chunk_elems)
        return {"x": x, "q": q, "kv": kv, "tri": tri, "key_mask": key_mask, "view": view, "rc": rc,
                "pair_valid": pair_valid}

    def _heads(self, t):  # [B, b_i, b_j, H*D] -> [B, b_i, H, b_j, D]
        return t.view(t.shape[:-1] + (self.no_heads, -1)).transpose(-2, -3)

    def _finish(self, o, st: dict, transpose: bool = True):
        """Gate + output projection of the ring's fp32 output ``o [B, b_i, H, b_j, D]``;
        padded slots zeroed; the ending node's tile transposed back (``transpose``)."""
        x, mha, H = st["x"], self.mha, self.no_heads
        o = o.to(x.dtype).transpose(-2, -3)  # [B, b_i, b_j, H, D]
        if mha.linear_g is not None:
            g = mha.sigmoid(mha.linear_g(x))
            o = o * g.view(g.shape[:-1] + (H, -1))
        o = mha.linear_o(o.flatten(-2))
        o = o * st["pair_valid"][..., None].to(o.dtype)
        if not self.starting and transpose:
            o = o.transpose(1, 2)
        return o


class _TriAttnRecompute(torch.autograd.Function):
    """The whole op with recomputation where it is cheaper than storage.

    Saved for backward: the input tile ``z``, the pair-mask tile, the ring's fp32 output
    ``o [B, b, H, b, D]`` and its LSE -- what flash-style backward needs that is costly to
    recompute (a second attention pass with its two rings). LayerNorm, the q/k/v/g/bias
    projections and the gating are recomputed from ``z`` in backward (cheap channel
    matmuls); the attention itself then runs once more, in :func:`_ring_backward` (as in
    the non-recomputing path). Compared with checkpointing the op (forward, replayed
    forward, backward), the replayed forward's score pass and its three rings are saved.
    Autocast state of the forward is restored for the recomputation. Backward, by chunks of
    query rows (independent rows of the triangle): the chunk's LayerNorm, q / packed k,v and
    gated output are replayed with autograd; the ring output's gradient comes from the gate
    replay; the backward ring runs for the chunk's rows only (K/V and their gradient
    accumulators travel chunk-sized; the small ``[B, H, b, b]`` bias tile and its fp32
    gradient accumulator travel whole, once per chunk, and the bias gradients of all
    chunks are summed); the replay is differentiated against ``(dres, dq, dkv)``; last, the
    bias projection is replayed per chunk against the summed bias gradient. No whole-tile
    q / k / v, autograd graph or ring buffer exists in backward."""

    @staticmethod
    def forward(ctx, op, n, z, mask, *params):
        with torch.no_grad():  # the row-chunked inference path, keeping what backward needs
            res, out, lse, masked = op.forward_rows(z, mask, n, keep=True)
        ctx.save_for_backward(z, mask, out, lse, masked)
        ctx.op, ctx.n = op, n
        dev = z.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return res

    @staticmethod
    def backward(ctx, dres):
        z, mask, out, lse, masked = ctx.saved_tensors
        op, n = ctx.op, ctx.n
        names = [k for k, q in op.named_parameters() if q.requires_grad]
        # detached aliases: the gradient below is taken w.r.t. these, so hooks on the real
        # parameters (autocp's gradient reducer, DDP) fire once, when autograd accumulates
        # what this backward returns -- not also inside it
        own = dict(op.named_parameters())
        al = {k: own[k].detach().requires_grad_() for k in names}
        sub = {f"op.{k}": w for k, w in al.items()}
        need_dz = z.requires_grad
        dev, enabled, dtype = ctx.autocast
        replay = _ChunkReplay(op)
        view = MeshView(op.mesh, transposed=not op.starting)
        pv = TileCtx(op.mesh, n).pair_valid(z.device)
        zt, mt, dr = z, mask, dres
        if not op.starting:  # the view's coordinates (see _project)
            zt, mt, dr, pv = z.transpose(1, 2), mask.transpose(1, 2), dres.transpose(1, 2), pv.transpose(0, 1)
        B, bi, bj = zt.shape[:3]
        H = op.no_heads
        spans = chunk_spans(bi, 4 * zt.numel() * zt.element_size())
        grads = {}

        def take(gs):
            for k, g in zip(names, gs):
                if g is not None:
                    grads[k] = g if k not in grads else grads[k] + g

        dz = torch.empty_like(z) if need_dz else None
        dzt = (dz if op.starting else dz.transpose(1, 2)) if need_dz else None
        wrt_p = list(al.values())
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            with torch.no_grad():  # the local bias tile (every query row uses all of it)
                tri = None
                for r0, r1 in spans:
                    tc = op.linear(op.layer_norm(zt[:, r0:r1])).permute(0, 3, 1, 2)
                    if tri is None:
                        tri = torch.empty((B, H, bi, bj), dtype=tc.dtype, device=z.device)
                    tri[:, :, r0:r1] = tc
                    del tc
            dtri = torch.zeros(tri.shape, dtype=torch.float32, device=z.device)
            for r0, r1 in spans:
                # (1) this row chunk replayed with autograd: LayerNorm, q / packed k,v, gated output
                with torch.enable_grad():
                    zc = zt[:, r0:r1].detach().requires_grad_(need_dz)
                    oc = out[:, r0:r1].detach().requires_grad_()
                    res, qc, kvc, _ = torch.func.functional_call(replay, sub, (zc, oc, pv[r0:r1], True), strict=False)
                    (do,) = torch.autograd.grad(res, [oc], dr[:, r0:r1], retain_graph=True)
                # (2) the backward ring of these query rows (K/V and dK/dV travel per chunk;
                # the bias tile and its gradient accumulator travel whole, once per chunk)
                with torch.no_grad():
                    key_mask = (mt[:, r0:r1] > 0.5).to(torch.uint8).contiguous()
                    rc = op.row_chunk or row_chunk_for(B, r1 - r0, H, bj, bj, op.score_chunk_elems)
                    dq, dkv, dt = _ring_backward(qc.detach(), kvc.detach().contiguous(), tri, key_mask, out[:, r0:r1],
                                                 lse[:, r0:r1], masked[:, r0:r1], view, n, rc, do)
                    dtri += dt
                    del do, key_mask, dt
                # (3) differentiate the chunk's replay against (dres, dq, dkv)
                wrt = ([zc] if need_dz else []) + wrt_p
                gs = torch.autograd.grad([res, qc, kvc], wrt, [dr[:, r0:r1], dq, dkv], allow_unused=True)
                if need_dz:
                    dzt[:, r0:r1] = gs[0]
                    gs = gs[1:]
                take(gs)
                del zc, oc, res, qc, kvc, dq, dkv, gs
            del tri
            # (4) the bias projection's backward, per row chunk (its rows are the tile's rows)
            for r0, r1 in spans:
                with torch.enable_grad():
                    zc = zt[:, r0:r1].detach().requires_grad_(need_dz)
                    tc = torch.func.functional_call(replay, sub, (zc, None, pv[r0:r1], "bias"), strict=False)[3]
                    wrt = ([zc] if need_dz else []) + wrt_p
                    gs = torch.autograd.grad([tc], wrt, [dtri[:, :, r0:r1].to(tc.dtype)], allow_unused=True)
                if need_dz:
                    dzt[:, r0:r1] += gs[0]
                    gs = gs[1:]
                take(gs)
                del zc, tc, gs
        gp = [grads[k] if k in grads else torch.zeros_like(own[k]) for k in names]
        return (None, None, dz, None, *gp)


class _ChunkReplay(nn.Module):
    """One row chunk of the op replayed as a module call (so ``functional_call`` can
    substitute the parameters): ``forward(z_rows, o_rows, pair_valid_rows, project)`` ->
    ``(gated output of o_rows or None, q, packed kv, bias rows)`` in the (virtual) rank's
    coordinates (``z_rows`` already transposed for the ending node)."""

    def __init__(self, op: "TriangleAttention2D"):
        super().__init__()
        self.op = op

    def forward(self, z, o, pair_valid, project):
        op, mha = self.op, self.op.mha
        x = op.layer_norm(z)
        if project == "bias":
            return None, None, None, op.linear(x).permute(0, 3, 1, 2)
        res = op._finish(o, {"x": x, "pair_valid": pair_valid}, transpose=False) if o is not None else None
        if not project:
            return res, None, None, None
        B, rows, bj = x.shape[:3]
        q = op._heads(mha.linear_q(x)) / math.sqrt(op.c_hidden)
        kv = torch.stack([mha.linear_k(x), mha.linear_v(x)], dim=3).view(B, rows, bj, 2, op.no_heads, -1)
        return res, q, kv, None


# ----------------------------------------------------------------------------- comm volume
def comm_bytes(
    p: int,
    r: int,
    c: int,
    *,
    batch: int,
    b: int,
    heads: int,
    head_dim: int,
    elem: int = 4,
    starting: bool = True,
) -> dict:
    """Analytic bytes sent by rank ``(r, c)``: ``{"fwd": {name: bytes}, "bwd": {...}}``.

    Names are the ``comm.STATS`` keys (``triattn.kv``, ``triattn.mask``, ``triattn.bias``,
    ``triattn.dkv``, ``triattn.dbias``); zero entries are omitted. ``elem`` = element size
    of z's dtype. See the module docstring for the formula.
    """
    if not starting:
        r, c = c, r
    r, c = r % p, c % p
    s_kv = 2 * batch * b * b * heads * head_dim * elem
    s_m = batch * b * b
    s_b = batch * b * b * heads * elem
    s_dkv = 2 * batch * b * b * heads * head_dim * 4
    s_db = batch * b * b * heads * 4
    n_row = p - 1 + (r != 0)
    n_col = p - 1 + ((r, c) != (0, 0))
    fwd = {
        f"{NAME}.kv": n_row * s_kv,
        f"{NAME}.mask": n_row * s_m,
        f"{NAME}.bias": n_col * s_b,
    }
    bwd = dict(fwd)
    bwd[f"{NAME}.dkv"] = (p - 1 + (r != 1 % p)) * s_dkv
    bwd[f"{NAME}.dbias"] = (p - 1 + ((r, c) != (1 % p, 1 % p))) * s_db
    return {
        "fwd": {k_: v_ for k_, v_ in fwd.items() if v_},
        "bwd": {k_: v_ for k_, v_ in bwd.items() if v_},
    }
