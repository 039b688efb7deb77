"""Boltz-1 / Boltz-2 atom modules with the atoms split over the whole mesh by windows
(:mod:`autocp.ops.atom_windows`), for the end-to-end driver (:mod:`autocp.models.boltz_e2e`).

The atom encoder, the atom attention encoder and decoder are the only places where Boltz
builds atom-pair tensors: ``p [B, K, W, H, atom_z]`` and the per-layer window biases
(``M x 128`` pairs each), and, through ``einsum("bijd,bwki,bwlj->bwkld")``, a
``[B, K, W, N, atom_z]`` temporary. Here each rank computes only its own windows:

* atom features are read on the rank's atoms plus a 48-atom halo (they are replicated);
* the atom-pair bias band ``z[token(q), token(k)]`` comes from the Pair2D tiles that hold
  it (:func:`~autocp.ops.atom_windows.band_gather`);
* Boltz's own ``AtomTransformer`` runs on the local windows; its ``to_keys`` is the halo
  exchange (:meth:`~autocp.ops.atom_windows.WindowPlan.halo_keys`), one edge all-gather
  per layer;
* token <-> atom maps use the atom -> token index (no dense ``[M, N]`` product).

``q``, ``c`` come back as atom tiles (tag ``"a"``), ``p`` and its projections as window
tiles (tag ``"w"``) -- the glue between the modules (Boltz-2's ``LayerNorm + Linear``
projections of ``p``, ``torch.cat``, ``.float()``) runs on them tile-locally
(:mod:`autocp.passes.eager`); coordinate updates come back whole (coordinates stay
replicated). The modules' own submodules and parameters are used unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.atom_windows import WindowPlan, atom_token_index, atoms_to_tokens, band_gather, tokens_to_atoms, window_keys
from ..passes.row_chunk import map_rows
from ..passes.wrapper import ModuleWrapper

__all__ = ["ATOM_MODULES", "AtomWindowOp", "find_atom_modules", "WindowKeys"]


class WindowKeys:
    """Stand-in for Boltz's ``to_keys`` partial (same values, no ``[2K, hK]`` indexing
    matrix) for any glue that calls it on a whole atom tensor."""

    def __init__(self, W: int, H: int):
        self.W, self.H = W, H

    def __call__(self, x):
        from ..passes.eager import TileTensor

        if isinstance(x, TileTensor):
            x = x.full()
        B, M, D = x.shape
        return window_keys(x, self.W, self.H).reshape(B, M // self.W, self.H, D)


# ----------------------------------------------------------------------------- argument helpers
def _ctx():
    from ..passes.context import current

    return current()


def _whole(x):
    from ..passes.eager import TileTensor

    return x.full() if isinstance(x, TileTensor) else x


def _atoms(x, plan: WindowPlan):
    """This rank's atoms ``[B, kb W, ...]`` of an atom tile (tag "a" on dim 1) or a whole tensor."""
    from ..passes.eager import TileTensor

    if isinstance(x, TileTensor):
        if x.tags[1:2] == ("a",) and all(t is None for i, t in enumerate(x.tags) if i != 1):
            return x.local
        x = x.full()
    return plan.local(x)


def _windows(x, plan: WindowPlan):
    from ..passes.eager import TileTensor

    if isinstance(x, TileTensor):
        if x.tags[1:2] == ("w",) and all(t is None for i, t in enumerate(x.tags) if i != 1):
            return x.local
        x = x.full()
    return plan.local_windows(x)


def _std_tile(x, want):
    """The tile of a token / pair tensor in the standard layout ``want``."""
    from ..passes import tile_ops as T
    from ..passes.eager import TileTensor
    from ..passes.rewrite import shard_tags

    if isinstance(x, TileTensor):
        return x.local if x.tags == want else T.convert(x.local, x.tags, want)
    return shard_tags(x, want, _ctx().mesh)


def _row(x):
    return _std_tile(x, (None, "r") + (None,) * (x.dim() - 2))


def _pair(x):
    return _std_tile(x, (None, "r", "c") + (None,) * (x.dim() - 3))


def _out_atoms(local, B, M):
    from ..passes.eager import TileTensor

    return TileTensor(local, (None, "a") + (None,) * (local.dim() - 2), (B, M) + tuple(local.shape[2:]))


def _out_windows(local, B, K):
    from ..passes.eager import TileTensor

    return TileTensor(local, (None, "w") + (None,) * (local.dim() - 2), (B, K) + tuple(local.shape[2:]))


def _out_row(local, n):
    from ..passes.eager import TileTensor

    return TileTensor(local, (None, "r") + (None,) * (local.dim() - 2), (local.shape[0], n) + tuple(local.shape[2:]))


def _index(feats, mesh, n):
    """The replicated atom -> token index ``[B, M]`` (cached on the feature tile)."""
    from ..passes.eager import TileTensor

    from ..passes.index_map import IndexMap

    a2t = feats["atom_to_token"]
    if isinstance(a2t, IndexMap):  # already the index
        return a2t.idx
    cached = getattr(a2t, "_autocp_atom_index", None)
    if cached is not None:
        return cached
    if isinstance(a2t, TileTensor):
        idx = atom_token_index(_std_tile(a2t, (None, None, "r")), mesh, n)
    else:
        nz = a2t != 0
        idx = torch.where(nz.any(-1), nz.to(torch.int8).argmax(-1), -1).to(torch.int64)
    try:
        a2t._autocp_atom_index = idx
    except (AttributeError, RuntimeError):
        pass
    return idx


def _token_weights(idx, n):
    """``1 / (atoms of the atom's token + 1e-6)`` per atom (Boltz's ``atom_to_token_mean``)."""
    valid = idx >= 0
    cnt = torch.zeros(idx.shape[0], n, dtype=torch.float32, device=idx.device).scatter_add(1, idx.clamp(min=0), valid.float())
    return 1.0 / (torch.gather(cnt, 1, idx.clamp(min=0)) + 1e-6)


def _plan(feats, W, H):
    ctx = _ctx()
    M = int(feats["ref_pos"].shape[1])
    return WindowPlan(ctx.mesh, M, W, H), ctx


# ----------------------------------------------------------------------------- the encoders' atom pair part
def _encode(enc, feats, s_trunk, z, v1: bool):
    """Boltz's atom encoder on the local windows: ``(q, c)`` of the local atoms, ``p`` of the
    local windows (see the module doc). ``enc``: a Boltz-2 ``AtomEncoder`` or a Boltz-1
    ``AtomAttentionEncoder`` (same submodule names)."""
    W, H = enc.atoms_per_window_queries, enc.atoms_per_window_keys
    plan, ctx = _plan(feats, W, H)
    mesh, n = ctx.mesh, ctx.n
    kb, h, na = plan.kb, plan.h, plan.na
    ref_pos = _whole(feats["ref_pos"])
    B, M = ref_pos.shape[:2]
    idx = _index(feats, mesh, n)
    atom_mask = _whole(feats["atom_pad_mask"]).bool()
    uid = _whole(feats["ref_space_uid"])
    E = plan.ext
    parts = [E(ref_pos), E(_whole(feats["ref_charge"]).unsqueeze(-1))]
    if v1:
        parts.append(E(_whole(feats["atom_pad_mask"]).unsqueeze(-1)))
    parts.append(E(_whole(feats["ref_element"])))
    if v1 or not enc.use_no_atom_char:
        parts.append(E(_whole(feats["ref_atom_name_chars"]).reshape(B, M, 4 * 64)))
    if not v1 and enc.use_atom_backbone_feat:
        parts.append(E(_whole(feats["atom_backbone_feat"])))
    idx_ext = E(idx + 1) - 1
    if not v1 and enc.use_residue_feats_atoms:
        res = torch.cat([feats["res_type"], feats["modified"].unsqueeze(-1),
                         torch.nn.functional.one_hot(feats["mol_type"], num_classes=4).float()], dim=-1)
        parts.append(tokens_to_atoms(_row(res).float(), mesh, n, idx_ext))
    inside = (torch.arange(na + 2 * h, device=ref_pos.device) + plan.a0 - h)
    inside = ((inside >= 0) & (inside < M)).view(1, -1, 1)
    c_ext = enc.embed_atom_features(torch.cat(parts, dim=-1))
    pos_q = plan.local(ref_pos).view(B, kb, W, 1, 3)
    pos_k = plan.keys(E(ref_pos)).reshape(B, kb, 1, H, 3)
    d = pos_k - pos_q
    d_norm = 1 / (1 + torch.sum(d * d, dim=-1, keepdim=True))
    mask_q = plan.local(atom_mask).view(B, kb, W, 1)
    mask_k = plan.keys(E(atom_mask.unsqueeze(-1).float())).reshape(B, kb, 1, H).bool()
    uid_q = plan.local(uid).view(B, kb, W, 1)
    uid_k = plan.keys(E(uid.unsqueeze(-1).float())).reshape(B, kb, 1, H).long()
    v = (mask_q & mask_k & (uid_q == uid_k)).float().unsqueeze(-1)
    p = enc.embed_atompair_ref_pos(d) * v
    p = p + enc.embed_atompair_ref_dist(d_norm) * v
    p = p + enc.embed_atompair_mask(v) * v
    q = c_ext[:, h:h + na]
    if enc.structure_prediction:
        s_to_c = enc.s_to_c_trans(_row(s_trunk).float())
        c_ext = c_ext + tokens_to_atoms(s_to_c, mesh, n, idx_ext).to(c_ext)
        z_to_p = map_rows(lambda blk: enc.z_to_p_trans(blk.float()), _pair(z))  # LN + Linear per entry
        p = p + band_gather(z_to_p, idx, plan, n).to(p)
    c_ext = c_ext * inside.to(c_ext.dtype)  # Boltz's keys outside [0, M) are zero
    c = c_ext[:, h:h + na]
    p = p + enc.c_to_p_trans_q(c.reshape(B, kb, W, 1, c.shape[-1]))
    p = p + enc.c_to_p_trans_k(plan.keys(c_ext).reshape(B, kb, 1, H, c.shape[-1]))
    p = p + enc.p_mlp(p)
    return plan, q, c, p


def _aggregate(mod, q, feats, plan, multiplicity):
    """``a = atom_to_token_mean^T @ atom_to_token_trans(q)`` -> RowToken tile."""
    ctx = _ctx()
    idx = _index(feats, ctx.mesh, ctx.n)
    w = plan.local(_token_weights(idx, ctx.n)).repeat_interleave(multiplicity, 0)
    idx_l = (plan.local(idx + 1) - 1).repeat_interleave(multiplicity, 0)
    q_to_a = mod.atom_to_token_trans(q).float()
    return _out_row(atoms_to_tokens(q_to_a, idx_l, w, ctx.mesh, ctx.n).to(q), ctx.n)


def _broadcast(a_to_q_trans, a, feats, plan, multiplicity):
    """``atom_to_token @ a_to_q_trans(a)`` on the local atoms."""
    ctx = _ctx()
    idx = _index(feats, ctx.mesh, ctx.n)
    idx_l = (plan.local(idx + 1) - 1).repeat_interleave(multiplicity, 0)
    return tokens_to_atoms(a_to_q_trans(_row(a).float()), ctx.mesh, ctx.n, idx_l)


# ----------------------------------------------------------------------------- Boltz-2
def atom_encoder_v2(enc, feats, s_trunk=None, z=None):
    plan, q, c, p = _encode(enc, feats, s_trunk, z, v1=False)
    B = q.shape[0]
    return (_out_atoms(q, B, plan.M), _out_atoms(c, B, plan.M), _out_windows(p, B, plan.K),
            WindowKeys(plan.W, plan.H))


def atom_attention_encoder_v2(mod, feats, q, c, atom_enc_bias, to_keys, r=None, multiplicity=1):
    tr = mod.atom_encoder
    plan, _ = _plan(feats, tr.attn_window_queries, tr.attn_window_keys)
    ql, cl = _atoms(q, plan), _atoms(c, plan)
    if mod.structure_prediction:
        ql = ql.repeat_interleave(multiplicity, 0) + mod.r_to_q_trans(plan.local(_whole(r)))
    cl = cl.repeat_interleave(multiplicity, 0)
    mask = plan.local(_whole(feats["atom_pad_mask"]).bool()).repeat_interleave(multiplicity, 0)
    ql = tr(q=ql, mask=mask, c=cl, bias=_windows(atom_enc_bias, plan), multiplicity=multiplicity,
            to_keys=plan.halo_keys)
    a = _aggregate(mod, ql, feats, plan, multiplicity)
    B = ql.shape[0]
    return a, _out_atoms(ql, B, plan.M), _out_atoms(cl, B, plan.M), to_keys


def atom_attention_decoder_v2(mod, a, q, c, atom_dec_bias, feats, to_keys, multiplicity=1):
    tr = mod.atom_decoder
    plan, _ = _plan(feats, tr.attn_window_queries, tr.attn_window_keys)
    ql = _atoms(q, plan)
    ql = ql + _broadcast(mod.a_to_q_trans, a, feats, plan, multiplicity).to(ql)
    mask = plan.local(_whole(feats["atom_pad_mask"])).repeat_interleave(multiplicity, 0)
    ql = tr(q=ql, mask=mask, c=_atoms(c, plan), bias=_windows(atom_dec_bias, plan), multiplicity=multiplicity,
            to_keys=plan.halo_keys)
    return plan.gather_atoms(mod.atom_feat_to_atom_pos_update(ql))


# ----------------------------------------------------------------------------- Boltz-1
def atom_attention_encoder_v1(mod, feats, s_trunk=None, z=None, r=None, multiplicity=1, model_cache=None):
    layer_cache = None
    if model_cache is not None:
        layer_cache = model_cache.setdefault("atomencoder", {})
    if model_cache is None or len(layer_cache) == 0:
        plan, q, c, p = _encode(mod, feats, s_trunk, z, v1=True)
        if model_cache is not None:
            layer_cache.update(q=q, c=c, p=p, plan=plan)
    else:
        q, c, p, plan = (layer_cache[k] for k in ("q", "c", "p", "plan"))
    B = q.shape[0]
    if mod.structure_prediction:
        q = q.repeat_interleave(multiplicity, 0)
        rl = plan.local(_whole(r))
        q = q + mod.r_to_q_trans(torch.cat([rl, torch.zeros(rl.shape[0], rl.shape[1], 7).to(rl)], dim=-1))
    c = c.repeat_interleave(multiplicity, 0)
    mask = plan.local(_whole(feats["atom_pad_mask"]).bool()).repeat_interleave(multiplicity, 0)
    q = mod.atom_encoder(q=q, mask=mask, c=c, p=p, multiplicity=multiplicity, to_keys=plan.halo_keys,
                         model_cache=layer_cache)
    a = _aggregate(mod, q, feats, plan, multiplicity)
    Bq = q.shape[0]
    return (a, _out_atoms(q, Bq, plan.M), _out_atoms(c, Bq, plan.M), _out_windows(p, B, plan.K),
            WindowKeys(plan.W, plan.H))


def atom_attention_decoder_v1(mod, a, q, c, p, feats, to_keys, multiplicity=1, model_cache=None):
    tr = mod.atom_decoder
    plan, _ = _plan(feats, tr.attn_window_queries, tr.attn_window_keys)
    ql = _atoms(q, plan) + _broadcast(mod.a_to_q_trans, a, feats, plan, multiplicity)
    mask = plan.local(_whole(feats["atom_pad_mask"])).repeat_interleave(multiplicity, 0)
    layer_cache = None
    if model_cache is not None:
        layer_cache = model_cache.setdefault("atomdecoder", {})
    ql = tr(q=ql, mask=mask, c=_atoms(c, plan), p=_windows(p, plan), multiplicity=multiplicity,
            to_keys=plan.halo_keys, model_cache=layer_cache)
    return plan.gather_atoms(mod.atom_feat_to_atom_pos_update(ql))


#: Boltz class (module.qualname) -> its window-split implementation ``impl(module, *args, **kwargs)``
ATOM_MODULES = {
    "boltz.model.modules.encodersv2.AtomEncoder": atom_encoder_v2,
    "boltz.model.modules.encodersv2.AtomAttentionEncoder": atom_attention_encoder_v2,
    "boltz.model.modules.encodersv2.AtomAttentionDecoder": atom_attention_decoder_v2,
    "boltz.model.modules.encoders.AtomAttentionEncoder": atom_attention_encoder_v1,
    "boltz.model.modules.encoders.AtomAttentionDecoder": atom_attention_decoder_v1,
}


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def find_atom_modules(model: nn.Module) -> dict:
    """``{path: module}`` of the outermost Boltz atom modules of :data:`ATOM_MODULES`."""
    found = {}

    def rec(mod, prefix):
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if _qualname(child) in ATOM_MODULES:
                found[path] = child
            else:
                rec(child, path)

    rec(model, "")
    return found


class AtomWindowOp(ModuleWrapper):
    """A Boltz atom module called from eager TileTensor code, run on this rank's atom
    windows (see the module doc); outside a tile context (no TileTensor argument) the
    module itself. Same parameters and ``state_dict`` keys as the module."""

    def __init__(self, module: nn.Module, mesh):
        super().__init__(module, mesh)
        object.__setattr__(self, "impl", ATOM_MODULES[_qualname(module)])

    def forward(self, *args, **kwargs):
        from torch.utils._pytree import tree_flatten

        from ..passes.eager import TileTensor

        if not any(isinstance(a, TileTensor) for a in tree_flatten((args, kwargs))[0]):
            return self.inner(*args, **kwargs)
        return self.impl(self.inner, *args, **kwargs)
