"""Dropping a parallel module and its model frees the model's parameters and the capture's
opaque call sites (no process-global cache keeps them alive)."""

import gc
import warnings
import weakref

import pytest
import torch

import autocp
from autocp.passes.trace import live_entries

pytest.importorskip("boltz.model.layers.pairformer")


def test_dropped_models_are_freed():
    from boltz.model.layers.pairformer import PairformerModule

    before = len(live_entries())
    params = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = PairformerModule(16, 16, 2, v2=True).eval()
        n = 8
        s, z = torch.randn(1, n, 16), torch.randn(1, n, n, 16)
        mask = torch.ones(1, n)
        pm = mask[:, :, None] * mask[:, None, :]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            par = autocp.parallelize(m, None, example_inputs=(s, z, mask, pm))
        with torch.no_grad():
            par(s, z, mask, pm)
        assert len(live_entries()) > before  # the capture's call sites are alive with it
        params.extend(weakref.ref(q) for q in m.parameters())
        del m, par
    gc.collect()
    assert sum(r() is not None for r in params) == 0
    assert len(live_entries()) == before


def test_attention_specs_are_freed():
    """The matched triangle attentions' specs (looked up by key from the emitted tile
    programs) live as long as the parallel modules that run them."""
    import tests.compiler.af3like as af
    from autocp.passes.attention import live_specs as live

    gc.collect()
    before = live()
    m = af.Trunk()
    n = 7
    z, s = torch.randn(1, n, n, 8), torch.randn(1, n, 8)
    mask = torch.ones(1, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        par = autocp.parallelize(m, None, example_inputs=(z, s, mask, mask[:, :, None] * mask[:, None, :]))
    assert live() > before  # the matched triangle attentions' specs are held by the programs
    params = [weakref.ref(q) for q in m.parameters()]
    del m, par
    gc.collect()
    assert live() == before and sum(r() is not None for r in params) == 0
