"""Structural rewrite: run an UNREGISTERED module's own ATen graph on local tiles.

Requires: a module that the first compile round matched structurally (a contraction over
a token axis between two pair-derived tensors -- :func:`autocp.passes.match._rule_triangle_mult`),
the call it receives (``OpaqueEntry.last_call`` / ``in_meta`` from the fallback capture),
the layouts of its tensor inputs and the global token count N.

Guarantees: :func:`build_tile_program` returns a :class:`TileProgram` -- the module's
``torch.export`` graph (captured alone, at global N) transformed to run on this rank's
tiles -- or raises :class:`StructuralRewriteError` saying which node cannot run on tiles
(then the caller falls back to gather, or raises under ``strict=True``):

* every tile-local node (LayerNorm / Linear on channels, sigmoid, masks, chunk/split on
  channels, permutes, views) is kept;
* token-axis shape constants (``view`` / ``reshape`` / ``expand`` / ``new_zeros`` /
  ``zeros`` / ``full`` / ``rand`` ... arguments equal to N on a dim whose analysed layout
  is a token axis) are rewritten to the block size ``b = ceil(N / p)`` -- the idea of
  PyTorch's ``torch/distributed/tensor/parallel/_tp_transform.py``;
* each matched contraction node (``einsum`` / ``matmul`` / ``bmm`` / ``mm``, after
  whatever permutes and views) is replaced by :func:`tile_contract`: its two operands are
  permuted to canonical channel-first tiles, their padded token slots zeroed (the model
  need not mask them), and contracted by the distributed Cannon ring
  (:func:`autocp.ops.triangle_mult.trimul_contract`; column-token axis contracted:
  outgoing, row-token axis: incoming), the result permuted back to the node's output
  order and dtype;
* shape/dtype assertion nodes of the capture are dropped.

Any other node that needs a full tensor (softmax over a token axis, token-axis slicing,
``arange`` over tokens, ...) makes the build fail with that node's name and reason.

:class:`StructuralOp` is the drop-in module: same children / parameters / ``state_dict``
keys as the original (shared objects), reads the global N from
:func:`autocp.passes.context.current`, re-captures per distinct global N (cached, shared
by all instances of the same module type and call signature).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["StructuralRewriteError", "TileProgram", "build_tile_program", "StructuralOp", "tile_contract"]


class StructuralRewriteError(RuntimeError):
    """The module's graph contains a node that cannot run on tiles (message says which)."""


# ops whose argument ``idx`` is a shape list with one entry per output dim
SHAPE_ARGS = {"view": 1, "reshape": 1, "_unsafe_view": 1, "expand": 1, "new_zeros": 1, "new_ones": 1,
              "new_empty": 1, "new_full": 1, "zeros": 0, "ones": 0, "empty": 0, "full": 0, "rand": 0,
              "randn": 0, "broadcast_to": 1}
DROP = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}
TOKEN = ("r", "c")
_LETTERS = "ABCDEFGHLMNOPQ"


@dataclass
class _ContractSpec:
    x_operand: int  # which operand (0/1) holds the first output token letter
    perm_x: list
    perm_y: list
    perm_out: list  # canonical [batch.., x, y] -> the node's output order
    direction: str
    detail: str


@dataclass
class TileProgram:
    gm: torch.fx.GraphModule
    input_specs: list  # [(kind, target)] in placeholder order: PARAMETER/BUFFER/CONSTANT_TENSOR/USER_INPUT
    constants: dict
    out_spec: Any
    n: int
    p: int
    contractions: list = field(default_factory=list)  # [(node name, direction, detail)]
    shape_rewrites: list = field(default_factory=list)  # [node name]


# ----------------------------------------------------------------------------- the runtime primitive
def tile_contract(a: torch.Tensor, b: torch.Tensor, x_operand: int, perm_x, perm_y, perm_out, direction: str,
                  out_dtype: torch.dtype):
    """The distributed replacement of one matched contraction node, on local tiles.

    ``a``, ``b``: the node's operands (this rank's tiles). The operand holding the first
    output token letter ``x`` is permuted by ``perm_x`` to ``[batch.., x, k]`` (outgoing)
    or ``[batch.., k, x]`` (incoming), the other by ``perm_y`` likewise -- both canonical
    Pair2D tiles ``[.., T_r, T_c]`` --, padded token slots are zeroed, the Cannon ring
    contracts ``k`` over all N tokens, and ``perm_out`` puts ``[batch.., x, y]`` back in
    the node's output order.
    """
    from ..ops.common import TileCtx
    from ..ops.triangle_mult import trimul_contract
    from .context import current

    info = current()
    mesh, n = info.mesh, info.n
    xs, ys = (a, b) if x_operand == 0 else (b, a)
    x = xs.permute(perm_x).float()
    y = ys.permute(perm_y).float()
    ctx = TileCtx(mesh, n)
    if x.shape != y.shape or x.shape[-1] != ctx.b or x.shape[-2] != ctx.b:
        raise StructuralRewriteError(
            f"autocp structural contraction: operand tiles {tuple(x.shape)} / {tuple(y.shape)}; required two equal "
            f"[..., {ctx.b}, {ctx.b}] tiles (b = ceil(N={n} / p={mesh.p})). Fix: register the module with "
            f"autocp.register_module(cls, op_factory).")
    if n != ctx.b * mesh.p:  # the op zeroes its own padding: the model may not mask it
        valid = ctx.pair_valid(x.device).to(x.dtype)
        x = x * valid
        y = y * valid
    out = trimul_contract(x.contiguous(), y.contiguous(), mesh, direction)
    return out.permute(perm_out).to(out_dtype)


# ----------------------------------------------------------------------------- build
def _name(target) -> str:
    from .analyze import _name as nm

    return nm(target)


def _contraction_letters(node):
    """(spec_a, spec_b, spec_out, operand nodes) of a two-operand contraction, or raise."""
    name = _name(node.target)
    if name == "einsum":
        eq = node.args[0].replace(" ", "")
        ops = list(node.args[1])
        if "..." in eq or "->" not in eq or len(ops) != 2:
            raise StructuralRewriteError(f"einsum {eq!r} with {len(ops)} operands / ellipsis is not supported")
        lhs, rhs = eq.split("->")
        sa, sb = lhs.split(",")
        return sa, sb, rhs, ops
    if name in ("matmul", "bmm", "mm"):
        a, b = node.args[0], node.args[1]
        ra, rb = a.meta["val"].dim(), b.meta["val"].dim()
        if ra < 2 or rb < 2 or ra != rb:
            raise StructuralRewriteError(f"{name} of ranks {ra} x {rb} (broadcasting matmul) is not supported")
        if tuple(a.meta["val"].shape[:-2]) != tuple(b.meta["val"].shape[:-2]):
            raise StructuralRewriteError(f"{name} with broadcast batch dims is not supported")
        batch = _LETTERS[: ra - 2]
        return batch + "ik", batch + "kj", batch + "ij", [a, b]
    raise StructuralRewriteError(f"contraction {name} is not supported (einsum/matmul/bmm/mm are)")


def _contract_spec(node) -> _ContractSpec:
    sa, sb, so, ops = _contraction_letters(node)
    tags = [ops[0].meta.get("autocp.layout"), ops[1].meta.get("autocp.layout")]
    if not all(isinstance(t, tuple) for t in tags):
        raise StructuralRewriteError(f"operands of {node.name} have no analysed layout")
    lt = [dict(zip(sa, tags[0])), dict(zip(sb, tags[1]))]
    contracted = [ch for ch in dict.fromkeys(sa + sb) if ch not in so]
    if len(contracted) != 1 or not (contracted[0] in sa and contracted[0] in sb):
        raise StructuralRewriteError(f"{node.name} contracts {contracted}; exactly one shared token letter is supported")
    k = contracted[0]
    kt = {lt[0][k], lt[1][k]}
    if len(kt) != 1 or next(iter(kt)) not in TOKEN:
        raise StructuralRewriteError(f"{node.name}: contracted letter {k!r} has layouts {sorted(map(str, kt))}")
    ktag = next(iter(kt))
    direction = "outgoing" if ktag == "c" else "incoming"
    free = "r" if ktag == "c" else "c"
    tok = [ch for ch in so if (lt[0].get(ch) in TOKEN or lt[1].get(ch) in TOKEN)]
    if len(tok) != 2:
        raise StructuralRewriteError(f"{node.name}: output {so!r} has token letters {tok}; two are required")
    x, y = tok
    xo = 0 if x in sa else 1
    yo = 1 - xo
    specs = (sa, sb)
    if x not in specs[xo] or x in specs[yo] or y not in specs[yo] or y in specs[xo]:
        raise StructuralRewriteError(f"{node.name}: output token letters {x!r}, {y!r} must come one from each operand")
    if lt[xo][x] != free or lt[yo][y] != free:
        raise StructuralRewriteError(
            f"{node.name}: free token axes have layouts {lt[xo][x]!r}, {lt[yo][y]!r}; a {direction} triangle "
            f"contraction needs {free!r} on both")
    batch = [ch for ch in so if ch not in (x, y)]
    for ch in batch:
        if ch not in sa or ch not in sb or lt[0][ch] is not None or lt[1][ch] is not None:
            raise StructuralRewriteError(f"{node.name}: batch letter {ch!r} must be in both operands, unsharded")
    extra = [ch for ch in sa + sb if ch not in so and ch != k]
    if extra:
        raise StructuralRewriteError(f"{node.name}: letters {extra} are summed besides the token axis")

    def perm(spec, tokl):
        order = batch + ([tokl, k] if direction == "outgoing" else [k, tokl])
        return [spec.index(ch) for ch in order]

    canon = batch + [x, y]
    perm_out = [canon.index(ch) for ch in so]
    return _ContractSpec(xo, perm(specs[xo], x), perm(specs[yo], y), perm_out, direction,
                         f"{_name(node.target)} contracts the {'column' if ktag == 'c' else 'row'}-token axis")


def _example_like(shape, dtype):
    from .trace import _example_like as ex

    return ex(shape, dtype)


def build_tile_program(module: nn.Module, call, in_meta, in_tags, n: int, p: int,
                       expected_out_tags=None) -> TileProgram:
    """Capture ``module`` alone at global ``n`` and transform its graph to run on tiles of a
    ``p x p`` mesh; see the module docstring. ``call``: ``(spec, tensor indices, consts)``
    of its call; ``in_meta``: ``[(shape, dtype)]`` of the tensor inputs at global N."""
    from ..layout import block_size
    from .analyze import Analysis, analyze_graph
    from .match import _rule_triangle_mult
    from .trace import _Bound

    if call is None:
        raise StructuralRewriteError("the module was never called during capture")
    if any(t and "s" in t for t in in_tags):
        raise StructuralRewriteError("MSA-tiled inputs are not supported by the structural rewrite")
    spec, tidx, consts = call
    bound = _Bound(module, spec, tidx, consts)
    ex = [_example_like(s, d) for s, d in in_meta]
    try:
        ep = torch.export.export(bound, tuple(ex), {}, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise StructuralRewriteError(f"capture of the module alone failed: {type(exc).__name__}: {exc}") from exc
    gm = ep.graph_module
    outs = [s for s in ep.graph_signature.output_specs]
    if any(s.kind.name != "USER_OUTPUT" for s in outs):
        raise StructuralRewriteError("the module mutates buffers or inputs (not supported on tiles)")
    an = Analysis(n_tokens=n, input_tags=list(in_tags))
    tags = [tuple(t) if t is not None else None for t in in_tags]
    analyze_graph(gm, tags, n, an)
    matched = []
    for nd in gm.graph.nodes:
        if nd.op == "call_function" and _rule_triangle_mult(None, nd):
            matched.append(nd)
    for round_ in (1, 2):
        if round_ == 2:
            an = Analysis(n_tokens=n, input_tags=list(in_tags))
            out_tags = analyze_graph(gm, tags, n, an)  # matched contractions now output Pair2D tiles
        bad = [nd for _pre, nd in an.needs_full if nd not in matched]
        # name the root cause first (an attention's softmax rather than the ops it disturbs)
        bad.sort(key=lambda nd: 0 if "attention" in str(nd.meta.get("autocp.needs_full")) else 1)
        if bad and (round_ == 2 or not matched):  # round 1: downstream layouts not final yet
            raise StructuralRewriteError(f"node {bad[0].name!r} cannot run on tiles: "
                                         f"{bad[0].meta.get('autocp.needs_full')}")
        if not matched:
            raise StructuralRewriteError("no triangle-multiplication contraction found in the module's graph")
    if expected_out_tags is not None:
        got = [tuple(t) if isinstance(t, tuple) else None for t in (out_tags or [])]
        exp = [tuple(t) if t is not None else None for t in expected_out_tags]
        norm = lambda ts: [tuple(x if x in TOKEN else None for x in t) if t else t for t in ts]  # noqa: E731
        if norm(got) != norm(exp):
            raise StructuralRewriteError(f"the rewritten graph's output layouts {got} differ from what the caller "
                                         f"expects {exp}")
    b = block_size(n, p)
    prog = TileProgram(gm=gm, input_specs=[(s.kind.name, s.target) for s in ep.graph_signature.input_specs],
                       constants=dict(ep.constants), out_spec=ep.call_spec.out_spec, n=n, p=p)
    g = gm.graph
    for nd in list(g.nodes):
        if nd.op != "call_function":
            continue
        name = _name(nd.target)
        if name in DROP and not nd.users:
            g.erase_node(nd)
            continue
        if name == "arange":
            lay = nd.meta.get("autocp.layout") or ()
            if any(t is not None for t in lay):
                raise StructuralRewriteError(f"node {nd.name!r}: arange over the token axis (token positions) "
                                             f"is not tile-local")
        if nd in matched:
            cs = _contract_spec(nd)
            a, bb = _contraction_letters(nd)[3]
            with g.inserting_before(nd):
                new = g.call_function(tile_contract, (a, bb, cs.x_operand, cs.perm_x, cs.perm_y, cs.perm_out,
                                                      cs.direction, nd.meta["val"].dtype))
            new.meta = dict(nd.meta)
            nd.replace_all_uses_with(new)
            g.erase_node(nd)
            prog.contractions.append((nd.name, cs.direction, cs.detail))
            continue
        idx = SHAPE_ARGS.get(name)
        if idx is None or len(nd.args) <= idx or b == n:
            continue
        shape = nd.args[idx]
        lay = nd.meta.get("autocp.layout")
        if not isinstance(shape, (list, tuple)) or not isinstance(lay, tuple) or len(shape) != len(lay):
            continue
        new_shape = [b if (isinstance(s, int) and s == n and t in ("r", "c", "?")) else s
                     for s, t in zip(shape, lay)]
        if new_shape != list(shape):
            args = list(nd.args)
            args[idx] = new_shape
            nd.args = tuple(args)
            prog.shape_rewrites.append(nd.name)
    g.lint()
    gm.recompile()
    return prog


# ----------------------------------------------------------------------------- the module
_PROGRAMS: dict = {}


def _program_key(share_key, module, call, in_meta, in_tags, n, p):
    from .trace import _param_sig

    spec, tidx, consts = call
    return (share_key, _param_sig(module), str(spec), tuple(tidx), repr(consts), tuple(in_meta),
            tuple(map(repr, in_tags)), n, p)


def get_program(module, call, in_meta, in_tags, n, p, expected_out_tags=None, share_key=None) -> TileProgram:
    """Cached :func:`build_tile_program`: one capture per ``share_key`` (default: the module
    object; the instances of a repeated block share their representative's key, as the
    block capture does), call signature, N and p."""
    key = _program_key(share_key if share_key is not None else ("id", id(module)), module, call, in_meta, in_tags,
                       n, p)
    prog = _PROGRAMS.get(key)
    if prog is None:
        prog = build_tile_program(module, call, in_meta, in_tags, n, p, expected_out_tags)
        _PROGRAMS[key] = prog
    return prog


class StructuralOp(nn.Module):
    """Runs ``module``'s rewritten graph (:class:`TileProgram`) on this rank's tiles.

    Same children, parameters and ``state_dict`` keys as ``module`` (shared objects).
    ``call`` / ``in_meta`` / ``in_tags``: the captured call (non-tensor arguments, tensor
    shapes at the example N, input layouts); a call at another global N re-captures.
    """

    def __init__(self, module: nn.Module, mesh, call, in_meta, in_tags, example_n: int, path: str = "",
                 out_tags=None, share_key=None):
        super().__init__()
        for name, child in module.named_children():
            self.add_module(name, child)
        for name, prm in module.named_parameters(recurse=False):
            self.register_parameter(name, prm)
        for name, buf in module.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        object.__setattr__(self, "inner", module)
        self.mesh = mesh
        self.call = call
        self.in_meta = list(in_meta)
        self.in_tags = list(in_tags)
        self.example_n = example_n
        self.path = path
        self.out_tags = out_tags
        self.share_key = share_key
        self.program(example_n)  # build (or fetch) now: errors surface at parallelize time

    def train(self, mode: bool = True):
        super().train(mode)
        self.inner.train(mode)
        return self

    def program(self, n: int) -> TileProgram:
        meta = self.in_meta
        if n != self.example_n:
            meta = [(tuple(n if (t is not None and d < len(t) and t[d] in TOKEN) else s for d, s in enumerate(shape)),
                     dt) for (shape, dt), t in zip(self.in_meta, self.in_tags)]
        return get_program(self.inner, self.call, meta, self.in_tags, n, self.mesh.p, self.out_tags,
                           self.share_key)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, structural rewrite of {type(self.inner).__name__}, p={self.mesh.p}"

    def forward(self, *args, **kwargs):
        from .context import current

        n = current().n
        prog = self.program(n)
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [l for l in leaves if isinstance(l, torch.Tensor)]
        if str(spec) != str(self.call[0]) or len(tensors) != len(self.call[1]):
            raise StructuralRewriteError(
                f"autocp: {self.path} ({type(self.inner).__name__}) was rewritten for calls shaped like "
                f"{self.call[0]}; given {spec}. Fix: call it as during parallelize's example run, or register it.")
        flat = []
        it = iter(tensors)
        for kind, target in prog.input_specs:
            if kind == "USER_INPUT":
                flat.append(next(it))
            elif kind == "PARAMETER":
                flat.append(self.inner.get_parameter(target[len("block."):]))
            elif kind == "BUFFER":
                flat.append(self.inner.get_buffer(target[len("block."):]))
            else:
                flat.append(prog.constants[target])
        outs = prog.gm(*flat)
        return tree_unflatten(list(outs), prog.out_spec)
