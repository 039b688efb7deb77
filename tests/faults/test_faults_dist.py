"""Fault suite on a 2x2 gloo mesh (init_mesh(timeout=3)): a rank that raises inside the
forward and retries, one whose input check fails, one that exits, one that is slow, and
ranks that disagree on weights, N, dtype and values. Every case must end in an error on
every rank (naming the culprit) within the timeout + 10 s -- never a hang."""

from __future__ import annotations

import ast
import os

import pytest

from autocp.testing import DistributedTestError, run_distributed

from . import _workers as W

pytestmark = pytest.mark.distributed
BOUND = W.TIMEOUT + 10  # seconds: no step may take longer


def _steps_within_bound(res):
    for r in res:
        for k, v in r.items():
            if isinstance(v, tuple):
                assert v[1] < BOUND, f"{k} took {v[1]:.1f}s"


def test_raise_inside_forward_then_retry():
    res = run_distributed(W.raise_then_retry, 4, timeout=120)
    _steps_within_bound(res)
    assert all(r["warmup"][0] == "ok" for r in res)
    assert res[1]["faulty"] == ("RuntimeError", res[1]["faulty"][1], "injected fault on rank 1")
    assert all(res[i]["faulty"][0] == "MeshFaultError" for i in (0, 2, 3))
    for r in res:  # the next call fails on every rank, naming the culprit and its error
        assert r["retry"][0] == "MeshFaultError"
        assert "rank 1 failed in the previous call" in r["retry"][2] and "injected fault" in r["retry"][2]
        assert r["again"][0] == "MeshFaultError"  # and stays refused (collectives out of step)


def test_rejected_input_then_retry_works():
    res = run_distributed(W.raise_before_comm_then_retry, 4, timeout=120)
    _steps_within_bound(res)
    for r in res:
        assert r["faulty"][0] == "CallError" and "mask has 6 tokens" in r["faulty"][2]
        assert r["retry"][0] == "ok" and r["err"] < 1e-4


def test_rank_that_exits(tmp_path):
    with pytest.raises(DistributedTestError) as e:
        run_distributed(W.exits, 4, str(tmp_path), timeout=120)
    assert e.value.culprit == 2 and "code 3" in str(e.value)
    for r in (0, 1, 3):
        res = ast.literal_eval(open(os.path.join(tmp_path, f"rank{r}")).read())
        assert res["call"][0] == "MeshFaultError" and res["call"][1] < BOUND, res
        assert res["again"][0] == "MeshFaultError"


def test_slow_rank():
    res = run_distributed(W.slow, 4, timeout=120)
    _steps_within_bound(res)
    for r in res:
        assert r["call"][0] == "MeshFaultError", r
    assert all("could not exchange" in res[i]["call"][2] for i in (0, 1, 2))


def test_weights_disagree_and_broadcast_from():
    res = run_distributed(W.weights_disagree, 4, timeout=120)
    for r in res:
        assert r["parallelize"][0] == "AgreementError"
        msg = r["parallelize"][2]
        assert "rank 1 disagrees with rank 0" in msg and "layers.0.transition_z.fc1.weight" in msg
        assert r["broadcast"][0] == "ok" and r["err"] < 1e-4


@pytest.mark.parametrize("what,needle", [("n", "N (token count)"), ("dtype", "pair_mask [1, 7, 7] float64"),
                                         ("values", "'z': checksums")])
def test_call_disagrees(what, needle):
    res = run_distributed(W.call_disagrees, 4, what, timeout=120)
    _steps_within_bound(res)
    for r in res:
        assert r["call"][0] == "AgreementError" and "rank 2 disagrees with rank 0" in r["call"][2], r
        assert needle in r["call"][2], r["call"][2]
        assert r["retry"][0] == "ok"  # nothing ran: the mesh is still in step


def test_dtensor_on_another_mesh():
    res = run_distributed(W.dtensor_other_mesh, 4, timeout=120)
    for r in res:
        assert r["call"][0] == "CallError" and "DTensor on DeviceMesh((4,)" in r["call"][2]
