"""autocp.parallelize on public AF3-like codebases, unmodified, called as their own
top-level models call them (tests/corpus/<name>.py says which stack and where).

For each case and mesh (1x1, 2x2, 3x3; N=7, not divisible by 2 or 3; a masked token):
single-device forward + backward of the codebase's stack vs the parallelized module's
(``strict=True``: no op may gather a pair tensor), outputs and every parameter gradient
relative to scale within 1e-4. A case whose package
is not installed is skipped (``bash scripts/install_corpus.sh`` installs the pinned corpus,
tests/corpus/requirements-corpus.txt). Deselect with ``-m "not corpus"``.

The reference is checked to be non-vacuous: its output moves with the input and its
parameter gradients are non-zero.
"""

import pytest

from autocp.testing import DistributedTestError, run_distributed
from tests.corpus._workers import CASES, TOL, harness, parity_worker, tile_parity_worker

pytestmark = [pytest.mark.corpus, pytest.mark.distributed]


def _skip_reason(case):
    return harness(case.partition(":")[0]).unavailable()


def _first_line(e: BaseException) -> str:
    """The rank failure's own message: 'CorpusFailure: [phase] Type: message'."""
    text = str(e)
    for line in text.splitlines():
        if "CorpusFailure: [" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


def _run(worker, case, world):
    """``worker`` on ``world`` ranks; skipped when the codebase is not installed, failed with
    the failing phase's own message."""
    reason = _skip_reason(case)
    if reason:
        pytest.skip(f"{case}: {reason}")
    try:
        return run_distributed(worker, world, case, timeout=600)
    except DistributedTestError as e:
        pytest.fail(f"{case} on {world} rank(s): {_first_line(e)}\n{e}", pytrace=False)


@pytest.mark.parametrize("world", [1, 4, 9], ids=["1x1", "2x2", "3x3"])
@pytest.mark.parametrize("case", CASES)
def test_corpus_parity(case, world):
    res = _run(parity_worker, case, world)
    for rank, r in enumerate(res):
        where = f"{case} on {world} rank(s), rank {rank}"
        # the reference is not vacuous
        assert r["input_sensitivity"] > 1e-3, f"{where}: the reference output does not depend on the input"
        assert r["moved"] is None or r["moved"] > 1e-2, f"{where}: the reference stack is an identity ({r['moved']})"
        assert r["max_ref_grad"] > 0, f"{where}: the reference parameter gradients are all zero"
        assert r["n_zero_grad_params"] <= r["n_params"] // 4, (
            f"{where}: {r['n_zero_grad_params']} of {r['n_params']} parameters have a zero reference gradient")
        assert r["missing_grads"] == [], f"{where}: parameters without a gradient: {r['missing_grads'][:5]}"
        assert r["n_compared_grads"] > 0, f"{where}: no gradient compared"
        assert max(r["out_rel_err"]) <= TOL, (
            f"{where}: output relative error {r['out_rel_err']} > {TOL} "
            f"(gathered warnings {r['n_gathered_warnings']}, explain {r['explain_summary']})")
        assert r["gathered_glue_ops"] == 0 and r["n_gathered_warnings"] == 0, (
            f"{where}: {r['gathered_glue_ops']} glue ops gathered a pair tensor under strict=True: {r['warnings']}")
        assert r["grad_rel_err"] <= TOL, (
            f"{where}: parameter gradient relative error {r['grad_rel_err']:.3g} > {TOL}; worst {r['worst_grads']}")


@pytest.mark.parametrize("world", [4, 9], ids=["2x2", "3x3"])
@pytest.mark.parametrize("case", CASES)
def test_corpus_tile_io_parity(case, world):
    """Tiles in (DTensors), tiles out (``output="dtensor"``), a loss written with DTensor ops:
    DTensor's gradient convention holds on code nobody here wrote (issue [tile-io])."""
    res = _run(tile_parity_worker, case, world)
    for rank, r in enumerate(res):
        where = f"{case} on {world} rank(s), rank {rank}"
        assert r["n_dtensor_outputs"] > 0, where
        assert max(r["out_rel_err"]) <= TOL, (where, r["out_rel_err"])
        assert r["missing_grads"] == [] and r["n_compared_grads"] > 0, (where, r["missing_grads"][:5])
        assert r["grad_rel_err"] <= TOL, (where, r["grad_rel_err"], r["worst_grads"])
