"""Single-process misuse: call validation, binding by name, clear errors, no mutation of
the original model, launch detection, estimate arguments."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import autocp
from autocp.guard import CallError
from autocp.mesh import MeshError

from . import _workers as W


@pytest.fixture(scope="module")
def built():
    m = W.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(m, None, example_inputs=W.inputs())
    return m, pm


def test_bound_by_name_any_order(built):
    m, pm = built
    s, z, mask, pair = W.inputs()
    ref = m(s, z, mask, pair)
    out = pm(pair_mask=pair, mask=mask, z=z, s=s)
    out2 = pm(s, z, pair_mask=pair, mask=mask, use_kernels=False)
    for a, b, c in zip(ref, out, out2):
        assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() < 1e-5


@pytest.mark.parametrize("case,needle", [
    ("mask_n", "mask has 8 tokens"), ("pair_n", "pair_mask has 8 tokens"), ("z_n", "z has 8 tokens"),
    ("mask_dtype", "pair_mask has dtype torch.bool"), ("kernels", "use_kernels=True"),
    ("channels", "z has size 4 on axis 3"), ("meta", "meta tensor"), ("missing", "missing a required argument"),
])
def test_call_validation(built, case, needle):
    _, pm = built
    s, z, mask, pair = W.inputs()
    s8, z8, mask8, pair8 = W.inputs(8)
    kw = dict(s=s, z=z, mask=mask, pair_mask=pair)
    kw.update({"mask_n": dict(mask=mask8), "pair_n": dict(pair_mask=pair8), "z_n": dict(z=z8),
               "mask_dtype": dict(pair_mask=pair.bool()), "kernels": dict(use_kernels=True),
               "channels": dict(z=z[..., :4]), "meta": dict(z=z.to("meta")), "missing": {}}[case])
    if case == "missing":
        kw.pop("pair_mask")
    with pytest.raises(CallError) as e:
        pm(**kw)
    assert needle in str(e.value), str(e.value)


def test_parallelize_errors(built):
    m, pm = built
    s, z, mask, pair = W.inputs()
    with pytest.raises(TypeError, match="already parallel"):
        autocp.parallelize(pm, None, example_inputs=W.inputs())
    with pytest.raises(CallError, match="missing a required argument: 'pair_mask'"):
        autocp.parallelize(m, None, example_inputs=(s, z, mask))
    with pytest.raises(CallError, match="did you mean 'pair_mask' for 'pairmask'"):
        autocp.parallelize(m, None, example_inputs=dict(s=s, z=z, mask=mask, pairmask=pair))
    with pytest.raises(CallError, match="check_inputs"):
        autocp.parallelize(m, None, example_inputs=W.inputs(), check_inputs="values")


def test_meta_example_inputs_shapes_only():
    m = W.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(m, None, example_inputs=tuple(t.to("meta") for t in W.inputs()))
    x = W.inputs()
    assert (pm(*x)[1] - m(*x)[1]).abs().max() < 1e-5


def _snapshot(mod):
    return {
        "modules": [(n, type(x), x.training, dict(x._forward_hooks), dict(x._forward_pre_hooks),
                     dict(x._backward_hooks)) for n, x in mod.named_modules()],
        "params": [(n, id(p), p.requires_grad, p.dtype, p.detach().clone()) for n, p in mod.named_parameters()],
        "buffers": [(n, b.detach().clone()) for n, b in mod.named_buffers()],
        "dict_keys": [(n, sorted(x.__dict__)) for n, x in mod.named_modules()],
    }


def _same(a, b):
    assert a["modules"] == b["modules"] and a["dict_keys"] == b["dict_keys"]
    for (n1, i1, r1, d1, t1), (n2, i2, r2, d2, t2) in zip(a["params"], b["params"]):
        assert (n1, i1, r1, d1) == (n2, i2, r2, d2) and torch.equal(t1, t2), n1
    for (n1, t1), (n2, t2) in zip(a["buffers"], b["buffers"]):
        assert n1 == n2 and torch.equal(t1, t2)


def test_original_not_mutated_by_train_step():
    m = W.build().eval()
    before = _snapshot(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(m, None, example_inputs=W.inputs())
    pm.train()
    pm.register_forward_hook(lambda *a: None)
    for sub in pm.modules():
        sub.register_forward_pre_hook(lambda *a: None)
    out = pm(*W.inputs())
    (out[0].sum() + out[1].sum()).backward()
    pm.eval()
    pm.train(True)
    pm.zero_grad(set_to_none=True)
    _same(before, _snapshot(m))
    assert not any(x.training for x in m.modules())
    # parameters stay shared by design (docs/hardening.md)
    assert {id(p) for p in pm.parameters()} == {id(p) for p in m.parameters()}


def test_launch_detection(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(MeshError, match="WORLD_SIZE=4 is set but no process group"):
        autocp.init_mesh()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert autocp.init_mesh().p == 1


@pytest.mark.parametrize("kw,exc", [(dict(n_tokens=None), ValueError), (dict(n_tokens=8, mesh_shape=(0, 0)), MeshError),
                                    (dict(n_tokens=8, mesh_shape=(2, 3)), MeshError), (dict(n_tokens=-1), ValueError)])
def test_estimate_arguments(kw, exc):
    with pytest.raises(exc, match="estimate: given"):
        autocp.estimate(torch.nn.Linear(2, 2), **kw)


def test_init_mesh_timeout_argument():
    with pytest.raises(MeshError, match="timeout"):
        autocp.init_mesh(timeout=0)
    copy.copy(autocp.init_mesh(timeout=5))
