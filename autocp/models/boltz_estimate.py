"""Per-rank peak memory of the **whole** Boltz-2 (or Boltz-1) prediction on a ``p x p`` mesh,
from one simulated rank: nothing of size is allocated.

What runs is the real program: Boltz's own ``forward`` (recycling loop, MSA module,
templates, 64 Pairformer blocks, distogram, diffusion conditioning, every sampling step of
every batch of samples, confidence with its Pairformer and PAE/PDE heads, optionally
affinity) through :class:`autocp.models.boltz_e2e.ParallelBoltz` -- every registered 2D op,
atom-window op and rule of the eager engine -- as rank ``(0, 1)`` of a simulated mesh
(:func:`autocp.comm.simulate`: every collective allocates its receive buffers, nothing
moves). Parameters are fake (the model is built on the meta device); features are this
rank's tiles as the prediction holds them (:meth:`ParallelBoltz.distribute_features`):
large ones fake, small index-like ones (masks, chain ids, residue types, the atom -> token
index) real, so Boltz's data-dependent python follows a real complex
(:class:`autocp.passes.estimate.RunTracker`).

Feature shapes at N tokens / M atoms / S MSA rows are scaled from the featurizer output
of a small complex (:func:`autocp.models.boltz_full.make_features`), so every key, dtype
and layout is Boltz's own. Training-only keys (``disto_target``, ``r_set_to_rep_atom``)
are dropped as ``autocp predict`` drops them.

    from autocp.models.boltz_estimate import estimate_boltz
    e = estimate_boltz(n_tokens=30000, p=8, dtype=torch.bfloat16)
    print(e.table())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["released_boltz2_config", "PredictShape", "synthetic_features", "estimate_boltz", "measure_boltz",
           "INFERENCE_DROP"]

#: keys a prediction does not need (training targets): dropped before the features are tiled
#: (the same list ``autocp predict`` drops)
from .boltz_e2e import TRAINING_TARGETS as INFERENCE_DROP  # noqa: E402


def released_boltz2_config(**overrides) -> dict:
    """``Boltz2`` constructor kwargs at the released widths and the depths ``boltz predict``
    forces at load (``boltz/main.py``: ``PairformerArgsV2`` 64 blocks x 16 heads,
    ``MSAModuleArgs`` msa_s 64, 4 blocks, subsampled to 1024 rows), the rest from
    ``scripts/train/configs/structurev2.yaml`` (token_s 384, token_z 128, atom_s 128,
    atom_z 16; templates 64 wide, 2 blocks; the score model: 24 token-transformer layers x
    16 heads, atom encoder / decoder 3 layers x 4 heads, Fourier 256, 2 conditioning
    transitions). Assumed (not in either file): the confidence Pairformer with 8 blocks
    x 16 heads (its widths are the trunk's; the depth changes the parameters, not the peak)
    and the affinity module with 4 Pairformer blocks; ``affinity_prediction`` off by default
    (on only when the input asks for an affinity)."""
    from .boltz_full import tiny_boltz2_config

    pair = {"pairwise_head_width": 32, "pairwise_num_heads": 4, "dropout": 0.0, "activation_checkpointing": False}
    cfg = tiny_boltz2_config(
        atom_s=128, atom_z=16, token_s=384, token_z=128,
        embedder_args={"atom_encoder_depth": 3, "atom_encoder_heads": 4},
        msa_args={"msa_s": 64, "msa_blocks": 4, "pairwise_head_width": 32, "pairwise_num_heads": 4,
                  "subsample_msa": True, "num_subsampled_msa": 1024, "use_paired_feature": True},
        pairformer_args={"num_blocks": 64, "num_heads": 16, "v2": True, **pair},
        score_model_args={"dim_fourier": 256, "atom_encoder_depth": 3, "atom_encoder_heads": 4,
                          "token_transformer_depth": 24, "token_transformer_heads": 16, "atom_decoder_depth": 3,
                          "atom_decoder_heads": 4, "conditioning_transition_layers": 2},
        template_args={"template_dim": 64, "template_blocks": 2, "pairwise_head_width": 32, "pairwise_num_heads": 4},
        confidence_model_args={"pairformer_args": {"num_blocks": 8, "num_heads": 16, **pair}},
        affinity_model_args={"pairformer_args": {"num_blocks": 4, **pair},
                             "transformer_args": {"token_s": 384, "num_blocks": 4, "num_heads": 16}},
        affinity_prediction=False,
    )
    from .boltz_full import merge_config

    return merge_config(cfg, overrides)


@dataclass
class PredictShape:
    """The prediction a whole-model estimate runs: sizes and ``boltz predict``'s loop flags
    (defaults: ``boltz predict``'s own -- 3 recycling steps, 200 sampling steps, 1 sample,
    at most 5 in parallel; 8192 MSA rows, the model subsamples 1024; one template slot).
    ``n_atoms`` defaults to 9 atoms per token (a protein complex)."""

    n_tokens: int
    n_atoms: Optional[int] = None
    msa_rows: int = 8192
    n_templates: int = 1
    recycling_steps: int = 3
    sampling_steps: int = 200
    diffusion_samples: int = 1
    max_parallel_samples: int = 5

    def atoms(self) -> int:
        m = self.n_atoms if self.n_atoms is not None else 9 * self.n_tokens
        return -(-int(m) // 32) * 32  # Boltz pads atoms to whole windows of 32




def _template(version: int, n_templates: int):
    from .boltz_full import make_features

    n0, s0 = 40, 5
    f = make_features(n0, seed=0, version=version, msa_depth=s0, n_templates=max(n_templates, 1), affinity=True)
    return f, n0, int(f["atom_pad_mask"].shape[1]), s0


def synthetic_features(shape: PredictShape, fake_mode, *, version: int = 2, real_limit: int = 1 << 24) -> dict:
    """A whole Boltz feature dict at ``shape``'s sizes: every key, dtype and dim of Boltz's
    featurizer output (scaled from a 40-token complex: token dims to N, atom dims to M, MSA
    rows to S). Floating tensors and tensors of more than ``real_limit`` elements are fake
    (``fake_mode``); the rest (ids, flags, integer masks) are real, their values tiled from
    the small complex (so chain ids and residue types look like a complex's). The dense
    token <-> atom maps come out fake at scale; :func:`estimate_boltz` replaces them by the
    index maps a real complex has (atom ``m`` on token ``m N // M``)."""
    from .boltz_e2e import FEATURE_LAYOUTS

    msa_keys = {k for k, dims in FEATURE_LAYOUTS.items() if dims.get(1) == "s"}  # [B, S, N] MSA features
    f0, n0, m0, s0 = _template(version, shape.n_templates)
    n, m, s = int(shape.n_tokens), shape.atoms(), int(shape.msa_rows)
    out: dict[str, Any] = {}
    for k, v in f0.items():
        if k in INFERENCE_DROP:
            continue
        if not isinstance(v, torch.Tensor):
            out[k] = v
            continue
        new = list(v.shape)
        for d, size in enumerate(v.shape):
            if d == 0:
                continue
            if k in msa_keys and d == 1 and size == s0:
                new[d] = s
            elif size == n0:
                new[d] = n
            elif size == m0:
                new[d] = m
        if math.prod(new) > real_limit or v.is_floating_point():  # values steer python only via ids / flags
            with fake_mode:
                out[k] = torch.zeros(new, dtype=v.dtype)
            continue
        x = v
        for d, want in enumerate(new):
            if want != x.shape[d]:
                reps = [1] * x.dim()
                reps[d] = -(-want // x.shape[d])
                x = x.repeat(*reps).narrow(d, 0, want)
        out[k] = x.clone(memory_format=torch.contiguous_format)  # its own storage, not the repeat buffer
    for k in ("token_pad_mask", "atom_pad_mask", "msa_mask", "token_resolved_mask", "atom_resolved_mask"):
        if isinstance(out.get(k), torch.Tensor) and not _is_fake(out[k]):
            out[k] = torch.ones_like(out[k])  # no padding: every token / atom / row real
    return out


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _fake_model(cfg: dict, fake_mode, version: int = 2):
    """``Boltz2(**cfg)`` with fake parameters (built on the meta device, no weights drawn)."""
    from .boltz_full import BoltzArgs, import_boltz_models

    boltz1, boltz2 = import_boltz_models()
    cls = boltz2 if version == 2 else boltz1
    with torch.device("meta"):
        model = cls(**cfg)
    with fake_mode:
        model = model.to_empty(device="cpu")
    for name in ("training_args", "validation_args"):
        if isinstance(getattr(model, name, None), dict):
            setattr(model, name, BoltzArgs(getattr(model, name)))
    return model.eval()


def _index_maps(dense: dict, n: int, m: int) -> dict:
    """The one-hot token <-> atom maps as a real complex has them (atoms in token order, ``M / N``
    per token), held as indices exactly as :meth:`ParallelBoltz.distribute_features` holds them."""
    from ..passes.index_map import IndexMap
    from .boltz_e2e import FEATURE_LAYOUTS, INDEX_MAPS

    atom_tok = torch.arange(m) * n // m             # token of each atom
    first = torch.searchsorted(atom_tok, torch.arange(n))  # first atom of each token
    out = {}
    for key in INDEX_MAPS:
        v = dense.get(key)
        if v is None:
            continue
        tags = [None] * 3
        for d, t in FEATURE_LAYOUTS[key].items():
            tags[d] = t
        idx = atom_tok if key == "atom_to_token" else first
        out[key] = IndexMap(idx.unsqueeze(0).expand(v.shape[0], -1).contiguous(), v.shape[2], v.dtype, tags)
    return out


def _step_methods(model) -> list:
    """One sampling step's network call (``AtomDiffusion.preconditioned_network_forward``)."""
    sm = getattr(model, "structure_module", None)
    return [(sm, "preconditioned_network_forward")] if hasattr(sm, "preconditioned_network_forward") else []


def estimate_boltz(
    n_tokens: int = 0,
    p: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    *,
    shape: Optional[PredictShape] = None,
    config: Optional[dict] = None,
    version: int = 2,
    replay: bool = True,
):
    """Per-rank peak bytes of the whole prediction on a ``p x p`` mesh (rank ``(0, 1)``):
    an :class:`autocp.passes.estimate.Estimate` with ``per_module`` holding the peak while
    each top-level Boltz module ran (``structure_module`` covers the whole sampling loop).

    ``shape``: a :class:`PredictShape` (default ``PredictShape(n_tokens)``); ``config``:
    ``Boltz2`` kwargs (default :func:`released_boltz2_config`; the model is built with fake
    parameters). ``dtype`` bf16 / fp16: Boltz's ``bf16-mixed`` (fp32 weights under
    ``torch.autocast``, CPU autocast rules); fp32: as is. ``replay``: repeated layers (64
    Pairformer blocks, transformer layers, every sampling step's network call) run twice per
    input signature, then their recorded peak is charged (the same figure, minutes less)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .. import comm
    from ..mesh import MeshError, SquareMesh
    from ..passes.estimate import Estimate, RunTracker, estimate_call
    from .boltz_e2e import ParallelBoltz

    shape = shape or PredictShape(int(n_tokens))
    n = int(shape.n_tokens)
    if n < 1 or not isinstance(p, int) or p < 1:
        raise MeshError(f"estimate_boltz: given n_tokens={n}, p={p!r}; required N >= 1 and a positive int p. "
                        f"Fix: estimate_boltz(n_tokens=30000, p=8).")
    if n < p:
        raise MeshError(f"estimate_boltz: N={n} is smaller than the mesh side p={p}. Fix: use p <= N.")
    fm = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake_model(config if config is not None else released_boltz2_config(), fm, version)
    params_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    tracker = RunTracker(fm)
    sim = SquareMesh.simulated(p, (0, 1) if p > 1 else (0, 0))
    pm = ParallelBoltz(model, sim)
    feats = synthetic_features(shape, fm, version=version)
    from .boltz_e2e import INDEX_MAPS

    maps = {k: feats.pop(k) for k in INDEX_MAPS if k in feats}  # (fake) dense maps: only their shapes are used
    tiles = pm.distribute_features(feats)
    del feats
    tiles.update(_index_maps(maps, n, shape.atoms()))
    from ..passes.index_map import IndexMap

    for v in tiles.values():
        if isinstance(v, IndexMap):
            tracker.add(v.idx)
        elif isinstance(v, torch.Tensor):
            tracker.add(getattr(v, "local", v))
    for q in [*model.parameters(), *model.buffers()]:
        tracker.ignore(q)
    low = dtype in (torch.bfloat16, torch.float16)
    watch = {name: mod for name, mod in pm.inner.named_children()}
    from ..passes.eager import RegisteredOp

    for mod in pm.inner.modules():  # build the 2D ops now, so their repeated layers are replayed too
        if isinstance(mod, RegisteredOp):
            mod.op()

    def run(mdl, b):
        out = mdl(b, recycling_steps=shape.recycling_steps, num_sampling_steps=shape.sampling_steps,
                  diffusion_samples=shape.diffusion_samples, max_parallel_samples=shape.max_parallel_samples,
                  run_confidence_sequentially=True)
        return out

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), comm.simulate(sim), torch.autocast("cpu", dtype=dtype, enabled=low):
            out = estimate_call(pm.apply, run, tiles, tracker=tracker, watch=watch,
                                  replay=pm.inner if replay else None,
                                  replay_methods=_step_methods(pm.inner) if replay else ())
    del out
    per_module = {k: dict(v) for k, v in tracker.per_module.items()}
    notes = sorted({str(w.message) for w in caught if str(w.message).startswith("autocp")})
    return Estimate(n_tokens=n, mesh_shape=(p, p), dtype=dtype, peak_bytes=int(tracker.peak + params_bytes),
                    params_bytes=int(params_bytes), per_module=per_module, backward=False,
                    details={"guessed": dict(tracker.guessed), "demoted": sorted(set(tracker.demoted)),
                             "replayed": getattr(getattr(tracker, "replay", None), "replayed", 0),
                             "warnings": notes, "shape": shape,
                             "large": sorted(((b, *w) for w, b in tracker.large.items()), reverse=True)[:12]})


def measure_boltz(model: torch.nn.Module, feats: dict, shape: PredictShape, mesh=None, seed: int = 0) -> int:
    """The measured counterpart of :func:`estimate_boltz` on this rank of a real mesh: the
    live-tensor peak (:class:`autocp.MemoryTracker`: parameters, this rank's feature tiles
    and everything the prediction allocates; outputs kept as tiles) of
    ``autocp.parallelize(model, mesh)`` predicting ``feats`` (whole, batch first; the
    training-only keys are dropped) with ``shape``'s loop flags. Call it on every rank."""
    import warnings

    import autocp

    feats = {k: v for k, v in feats.items() if k not in INFERENCE_DROP}
    pm = autocp.parallelize(model, autocp.init_mesh() if mesh is None else mesh)
    tiles = pm.distribute_features(feats)
    del feats
    held = [*model.parameters(), *(getattr(v, "local", v) for v in tiles.values() if isinstance(v, torch.Tensor))]
    torch.manual_seed(seed)
    with torch.no_grad(), warnings.catch_warnings(), autocp.MemoryTracker(track=held) as mt:
        warnings.simplefilter("ignore")
        out = pm.apply(lambda m, b: m(b, recycling_steps=shape.recycling_steps, num_sampling_steps=shape.sampling_steps,
                                      diffusion_samples=shape.diffusion_samples,
                                      max_parallel_samples=shape.max_parallel_samples,
                                      run_confidence_sequentially=True), tiles)
        del out
    return mt.peak_bytes
