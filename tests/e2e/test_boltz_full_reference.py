"""The whole Boltz-2 / Boltz-1 models as a single-device parity reference
(autocp.models.boltz_full): valid features at any N, tiny random-weight models whose eval
forward runs end to end with non-zero pTM/ipTM, reproducible by seed.

The feature tests need only torch; the model tests skip (with the install hint) when the
full-model dependencies (pytorch_lightning, torchmetrics, einx, ...) are missing."""

import time

import pytest
import torch

from autocp.models import boltz_full as bf

needs_full = pytest.mark.skipif(
    not bf.boltz_full_available(), reason=f"full Boltz models not installed: {bf.INSTALL_HINT}"
)

SAMPLING_STEPS = 10  # < ~10 leaves boltz's sampler at ~1e3 A (see run_reference)
TIME_LIMIT_S = 60.0


# ----------------------------------------------------------------------------- features
def _expected(version, N, M, S, T, R, lig):
    """{key: (shape, dtype)} of Boltz{1,2}Featurizer.process after collate (batch 1)."""
    L, F, B = torch.long, torch.float32, torch.bool
    e = {
        "token_index": ((N,), L), "residue_index": ((N,), L), "asym_id": ((N,), L), "entity_id": ((N,), L),
        "sym_id": ((N,), L), "mol_type": ((N,), L), "res_type": ((N, 33), L), "disto_center": ((N, 3), F),
        "token_bonds": ((N, N, 1), F), "token_pad_mask": ((N,), F), "token_resolved_mask": ((N,), F),
        "token_disto_mask": ((N,), F),
        "ref_pos": ((M, 3), F), "atom_resolved_mask": ((M,), B), "ref_atom_name_chars": ((M, 4, 64), L),
        "ref_element": ((M, 128), L), "ref_space_uid": ((M,), L), "coords": ((1, M, 3), F),
        "atom_pad_mask": ((M,), F), "atom_to_token": ((M, N), L), "token_to_rep_atom": ((N, M), L),
        "r_set_to_rep_atom": ((R, M), L),
        "msa_paired": ((S, N), F), "deletion_value": ((S, N), F), "has_deletion": ((S, N), B),
        "deletion_mean": ((N,), F), "profile": ((N, 33), F), "msa_mask": ((S, N), L),
        "rdkit_bounds_index": ((2, 0), L), "rdkit_bounds_bond_mask": ((0,), B),
        "rdkit_bounds_angle_mask": ((0,), B), "rdkit_upper_bounds": ((0,), F), "rdkit_lower_bounds": ((0,), F),
        "chiral_atom_index": ((4, 0), L), "chiral_reference_mask": ((0,), B),
        "chiral_atom_orientations": ((0,), B), "stereo_bond_index": ((4, 0), L),
        "stereo_reference_mask": ((0,), B), "stereo_bond_orientations": ((0,), B),
        "planar_bond_index": ((6, 0), L), "planar_ring_5_index": ((5, 0), L), "planar_ring_6_index": ((6, 0), L),
        "connected_chain_index": ((2, 0), L), "connected_atom_index": ((2, 0), L),
        "symmetric_chain_index": ((2, 0), L),
    }
    if version == 1:
        e.update({
            "pocket_feature": ((N, 4), L), "cyclic_period": ((N,), torch.int32), "ref_charge": ((M,), torch.int8),
            "disto_target": ((N, N, 64), L), "frames_idx": ((N, 3), L), "frame_resolved_mask": ((N,), B),
            "msa": ((S, N, 33), L),
        })
        return e
    e.update({
        "type_bonds": ((N, N), L), "contact_conditioning": ((N, N, 5), L), "contact_threshold": ((N, N), F),
        "method_feature": ((N,), L), "modified": ((N,), L), "cyclic_period": ((N,), F),
        "affinity_token_mask": ((N,), F),
        "ref_charge": ((M,), F), "ref_chirality": ((M,), L), "atom_backbone_feat": ((M, 17), L),
        "token_to_center_atom": ((N, M), L), "disto_target": ((N, N, 1, 64), F),
        "disto_coords_ensemble": ((1, N, 3), F), "bfactor": ((M,), F), "plddt": ((M,), F),
        "frames_idx": ((1, N, 3), L), "frame_resolved_mask": ((1, N), B),
        "msa": ((S, N), L), "deletion_mean_affinity": ((N,), F), "profile_affinity": ((N, 33), F),
        "template_restype": ((T, N, 33), L), "template_frame_rot": ((T, N, 3, 3), F),
        "template_frame_t": ((T, N, 3), F), "template_cb": ((T, N, 3), F), "template_ca": ((T, N, 3), F),
        "template_mask_cb": ((T, N), F), "template_mask_frame": ((T, N), F), "template_mask": ((T, N), F),
        "query_to_template": ((T, N), L), "visibility_ids": ((T, N), F),
        "template_force": ((T,), B), "template_force_threshold": ((T,), F),
        "ensemble_ref_idxs": ((1,), L),
        "contact_pair_index": ((2, 0), L), "contact_union_index": ((0,), L),
        "contact_negation_mask": ((0,), B), "contact_thresholds": ((0,), F),
    })
    return e


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("n_tokens", [24, 37])
def test_features_keys_shapes_dtypes(n_tokens, version):
    S, T = 8, 1
    f = bf.make_features(n_tokens, seed=0, version=version, msa_depth=S, n_templates=T)
    lig = int((f["mol_type"][0] == 3).sum())
    n_atoms = int(f["atom_pad_mask"].sum())
    M = f["atom_pad_mask"].shape[1]
    R = n_tokens - lig  # resolved polymer tokens
    exp = _expected(version, n_tokens, M, S, T, R, lig)
    tensors = {k: v for k, v in f.items() if isinstance(v, torch.Tensor)}
    assert set(tensors) == set(exp), (set(tensors) ^ set(exp))
    for k, (shape, dtype) in exp.items():
        assert tuple(tensors[k].shape) == (1, *shape), (k, tuple(tensors[k].shape), shape)
        assert tensors[k].dtype == dtype, (k, tensors[k].dtype, dtype)
    if version == 2:
        assert f["affinity_mw"] and isinstance(f["affinity_mw"][0], float)
    # atoms padded to the 32-atom window, residues of 8..14 atoms, a 3+-atom ligand
    assert M % 32 == 0 and M - n_atoms < 32
    per_tok = f["atom_to_token"][0].sum(0)
    prot = f["mol_type"][0] == 0
    assert lig >= 3 and int(torch.unique(f["asym_id"][0]).numel()) == 3
    assert bool(((per_tok[prot] >= 8) & (per_tok[prot] <= 14)).all()) and bool((per_tok[~prot] == 1).all())


@pytest.mark.parametrize("version", [2, 1])
def test_features_are_consistent(version):
    f = {k: v[0] for k, v in bf.make_features(37, seed=5, version=version).items() if isinstance(v, torch.Tensor)}
    real = f["atom_pad_mask"].bool()
    # dense one-hots: every real atom in exactly one token, padding in none; one rep atom per token
    assert bool((f["atom_to_token"][real].sum(-1) == 1).all()) and int(f["atom_to_token"][~real].sum()) == 0
    assert bool((f["token_to_rep_atom"].sum(-1) == 1).all())
    assert bool((f["res_type"].sum(-1) == 1).all()) and bool((f["ref_element"][real].sum(-1) == 1).all())
    # the rep (distogram) atom belongs to its own token
    rep = f["token_to_rep_atom"].argmax(-1)
    assert torch.equal(f["atom_to_token"][rep].argmax(-1), torch.arange(37))
    # frames index real atoms of the token's chain
    frames = f["frames_idx"].reshape(-1, 3)
    assert int(frames.max()) < int(real.sum())
    # chain-like geometry: consecutive CA (rep of protein is CB; use the frame's middle atom)
    xyz = f["coords"][0]
    ca = xyz[frames[:, 1]]
    asym, prot = f["asym_id"], f["mol_type"] == 0
    same = (asym[1:] == asym[:-1]) & prot[1:] & prot[:-1]
    step = (ca[1:] - ca[:-1]).norm(dim=-1)[same]
    assert torch.allclose(step, torch.full_like(step, 3.8), atol=1e-3)
    rep_xyz = torch.bmm(f["token_to_rep_atom"].float()[None], xyz[None])[0]
    d = torch.cdist(rep_xyz, rep_xyz)
    off = ~torch.eye(37, dtype=torch.bool)
    assert float(d[off].min()) > 1.0 and float(d[off].median()) < 22.0  # non-degenerate distogram
    # pocket conditioning marks the ligand as binder
    if version == 2:
        cc = f["contact_conditioning"].argmax(-1)
        assert bool((cc == 3).any()) and bool((cc == 2).any())
    else:
        assert bool((f["pocket_feature"].argmax(-1) == 2).any())


def test_features_seeded():
    a, b, c = (bf.make_features(37, seed=s) for s in (3, 3, 4))
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
    assert not torch.equal(a["coords"], c["coords"]) and not torch.equal(a["res_type"], c["res_type"])


def test_features_options():
    f = bf.make_features(30, seed=1, n_chains=3, n_templates=2, homomer=True, ligand_atoms=0, msa_depth=3)
    assert int((f["mol_type"] == 3).sum()) == 0 and f["template_mask"].shape[1] == 2 and f["msa"].shape[1] == 3
    assert "affinity_mw" not in f
    f0 = bf.make_features(20, seed=1, n_templates=0)  # boltz's dummy template row
    assert f0["template_mask"].shape[1] == 1 and int(f0["template_mask"].sum()) == 0
    assert "template_force" not in f0
    with pytest.raises(ValueError):
        bf.make_features(5, n_chains=3)


def test_missing_dependency_message(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "einx" else real(n, *a))
    assert not bf.boltz_full_available()
    with pytest.raises(bf.BoltzFullUnavailable, match=r"einx.*autocp\[boltz-full\].*install_boltz_full\.sh"):
        bf.import_boltz_models()


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def boltz2():
    return bf.tiny_boltz2(seed=0)


@pytest.fixture(scope="module")
def boltz1():
    return bf.tiny_boltz1(seed=0)


def _run(model, feats, seed=0, **kw):
    kw.setdefault("num_sampling_steps", SAMPLING_STEPS)
    t = time.perf_counter()
    out = bf.run_reference(model, feats, seed=seed, **kw)
    return out, time.perf_counter() - t


@needs_full
def test_tiny_models_are_random_and_reproducible(boltz2):
    _, Boltz2 = bf.import_boltz_models()
    assert isinstance(boltz2, Boltz2) and not boltz2.training
    sd = boltz2.state_dict()
    zero = [k for k, v in sd.items() if v.is_floating_point() and v.numel() and not bool(v.any())]
    assert not zero, zero  # boltz's zero-initialised projections were re-drawn
    again = bf.tiny_boltz2(seed=0).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in sd.items())
    other = bf.tiny_boltz2(seed=1).state_dict()
    assert not torch.equal(sd["distogram_module.distogram.weight"], other["distogram_module.distogram.weight"])
    cfg = bf.tiny_boltz2_config()
    assert cfg["token_s"] == 32 and cfg["token_z"] == 16 and cfg["atom_s"] == 16 and cfg["atom_z"] == 8
    assert boltz2.use_templates and boltz2.confidence_prediction and boltz2.affinity_prediction


@needs_full
@pytest.mark.parametrize("n_tokens", [24, 37])
def test_boltz2_reference_forward(boltz2, n_tokens):
    f = bf.make_features(n_tokens, seed=1)
    out, dt = _run(boltz2, f, diffusion_samples=2, recycling_steps=1)
    assert dt < TIME_LIMIT_S, dt
    M = f["atom_pad_mask"].shape[1]
    assert out["sample_atom_coords"].shape == (2, M, 3)
    assert out["pdistogram"].shape == (1, n_tokens, n_tokens, 1, 64)
    assert out["pae"].shape == (2, n_tokens, n_tokens) and out["plddt"].shape == (2, n_tokens)
    for k in ("ptm", "iptm", "complex_plddt", "affinity_pred_value", "affinity_probability_binary"):
        assert bool(torch.isfinite(out[k]).all()), k
    assert bool((out["ptm"] > 0).all()) and bool((out["iptm"] > 0).all())
    assert bool(torch.isfinite(out["sample_atom_coords"]).all())
    # the confidence head sees a non-degenerate predicted structure
    rep = torch.bmm(f["token_to_rep_atom"].float().repeat(2, 1, 1), out["sample_atom_coords"])
    assert float((torch.cdist(rep, rep) < 22).float().mean()) > 0.3


@needs_full
@pytest.mark.parametrize("n_tokens", [24, 37])
def test_boltz1_reference_forward(boltz1, n_tokens):
    f = bf.make_features(n_tokens, seed=1, version=1)
    out, dt = _run(boltz1, f, diffusion_samples=2)
    assert dt < TIME_LIMIT_S, dt
    assert out["sample_atom_coords"].shape == (2, f["atom_pad_mask"].shape[1], 3)
    assert out["pdistogram"].shape == (1, n_tokens, n_tokens, 64)
    assert bool(torch.isfinite(out["sample_atom_coords"]).all()) and bool(torch.isfinite(out["pae"]).all())
    assert bool((out["ptm"] > 0).all()) and bool((out["iptm"] > 0).all())


@needs_full
@pytest.mark.parametrize("which", ["boltz2", "boltz1"])
def test_reference_is_seeded(which, request):
    model = request.getfixturevalue(which)
    f = bf.make_features(24, seed=2, version=2 if which == "boltz2" else 1)
    a, _ = _run(model, f, seed=7)
    b, _ = _run(model, f, seed=7)
    c, _ = _run(model, f, seed=8)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
    assert not torch.allclose(a["sample_atom_coords"], c["sample_atom_coords"])
    assert torch.equal(a["pdistogram"], c["pdistogram"])  # the trunk is deterministic; sampling is not


@needs_full
def test_zeroed_confidence_is_detected(boltz2, monkeypatch):
    """boltz's ConfidenceHeads swallows any compute_ptms error and returns zeros."""
    import boltz.model.modules.confidencev2 as conf

    def broken(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(conf, "compute_ptms", broken)
    with pytest.raises(bf.ConfidenceZeroedError, match="simulated failure"):
        bf.run_reference(boltz2, bf.make_features(24, seed=0), num_sampling_steps=2)
