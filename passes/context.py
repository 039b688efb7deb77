"""The tile context: global token count and mesh while a parallel module runs.

Rewritten modules run the model's own python on local tiles; the 2D ops they call need
the *global* N (which slots of a tile are padding). :class:`autocp.passes.emit.ParallelModule`
sets it around every forward with :func:`tile_context`; ops read :func:`current_n`.
"""

from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["tile_context", "current_n", "current_mesh", "current"]

_LOCAL = threading.local()
# the context of the latest forward run under tile_context with grad enabled: activation
# checkpointing (torch.utils.checkpoint, reentrant or not) recomputes the forward inside
# backward, after tile_context has exited -- and possibly on the autograd engine's thread
_RECOMPUTE = {"info": None}


class TileInfo(tuple):
    """``(mesh, n)`` plus ``n_seq`` (global MSA depth, or None)."""

    def __new__(cls, mesh, n, n_seq=None):
        obj = super().__new__(cls, (mesh, n))
        obj.mesh, obj.n, obj.n_seq = mesh, n, n_seq
        return obj


@contextlib.contextmanager
def tile_context(mesh, n_tokens: int, n_seq=None):
    """Make ``(mesh, n_tokens)`` current inside the block (nestable)."""
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    info = TileInfo(mesh, int(n_tokens), n_seq)
    stack.append(info)
    if torch.is_grad_enabled():
        _RECOMPUTE["info"] = info
    try:
        yield
    finally:
        stack.pop()


def current():
    stack = getattr(_LOCAL, "stack", None)
    if not stack and _RECOMPUTE["info"] is not None and torch._C._current_graph_task_id() != -1:
        # inside backward: a checkpointed region recomputes its forward with the
        # context it ran with (same mesh, same N, so the same communication)
        return _RECOMPUTE["info"]
    if not stack:
        raise RuntimeError(
            "autocp: a rewritten module was called outside a parallel module's forward, so the "
            "global token count N is unknown. Fix: call the module returned by "
            "autocp.parallelize(...), or wrap the call in autocp.passes.context.tile_context(mesh, N)."
        )
    return stack[-1]


def current_n() -> int:
    return current()[1]


def current_mesh():
    return current()[0]
