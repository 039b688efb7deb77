"""The tile context: global token count and mesh while a parallel module runs.

Rewritten modules run the model's own python on local tiles; the 2D ops they call need
the *global* N (which slots of a tile are padding). :class:`autocp.passes.emit.ParallelModule`
sets it around every forward with :func:`tile_context`; ops read :func:`current_n`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import torch

__all__ = ["tile_context", "current_n", "current_mesh", "current", "GlueLog", "glue_log", "log_notes"]

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


class GlueLog:
    """What the glue of a run did, for ``explain()``: the sharding notes
    (:class:`autocp.passes.shard.Note`: gathers, exchanges, all-reduces, rings) of every tile
    program that ran, each program once (the first call's source line)."""

    def __init__(self):
        self.notes: list = []
        self._seen: set = set()

    def add(self, key, notes, source=None, where: str = "") -> None:
        if key in self._seen:
            return
        self._seen.add(key)
        line = None
        for nt in notes:
            if not nt.source and source is not None:
                line = source() if line is None else line
                nt = dataclasses.replace(nt, source=line)
            if where:
                nt = dataclasses.replace(nt, node=f"{where}:{nt.node}")
            self.notes.append(nt)


@contextlib.contextmanager
def glue_log(log: "GlueLog"):
    """Collect the notes of the tile programs run inside the block into ``log``."""
    stack = getattr(_LOCAL, "logs", None)
    if stack is None:
        stack = _LOCAL.logs = []
    stack.append(log)
    try:
        yield log
    finally:
        stack.pop()


def log_notes(key, notes, source=None, where: str = "") -> None:
    """Record ``notes`` of the program ``key`` in the current :class:`GlueLog` (if any; once per
    key). ``source``: a callable giving the model's line, for notes without one; ``where``: the
    submodule path the program runs for."""
    stack = getattr(_LOCAL, "logs", None)
    if stack and notes:
        stack[-1].add(key, notes, source, where)
