"""2D ``MSALayer`` (``boltz.model.modules.trunkv2.MSALayer``) from the 2D ops.

Rank ``(r, c)`` of a ``p x p`` mesh (``b = ceil(N/p)``, ``S_b = ceil(S/p)``):

* ``z``: Pair2D tile ``[B, b, b, C_z]``; ``token_mask``: the *pair* mask tile ``[B, b, b]``
  (Boltz's MSA module passes ``token_pad_mask[:, :, None] * token_pad_mask[:, None, :]``);
* ``m``: MsaTiles tile ``m[:, S_r, T_c]`` ``[B, S_b, b, C_m]``; ``msa_mask``: ``[B, S_b, b]``.

Steps (all 2D, no gather): MSA row dropout (per sequence row, block ``S_r``) +
:class:`~autocp.ops.pair_averaging.PairWeightedAveraging2D`, MSA transition (tile-local),
:class:`~autocp.ops.outer_product.OuterProductMean2D` into ``z``, then the pair stack
(:class:`~autocp.ops.pairformer.PairformerNoSeqLayer2D`). ``state_dict`` keys are the
Boltz module's.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..mesh import SquareMesh
from .outer_product import OuterProductMean2D
from .pair_averaging import PairWeightedAveraging2D
from .pairformer import PairformerNoSeqLayer2D
from .transition import Transition2D, dropout_mask

__all__ = ["MSALayer2D"]


class MSALayer2D(nn.Module):
    """``forward(z, m, token_mask, msa_mask, n_tokens=N, n_seq=S) -> (z, m)`` (layouts above)."""

    def __init__(self, layer: nn.Module, mesh: Optional[SquareMesh] = None, reproduce_dropout: bool = False):
        super().__init__()
        mesh = SquareMesh.from_any(mesh)
        for name in ("pair_weighted_averaging", "msa_transition", "outer_product_mean", "pairformer_layer"):
            if not hasattr(layer, name):
                raise TypeError(f"MSALayer2D: {type(layer).__name__} has no {name}; expected boltz trunkv2.MSALayer")
        self.mesh = mesh
        self.msa_dropout = float(layer.msa_dropout)
        self.reproduce_dropout = reproduce_dropout
        self.msa_transition = Transition2D(layer.msa_transition, mesh)
        self.pair_weighted_averaging = PairWeightedAveraging2D(layer.pair_weighted_averaging, mesh)
        self.pairformer_layer = PairformerNoSeqLayer2D(layer.pairformer_layer, mesh, reproduce_dropout)
        self.outer_product_mean = OuterProductMean2D(layer.outer_product_mean, mesh)
        self.train(layer.training)

    def forward(self, z, m, token_mask, msa_mask, n_tokens: int, n_seq: int, **_chunking):
        upd = self.pair_weighted_averaging(m, z, token_mask, n_tokens=n_tokens, n_seq=n_seq)
        d = dropout_mask(self.msa_dropout, m, self.training, self.mesh, n_seq,
                         reproduce_single_device=self.reproduce_dropout)
        m = m + (upd if self.msa_dropout * self.training == 0 else d.to(upd.dtype) * upd)
        m = m + self.msa_transition(m)
        z = z + self.outer_product_mean(m, msa_mask, n_tokens=n_tokens, n_seq=n_seq)
        z = self.pairformer_layer(z, token_mask, n_tokens=n_tokens)
        return z, m
