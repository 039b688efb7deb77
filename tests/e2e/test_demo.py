"""End to end: the README's demo command and example 01 run and report a match."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_matches_single_device():
    res = _run(["-m", "autocp", "demo", "--n", "21", "--c", "16"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "MATCH" in res.stdout and "MISMATCH" not in res.stdout, res.stdout
    for op in ("TriangleMultiplicationOutgoing", "TriangleAttentionEndingNode", "PairformerModule"):
        assert op in res.stdout


@pytest.mark.slow
def test_example_01_pairformer_3x3_parity():
    res = _run(["examples/01_parallelize_boltz_pairformer.py", "--p", "3", "--n", "20", "--c-s", "16", "--c-z", "8"])
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [eval(line) for line in res.stdout.splitlines() if line.startswith("{")]  # noqa: S307 -- our own dicts
    assert len(rows) == 9
    for r in rows:
        assert r["z_err"] < 1e-5 and r["dz_err"] < 1e-5 and r["param_grad_err"] < 1e-5, r
