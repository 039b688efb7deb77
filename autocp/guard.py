"""Guards of a parallel module against bad input and faults (see docs/hardening.md).

* :func:`prepare_parallelize` -- at :func:`autocp.parallelize`: refuses a module that is
  already parallel, binds ``example_inputs`` to ``model.forward``'s signature, turns
  meta/fake/DTensor example inputs into real tensors of the same shape ("only shapes
  matter"), and runs :func:`check_agreement` (every rank has the same model structure,
  parameter/buffer checksums and example shapes; ``broadcast_from=k`` makes the weights
  equal first).
* :func:`attach` -- stores the call contract on the :class:`~autocp.passes.emit.ParallelModule`.
* :func:`guarded_call` -- around every call: :func:`bind_inputs` (by name through the
  forward's signature: any order, defaults, keyword-only), :func:`check_call` (every token
  axis equals N, masks' shapes and dtypes, DTensor meshes, meta tensors, kernel flags),
  one small all-gather over the mesh's control group (the same shapes/dtypes/N on every
  rank, optionally the same values with ``check_inputs="hash"``, and the outcome of the
  previous call), then the forward. A forward that raised on some rank makes the next call
  fail on *every* rank with ``rank k failed in the previous call: ...``.

Every collective here runs on :meth:`autocp.mesh.SquareMesh.control_group` under the
mesh's timeout, so a missing or slow rank is an error after the timeout, never a hang.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

__all__ = [
    "AgreementError",
    "CallError",
    "MeshFaultError",
    "prepare_parallelize",
    "check_agreement",
    "attach",
    "bind_inputs",
    "check_call",
    "guarded_call",
    "KERNEL_FLAGS",
]

# forward arguments that ask for kernels the parallel module does not run
KERNEL_FLAGS = ("use_kernels", "use_cuequivariance", "use_trifast")
# text of an error a rank gets because a *peer* failed, left or is slow (not its own cause)
PEER_LOSS_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
                     "timed out", "failed in the previous call", "could not exchange", "ECONNRESET",
                     "Socket closed", "Connection refused", "waited in a collective")


def is_peer_loss(text: str) -> bool:
    """True when an error message is a symptom of another rank's failure (lost peer, timeout)."""
    return any(m in text for m in PEER_LOSS_MARKERS)
CHECK_INPUTS = ("shape", "hash", "off")


class AgreementError(RuntimeError):
    """The ranks of the mesh disagree (model, weights, example inputs or call inputs)."""


class CallError(ValueError):
    """A call's inputs do not fit what the parallel module was built for."""


class MeshFaultError(RuntimeError):
    """A rank failed, left, or did not arrive in time; the parallel module refuses to run."""


# ----------------------------------------------------------------------------- helpers
def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # noqa: BLE001
        return False
    return isinstance(t, DTensor)


def _is_fake(t) -> bool:
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except Exception:  # noqa: BLE001
        return False
    return isinstance(t, FakeTensor)


def _materialize(t: torch.Tensor) -> torch.Tensor:
    """A real CPU tensor of ``t``'s shape and dtype (values only feed the capture)."""
    shape, dtype = tuple(t.shape), t.dtype
    if dtype.is_floating_point and len(shape) >= 3:
        g = torch.Generator().manual_seed(0)
        return torch.randn(shape, generator=g).to(dtype)
    return torch.ones(shape, dtype=dtype)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        kind = "DTensor" if _is_dtensor(x) else ("meta tensor" if x.is_meta else "tensor")
        return f"{kind} {list(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return repr(x) if not isinstance(x, (list, tuple, dict)) else type(x).__name__


def _sig_text(sig: inspect.Signature) -> str:
    return "(" + ", ".join(str(p) for p in sig.parameters.values()) + ")"


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    return "integer"


def _checksum(t: torch.Tensor) -> tuple:
    """Two float64 moments of the values (cheap; equal data gives equal sums)."""
    if t.is_meta or t.numel() == 0:
        return (0.0, 0.0)
    x = t.detach()
    if _is_dtensor(x):
        x = x.to_local()
    x = x.reshape(-1).to(torch.float64)
    w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device).remainder_(97.0)
    return (float(x.sum()), float((x * w).sum()))


def _timeout_str(mesh) -> str:
    return f"{mesh.timeout:g} s" if mesh.timeout is not None else "the process group's timeout"


def _first_line(e: BaseException, limit: int = 600) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= limit else msg[:limit] + " ..."


# ----------------------------------------------------------------------------- signature
@dataclass
class _Contract:
    """What a call must look like: bound through ``sig``, re-emitted in the example's order."""

    sig: Optional[inspect.Signature]
    pos_names: list
    kw_names: list
    leaf_counts: dict  # argument name -> number of tensor leaves in example_inputs
    example_meta: list  # (name, shape, dtype) per tensor leaf, in flatten order
    defaults: dict = field(default_factory=dict)
    owner: str = "model"


def _signature(model: nn.Module) -> Optional[inspect.Signature]:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return None  # *args: positions carry no names; keep the call as given
    return sig


def _bind(sig, args, kwargs, owner: str, what: str):
    try:
        b = sig.bind(*args, **kwargs)
    except TypeError as e:
        import difflib

        names = list(sig.parameters)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            unknown = [k for k in kwargs if k not in sig.parameters]
            if unknown:
                hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
                e = TypeError(f"unknown argument name(s) {unknown}" + "".join(
                    f"; did you mean {h[0]!r} for {k!r}?" for k, h in hints.items() if h) + f"; ({e})")
        given = [f"arg{i}: {_describe(a)}" for i, a in enumerate(args)] + [
            f"{k}={_describe(v)}" for k, v in kwargs.items()]
        raise CallError(
            f"{what}: given ({', '.join(given)}); {owner}.forward{_sig_text(sig)} cannot take them: {e}. "
            f"Fix: pass every required argument of {owner}.forward, by position or by its name."
        ) from None
    return b


def _leaf_names(name, value) -> list:
    leaves = [l for l in tree_flatten(value)[0] if isinstance(l, torch.Tensor)]
    if isinstance(value, torch.Tensor):
        return [name]
    return [f"{name}[{i}]" for i in range(len(leaves))]


def _contract(model: nn.Module, args, kwargs) -> _Contract:
    owner = type(model).__name__
    sig = _signature(model)
    if sig is None:
        names = [f"arg{i}" for i in range(len(args))] + list(kwargs)
        vals = list(args) + list(kwargs.values())
        meta = []
        for nm, v in zip(names, vals):
            for ln, leaf in zip(_leaf_names(nm, v), [l for l in tree_flatten(v)[0] if isinstance(l, torch.Tensor)]):
                meta.append((ln, tuple(leaf.shape), leaf.dtype))
        return _Contract(None, [], [], {}, meta, owner=owner)
    b = _bind(sig, args, kwargs, owner, "example_inputs")
    params = list(sig.parameters)
    pos_names = params[: len(args)]
    kw_names = list(kwargs)
    counts, meta = {}, []
    for nm in pos_names + kw_names:
        v = b.arguments[nm]
        leaves = [l for l in tree_flatten(v)[0] if isinstance(l, torch.Tensor)]
        counts[nm] = len(leaves)
        for ln, leaf in zip(_leaf_names(nm, v), leaves):
            meta.append((ln, tuple(leaf.shape), leaf.dtype))
    defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    return _Contract(sig, pos_names, kw_names, counts, meta, defaults, owner)


def bind_inputs(contract: _Contract, args, kwargs):
    """``(args, kwargs)`` of a call re-emitted in the order of ``example_inputs`` (so the
    i-th tensor leaf is the i-th example tensor, whatever order the caller used).

    Raises :class:`CallError` for arguments the forward does not take, a tensor where the
    example had none (or the reverse), and kernel flags the parallel module cannot honour.
    """
    if contract.sig is None:
        return tuple(args), dict(kwargs)
    b = _bind(contract.sig, args, kwargs, contract.owner, "call")
    given = dict(b.arguments)
    for flag in KERNEL_FLAGS:
        if given.get(flag):
            raise CallError(
                f"call: given {flag}={given[flag]!r}; the parallel module runs autocp's own distributed ops and "
                f"cannot run the model's fused kernels ({flag} is ignored by every autocp op, and single-device "
                f"Boltz raises without them). Fix: call with {flag}=False (autocp picks its own kernels)."
            )
    out_pos, out_kw = [], {}
    for nm in contract.pos_names + contract.kw_names:
        if nm in given:
            v = given[nm]
        elif nm in contract.defaults:
            v = contract.defaults[nm]
        else:  # unreachable after bind; keep the message anyway
            raise CallError(f"call: argument {nm!r} is missing. Fix: pass it.")
        n_leaves = len([l for l in tree_flatten(v)[0] if isinstance(l, torch.Tensor)])
        if n_leaves != contract.leaf_counts[nm]:
            raise CallError(
                f"call: argument {nm!r} is {_describe(v)} ({n_leaves} tensor(s)); the module was parallelized with "
                f"{contract.leaf_counts[nm]} tensor(s) there in example_inputs. Fix: call with the same kind of "
                f"argument, or parallelize with example_inputs that have it."
            )
        (out_pos.append(v) if nm in contract.pos_names else out_kw.__setitem__(nm, v))
    params = contract.sig.parameters
    for nm, v in given.items():
        if nm in contract.leaf_counts:
            continue
        if params[nm].kind == params[nm].VAR_KEYWORD:
            extra = dict(v)
        else:
            extra = {nm: v}
        for k, val in extra.items():
            if any(isinstance(l, torch.Tensor) for l in tree_flatten(val)[0]):
                raise CallError(
                    f"call: argument {k!r} is {_describe(val)}, but example_inputs had no tensor for it, so the "
                    f"parallel module has no layout for it. Fix: include {k}=... in example_inputs of "
                    f"autocp.parallelize."
                )
            if k in contract.defaults and val is contract.defaults[k]:
                continue
            out_kw[k] = val
    return tuple(out_pos), out_kw


# ----------------------------------------------------------------------------- parallelize
def _fingerprint(model: nn.Module, args, kwargs, contract: _Contract) -> dict:
    import hashlib

    h = hashlib.sha1()
    for name, m in model.named_modules():
        h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__};".encode())
    params = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        params[name] = (tuple(t.shape), str(t.dtype), _checksum(t))
        h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
    examples = [(nm, shape, str(dtype)) for nm, shape, dtype in contract.example_meta]
    return {"structure": h.hexdigest(), "n_modules": len(list(model.modules())), "params": params,
            "examples": examples}


def _gather(mesh, obj, what: str) -> list:
    """``all_gather_object`` over the control group; a timeout or a lost peer becomes a
    :class:`MeshFaultError` that says so."""
    import torch.distributed as dist

    group = mesh.control_group()
    if group is None:
        return [obj]
    out = [None] * mesh.world_size
    try:
        dist.all_gather_object(out, obj, group=group)
    except Exception as e:  # noqa: BLE001 -- gloo: timeout, connection closed by peer
        t = _timeout_str(mesh)
        raise MeshFaultError(
            f"autocp: rank {dist.get_rank()} could not exchange {what} with the other ranks of the "
            f"{mesh.p}x{mesh.p} mesh (timeout {t}): {_first_line(e, 300)}. A rank did not arrive in time (slow, "
            f"hung, or it took another code path) or has exited. Fix: look at the other ranks' errors first; "
            f"raise the timeout with autocp.init_mesh(timeout=...) if a rank is legitimately slow."
        ) from e
    return out


def _rank_list(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def _fmt(v) -> str:
    if isinstance(v, tuple) and len(v) == 3 and isinstance(v[2], tuple):  # a parameter fingerprint
        return f"{list(v[0])} {v[1].replace('torch.', '')} checksums ({v[2][0]:.9g}, {v[2][1]:.9g})"
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"checksums ({v[0]:.9g}, {v[1]:.9g})"
    if isinstance(v, tuple) and len(v) == 3 and isinstance(v[0], str):  # (name, shape, dtype)
        return f"{v[0]} {list(v[1])} {v[2].replace('torch.', '')}"
    return repr(v)


def _compare(infos: list, keys, what: str, mesh) -> None:
    """Raise :class:`AgreementError` at the first entry where some rank differs from rank 0."""
    g = sorted(mesh.ranks_flat)  # all_gather order: the control group's (sorted global ranks)
    ref = infos[0]
    for key, label in keys:
        a = ref.get(key)
        bad = [i for i, inf in enumerate(infos) if inf.get(key) != a]
        if not bad:
            continue
        b = infos[bad[0]].get(key)
        detail = f"{a!r} on rank {g[0]} vs {b!r} on rank {g[bad[0]]}"
        if isinstance(a, dict) and isinstance(b, dict):
            for name in list(a) + [k for k in b if k not in a]:
                if a.get(name) != b.get(name):
                    detail = (f"{name!r}: {_fmt(a.get(name, 'missing'))} on rank {g[0]} vs "
                              f"{_fmt(b.get(name, 'missing'))} on rank {g[bad[0]]}")
                    break
        elif isinstance(a, list) and isinstance(b, list):
            for x, y in zip(a, b):
                if x != y:
                    detail = f"{_fmt(x)} on rank {g[0]} vs {_fmt(y)} on rank {g[bad[0]]}"
                    break
            else:
                detail = f"{len(a)} entries on rank {g[0]} vs {len(b)} on rank {g[bad[0]]}"
        raise AgreementError(
            f"autocp: {_rank_list([g[i] for i in bad])} {'disagrees' if len(bad) == 1 else 'disagree'} with rank {g[0]} on "
            f"{label} ({what}): {detail}. Every rank must run the same model on the same inputs. "
            + ("Fix: load the same checkpoint / seed on every rank, or parallelize(..., broadcast_from=0)."
               if key == "params" else "Fix: give every rank the same inputs (same shapes, dtypes and values).")
        )


def check_agreement(model: nn.Module, mesh, args, kwargs, *, broadcast_from: Optional[int] = None,
                    contract: Optional[_Contract] = None) -> None:
    """Every rank of ``mesh`` has the same model structure, parameter/buffer checksums and
    example_inputs shapes/dtypes (one all-gather of a small dict). ``broadcast_from=k``:
    copy the parameters and buffers of mesh rank ``k`` (row-major index) to every rank first.
    Raises :class:`AgreementError` naming the ranks, the tensor and both values."""
    import torch.distributed as dist

    if mesh.control_group() is None:
        return
    contract = contract or _contract(model, args, kwargs)
    if broadcast_from is not None:
        if not isinstance(broadcast_from, int) or not 0 <= broadcast_from < mesh.world_size:
            raise CallError(f"parallelize: given broadcast_from={broadcast_from!r}; required a mesh rank index in "
                            f"[0, {mesh.world_size}). Fix: broadcast_from=0.")
        # the structure must agree before tensors can be broadcast pairwise
        infos = _gather(mesh, {"structure": _fingerprint(model, args, kwargs, contract)["structure"]},
                        "the model structure")
        _compare(infos, [("structure", "the model structure (module types, parameter names/shapes)")],
                 "before broadcast_from", mesh)
        src = mesh.ranks_flat[broadcast_from]
        with torch.no_grad():
            for _, t in list(model.named_parameters()) + list(model.named_buffers()):
                dist.broadcast(t.data, src=src, group=mesh.control_group())
    infos = _gather(mesh, _fingerprint(model, args, kwargs, contract), "model fingerprints")
    _compare(infos, [("structure", "the model structure (module types, parameter names/shapes)"),
                     ("params", "parameter/buffer values (float64 checksums)"),
                     ("examples", "example_inputs (name, shape, dtype)")], "at autocp.parallelize", mesh)


def prepare_parallelize(model: nn.Module, mesh, args, kwargs, *, broadcast_from: Optional[int] = None):
    """Checks at :func:`autocp.parallelize` before any compiling; returns ``(args, kwargs)``
    with meta/fake/DTensor example tensors replaced by real tensors of the same shape."""
    if any(getattr(m, "autocp_parallel", False) for m in model.modules()):
        raise TypeError(
            f"parallelize: given a module that is (or contains) an autocp ParallelModule "
            f"({type(model).__name__}); required the original single-device model. Fix: parallelize the "
            f"original model once (a ParallelModule is already parallel; reuse it)."
        )
    owner = type(model).__name__

    def fix(leaf, name):
        if not isinstance(leaf, torch.Tensor):
            return leaf
        if _is_dtensor(leaf):
            dm = leaf.device_mesh
            if mesh.device_mesh is None or dm != mesh.device_mesh:
                raise CallError(
                    f"example_inputs: {name} is a DTensor on {dm}; the parallel mesh is {mesh}. Fix: pass DTensors "
                    f"on the mesh given to parallelize (mesh.device_mesh), or plain tensors (only shapes matter)."
                )
            return _materialize(leaf)
        if leaf.is_meta or _is_fake(leaf):
            return _materialize(leaf)  # only shapes matter: a real stand-in for the capture
        return leaf

    new_args = tuple(_map_leaves(a, f"arg{i}", fix) for i, a in enumerate(args))
    new_kwargs = {k: _map_leaves(v, k, fix) for k, v in kwargs.items()}
    sig = _signature(model)
    if sig is not None:
        _bind(sig, new_args, new_kwargs, owner, "example_inputs")
    check_agreement(model, mesh, new_args, new_kwargs, broadcast_from=broadcast_from)
    return new_args, new_kwargs


def _map_leaves(value, name, fn):
    from torch.utils._pytree import tree_unflatten

    leaves, spec = tree_flatten(value)
    return tree_unflatten([fn(l, name) for l in leaves], spec)


# ----------------------------------------------------------------------------- per call
@dataclass
class _State:
    contract: _Contract
    check_inputs: str = "shape"
    calls: int = 0
    failed: Optional[str] = None  # this rank's exception in the previous call
    dead: Optional[str] = None  # set on every rank once a failure leaves the mesh out of step
    rng_warned: bool = False


def attach(pm: nn.Module, model: nn.Module, mesh, args, kwargs, *, check_inputs: str = "shape") -> nn.Module:
    """Store the call contract (signature, example structure) on the parallel module."""
    if check_inputs not in CHECK_INPUTS:
        raise CallError(f"parallelize: given check_inputs={check_inputs!r}; required one of {CHECK_INPUTS}. "
                        f"Fix: check_inputs='shape' (default) or 'hash' (also compare input values).")
    object.__setattr__(pm, "_autocp_guard", _State(_contract(model, args, kwargs), check_inputs))
    return pm


def check_call(mesh, tensors: list, names: list, input_tags: list, example_meta: list):
    """Validate one call's tensor leaves; returns ``(n, n_seq)``.

    Every token axis (``'r'``/``'c'`` tags) of every input equals N (read from the first
    one), every MSA axis (``'s'``) equals S, the rank and non-token sizes (channels) and
    the dtype kind (bool / floating / integer: masks) match ``example_inputs``; DTensors
    must live on ``mesh``; meta tensors cannot run.
    """
    n = n_seq = None
    n_from = s_from = None
    for i, t in enumerate(tensors):
        name = names[i] if i < len(names) else f"input {i}"
        if t.is_meta or _is_fake(t):
            raise CallError(f"call: {name} is a {'meta' if t.is_meta else 'fake'} tensor {list(t.shape)}; a parallel "
                            f"module runs on real data (meta/fake tensors are accepted as example_inputs only). "
                            f"Fix: pass real tensors, or use autocp.estimate for shape-only runs.")
        if _is_dtensor(t) and (mesh.device_mesh is None or t.device_mesh != mesh.device_mesh):
            raise CallError(
                f"call: {name} is a DTensor on {t.device_mesh}; this parallel module's mesh is {mesh} "
                f"({mesh.device_mesh}). Fix: redistribute it onto that mesh, or pass t.full_tensor() (plain tensors "
                f"are sharded by the module)."
            )
        tags = input_tags[i] if i < len(input_tags) else None
        ex = example_meta[i] if i < len(example_meta) else None
        if ex is not None and _kind(t.dtype) != _kind(ex[2]):
            raise CallError(
                f"call: {name} has dtype {t.dtype}; the module was parallelized with {ex[2]} there "
                f"({_kind(ex[2])}). Fix: pass {name} as {ex[2]} (e.g. mask.to({ex[2]})), as in example_inputs."
            )
        if not tags or all(x is None for x in tags):
            continue
        if t.dim() != len(tags):
            raise CallError(
                f"call: {name} has shape {list(t.shape)} ({t.dim()} dims); the module was parallelized with "
                f"{list(ex[1]) if ex else '?'} ({len(tags)} dims) there. Fix: pass a tensor of the same rank."
            )
        for d, tg in enumerate(tags):
            size = int(t.shape[d])
            if tg in ("r", "c"):
                if n is None:
                    n, n_from = size, f"{name} axis {d}"
                elif size != n:
                    raise CallError(
                        f"call: {name} has {size} tokens on axis {d} (shape {list(t.shape)}); {n_from} has N={n}. "
                        f"Every token axis of every input must have the same N. Fix: pass {name} for the same "
                        f"{n} tokens (e.g. a [B, {n}] mask / [B, {n}, {n}] pair mask)."
                    )
            elif tg == "s":
                if n_seq is None:
                    n_seq, s_from = size, f"{name} axis {d}"
                elif size != n_seq:
                    raise CallError(f"call: {name} has {size} MSA rows on axis {d}; {s_from} has S={n_seq}. "
                                    f"Fix: pass inputs with the same number of sequences.")
            elif tg is None and d > 0 and ex is not None and d < len(ex[1]) and size != ex[1][d]:
                raise CallError(
                    f"call: {name} has size {size} on axis {d} (shape {list(t.shape)}); the module was parallelized "
                    f"with {ex[1][d]} there (example shape {list(ex[1])}). Fix: pass {name} with the channel sizes "
                    f"the model's weights were built for."
                )
    return n, n_seq


def rng_digest() -> str:
    """A digest of the random number generators a model's python can draw from: torch's
    default CPU generator (and the current CUDA device's), python ``random``, numpy's global
    one (if numpy is loaded). On a mesh every rank holds the same sample, so these must agree
    for random draws (diffusion noise, augmentation, dropout masks drawn at the global shape)
    to be the single-device ones."""
    import hashlib
    import random
    import sys

    h = hashlib.sha1(torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        h.update(torch.cuda.get_rng_state().numpy().tobytes())
    h.update(repr(random.getstate()).encode())
    np = sys.modules.get("numpy")
    if np is not None:
        st = np.random.get_state()
        h.update(st[1].tobytes() + repr(st[2:]).encode())
    return h.hexdigest()


def _call_info(state: _State, tensors, names, n, n_seq) -> dict:
    info = {"n": n, "n_seq": n_seq, "rng": rng_digest(),
            "inputs": [(nm, tuple(t.shape), str(t.dtype)) for nm, t in zip(names, tensors)]}
    if state.check_inputs == "hash":
        info["values"] = {nm: _checksum(t) for nm, t in zip(names, tensors)}
    return info


def guarded_call(pm: nn.Module, call, args, kwargs):
    """Run ``call(*args, **kwargs)`` (the module's ``nn.Module.__call__``) behind the guards."""
    state: Optional[_State] = getattr(pm, "_autocp_guard", None)
    if state is None:
        return call(*args, **kwargs)
    mesh = pm.mesh
    if state.dead is not None:
        raise MeshFaultError(state.dead)
    state.calls += 1
    kwargs = dict(kwargs)
    extra = {k: kwargs.pop(k) for k in ("output",) if k in kwargs}
    local_err = None
    info = None
    try:
        a, kw = bind_inputs(state.contract, args, kwargs)
        leaves = [l for l in tree_flatten((a, kw))[0] if isinstance(l, torch.Tensor)]
        names = [m[0] for m in state.contract.example_meta]
        n, n_seq = check_call(mesh, leaves, names, pm.input_tags, state.contract.example_meta)
        info = _call_info(state, leaves, names, n, n_seq) if state.check_inputs != "off" else {}
    except Exception as e:  # noqa: BLE001 -- reported to every rank below, raised here
        local_err = e
    if mesh.control_group() is not None:
        prev, state.failed = state.failed, None
        mine = {"prev": prev, "err": None if local_err is None else _first_line(local_err), "info": info}
        try:
            infos = _gather(mesh, mine, f"the inputs of call #{state.calls}")
        except MeshFaultError as e:
            state.dead = (f"{e} (call #{state.calls}; this parallel module no longer runs: the mesh's collectives "
                          f"are out of step. Fix: restart the job after fixing the cause.)")
            raise
        ranks = sorted(mesh.ranks_flat)
        failed = {ranks[i]: x["prev"] for i, x in enumerate(infos) if x["prev"]}
        if failed:
            own = [r for r, m in failed.items() if not is_peer_loss(m)]
            first = min(own) if own else min(failed)
            same = len(failed) == len(infos) and len(set(failed.values())) == 1
            msg = (f"autocp: rank {first} failed in the previous call (#{state.calls - 1}): {failed[first]}"
                   + ("" if len(failed) == 1 else "; " + "; ".join(
                       f"rank {r}: {m}" for r, m in sorted(failed.items()) if r != first)))
            if not same:
                # ranks left the previous forward at different points: the row/column
                # groups and the point-to-point channels are out of step for good
                state.dead = (msg + ". This parallel module no longer runs: the mesh's collectives are out of step "
                              "after that failure. Fix: fix the cause and restart the job.")
                raise MeshFaultError(state.dead)
            raise MeshFaultError(msg + ". Every rank failed the same way, so the mesh is still in step; "
                                 "this call was not run. Fix: fix the cause and call again.")
        bad = {ranks[i]: x["err"] for i, x in enumerate(infos) if x["err"]}
        if bad:
            if local_err is not None:
                raise local_err
            r = min(bad)
            raise CallError(f"autocp: rank {r} rejected its inputs of this call, so no rank runs it: {bad[r]}")
        if state.check_inputs != "off":
            _compare([x["info"] for x in infos],
                     [("n", "N (token count)"), ("n_seq", "S (MSA rows)"),
                      ("inputs", "input shapes/dtypes"), ("values", "input values (float64 checksums)")]
                     if state.check_inputs == "hash" else
                     [("n", "N (token count)"), ("n_seq", "S (MSA rows)"), ("inputs", "input shapes/dtypes")],
                     f"call #{state.calls}", mesh)
    elif local_err is not None:
        raise local_err
    rng_split = None
    if mesh.control_group() is not None and state.check_inputs != "off":
        digests = [x["info"].get("rng") for x in infos]
        if len(set(digests)) > 1:
            rng_split = [sorted(mesh.ranks_flat)[i] for i, d in enumerate(digests) if d != digests[0]]
    try:
        out = call(*a, **kw, **extra)
    except BaseException as e:
        state.failed = _first_line(e)
        if mesh.p > 1 and isinstance(e, RuntimeError) and not isinstance(e, MeshFaultError) and is_peer_loss(str(e)):
            import torch.distributed as dist

            t = _timeout_str(mesh)
            raise MeshFaultError(
                f"autocp: rank {dist.get_rank()} waited in a collective inside the parallel forward (call "
                f"#{state.calls}) and lost its peer or gave up after {t}: {_first_line(e, 300)}. Another rank "
                f"probably failed, left or is slow; every rank reports the cause at its next call. Fix: look at the "
                f"other ranks' errors; raise autocp.init_mesh(timeout=...) if a rank is legitimately slow."
            ) from e
        raise
    # after a completed call (the mesh is in step). A warning, not an error: a draw whose
    # value cannot matter (Boltz draws its dropout masks at rate 0 too) is common
    if rng_split and rng_digest() != info.get("rng") and not state.rng_warned:
        import warnings

        state.rng_warned = True
        warnings.warn(
            f"autocp: the model drew random numbers in call #{state.calls} while the random generators of "
            f"rank(s) {rng_split} differed from rank {sorted(mesh.ranks_flat)[0]}'s (torch / python random / "
            f"numpy): every rank of the mesh holds the same sample, so any noise, augmentation or dropout mask "
            f"it drew differs per rank and the result is not the single-device one. Fix: seed identically on "
            f"every rank of the mesh before the call (torch.manual_seed(s); random.seed(s); numpy.random.seed(s)), "
            f"e.g. with the sample's seed, not the rank.", stacklevel=3)
    return out


def original_flags(model: nn.Module) -> dict:
    """``{path: training}`` of every submodule (for no-mutation checks)."""
    return {name: m.training for name, m in model.named_modules()}


def private_tree(model: nn.Module) -> nn.Module:
    """A copy of the module *tree* (new module objects; the same Parameter/buffer objects;
    own hook dicts and flags), so the parallel module's ``train()``/``eval()``, hooks and
    attribute changes never reach the caller's model. Parameters stay shared by design."""
    memo: dict = {}

    def rec(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = m.__class__.__new__(m.__class__)
        d = dict(m.__dict__)
        for k, v in list(d.items()):
            if k.endswith("hooks") or k.endswith("_hooks_with_kwargs") or k.endswith("hooks_always_called"):
                if isinstance(v, dict):
                    d[k] = type(v)(v) if not hasattr(v, "copy") else v.copy()
        d["_parameters"] = dict(m._parameters)
        d["_buffers"] = dict(m._buffers)
        if "_non_persistent_buffers_set" in d:
            d["_non_persistent_buffers_set"] = set(d["_non_persistent_buffers_set"])
        new.__dict__ = d
        memo[id(m)] = new
        new.__dict__["_modules"] = {k: (rec(c) if c is not None else None) for k, c in m._modules.items()}
        return new

    return rec(model)
