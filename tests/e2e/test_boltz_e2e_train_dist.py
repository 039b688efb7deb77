"""One training step of the whole Boltz-2 through autocp on 2x2: train mode (dropout on,
the same masks as one device), Boltz's structure losses (distogram + diffusion, as its
``training_step`` aggregates them), backward; the loss and all parameter gradients (after
the sum over ranks) equal the single device's."""

import pytest
import torch

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed

boltz_full = pytest.importorskip("autocp.models.boltz_full")
if not boltz_full.boltz_full_available():
    pytest.skip("whole-model deps missing: bash scripts/install_boltz_full.sh", allow_module_level=True)

N = 22


def structure_loss(model, batch):
    """``Boltz2.training_step``'s distogram + diffusion loss (its recycling / sampling
    arguments fixed: no numpy draw); the confidence loss needs Boltz's symmetry features."""
    from boltz.model.loss.distogramv2 import distogram_loss

    ta = model.training_args
    out = model(feats=batch, recycling_steps=0, num_sampling_steps=ta.sampling_steps,
                multiplicity_diffusion_train=ta.diffusion_multiplicity, diffusion_samples=ta.diffusion_samples)
    disto, _ = distogram_loss(out, batch, aggregate_distogram=model.aggregate_distogram)
    diff = model.structure_module.compute_loss(batch, out, multiplicity=ta.diffusion_multiplicity,
                                               **model.diffusion_loss_args)
    return ta.distogram_loss_weight * disto + ta.diffusion_loss_weight * diff["loss"]


def train_worker(rank, world, token_bias="auto"):
    import warnings

    import torch.distributed as dist

    import autocp
    from autocp.models.boltz_full import make_features, tiny_boltz2

    model = tiny_boltz2(seed=0).train()
    feats = make_features(N, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref_loss = structure_loss(model, dict(feats))
        ref_loss.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    mesh = autocp.init_mesh()
    pm = autocp.parallelize(model, mesh, strict=True, options=dict(token_bias=token_bias))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        loss = pm.apply(structure_loss, feats)
        (loss / mesh.p ** 2).backward()  # every rank holds the whole loss: the partial-gradient convention
    errs, missing = {}, []
    for k, p in model.named_parameters():
        if k not in ref:
            continue
        if p.grad is None:
            missing.append(k)
            continue
        g = p.grad.clone()
        if mesh.p > 1:
            dist.all_reduce(g)
        errs[k] = (float((g - ref[k]).abs().max()), float(ref[k].abs().max()))
    return float(ref_loss), float(loss), errs, missing, pm.token_bias


# "lazy": the token-transformer bias recomputed per layer (its projections get their
# gradients through the recomputation); "auto" keeps it resident at the tiny widths
@pytest.mark.parametrize("token_bias", ["auto", "lazy"])
def test_training_step_loss_and_all_gradients_match_single_device(token_bias):
    res = run_distributed(train_worker, 4, token_bias, timeout=1200)
    for rank, (ref_loss, loss, errs, missing, mode) in enumerate(res):
        assert mode == ("lazy" if token_bias == "lazy" else "resident"), mode
        assert any("token_trans_proj_z" in k for k in errs), sorted(errs)[:5]
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (rank, loss, ref_loss)
        assert not missing, missing
        assert len(errs) > 300
        gmax = max(v[1] for v in errs.values())
        # relative to each gradient's scale, floored at 1e-3 of the largest (softmax-invariant
        # biases have exactly-zero true gradients: only float noise there)
        bad = {k: v for k, v in errs.items() if v[0] > 1e-3 * max(v[1], 1e-3 * gmax)}
        assert not bad, (rank, sorted(bad.items(), key=lambda x: -x[1][0])[:5])
