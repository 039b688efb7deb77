"""One training step of the whole Boltz-2 through autocp on 2x2: train mode (dropout on,
the same masks as one device), Boltz's training loss (distogram + diffusion, and the
confidence loss -- pLDDT, PDE, resolved, PAE -- as its ``training_step`` aggregates them),
``loss.backward()`` on every rank (no scaling, no manual reduction: DTensor semantics and
grad sync); the loss and all parameter gradients equal the single device's."""

import pytest
import torch

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed

boltz_full = pytest.importorskip("autocp.models.boltz_full")
if not boltz_full.boltz_full_available():
    pytest.skip("whole-model deps missing: bash scripts/install_boltz_full.sh", allow_module_level=True)

N = 22


def structure_loss(model, batch, confidence=False):
    """``Boltz2.training_step``'s loss (its recycling / sampling arguments fixed: no numpy
    draw): distogram + diffusion, and with ``confidence`` the confidence loss the way
    ``training_step`` computes it without symmetry correction -- except that the true
    coordinates are read from the ``[B, K, M, 3]`` ``coords`` the batch came with: Boltz
    2.2.1's forward overwrites ``batch["coords"]`` with ``[B*K, M, 3]`` and its
    ``get_true_coordinates`` then misreads the shape (it fails on one device too)."""
    from boltz.model.loss.confidencev2 import confidence_loss
    from boltz.model.loss.distogramv2 import distogram_loss

    ta = model.training_args
    coords = batch["coords"]
    out = model(feats=batch, recycling_steps=0, num_sampling_steps=ta.sampling_steps,
                multiplicity_diffusion_train=ta.diffusion_multiplicity, diffusion_samples=ta.diffusion_samples)
    disto, _ = distogram_loss(out, batch, aggregate_distogram=model.aggregate_distogram)
    diff = model.structure_module.compute_loss(batch, out, multiplicity=ta.diffusion_multiplicity,
                                               **model.diffusion_loss_args)
    loss = ta.distogram_loss_weight * disto + ta.diffusion_loss_weight * diff["loss"]
    if not confidence:
        return loss
    true = model.get_true_coordinates({**batch, "coords": coords}, out, diffusion_samples=ta.diffusion_samples,
                                      symmetry_correction=False)
    cb = {**batch, "frames_idx": batch["frames_idx"].squeeze(1),
          "frame_resolved_mask": batch["frame_resolved_mask"].squeeze(1)}
    conf = confidence_loss(out, cb, true["true_coords"].squeeze(1), true["true_coords_resolved_mask"],
                           token_level_confidence=model.token_level_confidence, alpha_pae=model.alpha_pae,
                           multiplicity=ta.diffusion_samples)
    assert all(float(conf["loss_breakdown"][k]) > 0 for k in ("plddt_loss", "pde_loss", "resolved_loss", "pae_loss"))
    return loss + ta.confidence_loss_weight * conf["loss"]


def train_worker(rank, world, token_bias="auto", confidence=False):
    import warnings

    import autocp
    from autocp.models.boltz_full import make_features, tiny_boltz2

    model = tiny_boltz2(seed=0, alpha_pae=1.0).train()  # alpha_pae > 0: the PAE loss too
    feats = make_features(N, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref_loss = structure_loss(model, dict(feats), confidence)
        ref_loss.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    mesh = autocp.init_mesh()
    pm = autocp.parallelize(model, mesh, strict=True, options=dict(token_bias=token_bias))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        loss = pm.apply(structure_loss, feats, confidence)  # the loss computed on tiles: a replicated scalar
        loss.backward()  # DTensor semantics: its true cotangent on every rank; grad sync completes .grad
    errs, missing = {}, []
    for k, p in model.named_parameters():
        if k not in ref:
            continue
        if p.grad is None:
            missing.append(k)
            continue
        errs[k] = (float((p.grad - ref[k]).abs().max()), float(ref[k].abs().max()))
    return float(ref_loss), float(loss), errs, missing, pm.token_bias


# "lazy": the token-transformer bias recomputed per layer (its projections get their
# gradients through the recomputation); "auto" keeps it resident at the tiny widths
@pytest.mark.parametrize("token_bias,confidence", [("auto", True), ("lazy", False)])
def test_training_step_loss_and_all_gradients_match_single_device(token_bias, confidence):
    res = run_distributed(train_worker, 4, token_bias, confidence, timeout=1200)
    for rank, (ref_loss, loss, errs, missing, mode) in enumerate(res):
        assert mode == ("lazy" if token_bias == "lazy" else "resident"), mode
        assert any("token_trans_proj_z" in k for k in errs), sorted(errs)[:5]
        # the confidence loss reaches the confidence module's parameters (and only them: its
        # inputs are detached); without it they have no gradient
        assert any(k.startswith("confidence_module.") for k in errs) == confidence
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (rank, loss, ref_loss)
        assert not missing, missing
        assert len(errs) > 300
        gmax = max(v[1] for v in errs.values())
        # relative to each gradient's scale, floored at 1e-3 of the largest (softmax-invariant
        # biases have exactly-zero true gradients: only float noise there)
        bad = {k: v for k, v in errs.items() if v[0] > 1e-3 * max(v[1], 1e-3 * gmax)}
        assert not bad, (rank, sorted(bad.items(), key=lambda x: -x[1][0])[:5])


def tiles_out_worker(rank, world, cases):
    """Whole Boltz-2, train mode: ``pm(batch, output="tiles")``, backward from cotangents on
    this rank's tiles of ``s`` (RowToken), ``z`` and ``pdistogram`` (Pair2D) -- the true
    cotangent of each tile, padded slots filled with garbage -- each alone and together;
    every parameter gradient vs single device."""
    import warnings

    import autocp
    from autocp.models.boltz_full import make_features, tiny_boltz2
    from autocp.passes.rewrite import shard_tags
    from autocp.tile_io import padded_slots

    model = tiny_boltz2(seed=0).train()
    feats = make_features(N, seed=0)
    kw = dict(recycling_steps=0, num_sampling_steps=2, multiplicity_diffusion_train=1, diffusion_samples=1)
    mesh = autocp.init_mesh()
    pm = autocp.parallelize(model, mesh, strict=True)
    res = []
    for keys in cases:
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            out = model(dict(feats), **kw)
            g = torch.Generator().manual_seed(7)
            cots = {k: torch.randn(out[k].shape, generator=g) for k in ("s", "z", "pdistogram")}
            torch.autograd.backward([out[k] for k in keys], [cots[k] for k in keys])
            ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            pout = pm(dict(feats), **kw, output="tiles")
            tiles, cts = [], []
            for k in keys:
                t = pout[k]
                ct = shard_tags(cots[k], t.tags, mesh).clone()
                for d, valid, b in padded_slots(t.tags, mesh, N, None):
                    ct.narrow(d, valid, b - valid).fill_(5.0)  # padding is not part of the tensor
                tiles.append(t.local)
                cts.append(ct)
            torch.autograd.backward(tiles, cts)
        got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        top = max(float(v.abs().max()) for v in ref.values())
        errs = {k: float((got[k] - v).abs().max()) / max(float(v.abs().max()), 1e-3 * top)
                for k, v in ref.items() if k in got}
        res.append((keys, sorted(set(ref) - set(got)), max(errs.values()), len(ref),
                    max(errs, key=errs.get)))
    return res


def test_whole_model_tiles_out_each_cotangent():
    """Tiles out of the whole Boltz-2 (DTensor semantics): s / z / distogram cotangents on the
    tiles, alone and together, give the single-device parameter gradients."""
    cases = [("s",), ("z",), ("pdistogram",), ("s", "z", "pdistogram")]
    for rank_res in run_distributed(tiles_out_worker, 4, cases, timeout=1200):
        for keys, missing, err, n_grads, worst in rank_res:
            assert not missing, (keys, missing[:5])
            assert n_grads > 50, (keys, n_grads)
            assert err < 1e-3, (keys, err, worst)
