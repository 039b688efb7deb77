"""Capture + shard + run one plain module as a tile program (no opaque modules).

:func:`compile_tile_program` exports ``module`` (non-strict ``torch.export``), shards its
graph with :mod:`autocp.passes.shard`; :func:`run_tile_program` runs it on this rank's
tiles. This is the graph path the soundness rule asks for (every node proven tile-local,
a redistribution, or a gathered fallback); :func:`autocp.parallelize` does not use it yet
(see docs/shard.md).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from .export import export
from .context import tile_context
from .rewrite import gather_tags, shard_tags
from .shard import shard_graph

__all__ = ["compile_tile_program", "run_tile_program"]


def _no_opaque(entry, in_tags):
    raise RuntimeError("compile_tile_program: the graph has an opaque module call; use autocp.parallelize")


def compile_tile_program(module, example_args, in_tags, *, n, p, n_seq=None, strict=False):
    """``(program, exported_program)``; ``in_tags``: one tag tuple per tensor input."""
    ep = export(module, example_args)
    gm = ep.module() if False else ep.graph_module
    prog = shard_graph(gm, in_tags, n=n, n_seq=n_seq, p=p, resolver=_no_opaque, strict=strict,
                       what=type(module).__name__)
    consts = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "PARAMETER":
            consts.append(module.get_parameter(spec.target))
        elif spec.kind.name == "BUFFER":
            consts.append(module.get_buffer(spec.target))
        elif spec.kind.name == "CONSTANT_TENSOR":
            consts.append(ep.constants[spec.target])
    prog.const_targets = consts
    return prog, ep


def run_tile_program(prog, mesh, full_inputs, in_tags, n, n_seq=None):
    """Shard ``full_inputs`` by ``in_tags``, run ``prog`` on this rank, gather the outputs
    (full tensors, differentiable under the partial-gradient convention)."""
    local = [shard_tags(x, t, mesh) for x, t in zip(full_inputs, in_tags)]
    with tile_context(mesh, n, n_seq):
        outs = prog.gm(*prog.const_targets, [], *local)
        flat, _ = tree_flatten(outs)
        return [gather_tags(o, t, mesh, n, n_seq) for o, t in zip(flat, prog.out_tags)]
