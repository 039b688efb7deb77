"""Porting check: run a parallel module's tile programs beside the original graph and
report the first node whose tiles diverge from the single-device values.

``autocp.check(pm, *args, **kwargs)`` (collective: call it on every rank, like ``pm``):

1. the captured graph of the model (``cap.top``) runs single-device on the full inputs
   (its opaque nodes run the original modules), every node's value recorded;
2. the tile program of this rank runs on its tiles, every emitted node's value recorded;
3. in graph order, each source node with a tensor value is compared with the emitted node
   the shard pass mapped it to (``TileProgram.src_map``): the reference is sliced to the
   node's tags (``rec(node).tags``), padding slots ignored, error relative to
   the reference's scale. A repeated block whose outputs diverge is entered: its own tile
   program is compared with its source graph on the block's recorded inputs;
4. the earliest divergence over all ranks is reported (same answer on every rank), with
   its op, tags and source line (``node.meta["stack_trace"]``).

Use it when a ported model's outputs differ: it names the first op whose rule (or a
registered op) is wrong, instead of the final error. It keeps a copy of every value of
both runs (a debugging tool: run it at a small N).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .. import comm
from ..mesh import COL, ROW
from . import tile_ops as T
from .context import tile_context
from .shard import source_line, tag_str
from .record import rec

__all__ = ["CheckReport", "check"]


@dataclass
class CheckReport:
    """What :func:`check` found. ``ok``: no compared node diverged beyond ``tol``."""

    ok: bool
    compared: int
    tol: float
    node: str = ""  # the first diverging source node
    op: str = ""
    where: str = "model"  # "model" or "block <path>"
    tags: str = ""
    err: float = 0.0
    source: str = ""
    worst: list = field(default_factory=list)  # [(err, where, node)] largest errors seen

    def __str__(self) -> str:
        if self.ok:
            top = f" (largest {self.worst[0][0]:.2e} at {self.worst[0][2]})" if self.worst else ""
            return f"autocp.check: {self.compared} nodes match the single-device values within {self.tol:g}{top}."
        return (f"autocp.check: first divergence at node {self.node!r} ({self.op}) in {self.where}: relative "
                f"error {self.err:.3e} > {self.tol:g}, tile tags {self.tags}."
                f"{' Source: ' + self.source + '.' if self.source else ''} Fix: the rule for this op (or the "
                f"registered op) is wrong for this layout; register the enclosing module, or report it.")


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        # a copy: later in-place ops (the model's own, or the storage pass's reuse of dead
        # tiles) must not change what was recorded
        self.values[n.name] = fx.node.map_aggregate(out, lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x)
        return out


def _tile_of(ref, tags):
    """The reference sliced to this rank's tile (no communication: whole -> block)."""
    return T.convert(ref, (None,) * ref.dim(), tags)


def _rel_err(tile, ref_tile, tags, scale) -> float:
    dt = [(d, t) for d, t in enumerate(tags) if t is not None]
    a = T.mask_pad(tile.detach().double(), dt, 0.0) if dt else tile.detach().double()
    b = T.mask_pad(ref_tile.detach().double(), dt, 0.0) if dt else ref_tile.detach().double()
    if a.shape != b.shape:
        return float("inf")
    diff = (a - b).abs()
    diff = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(diff), diff)
    return float(diff.max()) / max(scale, 1e-12) if diff.numel() else 0.0


def _compare(src_gm, ref_args, prog, tile_args, where, tol, worst):
    """First diverging source node of one program: ``(order, node, err, tags, sub)`` or None;
    ``sub`` is the block call to enter when the node is an opaque block."""
    ref = _Recorder(src_gm)
    ref.run(*ref_args)
    tile = _Recorder(prog.gm)
    tile.run(*tile_args)
    emitted = {nd.name: nd for nd in prog.gm.graph.nodes}
    compared = 0
    for order, nd in enumerate(src_gm.graph.nodes):
        if nd.op != "call_function" or nd.name not in prog.src_map:
            continue
        rv = ref.values.get(nd.name)
        en = emitted.get(prog.src_map[nd.name])
        tags = rec(en).tags if en is not None else None
        tv = tile.values.get(en.name) if en is not None else None
        if isinstance(rv, (list, tuple)) and isinstance(tv, (list, tuple)) and isinstance(tags, list):
            pairs = [(r, t, g) for r, t, g in zip(rv, tv, tags) if isinstance(r, torch.Tensor)]
        elif isinstance(rv, torch.Tensor) and isinstance(tv, torch.Tensor):
            pairs = [(rv, tv, tags if isinstance(tags, tuple) else (None,) * rv.dim())]
        else:
            continue
        errs = []
        for r, t, g in pairs:
            if not isinstance(t, torch.Tensor) or g is None or len(g) != r.dim() or not r.is_floating_point():
                continue
            scale = float(r.detach().abs().max()) if r.numel() else 0.0
            errs.append((_rel_err(t, _tile_of(r, tuple(g)), tuple(g), scale), g))
        if not errs:
            continue
        compared += 1
        err, g = max(errs, key=lambda x: x[0])
        worst.append((err, where, nd.name))
        if err > tol:
            sub = None
            entry = rec(nd).opaque
            if entry is not None and getattr(entry, "kind", None) == "block":
                call = en.args[0] if en is not None else None
                block = tile.values.get(call.name) if isinstance(call, fx.Node) else None
                ref_in = [ref.values.get(a.name) if isinstance(a, fx.Node) else a for a in nd.args[1]]
                tile_in = [tile.values.get(a.name) if isinstance(a, fx.Node) else a for a in en.args[2:]]
                sub = (entry, block, ref_in, tile_in)
            return (order, nd, err, g, sub), compared
    return None, compared


def check(pm, *args, tol: float = 1e-4, **kwargs) -> CheckReport:
    """Run ``pm``'s tile programs beside the original captured graph on these inputs (full
    tensors, as ``pm`` takes them) and report the first node whose tiles diverge (see the
    module doc). Collective over the mesh; returns the same :class:`CheckReport` on every
    rank. Needs ``emit="graph"`` (the default)."""
    from .graph_emit import BlockCall, block_consts
    from .rewrite import shard_tags

    if not hasattr(pm, "_graph_for") or getattr(pm, "_graphs", None) is None:
        raise TypeError(f"autocp.check: given {type(pm).__name__}; required a module returned by "
                        f"autocp.parallelize(..., emit='graph') (a root 2D op or the eager engine has no captured tile program).")
    mesh = pm.mesh
    leaves, spec = tree_flatten((args, kwargs))
    n, n_seq = pm._sizes(leaves)
    local, k = [], 0
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tags = pm.input_tags[k] if k < len(pm.input_tags) else None
            k += 1
            local.append(shard_tags(leaf, tags, mesh))
        else:
            local.append(leaf)
    worst = []
    with torch.no_grad(), tile_context(mesh, n, n_seq):
        runner = pm._graph_for(args, kwargs, n, n_seq)
        found, compared = _compare(runner.cap.top, [*runner.consts, *leaves], runner.prog,
                                   [*runner.consts, runner.ops, *local], "model", tol, worst)
        where = "model"
        while found is not None and found[4] is not None:  # a diverging block: find the node inside
            entry, block, ref_in, tile_in = found[4]
            if not isinstance(block, BlockCall):
                break
            blk = runner.cap.blocks[entry.group]
            inst = runner.model.get_submodule(entry.path)
            bconsts = block_consts(blk.ep, inst, prefix_strip="block.")
            inner, c2 = _compare(blk.gm, [*bconsts, *ref_in], block.prog, [*block.consts, block.ops, *tile_in],
                                 f"block {entry.path}", tol, worst)
            compared += c2
            if inner is None:
                break
            found, where = inner, f"block {entry.path}"
    worst.sort(key=lambda x: -x[0])
    bad = torch.tensor([0.0 if found is None else 1.0], dtype=torch.float64)
    if mesh.p > 1:  # every rank learns whether any rank diverged
        comm.all_reduce_(bad, mesh, ROW, op="max")
        comm.all_reduce_(bad, mesh, COL, op="max")
    if found is None:
        if float(bad) > 0:  # another rank diverged: say so (its report names the node)
            return CheckReport(False, compared, tol, node="(on another rank)", where="?", worst=worst[:5])
        return CheckReport(True, compared, tol, worst=worst[:5])
    order, nd, err, g, _ = found
    return CheckReport(False, compared, tol, node=nd.name, op=str(nd.target), where=where,
                       tags=tag_str(g), err=err, source=source_line(nd), worst=worst[:5])

