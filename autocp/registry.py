"""What the compiler knows how to parallelize: module rules and structural patterns.

Mirrors the kernel registry (:mod:`autocp.kernels.registry`): every entry has a
``checker`` and a ``priority``; the highest-priority entry whose checker accepts wins.

* **Module rules** (:func:`register_module`) match by module *class* (``isinstance``).
  During capture a registered module is opaque (one graph node carrying its path), and
  the rewrite replaces it with ``op_factory(module, mesh)``. The factory returns a module
  that is called exactly like the original one (same positional/keyword arguments) on
  local tiles; the global token count comes from :func:`autocp.passes.context.current_n`.
  A factory that returns an op with the autocp op contract
  ``op(z_tile, mask_tile, n_tokens=N)`` is adapted automatically (``call="pair"``).
* **Patterns** (:func:`register_pattern`) match ATen subgraphs *structurally* (by what
  they compute, not by class or spelling), see :mod:`autocp.passes.match`.

The Boltz-1 / Boltz-2 classes are registered by :func:`register_boltz_defaults` (called
lazily on first lookup; boltz is optional).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = [
    "ModuleRule",
    "PatternRule",
    "register_module",
    "register_pattern",
    "lookup_module",
    "module_rules",
    "pattern_rules",
    "registry_version",
    "register_boltz_defaults",
    "PairOpAdapter",
    "MSAModule2D",
    "call_comm_formula",
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
    ``op(z, mask, n_tokens=N)``, adapted).
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


@dataclass
class PatternRule:
    """A structural rule: ``matcher(view, node) -> dict | None`` on the analysed ATen
    graph (``view`` is a :class:`autocp.passes.match.GraphView`). A dict return is a
    match: ``{"kind": ..., "nodes": [...], ...}``."""

    name: str
    matcher: Callable
    kind: str
    priority: int = 0
    op_factory: Optional[Callable] = None


_MODULES: list[ModuleRule] = []
_PATTERNS: list[PatternRule] = []
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
    )
    _MODULES[:] = [r for r in _MODULES if not (r.cls is cls and r.name == rule.name)]
    _MODULES.append(rule)
    _MODULES.sort(key=lambda r: -r.priority)
    _VERSION[0] += 1
    return rule


def register_pattern(
    name: str, matcher: Callable, *, kind: str, priority: int = 0, op_factory: Optional[Callable] = None
) -> PatternRule:
    """Add a structural rule (see :class:`PatternRule`); replaces one of the same name."""
    rule = PatternRule(name=name, matcher=matcher, kind=kind, priority=priority, op_factory=op_factory)
    _PATTERNS[:] = [r for r in _PATTERNS if r.name != name]
    _PATTERNS.append(rule)
    _PATTERNS.sort(key=lambda r: -r.priority)
    _VERSION[0] += 1
    return rule


def module_rules() -> list[ModuleRule]:
    _ensure_defaults()
    return list(_MODULES)


def pattern_rules() -> list[PatternRule]:
    _ensure_defaults()
    return list(_PATTERNS)


def lookup_module(module: nn.Module) -> Optional[ModuleRule]:
    """The highest-priority rule whose class matches ``module`` and whose checker accepts."""
    _ensure_defaults()
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
# tensor's dtype. The Boltz rules below evaluate the ops' own formulas.
def _tri_mult_comm(module, *, p, r, c, n, batch, itemsize):
    """:func:`autocp.ops.triangle_mult.trimul_comm_bytes` (Cannon; runs in fp32)."""
    from .ops.triangle_mult import _detect_direction, trimul_comm_bytes

    dim = module.p_in.in_features
    return trimul_comm_bytes(p, r, c, batch, -(-n // p), dim, _detect_direction(module), "forward", itemsize=4)


def _tri_attn_comm(module, *, p, r, c, n, batch, itemsize):
    """:func:`autocp.ops.triangle_attn.comm_bytes` (forward: k/v + mask ring, bias ring)."""
    if p == 1:
        return 0
    from .ops.triangle_attn import comm_bytes

    f = comm_bytes(p, r, c, batch=batch, b=-(-n // p), heads=module.mha.no_heads, head_dim=module.mha.c_hidden,
                   elem=itemsize, starting=bool(module.starting))
    return sum(f["fwd"].values())


def _pair_bias_comm(module, *, p, r, c, n, batch, itemsize):
    """:class:`autocp.ops.pair_bias_attn.AttentionPairBias2D` forward: k/v of block T_c by
    transpose exchange (``2 B b H D E``) and the fp32 key mask (``4 B b``), both only off the
    diagonal; the row merge all-gathers the fp32 partial output and LSE
    (``(p-1) B H b (D + 1) 4``)."""
    if p == 1:
        return 0
    b = -(-n // p)
    H, D = module.num_heads, module.head_dim
    off = int(r % p != c % p)
    return off * (2 * batch * b * H * D * itemsize + 4 * batch * b) + (p - 1) * batch * H * b * (D + 1) * 4


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


# ----------------------------------------------------------------------------- Boltz defaults
def _try_factory(modname: str, clsname: str, **kw):
    """Factory that builds ``autocp.ops.<modname>.<clsname>(module, mesh, **kw)`` when that op
    exists in this checkout, else ``None`` (the rewrite then gathers -> original -> shards)."""

    def factory(module, mesh):
        import importlib

        try:
            mod = importlib.import_module(f"autocp.ops.{modname}")
            cls = getattr(mod, clsname)
        except (ImportError, AttributeError):
            return None
        return cls(module, mesh, **kw)

    factory.__qualname__ = f"autocp.ops.{modname}.{clsname}"
    return factory


def _ensure_defaults() -> None:
    if not _DEFAULTS_DONE[0]:
        _DEFAULTS_DONE[0] = True
        register_boltz_defaults()
        from .passes import match as _match

        _match.register_default_patterns()


def register_boltz_defaults() -> list[ModuleRule]:
    """Register the Boltz-1/2 pairformer, MSA and attention layer classes (if boltz imports)."""
    rules = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from boltz.model.layers.triangular_attention.attention import (
                TriangleAttentionEndingNode,
                TriangleAttentionStartingNode,
            )
            from boltz.model.layers.triangular_mult import (
                TriangleMultiplicationIncoming,
                TriangleMultiplicationOutgoing,
            )
    except Exception:  # noqa: BLE001 -- boltz is optional
        return rules
    rules.append(register_module(
        TriangleMultiplicationOutgoing, _try_factory("triangle_mult", "TriangleMultiplication2D"),
        kind="triangle_mult_out", call="pair", comm_bytes=_tri_mult_comm))
    rules.append(register_module(
        TriangleMultiplicationIncoming, _try_factory("triangle_mult", "TriangleMultiplication2D"),
        kind="triangle_mult_in", call="pair", comm_bytes=_tri_mult_comm))
    rules.append(register_module(
        TriangleAttentionStartingNode, _try_factory("triangle_attn", "TriangleAttention2D"),
        kind="triangle_attn_start", call="pair", comm_bytes=_tri_attn_comm))
    rules.append(register_module(
        TriangleAttentionEndingNode, _try_factory("triangle_attn", "TriangleAttention2D"),
        kind="triangle_attn_end", call="pair", comm_bytes=_tri_attn_comm))
    optional = [
        ("boltz.model.layers.attentionv2", "AttentionPairBias", "pair_bias_attn", "pair_bias_attn", "AttentionPairBias2D"),
        ("boltz.model.layers.attention", "AttentionPairBias", "pair_bias_attn", "pair_bias_attn", "AttentionPairBias2D"),
        ("boltz.model.layers.outer_product_mean", "OuterProductMean", "outer_product_mean", "outer_product", "OuterProductMean2D"),
        ("boltz.model.layers.pair_averaging", "PairWeightedAveraging", "pair_weighted_averaging", "pair_averaging", "PairWeightedAveraging2D"),
        # tile-local (channel-wise), registered for memory: chunked over rows and recomputed in
        # backward instead of keeping its 4C hidden activations for the whole tile
        ("boltz.model.layers.transition", "Transition", "transition", "transition", "Transition2D"),
    ]
    import importlib

    try:
        from boltz.model.modules.trunkv2 import MSAModule as _MSAModuleV2

        rules.append(register_module(
            _MSAModuleV2, _msa_module_factory, kind="msa_module", checker=_msa_module_checker,
            comm_bytes=None, name="boltz.model.modules.trunkv2.MSAModule"))
    except Exception:  # noqa: BLE001 -- boltz-2 missing in this install
        pass

    for modpath, clsname, kind, opmod, opcls in optional:
        try:
            cls = getattr(importlib.import_module(modpath), clsname)
        except Exception:  # noqa: BLE001
            continue
        comm = _pair_bias_comm if kind == "pair_bias_attn" else None
        rules.append(register_module(cls, _native_factory(opmod, opcls, kind), kind=kind, comm_bytes=comm))
    return rules


def _native_factory(modname: str, clsname: str, kind: str):
    """Build ``autocp.ops.<modname>.<clsname>(module, mesh)`` (when it exists in this
    checkout) wrapped in an adapter that takes the Boltz module's own call arguments and
    adds the global sizes (``n_tokens``, ``n_seq``) from the tile context. ``None`` when
    the op is missing: the rewrite then uses the exact gather fallback."""

    def factory(module, mesh):
        import importlib

        try:
            cls = getattr(importlib.import_module(f"autocp.ops.{modname}"), clsname)
        except (ImportError, AttributeError):
            return None
        return NativeOpAdapter(cls(module, mesh), module, kind)

    factory.__qualname__ = f"autocp.ops.{modname}.{clsname}"
    return factory


class NativeOpAdapter(nn.Module):
    """Calls a 2D op whose arguments are named like the Boltz module's (``s, z, mask,
    k_in, multiplicity, m, chunk_size, ...``) plus ``n_tokens`` / ``n_seq`` keywords."""

    def __init__(self, op: nn.Module, original: nn.Module, kind: str):
        super().__init__()
        for name, child in op.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "op", op)
        self.kind = kind
        # an op that recomputes its own activations (Transition2D): the graph emit does not wrap it again
        self.recomputes_itself = bool(getattr(op, "recomputes_itself", False))
        self._sig = inspect.signature(original.forward)
        self._op_sig = inspect.signature(op.forward)

    def forward(self, *args, **kwargs):
        from .passes.context import current

        ctx = current()
        bound = dict(self._sig.bind(*args, **kwargs).arguments)
        params = self._op_sig.parameters
        call = {k: v for k, v in bound.items() if k in params}
        if "n_tokens" in params:
            call["n_tokens"] = ctx.n
        if "n_seq" in params:
            call["n_seq"] = ctx.n_seq
        return self.op(**call)


# ----------------------------------------------------------------------------- Boltz-2 MSAModule
def _msa_module_checker(module):
    if getattr(module, "subsample_msa", False):
        return ("subsample_msa=True draws a random subset of MSA rows (torch.randperm) on every call, "
                "which the 2D MSA tiles cannot reproduce; set subsample_msa=False (subsample the "
                "features before the call)")
    return True


def _msa_module_factory(module, mesh):
    try:
        from .ops.msa import MSALayer2D  # noqa: F401
    except ImportError:
        return None
    return MSAModule2D(module, mesh)


class MSAModule2D(nn.Module):
    """Boltz-2 ``MSAModule`` on 2D tiles, called exactly like the original
    ``forward(z, emb, feats, use_kernels=False)`` inside a parallel module's forward.

    Tiles on rank ``(r, c)`` (the default input layouts by shape): ``z`` Pair2D
    ``[B,b,b,C_z]``; ``emb`` RowToken ``[B,b,C_s]`` (block ``T_r``); the MSA features
    ``msa/has_deletion/deletion_value/msa_paired/msa_mask`` MsaTiles ``[B,S_b,b]``
    (rows ``S_r``, tokens ``T_c``); ``token_pad_mask`` RowToken ``[B,b]``.

    The embedding is tile-local once ``emb`` and ``token_pad_mask`` are in the column
    block ``T_c`` (one transpose exchange each, differentiable): ``m = msa_proj(features)
    + s_proj(emb[T_c])`` and the pair mask ``tok[T_r] x tok[T_c]``; then each ``MSALayer``
    runs as :class:`autocp.ops.msa.MSALayer2D` (pair-weighted averaging and outer product
    mean by ring, pair stack 2D). Parameters are the original's (state_dict keys equal).
    ``activation_checkpointing`` in training checkpoints each layer (non-reentrant).
    """

    def __init__(self, module, mesh):
        super().__init__()
        from .mesh import SquareMesh
        from .ops.msa import MSALayer2D

        self.mesh = SquareMesh.from_any(mesh)
        self.s_proj = module.s_proj
        self.msa_proj = module.msa_proj
        self.layers = nn.ModuleList([MSALayer2D(layer, self.mesh) for layer in module.layers])
        self.use_paired_feature = module.use_paired_feature
        self.activation_checkpointing = module.activation_checkpointing
        self.train(module.training)

    def forward(self, z, emb, feats, use_kernels: bool = False):
        from boltz.data import const

        from .comm import transpose_exchange
        from .passes.context import current

        ctx = current()
        n, n_seq = ctx.n, ctx.n_seq
        if n_seq is None:
            n_seq = int(feats["msa"].shape[1]) * self.mesh.p  # only used for padding masks
        msa = torch.nn.functional.one_hot(feats["msa"].long(), num_classes=const.num_tokens)
        parts = [msa, feats["has_deletion"].unsqueeze(-1), feats["deletion_value"].unsqueeze(-1)]
        if self.use_paired_feature:
            parts.append(feats["msa_paired"].unsqueeze(-1))
        m = self.msa_proj(torch.cat(parts, dim=-1))
        emb_c = transpose_exchange(emb, self.mesh)  # RowToken T_r -> ColToken T_c
        m = m + self.s_proj(emb_c).unsqueeze(1)
        tok_r = feats["token_pad_mask"].float()
        tok_c = transpose_exchange(tok_r, self.mesh)
        token_mask = tok_r[:, :, None] * tok_c[:, None, :]
        msa_mask = feats["msa_mask"]
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                import torch.utils.checkpoint as ckpt

                z, m = ckpt.checkpoint(layer, z, m, token_mask, msa_mask, n, n_seq, use_reentrant=False)
            else:
                z, m = layer(z, m, token_mask, msa_mask, n_tokens=n, n_seq=n_seq)
        return z
