"""Tiles in, tiles out (issue [tile-io]): DTensor inputs, ``output="local"`` / ``"dtensor"``,
backward from cotangents on the tiles. DTensor's convention (autocp.tile_io): a replicated
output (RowToken, ColToken, a scalar) takes its true cotangent, the same on every replica;
every input and parameter gets its true gradient, a replicated input's equal on every
replica. Each output's cotangent alone and all together, on 1x1 / 2x2 / 3x3, N not
divisible by p, masked tokens, cotangent padding filled with garbage (must be ignored)."""

import numpy as np
import pytest

from autocp.testing import run_distributed
from tests.training import _tile_workers as W

pytestmark = pytest.mark.distributed


def _check(res, n_cases):
    for r in res:
        assert len(r["cases"]) == n_cases
        for case, c in r["cases"].items():
            assert not c["missing"], (case, c["missing"])
            assert c["out_err"] < 1e-5, (case, c["out_err"])
            # relative to each gradient's scale (floored at 1e-3 of the largest: softmax-invariant
            # LayerNorm biases have exactly-zero true gradients, float noise only)
            assert c["param_err"] < 1e-4, (case, c["param_err"], c["worst"])
            for i, e in c["in_err"].items():
                assert e < 1e-5, (case, i, e, c["ref_in_scale"][i])
    # the gradient of a replicated (RowToken) input is the same on every replica of its block
    by_row = {}
    for r in res:
        by_row.setdefault(r["rc"][0], []).append(r)
    for rows in by_row.values():
        for case in rows[0]["cases"]:
            for i, name in enumerate(rows[0]["in_layouts"]):
                if name != "RowToken" or i not in rows[0]["cases"][case]["in_tiles"]:
                    continue
                t0 = rows[0]["cases"][case]["in_tiles"][i]
                for other in rows[1:]:
                    np.testing.assert_allclose(other["cases"][case]["in_tiles"][i], t0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("world,n,mode", [(1, 7, "local"), (4, 7, "local"), (9, 8, "local"), (9, 7, "dtensor")])
def test_every_block_output_layout_tile_io(world, n, mode):
    """Pair2D, RowToken, ColToken, a replicated scalar and a transposed pair tile (a DTensor
    with placements [Shard(2), Shard(1)] under output='dtensor') out of one module."""
    res = run_distributed(W.tile_parity_worker, world, "heads", n, mode, timeout=600)
    assert res[0]["out_tags"] == [(None, "r", "c", None), (None, "r", None), (None, "c", None), (),
                                  (None, "c", "r", None)]
    _check(res, 6)


@pytest.mark.parametrize("world,n,mode", [(4, 13, "local"), (9, 13, "local"), (4, 13, "dtensor")])
def test_boltz2_pairformer_tile_io(world, n, mode):
    """The issue's case: an unmodified Boltz-2 PairformerModule, s (RowToken) and z (Pair2D)
    tiles in and out; before the fix the s cotangent was counted p times (parameter
    gradients off by the whole s-path gradient, s-input tiles different per replica)."""
    res = run_distributed(W.tile_parity_worker, world, "pairformer", n, mode, timeout=600)
    _check(res, 3)


@pytest.mark.parametrize("world,n", [(4, 7), (9, 8)])
def test_msa_tile_output_tile_io(world, n):
    """An unmodified Boltz-2 PairWeightedAveraging: an MSA tile out (MsaTiles, rows padded:
    S=5, cotangent padding filled with garbage), MSA and z input gradients."""
    res = run_distributed(W.tile_parity_worker, world, "pwa", n, "local", timeout=600)
    assert res[0]["out_tags"] == [(None, "s", "c", None)], res[0]["out_tags"]
    _check(res, 1)


@pytest.mark.parametrize("world", [1, 4, 9])
def test_loss_on_tiles_tile_sum_and_dtensor(world):
    """A loss written on padded local tiles with tile_sum, and the same loss with DTensor ops
    on output='dtensor': the loss and every gradient equal the single device's."""
    for r in run_distributed(W.tile_sum_worker, world, 7, timeout=600):
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), r
        assert abs(r["dtensor_loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), r
        assert r["param_err"] < 1e-5 and r["dtensor_param_err"] < 1e-5 and r["in_err"] < 1e-5, r


def test_uninterpretable_cotangent_raises_on_every_rank():
    """A partial cotangent on a RowToken output, and a per-rank loss, raise CotangentError (a
    BaseException: an `except Exception` around backward does not swallow it)."""
    for r in run_distributed(W.bad_cotangent_worker, 4, timeout=300):
        assert isinstance(r, tuple), r
        first, second = r
        assert "differs between the ranks" in first and "Fix" in first, first
        assert "differs between the ranks" in second, second


def test_example_trains_five_adamw_steps_with_tile_io():
    """examples/06_train_tiles.py: 5 AdamW steps with DTensor tiles in, local tiles out and a
    tile_sum loss, on 2x2, equal to single device (losses 1e-5 relative; parameters 1e-4,
    measured 1.0e-5, except the zero-true-gradient LayerNorm biases Adam turns noise into
    +-lr steps on)."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "06_train_tiles.py"), "--p", "2",
                           "--steps", "5"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\s+\d+\s+([\d.]+)\s+([\d.]+)\s+", proc.stdout, re.M)
    assert len(rows) == 5, proc.stdout
    for a, b in rows:
        assert abs(float(a) - float(b)) <= 1e-5 * abs(float(b)), proc.stdout
    perr = float(re.search(r"max relative difference ([\d.e+-]+)", proc.stdout).group(1))
    assert perr < 1e-4, proc.stdout
    assert "proj_z.0.bias" in proc.stdout


@pytest.mark.parametrize("world", [4, 9])
def test_tile_mode_holds_no_whole_pair_tensor(world):
    """Forward + backward with tiles in and out never creates a tensor with two token dims of
    length N on any rank (full-tensor mode does: the check can fail)."""
    for r in run_distributed(W.whole_pair_worker, world, 22, timeout=600):
        assert r["tiles"] == [], r["tiles"][:5]
        assert len(r["full"]) > 0
