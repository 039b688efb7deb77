"""Captured islands in eager code: "captured where it can be, eager where it cannot".

A model that cannot be captured whole runs on the eager engine (:mod:`autocp.passes.eager`):
its python on :class:`~autocp.passes.eager.TileTensor` inputs, one torch call at a time.
Op by op, a region such as a triangle attention (``q . k`` -> softmax -> ``@ v``) cannot be
recognised -- each call sees one op, and an ``[i, j, k]`` score tensor has three token
axes -- so it would be gathered. :func:`install_islands` makes each parameterised submodule
of the model an *island*: the first call with TileTensor arguments captures the submodule
alone at the call's global shapes (:func:`autocp.passes.compile.graph_module`: the same
capture, claims and rule table as ``parallelize``'s graph path) and runs
its sharded tile program on the tiles; later calls with the same signature reuse it. If the
submodule cannot be compiled (a branch on a value, ``.item()``, a data-dependent shape, an in-place
write the rules cannot prove) or is called with too many
distinct signatures (a python float that changes per call), it runs its own python on the
engine, and its own parameterised children become islands in turn.

An island is installed on the parallel module's private module tree by an instance
``forward`` (the module object, its other methods -- ``sample``, ``embed`` -- and its
``state_dict`` are unchanged); the capture works on a clean private copy of the submodule.
Each island's state (``island_report``) says what ran: ``captured`` with the signatures
compiled, or ``eager`` with why.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .context import current, log_notes
from .eager import EagerShardingError, RegisteredOp, TileTensor, global_shape
from .emit import example_call, leaf_tags
from .graph_emit import pair_gathers
from .trace import CaptureError

__all__ = ["install_islands", "island_report", "IslandState"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.ParameterList, nn.ParameterDict)


@dataclass
class IslandState:
    path: str
    mesh: object
    strict: bool
    max_signatures: int = 2
    mode: str = "try"  # "try" (capture per signature) | "eager" (the module's python on TileTensors)
    why: str = ""
    runners: dict = field(default_factory=dict)  # signature -> GraphRunner
    forward: object = None  # the module's own bound forward


def _candidates(module: nn.Module, prefix: str):
    """``(path, child)`` of the children that become islands: parameterised, not containers
    (their items instead), not registered 2D ops (already distributed), not torch's own
    layers (one torch call each: the engine runs them as they are)."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, RegisteredOp) or not any(True for _ in child.parameters()):
            continue
        if type(child).__module__.startswith("torch.nn.modules") and not isinstance(child, _CONTAINERS):
            continue  # Linear, LayerNorm, ...: one torch call each, tile-local on the engine as they are
        if isinstance(child, _CONTAINERS):
            yield from _candidates(child, path)
        else:
            yield path, child


def install_islands(model: nn.Module, mesh, strict: bool = False, max_signatures: int = 2, prefix: str = "") -> int:
    """Make the parameterised submodules of ``model`` (its private tree) islands; returns how
    many. The model itself runs its python on the engine."""
    count = 0
    for path, child in _candidates(model, prefix):
        if getattr(child, "_autocp_island", None) is not None:
            continue
        state = IslandState(path, mesh, strict, max_signatures, forward=child.forward)
        child._autocp_island = state
        child.forward = functools.partial(_island_forward, child, state)
        count += 1
    return count


def island_report(model: nn.Module) -> list:
    """``[(path, mode, detail)]`` for every island under ``model`` that was called with tiles."""
    out = []
    for m in model.modules():
        st = getattr(m, "_autocp_island", None)
        if st is not None and (st.runners or st.mode == "eager"):
            out.append((st.path, "captured" if st.mode == "try" else "eager",
                        f"{len(st.runners)} signature(s)" if st.mode == "try" else st.why))
    return sorted(out)


def _go_eager(module, state, why: str) -> None:
    state.mode, state.why = "eager", why
    install_islands(module, state.mesh, state.strict, state.max_signatures, prefix=state.path)


def _signature(leaves, spec, module) -> tuple:
    sig = []
    for a in leaves:
        if isinstance(a, TileTensor):
            sig.append(("T", tuple(a.shape), a.dtype, a.tags))
        elif isinstance(a, torch.Tensor):
            sig.append(("t", tuple(a.shape), a.dtype))
        else:
            try:
                hash(a)
                sig.append(("v", a))
            except TypeError:
                sig.append(("r", repr(a)))
    # grad mode, train / eval and autocast change the captured graph: part of the signature
    amp = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
                if torch.is_autocast_enabled(d))
    return (str(spec), tuple(sig), module.training, torch.is_grad_enabled(), amp)


def _clean_copy(module: nn.Module) -> nn.Module:
    """A private copy of ``module``'s tree (shared parameters) as the user wrote it: without
    island forwards, registered modules unwrapped (the capture claims them itself)."""
    from ..guard import private_tree

    copy = private_tree(module)
    for m in list(copy.modules()):
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_autocp_island", None)
        for name, child in list(m.named_children()):
            if isinstance(child, RegisteredOp):
                m._modules[name] = child.inner
    return copy


def _compile(module, state, leaves, spec, ctx):
    from ..guard import private_tree
    from .compile import graph_module

    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    in_tags = [a.tags if isinstance(a, TileTensor) else (None,) * a.dim() for a in tensors]
    # shapes only (meta); example_call makes the global-shape example tensors the capture needs
    # (O(N^2) per pair input, transient: the capture is at the global shape, as parallelize's is)
    plain = [torch.empty(tuple(a.shape), dtype=a.dtype, device="meta") if isinstance(a, TileTensor) else a
             for a in leaves]
    args, kwargs = example_call(*tree_unflatten(plain, spec))
    clean = _clean_copy(module)
    ex_tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.export's own chatter; gathers are warned below
        pm = graph_module(clean, private_tree(clean), ctx.mesh, args, kwargs, in_tags, ctx.n, ctx.n_seq,
                          ex_tensors, strict=state.strict, gather_refused=False)
    runner = pm.graph_runner(ctx.n, ctx.n_seq)
    gathers = pair_gathers(runner.notes)
    if gathers:
        warnings.warn(f"autocp: island {state.path} ({type(module).__name__}): {gathers[0]} op(s) gather a pair "
                      f"tensor (exact): {gathers[1]}", stacklevel=4)
    return pm, runner


def _cuda_devices(leaves) -> list:
    return sorted({a.device.index or 0 for a in leaves if isinstance(a, torch.Tensor) and a.device.type == "cuda"})


def _canonical(state, args, kwargs):
    """The call's arguments in the order of the module's signature (as a capture orders
    them): positional ones as given, keyword ones in signature order."""
    import inspect

    try:
        bound = inspect.signature(state.forward).bind(*args, **kwargs)
    except TypeError:
        return args, kwargs
    return tuple(bound.args), dict(bound.kwargs)


def _island_forward(module, state, *args, **kwargs):
    leaves, spec = tree_flatten((args, kwargs))
    if state.mode == "eager" or not any(isinstance(a, TileTensor) for a in leaves):
        return state.forward(*args, **kwargs)
    args, kwargs = _canonical(state, args, kwargs)
    leaves, spec = tree_flatten((args, kwargs))
    ctx = current()
    key = _signature(leaves, spec, module)
    entry = state.runners.get(key)
    if entry is None:
        if len(state.runners) >= state.max_signatures:
            _go_eager(module, state, f"called with more than {state.max_signatures} distinct signatures")
            return state.forward(*args, **kwargs)
        try:
            with torch.random.fork_rng(devices=_cuda_devices(leaves)):  # the model's random stream is not moved
                entry = _compile(module, state, leaves, spec, ctx)
        except Exception as e:  # noqa: BLE001 -- not compilable (capture, a data-dependent shape, a write the
            # rules cannot prove): its python runs on the engine instead, exact; said in explain()
            what = "capture failed" if isinstance(e, CaptureError) else f"not compiled ({type(e).__name__})"
            _go_eager(module, state, f"{what}: {(str(e).splitlines() or [''])[0][:300]}")
            return state.forward(*args, **kwargs)
        state.runners[key] = entry
    _pm, runner = entry
    log_notes(id(runner), runner.notes, where=state.path)
    a, kw = tree_unflatten([x.local if isinstance(x, TileTensor) else x for x in leaves], spec)
    out = runner(a, kw)
    oleaves, ospec = tree_flatten(out)
    res = []
    for o, tags in zip(oleaves, leaf_tags(oleaves, runner.out_tags)):
        if isinstance(o, torch.Tensor) and tags is not None and any(t is not None for t in tags):
            if len(tags) != o.dim():
                raise EagerShardingError(f"autocp (internal): island {state.path} output layout {tags} for a "
                                         f"{o.dim()}-dim tile")
            o = TileTensor(o, tags, global_shape(o.shape, tags, ctx.n, ctx.n_seq))
        res.append(o)
    return tree_unflatten(res, ospec)
