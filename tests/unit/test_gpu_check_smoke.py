"""``benchmarks/gpu_check.py --cpu-smoke``: the prepared GPU script runs top to bottom on CPU at
tiny sizes, writes every section to its JSON (numbers, or a recorded error / skip reason), and
one rank's Pairformer-block tile program really ran (finite time, peak bytes > 0)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
SECTIONS = ("kernels", "pairformer_block", "diffusion_step", "diffusion_step_lazy_bias", "estimate")


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _has_numbers_or_reason(name, sec):
    if sec.get("status") == "error":
        return bool(sec.get("error"))
    if sec.get("status") == "skipped":
        return bool(sec.get("skipped"))
    assert sec.get("status") == "ok", (name, sec.get("status"))
    if name == "kernels":
        rows = sec["rows"]
        return bool(rows) and all(("fwd_err" in r) or r.get("error") or r.get("skipped") for r in rows)
    if name == "estimate":
        parts = [v for v in sec.values() if isinstance(v, dict)]
        return bool(parts) and all(_finite_positive(v.get("peak_bytes")) or v.get("error") or v.get("skipped")
                                   for v in parts)
    return _finite_positive(sec.get("peak_bytes")) and _finite_positive(sec.get("time_per_call_s"))


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "x.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, SCRIPT, "--cpu-smoke", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"wrote {out}" in res.stdout, res.stdout[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == "cpu-smoke"
    assert data["meta"]["args"]["tokens"] == 24 and data["meta"]["args"]["mesh"] == 2
    secs = data["sections"]
    assert set(SECTIONS) <= set(secs), sorted(secs)
    for name in SECTIONS:
        assert _has_numbers_or_reason(name, secs[name]), (name, secs[name])

    pf = secs["pairformer_block"]
    assert pf["status"] == "ok", pf.get("error")
    assert pf["n_tokens"] == 24 and pf["mesh"] == [2, 2] and pf["tile_tokens_b"] == 12
    assert pf["peak_bytes"] > pf["params_bytes"] > 0  # parameters + input tiles + the block's own temporaries
    assert all(_finite_positive(r["wall_s"]) and r["max_memory_allocated"] > 0 for r in pf["runs"])
    assert pf["outputs"] == [[1, 12, 32], [1, 12, 12, 16]]  # this rank's s block and z tile
    assert pf["pair_gathers"] == []  # nothing of size N^2 gathered on the rank
    assert pf["comm_calls"], "the simulated communication primitives ran"
    # the diffusion step's atom parts are reported as not measured, with the reason
    for name in ("diffusion_step", "diffusion_step_lazy_bias"):
        if secs[name]["status"] == "ok":
            assert "band_gather" in secs[name]["not_measured"]["atom_attention_encoder_decoder_and_conditioning"]
