"""The whole Boltz-1 / Boltz-2 model through autocp: trunk, templates, MSA, diffusion
sampling, confidence and affinity, on a ``p x p`` mesh.

Capture granularity (see docs/end_to_end.md): Boltz's own ``forward`` -- recycling loop,
sampling loop, ``.item()`` in the noise schedule, data-dependent ``if torch.any(...)``,
the ``torch.unique`` loop of ``compute_ptms`` inside its ``try`` -- stays python and runs
*unchanged* on :class:`autocp.passes.eager.TileTensor` features: every torch call on a
sharded tensor goes through the shard pass's rule table (tile-local, redistributed, a
distributed reduction / contraction, or an exact gathered fallback), and every registered
module (triangle updates and attentions, pair-bias attention, transitions, outer product
mean, pair-weighted averaging, the Boltz-2 MSA module) runs its 2D op on the tiles
(:class:`autocp.passes.eager.RegisteredOp`). No Boltz glue module is re-written by hand.

Feature layouts are declared by key (:data:`FEATURE_LAYOUTS`), never guessed from sizes:
token features ``[B, N, ...]`` RowToken, pair features ``[B, N, N, ...]`` Pair2D, MSA
features ``[B, S, N]`` MsaTiles, template features ``[B, T, N, ...]`` with the token dim on
the mesh rows, token<->atom maps with their token dim sharded; everything else (atom
features, constraints) replicated.

Random numbers: Boltz's own python draws its noise (initial coordinates, augmentation
rotations / translations, per-step eps) on every rank with the same calls as on one device;
random draws on sharded tensors (dropout masks) are made at the global shape and sliced
(``tile_ops.draw_global``); a registered 2D op runs with a forked generator and then
advances the real one exactly as the original module would have (its draws are recorded
once per call signature by a fake-tensor run of the original and replayed). So a fixed
seed gives the single-device numbers.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

__all__ = ["FEATURE_LAYOUTS", "FEATURE_LAYOUTS_V1", "INDEX_MAPS", "ROW_CHUNKED", "TRAINING_TARGETS", "feature_tags", "ParallelBoltz", "parallelize_boltz"]

_TOKEN = ("token_index", "residue_index", "asym_id", "entity_id", "sym_id", "mol_type", "token_pad_mask",
          "token_resolved_mask", "token_disto_mask", "res_type", "disto_center", "method_feature", "modified",
          "cyclic_period", "affinity_token_mask", "deletion_mean", "profile", "deletion_mean_affinity",
          "profile_affinity", "pocket_feature")
_PAIR = ("token_bonds", "type_bonds", "contact_conditioning", "contact_threshold", "disto_target")
_MSA = ("msa", "msa_paired", "deletion_value", "has_deletion", "msa_mask")
_TEMPLATE = ("template_restype", "template_frame_rot", "template_frame_t", "template_cb", "template_ca",
             "template_mask_cb", "template_mask_frame", "template_mask", "query_to_template", "visibility_ids",
             "frames_idx", "disto_coords_ensemble", "frame_resolved_mask")

#: feature key -> {dim: tag} (dims not listed are whole). Unknown keys are replicated.
FEATURE_LAYOUTS: dict = {}
FEATURE_LAYOUTS.update({k: {1: "r"} for k in _TOKEN})
FEATURE_LAYOUTS.update({k: {1: "r", 2: "c"} for k in _PAIR})
FEATURE_LAYOUTS.update({k: {1: "s", 2: "c"} for k in _MSA})
FEATURE_LAYOUTS.update({k: {2: "r"} for k in _TEMPLATE})
FEATURE_LAYOUTS.update({"atom_to_token": {2: "r"}, "token_to_rep_atom": {1: "r"}, "token_to_center_atom": {1: "r"}})


#: one-hot token <-> atom maps: held as indices (:class:`autocp.passes.index_map.IndexMap`),
#: not as ``M x N / p`` tiles, when they are one-hot (else tiled as FEATURE_LAYOUTS says)
INDEX_MAPS = ("atom_to_token", "token_to_rep_atom", "token_to_center_atom")

#: pair glue modules run on blocks of their tiles (:class:`autocp.passes.row_chunk.RowChunked`:
#: proven block-local by their sharded trace per call, else run op by op -- exact either way)
ROW_CHUNKED = ("ContactConditioning", "PairwiseConditioning", "RelativePositionEncoder")

#: training-only keys (``[N, N, 64]`` distogram target, ``[R, M]`` symmetry map): a prediction
#: drops them before its features are tiled (``autocp predict``, the whole-model estimate)
TRAINING_TARGETS = ("disto_target", "r_set_to_rep_atom")

#: Boltz-1 keys whose shapes differ from Boltz-2's
FEATURE_LAYOUTS_V1 = dict(FEATURE_LAYOUTS, frames_idx={1: "r"}, frame_resolved_mask={1: "r"},
                          disto_coords_ensemble={1: "r"})


def feature_tags(key: str, x: torch.Tensor, n: int, n_seq: Optional[int] = None, version: int = 2) -> tuple:
    """The layout tags of feature ``key`` (see :data:`FEATURE_LAYOUTS`); a declared token
    dim must have length ``n`` (an MSA dim ``n_seq``), else ``ValueError`` (no guessing)."""
    table = FEATURE_LAYOUTS_V1 if version == 1 else FEATURE_LAYOUTS
    tags = [None] * x.dim()
    for d, t in table.get(key, {}).items():
        want = n_seq if t == "s" else n
        if d >= x.dim() or int(x.shape[d]) != want:
            raise ValueError(
                f"autocp Boltz features: {key!r} has shape {tuple(x.shape)}; its layout {table[key]} needs dim {d} "
                f"of length {want} ({'MSA depth' if t == 's' else 'token count N'}). Fix: pass Boltz's featurizer "
                f"output for this model version (batch first), or correct FEATURE_LAYOUTS for this key.")
        tags[d] = t
    return tuple(tags)


def _msa_module_2d(module, mesh):
    from .boltz import MSAModule2D

    return MSAModule2D(module, mesh, reproduce_dropout=True)  # the single-device random stream


#: registered kinds built differently end to end (rule.kind -> build(module, mesh))
_BUILDERS = {"msa_module": _msa_module_2d}


def _z_cache(module, args, kwargs):
    """Boltz-1's inference cache (``use_inference_model_cache``): its AttentionPairBias
    stores ``proj_z(z)`` in ``model_cache`` on the first sampling step and is called with
    ``z=None`` afterwards. The 2D op takes the conditioned ``z`` tile instead: it is kept
    (one reference, no copy) in the cache and the per-layer bias is recomputed from it at
    every step -- one pair tile resident instead of one bias tile per layer."""
    import inspect

    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    a = bound.arguments
    cache = a.get("model_cache")
    if cache is None:
        return args, kwargs
    if a.get("z") is None and "autocp_z" in cache:
        a["z"] = cache["autocp_z"]
    elif a.get("z") is not None:
        cache["autocp_z"] = a["z"]
    return bound.args, bound.kwargs


_PREPARE = {"pair_bias_attn": _z_cache}


def _wrapper_base():
    from ..grad_sync import GradSyncMixin
    from ..passes.wrapper import ModuleWrapper

    class _Base(GradSyncMixin, ModuleWrapper):
        pass

    return _Base


class ParallelBoltz(_wrapper_base()):
    """A Boltz-1 / Boltz-2 model on a ``p x p`` mesh (same parameters and ``state_dict``
    keys). ``forward(feats, **boltz_kwargs, output="full")`` returns Boltz's output dict:
    whole tensors on every rank (``output="full"``) or :class:`TileTensor` for the sharded
    ones (``output="tiles"``: on rank ``(r, c)`` ``z`` holds ``z[T_r, T_c]``, ``s`` the
    block ``T_r``).

    ``token_bias`` (Boltz-2): ``"lazy"`` recomputes the diffusion token-transformer bias
    per layer from the held z tile instead of keeping ``[N, N, depth * heads]`` resident
    through sampling (:mod:`autocp.models.boltz_bias`); ``"resident"`` keeps Boltz's
    tensor; ``"auto"`` is lazy when that saves memory (``depth * heads > token_z``).

    Gradients (docs/training.md): what ``forward`` / ``apply`` return follows DTensor's
    convention (:mod:`autocp.tile_io`): a loss or any replicated value takes its true
    cotangent, the same on every rank (``loss.backward()``, no scaling), a ``TileTensor``
    the true cotangent of its tile; with grad sync (the default of
    :func:`autocp.parallelize`) parameter gradients are complete after backward."""

    def __init__(self, model: nn.Module, mesh, strict: bool = False, token_bias: str = "auto"):
        from ..passes.eager import RegisteredOp
        from ..passes.trace import find_registered, structural_clone

        from .boltz_atoms import AtomWindowOp, find_atom_modules
        from .boltz_bias import bind_lazy_bias

        atoms = find_atom_modules(model)  # atom encoders / decoders: split by atom windows
        rules = {path: rule for path, rule in find_registered(model).items()
                 if not any(path == a or path.startswith(a + ".") for a in atoms)}
        replace = {path: RegisteredOp(model.get_submodule(path), rule, mesh, build=_BUILDERS.get(rule.kind),
                                      prepare=_PREPARE.get(rule.kind))
                   for path, rule in rules.items() if not any(a.startswith(path + ".") for a in atoms)}
        replace.update({path: AtomWindowOp(m, mesh) for path, m in atoms.items()})
        lazy = bind_lazy_bias(model, mesh, token_bias)  # diffusion token-transformer bias: per layer, not resident
        replace.update(lazy)
        replace.update(_row_chunked(model, mesh, replace))
        clone = structural_clone(model, replace)
        super().__init__(clone, mesh)
        object.__setattr__(self, "_original_type", type(model))
        self.n_registered = len(replace)
        self.token_bias = "lazy" if lazy else "resident"
        self.version = 1 if type(model).__name__ == "Boltz1" else 2
        self.strict = strict

    def _sizes(self, feats: dict) -> tuple:
        """``(N, S)``: the token count from ``token_pad_mask``, the MSA depth from ``msa``."""
        if "token_pad_mask" not in feats:
            raise KeyError("ParallelBoltz: the feature dict has no 'token_pad_mask' (required: Boltz's featurizer "
                           "output, batch first). Fix: pass the dict Boltz's datamodule / featurizer produces.")
        n_seq = int(feats["msa"].shape[1]) if isinstance(feats.get("msa"), torch.Tensor) else None
        return int(feats["token_pad_mask"].shape[1]), n_seq

    def distribute_features(self, feats: dict) -> dict:
        """This rank's tiles of a whole feature dict (:data:`FEATURE_LAYOUTS`); pass the result
        to ``forward`` and drop the whole dict, so only the tiles (and the replicated atom
        features) stay resident. The one-hot token <-> atom maps (:data:`INDEX_MAPS`) are
        held as indices (:class:`~autocp.passes.index_map.IndexMap`: O(M), not O(M N / p))."""
        from ..passes.context import tile_context
        from ..passes.eager import TileTensor, distribute

        from ..passes.index_map import IndexMap, index_map_of

        n, n_seq = self._sizes(feats)
        out = {}
        with tile_context(self.mesh, n, n_seq):
            for k, v in feats.items():
                if not isinstance(v, torch.Tensor) or isinstance(v, (TileTensor, IndexMap)):
                    out[k] = v
                    continue
                tags = feature_tags(k, v, n, n_seq, self.version)
                m = index_map_of(v, tags) if k in INDEX_MAPS and v.dim() == 3 else None
                out[k] = m if m is not None else distribute(v, tags)
        return out

    def apply(self, fn, feats: dict, *args, strict: Optional[bool] = None, **kwargs) -> Any:
        """``fn(model, tiled_feats, *args, **kwargs)`` on this mesh: ``model`` is the 2D model
        (Boltz's class, its registered modules bound to their 2D ops), ``tiled_feats`` this
        rank's tiles of ``feats``; for a training step or a loss written against Boltz's API,
        e.g. ``loss = pm.apply(lambda m, b: m.training_step(b, 0), batch)``. A loss (the same
        on every rank) comes back as a plain tensor: ``loss.backward()`` on every rank gives
        the single-device parameter gradients (with grad sync; else their sum over the
        ranks, :func:`autocp.ops.common.sync_grads`). A returned ``TileTensor`` takes the
        true cotangent of its tile (replicated tiles: the same on every replica)."""
        from ..passes.context import tile_context
        from ..passes.eager import TileTensor, strict_mode

        n, n_seq = self._sizes(feats)
        tf = self.distribute_features(feats)
        with tile_context(self.mesh, n, n_seq), strict_mode(self.strict if strict is None else strict):
            out = _boundary(fn(self.inner, tf, *args, **kwargs), self.mesh, n, n_seq)
        if self.grad_reducer is not None and torch.is_grad_enabled():
            from torch.utils._pytree import tree_flatten

            self.grad_reducer.attach_output([x.local if isinstance(x, TileTensor) else x
                                             for x in tree_flatten(out)[0]])
        return out

    def forward(self, feats: dict, *args, output: str = "full", strict: Optional[bool] = None, **kwargs) -> Any:
        if output not in ("full", "tiles"):
            raise ValueError(f"ParallelBoltz: output={output!r}; required 'full' or 'tiles'.")

        def run(model, tf):  # the gather to whole tensors runs inside the tile context (TileTensor.full needs it)
            out = model(tf, *args, **kwargs)
            return _full(out) if output == "full" else out

        return self.apply(run, feats, strict=strict)


def _row_chunked(model, mesh, taken: dict) -> dict:
    """``{path: RowChunked}`` for the :data:`ROW_CHUNKED` modules not inside a ``taken``
    path; the ``taken`` replacements inside one (a registered transition) move into its
    clone (popped from ``taken``): they run when the module runs op by op."""
    from ..passes.row_chunk import RowChunked
    from ..passes.trace import structural_clone

    out = {}
    for path, m in model.named_modules():
        if not path or type(m).__name__ not in ROW_CHUNKED or any(path.startswith(t + ".") for t in taken):
            continue
        inner = {t[len(path) + 1:]: taken.pop(t) for t in list(taken) if t.startswith(path + ".")}
        out[path] = RowChunked(structural_clone(m, inner) if inner else m, mesh)
    return out


def _boundary(out, mesh, n, n_seq):
    """DTensor semantics on what ``apply`` returns (:func:`autocp.tile_io.to_partial`): plain
    tensors are replicated on every rank, a TileTensor's tile is replicated per its tags."""
    from torch.utils._pytree import tree_map

    from ..passes.eager import TileTensor
    from ..tile_io import to_partial

    def leaf(x):
        if isinstance(x, TileTensor):
            return TileTensor(to_partial(x.local, x.tags, mesh, n, n_seq, what="TileTensor"), x.tags, x.shape)
        if isinstance(x, torch.Tensor):
            return to_partial(x, None, mesh, what="tensor")
        return x

    return tree_map(leaf, out)


def _full(out):
    from torch.utils._pytree import tree_map

    from ..passes.eager import TileTensor

    return tree_map(lambda x: x.full() if isinstance(x, TileTensor) else x, out)


def parallelize_boltz(model: nn.Module, mesh, strict: bool = False, token_bias: str = "auto") -> ParallelBoltz:
    """The model driver :func:`autocp.parallelize` uses for ``Boltz1`` / ``Boltz2``
    (registered by :func:`autocp.models.boltz.register_boltz_defaults`)."""
    from ..mesh import SquareMesh

    return ParallelBoltz(model, SquareMesh.from_any(mesh), strict=strict, token_bias=token_bias)
