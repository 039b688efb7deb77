"""Per-rank peak memory of a parallelized model, from FakeTensor runs (no devices).

How: rank ``(0, 1)`` (an off-diagonal rank; ``(0, 0)`` on 1x1) of a ``p x p`` mesh is
simulated on one process by running a structural clone of the model on *fake* tiles
(``b = ceil(N/p)`` tokens per block) under a live-bytes tracker:

* a registered module with a 2D op runs as **autocp's real op** built on a
  :meth:`autocp.mesh.SquareMesh.simulated` mesh, inside :func:`autocp.comm.simulate`:
  the op's own tile program (its chunking, ring and receive buffers, gathers) runs on the
  fake tiles, every communication primitive allocates exactly the buffers it allocates for
  real and moves nothing -- so a chunked op reports its true peak;
* a module that the rewrite gathers (fallback) runs at full N on gathered inputs;
* the rest of the glue runs as is.

``estimate`` returns an :class:`Estimate` (``peak_bytes``; ``per_module``: the peak while
each replaced module ran; ``table()`` prints it) and, given ``device_bytes``, the smallest
square mesh whose per-rank peak fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .pipeline import compile_stages, n_seq_of, planning_n, resolve_input_tags
from .tags import map_tagged

__all__ = ["Estimate", "estimate", "default_inputs", "RunTracker", "estimate_call"]

@dataclass
class Estimate:
    n_tokens: int
    mesh_shape: tuple
    dtype: torch.dtype
    peak_bytes: int
    params_bytes: int
    per_module: dict = field(default_factory=dict)
    fits: Optional[tuple] = None  # smallest (p, p) that fits device_bytes
    backward: bool = False  # forward + backward (one training step) rather than forward only
    #: whole-program estimates: ``guessed`` (values a fake could not give, by kind),
    #: ``replayed`` (repeated-layer calls charged from their record), ``warnings`` (the
    #: engine's: gathers), ``demoted`` (real ops run on fakes for size), ``shape``
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        s = (f"N={self.n_tokens} on {self.mesh_shape[0]}x{self.mesh_shape[1]}: per-rank peak "
             f"{self.peak_bytes / 2**20:.2f} MiB ({self.dtype}, {'forward+backward' if self.backward else 'forward'})")
        if self.fits is not None:
            s += f"; smallest mesh that fits: {self.fits[0]}x{self.fits[1]}"
        return s

    def table(self, unit: str = "GiB") -> str:
        """Peak per replaced module (the live bytes of rank ``(0, 1)`` while it ran, without
        parameters) and its own transient bytes (peak minus what was live when it started)."""
        scale = {"GiB": 2**30, "MiB": 2**20}[unit]
        rows = [str(self), f"{'module':<44} {'kind':<24} {'peak ' + unit:>10} {'own ' + unit:>10}"]
        for path, rec in sorted(self.per_module.items(), key=lambda kv: -kv[1]["peak_bytes"]):
            rows.append(f"{path:<44} {rec['kind']:<24} {rec['peak_bytes'] / scale:>10.3f} "
                        f"{rec['transient_bytes'] / scale:>10.3f}")
        rows.append(f"{'parameters':<44} {'':<24} {self.params_bytes / scale:>10.3f}")
        for w in self.details.get("warnings", ()):
            rows.append(f"warning: {w}")
        return "\n".join(rows)


def default_inputs(model: nn.Module, n: int, dtype=torch.float32, batch: int = 1):
    """``(s, z, mask, pair_mask)`` for a Pairformer-like model (channels from its weights)."""
    cs = cz = None
    for name, mod in model.named_modules():
        if cs is None and name.endswith("pre_norm_s") and isinstance(mod, nn.LayerNorm):
            cs = mod.normalized_shape[0]
        if cz is None and name.endswith("tri_mul_out.norm_in") and isinstance(mod, nn.LayerNorm):
            cz = mod.normalized_shape[0]
        if cs is None and name.endswith("transition_s.norm") and isinstance(mod, nn.LayerNorm):
            cs = mod.normalized_shape[0]
    if cz is None:
        raise ValueError(
            f"estimate: cannot tell the input shapes of {type(model).__name__}. Fix: pass "
            f"make_inputs=lambda n: (s, z, mask, pair_mask) (tensors or meta tensors at token length n)."
        )
    cs = cs or cz
    s = torch.empty(batch, n, cs, dtype=dtype, device="meta")
    z = torch.empty(batch, n, n, cz, dtype=dtype, device="meta")
    mask = torch.empty(batch, n, dtype=dtype, device="meta")
    pm = torch.empty(batch, n, n, dtype=dtype, device="meta")
    return (s, z, mask, pm)


class _Tracker:
    """Live bytes of fake tensors (by storage), with the peak."""

    def __init__(self):
        import weakref

        self._weakref = weakref
        self.live = 0
        self.peak = 0
        self.extra = 0
        self.seen = {}
        self.per_module = {}
        self.at_peak: list = []  # what was live at the current scope's peak (RunTracker fills it)

    def add(self, t):
        from torch._subclasses.fake_tensor import FakeTensor

        if not isinstance(t, FakeTensor):
            return  # a real tensor here is a parameter/buffer (or a view of one): counted in params_bytes
        self._count(t)

    def _count(self, t) -> int:
        """Count ``t``'s storage once (freed with it); its bytes, 0 when already counted."""
        try:
            st = t.untyped_storage()
        except Exception:  # noqa: BLE001
            return 0
        key = id(st)
        if key in self.seen:
            return 0
        nbytes = st.nbytes()
        self.seen[key] = self._weakref.finalize(st, self._free, key, nbytes)
        self.live += nbytes
        if self.live + self.extra > self.peak:
            self.peak = self.live + self.extra
            self._on_peak()
        return nbytes

    def _on_peak(self, note=None):
        """A new peak (of the current scope) was reached; ``note``: ``(what, bytes)`` charged."""

    def _free(self, key, nbytes):
        self.seen.pop(key, None)
        self.live -= nbytes

    def ignore(self, t):
        """Mark ``t``'s storage as already counted (a fake parameter: in params_bytes)."""
        st = t.untyped_storage()
        self.seen[id(st)] = st  # strong ref keeps the id valid

    def charge(self, nbytes):
        self.extra += nbytes
        if self.live + self.extra > self.peak:
            self.peak = self.live + self.extra
            self._on_peak()


_SCALAR_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


def _mode(tracker):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in _SCALAR_OPS:
                # data-dependent python branch on fake tiles (e.g. ``if bool(masked.any()):
                # out[masked] = ...`` for fully-masked rows): no data, so take the common
                # path -- False (a data-dependent boolean index cannot run on fake tensors,
                # and those fix-ups touch a few rows), 1 for counts, 0.0 for floats
                x = args[0]
                return False if x.dtype == torch.bool else (1 if not x.dtype.is_floating_point else 0.0)
            if func is torch.ops.aten.nonzero.default:
                # data-dependent output shape: consistent with the False above, nothing is set
                x = args[0]
                return torch.empty((0, x.dim()), dtype=torch.long, device=x.device)
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    tracker.add(t)
            return out

    return Mode()


class _Watch:
    """Per-module peak: live bytes at entry and the highest live bytes while it ran."""

    def __init__(self, tracker, path, kind):
        self.tracker, self.path, self.kind = tracker, path, kind

    def __enter__(self):
        t = self.tracker
        self.entry = t.live + t.extra
        self.outer_peak, self.outer_at = t.peak, t.at_peak
        t.peak = self.entry  # measure this module's own peak, then restore the running max
        t._on_peak()
        return self

    def __exit__(self, *exc):
        t = self.tracker
        mine, mine_at = t.peak, t.at_peak
        t.peak = max(self.outer_peak, mine)
        if mine < self.outer_peak:
            t.at_peak = self.outer_at
        rec = t.per_module.setdefault(self.path, {"kind": self.kind, "calls": 0, "peak_bytes": 0, "transient_bytes": 0})
        rec["calls"] += 1
        if mine >= rec["peak_bytes"] and mine_at:
            rec["at_peak"] = mine_at
        rec["peak_bytes"] = max(rec["peak_bytes"], mine)
        rec["transient_bytes"] = max(rec["transient_bytes"], mine - self.entry)
        return False


def _tile_inputs(inputs, tags, p, n):
    """Meta tensors of this rank's tile shapes (token axes -> b, MSA rows -> ceil(S/p))."""
    b = -(-n // p)

    def tile(x, tags):
        shape = list(x.shape)
        for d, t in enumerate(tags or ()):
            if t in ("r", "c"):
                shape[d] = b
            elif t == "s":
                shape[d] = -(-shape[d] // p)
        return torch.empty(shape, dtype=x.dtype, device="meta")

    return map_tagged(inputs, tags, tile)


class _WatchOp(nn.Module):
    """A replacement module of the graph runner, with its per-module peak recorded."""

    def __init__(self, op, tracker, path, kind):
        super().__init__()
        object.__setattr__(self, "inner", op)
        object.__setattr__(self, "tracker", tracker)
        self.path, self.kind = path, kind
        self.recomputes_itself = bool(getattr(op, "recomputes_itself", False))
        self._op_params = list(op.parameters())

    def parameters(self, recurse: bool = True):
        return iter(self._op_params)

    def forward(self, *a, **kw):
        with _Watch(self.tracker, self.path, self.kind):
            return self.inner(*a, **kw)


def _peak_for_graph(model, plan, input_tags, inputs, p, n, dtype, training, recompute="ops", pair_dtype=None,
                    autocast=False):
    """The peak of what ``parallelize(model, emit="graph")`` runs on one rank: the model is
    captured at the real N on FakeTensors, its graphs sharded, and the tile program runs on
    fake tiles of rank ``(0, 1)`` of a simulated mesh with autocp's real ops (communication
    simulated: :func:`autocp.comm.simulate`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .. import comm
    from ..mesh import SquareMesh
    from ..registry import lookup_module
    from .context import tile_context
    from .graph_emit import build_graph_runner
    from .rewrite import GatherFallback

    tracker = _Tracker()
    sim = SquareMesh.simulated(p, (0, 1) if p > 1 else (0, 0))
    n_seq = n_seq_of([t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)], input_tags)
    repl = {}
    for path, act in plan.actions.items():
        mod = model.get_submodule(path)
        if act.action == "op":
            op = act.builder(mod, sim) if getattr(act, "builder", None) is not None else lookup_module(mod).build(mod, sim)
            repl[path] = _WatchOp(op, tracker, path, act.kind)
        else:
            repl[path] = _WatchOp(GatherFallback(mod, sim, act, path=path), tracker, path, "gathered")
    model.train(training)
    for m in repl.values():
        m.inner.train(training)
    params_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    fm = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(x):
        if not isinstance(x, torch.Tensor):
            return x
        with fm:
            return (torch.empty(x.shape, dtype=x.dtype) if x.dtype.is_floating_point
                    else torch.ones(x.shape, dtype=x.dtype))

    full = tree_unflatten([fake(x) for x in tree_flatten(inputs)[0]], tree_flatten(inputs)[1])
    fa, fkw = (full if isinstance(full, tuple) and len(full) == 2 and isinstance(full[1], dict) else (tuple(full), {}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real parallelize warns about gathers; the table shows them
        runner = build_graph_runner(model, fa, fkw, plan, repl, input_tags, n, n_seq, sim, strict=False,
                                    recompute=recompute, pair_dtype=pair_dtype)
    del full, fa, fkw
    local = _tile_inputs(inputs, input_tags, p, n)
    fl, spec = tree_flatten(local)
    fake_in = [fake(t) for t in fl]
    a, kw = tree_unflatten(fake_in, spec) if isinstance(local, tuple) and len(local) == 2 and isinstance(local[1], dict) \
        else (tuple(fake_in), {})
    for t in fake_in:
        if isinstance(t, torch.Tensor):
            tracker.add(t)
    for q in [*model.parameters(), *model.buffers()]:
        tracker.ignore(fm.from_tensor(q))
    amp = torch.autocast("cpu", dtype=dtype, enabled=bool(autocast))
    with fm, _mode(tracker), comm.simulate(sim), tile_context(sim, n, n_seq), amp:
        if training:
            saved = [(q, q.grad) for q in model.parameters()]
            try:
                out = runner(a, kw)
                loss = sum(o.float().sum() for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor))
                del out
                loss.backward()
            finally:
                for q, g in saved:
                    q.grad = g
        else:
            with torch.no_grad():
                out = runner(a, kw)
            del out
    per_module = {k: dict(v) for k, v in tracker.per_module.items()}
    return tracker.peak + params_bytes, params_bytes, per_module


def estimate(
    model: nn.Module,
    n_tokens: int,
    mesh_shape=(1, 1),
    dtype=torch.float32,
    *,
    make_inputs: Optional[Callable] = None,
    training: bool = False,
    backward: Optional[bool] = None,
    device_bytes: Optional[int] = None,
    max_p: int = 64,
    emit: str = "graph",
    recompute: str = "ops",
    pair_dtype=None,
    autocast: Optional[bool] = None,
) -> Estimate:
    """Per-rank peak bytes (parameters + live tensors) of ``parallelize(model)`` at
    ``n_tokens`` on ``mesh_shape`` (forward, no grad; ``training=True`` or ``backward=True``:
    one training step -- forward in train mode, backward of the summed outputs, parameter
    gradients included; data-dependent branches take the no-masked-rows path).

    ``make_inputs(n) -> tuple``: example inputs at token length ``n`` (meta tensors are
    fine); default: ``(s, z, mask, pair_mask)`` from the model's weights. With
    ``device_bytes``, also the smallest square mesh that fits (``Estimate.fits``).
    ``recompute`` / ``pair_dtype``: as for :func:`autocp.parallelize`; the model is captured
    at N on FakeTensors and its sharded tile program runs (``emit="graph"``, the only value).

    ``dtype`` bf16/fp16: by default (``autocast=None`` -> True) the model runs as Boltz runs
    in bf16 ("bf16-mixed"): fp32 weights under ``torch.autocast(dtype)``, the inputs in
    ``dtype``; ``autocast=False`` casts the weights to ``dtype`` instead (pure low precision;
    note Boltz's own modules do not run that way: ``pre_norm_s(s.float())`` meets bf16
    LayerNorm weights). fp32: weights as given.
    """
    if emit != "graph":
        raise ValueError(f"estimate: given emit={emit!r}; required 'graph' (the captured tile program; a model "
                         f"that runs on the eager engine is estimated with autocp.passes.estimate.estimate_call). "
                         f"Fix: drop emit.")
    if backward is not None:
        training = bool(backward)
    from ..mesh import MeshError, SquareMesh

    # argument validation (autocp.guard conventions: given / required / fix)
    import numbers

    if isinstance(n_tokens, bool) or not isinstance(n_tokens, numbers.Integral) or n_tokens < 1:
        raise ValueError(f"estimate: given n_tokens={n_tokens!r}; required a positive int (the token count N). "
                         f"Fix: estimate(model, n_tokens=4096, mesh_shape=(4, 4)).")
    if (not isinstance(mesh_shape, (tuple, list)) or len(mesh_shape) != 2
            or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1 for x in mesh_shape)):
        raise MeshError(f"estimate: given mesh_shape={mesh_shape!r}; required a square (p, p) of positive ints. "
                        f"Fix: mesh_shape=(4, 4).")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"estimate: given dtype={dtype!r}; required a floating torch.dtype. Fix: dtype=torch.bfloat16.")

    if len(mesh_shape) != 2 or mesh_shape[0] != mesh_shape[1]:
        raise MeshError(
            f"estimate: given mesh_shape {tuple(mesh_shape)}; required a square (p, p). "
            f"Fix: mesh_shape=({int(math.isqrt(mesh_shape[0] * mesh_shape[-1]))},) * 2."
        )
    p = int(mesh_shape[0])
    if n_tokens < p:
        raise MeshError(f"estimate: N={n_tokens} is smaller than the mesh side p={p}. Fix: use p <= N.")
    make = make_inputs or (lambda n: default_inputs(model, n, dtype))
    # plan at a small N (the plan does not depend on N); real tensors for the capture
    n_small = planning_n(model, p)
    n_small = n_small if n_tokens >= n_small else n_tokens
    small = make(n_small)
    small = tuple(torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t for t in small)
    small = tuple(torch.randn(t.shape) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.dim() >= 3 else
                  (torch.ones(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t) for t in small)
    tags, n_chk = resolve_input_tags(model, small, {}, None)
    _cap, plan = compile_stages(model, small, {}, tags, n_chk, SquareMesh.single())
    low = dtype in (torch.bfloat16, torch.float16)
    autocast = low if autocast is None else (bool(autocast) and low)
    run = model
    if not autocast and any(q.is_floating_point() and q.dtype != dtype for q in [*model.parameters(), *model.buffers()]):
        import copy

        run = copy.deepcopy(model).to(dtype)  # the model as it would run: weights in ``dtype``
    was = model.training
    def peak_at(q):
        return _peak_for_graph(run, plan, tags, make(n_tokens), q, n_tokens, dtype, training, recompute,
                               pair_dtype, autocast)

    try:
        peak, pbytes, per_module = peak_at(p)
        fits = None
        if device_bytes is not None:
            q = 1
            while q <= max_p and q <= n_tokens:
                pk, _, _ = peak_at(q)
                if pk <= device_bytes:
                    fits = (q, q)
                    break
                q += 1
    finally:
        model.train(was)
    return Estimate(n_tokens=n_tokens, mesh_shape=(p, p), dtype=dtype, peak_bytes=int(peak), params_bytes=int(pbytes),
                    per_module=per_module, fits=fits, backward=bool(training))


# ----------------------------------------------------------------------------- whole programs
class RunTracker(_Tracker):
    """A dispatch mode for estimating a whole python program on one simulated rank: tensors
    may be real (small index-like inputs whose *values* steer the program: masks, chain ids,
    atom -> token maps) or fake (everything large); an op on real tensors only runs for real,
    an op touching a fake runs on fakes. Live bytes of both are counted by storage, with the
    peak (``live`` / ``peak`` / ``extra`` / ``per_module``: the :class:`_Watch` interface).

    Values a fake tensor cannot give are chosen as for a complex without padding: a python
    ``bool`` of a fake is ``False`` (no fix-up branch), an int ``0`` (a valid index), a float
    ``1.0``; a data-dependent selection on a fake (``nonzero``, a boolean index,
    ``masked_select``) selects nothing; ``unique`` of a fake has one value. ``real_limit``:
    an op on real inputs whose output has more elements runs on fakes instead (no large
    real allocation), and is listed in ``demoted``."""

    def __init__(self, fake_mode, real_limit: int = 1 << 24):
        super().__init__()
        self.fm = fake_mode
        self.real_limit = int(real_limit)
        self.demoted: list = []
        self.ops = 0  # ops dispatched (fake and real)
        self.report_bytes = 1 << 30  # allocations at least this large are listed in ``large``
        self.large: dict = {}  # (shape, dtype, "file:line" of the model / autocp) -> bytes
        self.progress = None  # progress(tracker) every 50,000 ops
        self.guessed: dict = {}  # what a fake value was taken to be: {"bool": k, "int": k, "float": k, "select": k}
        self.watch_bytes = 256 << 20  # live allocations this large are listed in ``at_peak`` (with per_module)
        self.live_large: dict = {}  # storage id -> (bytes, shape, dtype, "file:line")

    def add(self, t) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(t, FakeTensor) and t.fake_mode is not self.fm:
            return  # another mode's fake (an engine's own shape tracing): allocates nothing
        if t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except Exception:  # noqa: BLE001
            return
        nbytes = st.nbytes()
        if nbytes >= self.watch_bytes and id(st) not in self.seen:
            from ..memory import source_line

            where = (tuple(t.shape), str(t.dtype).replace("torch.", ""), source_line())
            self.live_large[id(st)] = (nbytes, *where)
            if nbytes >= self.report_bytes:
                self.large[where] = max(self.large.get(where, 0), nbytes)
        self._count(t)

    def _free(self, key, nbytes):
        super()._free(key, nbytes)
        self.live_large.pop(key, None)

    def _on_peak(self, note=None):
        """Snapshot the large live tensors (``(bytes, shape, dtype, "file:line")``), with ``note``."""
        self.at_peak = sorted(self.live_large.values(), reverse=True) + ([(note[1], (), "", note[0])] if note else [])

    def _small_pointwise(self, func, flat) -> bool:
        """A pointwise op whose broadcast output is within ``real_limit`` (no probe needed)."""
        if torch.Tag.pointwise not in getattr(func, "tags", ()):
            return False
        shapes = [t.shape for t in flat if isinstance(t, torch.Tensor)]
        try:
            out = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            return False
        return math.prod(out) <= self.real_limit

    def _guess(self, kind: str) -> None:
        self.guessed[kind] = self.guessed.get(kind, 0) + 1

    def mode(self):
        from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                                   FakeTensor)
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                tracker.ops += 1
                if tracker.progress is not None and tracker.ops % 50000 == 0:
                    tracker.progress(tracker)
                flat = tree_flatten((args, kwargs))[0]
                active = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
                if (active is not None and active is not tracker.fm) or any(
                        isinstance(t, FakeTensor) and t.fake_mode is not tracker.fm for t in flat):
                    return func(*args, **kwargs)  # another fake mode's tracing (the engine's): not ours
                fake = any(isinstance(t, FakeTensor) for t in flat)
                if fake:
                    out = tracker._fake_op(func, args, kwargs)
                else:
                    probe = None
                    if func not in _SCALAR_OPS and not tracker._small_pointwise(func, flat):
                        try:
                            with tracker.fm:  # the output's size first: a large one is not allocated for real
                                probe = func(*args, **kwargs)
                        except (DynamicOutputShapeException, DataDependentOutputException):
                            probe = None  # a selection: no larger than its real input
                    sizes = [t.numel() for t in tree_flatten(probe)[0] if isinstance(t, torch.Tensor)]
                    if sizes and max(sizes) > tracker.real_limit:
                        tracker.demoted.append(str(func))
                        out = probe
                    else:
                        del probe
                        out = func(*args, **kwargs)
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker.add(t)
                return out

        return Mode()

    def _fake_op(self, func, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor

        aten = torch.ops.aten
        if func in _SCALAR_OPS:
            x = args[0]
            kind = "bool" if x.dtype == torch.bool else ("float" if x.dtype.is_floating_point else "int")
            self._guess(kind)
            return {"bool": False, "int": 0, "float": 1.0}[kind]
        if func is aten.nonzero.default:
            self._guess("select")
            return args[0].new_empty((0, args[0].dim()), dtype=torch.long)
        if func is aten.masked_select.default:
            self._guess("select")
            return args[0].new_empty((0,))
        if func in (aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                    aten._unique.default):
            self._guess("select")
            x = args[0]
            vals = x.new_empty((min(x.numel(), 1),))
            inv = x.new_zeros(x.shape, dtype=torch.long)
            cnt = x.new_ones((vals.numel(),), dtype=torch.long)
            return {aten._unique.default: (vals, inv)}.get(func, (vals, inv, cnt))
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            idx = args[1]
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx):
                self._guess("select")
                new = []
                for i in idx:
                    if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8):
                        new.extend(torch.empty(0, dtype=torch.long, device=i.device) for _ in range(i.dim()))
                    else:
                        new.append(i)
                with self.fm:
                    new = [self.fm.from_tensor(i) if isinstance(i, torch.Tensor) and not isinstance(i, FakeTensor)
                           else i for i in new]
                args = (args[0], new, *args[2:])
        return func(*args, **kwargs)


class _Replay:
    """Repeated layers (a ``ModuleList`` of one class): a call whose input signature
    (shapes, dtypes, layouts, python values) was seen ``runs`` times already is not run
    again; its recorded transient peak is charged on the current live bytes and outputs of
    the recorded shapes are made (fake); bytes a call keeps beyond its outputs (autocast's
    cached low-precision weights) are charged again. Used only where the recorded calls
    agree (else the layer always runs)."""

    def __init__(self, tracker, runs: int = 2):
        self.tracker, self.runs = tracker, runs
        self.seen: dict = {}
        self.instances: set = set()
        self.replayed = 0

    @classmethod
    def _leaf_key(cls, x):
        if isinstance(x, torch.Tensor):
            if cls._plain(x) is None:
                with torch._C.DisableTorchFunctionSubclass():
                    return (type(x).__name__, tuple(x.shape), x.dtype, id(x))
            local = getattr(x, "local", None)
            return (type(x).__name__, tuple(x.shape), x.dtype, getattr(x, "tags", None),
                    None if local is None else tuple(local.shape))
        if isinstance(x, float):
            return float  # a step size, a noise level: no bearing on memory
        if isinstance(x, (int, bool, str, type(None))):
            return x
        return type(x).__name__

    def _key(self, cls, args, kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        return (cls, str(spec), tuple(self._leaf_key(x) for x in leaves),
                torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))

    @staticmethod
    def _plain(x):
        """The tensor that owns ``x``'s storage: a TileTensor's tile, a plain / fake tensor
        itself; ``None`` for any other subclass (never asked for its storage: a lazy tensor
        would build itself)."""
        from torch._subclasses.fake_tensor import FakeTensor

        from .eager import TileTensor

        t = x.local if isinstance(x, TileTensor) else x
        if type(t) in (torch.Tensor, nn.Parameter) or isinstance(t, FakeTensor):
            return t
        return None

    @classmethod
    def _storage(cls, x):
        t = cls._plain(x)
        if t is None:
            return id(x)
        try:
            return id(t.untyped_storage())
        except (RuntimeError, NotImplementedError):
            return id(t)

    @classmethod
    def _bytes(cls, x) -> int:
        t = cls._plain(x)
        return t.untyped_storage().nbytes() if t is not None else 0

    def call(self, bound, cls, args, kwargs):
        t = self.tracker
        key = self._key(cls, args, kwargs)
        rec = self.seen.get(key)
        inst = id(getattr(bound, "__self__", bound))
        first = inst not in self.instances  # this module's first call (its one-off caches are made)
        self.instances.add(inst)
        if rec is not None and rec["runs"] >= self.runs and rec["ok"] and not (first and rec["retained"] is None):
            self.replayed += 1
            if t.live + t.extra + rec["transient"] > t.peak:
                t.peak = t.live + t.extra + rec["transient"]
                t._on_peak((f"{cls[0].__name__}.{cls[1]} (replayed) transient", rec["transient"]))
            if first and rec["retained"]:
                t.charge(rec["retained"])  # e.g. autocast's low-precision copies of this layer's weights
            return self._make(rec["out"], tree_flatten((args, kwargs))[0])
        entry = t.live + t.extra
        outer, outer_at = t.peak, t.at_peak
        t.peak = entry
        t._on_peak()
        out = bound(*args, **kwargs)
        mine = t.peak
        t.peak = max(outer, mine)
        if mine < outer:
            t.at_peak = outer_at
        leaves, spec = tree_flatten(out)
        in_leaves = tree_flatten((args, kwargs))[0]
        ins = {self._storage(x): i for i, x in enumerate(in_leaves) if isinstance(x, torch.Tensor)}
        fresh = [x for x in leaves if isinstance(x, torch.Tensor) and self._storage(x) not in ins]
        out_bytes = sum(self._bytes(x) for x in fresh)
        kept = t.live + t.extra - entry
        desc = (spec, [("input", ins[self._storage(x)]) if isinstance(x, torch.Tensor) and self._storage(x) in ins
                       else self._describe(x) for x in leaves])
        ok = all(d is not None for d in desc[1])
        if rec is None:
            rec = self.seen[key] = {"runs": 0, "ok": ok, "transient": 0, "out": desc, "retained": None}
        rec["runs"] += 1
        extra = kept - out_bytes
        if first:  # what a module keeps on its first call must be the same for every module of the list
            ok = ok and rec["retained"] in (None, extra)
            rec["retained"] = extra
        else:  # a module called again keeps nothing more (else memory grows per call: always run)
            ok = ok and extra == 0
        rec["ok"] = rec["ok"] and ok
        rec["transient"] = max(rec["transient"], mine - entry)
        return out

    @classmethod
    def _describe(cls, x):
        if not isinstance(x, torch.Tensor):
            return ("value", x)
        from torch._subclasses.fake_tensor import FakeTensor

        if cls._plain(x) is None:
            return None  # another tensor subclass: the layer always runs
        local = getattr(x, "local", None)
        if local is not None:
            if not isinstance(local, FakeTensor):
                return None
            return ("tile", tuple(local.shape), local.dtype, x.tags, tuple(x.shape), local.fake_mode)
        if not isinstance(x, FakeTensor):
            return None
        return ("tensor", tuple(x.shape), x.dtype, x.fake_mode)

    def _make(self, desc, inputs):
        spec, leaves = desc
        out = []
        for d in leaves:
            if d[0] == "input":  # an argument passed through (or updated in place)
                out.append(inputs[d[1]])
            elif d[0] == "value":
                out.append(d[1])
            elif d[0] == "tile":
                from .eager import TileTensor

                with d[5]:
                    local = torch.empty(d[1], dtype=d[2])
                self.tracker.add(local)
                out.append(TileTensor(local, d[3], d[4]))
            else:
                with d[3]:
                    x = torch.empty(d[1], dtype=d[2])
                self.tracker.add(x)
                out.append(x)
        return tree_unflatten(out, spec)


def _repeated_layers(root) -> list:
    """The modules of every ``ModuleList`` under ``root`` with at least 3 entries of one class."""
    out, seen = [], set()

    def walk(m):
        for mod in m.modules():
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            if isinstance(mod, nn.ModuleList) and len(mod) >= 3 and len({type(x) for x in mod}) == 1:
                out.extend(mod)
            inner = mod.__dict__.get("_op")  # a RegisteredOp's 2D op (not a registered child)
            if isinstance(inner, nn.Module):
                walk(inner)

    walk(root)
    return out


def estimate_call(fn, *args, tracker: "RunTracker", watch: Optional[dict] = None,
                  methods=("forward", "sample"), replay=None, replay_methods=(), **kwargs):
    """``fn(*args, **kwargs)`` under ``tracker``'s mode (see :class:`RunTracker`); the modules
    in ``watch`` (``{name: module}``) have the peak while each of their ``methods`` ran
    recorded in ``tracker.per_module`` (as :class:`Estimate.per_module`). ``replay``: a
    module whose repeated layers (a ``ModuleList`` of >= 3 of one class: Pairformer blocks,
    transformer layers) run twice per input signature and are then replayed from the
    record (:class:`_Replay`: same peak, no time); ``replay_methods``: ``[(module, name)]``
    more methods replayed so (e.g. one sampling step's network call). Returns ``fn``'s
    result (drop it)."""
    import functools

    patched = []
    if replay is not None or replay_methods:
        rp = tracker.replay = _Replay(tracker)
        targets = [(m, "forward") for m in (_repeated_layers(replay) if replay is not None else [])]
        for mod, meth in [*targets, *replay_methods]:
            if meth in mod.__dict__:
                continue

            def fwd(*a, _bound=getattr(mod, meth), _cls=(type(mod), meth), **kw):
                return rp.call(_bound, _cls, a, kw)

            object.__setattr__(mod, meth, fwd)
            patched.append((mod, meth))
    for name, mod in (watch or {}).items():
        for meth in methods:
            bound = getattr(mod, meth, None)
            if bound is None or meth in mod.__dict__:
                continue

            def wrapped(*a, _bound=bound, _name=name, _kind=type(mod).__name__, **kw):
                with _Watch(tracker, _name, _kind):
                    return _bound(*a, **kw)

            functools.update_wrapper(wrapped, bound)
            object.__setattr__(mod, meth, wrapped)
            patched.append((mod, meth))
    try:
        with tracker.mode():
            return fn(*args, **kwargs)
    finally:
        for mod, meth in patched:
            mod.__dict__.pop(meth, None)
