"""Function claims (autocp.passes.functions): the openfold-derived ``chunk_layer`` (Boltz,
openfold3, Protenix) rejects fake tensors and tiles (``type(t) is torch.Tensor`` ->
``ValueError("Not supported")``), so a module that chunks failed both the capture and the
eager engine. While autocp captures or runs a model it is replaced by
:func:`whole_chunk_layer` (the same computation in one chunk).

* unit: ``whole_chunk_layer`` equals Boltz's ``chunk_layer`` (broadcast batch dims, dict
  outputs, ``_out`` / ``_add_into_out``); the claim is installed at every binding site and
  restored after;
* parity: Boltz's own ``TriangleAttention`` code (a copy of its class that is not
  registered, so autocp must follow its python) called with ``chunk_size=2`` on 1x1, 2x2
  and 3x3, captured and on the eager engine, ``strict=True`` (no pair gather): outputs,
  input and parameter gradients equal the single-device chunked module's.
"""

import warnings

import pytest
import torch

from autocp.testing import run_distributed

pytest.importorskip("boltz")

N, C = 7, 8


def _unregistered_tri_attn(seed=0):
    """Boltz's TriangleAttention (ending node), weights re-drawn, as an instance of a copy of
    its class (same methods, same module globals) that no autocp rule claims."""
    from boltz.model.layers.triangular_attention.attention import TriangleAttention

    cls = type("TriAttnUnregistered", (torch.nn.Module,),
               {k: v for k, v in TriangleAttention.__dict__.items() if k not in ("__dict__", "__weakref__")})
    torch.manual_seed(seed)
    m = TriangleAttention(C, 4, 2, starting=False)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    m.__class__ = cls
    return m.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, N, N, C, generator=g)
    mask = torch.ones(1, N, N)
    mask[:, 5, :] = 0
    mask[:, :, 5] = 0
    return x, mask


def test_whole_chunk_layer_equals_chunk_layer():
    from boltz.model.layers.triangular_attention.utils import chunk_layer

    from autocp.passes.functions import whole_chunk_layer

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)

    def layer(a, b):
        return {"y": lin(a) * b.sum(-1, keepdim=True), "z": a[..., :2] + b[..., :2]}

    a = torch.randn(3, 4, 7, 6)
    b = torch.randn(1, 4, 7, 6)  # broadcast over the first batch dim
    for nbd in (1, 2):
        ref = chunk_layer(layer, {"a": a, "b": b}, chunk_size=2, no_batch_dims=nbd)
        got = whole_chunk_layer(layer, {"a": a, "b": b}, chunk_size=2, no_batch_dims=nbd)
        assert torch.allclose(ref["y"], got["y"], atol=1e-6) and torch.allclose(ref["z"], got["z"])

    def tensor_layer(a):
        return lin(a)

    for add in (False, True):
        o1 = torch.randn(3, 4, 7, 5)
        o2 = o1.clone()
        r = chunk_layer(tensor_layer, {"a": a}, chunk_size=5, no_batch_dims=2, _out=o1, _add_into_out=add)
        g = whole_chunk_layer(tensor_layer, {"a": a}, chunk_size=5, no_batch_dims=2, _out=o2, _add_into_out=add)
        assert torch.allclose(r, g, atol=1e-6) and torch.allclose(o1, o2, atol=1e-6)


def test_claim_is_installed_and_restored():
    import boltz.model.layers.triangular_attention.attention as att
    import boltz.model.layers.triangular_attention.utils as utl

    from autocp.passes.functions import claimed_functions, whole_chunk_layer

    original = utl.chunk_layer
    assert att.chunk_layer is original
    with claimed_functions():
        with claimed_functions():  # nested: one install
            assert att.chunk_layer is whole_chunk_layer and utl.chunk_layer is whole_chunk_layer
        assert att.chunk_layer is whole_chunk_layer
    assert att.chunk_layer is original and utl.chunk_layer is original


def test_register_function_errors():
    import autocp

    with pytest.raises(ValueError, match="package.module:function"):
        autocp.register_function("chunk_layer", lambda *a: None)
    with pytest.raises(TypeError, match="callable"):
        autocp.register_function("a.b:c", 3)


def chunk_worker(rank, world, emit):
    import autocp

    mesh = autocp.init_mesh()
    m = _unregistered_tri_attn()
    x, mask = _inputs()
    w = torch.randn(1, N, N, C, generator=torch.Generator().manual_seed(3))
    xr = x.clone().requires_grad_(True)
    ref = m(xr, mask=mask, chunk_size=2)
    (ref * w).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(m, mesh, example_inputs=((x,), {"mask": mask, "chunk_size": 2}), strict=True,
                                emit=emit)
        xp = x.clone().requires_grad_(True)
        out = pm(xp, mask=mask, chunk_size=2)
        (out * w).sum().backward()

    def rel(a, b):
        return float((a - b).abs().max() / (b.abs().max() + 1e-12))

    return {"out": rel(out.detach(), ref.detach()), "xgrad": rel(xp.grad, xr.grad),
            "pgrad": max(rel(p.grad, ref_grads[k]) for k, p in pm.named_parameters()),
            "n_params": len(ref_grads), "text": pm.explain() if rank == 0 else ""}


@pytest.mark.distributed
@pytest.mark.parametrize("emit", ["graph", "eager"])
@pytest.mark.parametrize("world", [1, 4, 9])
def test_chunked_triangle_attention_parity(world, emit):
    res = run_distributed(chunk_worker, world, emit)
    for r in res:
        assert r["out"] < 1e-5 and r["xgrad"] < 1e-4 and r["pgrad"] < 1e-4, r
    if world > 1:
        assert "ring" in res[0]["text"]  # the triangle attention ran on the ring, not gathered
