"""Single-process checks of the scale-memory pieces: simulated mesh + communication, the
chunking knob, the chunked inference paths of the triangle ops (same values as the whole-
tile paths for every chunking), the estimator's per-module table, and pair_dtype."""

import pytest
import torch

import autocp
from autocp import comm
from autocp.mesh import MeshError, SquareMesh
from autocp.ops.common import chunk_spans


# ----------------------------------------------------------------------------- simulation
def test_simulated_mesh_validates():
    m = SquareMesh.simulated(3, (1, 2))
    assert (m.p, m.r, m.c, m.rank, m.transpose_partner) == (3, 1, 2, 5, 7)
    with pytest.raises(MeshError, match="coord"):
        SquareMesh.simulated(2, (2, 0))
    with pytest.raises(MeshError, match="positive int"):
        SquareMesh.simulated(0)


def test_simulated_comm_allocates_and_counts():
    m = SquareMesh.simulated(3, (0, 1))
    x = torch.ones(2, 4)
    with comm.simulate(m), comm.count_comm() as st:
        assert comm.simulating()
        y, h = comm.start_exchange(x, m.neighbor("row", -1), m.neighbor("row", 1), name="t")
        h.wait()
        assert y.shape == x.shape and y.data_ptr() != x.data_ptr()  # a real receive buffer
        g = comm.all_gather(x, m, "row", dim=0)
        assert g.shape == (6, 4)
        r = comm.all_reduce_(x.clone(), m, "col", op="max")
        assert r.shape == x.shape
    assert not comm.simulating()
    assert st.bytes["t"] == x.numel() * 4 and st.bytes["all_gather"] == 2 * x.numel() * 4


def test_chunking_knob():
    assert chunk_spans(10) == [(i, i + 1) for i in range(10)]  # default 1/16: at most 16 pieces
    assert chunk_spans(40, fraction=1 / 8) == [(5 * i, 5 * i + 5) for i in range(8)]
    assert chunk_spans(10, nbytes=2**20) == [(0, 10)]  # a 1 MiB tensor: one chunk (min 16 MiB)
    assert len(chunk_spans(10, nbytes=40 * 2**20)) == 3
    with autocp.chunking(1 / 8, min_bytes=0):
        assert len(chunk_spans(10, nbytes=1)) == 8
    with autocp.chunking(1.0):
        assert chunk_spans(10) == [(0, 10)]
    with autocp.chunking(1 / 3):
        assert chunk_spans(3) == [(0, 1), (1, 2), (2, 3)]
    for bad in (0, 1.5, True, "x"):
        with pytest.raises(ValueError, match="fraction"):
            with autocp.chunking(bad):
                pass
    with pytest.raises(ValueError, match="min_bytes"):
        with autocp.chunking(0.5, min_bytes=-1):
            pass


# ----------------------------------------------------------------------------- chunked ops
def _redraw(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            base = 1.0 if (prm.dim() == 1 and name.endswith("weight")) else 0.0
            prm.copy_(base + torch.randn(prm.shape, generator=g) / max(1, prm.shape[-1]) ** 0.5)
    return m


def _pair_inputs(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, n, n, c, generator=g)
    tok = (torch.rand(2, n, generator=g) > 0.3).float()
    tok[:, 0] = 1
    tok[:, 1] = 0
    tok[1, :] = 0  # a fully masked batch element: Boltz's uniform-average path
    return z, tok[:, :, None] * tok[:, None, :]


@pytest.mark.parametrize("direction", ["outgoing", "incoming"])
def test_trimul_grouped_matches_boltz_for_every_chunking(direction):
    from boltz.model.layers import triangular_mult as tm

    from autocp.ops.triangle_mult import TriangleMultiplication2D

    cls = tm.TriangleMultiplicationOutgoing if direction == "outgoing" else tm.TriangleMultiplicationIncoming
    m = _redraw(cls(12), 3)
    z, mask = _pair_inputs(7, 12, 4)
    with torch.no_grad():
        ref = m(z, mask)
        op = TriangleMultiplication2D(m, SquareMesh.single())
        for frac in (1.0, 1 / 3, 1 / 8, 1 / 64):
            with autocp.chunking(frac, min_bytes=0):
                out = op(z, mask, n_tokens=7)
            assert (out - ref).abs().max() < 2e-5 * ref.abs().max(), frac


@pytest.mark.parametrize("starting", [True, False])
def test_triangle_attention_rows_match_boltz_for_every_chunking(starting):
    from boltz.model.layers.triangular_attention.attention import TriangleAttention

    from autocp.ops.triangle_attn import TriangleAttention2D

    m = _redraw(TriangleAttention(12, 4, 3, starting=starting), 5)
    z, mask = _pair_inputs(7, 12, 6)
    with torch.no_grad():
        ref = m(z, mask)
        op = TriangleAttention2D(m, SquareMesh.single())
        for frac in (1.0, 1 / 3, 1 / 8):
            with autocp.chunking(frac, min_bytes=0):
                out = op(z, mask, n_tokens=7)
            assert (out - ref).abs().max() < 2e-5 * ref.abs().max(), frac


# ----------------------------------------------------------------------------- estimator
def _pairformer():
    from boltz.model.layers.pairformer import PairformerModule

    return PairformerModule(16, 16, 1, v2=True).eval()


def test_estimate_per_module_table_and_chunking_lowers_peaks():
    m = _pairformer()
    with autocp.chunking(1 / 8, min_bytes=0):  # tiles this small run as one chunk by default
        e = autocp.estimate(m, n_tokens=96, mesh_shape=(2, 2))
    kinds = {rec["kind"] for rec in e.per_module.values()}
    assert {"triangle_mult_out", "triangle_attn_start", "transition"} <= kinds, kinds
    assert all(rec["peak_bytes"] <= e.peak_bytes for rec in e.per_module.values())
    table = e.table("MiB")
    assert "layers.0.tri_mul_out" in table and "parameters" in table
    with autocp.chunking(1.0):
        whole = autocp.estimate(m, n_tokens=96, mesh_shape=(2, 2))
    own = {k: v["transient_bytes"] for k, v in e.per_module.items()}
    own1 = {k: v["transient_bytes"] for k, v in whole.per_module.items()}
    for k in ("layers.0.tri_mul_out", "layers.0.tri_att_start"):
        assert own[k] < 0.8 * own1[k], (k, own[k], own1[k])


def test_estimate_refuses_bad_emit():
    with pytest.raises(ValueError, match="emit"):
        autocp.estimate(_pairformer(), n_tokens=12, emit="fast")


# ----------------------------------------------------------------------------- pair_dtype
def test_pair_dtype_keeps_z_in_bf16_and_stays_close():
    """Boltz's bf16 inference (fp32 weights, autocast bf16) keeps z in fp32 (its fp32 dropout
    mask promotes every residual); pair_dtype=bf16 keeps the pair tiles in bf16 and stays
    within a few bf16 roundings of it."""
    import warnings

    m = _redraw(_pairformer(), 7)
    g = torch.Generator().manual_seed(8)
    n = 9
    s = torch.randn(1, n, 16, generator=g)
    z = torch.randn(1, n, n, 16, generator=g)
    mask = torch.ones(1, n)
    pm_ = mask[:, :, None] * mask[:, None, :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        par = autocp.parallelize(m, None, example_inputs=(s, z, mask, pm_), pair_dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rs, rz = m(s, z, mask, pm_)
        ps, pz = par(s, z.bfloat16(), mask, pm_)
    runner = par._graphs[(n, None)]
    assert rz.dtype == torch.float32 and pz.dtype == torch.bfloat16
    assert runner.storage["pair_dtype"] > 0 and runner.storage["inplace"] > 0
    err = float((pz.float() - rz).abs().max() / rz.abs().max())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        boltz_err = float((m(s, z.bfloat16().float(), mask, pm_)[1] - m(s, z, mask, pm_)[1]).abs().max()
                          / rz.abs().max())
    assert err < 3e-2, (err, boltz_err)  # bf16 storage of z: a few bf16 roundings per residual update
    with pytest.raises(ValueError, match="pair_dtype"):
        autocp.parallelize(m, None, example_inputs=(s, z, mask, pm_), pair_dtype="bf16")


def test_inplace_pass_leaves_inputs_and_training_alone():
    """Without pair_dtype, eval outputs equal the model's and the caller's tensors are not
    written; with autograd recording, the same program runs out of place (grads exact)."""
    import warnings

    m = _redraw(_pairformer(), 9)
    g = torch.Generator().manual_seed(10)
    n = 8
    s, z = torch.randn(1, n, 16, generator=g), torch.randn(1, n, n, 16, generator=g)
    mask = torch.ones(1, n)
    pm_ = mask[:, :, None] * mask[:, None, :]
    keep = [t.clone() for t in (s, z, mask, pm_)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        par = autocp.parallelize(m, None, example_inputs=(s, z, mask, pm_))
    with torch.no_grad():
        ref = m(s, z, mask, pm_)
        out = par(s, z, mask, pm_)
    for a, b in zip(out, ref):
        assert (a - b).abs().max() < 1e-5 * b.abs().max()
    for a, b in zip((s, z, mask, pm_), keep):
        assert torch.equal(a, b)
    zg = z.clone().requires_grad_()
    (par(s, zg, mask, pm_)[1] ** 2).sum().backward()
    zr = z.clone().requires_grad_()
    (m(s, zr, mask, pm_)[1] ** 2).sum().backward()
    assert (zg.grad - zr.grad).abs().max() < 1e-4 * zr.grad.abs().max()
