"""Pass 5b -- graph emit: run the *captured graph*, sharded, instead of the model's python.

Requires: the rewrite plan's replacement modules (``{path: module}``, 2D ops and gather
fallbacks), the input tags, N / MSA depth, the mesh.

Guarantees: :class:`GraphRunner` -- called on local tiles inside the tile context, it runs
the tile program (:mod:`autocp.passes.shard`) of the model's top graph; every repeated
block runs its own tile program (captured and sharded once per input layout, reused for
every instance); every matched module runs its replacement with its inputs converted to
the layouts the plan requires. Parameters are the model's own (shared) objects.

Training memory (``recompute``, see docs/training.md): autograd would keep every
activation of every op for backward. With ``"ops"`` (default) each distributed op (and
each gathered fallback) keeps only its input tiles and recomputes its internals in
backward (non-reentrant activation checkpointing, as the hand-built ``Pairformer2D``
does; the ring communication is replayed in the same order on every rank, the RNG state
is restored); with ``"blocks"`` each repeated block also keeps only its inputs (least
memory, one more forward of every block); ``"none"`` saves everything (fastest
backward, most memory).
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.checkpoint import checkpoint
from torch.utils._pytree import tree_flatten, tree_unflatten

from .rewrite import opaque_layouts
from .shard import ShardingError, shard_graph
from .storage import apply_storage_passes
from .trace import capture

__all__ = ["GraphRunner", "build_graph_runner", "pair_gathers", "RECOMPUTE_POLICIES"]

RECOMPUTE_POLICIES = ("ops", "blocks", "none")


def _grad_needed(tensors, params=()) -> bool:
    return torch.is_grad_enabled() and (any(t.requires_grad for t in tensors) or any(p.requires_grad for p in params))


class _Recomputed:
    """``op`` called under non-reentrant activation checkpointing when autograd records:
    only its inputs are saved; its forward runs again inside backward."""

    def __init__(self, op):
        self.op = op
        self._params = list(op.parameters()) if isinstance(op, torch.nn.Module) else []

    def __call__(self, *args, **kwargs):
        flat = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        if _grad_needed(flat, self._params):
            return checkpoint(self.op, *args, use_reentrant=False, **kwargs)
        return self.op(*args, **kwargs)


def _consts(ep, root, prefix_strip=""):
    out = []
    for spec in ep.graph_signature.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            continue
        tgt = spec.target
        if prefix_strip and tgt.startswith(prefix_strip):
            tgt = tgt[len(prefix_strip):]
        if kind == "PARAMETER":
            out.append(root.get_parameter(tgt))
        elif kind == "BUFFER":
            out.append(root.get_buffer(tgt))
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            out.append(ep.constants[spec.target])
        else:
            raise RuntimeError(f"autocp graph emit: unsupported graph input kind {kind} ({spec.target})")
    return out


def _user_specs(ep):
    return [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]


class _BlockCall:
    """One repeated-block instance: its tile program with the instance's parameters/ops."""

    def __init__(self, prog, consts, ops, recompute=False):
        self.prog, self.consts, self.ops, self.recompute = prog, consts, ops, recompute

    def _run(self, *tensors):
        return list(tree_flatten(self.prog.gm(*self.consts, self.ops, *tensors))[0])

    def __call__(self, *args, **kwargs):
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        if self.recompute and _grad_needed(tensors, [c for c in self.consts if isinstance(c, torch.nn.Parameter)]):
            return checkpoint(self._run, *tensors, use_reentrant=False)
        return self._run(*tensors)


class GraphRunner:
    def __init__(self, model, cap, plan, replacements, input_tags, n, n_seq, mesh, strict, recompute="ops",
                 pair_dtype=None):
        if recompute not in RECOMPUTE_POLICIES:
            raise ValueError(f"autocp: given recompute={recompute!r}; required one of {RECOMPUTE_POLICIES}.")
        self.recompute = recompute
        self.pair_dtype = pair_dtype
        self.storage = {"pair_dtype": 0, "inplace": 0}  # nodes rewritten by autocp.passes.storage
        self.model, self.cap, self.plan, self.repl = model, cap, plan, replacements
        self.n, self.n_seq, self.p, self.strict = n, n_seq, mesh.p, strict
        self.block_progs = {}
        self.block_layout = {}  # block instance path -> key of its program in block_progs
        self.notes = []
        specs = _user_specs(cap.ep)
        tags_iter = iter(input_tags)
        self.user_tags = []
        for s in specs:
            if type(s.arg).__name__ == "TensorArgument":
                self.user_tags.append(next(tags_iter, None))
            else:
                self.user_tags.append(None)
        self.prog = shard_graph(cap.top, self.user_tags, n=n, n_seq=n_seq, p=self.p, resolver=self._resolve,
                                strict=strict, what=f"model {type(model).__name__}")
        self.notes.extend(self.prog.notes)
        self._storage(self.prog)
        self.consts = _consts(cap.ep, model)
        self.ops = [self._op_for(e, "") for e in self.prog.op_keys]
        self.out_spec = cap.ep.call_spec.out_spec
        self.out_tags = self.prog.out_tags

    # -------------------------------------------------------------- opaque resolution
    def _block_prog(self, group, in_tags):
        key = (group, tuple(tuple(t) if t is not None else None for t in in_tags))
        if key not in self.block_progs:
            blk = self.cap.blocks[group]
            try:
                prog = shard_graph(blk.gm, list(in_tags), n=self.n, n_seq=self.n_seq, p=self.p,
                                   resolver=self._resolve, strict=self.strict, what=f"block {blk.rep}")
            except ShardingError as e:
                if not e.block_paths:  # the innermost block: its instances own the module paths
                    e.block_paths = list(blk.paths)
                raise
            self.notes.extend(prog.notes)
            self._storage(prog)
            self.block_progs[key] = prog
        return self.block_progs[key]

    def _storage(self, prog):
        """Pair storage dtype + in-place reuse (autocp.passes.storage) on one tile program."""
        trusted = []  # registered distributed ops: never return or keep an alias of an input
        for e in prog.op_keys:
            act = self.plan.actions.get(e.path)
            trusted.append(e.kind == "module" and act is not None and act.action == "op"
                           and getattr(act, "builder", None) is None)
        for k, v in apply_storage_passes(prog, trusted, self.pair_dtype).items():
            self.storage[k] += v

    def _resolve(self, entry, in_tags):
        if entry.kind == "block":
            prog = self._block_prog(entry.group, in_tags)
            self.block_layout[entry.path] = (entry.group, tuple(tuple(t) if t is not None else None for t in in_tags))
            return {"in_tags": list(in_tags), "out_tags": prog.out_tags, "prog": prog}
        if not any(a.entry_path == entry.path for a in self.plan.actions.values()):
            raise RuntimeError(f"autocp graph emit: no plan action for opaque module {entry.path}")
        ins, outs = opaque_layouts(entry, in_tags, self.n)
        for act in self.plan.actions.values():  # every instance of it (a block's representative)
            if act.entry_path == entry.path:
                act.in_tags, act.out_tags = list(ins), list(outs)
        return {"in_tags": ins, "out_tags": outs}

    def _op_for(self, entry, inst_prefix_map):
        if entry.kind == "block":
            # the program built for this instance's call (its group and input layouts: the
            # instances of a group may be called with different layouts, one program each)
            key = self.block_layout.get(entry.path)
            if key is None or key not in self.block_progs:
                raise RuntimeError(f"autocp graph emit: no tile program for block {entry.path} ({entry.group})")
            prog = self.block_progs[key]
            blk = self.cap.blocks[entry.group]
            inst = self.model.get_submodule(entry.path)
            consts = _consts(blk.ep, inst, prefix_strip="block.")
            ops = []
            for e in prog.op_keys:
                rel = e.path[len(blk.rep):]
                ops.append(self._wrap(self.repl[entry.path + rel]))
            return _BlockCall(prog, consts, ops, recompute=self.recompute == "blocks")
        return self._wrap(self.repl[entry.path])

    def _wrap(self, op):
        if self.recompute == "none" or getattr(op, "recomputes_itself", False):
            return op
        return _Recomputed(op)

    def __call__(self, args, kwargs):
        leaves = tree_flatten((args, kwargs))[0]
        specs = _user_specs(self.cap.ep)
        if len(leaves) != len(specs):
            raise RuntimeError(f"autocp graph emit: the call has {len(leaves)} input leaves, the capture "
                               f"{len(specs)}. Fix: call with the same argument structure as example_inputs.")
        out = self.prog.gm(*self.consts, self.ops, *leaves)
        return tree_unflatten(list(tree_flatten(out)[0]), self.out_spec)


def build_graph_runner(model, args, kwargs, plan, replacements, input_tags, n, n_seq, mesh, *, strict=False,
                       reuse_blocks=True, recompute="ops", pair_dtype=None):
    """Capture ``model`` with every module the plan claims opaque, shard every graph, and
    return the :class:`GraphRunner`. Warns once per gathered op (exact, but O(N^2/p) memory).

    Registered modules run their 2D ops (or, without one, gathered: ``runner.opaque_fallbacks``);
    every other op, inside unregistered modules too, goes through the sharding pass (tile
    local, redistributed, a ring, or gathered per op -- never a whole module's inputs). A
    :class:`ShardingError` (an in-place write the rules cannot prove) propagates: the caller
    (:func:`autocp.passes.compile.graph_module`) runs the refused op's module gathered and
    shards again, or -- an island, or an op of the top-level python -- leaves the model to
    the eager engine; under ``strict`` it raises."""
    planned = frozenset(p for p in plan.actions if p)
    cap = capture(model, args, kwargs, reuse_blocks=reuse_blocks, fallback=planned)
    runner = GraphRunner(model, cap, plan, replacements, input_tags, n, n_seq, mesh, strict, recompute=recompute,
                         pair_dtype=pair_dtype)
    runner.opaque_fallbacks = sorted(p for p, a in plan.actions.items() if p and a.action == "fallback")
    gathers = pair_gathers(runner.notes)
    if gathers:
        warnings.warn(f"autocp: {gathers[0]} glue op(s) gather a pair tensor (exact; per-rank memory and order "
                      f"in each): {gathers[1]}. "
                      f"Fix: register the enclosing module, or strict=True to make this an error.", stacklevel=3)
    return runner


def pair_gathers(notes):
    """``(count, "op (detail, source); ...")`` of the sharding notes that gather a pair tensor
    (the first four described), or None."""
    gathers = [nt for nt in notes if nt.what in ("gather", "op-gather") and nt.pair]
    if not gathers:
        return None
    return len(gathers), "; ".join(f"{g.op} ({g.detail}{', ' + g.source if g.source else ''})" for g in gathers[:4])


# public names for autocp.passes.check (it replays the runner's programs)
BlockCall = _BlockCall
block_consts = _consts
