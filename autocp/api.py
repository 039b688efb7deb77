"""Public compiler API: :func:`parallelize`, :func:`explain`, :func:`estimate`.

    pm = autocp.parallelize(model, mesh, example_inputs=(s, z, mask, pair_mask))
    s_out, z_out = pm(s, z, mask, pair_mask)        # full tensors in, full tensors out
    print(pm.explain())                              # what was rewritten, layouts, comm, memory
    autocp.estimate(model, n_tokens=4096, mesh_shape=(4, 4))

The pipeline (``autocp.passes``): trace -> analyze -> match -> rewrite -> emit.
"""

from __future__ import annotations

from typing import Optional
import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .mesh import SquareMesh
from .passes.pipeline import compile_stages, n_seq_of, resolve_input_tags

__all__ = ["parallelize", "explain", "estimate", "compile_stages"]


def _split_example(example_inputs):
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
            and isinstance(example_inputs[1], dict)):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs: given {type(example_inputs).__name__}; required a tuple of positional inputs, a dict of "
        f"keyword inputs, or (args_tuple, kwargs_dict). Fix: example_inputs=(s, z, mask, pair_mask)."
    )


def parallelize(
    model: nn.Module,
    mesh=None,
    *,
    example_inputs=None,
    input_layouts=None,
    strict: bool = False,
    reuse_blocks: bool = True,
    check_inputs: str = "shape",
    broadcast_from=None,
    emit: str = "graph",
    grad_sync: bool = True,
    grad_bucket_mb: float = 25.0,
    recompute: str = "ops",
    pair_dtype=None,
    options: Optional[dict] = None,
) -> nn.Module:
    """The 2D-context-parallel version of ``model`` on the square ``mesh``.

    ``example_inputs``: a tuple (positional), dict (keyword) or ``(args, kwargs)``; only
    shapes matter (N, channels). ``input_layouts``: ``{arg name: Layout}`` or a list per
    tensor; default by shape (``[B,N,N,..]`` Pair2D, ``[B,S,N,..]`` MsaTiles, ``[B,N,..]``
    RowToken, else Replicated). ``strict=True`` raises on a pair op without a distributed
    implementation instead of gathering it (with a warning) -- see
    :mod:`autocp.passes.rewrite`.

    Guards (:mod:`autocp.guard`, docs/hardening.md): every rank must hold the same model,
    weights and example shapes (checked here; ``broadcast_from=k`` copies mesh rank ``k``'s
    weights first); each call checks shapes/dtypes/N on every rank (``check_inputs="hash"``
    also the values, ``"off"`` nothing). The original ``model`` is never mutated; parameters
    are shared.

    ``emit="graph"`` (default) runs the captured, sharded ATen graph (:mod:`autocp.passes.shard`:
    every glue op proven tile-local, redistributed, or gathered exactly). A model whose python
    cannot be captured (a branch on a value, ``.item()``, an ``assert`` on a reduction) runs
    instead -- with a warning naming the module and line -- on the eager engine
    (:mod:`autocp.passes.eager`, ``emit="eager"`` asks for it): its own python on
    :class:`~autocp.passes.eager.TileTensor` inputs, every torch call through the same rule
    table, registered modules as their 2D ops, each other parameterised submodule captured
    alone where it can be (:mod:`autocp.passes.island`); exact. (Python that rejects tensor
    subclasses -- ``type(t) is torch.Tensor`` -- fails there too.)

    Training (docs/training.md): with ``grad_sync=True`` (default) parameter gradients are
    complete after ``backward()`` (bucketed all-reduce of ``grad_bucket_mb`` MiB buckets,
    :mod:`autocp.grad_sync`); ``with pm.no_sync():`` accumulates. ``mesh`` may be a 3D
    DeviceMesh ``(dp, row, col)``: the model is parallelized on this rank's ``(row, col)``
    slice and gradients are averaged over ``dp`` in the same fused all-reduce.

    ``recompute`` (the training memory knob, ``emit="graph"``): ``"ops"`` (default) -- every
    distributed op keeps only its input tiles for backward and recomputes its internals
    there, as the hand-built ``Pairformer2D`` does; ``"blocks"`` -- each repeated block keeps
    only its inputs (least memory, one extra forward per block); ``"none"`` -- autograd keeps
    everything (fastest backward, most memory). Outputs and gradients are the same for all.

    ``pair_dtype`` (e.g. ``torch.bfloat16``; ``emit="graph"``): the storage dtype of the glue's
    pair tensors -- a pointwise op on a pair tile in that dtype computes in it instead of being
    promoted to fp32 by a small fp32 operand (Boltz's dropout mask), and ``.float()`` of a
    pair tile keeps it (the distributed ops accumulate in fp32 inside their chunks). Off by
    default (the model's own dtype rules); see docs/memory.md. Independently, without
    autograd the glue's residual updates write in place into dead fresh tiles
    (:mod:`autocp.passes.storage`).

    ``options``: keyword options of a whole-model driver, e.g. for ``Boltz2``
    ``{"token_bias": "lazy" | "resident" | "auto"}`` (docs/end_to_end.md).
    """
    if pair_dtype is not None and (not isinstance(pair_dtype, torch.dtype) or not pair_dtype.is_floating_point):
        raise ValueError(f"parallelize: given pair_dtype={pair_dtype!r}; required None or a floating torch.dtype. "
                         f"Fix: pair_dtype=torch.bfloat16.")
    if emit not in ("graph", "eager"):
        raise ValueError(f"parallelize: given emit={emit!r}; required 'graph' (default) or 'eager'. Fix: drop emit "
                         f"(a model that cannot be captured falls back to the eager engine by itself).")
    if recompute not in ("ops", "blocks", "none"):
        raise ValueError(f"parallelize: given recompute={recompute!r}; required 'ops' (default), 'blocks' or "
                         f"'none'. Fix: pass one of those.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize: given {type(model).__name__}; required an nn.Module.")
    from .registry import lookup_model

    driver = lookup_model(model)
    if driver is not None:  # a whole model with its own driver (e.g. Boltz1 / Boltz2: autocp.models.boltz_e2e)
        unused = {k: v for k, v in dict(example_inputs=example_inputs, input_layouts=input_layouts,
                                        broadcast_from=broadcast_from, pair_dtype=pair_dtype).items() if v is not None}
        unused.update({k: v for k, v, d in (("emit", emit, "graph"), ("recompute", recompute, "ops"),
                                            ("check_inputs", check_inputs, "shape"), ("reuse_blocks", reuse_blocks, True))
                       if v != d})
        if unused:
            raise TypeError(
                f"parallelize: given {', '.join(f'{k}={v!r}' for k, v in unused.items())} for {type(model).__name__}, "
                f"whose whole-model driver ({getattr(driver, '__qualname__', driver)}) runs the model's own python on "
                f"the eager engine with its declared feature layouts; those options do not apply to it. Required: "
                f"mesh, strict, grad_sync, grad_bucket_mb and the driver's options={{...}}. Fix: drop them.")
        mesh, dp_size, dp_world = _split_dp(mesh)
        pm = driver(model, SquareMesh.from_any(mesh), strict=strict, **(options or {}))
        if grad_sync and hasattr(pm, "enable_grad_sync"):
            pm.enable_grad_sync(grad_bucket_mb, dp_size=dp_size, group=dp_world)
        return pm
    if options:
        raise TypeError(f"parallelize: given options={options!r} for {type(model).__name__}; required none (options "
                        f"are for whole-model drivers such as Boltz1 / Boltz2). Fix: drop options.")
    if example_inputs is None:
        raise TypeError(f"parallelize: example_inputs not given for {type(model).__name__}; required (args, kwargs) "
                        f"or a tuple of args of one call (their shapes and the token length N are captured). Fix: "
                        f"autocp.parallelize(model, mesh, example_inputs=((z, mask), {{}})).")
    mesh, dp_size, dp_world = _split_dp(mesh)
    sq = SquareMesh.from_any(mesh)
    pm = _parallelize(model, sq, example_inputs, input_layouts, strict, reuse_blocks, check_inputs, broadcast_from,
                      emit, recompute, pair_dtype)
    if grad_sync:
        pm.enable_grad_sync(grad_bucket_mb, dp_size=dp_size, group=dp_world)
    return pm


def _split_dp(mesh):
    """``(cp_mesh, dp_size, group of all dp*P ranks)`` for a 3D ``(dp, row, col)`` DeviceMesh."""
    from torch.distributed.device_mesh import DeviceMesh
    import torch.distributed as dist

    if not isinstance(mesh, DeviceMesh) or mesh.mesh.ndim != 3:
        dm = mesh.device_mesh if isinstance(mesh, SquareMesh) else mesh
        if isinstance(dm, DeviceMesh) and dm.mesh.numel() != dist.get_world_size():
            # a 2D CP mesh inside a larger world: the reducer sums over the row, then the
            # column group (two all-reduces per bucket; a dp mesh fuses into one)
            return mesh, 1, [dm.get_group(1), dm.get_group(0)]
        return mesh, 1, None
    shape = tuple(mesh.mesh.shape)
    world = dist.get_world_size()
    if world % mesh.mesh.numel():
        raise ValueError(
            f"parallelize: given a (dp, row, col) mesh of shape {shape} ({mesh.mesh.numel()} ranks) in a world "
            f"of {world} ranks; required dp*p*p to divide the world size. Fix: "
            f"init_device_mesh(device, (world // (p*p), p, p), mesh_dim_names=('dp', 'row', 'col')).")
    names = mesh.mesh_dim_names
    if not names or len(names) != 3:
        raise ValueError(
            f"parallelize: given a 3D mesh of shape {shape} without mesh_dim_names; required names "
            f"('dp', 'row', 'col'). Fix: init_device_mesh(..., mesh_dim_names=('dp', 'row', 'col')).")
    cp = mesh[names[1], names[2]]
    # one fused group over all dp*P ranks when that is the world; else dp, row, col in turn
    group = None if mesh.mesh.numel() == world else [mesh.get_group(0), cp.get_group(1), cp.get_group(0)]
    return cp, shape[0], group


def _parallelize(model, sq, example_inputs, input_layouts, strict, reuse_blocks, check_inputs, broadcast_from, emit,
                 recompute="ops", pair_dtype=None):
    from . import guard

    from .passes.compile import graph_module
    from .passes.shard import ShardingError
    from .passes.trace import CaptureError

    args, kwargs = _split_example(example_inputs)
    args, kwargs = guard.prepare_parallelize(model, sq, args, kwargs, broadcast_from=broadcast_from)  # autocp.guard
    work = guard.private_tree(model)  # ops are built on a private tree: the caller's modules are never mutated
    input_tags, n = resolve_input_tags(model, args, kwargs, input_layouts, mesh=sq)
    sq.check_tokens(n, "N (token length of example_inputs)")
    tensors = [l for l in tree_flatten((args, kwargs))[0] if isinstance(l, torch.Tensor)]
    n_seq = n_seq_of(tensors, input_tags)
    root = _root_op(work, sq, input_tags, n, tensors)
    if root is None and emit == "eager":
        root = _engine_module(model, work, sq, input_tags, n, n_seq, tensors, strict, "")
    if root is None:
        try:
            root = graph_module(model, work, sq, args, kwargs, input_tags, n, n_seq, tensors, strict=strict,
                                reuse_blocks=reuse_blocks, recompute=recompute, pair_dtype=pair_dtype)
        except (CaptureError, ShardingError) as e:  # not capturable / shardable as a graph: the engine (exact)
            if isinstance(e, ShardingError) and strict:
                raise
            if pair_dtype is not None or recompute != "ops":
                raise CaptureError(
                    f"{e}\n  parallelize: recompute={recompute!r} / pair_dtype={pair_dtype!r} need a captured "
                    f"graph; the eager engine this model would fall back to has neither. Fix: make the construct "
                    f"capturable, or drop those options.") from e
            warnings.warn(f"autocp: {type(model).__name__} runs on the eager engine (its python on TileTensors, "
                          f"every torch call through the rule table: exact, slower dispatch) because it could not "
                          f"be {'captured' if isinstance(e, CaptureError) else 'sharded as one graph'}: "
                          f"{_first_line(e)}", stacklevel=3)
            root = _engine_module(model, guard.private_tree(model), sq, input_tags, n, n_seq, tensors, strict,
                                  f"{'capture' if isinstance(e, CaptureError) else 'sharding'} failed: "
                                  f"{_first_line(e)}")
    return guard.attach(root, model, sq, args, kwargs, check_inputs=check_inputs)


def _first_line(e) -> str:
    return (str(e).splitlines() or [""])[0][:400]


def _engine_module(model, work, sq, input_tags, n, n_seq, tensors, strict, why):
    """``model`` on the eager engine (:mod:`autocp.passes.eager`): its registered modules
    bound to their 2D ops (:class:`~autocp.passes.eager.RegisteredOp`), everything else its
    own python on TileTensors. Output layouts are those the run produces."""
    from .passes.eager import RegisteredOp, bind_registered
    from .passes.emit import ParallelModule
    import functools

    from .passes.context import GlueLog
    from .passes.explain import build_engine_report
    from .passes.island import install_islands, island_report
    from .passes.rewrite import Action, RewritePlan

    bind_registered(work, sq)
    install_islands(work, sq, strict=strict)  # submodules captured where they can be (passes/island.py)
    plan = RewritePlan()
    plan.actions[""] = Action("", "eager", why or "emit='eager'", module_cls=type(model).__name__)
    for path, mod in work.named_modules():
        if isinstance(mod, RegisteredOp):
            cls = type(mod.inner).__name__
            plan.actions[path] = Action(path, "op", f"registry:{cls}", mod.rule.kind, cls,
                                        op_name=getattr(mod.rule.op_factory, "__qualname__", ""))
    report = build_engine_report(model, plan, sq, n, tensors, why)
    report.glue = GlueLog()  # filled as the engine runs (explain() lists what ran so far)
    report.islands = functools.partial(island_report, work)
    return ParallelModule(model, work, sq, input_tags=input_tags, output_tags=[], n_tokens=n, n_seq=n_seq,
                          report=report, plan=plan, engine=True, strict=strict)


def _root_op(model, sq, input_tags, n, tensors):
    """The model itself is a registered module with a 2D op (e.g. Boltz-2 ``MSAModule``):
    the op replaces it whole, called with the model's own arguments on tiles; no capture.
    Output layouts: ``rule.out_layouts(in_tags)`` or the first tensor input's."""
    from .passes.emit import ParallelModule
    from .passes.explain import build_root_report
    from .passes.rewrite import Action, RewritePlan
    from .registry import lookup_module

    rule = lookup_module(model)
    if rule is None or rule.op_factory is None:
        return None
    op = rule.build(model, sq)
    if op is None:
        return None
    out_tags = rule.out_layouts(input_tags) if rule.out_layouts is not None else [input_tags[0]]
    cls_name = type(model).__name__
    plan = RewritePlan()
    plan.actions[""] = Action("", "op", f"registry:{cls_name}", rule.kind, cls_name, in_tags=list(input_tags),
                              out_tags=list(out_tags), op_name=getattr(rule.op_factory, "__qualname__", ""))
    report = build_root_report(model, rule, plan, sq, n, tensors)
    return ParallelModule(model, op, sq, input_tags=input_tags, output_tags=out_tags, n_tokens=n,
                          n_seq=n_seq_of(tensors, input_tags), report=report, plan=plan)


def explain(pm, **kw) -> str:
    """The report of a parallelized module (see :meth:`ParallelModule.explain`)."""
    if not hasattr(pm, "explain") or getattr(pm, "report", None) is None:
        raise TypeError(f"explain: given {type(pm).__name__}; required the module returned by autocp.parallelize.")
    return pm.explain(**kw)


def check(pm, *args, tol: float = 1e-4, **kwargs):
    """Porting check: run ``pm``'s tile programs beside the original model's captured graph
    on these (full) inputs and report the first node whose tiles diverge from the
    single-device values, with its source line (:func:`autocp.passes.check.check`).
    Collective: call it on every rank. Returns a :class:`~autocp.passes.check.CheckReport`
    (``ok``, ``node``, ``op``, ``where``, ``err``, ``source``; ``str()`` explains)."""
    from .passes.check import check as _check

    return _check(pm, *args, tol=tol, **kwargs)


def estimate(model: nn.Module, n_tokens: int = None, mesh_shape=(1, 1), dtype=torch.float32, **kw):
    """Per-rank peak memory of the parallelized ``model`` at ``n_tokens`` on ``mesh_shape``,
    from FakeTensor runs (no devices). See :func:`autocp.passes.estimate.estimate`."""
    from .passes.estimate import estimate as _estimate

    return _estimate(model, n_tokens=n_tokens, mesh_shape=mesh_shape, dtype=dtype, **kw)
