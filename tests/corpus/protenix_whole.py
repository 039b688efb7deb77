"""ByteDance ``protenix`` (PyPI ``protenix==2.0.0``): the WHOLE ``Protenix``.

Model: ``protenix/model/protenix.py:91 class Protenix`` at tiny widths, built from the
package's own config machinery the way its inference entry point builds it
(``runner/inference.py:580 run``: ``configs_base`` + ``data_configs`` +
``inference_configs``, a model-specific dict deep-merged in, ``parse_configs``), called through
``Protenix.forward`` (``protenix.py:850``) exactly as ``InferenceRunner.predict``
(``runner/inference.py:228``, under ``@torch.no_grad``) calls it::

    prediction, _, _ = self.model(input_feature_dict=data["input_feature_dict"],
        label_full_dict=None, label_dict=None, mode="inference",
        mc_dropout_apply_rate=self.configs.mc_dropout_apply_rate)

Everything the model runs on the inference path: ``generate_relp`` and the atom-pair
windows (``update_input_feature_dict``), input embedder (atom attention encoder), relative
position encoding, token bonds, 1 recycle of template embedder (2 templates) + MSA module
(random MSA sub-sampling, 4 sequences) + pairformer, the diffusion-conditioning /
atom-encoder caches (``enable_diffusion_shared_vars_cache``, an inference default), diffusion
sampling (``sample_diffusion``, 2 steps, ``centre_random_augmentation`` each step), the
distogram head (contact probabilities), the confidence head (its own pairformer; pLDDT /
PAE / PDE / resolved logits) and ``compute_full_data_and_summary`` (pTM / ipTM / ranking
scores, python over chains). The feature dict has the keys, shapes and dtypes of the
inference featurizer (``InferenceDataset.process_one``, ``protenix/data/inference/
infer_dataloader.py:140``; shapes ``protenix/data/utils.py:975 get_data_shape_dict``),
UNBATCHED (``collate_fn_identity``): tokens ``[N, ...]``, pairs ``[N, N, ...]``, MSA
``[S, N]``, templates ``[T, N, N, ...]``, atoms ``[M, ...]``. Protenix has no token padding
(the trunk and confidence head pass ``pair_mask=None``), so no token is padding here.

Determinism: in eval mode the random draws come from two global generators: torch's CPU
generator (the MSA module's ``sample_indices``, ``model/utils.py:306``:
``torch.randint(...).item()`` + ``torch.randperm``; the sampler's ``torch.randn`` noise and
the augmentation's translation) and NUMPY's (the augmentation's rotation,
``model/utils.py:108``: ``scipy.spatial.transform.Rotation.random``, ``random_state=None``).
:func:`reseed` (``torch.manual_seed(s)`` + ``numpy.random.seed(s)``) right before the call
makes it deterministic on one process. The
inference default ``mc_dropout_apply_rate=0.4`` (``configs_base.py:109``) would draw python's
``random.random()`` and, 40% of calls, apply ``F.dropout(p=0.4)`` to the recycled pair (MC
dropout, ``protenix.py:241``); it is set to 0.0 here (dropout 0), as ``runner/train.py:408``
does for training.

``forward`` MUTATES its ``input_feature_dict``: it adds ``relp``, ``d_lm``, ``v_lm``,
``pad_info`` and, after the trunk, deletes the MSA and ``template_*`` keys
(``protenix.py:511-524``). Each call must get its own (shallow) copy of the dict:
:func:`fresh`.

Import: ``LAYERNORM_TYPE=torch`` (as ``protenix.py``); the config modules are the
top-level ``configs`` package protenix installs into site-packages (the repository has no
``configs``). ``Protenix.__init__`` prints ``inference scheduler 16.0`` and sets
``torch.backends.cuda.matmul.allow_tf32`` (no effect on CPU). No file of the package is
modified.
"""

import copy
import os

import torch

from autocp.layout import MsaTiles, Pair2D, RowToken
from tests.corpus.protenix import unavailable as stack_unavailable
from tests.corpus._common import missing, redraw

NAME = "protenix_whole"
PACKAGE = "protenix==2.0.0"

NUM_MSA = 4
NUM_TEMPLATES = 2
ATOM_LENS = (2, 3)  # atoms per token, cycled
C_TOKEN = 16  # c_s_inputs = c_token + 32 (restype) + 32 (profile) + 1 (deletion_mean)

def unavailable():
    """The skip reason (None when the whole model can be built): the stack harness's checks,
    then the top-level model module and the config modules it is built from."""
    why = stack_unavailable()
    if why:
        return why
    m = missing("ml_collections", "configs")
    if m:
        return f"{m} is not importable (install the corpus: bash scripts/install_corpus.sh)"
    try:
        os.environ.setdefault("LAYERNORM_TYPE", "torch")
        import configs.configs_base  # noqa: F401
        import configs.configs_data  # noqa: F401
        import configs.configs_inference  # noqa: F401
        import protenix.model.protenix  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"protenix.model.protenix / configs do not import: {type(e).__name__}: {str(e)[:200]}"
    return None


# deep-merged into configs_base + data_configs + inference_configs, as runner/inference.py:617
# merges configs_model_type.model_configs[model_name]; sizes follow the package's tiny/mini
# models (protenix_tiny_default_v0.5.0: 1 MSA block, gamma0 0, step_scale_eta 1.0)
TINY = {
    "c_s": 16,
    "c_z": 8,
    "c_s_inputs": C_TOKEN + 65,
    "c_atom": 8,
    "c_atompair": 8,
    "c_token": C_TOKEN,
    "n_blocks": 2,  # pairformer
    "triangle_multiplicative": "torch",  # the config default "cuequivariance" needs a GPU package
    "triangle_attention": "torch",       # (runner/inference.py:571 forces "torch" on V100 too)
    "dtype": "fp32",
    "mc_dropout_apply_rate": 0.0,
    "sample_diffusion": {"gamma0": 0, "step_scale_eta": 1.0, "N_step": 2, "N_sample": 1},
    "model": {
        "N_cycle": 1,
        "template_embedder": {"c": 8, "n_blocks": 1, "dropout": 0.0},
        "msa_module": {"c_m": 8, "n_blocks": 1, "msa_dropout": 0.0, "pair_dropout": 0.0},
        "pairformer": {"n_heads": 2, "dropout": 0.0},
        "diffusion_module": {
            "c_token": 16,
            "atom_encoder": {"n_blocks": 1, "n_heads": 2},
            "transformer": {"n_blocks": 1, "n_heads": 2},
            "atom_decoder": {"n_blocks": 1, "n_heads": 2},
        },
        "confidence_head": {"n_blocks": 1, "pairformer_dropout": 0.0},
    },
}


def _deep_update(d, u):
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _deep_update(d[k], v)
        else:
            d[k] = v
    return d


def config():
    """The parsed ``ConfigDict`` ``Protenix(config())`` is built from (tiny, dropout 0)."""
    os.environ.setdefault("LAYERNORM_TYPE", "torch")
    from configs.configs_base import configs as configs_base
    from configs.configs_data import data_configs
    from configs.configs_inference import inference_configs
    from protenix.config import parse_configs

    base = copy.deepcopy({**configs_base, **{"data": data_configs}, **inference_configs})
    return parse_configs(configs=_deep_update(base, copy.deepcopy(TINY)), arg_str=None,
                         fill_required_with_null=True)


def _model(seed):
    os.environ.setdefault("LAYERNORM_TYPE", "torch")
    from protenix.model.protenix import Protenix

    # every parameter re-drawn (randn * 0.3, seeded; the recycling / output layers are zero-init),
    # eval mode
    return redraw(Protenix(config()), seed)


def _features(seed, n):
    """The inference feature dict of one protein chain of ``n`` tokens (unbatched)."""
    g = torch.Generator().manual_seed(seed + 1)
    lens = torch.tensor([ATOM_LENS[i % len(ATOM_LENS)] for i in range(n)])
    m = int(lens.sum())
    tok = torch.arange(n)
    a2t = torch.repeat_interleave(tok, lens)                       # atom -> token
    start = torch.cumsum(lens, 0) - lens
    a2ta = torch.arange(m) - start[a2t]                            # atom -> index within its token
    aa = torch.randint(0, 20, (n,), generator=g)
    restype = torch.nn.functional.one_hot(aa, 32).float()

    # MSA: the query first, then mutated copies (the MSA featurizer's int rows, 0..31)
    msa = torch.randint(0, 20, (NUM_MSA, n), generator=g)
    msa[0] = aa
    has_deletion = (torch.rand(NUM_MSA, n, generator=g) < 0.2).float()
    deletion_value = has_deletion * torch.rand(NUM_MSA, n, generator=g)
    profile = torch.nn.functional.one_hot(msa, 32).float().mean(0)

    # reference conformers: one residue-like group of atoms per token
    ref_pos = torch.randn(m, 3, generator=g) * 1.5
    ref_element = torch.nn.functional.one_hot(torch.tensor([6, 5, 7])[a2ta % 3], 128).float()  # N/C/O-ish
    ref_atom_name_chars = torch.nn.functional.one_hot(torch.randint(0, 64, (m, 4), generator=g), 64).float()
    rep = torch.zeros(m, dtype=torch.long)
    rep[start + lens - 1] = 1                                      # one representative atom per token

    # templates (TemplateFeatures.as_protenix_dict): pseudo-beta distogram one-hot over 39 bins
    # 3.25..50.75 A, unit vectors, 2-D masks, per template
    pos = torch.cumsum(torch.randn(NUM_TEMPLATES, n, 3, generator=g) * 2.2, 1)
    dist = torch.cdist(pos, pos)
    edges = torch.linspace(3.25, 50.75, 38)
    template_distogram = torch.nn.functional.one_hot(torch.bucketize(dist, edges), 39).float()
    diff = pos[:, None, :, :] - pos[:, :, None, :]
    template_unit_vector = diff / (diff.norm(dim=-1, keepdim=True) + 1e-6)
    ones2 = torch.ones(NUM_TEMPLATES, n, n)

    return dict(
        # token features
        residue_index=tok + 1,
        token_index=tok.clone(),
        asym_id=torch.zeros(n, dtype=torch.long),
        entity_id=torch.zeros(n, dtype=torch.long),
        sym_id=torch.zeros(n, dtype=torch.long),
        restype=restype,
        has_frame=torch.ones(n, dtype=torch.long),
        frame_atom_index=torch.stack([start, start + 1, start + lens - 1], -1),
        token_bonds=torch.zeros(n, n),                             # polymer bonds are not token bonds
        # MSA
        msa=msa,
        has_deletion=has_deletion,
        deletion_value=deletion_value,
        profile=profile,
        deletion_mean=deletion_value.mean(0),
        # templates
        template_aatype=torch.randint(0, 20, (NUM_TEMPLATES, n), generator=g),
        template_atom_positions=torch.randn(NUM_TEMPLATES, n, 24, 3, generator=g),
        template_atom_mask=torch.ones(NUM_TEMPLATES, n, 24),
        template_pseudo_beta_mask=ones2.clone(),
        template_distogram=template_distogram,
        template_unit_vector=template_unit_vector,
        template_backbone_frame_mask=ones2.clone(),
        # atom features
        ref_pos=ref_pos,
        ref_mask=torch.ones(m),
        ref_element=ref_element,
        ref_charge=torch.zeros(m),
        ref_atom_name_chars=ref_atom_name_chars,
        ref_space_uid=a2t.clone(),
        atom_to_token_idx=a2t,
        atom_to_tokatom_idx=a2ta,
        distogram_rep_atom_mask=rep,
        is_protein=torch.ones(m),
        is_rna=torch.zeros(m),
        is_dna=torch.zeros(m),
        is_ligand=torch.zeros(m),
        mol_id=torch.zeros(m, dtype=torch.long),
        entity_mol_id=torch.zeros(m, dtype=torch.long),
        mol_atom_index=torch.arange(m),
    )


# unbatched: the token dim is 0 (templates / MSA: 1)
FEATURE_LAYOUTS = dict(
    residue_index=RowToken(0),             # [n] int
    token_index=RowToken(0),               # [n] int
    asym_id=RowToken(0),                   # [n] int
    entity_id=RowToken(0),                 # [n] int
    sym_id=RowToken(0),                    # [n] int
    restype=RowToken(0),                   # [n, 32]
    has_frame=RowToken(0),                 # [n] int
    frame_atom_index=RowToken(0),          # [n, 3] int (atom indices)
    token_bonds=Pair2D((0, 1)),            # [n, n]
    msa=MsaTiles(0, 1),                    # [s, n] int
    has_deletion=MsaTiles(0, 1),           # [s, n]
    deletion_value=MsaTiles(0, 1),         # [s, n]
    profile=RowToken(0),                   # [n, 32]
    deletion_mean=RowToken(0),             # [n]
    template_aatype=RowToken(1),           # [t, n] int
    template_atom_positions=RowToken(1),   # [t, n, 24, 3]
    template_atom_mask=RowToken(1),        # [t, n, 24]
    template_pseudo_beta_mask=Pair2D((1, 2)),     # [t, n, n]
    template_distogram=Pair2D((1, 2)),            # [t, n, n, 39]
    template_unit_vector=Pair2D((1, 2)),          # [t, n, n, 3]
    template_backbone_frame_mask=Pair2D((1, 2)),  # [t, n, n]
    # atom level [m, ...]: replicated
    ref_pos=None, ref_mask=None, ref_element=None, ref_charge=None, ref_atom_name_chars=None,
    ref_space_uid=None, atom_to_token_idx=None, atom_to_tokatom_idx=None, distogram_rep_atom_mask=None,
    is_protein=None, is_rna=None, is_dna=None, is_ligand=None, mol_id=None, entity_mol_id=None,
    mol_atom_index=None,
)

# the outputs compared (``pred_dict`` keys, in order); confidence=True adds the heads' logits
OUTPUTS = ("coordinate", "contact_probs")
CONFIDENCE_OUTPUTS = ("plddt", "pae", "pde", "resolved")


def reseed(seed: int):
    """Seed both generators the inference call draws from (torch's and numpy's global ones)."""
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)


def fresh(args, kwargs):
    """``(args, kwargs)`` with a new (shallow) ``input_feature_dict`` (``forward`` mutates it)."""
    return args, {k: (dict(v) if isinstance(v, dict) else v) for k, v in kwargs.items()}


def build(seed: int = 0, n: int = 7, confidence: bool = False):
    """``(model, (args, kwargs), layouts, description)``: ``model(*args, **fresh-kwargs)`` returns
    ``(pred_dict, None, log_dict)``; ``pred_dict["coordinate"]`` is ``[1, m, 3]`` (N_sample 1;
    m = 17 for n = 7), ``contact_probs [n, n]``, ``plddt [1, m, 50]``, ``pae / pde [1, n, n, 64]``,
    ``resolved [1, m, 2]``, ``summary_confidence`` / ``full_data`` (lists of dicts). Deterministic
    given :func:`reseed` right before the call. Pass each call its own dict
    (:func:`fresh`): ``forward`` adds and deletes keys of it.

    Protenix's inference always runs the confidence head; ``confidence`` only selects what
    :func:`outputs` compares: ``coordinate`` and ``contact_probs`` (the distogram head on the
    trunk's pair), plus, with ``confidence=True``, the pLDDT / PAE / PDE / resolved logits (from the
    trunk pair through the confidence head's own pairformer, ``confidence.py:307``).

    Pair-path response (seed 0, n = 7; rolling ``template_distogram``'s bins, adding an
    off-diagonal ``token_bonds``, negating ``template_unit_vector``, shifting ``msa``): the
    sampled positions move by only 5e-4 .. 1.5e-3 of their scale (2 steps from noise),
    ``contact_probs`` by 5e-2 .. 6e-1, PAE by 4e-2 .. 2e-1, PDE by 8e-3 .. 8e-2."""
    if n < 2:
        raise ValueError(f"build: n={n}; required n >= 2")
    model = _model(seed)
    kwargs = dict(input_feature_dict=_features(seed, n), label_full_dict=None, label_dict=None, mode="inference",
                  mc_dropout_apply_rate=model.configs.mc_dropout_apply_rate)
    layouts = dict(input_feature_dict=dict(FEATURE_LAYOUTS))  # the other arguments are not tensors
    return model, ((), kwargs), layouts, (
        "Protenix.forward(input_feature_dict=feat, label_full_dict=None, label_dict=None, mode='inference', "
        "mc_dropout_apply_rate=0.0) (protenix.py:850), as InferenceRunner.predict (runner/inference.py:228) "
        "calls it under torch.no_grad")


def outputs(result, confidence: bool = False):
    """The compared tensors of a ``forward`` result ``(pred_dict, label_dict, log_dict)``."""
    pred = result[0]
    return [pred[k] for k in OUTPUTS + (CONFIDENCE_OUTPUTS if confidence else ())]


def whole_parity_worker(rank, world, seed=0, n=7, confidence=False):
    """The whole model through ``autocp.parallelize`` against the single-device call, same seed,
    both under ``torch.no_grad`` (as ``InferenceRunner.predict``): max error of every compared
    output relative to its scale, the pair gathers warned, and the eager-engine warning if the
    capture failed.

    Path (see tests/corpus/test_whole_models.py): the capture fails on ``int(index.max()) + 1``
    (``protenix/utils/scatter_utils.py:49``), so the model runs on the eager engine with
    islands; the inference-only in-place triangle multiplications (``triangular.py:521``,
    ``z += x`` into a redistributed value) cannot be sharded as graphs and run op by op; the
    MSA sub-sample size (``model/utils.py:306`` ``.item()``) keeps the MSA module eager."""
    import warnings

    import autocp

    mesh = autocp.init_mesh()
    model, (args, kwargs), layouts, _ = build(seed, n, confidence)
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        with torch.no_grad():
            pm = autocp.parallelize(model, mesh, example_inputs=fresh(args, kwargs), input_layouts=layouts)
            reseed(seed)
            a, k = fresh(args, kwargs)
            got = outputs(pm(*a, **k), confidence)
    with torch.no_grad():
        reseed(seed)
        a, k = fresh(args, kwargs)
        ref = outputs(model(*a, **k), confidence)
    errs = [float((x - y).abs().max()) / max(float(y.abs().max()), 1e-6) for x, y in zip(got, ref)]
    msgs = [str(w.message) for w in wl]
    return {"rel_err": errs, "gathers": sum("gather" in m for m in msgs), "explain": pm.explain(),
            "gather_msgs": [m[:400] for m in msgs if "gather" in m],
            "engine": [m for m in msgs if "eager engine" in m]}
