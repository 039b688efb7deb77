"""The whole-model estimate (``autocp.models.boltz_estimate``): the real Boltz-2 program on
one simulated rank (fake large tensors, real index-like ones), against the measured
per-rank peak of the same prediction on a real 2x2 mesh; repeated-layer replay changes
no figure; synthetic features have Boltz's keys, dtypes and scaled shapes. (The 2x2 / 3x3,
N = 128 / 256 validation at the released widths: benchmarks/whole_model_memory.py.)"""

import pytest
import torch

from autocp.testing import run_distributed

boltz_full = pytest.importorskip("autocp.models.boltz_full")
if not boltz_full.boltz_full_available():
    pytest.skip("whole-model deps missing: bash scripts/install_boltz_full.sh", allow_module_level=True)

N, MSA = 24, 6
KW = dict(recycling_steps=1, sampling_steps=2, diffusion_samples=1, max_parallel_samples=1)


def _config():
    # three Pairformer blocks, MSA layers and token-transformer layers: the replayed stacks
    return boltz_full.tiny_boltz2_config(pairformer_args={"num_blocks": 3}, msa_args={"msa_blocks": 3},
                                         score_model_args={"token_transformer_depth": 3})


def measure_worker(rank, world):
    import autocp
    from autocp.models.boltz_estimate import PredictShape, measure_boltz

    model = boltz_full.tiny_boltz2(seed=0, **_config())
    feats = boltz_full.make_features(N, seed=0, msa_depth=MSA)
    atoms = int(feats["atom_pad_mask"].shape[1])
    mesh = autocp.init_mesh()
    return mesh.coord, measure_boltz(model, feats, PredictShape(N, n_atoms=atoms, msa_rows=MSA, **KW), mesh), atoms


def _estimate(atoms, replay=True, p=2):
    from autocp.models.boltz_estimate import PredictShape, estimate_boltz

    shape = PredictShape(N, n_atoms=atoms, msa_rows=MSA, n_templates=1, **KW)
    return estimate_boltz(shape=shape, p=p, dtype=torch.float32, config=_config(), replay=replay)


@pytest.mark.distributed
def test_whole_model_estimate_matches_measured_2x2():
    res = run_distributed(measure_worker, 4)
    coord, measured, atoms = next(r for r in res if tuple(r[0]) == (0, 1))
    e = _estimate(atoms)
    err = (e.peak_bytes - measured) / measured
    assert abs(err) < 0.03, (e.peak_bytes, measured, err)
    # the table names Boltz's own top-level modules, each run at least once
    for name in ("pairformer_module", "msa_module", "structure_module", "confidence_module"):
        assert name in e.per_module, sorted(e.per_module)
    assert e.details["replayed"] > 0


def test_replay_changes_no_figure():
    atoms = int(boltz_full.make_features(N, seed=0, msa_depth=MSA)["atom_pad_mask"].shape[1])
    a, b = _estimate(atoms, replay=True), _estimate(atoms, replay=False)
    assert a.details["replayed"] > 0 and b.details["replayed"] == 0
    assert a.peak_bytes == b.peak_bytes, (a.peak_bytes, b.peak_bytes)


def test_synthetic_features_scale_every_token_atom_and_msa_dim():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from autocp.models.boltz_estimate import INFERENCE_DROP, PredictShape, synthetic_features

    ref = boltz_full.make_features(40, seed=0, msa_depth=5)
    m0 = int(ref["atom_pad_mask"].shape[1])
    shape = PredictShape(100, n_atoms=900, msa_rows=12)
    fm = FakeTensorMode(allow_non_fake_inputs=True)
    got = synthetic_features(shape, fm, real_limit=2000)
    assert set(got) == set(ref) - set(INFERENCE_DROP)
    for k, v in got.items():
        if not isinstance(v, torch.Tensor):
            continue
        r = ref[k]
        assert v.dtype == r.dtype and v.dim() == r.dim(), k
        want = [1 if d == 0 else (12 if k in ("msa", "msa_paired", "deletion_value", "has_deletion", "msa_mask")
                                  and d == 1 else {40: 100, m0: 928}.get(s, s)) for d, s in enumerate(r.shape)]
        assert list(v.shape) == want, (k, tuple(v.shape), want)
        big = v.numel() > 2000 or v.is_floating_point()
        assert isinstance(v, FakeTensor) == big, k


def test_predict_plan_prints_the_whole_estimate():
    """``autocp predict --estimate whole``: the plan line is the whole-model estimate of the
    checkpoint's own hyperparameters with the run's loop flags and the batch's MSA depth."""
    from autocp.models.boltz_estimate import PredictShape, estimate_boltz
    from autocp.predict import PredictConfig, plan_line

    model = boltz_full.tiny_boltz2(seed=0, **_config())
    feats = boltz_full.make_features(N, seed=0, msa_depth=MSA)
    atoms = int(feats["atom_pad_mask"].shape[1])
    cfg = PredictConfig(data="x.yaml", estimate="whole", recycling_steps=1, sampling_steps=2, diffusion_samples=1,
                        max_parallel_samples=1)
    text, peak = plan_line(cfg, model, N, atoms, 2, feats)
    assert "the whole prediction" in text and "largest while" in text, text
    want = estimate_boltz(shape=PredictShape(N, n_atoms=atoms, msa_rows=MSA, n_templates=1, **KW), p=2,
                          dtype=torch.float32, config=dict(model.hparams))
    assert peak == want.peak_bytes, (peak, want.peak_bytes)
    block_text, block_peak = plan_line(PredictConfig(data="x.yaml"), model, N, atoms, 2)
    assert "one Pairformer block" in block_text and block_peak < peak
