"""autocp.kernels -- tile kernels behind one registry, torch reference as the fallback.

Ops (see :mod:`autocp.kernels.reference` for the exact interface):

* ``tile_attention_fwd`` / ``tile_attention_bwd`` -- attention of a query tile over one
  key block with additive bias and key validity, returning the LSE for ring merges.
* ``tri_mm`` -- the batched per-channel GEMM ``a @ b^T`` of triangle multiplication.

``tile_attention_fwd(...)`` etc. below dispatch to the best implementation whose checker
accepts the inputs; ``explain(op, *inputs)`` says which and why.
"""

from __future__ import annotations

from . import reference
from .registry import dispatch, explain, force_reference, implementations, register, select

__all__ = [
    "tile_attention_fwd",
    "tile_attention_bwd",
    "tri_mm",
    "register",
    "select",
    "dispatch",
    "explain",
    "implementations",
    "force_reference",
]

_REF_PRIORITY = -1000
for _name in ("tile_attention_fwd", "tile_attention_bwd", "tri_mm"):
    register(_name, "torch-reference", getattr(reference, _name), priority=_REF_PRIORITY)

#: why the Triton implementations are not registered (None when they are)
TRITON_IMPORT_ERROR = None
try:  # Triton implementations register themselves when triton imports (see docs/kernels.md)
    from . import triton_impl as _triton_impl  # noqa: F401
except Exception as _e:  # noqa: BLE001 -- triton missing or broken: the references still work
    _triton_impl = None
    TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"


def tile_attention_fwd(q, k, v, bias=None, key_valid=None, scale: float = 1.0):
    return dispatch("tile_attention_fwd", q, k, v, bias, key_valid, scale)


def tile_attention_bwd(q, k, v, bias, key_valid, scale, lse, dout, delta):
    return dispatch("tile_attention_bwd", q, k, v, bias, key_valid, scale, lse, dout, delta)


def tri_mm(a, b, out=None):
    return dispatch("tri_mm", a, b, out)
