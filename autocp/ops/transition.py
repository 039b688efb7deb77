"""Tile-local ops: Transition (SwiGLU MLP), LayerNorm / Linear on channels, dropout.

Channel-wise ops act on each token pair independently, so on rank ``(r, c)`` they run
unchanged on the ``Pair2D`` tile ``[B, b, b, C]`` (or a ``RowToken`` tile ``[B, b, C]``, or
an ``MsaTiles`` tile ``[B, S_b, b, C]``): ``nn.LayerNorm`` / ``nn.Linear`` modules of Boltz
are simply called on the tile. Two things need care:

* **memory** -- Boltz's ``Transition`` materialises a ``4 C`` hidden tensor (x3: fc1, silu,
  fc2) for the whole tile and autograd keeps them. :class:`Transition2D` runs the module on
  row chunks of the tile and, when grads are needed, checkpoints each chunk (only the
  chunk's input is kept; the hidden is recomputed in backward, one chunk at a time).
* **dropout** -- Boltz's ``get_dropout_mask`` draws one value per *row* ``i`` (shared by all
  columns ``j``) or, ``columnwise``, per column ``j``, over the full ``[B, N]``.
  :func:`dropout_mask` gives this rank's ``[B, b, 1, 1]`` / ``[B, 1, b, 1]`` slice:

  - ``reproduce_single_device=True`` (debug): draw the *full* ``[B, N, 1, 1]`` (or
    ``[B, 1, N, 1]``) mask with ``torch.rand`` from the given generator (default: torch's
    global one, i.e. exactly the call Boltz makes) and slice block ``T_r`` (``T_c``). With the
    same seed on every rank the masks equal the single-device ones bit for bit (it costs
    ``O(N)`` random numbers per call, not ``O(N^2)``).
  - default: draw only this block's ``b`` values from a generator seeded with
    ``(base, block index)``, where ``base`` is one ``int64`` drawn from the global (or
    given) generator -- identical on all ranks when they were seeded identically. All
    ranks that hold the same row block (``T_r``, i.e. the mesh row) draw the same values,
    so the row (column) sharing of Boltz holds, without drawing the full mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layout import LayoutError, block_size, pad_to
from ..mesh import SquareMesh
from .common import chunk_fraction, chunk_spans, share_submodules

__all__ = ["Transition2D", "dropout_mask"]


class Transition2D(nn.Module):
    """Boltz ``Transition`` on a tile: local, chunked over dim 1, recomputed in backward.

    ``forward(x)``: ``x [B, b, ..., C]`` (any tile: Pair2D ``[B, b, b, C]`` on rank (r, c),
    RowToken ``[B, b, C]``, MsaTiles ``[B, S_b, b, C]``) -> same shape. Same parameters
    and ``state_dict`` keys as the Boltz module. ``chunk_rows=None`` picks row chunks whose
    hidden tensors are about :func:`autocp.chunking`'s fraction of the input (none below its
    ``min_bytes``); ``recompute=False`` keeps Boltz's autograd behaviour.
    """

    def __init__(self, module: nn.Module, mesh: Optional[SquareMesh] = None, chunk_rows: Optional[int] = None,
                 recompute: bool = True):
        super().__init__()
        self.hidden = module.hidden
        self.chunk_rows = chunk_rows
        self.recompute = recompute
        self.recomputes_itself = recompute  # the compiler's recompute policy leaves it alone
        share_submodules(self, module, [n for n, _ in module.named_children()])

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.fc3(self.silu(self.fc1(x)) * self.fc2(x))

    def forward(self, x: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        if x.shape[-1] != self.norm.normalized_shape[0]:
            raise LayoutError(
                f"Transition2D: input has {x.shape[-1]} channels, the module expects "
                f"{self.norm.normalized_shape[0]}."
            )
        if self.chunk_rows:
            spans = [(i, min(i + self.chunk_rows, x.shape[1])) for i in range(0, x.shape[1], self.chunk_rows)]
        else:  # the hidden chunk (fc1 and fc2 outputs, 2 * hidden / C of the input) ~ chunk_fraction() of x
            ratio = 2.0 * self.hidden / x.shape[-1]
            spans = chunk_spans(x.shape[1], int(x.numel() * x.element_size() * ratio), chunk_fraction() / ratio)
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not grad:  # inference: chunks written into one preallocated output (no list + cat copy)
            out = None
            for i, j in spans:
                y = self._mlp(x[:, i:j])
                if out is None:
                    out = torch.empty(x.shape[:-1] + y.shape[-1:], dtype=y.dtype, device=y.device)
                out[:, i:j] = y
                del y
            return out
        outs = []
        for i, j in spans:
            xi = x[:, i:j]
            if grad and self.recompute:
                outs.append(checkpoint(self._mlp, xi, use_reentrant=False))
            else:
                outs.append(self._mlp(xi))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def dropout_mask(
    dropout: float,
    z: torch.Tensor,
    training: bool,
    mesh: SquareMesh,
    n_tokens: int,
    columnwise: bool = False,
    *,
    reproduce_single_device: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """This rank's slice of Boltz's ``get_dropout_mask(dropout, z, training, columnwise)``.

    ``z``: the Pair2D tile ``[B, b, b, C]`` of rank (r, c) (an MsaTiles tile ``[B, S_b, b, C]``
    works too: its row dim is the MSA sequence dim, so pass ``n_tokens=S``, the MSA depth;
    its block index is ``r`` as for pair rows).
    Returns ``[B, b, 1, 1]`` (row-wise: block ``T_r``) or ``[B, 1, b, 1]`` (column-wise:
    block ``T_c``), float32 with values ``0`` or ``1 / (1 - dropout)``. Padded slots get the
    value of the mask's formula too (they are ignored downstream).
    Like Boltz, the random numbers are drawn even when ``training`` is False or
    ``dropout == 0`` so the generator advances identically.
    """
    dropout = dropout * training
    p = mesh.p
    b = block_size(n_tokens, p)
    dim = 2 if columnwise else 1
    if z.shape[dim] != b:
        raise LayoutError(
            f"dropout_mask: tile has shape {tuple(z.shape)}; dim {dim} must be the block size "
            f"{b} (N={n_tokens}, p={p})."
        )
    t = mesh.c if columnwise else mesh.r
    B = z.shape[0]
    if reproduce_single_device:
        full = [B, 1, n_tokens, 1] if columnwise else [B, n_tokens, 1, 1]
        u = torch.rand(full, dtype=torch.float32, device=z.device, generator=generator)
        lo = min(t * b, n_tokens)
        hi = min((t + 1) * b, n_tokens)
        u = pad_to(u.narrow(dim, lo, hi - lo), dim, b, value=1.0)
    else:
        gdev = generator.device if generator is not None else "cpu"
        base = int(torch.randint(0, 2**62, (1,), generator=generator, device=gdev).item())
        g = torch.Generator(device=z.device).manual_seed((base + 1_000_003 * (t + 1)) % (2**63 - 1))
        shape = [B, 1, b, 1] if columnwise else [B, b, 1, 1]
        u = torch.rand(shape, dtype=torch.float32, device=z.device, generator=g)
    d = u >= dropout
    return d * 1.0 / (1.0 - dropout)
