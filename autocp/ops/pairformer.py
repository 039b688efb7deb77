"""Hand-assembled 2D Pairformer (Boltz-1 and Boltz-2) from the 2D ops.

Rank ``(r, c)`` of a ``p x p`` mesh (``b = ceil(N/p)``):

* ``s``: ``RowToken`` ``[B, b, C_s]`` (``s[:, T_r]``, replicated along the mesh row; its
  gradient is partial along the row, see :mod:`autocp.ops.pair_bias_attn`);
* ``z``: ``Pair2D`` tile ``[B, b, b, C_z]``; ``mask``: RowToken token mask ``[B, b]``;
  ``pair_mask``: Pair2D tile ``[B, b, b]``.

Supported sources (parameters shared, ``state_dict`` keys identical to the source):

* ``boltz.model.layers.pairformer.PairformerModule`` / ``PairformerLayer`` (Boltz-2,
  ``v2=True``: pre-norm of ``s``, ``attentionv2`` with ``k_in``, optional post-norm);
* ``boltz.model.modules.trunk.PairformerModule`` / ``PairformerLayer`` (Boltz-1: ``attention``
  v1 with its own LayerNorm, ``no_update_s``);
* ``boltz.model.layers.pairformer.PairformerNoSeqLayer`` / ``PairformerNoSeqModule`` (pair
  stack only; used by the MSA layer and the template module).

(``layers.pairformer.PairformerLayer(v2=False)`` calls the v1 attention with ``k_in``, which
Boltz itself rejects; the 2D layer runs it as Boltz-1 does, keys from the normed ``s``.)

Dropout follows Boltz's row-wise / column-wise masks through
:func:`autocp.ops.transition.dropout_mask`; ``reproduce_dropout=True`` makes a training run
draw exactly Boltz's single-device masks (same global seed on every rank). With
``dropout * training == 0`` the multiply by the all-ones mask is skipped (the random
numbers are still drawn, as Boltz does, so the generator stream stays aligned).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..mesh import SquareMesh
from .common import share_submodules
from .pair_bias_attn import AttentionPairBias2D
from .transition import Transition2D, dropout_mask
from .triangle_attn import TriangleAttention2D
from .triangle_mult import TriangleMultiplication2D

__all__ = ["PairformerLayer2D", "Pairformer2D", "PairformerNoSeqLayer2D"]


def _unwrap(layer: nn.Module) -> nn.Module:
    return getattr(layer, "_checkpoint_wrapped_module", layer)


class _PairStack2D(nn.Module):
    """The pair half shared by all Pairformer layers: tri-mult out/in, tri-att start/end,
    transition_z, each a residual with (row / column) dropout."""

    def _init_pair(self, layer: nn.Module, mesh: SquareMesh, reproduce_dropout: bool, checkpoint_ops: bool = True):
        self.mesh = mesh
        self.checkpoint_ops = checkpoint_ops
        self.dropout = float(layer.dropout)
        self.reproduce_dropout = reproduce_dropout
        self.tri_mul_out = TriangleMultiplication2D(layer.tri_mul_out, mesh)
        self.tri_mul_in = TriangleMultiplication2D(layer.tri_mul_in, mesh)
        # triangle attention recomputes its own projections (keeps z, its output and LSE)
        self.tri_att_start = TriangleAttention2D(layer.tri_att_start, mesh, recompute=checkpoint_ops)
        self.tri_att_end = TriangleAttention2D(layer.tri_att_end, mesh, recompute=checkpoint_ops)
        self.transition_z = Transition2D(layer.transition_z, mesh)

    def _residual(self, z, update, n, columnwise=False):
        d = dropout_mask(self.dropout, z, self.training, self.mesh, n, columnwise=columnwise,
                         reproduce_single_device=self.reproduce_dropout)
        if self.dropout * self.training == 0:
            return z + update
        return z + d.to(update.dtype) * update

    def _run(self, op, z, pair_mask, n):
        """Run one triangle op; with ``checkpoint_ops`` only its input tile is kept for
        backward and its activations (projections, q/k/v, gates) are recomputed there, one
        op at a time (the ring communication is replayed in the same order on all ranks)."""
        if self.checkpoint_ops and torch.is_grad_enabled() and not getattr(op, "recomputes_itself", False):
            return checkpoint(lambda x, m: op(x, m, n_tokens=n), z, pair_mask, use_reentrant=False)
        return op(z, pair_mask, n_tokens=n)

    def _pair(self, z, pair_mask, n):
        z = self._residual(z, self._run(self.tri_mul_out, z, pair_mask, n), n)
        z = self._residual(z, self._run(self.tri_mul_in, z, pair_mask, n), n)
        z = self._residual(z, self._run(self.tri_att_start, z, pair_mask, n), n)
        z = self._residual(z, self._run(self.tri_att_end, z, pair_mask, n), n, columnwise=True)
        return z + self.transition_z(z)


class PairformerLayer2D(_PairStack2D):
    """2D ``PairformerLayer``: ``forward(s, z, mask, pair_mask, n_tokens=N) -> (s, z)``
    (layouts in the module docstring)."""

    def __init__(self, layer: nn.Module, mesh: SquareMesh, reproduce_dropout: bool = False):
        super().__init__()
        layer = _unwrap(layer)
        for name in ("tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end", "transition_z"):
            if not hasattr(layer, name):
                raise TypeError(f"PairformerLayer2D: {type(layer).__name__} has no {name}; not a Pairformer layer")
        self._init_pair(layer, mesh, reproduce_dropout)
        self.boltz2 = hasattr(layer, "pre_norm_s")
        self.update_s = hasattr(layer, "attention") and not getattr(layer, "no_update_s", False)
        if self.update_s:
            self.attention = AttentionPairBias2D(layer.attention, mesh)
            self.transition_s = Transition2D(layer.transition_s, mesh)
        if self.boltz2:
            share_submodules(self, layer, ["pre_norm_s", "s_post_norm"])
        self.train(layer.training)

    def forward(self, s, z, mask, pair_mask, n_tokens: int, chunk_size_tri_attn=None, use_kernels=False):
        n = n_tokens
        z = self._pair(z, pair_mask, n)
        if not self.update_s:
            return s, z
        if self.boltz2:
            s_normed = self.pre_norm_s(s.float())
            s = s.float() + self.attention(s_normed, z.float(), mask.float(), n_tokens=n, k_in=s_normed)
            s = s + self.transition_s(s)
            s = self.s_post_norm(s)
        else:
            s = s + self.attention(s, z, mask, n_tokens=n)
            s = s + self.transition_s(s)
        return s, z


class PairformerNoSeqLayer2D(_PairStack2D):
    """2D ``PairformerNoSeqLayer``: ``forward(z, pair_mask, n_tokens=N) -> z``."""

    def __init__(self, layer: nn.Module, mesh: SquareMesh, reproduce_dropout: bool = False):
        super().__init__()
        self._init_pair(_unwrap(layer), mesh, reproduce_dropout)
        self.train(layer.training)

    def forward(self, z, pair_mask, n_tokens: int, chunk_size_tri_attn=None, use_kernels=False):
        return self._pair(z, pair_mask, n_tokens)


class Pairformer2D(nn.Module):
    """2D ``PairformerModule`` (Boltz-1 or Boltz-2) or ``PairformerNoSeqModule``.

    ``forward(s, z, mask, pair_mask, n_tokens=N) -> (s, z)`` on rank (r, c): ``s [B, b, C_s]``
    RowToken, ``z [B, b, b, C_z]`` Pair2D, ``mask [B, b]`` RowToken, ``pair_mask [B, b, b]``
    Pair2D. A ``PairformerNoSeqModule`` gives ``forward(z, pair_mask, n_tokens=N) -> z``.
    ``state_dict`` keys equal the source module's.
    """

    def __init__(self, module: nn.Module, mesh: Optional[SquareMesh] = None, reproduce_dropout: bool = False):
        super().__init__()
        mesh = SquareMesh.from_any(mesh)
        self.mesh = mesh
        if not hasattr(module, "layers"):
            raise TypeError(
                f"Pairformer2D wraps a Pairformer *module* (with .layers); given {type(module).__name__}. "
                f"For a single layer use PairformerLayer2D / PairformerNoSeqLayer2D."
            )
        layers = [_unwrap(l) for l in module.layers]
        self.no_seq = all(not hasattr(l, "attention") and not hasattr(l, "no_update_s") for l in layers)
        cls = PairformerNoSeqLayer2D if self.no_seq else PairformerLayer2D
        self.layers = nn.ModuleList([cls(l, mesh, reproduce_dropout) for l in layers])
        self.train(module.training)  # start in the source's train/eval mode

    def forward(self, *args, n_tokens: int, **kwargs):
        if self.no_seq:
            z, pair_mask = args[:2]
            for layer in self.layers:
                z = layer(z, pair_mask, n_tokens=n_tokens)
            return z
        s, z, mask, pair_mask = args[:4]
        for layer in self.layers:
            s, z = layer(s, z, mask, pair_mask, n_tokens=n_tokens)
        return s, z
