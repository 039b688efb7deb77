"""Shared helpers of the pair-op parity tests (run inside the gloo ranks).

Conventions checked (see docs/pair_ops.md):

* Pair2D / MsaTiles tensors: every rank's tile (output or input gradient) must equal the
  tile of the single-device tensor.
* RowToken tensors: output replicated along the mesh row; input gradients are partial, the
  **sum over the mesh row** must equal the single-device gradient. Seeds: each rank gives
  ``1/p`` of the gradient of a RowToken output.
* parameters: partial gradients, the sum over all ranks (``sync_grads``) must equal the
  single-device gradient.
"""

from __future__ import annotations

import torch

from autocp import comm
from autocp.layout import MsaTiles, Pair2D, RowToken
from autocp.mesh import ROW

__all__ = ["redraw", "rel_err", "tile_err", "row_grad_err", "param_grad_err"]


def redraw(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Re-draw **all** parameters (AF3 init zeroes output projections, which would make
    any residual branch an identity and any parity test vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in sorted(module.named_parameters()):
            noise = torch.randn(prm.shape, generator=g, dtype=torch.float32)
            if prm.dim() == 1 and ("norm" in name or name.endswith("weight")):
                prm.copy_(1.0 + 0.2 * noise)  # LayerNorm weights / biases around 1
            elif prm.dim() >= 2:
                prm.copy_(noise * scale / max(1.0, prm.shape[-1] ** 0.5) * 2)
            else:
                prm.copy_(0.2 * noise)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _valid_slice(layout, full_ref: torch.Tensor, mesh, sizes):
    return layout.shard(full_ref, mesh), layout.valid_mask(mesh, sizes, device=full_ref.device)


def tile_err(layout, local: torch.Tensor, full_ref: torch.Tensor, mesh, sizes) -> float:
    """Error of this rank's tile against the same tile of the reference, relative to the
    scale of the *whole* reference tensor; padded slots ignored."""
    ref_tile, valid = _valid_slice(layout, full_ref, mesh, sizes)
    while valid.dim() < local.dim():
        valid = valid.unsqueeze(-1)
    diff = (local.detach().float() - ref_tile.detach().float()) * valid
    return float(diff.abs().max() / full_ref.detach().float().abs().max().clamp_min(1e-12))


def row_grad_err(local_grad: torch.Tensor, full_ref_grad: torch.Tensor, mesh, n: int) -> float:
    """RowToken gradient: sum over the mesh row, then compare with the reference tile."""
    g = local_grad.detach().float().clone()
    comm.all_reduce_(g, mesh, ROW)
    return tile_err(RowToken(), g, full_ref_grad.float(), mesh, n)


def param_grad_err(op_params: dict, ref_grads: dict, mesh) -> float:
    """Sum each parameter grad over all ranks; worst relative error over parameters.

    Each error is relative to ``max(max|ref_p|, 1e-2 * max over all parameters)``: some
    gradients are exactly zero in exact arithmetic (e.g. a LayerNorm bias feeding a
    softmax, which is shift-invariant), and their rounding noise has no scale of its own.
    """
    import torch.distributed as dist

    floor = 1e-2 * max(float(r.detach().float().abs().max()) for r in ref_grads.values())
    worst = 0.0
    for name, ref in ref_grads.items():
        g = op_params[name].grad
        assert g is not None, f"no grad for {name}"
        g = g.detach().float().clone()
        if mesh.p > 1:
            dist.all_reduce(g)
        scale = max(float(ref.detach().float().abs().max()), floor)
        worst = max(worst, float((g - ref.float()).abs().max()) / scale)
    return worst


def param_names_with_grad(module) -> list:
    return [n for n, p in module.named_parameters() if p.requires_grad]
