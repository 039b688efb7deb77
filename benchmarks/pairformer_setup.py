"""The Boltz-2 ``PairformerModule`` and inputs the benchmarks measure (one definition)."""

from __future__ import annotations

import torch

__all__ = ["build_pairformer", "pairformer_inputs"]


def build_pairformer(cfg: dict, seed: int = 0):
    """``PairformerModule(**cfg)`` with every parameter re-drawn (Boltz zero-inits its output
    projections, which would make parity and memory comparisons vacuous)."""
    from boltz.model.layers.pairformer import PairformerModule

    torch.manual_seed(seed)
    mod = PairformerModule(**cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for prm in mod.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.05 + (1.0 if prm.dim() == 1 else 0.0))
    return mod


def pairformer_inputs(cfg: dict, n: int, seed: int = 2):
    """``(s, z, mask, pair_mask)`` at ``n`` tokens for a Pairformer of widths ``cfg``."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, n, cfg["token_s"], generator=g)
    z = torch.randn(1, n, n, cfg["token_z"], generator=g)
    mask = torch.ones(1, n)
    return s, z, mask, mask[:, :, None] * mask[:, None, :]
