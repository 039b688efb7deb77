"""Training through parallelize with dropout > 0 warns (masks are per tile, not Boltz's
row/column-shared ones across the whole pair tensor); dropout 0 and eval do not."""

import warnings

import pytest

from autocp.testing import run_distributed


def _worker(rank, world, dropout, train):
    import autocp
    from tests.compiler._workers import build_pairformer, pairformer_inputs

    import torch

    mesh = autocp.init_mesh()
    torch.manual_seed(0)  # the same generator state on every rank (else autocp.guard warns: masks differ)
    model = build_pairformer(2)
    for layer in model.layers:
        layer.dropout = dropout
    model.dropout = dropout
    model.train(train)
    inputs = pairformer_inputs(7)
    pm = autocp.parallelize(model, mesh, example_inputs=inputs)
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        pm(*inputs)
        pm(*inputs)
    return [str(w.message) for w in wl if "dropout" in str(w.message) and "random generators" not in str(w.message)]


@pytest.mark.parametrize("dropout,train,expect", [(0.25, True, True), (0.0, True, False), (0.25, False, False)])
def test_dropout_warning_on_2x2(dropout, train, expect):
    res = run_distributed(_worker, 4, dropout, train)
    for msgs in res:
        if expect:
            assert len(msgs) == 1, msgs  # once, not per call
            assert "per tile" in msgs[0] and "Fix:" in msgs[0] and "2x2" in msgs[0]
        else:
            assert msgs == []
