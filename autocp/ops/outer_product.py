"""Outer product mean (MSA -> pair) on the 2D mesh.

Counterpart of ``boltz.model.layers.outer_product_mean.OuterProductMean``::

    out[i, j] = proj_o( sum_s a[s, i] (x) b[s, j] / max(1, sum_s mask[s, i] mask[s, j]) )

Layouts on rank ``(r, c)`` (``b = ceil(N/p)``, ``S_b = ceil(S/p)``):

* ``m``: ``MsaTiles`` tile ``m[:, S_r, T_c]`` of local shape ``[B, S_b, b, C_m]``;
  ``mask``: the MSA mask tile ``[B, S_b, b]`` (float/bool; padding is masked here).
* output: ``Pair2D`` tile ``[B, b, b, C_z]``.

Algorithm (Cannon over the sequence blocks): LayerNorm + projections are local, then
``out[T_r, T_c] = sum_t a[S_t, T_r]^T b[S_t, T_c]``. ``a[S_t, T_r]`` lives on rank ``(t, r)``
so the ``a`` tiles are transposed across the grid once (rank ``(r, c)`` then holds
``a[S_c, T_r]``) and ring along the mesh row; ``b`` tiles ring along the mesh column; both
are skewed so that step ``s`` uses sequence block ``t = (r + c + s) mod p``. The mask rides
as one extra channel of the ring buffers and its outer product gives the count normaliser
on the fly (no extra collective). Communication: one transpose + ``p`` row and ``p``
column shifts of ``[B, S_b, b, c_hidden + 1]``. The ring uses the differentiable
:func:`autocp.comm.ring_shift` / :func:`autocp.comm.transpose_exchange`, whose explicit
backward sends the gradients of each block back along the ring; autograd keeps the ``p``
received MSA blocks (``O(S N / p)``, token-sized) but nothing pair-sized besides Boltz's own
``[b, b, c_hidden^2]`` projection input.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import comm
from ..layout import LayoutError, block_size, token_valid
from ..mesh import COL, ROW, SquareMesh
from .common import broadcast_mask, share_submodules

__all__ = ["OuterProductMean2D", "check_msa_tile"]


def check_msa_tile(m: torch.Tensor, mask: Optional[torch.Tensor], mesh: SquareMesh, n_tokens: int, n_seq: int,
                   channels: int, op: str) -> torch.Tensor:
    """Validate an MsaTiles tile ``[B, S_b, b, C]`` (+ mask ``[B, S_b, b]``); return the mask
    as ``m.dtype`` with padded sequences / tokens zeroed."""
    mesh.check_tokens(n_tokens, "n_tokens")
    if n_seq < 1:
        raise LayoutError(f"{op}: n_seq={n_seq}; the MSA needs at least one sequence.")
    b, sb = block_size(n_tokens, mesh.p), block_size(n_seq, mesh.p)
    if m.dim() != 4 or m.shape[1] != sb or m.shape[2] != b:
        raise LayoutError(
            f"{op}: MSA tile has shape {tuple(m.shape)}; on a {mesh.p}x{mesh.p} mesh with S={n_seq} sequences "
            f"and N={n_tokens} tokens the MsaTiles tile must be [B, {sb}, {b}, C] (ceil(S/p), ceil(N/p)). "
            f"Fix: shard m [B, S, N, C] with autocp.MsaTiles().shard(m, mesh) and pass n_seq=S, n_tokens=N "
            f"(an MSA depth mismatch shows up here)."
        )
    if m.shape[-1] != channels:
        raise LayoutError(f"{op}: MSA tile has {m.shape[-1]} channels, the module expects {channels}.")
    valid = (token_valid(n_seq, mesh.p, mesh.r, m.device)[:, None] & token_valid(n_tokens, mesh.p, mesh.c, m.device)[None])
    if mask is None:
        return valid.to(m.dtype).expand(m.shape[:3])
    mask = broadcast_mask(mask, m.shape[:3], op, "MSA mask tile", "MsaTiles tile [B, S_b, b]",
                          "shard the [B, S, N] MSA mask with autocp.MsaTiles().shard")
    if mask.dtype.is_complex:
        raise LayoutError(f"{op}: MSA mask dtype {mask.dtype}; use float, int or bool.")
    return mask.to(m.dtype) * valid.to(m.dtype)


class OuterProductMean2D(nn.Module):
    """2D ``OuterProductMean``: ``forward(m, mask, n_tokens=N, n_seq=S)``.

    On rank (r, c): ``m [B, S_b, b, C_m]`` MsaTiles, ``mask [B, S_b, b]`` or None ->
    Pair2D tile ``[B, b, b, C_out]``. Same parameters / state_dict keys as the Boltz module.
    """

    def __init__(self, module: nn.Module, mesh: SquareMesh):
        super().__init__()
        self.mesh = mesh
        self.c_hidden = module.c_hidden
        share_submodules(self, module, ["norm", "proj_a", "proj_b", "proj_o"])

    def forward(self, m: torch.Tensor, mask: Optional[torch.Tensor], n_tokens: int, n_seq: int,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        mesh = self.mesh
        p, r, c = mesh.p, mesh.r, mesh.c
        mask = check_msa_tile(m, mask, mesh, n_tokens, n_seq, self.norm.normalized_shape[0], "OuterProductMean2D")
        mk = mask.unsqueeze(-1)
        mn = self.norm(m)
        a = torch.cat([self.proj_a(mn) * mk, mk], dim=-1)  # [B, S_b, b, ch + 1]
        bb = torch.cat([self.proj_b(mn) * mk, mk], dim=-1)
        ch = self.c_hidden
        a = comm.transpose_exchange(a, mesh)          # a[S_c, T_r]
        a = comm.ring_shift(a, mesh, ROW, r)          # a[S_{r+c}, T_r]
        bb = comm.ring_shift(bb, mesh, COL, c)        # b[S_{r+c}, T_c]
        if not (torch.is_grad_enabled() and (m.requires_grad or any(q.requires_grad for q in self.parameters()))):
            return self.forward_rows(a, bb, m)
        acc = cnt = None
        for step in range(p):
            if step:
                a = comm.ring_shift(a, mesh, ROW, 1)
                bb = comm.ring_shift(bb, mesh, COL, 1)
            prod = torch.einsum("bsic,bsjd->bijcd", a[..., :ch].float(), bb[..., :ch].float())
            num = torch.einsum("bsi,bsj->bij", a[..., ch].detach().float(), bb[..., ch].detach().float())
            acc = prod if acc is None else acc + prod
            cnt = num if cnt is None else cnt + num
        B, b = acc.shape[0], acc.shape[1]
        z = acc.reshape(B, b, b, ch * ch) / cnt.clamp(min=1).unsqueeze(-1)
        return self.proj_o(z.to(m))

    def forward_rows(self, a, bb, m):
        """Inference (no autograd): the ring's ``p`` MSA blocks of ``a`` and ``b`` are kept
        (``[B, S, b, c_hidden + 1]`` in all, MSA-sized), then the output is built one chunk
        of rows ``i`` at a time: ``sum_t a_t[:, :, i]^T b_t`` as ``[B, rows, b, c_hidden^2]``
        fp32, normalised, projected by ``proj_o`` and written into the output tile -- the
        whole-tile ``[B, b, b, c_hidden^2]`` fp32 accumulator (``c_hidden^2 / C`` times z's
        size, 8x for Boltz-2) never exists. Same bytes sent as the training ring."""
        from .common import chunk_fraction, chunk_spans

        mesh, p, ch = self.mesh, self.mesh.p, self.c_hidden
        blocks_a, blocks_b = [a], [bb]
        for _ in range(1, p):
            blocks_a.append(comm.ring_shift(blocks_a[-1], mesh, ROW, 1))
            blocks_b.append(comm.ring_shift(blocks_b[-1], mesh, COL, 1))
        del a, bb
        B, b = m.shape[0], m.shape[2]
        c_out = self.proj_o.out_features
        out = None
        acc_bytes = B * b * b * ch * ch * 4
        out_bytes = B * b * b * c_out * m.element_size()
        ratio = max(1.0, acc_bytes / max(1, out_bytes))
        for r0, r1 in chunk_spans(b, acc_bytes, chunk_fraction() / ratio):
            acc = cnt = None
            for ta, tb in zip(blocks_a, blocks_b):
                prod = torch.einsum("bsic,bsjd->bijcd", ta[:, :, r0:r1, :ch].float(), tb[..., :ch].float())
                num = torch.einsum("bsi,bsj->bij", ta[:, :, r0:r1, ch].float(), tb[..., ch].float())
                if acc is None:
                    acc, cnt = prod, num
                else:
                    acc += prod
                    cnt += num
                del prod, num
            z = acc.reshape(B, r1 - r0, b, ch * ch) / cnt.clamp(min=1).unsqueeze(-1)
            del acc, cnt
            y = self.proj_o(z.to(m))
            del z
            if out is None:
                out = torch.empty((B, b, b, y.shape[-1]), dtype=y.dtype, device=y.device)
            out[:, r0:r1] = y
            del y
        return out
