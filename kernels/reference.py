"""Torch reference implementations of the tile computations (always correct, any device).

These define the kernel interface that :mod:`autocp.ops` calls through the registry:

``tile_attention_fwd(q, k, v, bias=None, key_valid=None, scale=1.0) -> (out, lse)``
    ``q [..., Q, D]``, ``k [..., K, D]``, ``v [..., K, Dv]``; ``bias`` additive,
    broadcastable to ``[..., Q, K]``; ``key_valid`` bool broadcastable to ``[..., K]``
    (False = the key does not exist at all, e.g. autocp padding: it gets no weight, not
    even in a fully masked row). Returns ``out [..., Q, Dv]`` (softmax-normalised inside
    this key block) and ``lse [..., Q]``, both fp32. A query whose keys are all invalid
    gets ``out = 0`` and ``lse = -inf`` so that log-sum-exp merges ignore it.

``tile_attention_bwd(q, k, v, bias, key_valid, scale, lse, dout, delta) -> (dq, dk, dv, dbias)``
    Flash-attention backward of one key block given the *merged* ``lse`` and
    ``delta = sum(dout * out_merged, -1)`` of the whole row; ``dbias`` has the full
    ``[..., Q, K]`` shape (the caller sums broadcast dims). fp32 results.

``tri_mm(a, b, out=None) -> out (+)= a @ b^T``
    Batched ``a [..., I, K]``, ``b [..., J, K]`` (the per-channel GEMM of triangle
    multiplication, channels folded into the batch); fp32 accumulation.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["tile_attention_fwd", "tile_attention_bwd", "tri_mm"]


def _recorded(*tensors) -> bool:
    """Autograd records these ops (then no in-place update of a saved temporary)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _scores(q, k, bias, key_valid, scale, inplace):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2))
    if inplace:  # the score block is a fresh temporary: update it in place (no extra block)
        if scale != 1.0:
            s.mul_(scale)
        if bias is not None:
            s.add_(bias.float())
        if key_valid is not None:
            s.masked_fill_(~key_valid.unsqueeze(-2), float("-inf"))
        return s
    if scale != 1.0:
        s = s * scale
    if bias is not None:
        s = s + bias.float()
    if key_valid is not None:
        s = s.masked_fill(~key_valid.unsqueeze(-2), float("-inf"))
    return s


def _finite(lse):
    return torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1)


def tile_attention_fwd(q, k, v, bias=None, key_valid: Optional[torch.Tensor] = None, scale: float = 1.0):
    inplace = not _recorded(q, k, v, bias)
    s = _scores(q, k, bias, key_valid, scale, inplace)
    lse = torch.logsumexp(s, dim=-1)
    p = s.sub_(_finite(lse)).exp_() if inplace else torch.exp(s - _finite(lse))
    out = torch.matmul(p, v.float())
    return out, lse


def tile_attention_bwd(q, k, v, bias, key_valid, scale, lse, dout, delta):
    inplace = not _recorded(q, k, v, bias, dout)
    s = _scores(q, k, bias, key_valid, scale, inplace)
    p = s.sub_(_finite(lse)).exp_() if inplace else torch.exp(s - _finite(lse))
    dout = dout.float()
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.float().transpose(-1, -2))
    ds = dp.sub_(delta.unsqueeze(-1)).mul_(p) if inplace else p * (dp - delta.unsqueeze(-1))
    dq = torch.matmul(ds, k.float())
    dk = torch.matmul(ds.transpose(-1, -2), q.float())
    if scale != 1.0:
        dq, dk = dq * scale, dk * scale
    return dq, dk, dv, ds


def tri_mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    a, bt = a.float(), b.float().transpose(-1, -2)
    if out is None:
        return torch.matmul(a, bt)
    if (
        out.dtype == torch.float32 and out.is_contiguous() and out.dim() >= 3
        and a.shape[:-2] == bt.shape[:-2] == out.shape[:-2]
    ):  # accumulate in place (baddbmm, beta=1): no temporary product tile
        o3 = out.view(-1, *out.shape[-2:])
        o3.baddbmm_(a.reshape(-1, *a.shape[-2:]), bt.reshape(-1, *bt.shape[-2:]))
        return out
    out.add_(torch.matmul(a, bt))
    return out
