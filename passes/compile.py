"""Compile a module on the graph path: capture -> claim -> shard -> a :class:`ParallelModule`
running the sharded tile program (what :func:`autocp.parallelize` returns by default, and
what a captured island of the eager engine runs, :mod:`autocp.passes.island`)."""

from __future__ import annotations

import warnings

from ..registry import lookup_module
from .context import GlueLog
from .emit import ParallelModule
from .explain import build_report
from .graph_emit import build_graph_runner
from .pipeline import compile_stages
from .rewrite import Action, GatherFallback, entry_full_bytes, refused_module_paths
from .shard import ShardingError
from .trace import structural_clone

__all__ = ["graph_module", "warn_fallbacks"]


def graph_module(model, work, sq, args, kwargs, input_tags, n, n_seq, tensors, *, strict=False, reuse_blocks=True,
                 recompute="ops", pair_dtype=None, gather_refused=True):
    """``model`` captured, claimed and sharded (the default, ``emit="graph"``): registered
    modules run their 2D ops; every other op -- the model's glue and every unregistered
    module -- goes through the sharding pass's rule table (which enforces ``strict`` per
    op: no pair gather). ``gather_refused``: an op the rules refuse runs its innermost module
    gathered (exact, warned) instead of failing the compile -- off for an island of the
    eager engine, whose refused submodule runs better op by op on the engine (each call
    sharded on its own: an in-place ``z += x`` is tile-local there)."""

    cap, plan = compile_stages(model, args, kwargs, input_tags, n, sq, reuse_blocks=reuse_blocks)
    replacements = {}
    for path, act in plan.actions.items():
        if not path:
            continue
        mod = work.get_submodule(path)
        if act.action == "op":
            replacements[path] = act.builder(mod, sq) if act.builder is not None else lookup_module(mod).build(mod, sq)
        else:
            replacements[path] = GatherFallback(mod, sq, act, path=path)
    clone = structural_clone(work, replacements)

    glue = GlueLog()

    def builder(a, kw, n_, n_seq_):
        while True:
            try:
                runner = build_graph_runner(model, a, kw, plan, replacements, input_tags, n_, n_seq_, sq,
                                            strict=strict, reuse_blocks=reuse_blocks, recompute=recompute,
                                            pair_dtype=pair_dtype)
                break
            except ShardingError as e:
                # an op the rules refuse (an in-place write into a redistributed value): its
                # innermost module runs gathered instead (exact, warned); none (top-level
                # python) or strict: the caller runs the engine or raises
                paths = [p for p in refused_module_paths(e) if p not in plan.actions]
                if strict or not gather_refused or not paths:
                    raise
                why = f"the sharding pass refuses one of its ops ({str(e).splitlines()[0][:300]})"
                for p in paths:
                    mod = work.get_submodule(p)
                    act = Action(p, "fallback", why, "unsupported", type(mod).__name__, entry_path=p)
                    plan.actions[p] = act
                    replacements[p] = GatherFallback(mod, sq, act, path=p)
        for e in runner.cap.opaque.values():  # what a gathered module materialises, for its warning
            act = plan.actions.get(e.path)
            if act is not None and act.action == "fallback" and not act.full_bytes:
                act.full_bytes = entry_full_bytes(e)
        warn_fallbacks(plan, runner.opaque_fallbacks, n_)
        glue.add("graph", runner.notes)  # what the glue does, for explain() (the first N's programs)
        return runner

    graphs = {(n, n_seq): builder(args, kwargs, n, n_seq)}
    report = build_report(model, cap, plan, sq, n, tensors, runner=graphs[(n, n_seq)])
    report.glue = glue
    pm = ParallelModule(model, clone, sq, input_tags=input_tags, output_tags=[], n_tokens=n, n_seq=n_seq,
                        report=report, plan=plan, strict=strict)
    object.__setattr__(pm, "_graph_builder", builder)
    object.__setattr__(pm, "_graphs", graphs)
    pm.output_tags = list(graphs[(n, n_seq)].out_tags)
    return pm


def warn_fallbacks(plan, paths, n):
    """One warning per module that runs gathered (gather -> original -> re-shard)."""
    for path in paths:
        act = plan.actions[path]
        warnings.warn(
            f"autocp: {path} ({act.module_cls}) runs gathered (gather -> original -> re-shard) because "
            f"{act.why}; this materialises about {act.full_bytes / 2**20:.2f} MiB of full tensors per rank at "
            f"N={n} (O(N^2), not O(N^2/P)). Fix: autocp.register_module({act.module_cls}, op_factory), or "
            f"strict=True to make this an error.",
            stacklevel=3,
        )
