"""Pass infrastructure: each compile stage is a pass with executable ``requires`` / ``ensures``
(after ``torch/fx/passes/infra``: ``PassBase`` / ``PassManager``).

A pass reads and writes one :class:`CompileState`; its ``requires`` checks what it needs of
the state before it runs, its ``ensures`` what it promises after. The :class:`PassManager`
runs the passes in order and -- when checking is on (``AUTOCP_CHECK_PASSES=1``, which the
test suite sets, or ``PassManager(check=True)``) -- calls both around every pass, so a pass
that breaks an invariant fails at that pass, naming it, instead of as a wrong layout three
passes later. A pass never reaches into a later one.

The compile pipeline (:func:`autocp.passes.pipeline.compile_stages`) is ``capture ->
claim``; the sharding pass then decides every other op from one rule table when the graph
runner shards the capture. The records the passes write are the typed
:class:`~autocp.passes.record.NodeRecord` at ``node.meta["autocp"]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .record import rec

__all__ = ["PassCheckError", "CompileState", "PassBase", "PassManager", "checking", "CAPTURE", "CLAIM"]


class PassCheckError(BaseException):
    """A pass broke its own ``requires`` / ``ensures`` contract: an autocp bug (a
    ``BaseException``, so a model's ``except Exception`` cannot hide it)."""


def checking() -> bool:
    """Whether pass contracts are checked by default (``AUTOCP_CHECK_PASSES=1``)."""
    return os.environ.get("AUTOCP_CHECK_PASSES", "") not in ("", "0")


@dataclass
class CompileState:
    """What the compile passes share: the inputs, then each pass's product."""

    model: Any
    args: tuple
    kwargs: dict
    input_tags: list
    n: int
    mesh: Any = None
    reuse_blocks: bool = True
    capture: Any = None  # autocp.passes.trace.Capture
    plan: Any = None  # autocp.passes.rewrite.RewritePlan
    log: list = field(default_factory=list)  # names of the passes run, in order


class PassBase:
    """One stage. ``call(state)`` does the work; ``requires`` / ``ensures`` raise
    :class:`PassCheckError` (via :meth:`fail`) when a contract does not hold."""

    name = "pass"

    def requires(self, state: CompileState) -> None:  # noqa: B027 -- optional hook
        pass

    def ensures(self, state: CompileState) -> None:  # noqa: B027 -- optional hook
        pass

    def call(self, state: CompileState) -> None:
        raise NotImplementedError

    def fail(self, what: str, phase: str) -> None:
        raise PassCheckError(f"autocp pass {self.name!r} {phase}: {what}. This is an autocp bug: please report "
                             f"it with the model (AUTOCP_CHECK_PASSES=1 checks every pass contract).")

    def __call__(self, state: CompileState, check: bool = False) -> CompileState:
        if check:
            self.requires(state)
        self.call(state)
        state.log.append(self.name)
        if check:
            self.ensures(state)
        return state


class PassManager:
    """Runs passes in order; ``check`` (default :func:`checking`) runs their contracts."""

    def __init__(self, passes: list, check: Optional[bool] = None):
        self.passes = list(passes)
        self.check = checking() if check is None else bool(check)

    def __call__(self, state: CompileState) -> CompileState:
        for p in self.passes:
            p(state, self.check)
        return state


# ----------------------------------------------------------------------------- the compile passes
def _graphs(cap):
    return [(prefix, gm) for prefix, gm, _b in cap.graphs()]


class CapturePass(PassBase):
    """``torch.export`` of the model (repeated blocks once, registered modules opaque) ->
    ``state.capture``."""

    name = "capture"

    def requires(self, state):
        if not isinstance(state.model, torch.nn.Module):
            self.fail(f"the model is a {type(state.model).__name__}, not an nn.Module", "requires")

    def call(self, state):
        from .trace import capture

        state.capture = capture(state.model, state.args, state.kwargs, reuse_blocks=state.reuse_blocks)

    def ensures(self, state):
        from .trace import OPAQUE_OP

        cap = state.capture
        for prefix, gm in _graphs(cap):
            for nd in gm.graph.nodes:
                if nd.op == "placeholder" and "val" not in nd.meta:
                    self.fail(f"placeholder {nd.name} of graph {prefix or '<top>'} has no meta['val']", "ensures")
                if nd.op == "call_function" and nd.target is OPAQUE_OP:
                    e = rec(nd).opaque
                    if e is None or e.key not in cap.opaque:
                        self.fail(f"opaque call {nd.name} of graph {prefix or '<top>'} has no entry in the capture",
                                  "ensures")
        for g, b in cap.blocks.items():
            if not b.paths:
                self.fail(f"block group {g} has no instance", "ensures")


class ClaimPass(PassBase):
    """The claims (:func:`autocp.passes.rewrite.plan_rewrite`) -> ``state.plan``: one action
    per registered module captured opaque (its 2D op, or gathered when it has none). Every
    other op is the sharding pass's (one rule table, :mod:`autocp.passes.shard`)."""

    name = "claim"

    def requires(self, state):
        if state.capture is None:
            self.fail("no capture", "requires")

    def call(self, state):
        from .rewrite import plan_rewrite

        state.plan = plan_rewrite(state.capture, state.mesh)

    def ensures(self, state):
        plan, cap = state.plan, state.capture
        for e in cap.opaque.values():
            if e.kind in ("module", "fallback") and e.path and not _in_block(cap, e.path) \
                    and e.path not in plan.actions:
                self.fail(f"opaque module {e.path} has no plan action", "ensures")
        for path, act in plan.actions.items():
            if act.action not in ("op", "fallback"):
                self.fail(f"action {act.action!r} of {path}", "ensures")


def _in_block(cap, path: str) -> bool:
    """A path inside a block representative (its instances carry the actions)."""
    return any(path.startswith(b.rep + ".") or path == b.rep for b in cap.blocks.values())


CAPTURE, CLAIM = CapturePass(), ClaimPass()
