"""The compile pipeline driver: trace -> analyze -> match -> rewrite-plan, with the second
round after fallbacks -- one module, used by :func:`autocp.parallelize` and
:func:`autocp.estimate` alike (neither imports the other).

* :func:`resolve_input_tags` -- the input layouts (given, or inferred by shape).
* :func:`compile_stages` -- ``(capture, analysis, matches, plan)``.
* :func:`n_seq_of` -- the MSA depth of tagged inputs.
"""

from __future__ import annotations

import inspect

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["resolve_input_tags", "compile_stages", "n_seq_of"]


def resolve_input_tags(model, args, kwargs, input_layouts):
    from .analyze import infer_input_layouts, tags_of_layout

    leaves, _ = tree_flatten((args, kwargs))
    tensors = [l for l in leaves if isinstance(l, torch.Tensor)]
    tags, n = infer_input_layouts(tensors) if input_layouts is None else (None, None)
    if input_layouts is None:
        return tags, n
    # explicit: {arg name: Layout} (names of model.forward's parameters) or a list per tensor
    if isinstance(input_layouts, (list, tuple)):
        lays = list(input_layouts)
        if len(lays) != len(tensors):
            raise ValueError(
                f"input_layouts: given {len(lays)} layouts; required one per tensor input ({len(tensors)}). "
                f"Fix: pass a list aligned with the tensors of example_inputs, or a dict by argument name."
            )
        pairs = list(zip(tensors, lays))
    else:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs).arguments
        unknown = set(input_layouts) - set(bound)
        if unknown:
            raise ValueError(
                f"input_layouts: given names {sorted(unknown)} that are not arguments of "
                f"{type(model).__name__}.forward{tuple(bound)}. Fix: use those argument names."
            )
        pairs = []
        for name, val in bound.items():
            for leaf in tree_flatten(val)[0]:
                if isinstance(leaf, torch.Tensor):
                    pairs.append((leaf, input_layouts.get(name)))
    tags = []
    n = None
    for t, lay in pairs:
        if lay is None:
            tags.append(tuple([None] * t.dim()))
            continue
        tg = tags_of_layout(lay, t.dim())
        tags.append(tg)
        for d, x in enumerate(tg):
            if x in ("r", "c"):
                if n is not None and n != t.shape[d]:
                    raise ValueError(f"input_layouts: token axes disagree on N ({n} vs {t.shape[d]}).")
                n = int(t.shape[d])
    if n is None:
        raise ValueError("input_layouts: no input has a token axis (Pair2D/RowToken/ColToken/MsaTiles).")
    return tags, n


def n_seq_of(tensors, tags):
    for t, tg in zip(tensors, tags):
        if tg and "s" in tg:
            return int(t.shape[tg.index("s")])
    return None


def compile_stages(model, args, kwargs, input_tags, n, mesh, *, strict=False, reuse_blocks=True):
    """trace -> analyze -> match -> rewrite-plan; returns ``(capture, analysis, matches, plan)``."""
    from .analyze import analyze
    from .match import match
    from .rewrite import plan_rewrite
    from .trace import capture

    def run(fallback, boundary=None):
        cap = capture(model, args, kwargs, reuse_blocks=reuse_blocks, fallback=fallback)
        if boundary:
            from .rewrite import fallback_out_tags

            for e in cap.opaque.values():
                if e.kind == "fallback":
                    e.out_tags = fallback_out_tags(e.out_meta or [], boundary.get(e.path), n)
        an = analyze(cap, input_tags, n)
        mr = match(cap, an)
        # second round: matched ops fix their output layouts (e.g. the canonical Pair2D of a
        # triangle multiplication), so downstream ops see them
        an = analyze(cap, input_tags, n)
        mr = match(cap, an)
        return cap, an, mr

    cap, an, mr = run(frozenset())
    first_capture = [cap]
    plan = plan_rewrite(cap, mr, mesh, strict=strict, n_tokens=n)
    if plan.fallback_paths and "" not in plan.fallback_paths:
        first = mr
        cap, an, mr = run(frozenset(plan.fallback_paths), plan.boundary)
        plan2 = plan_rewrite(cap, mr, mesh, strict=strict, n_tokens=n, reasons=plan.reasons)
        # the structural matches inside the (now opaque) fallback modules, for the report
        import dataclasses

        first_cap = first_capture[0]
        for m in first.matches:
            if not m.rule.startswith("structural:"):
                continue
            blk = next((b for b in first_cap.blocks.values() if b.rep == m.graph), None) if m.graph else None
            if blk is not None and m.path.startswith(blk.rep):
                for inst in blk.paths:
                    mr.matches.append(dataclasses.replace(m, path=inst + m.path[len(blk.rep):], graph=""))
            else:
                mr.matches.append(dataclasses.replace(m, graph=""))
        plan = plan2
    return cap, an, mr, plan
