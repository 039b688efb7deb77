"""Boltz-1 / Boltz-2 registrations: the pairformer, MSA and attention layer classes bound
to autocp's 2D ops, their comm formulas, the native-call adapter and the Boltz-2
``MSAModule`` op. Registered lazily by :func:`autocp.registry.lookup_module` (boltz is an
optional dependency)."""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from ..registry import ModuleRule, register_module

__all__ = ["register_boltz_defaults", "NativeOpAdapter", "MSAModule2D"]


# ----------------------------------------------------------------------------- comm formulas
# A rule's ``comm_bytes(module, *, p, r, c, n, batch, itemsize) -> int`` gives the bytes
# *sent* by rank ``(r, c)`` in one forward call of the 2D op that replaces ``module`` (the
# quantity :func:`autocp.comm.count_comm` counts), from the module's real widths / head
# counts, the global token count ``n``, the batch and the element size of the pair
# tensor's dtype. The Boltz rules below evaluate the ops' own formulas.
def _tri_mult_comm(module, *, p, r, c, n, batch, itemsize):
    """:func:`autocp.ops.triangle_mult.trimul_comm_bytes` (Cannon; runs in fp32)."""
    from ..ops.triangle_mult import detect_direction, trimul_comm_bytes

    dim = module.p_in.in_features
    return trimul_comm_bytes(p, r, c, batch, -(-n // p), dim, detect_direction(module), "forward", itemsize=4)


def _tri_attn_comm(module, *, p, r, c, n, batch, itemsize):
    """:func:`autocp.ops.triangle_attn.comm_bytes` (forward: k/v + mask ring, bias ring)."""
    if p == 1:
        return 0
    from ..ops.triangle_attn import comm_bytes

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


# ----------------------------------------------------------------------------- Boltz defaults
_PAIR, _TOK, _MSA = {1: "r", 2: "c"}, {1: "r"}, {1: "s", 2: "c"}
#: the layouts each op takes, by the Boltz module's forward argument names
ARG_LAYOUTS = {
    "triangle": {"x": _PAIR, "mask": _PAIR},
    "pair_bias_attn": {"s": _TOK, "z": _PAIR, "mask": _TOK, "k_in": _TOK},
    "outer_product_mean": {"m": _MSA, "mask": _MSA},
    "pair_weighted_averaging": {"m": _MSA, "z": _PAIR, "mask": _PAIR},
    "msa_module": {"z": _PAIR, "emb": _TOK},
}
#: output layouts that differ from the first input's: the outer product mean of MsaTiles m is a pair
OUT_LAYOUTS = {"outer_product_mean": lambda in_layouts: [(None, "r", "c", None)]}

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


def register_boltz_defaults() -> list[ModuleRule]:
    """Register the Boltz-1/2 pairformer, MSA and attention layer classes (if boltz imports),
    and the whole-model driver of ``Boltz1`` / ``Boltz2`` (:mod:`autocp.models.boltz_e2e`)."""
    from ..registry import register_model

    for q in ("boltz.model.models.boltz2.Boltz2", "boltz.model.models.boltz1.Boltz1"):
        register_model(q, "autocp.models.boltz_e2e:parallelize_boltz")
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
    for cls, opmod, opcls, kind, comm in (
            (TriangleMultiplicationOutgoing, "triangle_mult", "TriangleMultiplication2D", "triangle_mult_out", _tri_mult_comm),
            (TriangleMultiplicationIncoming, "triangle_mult", "TriangleMultiplication2D", "triangle_mult_in", _tri_mult_comm),
            (TriangleAttentionStartingNode, "triangle_attn", "TriangleAttention2D", "triangle_attn_start", _tri_attn_comm),
            (TriangleAttentionEndingNode, "triangle_attn", "TriangleAttention2D", "triangle_attn_end", _tri_attn_comm)):
        rules.append(register_module(cls, _try_factory(opmod, opcls), kind=kind, call="pair",
                                     arg_layouts=ARG_LAYOUTS["triangle"], comm_bytes=comm))
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
            _MSAModuleV2, _msa_module_factory, kind="msa_module",
            comm_bytes=None, arg_layouts=ARG_LAYOUTS["msa_module"], name="boltz.model.modules.trunkv2.MSAModule"))
    except Exception:  # noqa: BLE001 -- boltz-2 missing in this install
        pass

    for modpath, clsname, kind, opmod, opcls in optional:
        try:
            cls = getattr(importlib.import_module(modpath), clsname)
        except Exception:  # noqa: BLE001
            continue
        comm = _pair_bias_comm if kind == "pair_bias_attn" else None
        rules.append(register_module(cls, _native_factory(opmod, opcls, kind), kind=kind, comm_bytes=comm,
                                     arg_layouts=ARG_LAYOUTS.get(kind), out_layouts=OUT_LAYOUTS.get(kind)))
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
        from ..passes.context import current

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
def _msa_module_factory(module, mesh):
    try:
        from ..ops.msa import MSALayer2D  # noqa: F401
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

    def __init__(self, module, mesh, reproduce_dropout: bool = False):
        super().__init__()
        from ..mesh import SquareMesh
        from ..ops.msa import MSALayer2D

        self.mesh = SquareMesh.from_any(mesh)
        self.s_proj = module.s_proj
        self.msa_proj = module.msa_proj
        # reproduce_dropout: dropout masks drawn at the global shape and sliced, so the
        # generator advances exactly as Boltz's (the end-to-end driver needs the same noise)
        self.layers = nn.ModuleList([MSALayer2D(layer, self.mesh, reproduce_dropout=reproduce_dropout)
                                     for layer in module.layers])
        self.use_paired_feature = module.use_paired_feature
        self.activation_checkpointing = module.activation_checkpointing
        self.subsample_msa = bool(getattr(module, "subsample_msa", False))
        self.num_subsampled_msa = int(getattr(module, "num_subsampled_msa", 1024))
        self.train(module.training)

    _MSA_KEYS = ("msa", "has_deletion", "deletion_value", "msa_paired", "msa_mask")

    def _subsample(self, feats: dict, n_seq: int) -> tuple:
        """Boltz's ``subsample_msa``: the same ``torch.randperm(S)[:k]`` draw as the original
        (every rank, the default generator), then every rank's rows ``S'_r`` of the kept rows:
        the MSA features are all-gathered over the mesh column (compact dtypes: O(S N / p)
        bytes, one time) and re-split. Returns ``(feats, k)``."""
        from ..passes.rewrite import gather_tags, shard_tags

        idx = torch.randperm(n_seq)[: self.num_subsampled_msa]
        out = dict(feats)
        tags = (None, "s", None)
        for key in self._MSA_KEYS:
            x = feats.get(key)
            if x is None:
                continue
            small = x.to(torch.uint8) if not x.is_floating_point() else x  # residue ids < 33, flags, mask
            full = gather_tags(small, tags, self.mesh, n=0, n_seq=n_seq)
            kept = full.index_select(1, idx.to(full.device))
            del full
            out[key] = shard_tags(kept, tags, self.mesh).to(x.dtype)
        return out, int(idx.numel())

    def forward(self, z, emb, feats, use_kernels: bool = False):
        from boltz.data import const

        from ..comm import transpose_exchange
        from ..passes.context import current

        ctx = current()
        n, n_seq = ctx.n, ctx.n_seq
        if n_seq is None:
            n_seq = int(feats["msa"].shape[1]) * self.mesh.p  # only used for padding masks
        if self.subsample_msa:
            feats, n_seq = self._subsample(feats, n_seq)
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
