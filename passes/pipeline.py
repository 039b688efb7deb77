"""The compile pipeline driver: capture -> claim -- one module, used by
:func:`autocp.parallelize` and :func:`autocp.estimate` alike (neither imports the other).

* :func:`resolve_input_tags` -- the input layouts (given, or inferred by shape).
* :func:`compile_stages` -- ``(capture, plan)``.
* :func:`n_seq_of` -- the MSA depth of tagged inputs.
"""

from __future__ import annotations

import inspect

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["resolve_input_tags", "compile_stages", "n_seq_of", "planning_n"]


def resolve_input_tags(model, args, kwargs, input_layouts, mesh=None):
    from .tags import infer_input_layouts, tags_of_layout

    leaves, _ = tree_flatten((args, kwargs))
    tensors = [l for l in leaves if isinstance(l, torch.Tensor)]
    tags, n = infer_input_layouts(tensors) if input_layouts is None else (None, None)
    if input_layouts is None:
        if mesh is not None:  # a mesh larger than N is the first thing to say
            mesh.check_tokens(n, "N (token length of example_inputs)")
        _refuse_ambiguous(model, args, kwargs, tensors, tags, n)
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
            pairs += _layouts_of(val, input_layouts.get(name), name)
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


def planning_n(model, p: int) -> int:
    """The token count a plan is captured at (the plan does not depend on N): the smallest
    ``n >= max(2p, 6)`` that is no channel width of ``model`` (so layouts by shape are
    unambiguous)."""
    widths = {int(d) for q in model.parameters() for d in q.shape}
    n = max(2 * p, 6)
    while n in widths:
        n += 1
    return n


def _refuse_ambiguous(model, args, kwargs, tensors, tags, n) -> None:
    """Layouts guessed by shape must not rest on a coincidence of sizes: a ``[B, N, N]``
    input is a pair tensor without channels *or* a token tensor with ``N`` channels when
    ``N`` is also a width of the model's parameters -- then the caller must say which."""
    widths = {int(d) for q in model.parameters() for d in q.shape}
    if n not in widths:
        return
    names = _leaf_names(model, args, kwargs)
    bad = [i for i, (t, tg) in enumerate(zip(tensors, tags)) if t.dim() == 3 and tg and tg[1:] == ("r", "c")]
    if not bad:
        return
    from ..layout import LayoutError

    given = ", ".join(f"{names[i]} {list(tensors[i].shape)}" for i in bad)
    raise LayoutError(
        f"autocp: cannot tell the layout of {given} by shape: N={n} is also a channel width of "
        f"{type(model).__name__}'s parameters, so a [B, N, N] input may be a pair tensor (Pair2D) or a token "
        f"tensor with {n} channels (RowToken). Required: input_layouts naming each tensor input's layout. Fix: "
        f"parallelize(..., input_layouts={{'s': autocp.RowToken(), 'z': autocp.Pair2D(), 'mask': "
        f"autocp.RowToken(), 'pair_mask': autocp.Pair2D()}}) with {type(model).__name__}.forward's argument names.")


def _leaf_names(model, args, kwargs) -> list:
    """A readable name per tensor leaf of a call (``z``, ``feats['pair']``), in flatten order."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError:
        bound = None
    if bound is None:
        return [f"input {i}" for i in range(len([t for t in tree_flatten((args, kwargs))[0]
                                                   if isinstance(t, torch.Tensor)]))]
    from torch.utils._pytree import keystr, tree_flatten_with_path

    out = []
    for name, val in bound.items():
        for path, leaf in tree_flatten_with_path(val)[0]:
            if isinstance(leaf, torch.Tensor):
                out.append(name + keystr(path))
    return out


def _layouts_of(val, spec, where: str) -> list:
    """``[(tensor, Layout or None)]`` for the tensors of one argument: ``spec`` mirrors the
    argument's structure (a dict of layouts for a dict argument -- e.g. a feature dict --, a
    list / tuple for a sequence, one Layout for a tensor; a missing key or ``None`` is
    replicated). A Layout given for a container, or a key the argument lacks, is an error."""
    from ..layout import Layout

    if isinstance(val, torch.Tensor):
        if spec is not None and not isinstance(spec, Layout):
            raise ValueError(f"input_layouts[{where}]: given {type(spec).__name__} for a tensor {list(val.shape)}; "
                             f"required a Layout (Pair2D(), RowToken(), MsaTiles(), ColToken(), Replicated()) or "
                             f"None. Fix: e.g. input_layouts={{..., {where.split('[')[0]!r}: autocp.Pair2D()}}.")
        return [(val, spec)]
    if isinstance(spec, Layout):
        raise ValueError(f"input_layouts[{where}]: given the layout {spec!r} for a {type(val).__name__}; required "
                         f"one per tensor. Fix: a dict / list mirroring {where}, e.g. {{'pair_feat': Pair2D()}}.")
    out = []
    if isinstance(val, dict):
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"input_layouts[{where}]: given {type(spec).__name__} for a dict; required a dict of "
                             f"layouts by key. Fix: {{'key': autocp.Pair2D(), ...}}.")
        extra = set(spec or {}) - set(val)
        if extra:
            raise ValueError(f"input_layouts[{where}]: given keys {sorted(map(str, extra))} that the argument does "
                             f"not have (it has {sorted(map(str, val))[:12]}). Fix: use its keys.")
        keys = tree_flatten(val)[1].context  # the order tree_flatten visits the values
        for k in keys:
            out += _layouts_of(val[k], (spec or {}).get(k), f"{where}[{k!r}]")
        return out
    if isinstance(val, (list, tuple)):
        if spec is not None and (not isinstance(spec, (list, tuple)) or len(spec) != len(val)):
            raise ValueError(f"input_layouts[{where}]: given {spec!r} for a {type(val).__name__} of {len(val)}; "
                             f"required a list of the same length. Fix: one layout (or None) per element.")
        for i, v in enumerate(val):
            out += _layouts_of(v, spec[i] if spec is not None else None, f"{where}[{i}]")
        return out
    if spec is not None and tree_flatten(val)[0] and any(isinstance(x, torch.Tensor) for x in tree_flatten(val)[0]):
        raise ValueError(f"input_layouts[{where}]: {type(val).__name__} arguments take no layout here. Fix: pass "
                         f"its tensors as a dict, list or tensor argument.")
    return [(t, None) for t in tree_flatten(val)[0] if isinstance(t, torch.Tensor)]


def n_seq_of(tensors, tags):
    for t, tg in zip(tensors, tags):
        if tg and "s" in tg:
            return int(t.shape[tg.index("s")])
    return None


def compile_stages(model, args, kwargs, input_tags, n, mesh, *, reuse_blocks=True):
    """capture -> claim (:mod:`autocp.passes.infra` passes, their contracts checked under
    ``AUTOCP_CHECK_PASSES=1``); returns ``(capture, plan)``: the model captured once (each
    repeated block once, registered modules opaque) and one action per registered module.
    Every other op is decided by the sharding pass's rule table when the graph runner
    shards the capture (:mod:`autocp.passes.shard`)."""
    from .infra import CAPTURE, CLAIM, CompileState, PassManager

    st = CompileState(model, args, kwargs, input_tags, n, mesh, reuse_blocks=reuse_blocks)
    PassManager([CAPTURE, CLAIM])(st)
    return st.capture, st.plan
