"""Whole Boltz-1 / Boltz-2 models, single device, as a parity reference.

This module is the groundwork for checking a distributed Boltz against the real thing end
to end: it imports the full LightningModule classes, builds *tiny* random-weight models
that still run every stage of the forward (input embedder, relative position encoding,
templates, MSA module, pairformer, distogram, diffusion conditioning + sampling,
confidence, affinity), generates valid feature dicts at any token count, and runs the
reference forward with the checks a parity test needs (finite outputs, pTM/ipTM really
computed).

The full models import ``pytorch_lightning``, ``torchmetrics`` and ``einx`` (and
``rdkit.Chem.Mol`` as a type annotation), none of which autocp needs otherwise. Install
them with ``pip install autocp[boltz-full]`` or ``bash scripts/install_boltz_full.sh``
(which keeps torch as it is). rdkit is *not* needed: when it is missing, a placeholder
``rdkit.Chem.Mol`` is put in ``sys.modules`` for the duration of the import only (boltz
uses it in ``boltz.data.mol`` as an annotation; the symmetry code that really calls rdkit
is validation-only and never runs in the forward).

Public API
----------
* :func:`import_boltz_models` -- ``(Boltz1, Boltz2)`` classes, or a clear ImportError.
* :func:`tiny_boltz2`, :func:`tiny_boltz1` -- tiny eval-mode models, all parameters
  re-drawn from a seeded generator (boltz zero-initialises its output projections; a
  parity test against zero weights passes vacuously).
* :func:`make_features` -- seeded, valid Boltz-2 / Boltz-1 feature dicts (batch 1) for a
  multi-chain protein complex plus one small ligand, with MSA and template features.
* :func:`run_reference` -- the seeded eval forward; raises if boltz's confidence code
  silently zeroed pTM / ipTM.
* :func:`feature_spec` -- ``{key: (shape, dtype)}`` of a feature dict (for tests/docs).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import itertools
import math
import sys
import types
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "BoltzArgs",
    "INSTALL_HINT",
    "BoltzFullUnavailable",
    "ConfidenceZeroedError",
    "boltz_full_available",
    "feature_spec",
    "import_boltz_models",
    "make_features",
    "reinit_parameters",
    "run_reference",
    "tiny_boltz1",
    "tiny_boltz1_config",
    "tiny_boltz2",
    "tiny_boltz2_config",
]

INSTALL_HINT = "pip install 'autocp[boltz-full]'  (or: bash scripts/install_boltz_full.sh)"

# python module -> pip distribution, for the error message
_REQUIRED = {
    "boltz": "boltz (pip install --no-deps boltz==2.2.1)",
    "pytorch_lightning": "pytorch-lightning (or lightning)",
    "torchmetrics": "torchmetrics",
    "lightning_utilities": "lightning-utilities",
    "einx": "einx",
    "frozendict": "frozendict",
    "tqdm": "tqdm",
    "yaml": "pyyaml",
    "packaging": "packaging",
    "scipy": "scipy",
    "fairscale": "fairscale",
    "einops": "einops",
}


class BoltzFullUnavailable(ImportError):
    """The full Boltz models cannot be imported (a dependency is missing)."""


class ConfidenceZeroedError(RuntimeError):
    """Boltz's confidence head silently replaced pTM / ipTM by zeros.

    ``ConfidenceHeads.forward`` (boltz/model/modules/confidencev2.py) wraps
    ``compute_ptms`` in ``try/except Exception`` and, on any error, prints
    ``Error in compute_ptms: ...`` and returns zeros -- a parity test would then compare
    zeros with zeros.
    """


# ----------------------------------------------------------------------------- import
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken / blocked finder counts as missing
        return False


def _missing_modules() -> list[str]:
    missing = []
    for mod in _REQUIRED:
        if mod == "pytorch_lightning":
            if not (_has_module("pytorch_lightning") or _has_module("lightning")):
                missing.append(mod)
        elif not _has_module(mod):
            missing.append(mod)
    return missing


def boltz_full_available() -> bool:
    """True when :func:`import_boltz_models` will succeed (does not import boltz)."""
    return not _missing_modules()


@contextlib.contextmanager
def _rdkit_placeholder():
    """Make ``from rdkit.Chem import Mol`` work for the duration of the block when rdkit is
    not installed; the placeholder is removed from ``sys.modules`` afterwards so that
    nothing else mistakes it for rdkit."""
    if "rdkit" in sys.modules or _has_module("rdkit"):
        yield
        return

    class Mol:
        """Placeholder for ``rdkit.Chem.Mol`` (rdkit not installed; annotation only)."""

        def __init__(self, *a, **k):
            raise BoltzFullUnavailable("rdkit is not installed; this boltz code path needs it (pip install rdkit)")

    rdkit = types.ModuleType("rdkit")
    chem = types.ModuleType("rdkit.Chem")
    chem.Mol = Mol
    rdkit.Chem = chem
    rdkit.__autocp_placeholder__ = True
    sys.modules["rdkit"] = rdkit
    sys.modules["rdkit.Chem"] = chem
    try:
        yield
    finally:
        for name in ("rdkit.Chem", "rdkit"):
            if getattr(sys.modules.get(name), "__autocp_placeholder__", False) or sys.modules.get(name) is chem:
                del sys.modules[name]


def import_boltz_models():
    """Import and return ``(Boltz1, Boltz2)``, the full boltz LightningModule classes.

    If only the unified ``lightning`` package is installed, ``pytorch_lightning`` is
    aliased to ``lightning.pytorch`` (boltz imports the former). rdkit is optional (see
    the module docstring).

    Raises
    ------
    BoltzFullUnavailable
        naming every missing module and the fix (:data:`INSTALL_HINT`).
    """
    missing = _missing_modules()
    if missing:
        names = ", ".join(_REQUIRED[m] for m in missing)
        raise BoltzFullUnavailable(
            f"the full Boltz models need modules that are not installed: {names}. Fix: {INSTALL_HINT}"
        )
    if "pytorch_lightning" not in sys.modules and not _has_module("pytorch_lightning"):
        import lightning.pytorch as _lp

        sys.modules["pytorch_lightning"] = _lp
    try:
        with _rdkit_placeholder():
            boltz1 = importlib.import_module("boltz.model.models.boltz1")
            boltz2 = importlib.import_module("boltz.model.models.boltz2")
    except ImportError as e:  # a transitive dependency we did not list
        raise BoltzFullUnavailable(f"importing the full Boltz models failed: {e!r}. Fix: {INSTALL_HINT}") from e
    return boltz1.Boltz1, boltz2.Boltz2


# ----------------------------------------------------------------------------- tiny configs
_STEERING_OFF = {
    "fk_steering": False,
    "num_particles": 3,
    "fk_lambda": 4.0,
    "fk_resampling_interval": 3,
    "physical_guidance_update": False,
    "contact_guidance_update": False,
    "num_gd_steps": 20,
}


#: the tiny widths both versions share
_TINY_WIDTHS = {"atom_s": 16, "atom_z": 8, "token_s": 32, "token_z": 16}
_TINY_PAIR = {"pairwise_head_width": 8, "pairwise_num_heads": 2, "dropout": 0.0, "activation_checkpointing": False}


def tiny_boltz2_config(**overrides) -> dict[str, Any]:
    """Constructor kwargs of the tiny Boltz-2 (see :func:`tiny_boltz2`).

    The flags follow boltz's ``scripts/train/configs/structurev2.yaml`` plus the released
    checkpoint's (``use_templates_v2=True``, confidence with separate PAE/PDE heads,
    pairformer ``v2=True``); the widths are shrunk (token_s 32, token_z 16, atom_s 16,
    atom_z 8, one block per stack, 2 heads). A dict-valued override is merged into the
    default dict; anything else replaces it.
    """
    pair = dict(_TINY_PAIR)
    cfg: dict[str, Any] = {
        **_TINY_WIDTHS,
        "num_bins": 64,  # ConfidenceHeads hard-codes a (1,1,1,64) contact mask on the distogram (both versions)
        "atom_feature_dim": 388,  # ref_pos 3 + charge 1 + element 128 + name chars 4*64
        "atoms_per_window_queries": 32,
        "atoms_per_window_keys": 128,
        "training_args": {"recycling_steps": 0, "sampling_steps": 2, "diffusion_multiplicity": 1,
                          "diffusion_samples": 1, "confidence_loss_weight": 1e-4, "diffusion_loss_weight": 4.0,
                          "distogram_loss_weight": 3e-2, "bfactor_loss_weight": 1e-3, "affinity_loss_weight": 3e-3,
                          "symmetry_correction": False, "max_lr": 1e-3, "weight_decay": 0.0},
        "validation_args": {"recycling_steps": 0, "sampling_steps": 2, "diffusion_samples": 1,
                            "symmetry_correction": False, "run_confidence_sequentially": False},
        "embedder_args": {"atom_encoder_depth": 1, "atom_encoder_heads": 2, "add_mol_type_feat": True,
                          "add_method_conditioning": True, "add_modified_flag": True, "add_cyclic_flag": True},
        "msa_args": {"msa_s": 16, "msa_blocks": 1, "msa_dropout": 0.0, "z_dropout": 0.0, "use_paired_feature": True,
                     "pairwise_head_width": 8, "pairwise_num_heads": 2, "activation_checkpointing": False,
                     "subsample_msa": False, "num_subsampled_msa": 1024},
        "pairformer_args": {"num_blocks": 1, "num_heads": 2, "post_layer_norm": False, "v2": True, **pair},
        "score_model_args": {"sigma_data": 16, "dim_fourier": 32, "atom_encoder_depth": 1, "atom_encoder_heads": 2,
                             "token_transformer_depth": 1, "token_transformer_heads": 2, "atom_decoder_depth": 1,
                             "atom_decoder_heads": 2, "conditioning_transition_layers": 1,
                             "transformer_post_ln": False, "activation_checkpointing": False},
        # main.py's Boltz2DiffusionParams
        "diffusion_process_args": {"gamma_0": 0.8, "gamma_min": 1.0, "noise_scale": 1.003, "rho": 7,
                                   "step_scale": 1.5, "sigma_min": 0.0001, "sigma_max": 160.0, "sigma_data": 16.0,
                                   "P_mean": -1.2, "P_std": 1.5, "coordinate_augmentation": True,
                                   "alignment_reverse_diff": True, "synchronize_sigmas": True},
        "diffusion_loss_args": {"add_smooth_lddt_loss": True, "nucleotide_loss_weight": 5.0,
                                "ligand_loss_weight": 10.0, "filter_by_plddt": 0.0},
        "confidence_model_args": {"num_dist_bins": 64, "max_dist": 22, "add_s_to_z_prod": True,
                                  "add_s_input_to_s": True, "add_z_input_to_z": True,
                                  "pairformer_args": {"num_blocks": 1, "num_heads": 2, **pair},
                                  "confidence_args": {"num_plddt_bins": 50, "num_pde_bins": 64, "num_pae_bins": 64,
                                                      "use_separate_heads": True}},
        "affinity_model_args": {"num_dist_bins": 64, "max_dist": 22,
                                "pairformer_args": {"num_blocks": 1, **pair},
                                "transformer_args": {"token_s": 32, "num_blocks": 1, "num_heads": 2,
                                                     "activation_checkpointing": False}},
        "template_args": {"template_dim": 16, "template_blocks": 1, "dropout": 0.0, "pairwise_head_width": 8,
                          "pairwise_num_heads": 2, "activation_checkpointing": False},
        "use_templates": True,
        "use_templates_v2": True,
        "confidence_prediction": True,
        "affinity_prediction": True,
        "affinity_mw_correction": True,
        "validate_structure": False,  # True builds torchmetrics validators + needs a datamodule
        "steering_args": dict(_STEERING_OFF),  # AtomDiffusion.sample indexes it unconditionally
        "fix_sym_check": True,
        "cyclic_pos_enc": True,
        "bond_type_feature": True,
        "predict_bfactor": True,
        "exclude_ions_from_lddt": True,
        "conditioning_cutoff_min": 4.0,
        "conditioning_cutoff_max": 20.0,
        "ema": False,
        "use_kernels": False,  # cuequivariance kernels; CPU has none
    }
    return merge_config(cfg, overrides)


def tiny_boltz1_config(**overrides) -> dict[str, Any]:
    """Constructor kwargs of the tiny Boltz-1 (see :func:`tiny_boltz1`).

    Flags follow boltz's ``scripts/train/configs/full.yaml`` (the released Boltz-1 with
    confidence: ``confidence_imitate_trunk=True``, ``alpha_pae=1`` so PAE/pTM are
    computed, ``use_s_diffusion=True``); widths as :func:`tiny_boltz2_config`.
    """
    pair = dict(_TINY_PAIR)
    cfg: dict[str, Any] = {
        **_TINY_WIDTHS,
        "num_bins": 64,
        "atom_feature_dim": 389,  # ref_pos 3 + charge 1 + pad mask 1 + element 128 + name chars 4*64
        "atoms_per_window_queries": 32,
        "atoms_per_window_keys": 128,
        "training_args": {"recycling_steps": 0, "sampling_steps": 2, "diffusion_multiplicity": 1,
                          "diffusion_samples": 1, "confidence_loss_weight": 3e-3, "diffusion_loss_weight": 4.0,
                          "distogram_loss_weight": 3e-2, "symmetry_correction": False,
                          "run_confidence_sequentially": False},
        "validation_args": {"recycling_steps": 0, "sampling_steps": 2, "diffusion_samples": 1,
                            "symmetry_correction": False, "run_confidence_sequentially": False},
        "embedder_args": {"atom_encoder_depth": 1, "atom_encoder_heads": 2},
        "msa_args": {"msa_s": 16, "msa_blocks": 1, "msa_dropout": 0.0, "z_dropout": 0.0,
                     "use_paired_feature": False, "pairwise_head_width": 8, "pairwise_num_heads": 2,
                     "activation_checkpointing": False, "offload_to_cpu": False},
        "pairformer_args": {"num_blocks": 1, "num_heads": 2, "offload_to_cpu": False, **pair},
        "score_model_args": {"sigma_data": 16, "dim_fourier": 32, "atom_encoder_depth": 1, "atom_encoder_heads": 2,
                             "token_transformer_depth": 1, "token_transformer_heads": 2, "atom_decoder_depth": 1,
                             "atom_decoder_heads": 2, "conditioning_transition_layers": 1,
                             "activation_checkpointing": False, "offload_to_cpu": False},
        # main.py's BoltzDiffusionParams
        "diffusion_process_args": {"gamma_0": 0.605, "gamma_min": 1.107, "noise_scale": 0.901, "rho": 8,
                                   "step_scale": 1.638, "sigma_min": 0.0004, "sigma_max": 160.0,
                                   "sigma_data": 16.0, "P_mean": -1.2, "P_std": 1.5,
                                   "coordinate_augmentation": True, "alignment_reverse_diff": True,
                                   "synchronize_sigmas": True, "use_inference_model_cache": True},
        "diffusion_loss_args": {"add_smooth_lddt_loss": True, "nucleotide_loss_weight": 5.0,
                                "ligand_loss_weight": 10.0},
        "confidence_model_args": {"num_dist_bins": 64, "max_dist": 22, "add_s_to_z_prod": True,
                                  "add_s_input_to_s": True, "use_s_diffusion": True, "add_z_input_to_z": True,
                                  "confidence_args": {"num_plddt_bins": 50, "num_pde_bins": 64,
                                                      "num_pae_bins": 64}},
        "confidence_prediction": True,
        "confidence_imitate_trunk": True,
        "alpha_pae": 1.0,  # > 0 -> ConfidenceHeads(compute_pae=True) -> pae, ptm, iptm
        "steering_args": {k: v for k, v in _STEERING_OFF.items() if k != "contact_guidance_update"},
        "ema": False,
        "use_kernels": False,
    }
    return merge_config(cfg, overrides)


def merge_config(cfg: dict, overrides: dict) -> dict:
    """``cfg`` with ``overrides`` (a dict-valued override merged into the dict it replaces)."""
    cfg = deepcopy(cfg)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = merge_config(cfg[k], v)
        else:
            cfg[k] = deepcopy(v)
    return cfg


# ----------------------------------------------------------------------------- weights
@torch.no_grad()
def reinit_parameters(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter of ``model`` from a ``torch.Generator`` seeded with ``seed``.

    * ``nn.Linear`` weight ~ N(0, 1/fan_in), bias ~ N(0, 0.05^2)
    * ``nn.LayerNorm`` weight ~ 1 + N(0, 0.1^2), bias ~ N(0, 0.1^2)
    * ``nn.Embedding`` weight ~ N(0, 1/embedding_dim)
    * Fourier-embedding projections (``FourierEmbedding.proj``) ~ N(0, 1), as boltz
    * anything else: ndim >= 2 ~ N(0, 1/shape[-1]); 1-d ~ N(0, 0.1^2)

    The draw depends only on ``seed`` and the module tree (parameters are visited in
    ``named_modules`` order, shared parameters once), so two models built from the same
    config and seed are bit-identical. Boltz zero-initialises many output projections and
    gates (``final_init_``/``gating_init_``); re-drawing all of them makes every branch
    contribute, so a parity test cannot pass on zeros.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    seen: set[int] = set()

    def draw(p: Tensor, std: float, mean: float = 0.0) -> None:
        if id(p) in seen:
            return
        seen.add(id(p))
        x = torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean
        p.copy_(x.to(device=p.device, dtype=p.dtype))

    for name, mod in model.named_modules():
        fourier = type(mod).__name__ == "FourierEmbedding"
        for pname, p in mod.named_parameters(recurse=False):
            if isinstance(mod, nn.Linear):
                draw(p, 1.0 / math.sqrt(max(1, mod.in_features)) if pname == "weight" else 0.05)
            elif isinstance(mod, nn.LayerNorm):
                draw(p, 0.1, 1.0 if pname == "weight" else 0.0)
            elif isinstance(mod, nn.Embedding):
                draw(p, 1.0 / math.sqrt(mod.embedding_dim))
            elif p.ndim >= 2:
                draw(p, 1.0 / math.sqrt(max(1, p.shape[-1])))
            else:
                draw(p, 0.1)
        if fourier:  # its Linear(1, dim) child: weight and bias both N(0, 1) in boltz
            for p in mod.proj.parameters():
                seen.discard(id(p))
                draw(p, 1.0)
    return model


class BoltzArgs(dict):
    """A dict with attribute access, what Boltz's training code expects of
    ``training_args`` / ``validation_args`` (Boltz's own configs are omegaconf DictConfigs)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def _build(cls, cfg: dict, seed: int) -> nn.Module:
    # boltz's own init draws from scipy's / numpy's global RNG (trunc_normal_init_); pin it
    # so construction is reproducible even before the re-draw, and restore the caller's.
    np_state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    try:
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = cls(**cfg)
    finally:
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
    for name in ("training_args", "validation_args"):
        if isinstance(getattr(model, name, None), dict):
            setattr(model, name, BoltzArgs(getattr(model, name)))
    reinit_parameters(model, seed)
    return model.eval()


def tiny_boltz2(seed: int = 0, **overrides) -> nn.Module:
    """A tiny random-weight ``Boltz2`` in eval mode (templates v2, confidence, affinity).

    ``overrides`` are ``Boltz2`` constructor kwargs merged into :func:`tiny_boltz2_config`.
    Every parameter is re-drawn by :func:`reinit_parameters` with ``seed``.
    """
    _, Boltz2 = import_boltz_models()
    return _build(Boltz2, tiny_boltz2_config(**overrides), seed)


def tiny_boltz1(seed: int = 0, **overrides) -> nn.Module:
    """A tiny random-weight ``Boltz1`` in eval mode (confidence with PAE/pTM; Boltz-1 has
    no template module). ``overrides`` merge into :func:`tiny_boltz1_config`."""
    Boltz1, _ = import_boltz_models()
    return _build(Boltz1, tiny_boltz1_config(**overrides), seed)


# ----------------------------------------------------------------------------- features
# boltz.data.const, duplicated so that feature generation does not import boltz
_TOKENS = ['<pad>', '-', 'ALA', 'ARG', 'ASN', 'ASP', 'CYS', 'GLN', 'GLU', 'GLY', 'HIS', 'ILE', 'LEU', 'LYS',
           'MET', 'PHE', 'PRO', 'SER', 'THR', 'TRP', 'TYR', 'VAL', 'UNK', 'A', 'G', 'C', 'U', 'N', 'DA', 'DG',
           'DC', 'DT', 'DN']
_NUM_TOKENS = len(_TOKENS)  # 33
_TOK = {t: i for i, t in enumerate(_TOKENS)}
_NUM_ELEMENTS = 128
_PROTEIN, _NONPOLYMER = 0, 3
_NUM_BACKBONE = 1 + 4 + 12  # 1 + len(protein_backbone_atom_index) + len(nucleic_backbone_atom_index)
_BACKBONE = {"N": 0, "CA": 1, "C": 2, "O": 3}
_CONTACT = {"UNSPECIFIED": 0, "UNSELECTED": 1, "POCKET>BINDER": 2, "BINDER>POCKET": 3, "CONTACT": 4}
_POCKET = {"UNSPECIFIED": 0, "UNSELECTED": 1, "POCKET": 2, "BINDER": 3}
_XRAY = 1  # const.method_types_ids["x-ray diffraction"]
_CHI_CCW = 2  # const.chirality_type_ids["CHI_TETRAHEDRAL_CCW"]
_SINGLE_BOND = 1 + 1  # tokenize/boltz2.py: bond["type"] + 1, bond_type_ids["SINGLE"] == 1
_ELEMENT = {"C": 6, "N": 7, "O": 8, "S": 16}
_MASS = {6: 12.011, 7: 14.007, 8: 15.999, 16: 32.06}
# const.ref_atoms for residues of 8..14 heavy atoms (every one has CB: token disto atom)
_RESIDUES = {
    "ASN": ["N", "CA", "C", "O", "CB", "CG", "OD1", "ND2"],
    "ASP": ["N", "CA", "C", "O", "CB", "CG", "OD1", "OD2"],
    "ILE": ["N", "CA", "C", "O", "CB", "CG1", "CG2", "CD1"],
    "LEU": ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2"],
    "MET": ["N", "CA", "C", "O", "CB", "CG", "SD", "CE"],
    "GLN": ["N", "CA", "C", "O", "CB", "CG", "CD", "OE1", "NE2"],
    "GLU": ["N", "CA", "C", "O", "CB", "CG", "CD", "OE1", "OE2"],
    "LYS": ["N", "CA", "C", "O", "CB", "CG", "CD", "CE", "NZ"],
    "HIS": ["N", "CA", "C", "O", "CB", "CG", "ND1", "CD2", "CE1", "NE2"],
    "ARG": ["N", "CA", "C", "O", "CB", "CG", "CD", "NE", "CZ", "NH1", "NH2"],
    "PHE": ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ"],
    "TYR": ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH"],
    "TRP": ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2"],
}
_RES_NAMES = list(_RESIDUES)
_AA_IDS = [_TOK[r] for r in _TOKENS[2:22]]  # the 20 amino acids, for MSA mutations
# idealised local backbone (AF2 rigid group, CA at origin, C on +x)
_BB_LOCAL = {"N": (-0.525, 1.363, 0.0), "CA": (0.0, 0.0, 0.0), "C": (1.526, 0.0, 0.0),
             "O": (2.140, 1.065, 0.0), "CB": (-0.529, -0.774, -1.205)}


def _name_chars(name: str) -> list[int]:
    """featurizerv2.convert_atom_name: ord(c) - 32 per character, padded to 4."""
    c = [ord(ch) - 32 for ch in name.strip()][:4]
    return c + [0] * (4 - len(c))


def _residue_local(names: list[str]) -> np.ndarray:
    """Idealised local coordinates (CA at origin) for a residue's heavy atoms: the AF2
    backbone, then side-chain atoms on a 1.45 A-step helix out from CB."""
    cb = np.array(_BB_LOCAL["CB"])
    s = cb / np.linalg.norm(cb)
    p = np.cross(s, [1.0, 0.0, 0.0])
    p /= np.linalg.norm(p)
    q = np.cross(s, p)
    out = []
    for i, n in enumerate(names):
        if n in _BB_LOCAL:
            out.append(_BB_LOCAL[n])
        else:
            j = i - 5
            ang = 2.1 * (j + 1)
            out.append(cb + (j + 1) * 0.8 * s + 0.7 * (math.cos(ang) * p + math.sin(ang) * q))
    return np.asarray(out, dtype=np.float64)


def _rand_rot(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [1 - 2 * (c * c + d * d), 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), 1 - 2 * (b * b + d * d), 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), 1 - 2 * (b * b + c * c)],
    ])


def _ca_trace(n: int, start: np.ndarray, rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    """A self-avoiding-ish CA random walk: 3.8 A steps, ~110 degree virtual bond angles."""
    pts = [start]
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    for _ in range(n - 1):
        best = None
        for _try in range(30):
            u = rng.normal(size=3)
            u -= u.dot(d) * d
            u /= np.linalg.norm(u)
            a = math.radians(70.0 + rng.uniform(-10.0, 10.0))
            nd = math.cos(a) * d + math.sin(a) * u
            cand = pts[-1] + 3.8 * nd
            others = np.array(pts[:-1] + avoid) if (len(pts) > 1 or avoid) else None
            if others is None or np.min(np.linalg.norm(others - cand, axis=-1)) > 4.2:
                best = (cand, nd)
                break
            best = best or (cand, nd)
        pts.append(best[0])
        d = best[1]
    return np.asarray(pts)


def _frame_local(ca: np.ndarray, i: int) -> np.ndarray:
    """Orthonormal frame (columns) at CA i of a trace."""
    prev = ca[i - 1] if i > 0 else ca[i] - (ca[i + 1] - ca[i] if len(ca) > 1 else np.array([3.8, 0, 0]))
    nxt = ca[i + 1] if i + 1 < len(ca) else ca[i] + (ca[i] - prev)
    x = nxt - prev
    x /= np.linalg.norm(x) + 1e-9
    y = ca[i] - 0.5 * (prev + nxt)
    y -= y.dot(x) * x
    if np.linalg.norm(y) < 1e-6:
        y = np.cross(x, [0.0, 0.0, 1.0])
        if np.linalg.norm(y) < 1e-6:
            y = np.cross(x, [0.0, 1.0, 0.0])
    y /= np.linalg.norm(y)
    return np.stack([x, y, np.cross(x, y)], axis=1)


def _compute_frame(n, ca, c):
    """tokenize/boltz2.py compute_frame: rot columns (e1, e2, e3), t = ca."""
    v1, v2 = c - ca, n - ca
    e1 = v1 / (np.linalg.norm(v1) + 1e-10)
    u2 = v2 - e1 * np.dot(e1, v2)
    e2 = u2 / (np.linalg.norm(u2) + 1e-10)
    return np.column_stack([e1, e2, np.cross(e1, e2)]), ca


def _collinear_mask(v1, v2):
    """featurizerv2.compute_collinear_mask."""
    n1 = np.linalg.norm(v1, axis=1, keepdims=True)
    n2 = np.linalg.norm(v2, axis=1, keepdims=True)
    a = np.abs(np.sum((v1 / (n1 + 1e-6)) * (v2 / (n2 + 1e-6)), axis=1)) < 0.9063
    return a & (n1.reshape(-1) > 1e-2) & (n2.reshape(-1) > 1e-2)


def _one_hot(idx, n: int) -> Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(np.asarray(idx), dtype=torch.long), n)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def make_features(
    n_tokens: int,
    seed: int = 0,
    *,
    version: int = 2,
    n_chains: int = 2,
    ligand_atoms: int | None = None,
    msa_depth: int = 8,
    n_templates: int = 1,
    pocket: bool = True,
    homomer: bool = False,
    affinity: bool = True,
    atoms_per_window: int = 32,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """A seeded, valid Boltz feature dict (batch dimension 1) with ``n_tokens`` tokens.

    The complex is ``n_chains`` protein chains (residues of 8..14 heavy atoms, one token
    each, CA trace with 3.8 A steps, chains packed next to each other) plus one ligand
    chain of ``ligand_atoms`` atoms (one token per atom, bonded in a zig-zag, placed
    against chain 0). Atoms are padded to a multiple of ``atoms_per_window`` (32) as
    Boltz's featurizer pads them; no token padding (all tokens are real), as in boltz
    inference. The keys, shapes and dtypes are exactly those of
    ``Boltz2Featurizer.process`` (``version=2``, as called by ``inferencev2.py``:
    ``compute_frames=True, compute_constraint_features=True``, plus the affinity keys of
    ``compute_affinity=True`` when ``affinity``) or of ``BoltzFeaturizer.process``
    (``version=1``, as ``inference.py``), after ``collate`` (batch of 1; ``affinity_mw``
    stays a list of floats, as boltz's collate leaves it). The non-tensor ``record`` key is
    omitted.

    Parameters
    ----------
    n_tokens : total token count (protein residues + ligand atoms), any value >= n_chains + 3.
    seed : everything random (sequence, geometry, MSA, templates, ref-pos rotations) is
        drawn from ``numpy.random.default_rng(seed)``.
    version : 2 (Boltz-2 features) or 1 (Boltz-1 features).
    n_chains : protein chains (the ligand is an extra chain).
    ligand_atoms : ligand atoms/tokens; default ``min(6, n_tokens // 6)`` (0 disables,
        otherwise >= 3 so the ligand has frames).
    msa_depth : MSA rows (row 0 is the query).
    n_templates : templates (``version=2``); template ``t`` covers protein chains
        ``c % n_templates == t``. 0 gives boltz's dummy template features (one all-zero row).
    pocket : mark the ligand as binder and the protein tokens within 8 A of it as pocket
        (``contact_conditioning`` / ``pocket_feature``), as a YAML pocket constraint does.
    homomer : make protein chain 1 a copy (same entity, same sequence, sym_id 1) of chain 0
        when the split gives them equal length.
    affinity : add the affinity keys (``affinity_token_mask`` marks the ligand,
        ``profile_affinity``, ``deletion_mean_affinity``, ``affinity_mw``; version 2).
    """
    if version not in (1, 2):
        raise ValueError("version must be 1 or 2")
    rng = np.random.default_rng(seed)
    if ligand_atoms is None:
        ligand_atoms = min(6, n_tokens // 6)
        if ligand_atoms < 3:
            ligand_atoms = 0
    if ligand_atoms and ligand_atoms < 3:
        raise ValueError("ligand_atoms must be 0 or >= 3")
    n_prot = n_tokens - ligand_atoms
    if n_chains < 1 or n_prot < 2 * n_chains:
        raise ValueError(f"n_tokens={n_tokens} too small for {n_chains} protein chains + {ligand_atoms} ligand atoms")
    chain_lens = _split(n_prot, n_chains)

    # ---- sequences / entities
    seqs, entity_of, sym_of = [], [], []
    for c, L in enumerate(chain_lens):
        if homomer and c == 1 and chain_lens[0] == L:
            seqs.append(list(seqs[0]))
            entity_of.append(entity_of[0])
            sym_of.append(1)
        else:
            seqs.append([_RES_NAMES[i] for i in rng.integers(0, len(_RES_NAMES), size=L)])
            entity_of.append(max(entity_of, default=-1) + 1)
            sym_of.append(0)

    # ---- geometry
    ca_traces: list[np.ndarray] = []
    placed: list[np.ndarray] = []
    for c, L in enumerate(chain_lens):
        if c == 0:
            start = np.zeros(3)
        else:  # next to an already placed chain, ~10 A from its centroid
            prev = ca_traces[c - 1]
            off = rng.normal(size=3)
            off /= np.linalg.norm(off)
            start = prev.mean(0) + 10.0 * off
        tr = _ca_trace(L, start, rng, placed)
        ca_traces.append(tr)
        placed.extend(list(tr))

    tok: list[dict] = []  # per token
    atoms: list[dict] = []  # per atom
    uid = 0
    for c, (seq, tr) in enumerate(zip(seqs, ca_traces)):
        for r, res in enumerate(seq):
            names = _RESIDUES[res]
            local = _residue_local(names)
            R = _frame_local(tr, r)
            xyz = tr[r] + local @ R.T
            a0 = len(atoms)
            for name, x, lx in zip(names, xyz, local):
                atoms.append({"name": name, "element": _ELEMENT[name[0]], "charge": 0, "coords": x,
                              "conformer": lx, "uid": uid, "token": len(tok),
                              "backbone": _BACKBONE.get(name, -1) + 1,
                              "chirality": _CHI_CCW if name == "CA" else 0})
            tok.append({"asym": c, "entity": entity_of[c], "sym": sym_of[c], "mol": _PROTEIN,
                        "res_type": _TOK[res], "res_idx": r, "atom0": a0, "natom": len(names),
                        "center": a0 + 1, "disto": a0 + 4, "frame": (a0, a0 + 1, a0 + 2)})
            uid += 1
    lig_asym = n_chains
    if ligand_atoms:
        anchor = ca_traces[0]
        cen = anchor.mean(0)
        far = anchor[np.argmax(np.linalg.norm(anchor - cen, axis=-1))]
        direction = (far - cen) / (np.linalg.norm(far - cen) + 1e-9)
        base = far + 5.0 * direction + rng.normal(scale=0.5, size=3)
        # zig-zag chain, 1.5 A bonds, 120 degree angles
        e1 = rng.normal(size=3)
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(e1, direction)
        e2 /= np.linalg.norm(e2) + 1e-9
        lig_local = np.array([[1.3 * i, 0.75 * (i % 2), 0.0] for i in range(ligand_atoms)])
        lig_local += rng.normal(scale=0.05, size=lig_local.shape)
        Rl = np.stack([e1, e2, np.cross(e1, e2)], axis=1)
        lig_xyz = base + lig_local @ Rl.T
        elems = [7 if i == 1 else 8 if i == ligand_atoms - 1 else 6 for i in range(ligand_atoms)]
        for i in range(ligand_atoms):
            sym = {6: "C", 7: "N", 8: "O"}[elems[i]]
            tok.append({"asym": lig_asym, "entity": max(entity_of) + 1, "sym": 0, "mol": _NONPOLYMER,
                        "res_type": _TOK["UNK"], "res_idx": 0, "atom0": len(atoms), "natom": 1,
                        "center": len(atoms), "disto": len(atoms), "frame": None})
            atoms.append({"name": f"{sym}{i + 1}", "element": elems[i], "charge": 0, "coords": lig_xyz[i],
                          "conformer": lig_local[i] - lig_local.mean(0), "uid": uid, "token": len(tok) - 1,
                          "backbone": 0, "chirality": 0})
        uid += 1
    N = len(tok)
    assert N == n_tokens
    M = len(atoms)
    M_pad = ((M - 1) // atoms_per_window + 1) * atoms_per_window
    pad = M_pad - M
    coords = np.array([a["coords"] for a in atoms])
    center_xyz = coords[[t["center"] for t in tok]]
    disto_xyz = coords[[t["disto"] for t in tok]]
    lig_tokens = [i for i, t in enumerate(tok) if t["mol"] == _NONPOLYMER]
    prot_tokens = [i for i, t in enumerate(tok) if t["mol"] == _PROTEIN]

    # ---- token features
    def T(x, dtype):
        return torch.as_tensor(np.asarray(x), dtype=dtype)

    f: dict[str, Any] = {}
    f["token_index"] = torch.arange(N, dtype=torch.long)
    f["residue_index"] = T([t["res_idx"] for t in tok], torch.long)
    f["asym_id"] = T([t["asym"] for t in tok], torch.long)
    f["entity_id"] = T([t["entity"] for t in tok], torch.long)
    f["sym_id"] = T([t["sym"] for t in tok], torch.long)
    f["mol_type"] = T([t["mol"] for t in tok], torch.long)
    f["res_type"] = _one_hot([t["res_type"] for t in tok], _NUM_TOKENS)
    f["disto_center"] = T(disto_xyz, torch.float32)
    bonds = torch.zeros(N, N, dtype=torch.float)
    bonds_type = torch.zeros(N, N, dtype=torch.long)
    for a, b in itertools.pairwise(lig_tokens):
        bonds[a, b] = bonds[b, a] = 1
        bonds_type[a, b] = bonds_type[b, a] = _SINGLE_BOND
    f["token_bonds"] = bonds.unsqueeze(-1)
    if version == 2:
        f["type_bonds"] = bonds_type
    f["token_pad_mask"] = torch.ones(N, dtype=torch.float)
    f["token_resolved_mask"] = torch.ones(N, dtype=torch.float)
    f["token_disto_mask"] = torch.ones(N, dtype=torch.float)

    pocket_tokens: list[int] = []
    if pocket and lig_tokens:
        lig_xyz_all = coords[[tok[i]["atom0"] for i in lig_tokens]]
        for i in prot_tokens:
            t = tok[i]
            res_xyz = coords[t["atom0"]: t["atom0"] + t["natom"]]
            if np.min(np.linalg.norm(res_xyz[:, None] - lig_xyz_all[None], axis=-1)) < 8.0:
                pocket_tokens.append(i)
        if not pocket_tokens:  # always give the constraint a pocket
            d = [np.min(np.linalg.norm(center_xyz[i] - lig_xyz_all, axis=-1)) for i in prot_tokens]
            pocket_tokens = [prot_tokens[int(np.argmin(d))]]
    if version == 2:
        cc = np.full((N, N), _CONTACT["UNSELECTED"])
        thr = np.zeros((N, N))
        for b in lig_tokens if pocket_tokens else []:
            for p in pocket_tokens:
                cc[b, p] = _CONTACT["BINDER>POCKET"]
                cc[p, b] = _CONTACT["POCKET>BINDER"]
                thr[b, p] = thr[p, b] = 6.0
        if np.all(cc == _CONTACT["UNSELECTED"]):
            cc[:] = _CONTACT["UNSPECIFIED"]
        f["contact_conditioning"] = _one_hot(cc, len(_CONTACT))
        f["contact_threshold"] = torch.from_numpy(thr).float()
        f["method_feature"] = torch.full((N,), _XRAY, dtype=torch.long)
        f["modified"] = torch.zeros(N, dtype=torch.long)
        f["cyclic_period"] = torch.zeros(N, dtype=torch.float32)
        f["affinity_token_mask"] = T([1.0 if (affinity and i in lig_tokens) else 0.0 for i in range(N)],
                                     torch.float32)
    else:
        pf = np.full(N, _POCKET["UNSPECIFIED"])
        if pocket_tokens:
            pf[:] = _POCKET["UNSELECTED"]
            pf[lig_tokens] = _POCKET["BINDER"]
            pf[pocket_tokens] = _POCKET["POCKET"]
        f["pocket_feature"] = _one_hot(pf, len(_POCKET))
        f["cyclic_period"] = torch.zeros(N, dtype=torch.int32)

    # ---- atom features
    conformer = np.array([a["conformer"] for a in atoms], dtype=np.float32)
    uids = np.array([a["uid"] for a in atoms], dtype=np.int64)
    ref_pos = torch.from_numpy(conformer.copy())
    if version == 2:
        # featurizerv2: per ref_space_uid centring + random rotation + N(0,1) translation;
        # boltz's loop is `for i in range(torch.max(ref_space_uid))`, so the LAST uid is not
        # augmented -- mirrored here.
        for i in range(int(uids.max())):
            sel = uids == i
            x = conformer[sel] - conformer[sel].mean(0)
            ref_pos[torch.from_numpy(sel)] = torch.from_numpy(
                (x @ _rand_rot(rng).T + rng.normal(size=(1, 3))).astype(np.float32))
    else:
        # featurizer (v1): one global rotation + translation, no centring
        ref_pos = torch.from_numpy((conformer @ _rand_rot(rng).T + rng.normal(size=(1, 3))).astype(np.float32))
    names = np.array([_name_chars(a["name"]) for a in atoms])
    coords_c = coords - coords.mean(0, keepdims=True)  # centred ground truth (all resolved)

    def padA(x: Tensor, dim: int = 0) -> Tensor:
        if pad == 0:
            return x
        shape = list(x.shape)
        shape[dim] = pad
        return torch.cat([x, torch.zeros(shape, dtype=x.dtype)], dim=dim)

    f["ref_pos"] = padA(ref_pos)
    f["atom_resolved_mask"] = padA(torch.ones(M, dtype=torch.bool))
    f["ref_atom_name_chars"] = padA(_one_hot(names, 64))
    f["ref_element"] = padA(_one_hot([a["element"] for a in atoms], _NUM_ELEMENTS))
    if version == 2:
        f["ref_charge"] = padA(torch.zeros(M, dtype=torch.float32))
        f["ref_chirality"] = padA(T([a["chirality"] for a in atoms], torch.long))
        f["atom_backbone_feat"] = padA(_one_hot([a["backbone"] for a in atoms], _NUM_BACKBONE))
    else:
        f["ref_charge"] = padA(torch.zeros(M, dtype=torch.int8))  # Atom.charge is i1
    f["ref_space_uid"] = padA(torch.from_numpy(uids))
    f["coords"] = padA(torch.from_numpy(coords_c.astype(np.float32))[None], dim=1)
    f["atom_pad_mask"] = padA(torch.ones(M, dtype=torch.float))
    f["atom_to_token"] = padA(_one_hot([a["token"] for a in atoms], N))
    f["token_to_rep_atom"] = padA(_one_hot([t["disto"] for t in tok], M), dim=1)
    f["r_set_to_rep_atom"] = padA(_one_hot([tok[i]["center"] for i in prot_tokens], M), dim=1)
    if version == 2:
        f["token_to_center_atom"] = padA(_one_hot([t["center"] for t in tok], M), dim=1)
    dists = torch.cdist(torch.from_numpy(disto_xyz).float(), torch.from_numpy(disto_xyz).float())
    disto = (dists.unsqueeze(-1) > torch.linspace(2.0, 22.0, 63)).sum(-1)
    if version == 2:
        f["disto_target"] = _one_hot(disto, 64).float()[:, :, None, :]  # (N, N, n_ens=1, 64)
        f["disto_coords_ensemble"] = torch.from_numpy(disto_xyz.astype(np.float32))[None]
        f["bfactor"] = padA(torch.zeros(M, dtype=torch.float32))
        f["plddt"] = padA(torch.zeros(M, dtype=torch.float32))
    else:
        f["disto_target"] = _one_hot(disto, 64)

    # frames: polymer (N, CA, C); ligand atoms via nearest neighbours (compute_frames_nonpolymer)
    frames = np.zeros((N, 3), dtype=np.int64)
    fmask = np.zeros(N, dtype=bool)
    for i, t in enumerate(tok):
        if t["frame"] is not None:
            frames[i] = t["frame"]
            fmask[i] = True
    if lig_tokens:
        la = np.array([tok[i]["atom0"] for i in lig_tokens])
        dm = np.linalg.norm(coords[la][:, None] - coords[la][None], axis=-1)
        idx = np.argsort(dm, axis=1)
        frames[lig_tokens] = np.concatenate([idx[:, 1:2], idx[:, 0:1], idx[:, 2:3]], axis=1) + la[0]
        fmask[lig_tokens] = True
    fx = coords[frames]
    fmask &= _collinear_mask(fx[:, 1] - fx[:, 0], fx[:, 1] - fx[:, 2])
    if version == 2:
        f["frames_idx"] = torch.from_numpy(frames)[None]
        f["frame_resolved_mask"] = torch.from_numpy(fmask)[None]
    else:
        f["frames_idx"] = torch.from_numpy(frames)
        f["frame_resolved_mask"] = torch.from_numpy(fmask)

    # ---- MSA: row 0 the query; protein columns mutate / gap, ligand columns gap
    S = max(1, int(msa_depth))
    query = np.array([t["res_type"] for t in tok])
    msa = np.tile(query, (S, 1))
    deletion = np.zeros((S, N))
    paired = np.zeros((S, N))
    prot_mask = np.array([t["mol"] == _PROTEIN for t in tok])
    if S > 1:
        mut = (rng.random((S - 1, N)) < 0.3) & prot_mask
        msa[1:][mut] = rng.choice(_AA_IDS, size=int(mut.sum()))
        gap = (rng.random((S - 1, N)) < 0.08) & prot_mask
        msa[1:][gap] = _TOK["-"]
        msa[1:, ~prot_mask] = _TOK["-"]
        dele = (rng.random((S - 1, N)) < 0.1) & prot_mask
        deletion[1:][dele] = rng.integers(1, 6, size=int(dele.sum()))
        n_paired = (S - 1) // 2
        paired[1:1 + n_paired, prot_mask] = 1.0
    paired[0, :] = 1.0
    msa_t = torch.from_numpy(msa).long()
    del_t = torch.from_numpy(deletion).float()
    msa_oh = _one_hot(msa_t, _NUM_TOKENS)
    f["msa"] = msa_oh if version == 1 else msa_t
    f["msa_paired"] = torch.from_numpy(paired).float()
    f["deletion_value"] = (np.pi / 2 * torch.arctan(del_t / 3)).float()
    f["has_deletion"] = del_t > 0
    f["deletion_mean"] = f["deletion_value"].mean(0)
    f["profile"] = msa_oh.float().mean(0)
    f["msa_mask"] = torch.ones(S, N, dtype=torch.long)
    if version == 2 and affinity:
        f["deletion_mean_affinity"] = torch.zeros(N, dtype=torch.float32)
        f["profile_affinity"] = _one_hot(query, _NUM_TOKENS).float()

    # ---- templates (v2 only)
    if version == 2:
        n_t = int(n_templates)
        tdim = max(1, n_t)
        t_res = np.zeros((tdim, N), dtype=np.int64)
        t_rot = np.zeros((tdim, N, 3, 3), dtype=np.float32)
        t_t = np.zeros((tdim, N, 3), dtype=np.float32)
        t_cb = np.zeros((tdim, N, 3), dtype=np.float32)
        t_ca = np.zeros((tdim, N, 3), dtype=np.float32)
        t_fmask = np.zeros((tdim, N), dtype=np.float32)
        t_cbmask = np.zeros((tdim, N), dtype=np.float32)
        t_mask = np.zeros((tdim, N), dtype=np.float32)
        vis = np.zeros((tdim, N), dtype=np.float32)
        asym = np.array([t["asym"] for t in tok])
        for ti in range(n_t):
            noisy = coords + rng.normal(scale=1.0, size=coords.shape)  # a homologue's structure
            covered = [c for c in range(n_chains) if c % n_t == ti]
            for i, t in enumerate(tok):
                if t["mol"] != _PROTEIN or t["asym"] not in covered:
                    continue
                n_, ca_, c_ = (noisy[j] for j in t["frame"])
                rot, tr = _compute_frame(n_, ca_, c_)
                res_t = t["res_type"] if rng.random() > 0.2 else int(rng.choice(_AA_IDS))
                t_res[ti, i] = res_t
                t_rot[ti, i] = rot.reshape(3, 3)
                t_t[ti, i] = tr
                t_cb[ti, i] = noisy[t["disto"]]
                t_ca[ti, i] = noisy[t["center"]]
                t_cbmask[ti, i] = 1.0
                t_fmask[ti, i] = 1.0
                t_mask[ti, i] = 1.0
            for c in range(n_chains + (1 if lig_tokens else 0)):  # compute_template_features
                vis[ti, asym == c] = ti if c in covered else -1 - c
        f["template_restype"] = _one_hot(t_res, _NUM_TOKENS)
        f["template_frame_rot"] = torch.from_numpy(t_rot)
        f["template_frame_t"] = torch.from_numpy(t_t)
        f["template_cb"] = torch.from_numpy(t_cb)
        f["template_ca"] = torch.from_numpy(t_ca)
        f["template_mask_cb"] = torch.from_numpy(t_cbmask)
        f["template_mask_frame"] = torch.from_numpy(t_fmask)
        f["template_mask"] = torch.from_numpy(t_mask)
        f["query_to_template"] = torch.zeros((tdim, N), dtype=torch.long)  # boltz never fills it
        f["visibility_ids"] = torch.from_numpy(vis)
        if n_t > 0:  # process_template_features (real templates) adds the force fields
            f["template_force"] = torch.zeros(tdim, dtype=torch.bool)
            f["template_force_threshold"] = torch.full((tdim,), float("inf"), dtype=torch.float32)
        f["ensemble_ref_idxs"] = torch.tensor([0], dtype=torch.long)

    # ---- constraint features (compute_constraint_features=True, no constraints given)
    f["rdkit_bounds_index"] = torch.empty((2, 0), dtype=torch.long)
    f["rdkit_bounds_bond_mask"] = torch.empty((0,), dtype=torch.bool)
    f["rdkit_bounds_angle_mask"] = torch.empty((0,), dtype=torch.bool)
    f["rdkit_upper_bounds"] = torch.empty((0,), dtype=torch.float)
    f["rdkit_lower_bounds"] = torch.empty((0,), dtype=torch.float)
    f["chiral_atom_index"] = torch.empty((4, 0), dtype=torch.long)
    f["chiral_reference_mask"] = torch.empty((0,), dtype=torch.bool)
    f["chiral_atom_orientations"] = torch.empty((0,), dtype=torch.bool)
    f["stereo_bond_index"] = torch.empty((4, 0), dtype=torch.long)
    f["stereo_reference_mask"] = torch.empty((0,), dtype=torch.bool)
    f["stereo_bond_orientations"] = torch.empty((0,), dtype=torch.bool)
    f["planar_bond_index"] = torch.empty((6, 0), dtype=torch.long)
    f["planar_ring_5_index"] = torch.empty((5, 0), dtype=torch.long)
    f["planar_ring_6_index"] = torch.empty((6, 0), dtype=torch.long)
    f["connected_chain_index"] = torch.empty((2, 0), dtype=torch.long)
    f["connected_atom_index"] = torch.empty((2, 0), dtype=torch.long)
    chains_entity = entity_of + ([max(entity_of) + 1] if lig_tokens else [])
    sym_pairs = [[i, j] for i in range(len(chains_entity)) for j in range(i + 1, len(chains_entity))
                 if chains_entity[i] == chains_entity[j]]
    f["symmetric_chain_index"] = (torch.tensor(sym_pairs, dtype=torch.long).T if sym_pairs
                                  else torch.empty((2, 0), dtype=torch.long))
    if version == 2:
        f["contact_pair_index"] = torch.empty((2, 0), dtype=torch.long)
        f["contact_union_index"] = torch.empty((0,), dtype=torch.long)
        f["contact_negation_mask"] = torch.empty((0,), dtype=torch.bool)
        f["contact_thresholds"] = torch.empty((0,), dtype=torch.float32)

    # ---- collate (batch of one) and device
    out: dict[str, Any] = {k: v.unsqueeze(0).to(device) for k, v in f.items()}
    if version == 2 and affinity and lig_tokens:
        out["affinity_mw"] = [float(sum(_MASS[tok_el] for tok_el in
                                        (atoms[tok[i]["atom0"]]["element"] for i in lig_tokens)))]
    return out


def feature_spec(feats: dict[str, Any]) -> dict[str, tuple]:
    """``{key: (shape, dtype)}`` for the tensors of a feature dict (lists: ``("list", len)``)."""
    return {k: (tuple(v.shape), v.dtype) if isinstance(v, Tensor) else ("list", len(v)) for k, v in feats.items()}


# ----------------------------------------------------------------------------- reference run
class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.buf = stream, io.StringIO()

    def write(self, s):
        self.buf.write(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


def _all_finite(x) -> bool:
    if isinstance(x, Tensor):
        return bool(torch.isfinite(x).all()) if x.is_floating_point() else True
    if isinstance(x, dict):
        return all(_all_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_all_finite(v) for v in x)
    return True


@torch.no_grad()
def run_reference(
    model: nn.Module,
    feats: dict[str, Any],
    *,
    recycling_steps: int = 0,
    num_sampling_steps: int = 2,
    diffusion_samples: int = 1,
    max_parallel_samples: int | None = None,
    seed: int = 0,
    check: bool = True,
) -> dict[str, Any]:
    """Run the eval forward of a full Boltz model with ``torch.manual_seed(seed)`` first.

    ``feats`` is not modified (a shallow copy is passed: boltz writes into its feature dict
    in training mode). Returns boltz's output dict (``pdistogram``, ``s``, ``z``,
    ``sample_atom_coords``, the confidence keys, ``affinity_*`` ...).

    Note on ``num_sampling_steps``: boltz's schedule starts at ``sigma_max * sigma_data``
    (2560 A) and takes steps with ``step_scale`` 1.5, so with fewer than ~10 steps the
    sampled coordinates stay at ~1e3 A whatever the weights: every predicted distance then
    falls in the confidence module's last distance bin (a degenerate input to the
    confidence head, and pTM identical across samples). Use >= 10 steps for a reference
    whose confidence stage sees a real structure (the tests use 10).

    With ``check`` (default) it raises

    * :class:`ConfidenceZeroedError` if boltz's confidence head printed
      ``Error in compute_ptms`` (its ``try/except`` then returns zeros) or if ``ptm`` is
      exactly zero, or ``iptm`` is exactly zero on a multi-chain input;
    * ``FloatingPointError`` if any floating output is not finite.
    """
    if max_parallel_samples is None:
        # boltz-1's AtomDiffusion.sample computes `multiplicity % max_parallel_samples`
        # unguarded (TypeError on None); boltz's predict_step always passes an int.
        max_parallel_samples = diffusion_samples
    torch.manual_seed(seed)
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        out = model(
            dict(feats),
            recycling_steps=recycling_steps,
            num_sampling_steps=num_sampling_steps,
            diffusion_samples=diffusion_samples,
            max_parallel_samples=max_parallel_samples,
        )
    if not check:
        return out
    printed = tee.buf.getvalue()
    if "Error in compute_ptms" in printed:
        msg = printed[printed.index("Error in compute_ptms"):].splitlines()[0]
        raise ConfidenceZeroedError(f"boltz zeroed pTM/ipTM after an exception in compute_ptms: {msg!r}")
    if "ptm" in out:
        if bool((out["ptm"] == 0).any()):
            raise ConfidenceZeroedError(f"ptm is exactly zero: {out['ptm']}")
        multi_chain = int(torch.unique(feats["asym_id"][0]).numel()) > 1
        if multi_chain and bool((out["iptm"] == 0).any()):
            raise ConfidenceZeroedError(f"iptm is exactly zero on a multi-chain input: {out['iptm']}")
    if not _all_finite(out):
        bad = [k for k, v in out.items() if not _all_finite(v)]
        raise FloatingPointError(f"non-finite outputs: {bad}")
    return out
