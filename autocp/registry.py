"""What the compiler knows how to parallelize: module rules (claims) and whole-model drivers.

Mirrors the kernel registry (:mod:`autocp.kernels.registry`): every entry has a
``checker`` and a ``priority``; the highest-priority entry whose checker accepts wins.

* **Module rules** (:func:`register_module`) match by module *class* (``isinstance``).
  During capture a registered module is opaque (one graph node carrying its path), and
  the rewrite replaces it with ``op_factory(module, mesh)``. The factory returns a module
  that is called exactly like the original one (same positional/keyword arguments) on
  local tiles; the global token count comes from :func:`autocp.passes.context.current_n`.
  A factory that returns an op with the autocp op contract
  ``op(z_tile, mask_tile, n_tokens=N)`` is adapted automatically (``call="pair"``).
* Everything no module rule claims is decided op by op by the sharding pass's one rule
  table (:mod:`autocp.passes.shard`), which recognises triangle multiplications and
  triangle attentions by structure in any spelling (no registration needed).

Each architecture's registrations live in a file of their own: the Boltz-1 / Boltz-2
classes in :mod:`autocp.models.boltz` (``register_boltz_defaults``, called lazily on first
lookup through :data:`DEFAULT_PROVIDERS`; boltz is optional), with their comm formulas and adapters.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = [
    "ModuleRule",
    "register_module",
    "lookup_module",
    "module_rules",
    "registry_version",
    "PairOpAdapter",
    "call_comm_formula",
    "ensure_defaults",
    "DEFAULT_PROVIDERS",
    "register_model",
    "lookup_model",
]


@dataclass
class ModuleRule:
    """How to parallelize instances of ``cls``.

    ``op_factory(module, mesh) -> nn.Module`` (or ``None``: no 2D op yet, the rewrite
    falls back to gather -> original -> re-shard); ``kind`` names the algorithm for the
    explain report (``"triangle_mult_out"``, ``"triangle_attn_start"``, ``"pair_bias_attn"``,
    ...); ``out_layouts(in_layouts) -> list`` gives the output layout tags (default:
    the first tensor input's); ``comm_bytes(n, p, channels, itemsize)`` the analytic
    per-rank communication volume of one call (for explain); ``call`` = ``"native"``
    (factory result takes the original arguments) or ``"pair"`` (op contract
    ``op(z, mask, n_tokens=N)``, adapted); ``arg_layouts``: ``{forward argument name: {dim:
    tag}}`` -- the layout the op needs for each tensor argument (``{1: "r", 2: "c"}`` a pair,
    ``{1: "r"}`` a token tensor), used to shard a whole (replicated) argument when the module
    is called from eager TileTensor code.
    """

    cls: type
    op_factory: Optional[Callable[[nn.Module, Any], nn.Module]]
    kind: str = "module"
    priority: int = 0
    checker: Callable[[nn.Module], Any] = field(default=lambda m: True)
    out_layouts: Optional[Callable] = None
    comm_bytes: Optional[Callable] = None
    call: str = "native"
    name: str = ""
    arg_layouts: Optional[dict] = None  # forward argument name -> {dim: tag} its op needs (eager calls)

    def check(self, module) -> Any:
        try:
            ok = self.checker(module)
        except Exception as e:  # noqa: BLE001 -- a checker that breaks rejects
            return f"checker raised {type(e).__name__}: {e}"
        return True if ok is True else (ok or "checker returned False")

    def build(self, module: nn.Module, mesh) -> Optional[nn.Module]:
        """The 2D replacement of ``module`` (``None`` when no op is available)."""
        if self.op_factory is None:
            return None
        op = self.op_factory(module, mesh)
        if op is None:
            return None
        if self.call == "pair":
            return PairOpAdapter(op, module)
        return op


_MODULES: list[ModuleRule] = []
_VERSION = [0]
_DEFAULTS_DONE = [False]


def registry_version() -> int:
    """Bumped on every registration (capture caches key on it)."""
    return _VERSION[0]


def register_module(
    cls: type,
    op_factory: Optional[Callable] = None,
    *,
    kind: str = "module",
    priority: int = 0,
    checker: Optional[Callable] = None,
    out_layouts: Optional[Callable] = None,
    comm_bytes: Optional[Callable] = None,
    call: str = "native",
    name: str = "",
    arg_layouts: Optional[dict] = None,
) -> ModuleRule:
    """Teach the compiler to replace every ``cls`` instance by ``op_factory(module, mesh)``.

    Re-registering the same ``(cls, name)`` replaces the earlier rule.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(
            f"register_module: given {cls!r}; required an nn.Module subclass. "
            f"Fix: pass the class (e.g. MyTriangleMult), not an instance."
        )
    if call not in ("native", "pair"):
        raise ValueError(f"register_module: call must be 'native' or 'pair', given {call!r}")
    rule = ModuleRule(
        cls=cls,
        op_factory=op_factory,
        kind=kind,
        priority=priority,
        checker=checker or (lambda m: True),
        out_layouts=out_layouts,
        comm_bytes=comm_bytes,
        call=call,
        name=name or f"{cls.__module__}.{cls.__qualname__}",
        arg_layouts=arg_layouts,
    )
    _MODULES[:] = [r for r in _MODULES if not (r.cls is cls and r.name == rule.name)]
    _MODULES.append(rule)
    _MODULES.sort(key=lambda r: -r.priority)
    _VERSION[0] += 1
    return rule


def module_rules() -> list[ModuleRule]:
    ensure_defaults()
    return list(_MODULES)


def lookup_module(module: nn.Module) -> Optional[ModuleRule]:
    """The highest-priority rule whose class matches ``module`` and whose checker accepts."""
    ensure_defaults()
    best = None
    for rule in _MODULES:
        if isinstance(module, rule.cls) and rule.check(module) is True:
            # the most specific class wins among equal priorities
            if best is None or (rule.priority == best.priority and issubclass(rule.cls, best.cls) and rule.cls is not best.cls):
                best = rule
            if best is not None and rule.priority < best.priority:
                break
    return best


# ----------------------------------------------------------------------------- adapters
class PairOpAdapter(nn.Module):
    """Calls an op with the autocp contract ``op(z, mask, n_tokens=N)`` from the original
    module's call ``module(x, mask=..., **ignored)``. Parameters stay the op's (which
    shares them with the original), so state_dict keys are the original's."""

    def __init__(self, op: nn.Module, original: nn.Module):
        super().__init__()
        self._names = []
        for name, child in op.named_children():
            self.add_module(name, child)
            self._names.append(name)
        for name, prm in op.named_parameters(recurse=False):
            self.register_parameter(name, prm)
        object.__setattr__(self, "op", op)
        # an op that recomputes its own activations (TriangleAttention2D): not checkpointed again
        self.recomputes_itself = bool(getattr(op, "recomputes_itself", False))
        try:
            self._sig = inspect.signature(original.forward)
        except (TypeError, ValueError):
            self._sig = None

    def forward(self, *args, **kwargs):
        from .passes.context import current_n

        if self._sig is not None:
            bound = self._sig.bind_partial(*args, **kwargs).arguments
            vals = list(bound.items())
        else:
            vals = [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items())
        tensors = [(k, v) for k, v in vals if isinstance(v, torch.Tensor)]
        if not tensors:
            raise TypeError("PairOpAdapter: the call has no tensor argument (the pair tile)")
        z = tensors[0][1]
        mask = None
        for k, v in tensors[1:]:
            if "mask" in k or len(tensors) == 2:
                mask = v
                break
        return self.op(z, mask, n_tokens=current_n())


# ----------------------------------------------------------------------------- comm formulas
# A rule's ``comm_bytes(module, *, p, r, c, n, batch, itemsize) -> int`` gives the bytes
# *sent* by rank ``(r, c)`` in one forward call of the 2D op that replaces ``module`` (the
# quantity :func:`autocp.comm.count_comm` counts), from the module's real widths / head
# counts, the global token count ``n``, the batch and the element size of the pair
# tensor's dtype. The Boltz formulas live with the Boltz registrations
# (:mod:`autocp.models.boltz`).
def call_comm_formula(fn, module, *, p, r, c, n, batch, itemsize, channels=0) -> int:
    """Evaluate a rule's comm formula; also accepts the older ``fn(n, p, channels, itemsize)``."""
    try:
        import inspect as _inspect

        params = list(_inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    if params and params[0] == "module":
        return int(fn(module, p=p, r=r, c=c, n=n, batch=batch, itemsize=itemsize))
    return int(fn(n, p, channels, itemsize))


_MODELS: dict = {}


def register_model(qualname: str, driver: str) -> None:
    """A whole-model driver: instances of the class named ``qualname``
    (``"module.Class"``, matched by name so the class is never imported here) are
    parallelized by ``driver`` (``"module:function"``, called as ``fn(model, mesh, **kw)``)
    instead of the capture pipeline -- for models whose top-level forward is host-side
    python no graph capture survives (Boltz: recycling / sampling loops, ``.item()``)."""
    _MODELS[qualname] = driver
    _VERSION[0] += 1


def lookup_model(model: nn.Module) -> Optional[Callable]:
    """The driver function registered for ``type(model)`` (or a base class), else None."""
    ensure_defaults()
    import importlib

    for cls in type(model).__mro__:
        entry = _MODELS.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            mod, fn = entry.split(":")
            return getattr(importlib.import_module(mod), fn)
    return None


#: The built-in registrations, loaded on first lookup as ``"module:function"`` entry points
#: (like setuptools entry points: this generic registry imports no architecture and no
#: compiler pass, so neither imports back into it in a circle).
DEFAULT_PROVIDERS = [
    "autocp.models.boltz:register_boltz_defaults",
]


def ensure_defaults() -> None:
    """Load the built-in registrations (:data:`DEFAULT_PROVIDERS`) once."""
    if not _DEFAULTS_DONE[0]:
        _DEFAULTS_DONE[0] = True
        import importlib

        for entry in DEFAULT_PROVIDERS:
            mod, fn = entry.split(":")
            getattr(importlib.import_module(mod), fn)()


def __getattr__(name):  # the Boltz names moved to autocp.models.boltz (kept importable from here)
    if name in ("register_boltz_defaults", "MSAModule2D", "NativeOpAdapter"):
        import importlib

        return getattr(importlib.import_module("autocp.models.boltz"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
