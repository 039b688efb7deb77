"""One ``torch.export`` call for every capture (non-strict), leaving no graph behind.

``torch.export`` keeps its last trace's fake-tensor -> node map in a module global of
``torch.fx.experimental.proxy_tensor`` (cleared only when the next trace starts). Its nodes'
``meta`` reach autocp's opaque call sites, so the last captured model (and its parameters)
stayed alive after the user dropped it. :func:`export` clears that map when it returns.
"""

from __future__ import annotations

import torch

__all__ = ["export"]


def export(module, args, kwargs=None):
    """``torch.export.export(module, args, kwargs, strict=False)``, then the tracer's global
    node map is cleared and the program's example inputs dropped (it keeps what it needs)."""
    try:
        ep = torch.export.export(module, tuple(args), dict(kwargs or {}), strict=False)
        # the program keeps its example inputs; autocp captures at the global shapes, so those are
        # whole (O(N^2)) tensors -- an island's would stay alive on every rank for the model's life
        ep._example_inputs = None
        return ep
    finally:
        from torch.fx.experimental import proxy_tensor

        leftover = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
        if isinstance(leftover, dict):
            leftover.clear()
