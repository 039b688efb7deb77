"""lucidrains ``alphafold3-pytorch`` (PyPI ``alphafold3-pytorch==0.8.3``): the WHOLE ``Alphafold3``.

Model: ``alphafold3_pytorch/alphafold3.py:6294 class Alphafold3`` at tiny widths, called for
inference (no labels, no ``atom_pos`` -> ``return_loss`` is False -> ``edm.sample`` returns
the sampled atom positions ``[b, m, 3]``), through its ``forward``
(``alphafold3.py:6860``) with the keyword batch its own inference path builds:
``Alphafold3.forward_with_alphafold3_inputs`` (``alphafold3.py:6857``:
``self.forward(**atom_dict, **kwargs)``, reached from ``cli.py:51`` with ``num_sample_steps``).
The batch is padded the way its collate (``inputs.py:4676-4685``) pads: ints -1,
``molecule_atom_lens`` 0 (-> token mask ``molecule_atom_lens > 0``, ``alphafold3.py:7181``),
bools False, floats 0. The last token is such a padding token.

Everything the model runs on the path: input embedder (atom transformer, windowed atom
pairs), relative position encoding, token bonds, template embedder (2 templates), MSA module
(4 sequences), pairformer trunk, diffusion sampling (``ElucidatedAtomDiffusion.sample``,
2 steps, second-order Karras correction, ``CentreRandomAugmentation`` each step), final atom
mask. The confidence / distogram heads are built but not called (the call returns positions
only, as ``cli.py`` uses it).

Determinism: the sampler draws its noise (``torch.randn`` initial positions and churn, and
``torch.rand``/``torch.randn`` random rotation/translation of the augmenter) from torch's
global CPU generator, and nothing else is random in eval mode (dropout 0; the MSA is never
sub-sampled since ``max_num_msa`` is unset). So ``torch.manual_seed(s)`` right before the call
makes it deterministic on one process.

Import: like ``alphafold3_pytorch.py``, the package ``__init__`` (trainer -> lightning, app ->
gradio) is not run: the package path is registered and ``alphafold3_pytorch.alphafold3`` is
imported directly. No file of the package is modified. The package's ``tqdm`` progress bar of
the sampler (``use_tqdm_pbar=True`` by default, not a ``forward`` argument) prints to stderr.
"""

import torch

from autocp.layout import MsaTiles, Pair2D, RowToken
from tests.corpus._common import redraw
from tests.corpus.alphafold3_pytorch import af3_module, unavailable  # noqa: F401 (unavailable: the skip reason)

NAME = "alphafold3_pytorch_whole"
PACKAGE = "alphafold3-pytorch==0.8.3"

# tiny config (widths 8-16)
DIM_ATOM_INPUTS = 8
DIM_TEMPLATE_FEATS = 8
ATOMS_PER_WINDOW = 4
NUM_MSA = 4
NUM_TEMPLATES = 2
ATOM_LENS = (2, 3)  # atoms per real token, cycled


def _pairwise_block_kwargs():
    return dict(tri_mult_dim_hidden=8, tri_attn_dim_head=4, tri_attn_heads=2,
                dropout_row_prob=0.0, dropout_col_prob=0.0)


def config():
    """The ``Alphafold3(**config())`` keyword arguments (tiny widths, dropout 0)."""
    return dict(
        dim_atom_inputs=DIM_ATOM_INPUTS,
        dim_template_feats=DIM_TEMPLATE_FEATS,
        dim_template_model=8,
        atoms_per_window=ATOMS_PER_WINDOW,
        dim_atom=8,
        dim_atompair=8,
        dim_input_embedder_token=16,
        dim_single=16,
        dim_pairwise=8,
        dim_token=16,
        # dim_msa_inputs (32), dim_additional_msa_feats (2), dim_additional_token_feats (33),
        # num_molecule_mods (4): package defaults (the data's feature sizes)
        input_embedder_kwargs=dict(atom_transformer_blocks=1, atom_transformer_heads=2,
                                   atom_transformer_kwargs=dict()),
        confidence_head_kwargs=dict(pairformer_depth=1),
        template_embedder_kwargs=dict(pairformer_stack_depth=1, pairwise_block_kwargs=_pairwise_block_kwargs(),
                                      layerscale_output=True),
        msa_module_kwargs=dict(depth=1, dim_msa=8, outer_product_mean_dim_hidden=4, msa_pwa_dropout_row_prob=0.0,
                               msa_pwa_heads=2, msa_pwa_dim_head=4, pairwise_block_kwargs=_pairwise_block_kwargs(),
                               layerscale_output=True),
        pairformer_stack=dict(depth=2, pair_bias_attn_dim_head=8, pair_bias_attn_heads=2, dropout_row_prob=0.0,
                              pairwise_block_kwargs=_pairwise_block_kwargs()),
        diffusion_module_kwargs=dict(
            dim_fourier=16,
            single_cond_kwargs=dict(num_transitions=1, transition_expansion_factor=2),
            pairwise_cond_kwargs=dict(num_transitions=1),
            atom_encoder_depth=1, atom_encoder_heads=2,
            token_transformer_depth=1, token_transformer_heads=2,
            atom_decoder_depth=1, atom_decoder_heads=2,
        ),
        # the package's defaults, except step_scale 1.0 (default 1.5): with 1.5 each step keeps
        # -0.5x the noisy input, so 2 sampling steps leave the positions dominated by the initial
        # noise and a 10% change of the trunk's pair representation moves them by ~1e-3 on ~1e3
        # (1.0: ~1e-1); see build()
        edm_kwargs=dict(sigma_min=0.002, sigma_max=80, rho=7, P_mean=-1.2, P_std=1.2, S_churn=80, S_tmin=0.05,
                        S_tmax=50, S_noise=1.003, step_scale=1.0),
    )


def _model(seed):
    af3 = af3_module()
    model = af3.Alphafold3(**config())
    # every parameter re-drawn (randn * 0.3, seeded; AF3-style init zeroes output projections and
    # layerscales), eval mode. At randn * 0.1 the templates / MSA / pair trunk change the sampled
    # positions by exactly 0 in fp32 (their signal is below one ulp of the ~1e3 positions).
    return redraw(model, seed)


def _inputs(seed, n, confidence=False):
    """The inference batch of ``n`` tokens (token ``n-1`` is collate padding), batch 1."""
    from alphafold3_pytorch.inputs import ADDITIONAL_MOLECULE_FEATS, DEFAULT_NUM_MOLECULE_MODS, IS_MOLECULE_TYPES, \
        NUM_MSA_ONE_HOT

    g = torch.Generator().manual_seed(seed + 1)
    nr = n - 1  # real tokens: one protein chain of nr residues
    lens = torch.tensor([ATOM_LENS[i % len(ATOM_LENS)] for i in range(nr)] + [0])
    total = int(lens.sum())
    m = total  # batch of one: the collate pads atoms to the longest structure, i.e. not at all
    # (the model pads to whole windows itself; ConfidenceHead needs m == sum(molecule_atom_lens))

    atom_inputs = torch.randn(1, m, DIM_ATOM_INPUTS, generator=g)
    atompair_inputs = torch.randn(1, m, m, 5, generator=g)

    ar = torch.arange(nr)
    amf = torch.stack([ar, ar, torch.zeros_like(ar), torch.zeros_like(ar), torch.zeros_like(ar)], -1)
    additional_molecule_feats = torch.cat([amf, torch.full((1, ADDITIONAL_MOLECULE_FEATS), -1)])[None]

    is_molecule_types = torch.zeros(1, n, IS_MOLECULE_TYPES, dtype=torch.bool)
    is_molecule_types[0, :nr, 0] = True  # protein
    is_molecule_mod = torch.zeros(1, n, DEFAULT_NUM_MOLECULE_MODS, dtype=torch.bool)
    is_molecule_mod[0, 1, 0] = True  # one modified residue (mod_protein)

    molecule_ids = torch.cat([torch.randint(0, 20, (nr,), generator=g), torch.tensor([-1])])[None]
    additional_token_feats = torch.randn(1, n, 33, generator=g)
    additional_token_feats[0, nr:] = 0.0

    token_bonds = torch.zeros(1, n, n, dtype=torch.bool)
    token_bonds[0, ar[:-1], ar[1:]] = True  # peptide bonds i -> i+1 (the model symmetrises)

    tv = (torch.arange(n) < nr).float()
    msa_ids = torch.randint(0, 20, (1, NUM_MSA, n), generator=g)
    msa = torch.nn.functional.one_hot(msa_ids, NUM_MSA_ONE_HOT).float() * tv[None, None, :, None]
    additional_msa_feats = torch.rand(1, NUM_MSA, n, 2, generator=g) * tv[None, None, :, None]

    templates = (torch.randn(1, NUM_TEMPLATES, n, n, DIM_TEMPLATE_FEATS, generator=g)
                 * (tv[:, None] * tv[None, :])[None, None, :, :, None])
    template_mask = torch.ones(1, NUM_TEMPLATES, dtype=torch.bool)

    extra = {}
    if confidence:
        # the token centre atom (last atom of each token, as the package's mock data set picks it;
        # -1 on the padding token, as its collate pads ints); ConfidenceHead gathers it
        mai = torch.cumsum(lens, 0) - 1
        mai[nr:] = -1
        extra = dict(molecule_atom_indices=mai[None], return_confidence_head_logits=True)

    return dict(
        atom_inputs=atom_inputs,
        atompair_inputs=atompair_inputs,
        additional_molecule_feats=additional_molecule_feats,
        is_molecule_types=is_molecule_types,
        molecule_atom_lens=lens[None],
        molecule_ids=molecule_ids,
        additional_msa_feats=additional_msa_feats,
        additional_token_feats=additional_token_feats,
        is_molecule_mod=is_molecule_mod,
        token_bonds=token_bonds,
        msa=msa,
        templates=templates,
        template_mask=template_mask,
        num_recycling_steps=1,
        num_sample_steps=2,
        **extra,
    )


LAYOUTS = dict(
    atom_inputs=None,                    # [b, m, dai]        atom level: replicated
    atompair_inputs=None,                # [b, m, m, 5]       atom level: replicated
    additional_molecule_feats=RowToken(),  # [b, n, 5] int
    is_molecule_types=RowToken(),        # [b, n, 5] bool
    molecule_atom_lens=RowToken(),       # [b, n] int
    molecule_ids=RowToken(),             # [b, n] int
    additional_msa_feats=MsaTiles(),     # [b, s, n, 2]
    additional_token_feats=RowToken(),   # [b, n, 33]
    is_molecule_mod=RowToken(),          # [b, n, 4] bool
    token_bonds=Pair2D(),                # [b, n, n] bool
    msa=MsaTiles(),                      # [b, s, n, 32]
    templates=Pair2D((2, 3)),            # [b, t, n, n, 8]
    template_mask=None,                  # [b, t] bool: no token dim, replicated
    molecule_atom_indices=RowToken(),    # [b, n] int (confidence=True only)
)


def build(seed: int = 0, n: int = 7, confidence: bool = False):
    """``(model, (args, kwargs), layouts, description)``: ``model(*args, **kwargs)`` returns the
    sampled atom positions ``[1, m, 3]`` (m = 15 for n = 7); deterministic given
    ``torch.manual_seed(s)`` right before the call (the sampler's noise).

    The positions see the pair trunk only through the diffusion module's pair conditioning
    (a weak signal: a 10% change of the trunk's pair representation moves them by ~1e-1 on
    ~1e3). ``confidence=True`` adds ``molecule_atom_indices`` and
    ``return_confidence_head_logits=True`` (a flag of the same ``forward``): the call then returns
    ``(positions, ConfidenceHeadLogits(pae [1,64,n,n], pde [1,64,n,n], plddt [1,50,m],
    resolved [1,2,m]))``, whose pair logits come from the trunk's pair representation through
    the confidence head's own pairformer (``alphafold3.py:7332``)."""
    if n < 3:
        raise ValueError(f"build: n={n}; required n >= 3 (n-1 real tokens and one padding token)")
    model = _model(seed)
    kwargs = _inputs(seed, n, confidence)
    layouts = {k: v for k, v in LAYOUTS.items() if k in kwargs}
    return model, ((), kwargs), layouts, ("Alphafold3.forward(**batch, num_recycling_steps=1, num_sample_steps=2) "
                                          "(alphafold3.py:6860), as forward_with_alphafold3_inputs "
                                          "(alphafold3.py:6857) calls it for cli.py:51")


def whole_parity_worker(rank, world, seed=0, n=7, confidence=False):
    """The whole model through ``autocp.parallelize`` (its capture fails on a value ``assert``
    and the sampler's ``.item()``, so it runs on the eager engine) against the single-device
    call, same seed: max error of every output relative to its scale, the pair gathers
    warned, and whether the eager-engine warning named the module and line."""
    import warnings

    import autocp

    mesh = autocp.init_mesh()
    model, (args, kwargs), layouts, _ = build(seed, n, confidence)
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        pm = autocp.parallelize(model, mesh, example_inputs=(args, kwargs), input_layouts=layouts)
        with torch.no_grad():
            torch.manual_seed(seed)
            got = pm(*args, **kwargs)
    with torch.no_grad():
        torch.manual_seed(seed)
        ref = model(*args, **kwargs)
    def flat(x):  # tensors of a (nested) tuple / named tuple / dataclass output
        import dataclasses

        if isinstance(x, torch.Tensor):
            return [x]
        if dataclasses.is_dataclass(x):
            x = [getattr(x, f.name) for f in dataclasses.fields(x)]
        elif isinstance(x, dict):
            x = list(x.values())
        return [t for v in (x if isinstance(x, (tuple, list)) else []) for t in flat(v)]

    errs = [float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6) for a, b in zip(flat(got), flat(ref))]
    msgs = [str(w.message) for w in wl]
    return {"rel_err": errs, "gathers": sum("gather" in m for m in msgs), "explain": pm.explain(),
            "gather_msgs": [m[:400] for m in msgs if "gather" in m],
            "engine": [m for m in msgs if "eager engine" in m]}
