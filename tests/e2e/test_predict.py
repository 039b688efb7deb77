"""``autocp predict`` end to end, offline: the fixture of ``scripts/make_test_cache.py`` (CCD
molecules from biotite, tiny random-weight checkpoints with Boltz's real depths, a 2-chain +
ATP complex of 99 tokens), folded by Boltz's own predict path at fp32 on one process and by
``autocp predict --mesh 2`` (4 local processes); the written files are compared. The full
matrix (3x3, 5 samples, affinity, torchrun) is benchmarks/predict_parity.py."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
_NEEDS = ("boltz", "rdkit", "biotite", "gemmi", "numba", "sklearn", "pytorch_lightning", "msgpack")
_MISSING = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"autocp predict deps missing {_MISSING}: bash scripts/install_boltz_full.sh", allow_module_level=True)
try:  # Boltz's data pipeline imports more than the list above (pandas, numba, ...): a partial install skips
    import boltz.data.write.writer  # noqa: F401
    import boltz.main  # noqa: F401
except ImportError as e:
    pytest.skip(f"boltz.main does not import ({e}): bash scripts/install_boltz_full.sh", allow_module_level=True)

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "autocp", *map(str, args)], capture_output=True, text=True, env=ENV,
                       cwd=str(ROOT), timeout=1200)
    if check and r.returncode != 0:
        raise AssertionError(f"autocp {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("boltz_cache")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_cache.py"), str(d)], check=True, env=ENV,
                   capture_output=True, timeout=600)
    return d


def ref_worker(rank, world, data, out, flags):
    from autocp.predict_compare import boltz_predict_fp32

    return str(boltz_predict_fp32(data, out, **flags))


def _flags(cache, model, samples, steps):
    return {"cache": str(cache), "checkpoint": str(cache / f"{model}_tiny.ckpt"), "model": model, "seed": 0,
            "recycling_steps": 0, "sampling_steps": steps, "diffusion_samples": samples}


def _fold(cache, tmp_path, model, samples, steps, *extra):
    from autocp.predict_compare import compare_predictions

    data = cache / "examples" / "complex_2p1l.yaml"
    fl = _flags(cache, model, samples, steps)
    ref = run_distributed(ref_worker, 1, str(data), str(tmp_path / "ref"), dict(fl, no_kernels=True), timeout=900)[0]
    args = [x for k, v in fl.items() for x in (f"--{k}", v)]
    js = tmp_path / "run.json"
    r = _cli("predict", data, "--out_dir", tmp_path / "cp", *args, "--mesh", 2, "--json", js, *extra)
    assert "[structure] complex_2p1l: N=99 tokens" in r.stdout and "diffusion step" in r.stdout, r.stdout[-2000:]
    return compare_predictions(ref, tmp_path / "cp" / "boltz_results_complex_2p1l"), json.loads(js.read_text()), r


def test_predict_refuses_bad_arguments(tmp_path):
    r = _cli("predict", tmp_path / "nope.yaml", check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Fix:" in r.stderr, r.stderr
    (tmp_path / "x.yaml").write_text("version: 1\n")
    for flag, words in (("--write_embeddings", "O(N^2 * C)"), ("--use_msa_server", "MSA server")):
        r = _cli("predict", tmp_path / "x.yaml", flag, check=False)
        assert r.returncode == 2 and words in r.stderr and "Fix:" in r.stderr, (flag, r.stderr)


# Boltz-2, 2 diffusion samples (the confidence trunk on a batch of 2 against masks of batch 1),
# 3 sampling steps: coordinates stay at ~1e3 A, so every distance is past the confidence
# module's last distance bin and the confidence outputs compare tightly
def test_predict_boltz2_two_samples_matches_boltz_predict(cache, tmp_path):
    d, res, r = _fold(cache, tmp_path, "boltz2", 2, 3, "--memory-report")
    assert d["files"] == 10, d  # cif, confidence json, pae / pde / plddt npz per sample
    assert d["coords_A"] < 1e-2, d  # coordinates of ~1e3 A: fp32 rounding
    assert d["confidence"] <= 1e-5 and d["pae"] <= 1e-4 and d["pde"] <= 1e-4 and d["plddt"] <= 1e-4, d
    ranks = res["ranks"]
    assert len(ranks) == 4
    for rk in ranks:  # no rank ever held a whole O(N^2 * C) pair tensor (the tracker flags them)
        rec = rk["stages"][0]["records"][0]
        assert rec["whole_pair"] == [] and rec["tokens"] == 99, rec
    assert "whole O(N^2*C) pair tensors on any rank: 0" in r.stdout


# Boltz-1 (its own data module, ccd.pkl, writer; an MSA of one row), 20 steps: protein-like
# coordinates, equal within 1e-3 A. The confidence head bins the predicted distances: a pair
# within fp32 noise (~1e-4 A) of a bin boundary can fall in the neighbouring bin, which moves
# pLDDT by ~1e-3 (with 3 steps, all distances past the last bin: pLDDT within 1e-6)
def test_predict_boltz1_matches_boltz_predict(cache, tmp_path):
    d, _, _ = _fold(cache, tmp_path, "boltz1", 1, 20)
    assert d["files"] == 3, d  # cif, confidence json, plddt npz (the tiny Boltz-1 has no PAE head)
    assert d["coords_A"] <= 1e-3, d
    assert d["plddt"] <= 1e-2 and d["confidence"] <= 1e-2, d


def test_predict_refuses_a_mesh_that_does_not_fit(cache, tmp_path):
    data = cache / "examples" / "single.yaml"
    r = _cli("predict", data, "--out_dir", tmp_path, "--cache", cache, "--checkpoint", cache / "boltz2_tiny.ckpt",
             "--device-memory", "1MiB", "--sampling_steps", 2, "--recycling_steps", 0, check=False)
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "MeshError" in r.stderr and "--device-memory is 1.0 MiB" in r.stderr and "Fix:" in r.stderr, r.stderr[-2000:]
    assert "estimated per-rank peak" in r.stdout, r.stdout[-2000:]
