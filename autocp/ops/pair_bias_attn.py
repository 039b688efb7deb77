"""Attention with pair bias (single representation ``s`` attends over tokens, bias from ``z``).

Counterpart of ``boltz.model.layers.attention.AttentionPairBias`` (Boltz-1: LayerNorm on
``s`` when ``initial_norm``, keys from ``s`` itself, optional ``model_cache``) and
``boltz.model.layers.attentionv2.AttentionPairBias`` (Boltz-2: keys from ``k_in``,
``compute_pair_bias=False`` takes a precomputed bias ``[B, N, N, H]``).

Layouts on rank ``(r, c)`` of a ``p x p`` mesh (``b = ceil(N/p)``):

* ``s``, ``k_in`` and the output: ``RowToken`` -- ``s[:, T_r]`` of local shape
  ``[B, b, C_s]``, *replicated along the mesh row* (every ``(r, *)`` holds the same values).
* ``z``: ``Pair2D`` tile ``z[:, T_r, T_c]``, local ``[B, b, b, C_z]`` (``[B, b, b, H]`` for
  a v2 module with ``compute_pair_bias=False``).
* ``mask``: the token mask in ``RowToken`` layout, local ``[B, b]`` (float or bool).

Algorithm: queries of block ``T_r`` are local; keys/values of block ``T_c`` come from the
transpose partner ``(c, r)`` (one exchange of ``[B, b, 2 C_s]``); the bias tile is
projected locally. Each rank computes the partial attention of ``T_r`` over ``T_c`` (out +
LSE, :func:`autocp.kernels.tile_attention_fwd`), and the ``p`` partials of the mesh row
are merged with :func:`autocp.ops.common.merge_lse` (all-gather of ``[B, H, b, D]`` + LSE
along the row, merged in the same order on every rank, so the result is bit-identical
across the row). Backward is explicit (:class:`_RowMergedAttention`): one all-reduce of
the output gradient along the row, then the flash backward of the local key block.

Gradient convention for replicated token tensors (``RowToken``/``ColToken``): the
gradient held by a rank is *partial*; the true gradient of ``s[:, T_r]`` is the **sum
over the mesh row** of the ranks' gradients (for ``ColToken``: over the mesh column).
This is the activation analogue of :func:`autocp.ops.common.sync_grads`' parameter
convention and needs no rescaling of replicated computations (their backward is linear
in the incoming partial gradient). To seed it from a loss on a replicated output, give
each rank ``1/p`` of the gradient (or the whole gradient on ``c == 0`` only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import comm, kernels
from ..layout import LayoutError
from ..mesh import ROW, SquareMesh
from .common import TileCtx, check_pair_tile, merge_lse, share_submodules

__all__ = ["AttentionPairBias2D", "row_token_to_col"]


def row_token_to_col(x: torch.Tensor, mesh: SquareMesh) -> torch.Tensor:
    """Non-differentiable RowToken -> ColToken conversion (e.g. of a mask): the tile of the
    transpose partner ``(c, r)``."""
    if mesh.p == 1 or mesh.r == mesh.c:
        return x
    return comm.exchange(x, mesh.transpose_partner, mesh.transpose_partner, name="row_to_col_token")


class _RowMergedAttention(torch.autograd.Function):
    """Attention of query block ``T_r`` over all keys, merged along the mesh row.

    Inputs on rank (r, c): ``q [B, H, b, D]`` (block T_r), ``k, v [B, H, b, D]`` (block T_c),
    ``bias [B, H, b, b]`` (tile (T_r, T_c), mask term included), ``key_valid [b]``.
    Output ``[B, H, b, D]`` fp32: the attention of T_r over all N keys, identical on the row.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, key_valid, scale, mesh):
        out, lse = kernels.tile_attention_fwd(q, k, v, bias, key_valid, scale)
        if mesh.p > 1:
            outs = comm.all_gather(out.unsqueeze(0), mesh, ROW, 0, name="pair_bias_attn_merge")
            lses = comm.all_gather(lse.unsqueeze(0), mesh, ROW, 0, name="pair_bias_attn_merge")
            out, lse = outs[0], lses[0]
            for i in range(1, mesh.p):
                out, lse = merge_lse(out, lse, outs[i], lses[i])
            del outs, lses
        ctx.mesh, ctx.scale = mesh, scale
        ctx.save_for_backward(q, k, v, bias, key_valid, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, bias, key_valid, out, lse = ctx.saved_tensors
        mesh = ctx.mesh
        # incoming gradient is partial along the row (RowToken convention): make it whole
        grad = g.float().contiguous().clone()
        comm.all_reduce_(grad, mesh, ROW, name="pair_bias_attn_grad")
        delta = (grad * out).sum(-1)
        dq, dk, dv, dbias = kernels.tile_attention_bwd(q, k, v, bias, key_valid, ctx.scale, lse, grad, delta)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias.to(bias.dtype), None, None, None


class AttentionPairBias2D(nn.Module):
    """2D-parallel ``AttentionPairBias`` (Boltz-1 ``attention`` or Boltz-2 ``attentionv2``).

    Shares the Boltz module's submodules (same ``state_dict`` keys, same parameters).

    ``forward(s, z, mask, n_tokens=N, k_in=None, multiplicity=1, model_cache=None)`` on
    rank (r, c): ``s [B*mult, b, C_s]`` RowToken, ``z [B, b, b, C_z]`` Pair2D tile,
    ``mask [B*mult, b]`` RowToken token mask, ``k_in`` RowToken (v2 only; required there).
    Returns the RowToken update ``[B*mult, b, C_s]`` (replicated along the mesh row).
    """

    def __init__(self, module: nn.Module, mesh: SquareMesh):
        super().__init__()
        self.mesh = mesh
        self.v2 = not hasattr(module, "initial_norm")
        self.c_s = module.c_s
        self.num_heads = module.num_heads
        self.head_dim = module.head_dim
        self.inf = module.inf
        self.initial_norm = getattr(module, "initial_norm", False)
        self.compute_pair_bias = getattr(module, "compute_pair_bias", True)
        share_submodules(self, module, [n for n, _ in module.named_children()])

    def _bias(self, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.compute_pair_bias:
            # recompute LayerNorm(z) in backward instead of saving a tile-sized activation
            return checkpoint(self.proj_z, z, use_reentrant=False)
        return self.proj_z(z)

    def forward(
        self,
        s: torch.Tensor,
        z: torch.Tensor,
        mask: Optional[torch.Tensor],
        n_tokens: int,
        k_in: Optional[torch.Tensor] = None,
        multiplicity: int = 1,
        to_keys=None,
        model_cache: Optional[dict] = None,
    ) -> torch.Tensor:
        mesh = self.mesh
        tc = TileCtx(mesh, n_tokens)
        b = tc.b
        if to_keys is not None:
            raise NotImplementedError(
                "AttentionPairBias2D: to_keys (atom-window keys) is not supported on Pair2D tiles; "
                "use the windowed atom attention op."
            )
        if s.dim() != 3 or s.shape[1] != b or s.shape[2] != self.c_s:
            raise LayoutError(
                f"AttentionPairBias2D: s has shape {tuple(s.shape)}; on a {mesh.p}x{mesh.p} mesh with "
                f"N={n_tokens} it must be the RowToken tile [B, {b}, {self.c_s}]. "
                f"Fix: autocp.RowToken().shard(s, mesh)."
            )
        B = s.shape[0]
        if self.v2:
            if k_in is None:
                raise TypeError("AttentionPairBias2D (Boltz-2 attentionv2): k_in is required")
            if k_in.shape != s.shape:
                raise LayoutError(
                    f"AttentionPairBias2D: k_in has shape {tuple(k_in.shape)}, it must match s {tuple(s.shape)} "
                    f"(RowToken tile)."
                )
        chans = self.proj_z[0].normalized_shape[0] if self.compute_pair_bias else self.num_heads
        check_pair_tile(z, None, tc, channels=chans, op="AttentionPairBias2D")
        if z.shape[0] * multiplicity != B:
            raise LayoutError(
                f"AttentionPairBias2D: z batch {z.shape[0]} x multiplicity {multiplicity} != s batch {B}."
            )
        if mask is None:
            mask = torch.ones(B, b, dtype=s.dtype, device=s.device)
        if mask.shape != (B, b):
            raise LayoutError(
                f"AttentionPairBias2D: mask has shape {tuple(mask.shape)}; the token mask must be the "
                f"RowToken tile [B, b] = {(B, b)}. Fix: autocp.RowToken().shard(mask, mesh)."
            )
        if mask.dtype.is_complex:
            raise LayoutError(f"AttentionPairBias2D: mask dtype {mask.dtype}; use a float, int or bool token mask.")

        if self.initial_norm:
            s = self.norm_s(s)
        if not self.v2:
            k_in = s

        H, D = self.num_heads, self.head_dim
        q = self.proj_q(s).view(B, b, H, D).transpose(1, 2)
        kv = torch.cat([self.proj_k(k_in), self.proj_v(k_in)], dim=-1)
        kv = comm.transpose_exchange(kv, mesh)  # keys/values of block T_c (from rank (c, r))
        k, v = kv.view(B, b, 2, H, D).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)

        if model_cache is not None and "z" in model_cache:
            bias = model_cache["z"]
        else:
            bias = self._bias(z)  # [B, H, b, b]
            if model_cache is not None:
                model_cache["z"] = bias
        bias = bias.repeat_interleave(multiplicity, 0)
        key_mask = row_token_to_col(mask.float(), mesh)  # token mask of block T_c
        bias = bias.float() + (1 - key_mask[:, None, None]) * -self.inf

        g = self.proj_g(s).sigmoid()
        o = _RowMergedAttention.apply(q, k, v, bias, tc.valid(mesh.c, s.device), 1.0 / math.sqrt(D), mesh)
        o = o.to(v.dtype).transpose(1, 2).reshape(B, b, self.c_s)
        return self.proj_o(g * o)
