"""A Boltz checkpoint (Lightning format, as Boltz writes it; random weights written by the
test) loads into the original model with ``Boltz2.load_from_checkpoint`` and into the
parallel one with ``load_state_dict`` (same keys); both then give the same outputs on 2x2."""

import pytest
import torch

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed

boltz_full = pytest.importorskip("autocp.models.boltz_full")
if not boltz_full.boltz_full_available():
    pytest.skip("whole-model deps missing: bash scripts/install_boltz_full.sh", allow_module_level=True)


def write_checkpoint(path):
    from autocp.models.boltz_full import BoltzArgs, tiny_boltz2

    model = tiny_boltz2(seed=1)
    hp = dict(model.hparams)
    for k in ("training_args", "validation_args"):  # Boltz reads them by attribute (its configs are DictConfigs)
        hp[k] = BoltzArgs(hp[k])
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp, "pytorch-lightning_version": "2.6.6",
                "epoch": 0, "global_step": 0}, path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def ckpt_worker(rank, world, path):
    import warnings

    import autocp
    from autocp.models.boltz_full import import_boltz_models, make_features, tiny_boltz2

    _, Boltz2 = import_boltz_models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = Boltz2.load_from_checkpoint(path, map_location="cpu", strict=True, weights_only=False).eval()
    mesh = autocp.init_mesh()
    pm = autocp.parallelize(tiny_boltz2(seed=0), mesh)  # other weights: the checkpoint must replace them all
    missing = pm.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"], strict=True)
    feats = make_features(22, seed=0)
    kw = dict(recycling_steps=0, num_sampling_steps=10, diffusion_samples=1, max_parallel_samples=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref = original(dict(feats), **kw)
        torch.manual_seed(0)
        out = pm(dict(feats), **kw)
    errs = {k: float((out[k] - ref[k]).abs().max()) for k in ("pdistogram", "z", "sample_atom_coords", "ptm")}
    same = all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), pm.state_dict().values()))
    return errs, same, str(missing)


def test_checkpoint_loads_into_original_and_parallel(tmp_path):
    path = str(tmp_path / "random_weights.ckpt")
    written = write_checkpoint(path)
    assert len(written) > 400
    for errs, same, missing in run_distributed(ckpt_worker, 4, path, timeout=900):
        assert same, "parallel state_dict differs from the loaded original"
        assert errs["sample_atom_coords"] < 1e-3 and errs["pdistogram"] < 1e-3 and errs["ptm"] < 1e-5, errs
