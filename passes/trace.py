"""Pass 1 -- trace: capture the model at the ATen level with ``torch.export`` (non-strict).

Requires: an ``nn.Module`` and example inputs (real tensors; only shapes matter).

Guarantees (on every node of :attr:`Capture.top` and of each block graph):

* ``node.meta["val"]`` -- FakeTensor of the output (from export);
* ``node.meta["nn_module_stack"]`` -- the module hierarchy (export);
* registered modules (:mod:`autocp.registry`) appear as ONE node
  ``torch.ops.autocp.opaque(key, [tensors])`` -- capture never enters them (Boltz's
  eval-mode chunked triangle attention cannot be exported) -- and
  ``rec(node).opaque`` is their :class:`OpaqueEntry` (module path, class, rule);
* each distinct repeated block (identical-structure children of a ``ModuleList`` /
  ``Sequential``, e.g. the 48 ``PairformerLayer`` s) is captured ONCE
  (:attr:`Capture.blocks`) and appears in the top graph as one opaque node per
  instance (``entry.kind == "block"``), so capture cost does not grow with depth.

Captures are cached per model and input signature (shapes, dtypes, train/eval,
registry version). A model that cannot be captured raises :class:`CaptureError`
naming the module, the construct (source line) and the fix.
"""

from __future__ import annotations

import itertools
import operator
import linecache
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .export import export
from .functions import claimed_functions
from .. import registry as _registry
from .record import put

__all__ = [
    "CaptureError",
    "StaleCaptureError",
    "live_entries",
    "OpaqueEntry",
    "BlockGraph",
    "Capture",
    "capture",
    "structural_clone",
    "find_registered",
    "find_repeated_blocks",
    "OPAQUE_OP",
]


class CaptureError(RuntimeError):
    """The model could not be captured; the message names module, construct and fix."""


class StaleCaptureError(BaseException):
    """A captured graph ran after its capture was freed (not an ``Exception``: a model's own
    ``except Exception`` must not swallow it)."""


# ----------------------------------------------------------------------------- opaque op
@dataclass
class OpaqueEntry:
    """One opaque call site: a registered module or a repeated block instance."""

    key: str
    path: str
    module: nn.Module  # the module that really runs (inside the capture clone)
    kind: str  # "module" | "block"
    rule: Optional[_registry.ModuleRule] = None
    group: Optional[str] = None  # block group id (kind == "block")
    out_spec: Any = None  # treespec of the outputs
    out_meta: Optional[list] = None  # [(shape, dtype) | non-tensor leaf] (blocks)
    out_const: Optional[list] = None
    out_meta_mask: Optional[list] = None
    last_call: Any = None
    in_meta: Optional[list] = None  # [(shape, dtype)] of the tensor inputs, first call

    @property
    def cls_name(self) -> str:
        return type(self.module).__name__


#: key -> entry, held weakly: a capture (``_CACHE[model]``) holds its entries, so dropping
#: the model and its parallel module frees them (and the modules they run)
_TABLE: "weakref.WeakValueDictionary[str, OpaqueEntry]" = weakref.WeakValueDictionary()


def live_entries() -> list:
    """The opaque call sites of captures still alive (freed with their model)."""
    return list(_TABLE.values())


def _entry(key: str) -> OpaqueEntry:
    entry = _TABLE.get(key)
    if entry is None:
        raise StaleCaptureError(f"autocp: opaque call {key!r} outlived its capture (its model was dropped). "
                                 f"Fix: keep the model alive while its parallel module runs.")
    return entry


_KEYS = itertools.count()


def _rebuild(entry: OpaqueEntry, tensors):
    spec, tidx, consts = entry.last_call
    leaves = list(consts)
    for i, t in zip(tidx, tensors):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


@torch.library.custom_op("autocp::opaque", mutates_args=())
def _opaque(key: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
    entry = _entry(key)
    a, kw = _rebuild(entry, args)
    out = entry.module(*a, **kw)
    flat, _ = tree_flatten(out)
    res = []
    for t in flat:
        if isinstance(t, torch.Tensor):
            res.append(t.clone() if any(t.data_ptr() == x.data_ptr() for x in args) else t)
    return res


@_opaque.register_fake
def _opaque_fake(key, args):
    entry = _entry(key)
    if entry.out_meta is not None:
        return [torch.empty(shape, dtype=dtype, device=args[0].device if args else "cpu")
                for shape, dtype in entry.out_meta]
    # registered module: the output is shaped like its first tensor input (pair ops,
    # pair-bias attention: like s) unless the rule says otherwise
    return [torch.empty_like(args[0])]


OPAQUE_OP = torch.ops.autocp.opaque.default


class OpaqueWrapper(nn.Module):
    """Stands in for a module during capture: one ``autocp::opaque`` call."""

    def __init__(self, entry: OpaqueEntry):
        super().__init__()
        object.__setattr__(self, "_entry", entry)

    def forward(self, *args, **kwargs):
        entry = self._entry
        leaves, spec = tree_flatten((args, kwargs))
        tidx = [i for i, l in enumerate(leaves) if isinstance(l, torch.Tensor)]
        consts = [None if isinstance(l, torch.Tensor) else l for l in leaves]
        entry.last_call = (spec, tidx, consts)
        tensors = [leaves[i] for i in tidx]
        if entry.in_meta is None:
            entry.in_meta = [(tuple(t.shape), t.dtype) for t in tensors]
        outs = torch.ops.autocp.opaque(entry.key, tensors)
        if entry.out_spec is None:
            return outs[0]
        leaves_out = list(entry.out_const)
        it = iter(outs)
        for i, m in enumerate(entry.out_meta_mask):
            if m:
                leaves_out[i] = next(it)
        return tree_unflatten(leaves_out, entry.out_spec)


# ----------------------------------------------------------------------------- cloning
def structural_clone(model: nn.Module, replace: dict) -> nn.Module:
    """A copy of the module *tree* (new module objects, same parameter/buffer objects)
    with the modules at the paths of ``replace`` swapped. ``model`` is not mutated."""

    def rec(mod: nn.Module, prefix: str) -> nn.Module:
        if prefix in replace:
            return replace[prefix]
        new = mod.__class__.__new__(mod.__class__)
        new.__dict__ = dict(mod.__dict__)
        new._parameters = dict(mod._parameters)
        new._buffers = dict(mod._buffers)
        new._modules = {}
        for name, child in mod._modules.items():
            if child is None:
                new._modules[name] = None
                continue
            new._modules[name] = rec(child, f"{prefix}.{name}" if prefix else name)
        return new

    return rec(model, "")


def find_registered(model: nn.Module) -> dict:
    """``{path: rule}`` of the outermost modules with a registry rule (not the root)."""
    found = {}

    def rec(mod, prefix):
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            rule = _registry.lookup_module(child)
            if rule is not None:
                found[path] = rule
            else:
                rec(child, path)

    rec(model, "")
    return found


_PLAIN = (bool, int, float, str, type(None))


def _config_sig(m: nn.Module) -> tuple:
    """The python configuration of ``m`` and its submodules that can change what forward
    computes: plain attributes (bool / int / float / str / None and tuples of them, e.g.
    ``self.ending``, ``self.eps``), by name. Other objects count by type only."""
    out = []
    for name, sub in m.named_modules():
        for k, v in sorted(vars(sub).items()):
            if k.startswith("_") or k == "training":
                continue
            if isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)):
                out.append((name, k, v))
            elif isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                # a tensor attribute that is no parameter / buffer (``self.lambda_init =
                # torch.tensor(0.8 - 0.6 * exp(-0.3 * layer_idx))``): export bakes the captured
                # instance's value into the graph as a constant, so it is part of the config
                out.append((name, k, _tensor_sig(v)))
            elif not isinstance(v, (torch.Tensor, nn.Module)):
                out.append((name, k, type(v).__name__))
    return tuple(out)


def _tensor_sig(v: torch.Tensor) -> tuple:
    """Shape, dtype and a digest of the values of a constant tensor (no values on meta)."""
    import hashlib

    if v.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(v):
        return (tuple(v.shape), v.dtype, id(v))  # unknown values: never equal to another instance's
    raw = v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return (tuple(v.shape), v.dtype, hashlib.sha1(raw.numpy().tobytes()).hexdigest())


def param_sig(m: nn.Module):
    return (
        type(m),
        m.training,
        tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters()),
        tuple((n, tuple(b.shape), b.dtype) for n, b in m.named_buffers()),
        tuple(type(x).__name__ for x in m.modules()),
        # instances whose python config differs (an `ending` flag, a spelling switch) run
        # different graphs: never one repeated-block group
        _config_sig(m),
    )


def find_repeated_blocks(model: nn.Module, registered: dict) -> dict:
    """``{group_id: [paths]}``: >= 2 structurally identical children of a ModuleList /
    Sequential (outermost lists only; registered modules are not blocks). A child that is
    itself a ModuleList / ModuleDict (a layer stored as ``ModuleList([attn, ff])`` and
    unpacked by the parent) is not callable: its members, grouped by position, are."""
    groups: dict = {}
    taken: list[str] = []

    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        if any(name == r or name.startswith(r + ".") for r in registered):
            continue
        by_sig: dict = {}
        unpacked: list = []
        for cname, ch in mod.named_children():
            path = f"{name}.{cname}" if name else cname
            if path in registered or not any(True for _ in ch.parameters()):
                continue
            if isinstance(ch, (nn.ModuleList, nn.ModuleDict)):
                # a container is iterated, not called (``for attn, ff in self.layers``):
                # its members are the blocks, grouped by position across the siblings
                for mname, m in ch.named_children():
                    mpath = f"{path}.{mname}"
                    if mpath in registered or not any(True for _ in m.parameters()):
                        continue
                    by_sig.setdefault((mname, param_sig(m)), []).append(mpath)
                unpacked.append(path)
                continue
            by_sig.setdefault(param_sig(ch), []).append(path)
        for i, paths in enumerate(by_sig.values()):
            if len(paths) >= 2:
                gid = f"{paths[0]}[x{len(paths)}]"
                groups[gid] = paths
                taken.extend(paths)
        if any(len(v) >= 2 for v in by_sig.values()):
            taken.extend(unpacked)  # their members are grouped: the lists are not looked into again
    return groups


# ----------------------------------------------------------------------------- capture
@dataclass
class BlockGraph:
    """One captured representative of a group of identical blocks."""

    group: str
    paths: list
    rep: str  # path of the captured instance
    gm: torch.fx.GraphModule
    ep: Any
    input_names: list  # placeholder names of the block's tensor inputs


@dataclass
class Capture:
    top: torch.fx.GraphModule
    ep: Any
    input_names: list  # placeholder names of the user's tensor inputs (flattened order)
    blocks: dict = field(default_factory=dict)  # group -> BlockGraph
    opaque: dict = field(default_factory=dict)  # key -> OpaqueEntry
    registered: dict = field(default_factory=dict)  # path -> rule
    seconds: float = 0.0
    n_nodes: int = 0

    def graphs(self):
        """``[(prefix, gm, block)]``: the top graph and every block graph."""
        out = [("", self.top, None)]
        for b in self.blocks.values():
            out.append((b.rep, b.gm, b))
        return out


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _sig_of(args, kwargs):
    leaves, spec = tree_flatten((args, kwargs))
    return (str(spec), tuple((tuple(l.shape), l.dtype) if isinstance(l, torch.Tensor) else repr(l) for l in leaves))


def _module_paths(model: nn.Module) -> dict:
    return {id(m): (p or "<root>") for p, m in model.named_modules()}


def _explain_failure(exc: BaseException, paths: dict, what: str) -> CaptureError:
    """The deepest frame running inside a module of the model (its path), and the deepest
    frame of the model's own code (a free helper function it called counts): source line."""
    import os

    ours = (os.sep + "torch" + os.sep, os.sep + "autocp" + os.sep, os.sep + "passes" + os.sep)
    module_path, construct, where = None, None, None
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for fr, lineno in traceback.walk_tb(e.__traceback__):
            slf = fr.f_locals.get("self")
            in_module = isinstance(slf, nn.Module) and id(slf) in paths
            if in_module:
                module_path = f"{paths[id(slf)]} ({type(slf).__name__})"
            if module_path is not None and (in_module or not any(k in fr.f_code.co_filename for k in ours)):
                construct = linecache.getline(fr.f_code.co_filename, lineno).strip()
                where = f"{fr.f_code.co_filename}:{lineno}"
        e = e.__cause__ or e.__context__
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else type(exc).__name__
    data_dep = any(s in str(exc) for s in ("data-dependent", "data dependent", "GuardOnDataDependent", "unbacked"))
    if data_dep:
        fix = ("the python control flow depends on tensor *values*, which a capture cannot see. "
               "Fix: compute both branches and select with torch.where, use torch.cond, or register "
               "the module with autocp.register_module(cls, op_factory) so it stays opaque.")
    else:
        fix = ("Fix: make the construct shape-only (no .item()/bool() of tensors, no in-place "
               "writes into inputs), or register the module with autocp.register_module(cls, "
               "op_factory) so capture treats it as one opaque call.")
    return CaptureError(
        f"autocp could not capture {what}: in module {module_path or '<unknown>'}"
        f"{' at ' + where if where else ''}, construct `{construct or '?'}` failed with "
        f"{type(exc).__name__}: {first}\n  {fix}"
    )


def _export(mod, args, kwargs, paths, what):
    try:
        return export(mod, args, kwargs)
    except CaptureError:
        raise
    except Exception as exc:  # noqa: BLE001 -- re-raised with context
        raise _explain_failure(exc, paths, what) from exc


class BoundCall(nn.Module):
    """Calls ``block`` with recorded non-tensor arguments; only tensors are inputs."""

    def __init__(self, block, spec, tidx, consts):
        super().__init__()
        self.block = block
        self._spec, self._tidx, self._consts = spec, tidx, consts

    def forward(self, *tensors):
        leaves = list(self._consts)
        for i, t in zip(self._tidx, tensors):
            leaves[i] = t
        a, kw = tree_unflatten(leaves, self._spec)
        return self.block(*a, **kw)


def example_like(shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def capture(
    model: nn.Module,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    *,
    reuse_blocks: bool = True,
    cache: bool = True,
    fallback: frozenset = frozenset(),
) -> Capture:
    """Capture ``model(*args, **kwargs)``; see the module docstring. ``fallback``: extra
    module paths to keep opaque (modules the rewrite will run gathered; their outputs are
    recorded by a fake run)."""
    kwargs = dict(kwargs or {})
    _registry.ensure_defaults()
    registered = find_registered(model)
    # registered modules are opaque anyway: naming them again is the same capture (one per model)
    fallback = frozenset(p for p in fallback if p and p not in registered)
    key = (_sig_of(args, kwargs), model.training, _registry.registry_version(), reuse_blocks, fallback)
    if cache:
        hit = _CACHE.get(model, {}).get(key)
        if hit is not None:
            return hit
    with claimed_functions():  # helpers that reject fake tensors, replaced (passes/functions.py)
        return _capture(model, args, kwargs, registered, fallback, reuse_blocks, cache, key)


def _capture(model, args, kwargs, registered, fallback, reuse_blocks, cache, key) -> Capture:
    t0 = time.perf_counter()
    sid = next(_KEYS)
    entries: dict = {}

    def new_entry(path, module, kind, rule=None, group=None):
        k = f"{sid}:{path}"
        e = OpaqueEntry(key=k, path=path, module=module, kind=kind, rule=rule, group=group)
        _TABLE[k] = e
        entries[k] = e
        return e

    # the registered modules, opaque, inside a clone that shares parameters
    leaf_repl = {p: OpaqueWrapper(new_entry(p, _get(model, p), "module", rule=r)) for p, r in registered.items()}
    paths = _module_paths(model)
    if fallback:
        inner0 = structural_clone(model, leaf_repl)
        paths.update(_module_paths(inner0))
        rec0 = _record_blocks(inner0, {p: [p] for p in fallback}, args, kwargs, paths)
        for p in fallback:
            r = rec0[p]
            e = new_entry(p, _get(model, p), "fallback")
            if r is None:
                continue  # never called
            e.out_spec, e.out_const, e.out_meta_mask = r["out_spec"], r["out_const"], r["out_mask"]
            e.out_meta = r["out_meta"]
            leaf_repl[p] = OpaqueWrapper(e)
    blocks = find_repeated_blocks(model, {**registered, **{p: None for p in fallback}}) if reuse_blocks else {}
    inner = structural_clone(model, leaf_repl)
    paths.update(_module_paths(inner))

    block_graphs: dict = {}
    top_model = inner
    if blocks:
        # phase 1: one fake run records each group's inputs and outputs (first instance runs,
        # the others return empties shaped like its outputs)
        rec = _record_blocks(inner, blocks, args, kwargs, paths)
        # phase 2: capture one representative per group
        block_repl = {}
        for gid, plist in blocks.items():
            r = rec[gid]
            if r is None or r.get("hetero"):
                continue
            rep = plist[0]
            bound = BoundCall(_get(inner, rep), r["spec"], r["tidx"], r["consts"])
            ex = [example_like(s, d) for s, d in r["in_meta"]]
            ep = _export(bound, ex, {}, paths, f"block {rep} ({type(_get(model, rep)).__name__})")
            gm = ep.graph_module
            names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
            block_graphs[gid] = BlockGraph(gid, plist, rep, gm, ep, names)
            for path in plist:
                e = new_entry(path, _get(inner, path), "block", group=gid)
                e.out_spec, e.out_const, e.out_meta_mask = r["out_spec"], r["out_const"], r["out_mask"]
                e.out_meta = r["out_meta"]
                block_repl[path] = OpaqueWrapper(e)
        if block_repl:
            top_model = structural_clone(inner, block_repl)
            paths.update(_module_paths(top_model))
    ep = _export(top_model, args, kwargs, paths, f"model {type(model).__name__}")
    gm = ep.graph_module
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    cap = Capture(top=gm, ep=ep, input_names=names, blocks=block_graphs, opaque=entries, registered=registered)
    for _, g, _b in cap.graphs():
        inline_wrappers(g)
        for node in g.graph.nodes:
            if node.op == "call_function" and node.target is OPAQUE_OP:
                put(node, opaque=entries[node.args[0]])
    cap.n_nodes = sum(len(g.graph.nodes) for _, g, _ in cap.graphs())
    cap.seconds = time.perf_counter() - t0
    if cache:
        _CACHE.setdefault(model, {})[key] = cap
    return cap


def _is_wrapper_hop(node) -> bool:
    return (
        node.op == "call_function"
        and isinstance(node.target, torch._ops.HigherOrderOperator)
        and getattr(node.target, "__name__", "") in ("wrap_with_autocast", "wrap_with_set_grad_enabled", "wrap")
    )


def inline_wrappers(gm: torch.fx.GraphModule) -> int:
    """Inline ``torch.autocast`` / ``set_grad_enabled`` regions (export keeps them as
    higher-order ops with a submodule) so every pass sees one flat ATen graph. The
    inlined graph is for analysis; the model's own python runs at execution time."""
    count = 0
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if not _is_wrapper_hop(node):
                continue
            sub_i = next(i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr")
            sub = getattr(gm, node.args[sub_i].target)
            operands = list(node.args[sub_i + 1:])
            env = {}
            phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
            for ph, val in zip(phs, operands):
                env[ph] = val
            outs = None
            with gm.graph.inserting_before(node):
                for sn in sub.graph.nodes:
                    if sn.op == "placeholder":
                        continue
                    if sn.op == "output":
                        outs = torch.fx.node.map_arg(sn.args[0], lambda n: env[n])
                        continue
                    if sn.op == "get_attr":
                        attr = sn.target
                        new_name = f"_inl_{count}_{attr}"
                        setattr(gm, new_name, getattr(sub, attr))
                        env[sn] = gm.graph.get_attr(new_name)
                        env[sn].meta = dict(sn.meta)
                        continue
                    env[sn] = gm.graph.node_copy(sn, lambda n: env[n])
            for user in list(node.users):
                if user.op == "call_function" and user.target is operator.getitem:
                    user.replace_all_uses_with(outs[user.args[1]])
                    gm.graph.erase_node(user)
                else:
                    user.replace_input_with(node, outs if not isinstance(outs, (tuple, list)) else outs[0])
            gm.graph.erase_node(node)
            count += 1
            changed = True
            break
    if count:
        gm.graph.lint()
    return count


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _record_blocks(inner, blocks, args, kwargs, paths):
    from torch._subclasses.fake_tensor import FakeTensorMode

    rec = {gid: None for gid in blocks}

    class Recorder(nn.Module):
        def __init__(self, gid, block):
            super().__init__()
            self.gid = gid
            object.__setattr__(self, "block", block)

        def forward(self, *a, **kw):
            leaves, spec = tree_flatten((a, kw))
            tidx = [i for i, l in enumerate(leaves) if isinstance(l, torch.Tensor)]
            consts = [None if isinstance(l, torch.Tensor) else l for l in leaves]
            in_meta = [(tuple(leaves[i].shape), leaves[i].dtype) for i in tidx]
            r = rec[self.gid]
            if r is not None and (r["spec"] != spec or r["in_meta"] != in_meta or r["consts"] != consts):
                r["hetero"] = True
            if r is None or r.get("hetero"):
                out = self.block(*a, **kw)
                if r is None:
                    oleaves, ospec = tree_flatten(out)
                    rec[self.gid] = {
                        "spec": spec, "tidx": tidx, "consts": consts, "in_meta": in_meta,
                        "out_spec": ospec,
                        "out_mask": [isinstance(l, torch.Tensor) for l in oleaves],
                        "out_const": [None if isinstance(l, torch.Tensor) else l for l in oleaves],
                        "out_meta": [(tuple(l.shape), l.dtype) for l in oleaves if isinstance(l, torch.Tensor)],
                        "out": out,
                    }
                return out
            return tree_map_tensors(lambda t: torch.empty_like(t), r["out"])

    repl = {p: Recorder(gid, _get(inner, p)) for gid, plist in blocks.items() for p in plist}
    runner = structural_clone(inner, repl)
    paths = {**paths, **_module_paths(runner)}  # the failing frame's module is one of the runner's
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as fm:
            fa, fk = tree_map_tensors(lambda t: fm.from_tensor(t), (tuple(args), dict(kwargs)))
            with torch.no_grad():
                runner(*fa, **fk)
    except Exception as exc:  # noqa: BLE001
        raise _explain_failure(exc, paths, f"model {type(inner).__name__} (shape run)") from exc
    return rec


def tree_map_tensors(fn, tree):
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([fn(l) if isinstance(l, torch.Tensor) else l for l in leaves], spec)
