"""Triton implementations of the tile kernels, registered above the torch reference.

Three kernels (same interface as :mod:`autocp.kernels.reference`):

* ``tile_attention_fwd`` -- flash-style online softmax over the key dimension of one tile
  with additive bias and key validity, returning ``out`` (normalised inside this key
  block) and ``lse`` (fp32) for exact ring merges.
* ``tile_attention_bwd`` -- two launches: ``dkdv`` (one program per key block, loops
  over the queries, writes ``ds`` = ``dbias`` and accumulates ``dk``, ``dv``) then
  ``dq`` (one program per query block, ``dq = scale * ds @ k`` reading the ``ds`` just
  written instead of recomputing the softmax).
* ``tri_mm`` -- batched ``out (+)= a @ b^T`` with fp32 accumulation (the per-channel
  GEMM of triangle multiplication). Its backward needs no kernel of its own: the ops
  express ``da = g @ b`` and ``db = g^T @ a`` as ``tri_mm`` calls on transposed views
  (arbitrary strides are supported, so those views are not copied).

Batch dimensions (everything left of the last two dims) broadcast by strides: every
operand is ``expand``-ed to the common batch shape (stride 0 where broadcast, no copy),
mergeable batch dims are coalesced and up to four remain, indexed inside the kernel.
So a learned triangle bias ``[B, 1, H, Q, K]`` against ``q [B, I, H, Q, D]`` is read
in place, never materialised.

Dtypes: fp32 / bf16 / fp16 inputs, fp32 accumulation and fp32 results. On a GPU the
``tl.dot`` operands stay in the input dtype (tensor cores); fp32 inputs use IEEE fp32
unless torch allows TF32 (``torch.backends.cuda.matmul.allow_tf32``). In the Triton
interpreter every operand is cast to fp32 after the load (numpy has no bf16).

Selection (see :func:`_check_common`): CUDA tensors, or CPU tensors only when the
interpreter is active (``TRITON_INTERPRET=1`` before triton was imported) *and* the
opt-in ``AUTOCP_TRITON_INTERPRET=1`` is set -- so CPU runs never use the slow
interpreter by accident. Head dims up to 128 (padded to a power of two inside).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from .registry import register

__all__ = [
    "tile_attention_fwd",
    "tile_attention_bwd",
    "tri_mm",
    "check_tile_attention_fwd",
    "check_tile_attention_bwd",
    "check_tri_mm",
    "INTERPRET",
    "PRIORITY",
    "MAX_HEAD_DIM",
    "MAX_BATCH_DIMS",
]

PRIORITY = 100
MAX_HEAD_DIM = 128
MAX_BATCH_DIMS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreter_active() -> bool:
    # triton.jit decides at decoration time: InterpretedFunction iff TRITON_INTERPRET was on
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older tritons
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(_attn_fwd_kernel, InterpretedFunction)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _batch_offset(pid, B1, B2, B3, s0, s1, s2, s3):
    """Element offset of batch index ``pid`` (row-major over 4 coalesced batch dims)."""
    i3 = pid % B3
    r = pid // B3
    i2 = r % B2
    r = r // B2
    i1 = r % B1
    i0 = r // B1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3


@triton.jit
def _scores(q, k, BIAS, offs_m, offs_n, m_ok, n_ok, sbm, sbn, scale,
            HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """fp32 ``q @ k^T * scale (+ bias)`` of one ``[BLOCK_M, BLOCK_N]`` block (fwd and bwd)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    if HAS_BIAS:
        b = tl.load(BIAS + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        s += b.to(tl.float32)
    return s


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, BIAS, KV, OUT, LSE,
    B1, B2, B3,
    sq0, sq1, sq2, sq3, sqm, sqd,
    sk0, sk1, sk2, sk3, skn, skd,
    sv0, sv1, sv2, sv3, svn, svd,
    sb0, sb1, sb2, sb3, sbm, sbn,
    skv0, skv1, skv2, skv3, skvn,
    so0, so1, so2, so3, som, sod,
    sl0, sl1, sl2, sl3, slm,
    NQ, NK, DQK, DV, scale,
    HAS_BIAS: tl.constexpr, HAS_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    Q += _batch_offset(pid_b, B1, B2, B3, sq0, sq1, sq2, sq3)
    K += _batch_offset(pid_b, B1, B2, B3, sk0, sk1, sk2, sk3)
    V += _batch_offset(pid_b, B1, B2, B3, sv0, sv1, sv2, sv3)
    OUT += _batch_offset(pid_b, B1, B2, B3, so0, so1, so2, so3)
    LSE += _batch_offset(pid_b, B1, B2, B3, sl0, sl1, sl2, sl3)
    if HAS_BIAS:
        BIAS += _batch_offset(pid_b, B1, B2, B3, sb0, sb1, sb2, sb3)
    if HAS_KV:
        KV += _batch_offset(pid_b, B1, B2, B3, skv0, skv1, skv2, skv3)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < NQ
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & (offs_d[None, :] < DQK), other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & (offs_d[None, :] < DQK), other=0.0).to(DOT_DTYPE)
        s = _scores(q, k, BIAS, offs_m, offs_n, m_ok, n_ok, sbm, sbn, scale, HAS_BIAS, PREC)
        valid = n_ok
        if HAS_KV:
            kv = tl.load(KV + offs_n * skvn, mask=n_ok, other=0)
            valid = valid & (kv != 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PREC)
        m_i = m_new

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log(l_safe), float("-inf"))
    tl.store(OUT + offs_m[:, None] * som + offs_dv[None, :] * sod, out,
             mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + offs_m * slm, lse, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, BIAS, KV, LSE, DO, DELTA, DK, DV_, DS,
    B1, B2, B3,
    sq0, sq1, sq2, sq3, sqm, sqd,
    sk0, sk1, sk2, sk3, skn, skd,
    sv0, sv1, sv2, sv3, svn, svd,
    sb0, sb1, sb2, sb3, sbm, sbn,
    skv0, skv1, skv2, skv3, skvn,
    sl0, sl1, sl2, sl3, slm,
    sdo0, sdo1, sdo2, sdo3, sdom, sdod,
    sde0, sde1, sde2, sde3, sdem,
    sdk0, sdk1, sdk2, sdk3, sdkn, sdkd,
    sdv0, sdv1, sdv2, sdv3, sdvn, sdvd,
    sds0, sds1, sds2, sds3, sdsm, sdsn,
    NQ, NK, DQK, DV, scale,
    HAS_BIAS: tl.constexpr, HAS_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    Q += _batch_offset(pid_b, B1, B2, B3, sq0, sq1, sq2, sq3)
    K += _batch_offset(pid_b, B1, B2, B3, sk0, sk1, sk2, sk3)
    V += _batch_offset(pid_b, B1, B2, B3, sv0, sv1, sv2, sv3)
    LSE += _batch_offset(pid_b, B1, B2, B3, sl0, sl1, sl2, sl3)
    DO += _batch_offset(pid_b, B1, B2, B3, sdo0, sdo1, sdo2, sdo3)
    DELTA += _batch_offset(pid_b, B1, B2, B3, sde0, sde1, sde2, sde3)
    DK += _batch_offset(pid_b, B1, B2, B3, sdk0, sdk1, sdk2, sdk3)
    DV_ += _batch_offset(pid_b, B1, B2, B3, sdv0, sdv1, sdv2, sdv3)
    DS += _batch_offset(pid_b, B1, B2, B3, sds0, sds1, sds2, sds3)
    if HAS_BIAS:
        BIAS += _batch_offset(pid_b, B1, B2, B3, sb0, sb1, sb2, sb3)
    if HAS_KV:
        KV += _batch_offset(pid_b, B1, B2, B3, skv0, skv1, skv2, skv3)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < NK
    k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & (offs_d[None, :] < DQK), other=0.0).to(DOT_DTYPE)
    v = tl.load(V + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0).to(DOT_DTYPE)
    valid = n_ok
    if HAS_KV:
        kv = tl.load(KV + offs_n * skvn, mask=n_ok, other=0)
        valid = valid & (kv != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < NQ
        q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & (offs_d[None, :] < DQK), other=0.0).to(DOT_DTYPE)
        do = tl.load(DO + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                     mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0).to(DOT_DTYPE)
        lse = tl.load(LSE + offs_m * slm, mask=m_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows with no key at all: p = 0 below
        delta = tl.load(DELTA + offs_m * sdem, mask=m_ok, other=0.0)
        s = _scores(q, k, BIAS, offs_m, offs_n, m_ok, n_ok, sbm, sbn, scale, HAS_BIAS, PREC)
        ok = m_ok[:, None] & valid[None, :]
        s = tl.where(ok, s, float("-inf"))
        p = tl.exp(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(DOT_DTYPE)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        tl.store(DS + offs_m[:, None] * sdsm + offs_n[None, :] * sdsn, ds,
                 mask=m_ok[:, None] & n_ok[None, :])
        dk += tl.dot(tl.trans(ds.to(DOT_DTYPE)), q, input_precision=PREC)

    tl.store(DK + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd, dk * scale,
             mask=n_ok[:, None] & (offs_d[None, :] < DQK))
    tl.store(DV_ + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd, dv,
             mask=n_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _attn_bwd_dq_kernel(
    K, DS, DQ,
    B1, B2, B3,
    sk0, sk1, sk2, sk3, skn, skd,
    sds0, sds1, sds2, sds3, sdsm, sdsn,
    sdq0, sdq1, sdq2, sdq3, sdqm, sdqd,
    NQ, NK, DQK, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    K += _batch_offset(pid_b, B1, B2, B3, sk0, sk1, sk2, sk3)
    DS += _batch_offset(pid_b, B1, B2, B3, sds0, sds1, sds2, sds3)
    DQ += _batch_offset(pid_b, B1, B2, B3, sdq0, sdq1, sdq2, sdq3)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        ds = tl.load(DS + offs_m[:, None] * sdsm + offs_n[None, :] * sdsn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & (offs_d[None, :] < DQK), other=0.0).to(DOT_DTYPE)
        dq += tl.dot(ds.to(DOT_DTYPE), k, input_precision=PREC)
    tl.store(DQ + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd, dq * scale,
             mask=m_ok[:, None] & (offs_d[None, :] < DQK))


@triton.jit
def _tri_mm_kernel(
    A, B, OUT,
    B1, B2, B3,
    sa0, sa1, sa2, sa3, sai, sak,
    sb0, sb1, sb2, sb3, sbj, sbk,
    so0, so1, so2, so3, soi, soj,
    NI, NJ, NK,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n_blocks_j = tl.cdiv(NJ, BLOCK_N)
    pid_i = pid // n_blocks_j
    pid_j = pid % n_blocks_j
    A += _batch_offset(pid_b, B1, B2, B3, sa0, sa1, sa2, sa3)
    B += _batch_offset(pid_b, B1, B2, B3, sb0, sb1, sb2, sb3)
    OUT += _batch_offset(pid_b, B1, B2, B3, so0, so1, so2, so3)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = offs_i < NI
    j_ok = offs_j < NJ
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start_k in range(0, NK, BLOCK_K):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < NK
        a = tl.load(A + offs_i[:, None] * sai + offs_k[None, :] * sak,
                    mask=i_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(B + offs_j[:, None] * sbj + offs_k[None, :] * sbk,
                    mask=j_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC)
    o_ptr = OUT + offs_i[:, None] * soi + offs_j[None, :] * soj
    o_mask = i_ok[:, None] & j_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(o_ptr, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=o_mask)


INTERPRET = _interpreter_active()

# --------------------------------------------------------------------------------------
# host side: batch broadcasting by strides
# --------------------------------------------------------------------------------------


def _bstrides(t: torch.Tensor, batch: Sequence[int], n_core: int) -> list[int]:
    """Strides of ``t``'s batch dims after broadcasting to ``batch`` (0 where broadcast)."""
    core = list(t.shape[t.dim() - n_core:]) if n_core else []
    e = t.expand(*batch, *core)
    return list(e.stride()[: len(batch)])


def _coalesce(batch: Sequence[int], strides: list[list[int]]):
    """Drop size-1 batch dims, merge contiguous neighbours; return (sizes, strides) or None.

    The result has exactly :data:`MAX_BATCH_DIMS` dims (padded on the left with size 1),
    or ``None`` when more dims than that remain.
    """
    dims = [i for i, s in enumerate(batch) if s != 1]
    sizes = [batch[i] for i in dims]
    strs = [[st[i] for i in dims] for st in strides]
    i = len(sizes) - 2
    while i >= 0:  # merge dim i into i+1 when every tensor is contiguous across them
        if all(st[i] == st[i + 1] * sizes[i + 1] for st in strs):
            sizes[i + 1] *= sizes[i]
            del sizes[i]
            for st in strs:
                del st[i]
        i -= 1
    if len(sizes) > MAX_BATCH_DIMS:
        return None
    pad = MAX_BATCH_DIMS - len(sizes)
    sizes = [1] * pad + sizes
    strs = [[0] * pad + st for st in strs]
    return sizes, strs


def _next_pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(1, x)))))


def _dot_dtype(dtype: torch.dtype):
    if INTERPRET or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _precision(dtype: torch.dtype) -> str:
    if INTERPRET:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"  # Triton's default; only affects fp32 operands (bf16/fp16 dots are exact-product MMAs)
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# Block sizes: small in the interpreter (several blocks with tiny test shapes), tensor-core
# friendly on GPUs. ``BLOCKS`` may be edited (tests, tuning) -- keys are the kernel names.
BLOCKS = {
    "fwd": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "dkdv": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "dq": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "tri_mm": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
}
if INTERPRET:
    BLOCKS = {
        "fwd": dict(BLOCK_M=16, BLOCK_N=16),
        "dkdv": dict(BLOCK_M=16, BLOCK_N=16),
        "dq": dict(BLOCK_M=16, BLOCK_N=16),
        "tri_mm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
    }


def _launch_opts(name: str, head_dim: int = 0) -> dict:
    opts = dict(BLOCKS[name])
    if not INTERPRET and head_dim > 64 and name in ("fwd", "dkdv", "dq"):
        opts["num_warps"] = 8
    return opts


def _scalar_scale(scale) -> float:
    return float(scale.item() if isinstance(scale, torch.Tensor) else scale)


# --------------------------------------------------------------------------------------
# checkers: True, or a string saying why the Triton kernel cannot take these inputs
# --------------------------------------------------------------------------------------


def _check_device(tensors) -> object:
    devs = {t.device.type for t in tensors}
    if devs == {"cuda"}:
        if len({t.device for t in tensors}) > 1:
            return "tensors on different CUDA devices"
        return True
    if devs == {"cpu"}:
        if not INTERPRET:
            return "CPU tensors: Triton needs CUDA (interpreter not active: TRITON_INTERPRET=1 was not set before triton was imported)"
        if os.environ.get("AUTOCP_TRITON_INTERPRET", "0") != "1":
            return "CPU tensors: the Triton interpreter is slow; opt in with AUTOCP_TRITON_INTERPRET=1"
        return True
    return f"tensors on device types {sorted(devs)}: need all on CUDA"


def _check_autograd(tensors) -> object:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "inputs require grad with grad mode on: the Triton kernel is not differentiable by autograd (call it inside an autograd.Function)"
    return True


def _check_float(name, t, allowed=_DTYPES) -> object:
    if t.dtype not in allowed:
        return f"{name} dtype {t.dtype} unsupported (need one of {', '.join(str(d) for d in allowed)})"
    return True


def _first_fail(*results):
    for r in results:
        if r is not True:
            return r
    return True


def _attn_shapes(q, k, v, bias, key_valid):
    """Validate attention shapes; return (batch, Q, K, D, Dv) or a reason string."""
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        return "q, k, v need at least 2 dims"
    NQ, D = q.shape[-2:]
    NK, Dk = k.shape[-2:]
    NKv, Dv = v.shape[-2:]
    if Dk != D or NKv != NK:
        return f"shape mismatch q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}"
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        return f"head dim {max(D, Dv)} > {MAX_HEAD_DIM} (kernel pads head dims to a power of two <= {MAX_HEAD_DIM})"
    if min(NQ, NK, D, Dv) == 0:
        return "empty tile"
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        if bias is not None:
            core = tuple(bias.shape[-2:])
            if len(core) < 2 or core[0] not in (1, NQ) or core[1] not in (1, NK):
                return f"bias {tuple(bias.shape)} not broadcastable to [..., {NQ}, {NK}]"
            batch = torch.broadcast_shapes(batch, bias.shape[:-2])
        if key_valid is not None:
            if key_valid.dim() < 1 or key_valid.shape[-1] not in (1, NK):
                return f"key_valid {tuple(key_valid.shape)} not broadcastable to [..., {NK}]"
            batch = torch.broadcast_shapes(batch, key_valid.shape[:-1])
    except RuntimeError as e:
        return f"shapes do not broadcast: {e}"
    if math.prod(batch) == 0:
        return "empty batch"
    return tuple(batch), NQ, NK, D, Dv


def _attn_operands(q, k, v, bias, key_valid, batch, NQ, NK):
    """Expanded (no-copy) views of the attention operands, core dims kept."""
    qe = q.expand(*batch, *q.shape[-2:])
    ke = k.expand(*batch, *k.shape[-2:])
    ve = v.expand(*batch, *v.shape[-2:])
    be = bias.expand(*batch, NQ, NK) if bias is not None else None
    kve = None
    if key_valid is not None:
        kv = key_valid if key_valid.dtype != torch.bool else key_valid.view(torch.uint8)
        kve = kv.expand(*batch, NK)
    return qe, ke, ve, be, kve


def _attn_layout(q, k, v, bias, key_valid, extra=()):
    """Coalesced batch sizes/strides of the attention operands (+ ``extra`` (tensor, n_core))."""
    shapes = _attn_shapes(q, k, v, bias, key_valid)
    if isinstance(shapes, str):
        return shapes
    batch, NQ, NK, D, Dv = shapes
    qe, ke, ve, be, kve = _attn_operands(q, k, v, bias, key_valid, batch, NQ, NK)
    nb = len(batch)
    strides = [list(qe.stride()[:nb]), list(ke.stride()[:nb]), list(ve.stride()[:nb]),
               list(be.stride()[:nb]) if be is not None else [0] * nb,
               list(kve.stride()[:nb]) if kve is not None else [0] * nb]
    for t, n_core in extra:
        strides.append(_bstrides(t, batch, n_core))
    # outputs are allocated contiguous: they never stop a merge, so they need no check
    co = _coalesce(batch, strides)
    if co is None:
        return f"more than {MAX_BATCH_DIMS} non-mergeable batch dims after broadcasting"
    return batch, NQ, NK, D, Dv, (qe, ke, ve, be, kve)


def _contig_strides(batch, inner):
    out, s = [], inner
    for n in reversed(batch):
        out.append(s)
        s *= n
    return list(reversed(out))


def check_tile_attention_fwd(q, k, v, bias=None, key_valid=None, scale=1.0):
    tensors = [t for t in (q, k, v, bias, key_valid) if t is not None]
    r = _first_fail(
        _check_device(tensors),
        _check_float("q", q), _check_float("k", k), _check_float("v", v),
        True if q.dtype == k.dtype == v.dtype else f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})",
        _check_float("bias", bias) if bias is not None else True,
        _check_autograd(tensors),
    )
    if r is not True:
        return r
    if key_valid is not None and key_valid.dtype not in (torch.bool, torch.uint8, torch.int8):
        return f"key_valid dtype {key_valid.dtype} unsupported (need bool)"
    lay = _attn_layout(q, k, v, bias, key_valid)
    return lay if isinstance(lay, str) else True


def check_tile_attention_bwd(q, k, v, bias, key_valid, scale, lse, dout, delta):
    r = check_tile_attention_fwd(q, k, v, bias, key_valid, scale)
    if r is not True:
        return r
    tensors = [lse, dout, delta]
    r = _first_fail(_check_device(tensors + [q]), _check_autograd(tensors),
                    _check_float("lse", lse), _check_float("dout", dout), _check_float("delta", delta))
    if r is not True:
        return r
    batch, NQ, NK, D, Dv, _ = _attn_layout(q, k, v, bias, key_valid)
    try:
        if torch.broadcast_shapes(lse.shape, (*batch, NQ)) != (*batch, NQ):
            return f"lse {tuple(lse.shape)} does not broadcast to {(*batch, NQ)}"
        if torch.broadcast_shapes(delta.shape, (*batch, NQ)) != (*batch, NQ):
            return f"delta {tuple(delta.shape)} does not broadcast to {(*batch, NQ)}"
        if torch.broadcast_shapes(dout.shape, (*batch, NQ, Dv)) != (*batch, NQ, Dv):
            return f"dout {tuple(dout.shape)} does not broadcast to {(*batch, NQ, Dv)}"
    except RuntimeError as e:
        return f"lse/delta/dout shapes do not broadcast: {e}"
    lay = _attn_layout(q, k, v, bias, key_valid, extra=((lse, 1), (dout, 2), (delta, 1)))
    return lay if isinstance(lay, str) else True


def _tri_layout(a, b, out):
    if a.dim() < 2 or b.dim() < 2:
        return "a, b need at least 2 dims"
    NI, NK = a.shape[-2:]
    NJ, NKb = b.shape[-2:]
    if NK != NKb:
        return f"contracted dims differ: a {tuple(a.shape)} b {tuple(b.shape)}"
    try:
        batch = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    except RuntimeError as e:
        return f"batch dims do not broadcast: {e}"
    if math.prod(batch) * NI * NJ == 0:
        return "empty output"
    strides = [_bstrides(a, batch, 2), _bstrides(b, batch, 2)]
    if out is not None:
        if tuple(out.shape) != (*batch, NI, NJ):
            return f"out {tuple(out.shape)} must have the full shape {(*batch, NI, NJ)}"
        if any(s == 0 for s, n in zip(out.stride(), out.shape) if n > 1):
            return "out has a broadcast (stride 0) dim: accumulating into it would race"
        strides.append(list(out.stride()[: len(batch)]))
    else:
        strides.append(_contig_strides(batch, NI * NJ))
    if _coalesce(batch, strides) is None:
        return f"more than {MAX_BATCH_DIMS} non-mergeable batch dims after broadcasting"
    return batch, NI, NJ, NK


def check_tri_mm(a, b, out=None):
    tensors = [t for t in (a, b, out) if t is not None]
    r = _first_fail(
        _check_device(tensors),
        _check_float("a", a), _check_float("b", b),
        True if a.dtype == b.dtype else f"a/b dtypes differ ({a.dtype}, {b.dtype})",
        _check_float("out", out) if out is not None else True,
        _check_autograd(tensors),
    )
    if r is not True:
        return r
    lay = _tri_layout(a, b, out)
    return lay if isinstance(lay, str) else True


# --------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------


def tile_attention_fwd(q, k, v, bias=None, key_valid=None, scale=1.0):
    batch, NQ, NK, D, Dv, (qe, ke, ve, be, kve) = _attn_layout(q, k, v, bias, key_valid)
    out = torch.empty(*batch, NQ, Dv, device=q.device, dtype=torch.float32)
    lse = torch.empty(*batch, NQ, device=q.device, dtype=torch.float32)
    nb = len(batch)
    views = [qe, ke, ve, be, kve, out, lse]
    strides = [list(t.stride()[:nb]) if t is not None else [0] * nb for t in views]
    sizes, bs = _coalesce(batch, strides)
    core = lambda t, n: list(t.stride()[nb:]) if t is not None else [0] * n  # noqa: E731
    opts = _launch_opts("fwd", max(D, Dv))
    grid = (math.prod(sizes), triton.cdiv(NQ, opts["BLOCK_M"]))
    _attn_fwd_kernel[grid](
        qe, ke, ve, be if be is not None else qe, kve if kve is not None else qe, out, lse,
        sizes[1], sizes[2], sizes[3],
        *bs[0], *core(qe, 2),
        *bs[1], *core(ke, 2),
        *bs[2], *core(ve, 2),
        *bs[3], *core(be, 2),
        *bs[4], *core(kve, 1),
        *bs[5], *core(out, 2),
        *bs[6], *core(lse, 1),
        NQ, NK, D, Dv, _scalar_scale(scale),
        HAS_BIAS=be is not None, HAS_KV=kve is not None,
        BLOCK_D=_next_pow2(D), BLOCK_DV=_next_pow2(Dv),
        DOT_DTYPE=_dot_dtype(q.dtype), PREC=_precision(q.dtype),
        **opts,
    )
    return out, lse


def tile_attention_bwd(q, k, v, bias, key_valid, scale, lse, dout, delta):
    batch, NQ, NK, D, Dv, (qe, ke, ve, be, kve) = _attn_layout(q, k, v, bias, key_valid)
    nb = len(batch)
    lse_e = lse.expand(*batch, NQ)
    de_e = delta.expand(*batch, NQ)
    do_e = dout.expand(*batch, NQ, Dv)
    dq = torch.empty(*batch, NQ, D, device=q.device, dtype=torch.float32)
    dk = torch.empty(*batch, NK, D, device=q.device, dtype=torch.float32)
    dv = torch.empty(*batch, NK, Dv, device=q.device, dtype=torch.float32)
    ds = torch.empty(*batch, NQ, NK, device=q.device, dtype=torch.float32)
    views = [qe, ke, ve, be, kve, lse_e, do_e, de_e, dk, dv, ds, dq]
    strides = [list(t.stride()[:nb]) if t is not None else [0] * nb for t in views]
    co = _coalesce(batch, strides)
    if co is None:  # dq/dk/dv/ds are contiguous; only reachable with odd caller strides
        raise ValueError(f"more than {MAX_BATCH_DIMS} non-mergeable batch dims")
    sizes, bs = co
    core = lambda t, n: list(t.stride()[nb:]) if t is not None else [0] * n  # noqa: E731
    dot_dtype, prec, sc = _dot_dtype(q.dtype), _precision(q.dtype), _scalar_scale(scale)
    nbatch = math.prod(sizes)
    opts = _launch_opts("dkdv", max(D, Dv))
    _attn_bwd_dkdv_kernel[(nbatch, triton.cdiv(NK, opts["BLOCK_N"]))](
        qe, ke, ve, be if be is not None else qe, kve if kve is not None else qe,
        lse_e, do_e, de_e, dk, dv, ds,
        sizes[1], sizes[2], sizes[3],
        *bs[0], *core(qe, 2),
        *bs[1], *core(ke, 2),
        *bs[2], *core(ve, 2),
        *bs[3], *core(be, 2),
        *bs[4], *core(kve, 1),
        *bs[5], *core(lse_e, 1),
        *bs[6], *core(do_e, 2),
        *bs[7], *core(de_e, 1),
        *bs[8], *core(dk, 2),
        *bs[9], *core(dv, 2),
        *bs[10], *core(ds, 2),
        NQ, NK, D, Dv, sc,
        HAS_BIAS=be is not None, HAS_KV=kve is not None,
        BLOCK_D=_next_pow2(D), BLOCK_DV=_next_pow2(Dv),
        DOT_DTYPE=dot_dtype, PREC=prec,
        **opts,
    )
    opts = _launch_opts("dq", D)
    _attn_bwd_dq_kernel[(nbatch, triton.cdiv(NQ, opts["BLOCK_M"]))](
        ke, ds, dq,
        sizes[1], sizes[2], sizes[3],
        *bs[1], *core(ke, 2),
        *bs[10], *core(ds, 2),
        *bs[11], *core(dq, 2),
        NQ, NK, D, sc,
        BLOCK_D=_next_pow2(D), DOT_DTYPE=dot_dtype, PREC=prec,
        **opts,
    )
    return dq, dk, dv, ds


def tri_mm(a, b, out=None):
    batch, NI, NJ, NK = _tri_layout(a, b, out)
    nb = len(batch)
    ae = a.expand(*batch, NI, NK)
    be = b.expand(*batch, NJ, NK)
    accumulate = out is not None
    if out is None:
        out = torch.empty(*batch, NI, NJ, device=a.device, dtype=torch.float32)
    sizes, bs = _coalesce(batch, [list(t.stride()[:nb]) for t in (ae, be, out)])
    opts = _launch_opts("tri_mm")
    grid = (math.prod(sizes), triton.cdiv(NI, opts["BLOCK_M"]) * triton.cdiv(NJ, opts["BLOCK_N"]))
    _tri_mm_kernel[grid](
        ae, be, out,
        sizes[1], sizes[2], sizes[3],
        *bs[0], *ae.stride()[nb:],
        *bs[1], *be.stride()[nb:],
        *bs[2], *out.stride()[nb:],
        NI, NJ, NK,
        ACCUMULATE=accumulate,
        DOT_DTYPE=_dot_dtype(a.dtype), PREC=_precision(a.dtype),
        **opts,
    )
    return out


register("tile_attention_fwd", "triton", tile_attention_fwd, check_tile_attention_fwd, priority=PRIORITY)
register("tile_attention_bwd", "triton", tile_attention_bwd, check_tile_attention_bwd, priority=PRIORITY)
register("tri_mm", "triton", tri_mm, check_tri_mm, priority=PRIORITY)
