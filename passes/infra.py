"""Pass infrastructure: each compile stage is a pass with executable ``requires`` / ``ensures``
(after ``torch/fx/passes/infra``: ``PassBase`` / ``PassManager``).

A pass reads and writes one :class:`CompileState`; its ``requires`` checks what it needs of
the state before it runs, its ``ensures`` what it promises after. The :class:`PassManager`
runs the passes in order and -- when checking is on (``AUTOCP_CHECK_PASSES=1``, which the
test suite sets, or ``PassManager(check=True)``) -- calls both around every pass, so a pass
that breaks an invariant fails at that pass, naming it, instead of as a wrong layout three
passes later. A pass never reaches into a later one.

The compile pipeline (:func:`autocp.passes.pipeline.compile_stages`) is
``capture -> analyze -> match -> plan``; the records the passes write are the typed
:class:`~autocp.passes.record.NodeRecord` at ``node.meta["autocp"]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .record import rec

__all__ = ["PassCheckError", "CompileState", "PassBase", "PassManager", "checking", "CAPTURE", "ANALYZE", "MATCH",
           "PLAN"]


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
    strict: bool = False
    reuse_blocks: bool = True
    fallback: frozenset = frozenset()
    capture: Any = None  # autocp.passes.trace.Capture
    analysis: Any = None  # autocp.passes.analyze.Analysis
    matches: Any = None  # autocp.passes.match.MatchResult
    plan: Any = None  # autocp.passes.rewrite.RewritePlan
    reasons: Optional[dict] = None
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
    """``torch.export`` of the model (repeated blocks once, registered and ``fallback``
    modules opaque) -> ``state.capture``."""

    name = "capture"

    def requires(self, state):
        if not isinstance(state.model, torch.nn.Module):
            self.fail(f"the model is a {type(state.model).__name__}, not an nn.Module", "requires")

    def call(self, state):
        from .trace import capture

        state.capture = capture(state.model, state.args, state.kwargs, reuse_blocks=state.reuse_blocks,
                                fallback=state.fallback)

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


class AnalyzePass(PassBase):
    """Layouts on every node (:mod:`autocp.passes.analyze`) -> ``state.analysis``."""

    name = "analyze"

    def requires(self, state):
        if state.capture is None:
            self.fail("no capture", "requires")
        phs = [nd for nd in state.capture.top.graph.nodes
               if nd.op == "placeholder" and isinstance(nd.meta.get("val"), torch.Tensor)]
        if len(state.input_tags) > len(phs):
            self.fail(f"{len(state.input_tags)} input layouts for {len(phs)} tensor placeholders", "requires")

    def call(self, state):
        from .analyze import analyze

        state.analysis = analyze(state.capture, state.input_tags, state.n)

    def ensures(self, state):
        from .trace import OPAQUE_OP

        for prefix, gm in _graphs(state.capture):
            for nd in gm.graph.nodes:
                v, lay = nd.meta.get("val"), rec(nd).layout
                if nd.op in ("placeholder", "call_function") and isinstance(v, torch.Tensor) and lay is not None:
                    if not isinstance(lay, tuple) or len(lay) != v.dim():
                        self.fail(f"node {nd.name} ({prefix or '<top>'}) has layout {lay} for a {v.dim()}-dim value",
                                  "ensures")
                if nd.op == "call_function" and nd.target is OPAQUE_OP and rec(nd).opaque is not None:
                    ins = rec(nd).in_layouts
                    if ins is None or len(ins) != len(nd.args[1]):
                        self.fail(f"opaque call {nd.name} ({prefix or '<top>'}) has input layouts {ins} for "
                                  f"{len(nd.args[1])} inputs", "ensures")


class MatchPass(PassBase):
    """Registered and structural matches (:mod:`autocp.passes.match`) -> ``state.matches``;
    when a match fixed an output layout the analysis did not find, the analysis and the match
    run once more (the downstream ops see the matched layout)."""

    name = "match"

    def requires(self, state):
        if state.analysis is None:
            self.fail("no analysis", "requires")

    def call(self, state):
        from .analyze import analyze
        from .match import match

        state.matches = match(state.capture, state.analysis)
        if _overrides(state.capture):
            state.analysis = analyze(state.capture, state.input_tags, state.n)
            state.matches = match(state.capture, state.analysis)

    def ensures(self, state):
        names = {(prefix, nd.name) for prefix, gm in _graphs(state.capture) for nd in gm.graph.nodes}
        seen = {}
        for m in state.matches.matches:
            for nm in m.nodes:
                if (m.graph, nm) not in names:
                    self.fail(f"match {m.rule} at {m.path} names node {nm!r}, not in graph {m.graph or '<top>'}",
                              "ensures")
                if m.rule.startswith("structural:") and (m.graph, nm) in seen and seen[(m.graph, nm)] != m.path:
                    self.fail(f"node {nm!r} is in two structural matches ({seen[(m.graph, nm)]}, {m.path})",
                              "ensures")
                seen[(m.graph, nm)] = m.path
        for _prefix, nd, _path, reason in state.matches.uncovered:
            if not reason:
                self.fail(f"uncovered node {nd.name} has no reason", "ensures")


class PlanPass(PassBase):
    """The rewrite plan (:mod:`autocp.passes.rewrite`) -> ``state.plan``."""

    name = "plan"

    def requires(self, state):
        if state.matches is None:
            self.fail("no matches", "requires")

    def call(self, state):
        from .rewrite import plan_rewrite

        state.plan = plan_rewrite(state.capture, state.matches, state.mesh, strict=state.strict, n_tokens=state.n,
                                  reasons=state.reasons)

    def ensures(self, state):
        plan, cap = state.plan, state.capture
        for e in cap.opaque.values():
            if e.kind == "module" and e.path and not any(e.path == p or e.path.startswith(p + ".")
                                                          for p in plan.actions) and not _in_block(cap, e.path):
                self.fail(f"registered module {e.path} has no plan action", "ensures")
        for path, act in plan.actions.items():
            if act.action not in ("op", "fallback", "glue"):
                self.fail(f"action {act.action!r} of {path}", "ensures")
            for t in [*act.in_tags, *act.out_tags]:
                if t is not None and not isinstance(t, tuple):
                    self.fail(f"{path}: layout {t!r} is not a tag tuple", "ensures")
        # modules to re-capture opaque (their actions come from the second round): each says why
        # and what layouts the glue expects back
        for p in plan.fallback_paths:
            if p not in plan.boundary or not plan.reasons.get(p):
                self.fail(f"fallback path {p or '<top>'} has no boundary layouts or no reason", "ensures")


def _in_block(cap, path: str) -> bool:
    """A path inside a block representative (its instances carry the actions)."""
    return any(path.startswith(b.rep + ".") or path == b.rep for b in cap.blocks.values())


def _overrides(cap) -> bool:
    """Whether a match fixed an output layout the analysis did not find."""
    return any(rec(nd).layout_override is not None and rec(nd).layout_override != rec(nd).layout
               for _p, gm in _graphs(cap) for nd in gm.graph.nodes)


CAPTURE, ANALYZE, MATCH, PLAN = CapturePass(), AnalyzePass(), MatchPass(), PlanPass()
