"""End to end: the README's demo command and example 01 (the documented commands) run and
report a match with the single-device model."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = "examples/01_parallelize_boltz_pairformer.py"


def _run(args, timeout=600, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_matches_single_device(tmp_path):
    """`python -m autocp demo` (small): Boltz-2 MSA + Pairformer through autocp.parallelize,
    N not divisible by p, on a 2x2 mesh; nothing gathered; per-rank peak below one device."""
    res = _run(["-m", "autocp", "demo", "--tokens", "13", "--channels", "8", "--blocks", "2", "--msa-rows", "3"],
               cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "MATCH" in out and "MISMATCH" not in out, out
    assert "N=13 tokens (not divisible by p=2)" in out, out
    assert "gathered (fallback): 0" in out, out
    for op in ("msa_module", "pairformer.layers.1.tri_att_end", "registry:AttentionPairBias"):
        assert op in out, op
    assert (tmp_path / "autocp_demo_memory.png").exists()  # the default PNG, in the working directory


def _rows(stdout):
    return [eval(line) for line in stdout.splitlines() if line.startswith("{")]  # noqa: S307 -- our own dicts


@pytest.mark.slow
def test_example_01_parallelize_2x2():
    """The README's example command on the project's launcher (4 CPU gloo ranks)."""
    res = _run([EXAMPLE, "--mesh", "2", "--tokens", "13", "--c-s", "16", "--c-z", "8"])
    assert res.returncode == 0, res.stdout + res.stderr
    rows = _rows(res.stdout)
    assert sorted(r["coord"] for r in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:
        assert r["gathered"] == [] and r["warnings"] == [], r
        for k in ("z_err", "s_err", "dz_err", "param_grad_err"):
            assert r[k] < 1e-5, (k, r)


def test_example_01_options_do_not_clash_with_torchrun():
    """The documented torchrun command: torchrun's own parser leaves every option to the script
    (an option like --n would be refused as an ambiguous prefix of --nnodes/--nproc-per-node)."""
    from torch.distributed.run import get_args_parser

    script_args = ["--tokens", "1024", "--no-check", "--mesh", "2", "--c-s", "32", "--c-z", "16", "--blocks", "2"]
    a = get_args_parser().parse_args(["--nproc-per-node", "4", EXAMPLE, *script_args])
    assert a.training_script == EXAMPLE and a.training_script_args == script_args
    with open(os.path.join(ROOT, EXAMPLE)) as f:
        assert "torchrun --nproc-per-node 4 examples/01_parallelize_boltz_pairformer.py --tokens 1024" in f.read()
    with pytest.raises(SystemExit):  # the old spelling, for contrast: the test can fail
        get_args_parser().parse_args(["--nproc-per-node", "4", EXAMPLE, "--n", "1024"])
