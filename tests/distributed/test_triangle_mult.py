"""Parity of autocp's 2D triangle multiplication with Boltz's modules on 1x1, 2x2, 3x3.

The parent process builds Boltz's own ``TriangleMultiplicationOutgoing`` / ``Incoming``
with ALL parameters re-drawn (Boltz zero-inits ``p_out``) and computes every reference
on the full tensor (fp32 train forward + grads of z and of every parameter, eval
forward, bf16-autocast forward + dz). Each mesh size then runs ONE distributed job that
evaluates all cases (both directions, N = p*k and p*k + 1, random token masks, bad
inputs) on its tiles and returns measured errors and counted bytes.

Ranks load the Boltz module's ``state_dict`` into a stand-in with the same six
submodules (``direction=`` given explicitly): importing boltz pulls in torch._dynamo,
~5 s of CPU per process, too slow for 9 ranks on 2 cores. The 1x1 tests use the Boltz
class itself.

bf16 tolerance (documented): under ``torch.autocast('cpu', bfloat16)`` the projections run
in bf16 (8-bit mantissa, ~4e-3 relative per rounding) while the contraction stays fp32 as
in Boltz; we require max abs error <= 5e-2 * scale vs the fp32 reference (forward and
dL/dz), and not worse than 2x Boltz's own bf16-autocast error + 1e-2 * scale.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autocp
from autocp import LayoutError, Pair2D, init_mesh
from autocp.comm import count_comm
from autocp.mesh import SquareMesh
from autocp.ops.common import sync_grads
from autocp.ops.triangle_mult import COMM_NAME, TriangleMultiplication2D, trimul_comm_bytes
from autocp.testing import run_distributed

B, C, K = 2, 8, 3
FP32_TOL = 1e-4
BF16_TOL = 5e-2


# ----------------------------------------------------------------------------- helpers
def boltz_class(direction: str):
    from boltz.model.layers import triangular_mult as tm  # parent process only

    return {"outgoing": tm.TriangleMultiplicationOutgoing, "incoming": tm.TriangleMultiplicationIncoming}[direction]


def make_module(direction: str, seed: int) -> torch.nn.Module:
    """Boltz module with ALL parameters re-drawn (Boltz zero-inits p_out)."""
    m = boltz_class(direction)(C)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name.startswith("norm"):
                base = 1.0 if name.endswith("weight") else 0.0
                prm.copy_(base + 0.2 * torch.randn(prm.shape, generator=g))
            else:  # Linear [out, in]
                prm.copy_(torch.randn(prm.shape, generator=g) / prm.shape[1] ** 0.5)
    return m


class StandIn(nn.Module):
    """Same submodules (and state_dict keys) as Boltz's triangle multiplication."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim, eps=1e-5)
        self.p_in = nn.Linear(dim, 2 * dim, bias=False)
        self.g_in = nn.Linear(dim, 2 * dim, bias=False)
        self.norm_out = nn.LayerNorm(dim)
        self.p_out = nn.Linear(dim, dim, bias=False)
        self.g_out = nn.Linear(dim, dim, bias=False)


def make_inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, n, n, C, generator=g)
    tok = (torch.rand(B, n, generator=g) > 0.3).float()
    tok[:, 0] = 1.0
    tok[:, 1] = 0.0  # some tokens masked for sure
    mask = tok[:, :, None] * tok[:, None, :]
    w = torch.randn(B, n, n, C, generator=g)  # loss weights: loss = sum(out * w)
    return z, mask, w


def _max_err(x, ref):
    return (x.float() - ref.float()).abs().max().item()


def _scale(ref):
    return ref.float().abs().max().item()


def _reference(m, z, mask, w, autocast=False):
    zr = z.clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m(zr, mask)
    (out.float() * w).sum().backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return out.detach().float(), zr.grad.clone(), grads


def build_cases(p: int) -> list:
    """Inputs + Boltz references (parent process) for every case of a p x p mesh."""
    cases = []
    for direction in ("outgoing", "incoming"):
        for n in (p * K, p * K + 1):
            seed = 1000 * p + 10 * n + (direction == "incoming")
            m = make_module(direction, seed)
            z, mask, w = make_inputs(n, seed + 1)
            out_ref, gz_ref, gp_ref = _reference(m, z, mask, w)
            m.eval()
            with torch.no_grad():
                out_eval = m(z, mask)
            m.train()
            out_bf, gz_bf, _ = _reference(m, z, mask, w, autocast=True)
            cases.append(dict(
                direction=direction, n=n, state=m.state_dict(), z=z, mask=mask, w=w,
                out_ref=out_ref, gz_ref=gz_ref, gp_ref=gp_ref, out_eval=out_eval,
                boltz_bf16_err=_max_err(out_bf, out_ref), boltz_bf16_gz_err=_max_err(gz_bf, gz_ref),
            ))
    return cases


# ----------------------------------------------------------------------------- worker
def parity_worker(rank, world, cases):
    """All parity cases on this rank's tile; returns measured errors and counted bytes."""
    mesh = init_mesh()
    lay = Pair2D()
    res = {"coord": mesh.coord, "cases": [], "bad": {}}
    for cs in cases:
        direction, n = cs["direction"], cs["n"]
        m = StandIn(C)
        m.load_state_dict(cs["state"])
        op = TriangleMultiplication2D(m, mesh, direction=direction)
        zt, mt, wt = (lay.shard(cs[k_], mesh) for k_ in ("z", "mask", "w"))
        case = {"direction": direction, "n": n, "b": zt.shape[1], "scale": _scale(cs["out_ref"])}

        # --- train, fp32, forward + backward, comm counted
        op.train()
        zg = zt.clone().requires_grad_(True)
        with count_comm() as cf:
            out = op(zg, mt, n_tokens=n)
        with count_comm() as cb:
            (out * wt).sum().backward()
        sync_grads(m, mesh)
        case["fwd_err"] = _max_err(out, lay.shard(cs["out_ref"], mesh))  # padding must be 0 too
        case["gz_err"] = _max_err(zg.grad, lay.shard(cs["gz_ref"], mesh))
        case["gz_scale"] = _scale(cs["gz_ref"])
        case["param_err"] = {
            k_: (_max_err(p_.grad, cs["gp_ref"][k_]), _scale(cs["gp_ref"][k_])) for k_, p_ in m.named_parameters()
        }
        case["fwd_bytes"] = dict(cf.bytes)
        case["bwd_bytes"] = dict(cb.bytes)
        m.zero_grad(set_to_none=True)

        # --- train by channel groups / row chunks (forced: 3 pieces; small tiles run as one)
        zq = zt.clone().requires_grad_(True)
        with autocp.chunking(1 / 3, min_bytes=0), count_comm() as cq:
            outq = op(zq, mt, n_tokens=n)
            (outq * wt).sum().backward()
        sync_grads(m, mesh)
        case["grouped_train_err"] = max(
            _max_err(outq, lay.shard(cs["out_ref"], mesh)) / case["scale"],
            _max_err(zq.grad, lay.shard(cs["gz_ref"], mesh)) / _scale(cs["gz_ref"]),
            max(_max_err(p_.grad, cs["gp_ref"][k_]) / _scale(cs["gp_ref"][k_]) for k_, p_ in m.named_parameters()))
        case["grouped_train_bytes"] = dict(cq.bytes)
        m.zero_grad(set_to_none=True)

        # --- ring_chunks (1 = whole tiles, 3 = uneven groups) give the same numbers
        if direction == "incoming" and n % mesh.p:
            for chunks in (1, 3):
                opk = TriangleMultiplication2D(m, mesh, direction=direction, ring_chunks=chunks)
                zk = zt.clone().requires_grad_(True)
                with count_comm() as ck:
                    outk = opk(zk, mt, n_tokens=n)
                    (outk * wt).sum().backward()
                m.zero_grad(set_to_none=True)
                case[f"chunks{chunks}_err"] = max(_max_err(outk, out), _max_err(zk.grad, zg.grad))
                case[f"chunks{chunks}_bytes"] = dict(ck.bytes)

        # --- eval, fp32, no_grad (the channel-group path; forced into 3 groups / row chunks
        # here, small tiles run as one chunk by default)
        op.eval()
        with torch.no_grad(), count_comm() as ce:
            out_e = op(zt, mt, n_tokens=n)
        case["eval_err"] = _max_err(out_e, lay.shard(cs["out_eval"], mesh))
        case["eval_bytes"] = dict(ce.bytes)
        with torch.no_grad(), count_comm() as cg, autocp.chunking(1 / 3, min_bytes=0):
            out_g = op(zt, mt, n_tokens=n)
        case["eval_err"] = max(case["eval_err"], _max_err(out_g, lay.shard(cs["out_eval"], mesh)))
        case["grouped_bytes"] = dict(cg.bytes)
        op.train()

        # --- train, bf16 autocast, forward + dL/dz (vs the fp32 reference)
        zb = zt.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outb = op(zb, mt, n_tokens=n)
        (outb.float() * wt).sum().backward()
        m.zero_grad(set_to_none=True)
        case["bf16_dtype"] = str(outb.dtype)
        case["bf16_err"] = _max_err(outb, lay.shard(cs["out_ref"], mesh))
        case["bf16_gz_err"] = _max_err(zb.grad, lay.shard(cs["gz_ref"], mesh))
        case["boltz_bf16_err"] = cs["boltz_bf16_err"]
        case["boltz_bf16_gz_err"] = cs["boltz_bf16_gz_err"]
        res["cases"].append(case)

    # --- bad inputs (raised before any communication, so no rank hangs)
    cs = cases[-1]
    m = StandIn(C)
    op = TriangleMultiplication2D(m, mesh, direction="outgoing")
    n, p = cs["n"], mesh.p
    zt, mt = lay.shard(cs["z"], mesh), lay.shard(cs["mask"], mesh)
    bad = {
        "tile_shape": lambda: op(cs["z"], cs["mask"], n_tokens=n),  # the full tensor is not a tile (p>1)
        "wrong_n": lambda: op(zt, mt, n_tokens=n + 3 * p),
        "mask_shape": lambda: op(zt, mt[:, :, :-1], n_tokens=n),
        "channels": lambda: op(torch.randn(*zt.shape[:3], C + 1), mt, n_tokens=n),
        "no_n": lambda: op(zt, mt),  # N is required on a p > 1 mesh (padding)
    }
    for key, fn in bad.items():
        try:
            fn()
            res["bad"][key] = None
        except LayoutError as e:
            res["bad"][key] = str(e)
    return res


# ----------------------------------------------------------------------------- fixtures
_CACHE: dict = {}


def results(p: int):
    if p not in _CACHE:
        cases = build_cases(p)
        if p == 1:
            _CACHE[p] = [parity_worker(0, 1, cases)]  # in-process: no process group, 1x1 mesh
        else:
            _CACHE[p] = run_distributed(parity_worker, p * p, cases, timeout=240)
    return _CACHE[p]


MESHES = [1, 2, 3]


# ----------------------------------------------------------------------------- tests
def test_reference_depends_on_the_op():
    """The re-drawn reference is not trivial: output nonzero, mixes tokens, direction matters."""
    n = 6
    z, mask, _ = make_inputs(n, 3)
    mask = torch.ones_like(mask)
    out = {}
    for d in ("outgoing", "incoming"):
        m = make_module(d, 5)  # same seed -> identical parameters for both directions
        out[d] = m(z, mask).detach()
        assert _scale(out[d]) > 0.1
        z2 = z.clone()
        z2[:, 2, 4] += torch.linspace(-1.0, 1.0, C)  # one pair entry (not a constant: LayerNorm)
        delta = (m(z2, mask) - out[d]).detach().abs().amax(dim=(0, 3))
        # outgoing: a[2,4], b[2,4] feed out[2, j] and out[j, 2] for every j
        # incoming: a[2,4], b[2,4] feed out[4, j] and out[j, 4]
        line = 2 if d == "outgoing" else 4
        assert (delta[line] > 1e-4).sum() >= n - 1, delta
        assert (delta[:, line] > 1e-4).sum() >= n - 1, delta
    assert _max_err(out["outgoing"], out["incoming"]) > 0.1 * _scale(out["outgoing"])


def test_one_by_one_identical_and_no_comm():
    mesh = SquareMesh.single()
    for d in ("outgoing", "incoming"):
        m = make_module(d, 11)
        z, mask, w = make_inputs(7, 12)
        ref, gz_ref, gp_ref = _reference(m, z, mask, w)
        op = TriangleMultiplication2D(m, mesh)
        assert list(dict(op.named_parameters())) == list(dict(m.named_parameters()))
        assert op.state_dict().keys() == m.state_dict().keys()
        zg = z.clone().requires_grad_(True)
        with count_comm() as st:
            out = op(zg, mask, n_tokens=7)
            (out * w).sum().backward()
        assert st.total_bytes == 0
        assert _max_err(out, ref) <= 1e-6 * max(1.0, _scale(ref))
        assert _max_err(zg.grad, gz_ref) <= 1e-5 * _scale(gz_ref)
        for k_, prm in m.named_parameters():
            assert _max_err(prm.grad, gp_ref[k_]) <= 1e-5 * _scale(gp_ref[k_]), k_


@pytest.mark.parametrize("p", MESHES)
def test_fp32_forward_and_grads(p):
    for rank_res in results(p):
        assert len(rank_res["cases"]) == 4
        for case in rank_res["cases"]:
            tag = f"p={p} rank={rank_res['coord']} {case['direction']} N={case['n']}"
            assert case["scale"] > 0.1, tag
            assert case["fwd_err"] <= FP32_TOL * case["scale"], (tag, case["fwd_err"], case["scale"])
            assert case["gz_err"] <= FP32_TOL * case["gz_scale"], (tag, case["gz_err"])
            assert len(case["param_err"]) == 8  # 2 LayerNorms x (w, b) + 4 Linear weights
            for name, (err, scale) in case["param_err"].items():
                assert scale > 0, (tag, name)
                assert err <= FP32_TOL * scale, (tag, name, err, scale)


@pytest.mark.parametrize("p", MESHES)
def test_ring_chunks_same_result(p):
    seen = 0
    for rank_res in results(p):
        for case in rank_res["cases"]:
            for chunks in (1, 3):
                if f"chunks{chunks}_err" in case:
                    seen += 1
                    assert case[f"chunks{chunks}_err"] <= 1e-5 * max(case["scale"], case["gz_scale"])
    assert seen == (0 if p == 1 else 2 * p * p)


@pytest.mark.parametrize("p", MESHES)
def test_eval_mode_no_grad(p):
    for rank_res in results(p):
        for case in rank_res["cases"]:
            assert case["eval_err"] <= FP32_TOL * case["scale"], (p, case["direction"], case["n"])


@pytest.mark.parametrize("p", MESHES)
def test_bf16_autocast_loose(p):
    for rank_res in results(p):
        for case in rank_res["cases"]:
            tag = (p, rank_res["coord"], case["direction"], case["n"])
            assert case["bf16_dtype"] == "torch.bfloat16", tag  # the projections really ran in bf16
            assert case["bf16_err"] <= BF16_TOL * case["scale"], (tag, case["bf16_err"], case["scale"])
            assert case["bf16_err"] <= 2 * case["boltz_bf16_err"] + 1e-2 * case["scale"], tag
            assert case["bf16_gz_err"] <= BF16_TOL * case["gz_scale"], (tag, case["bf16_gz_err"])
            assert case["bf16_gz_err"] <= 2 * case["boltz_bf16_gz_err"] + 1e-2 * case["gz_scale"], tag


@pytest.mark.parametrize("p", [2, 3])
def test_comm_bytes_match_formula(p):
    for rank_res in results(p):
        r, c = rank_res["coord"]
        for case in rank_res["cases"]:
            args = (p, r, c, B, case["b"], C, case["direction"])
            fwd = trimul_comm_bytes(*args, "forward")
            bwd = trimul_comm_bytes(*args, "backward")
            assert fwd > 0 and bwd > fwd
            # only the op's own traffic, and exactly the analytic volume
            assert case["fwd_bytes"] == {COMM_NAME: fwd}, (p, r, c, case["direction"])
            assert case["bwd_bytes"] == {COMM_NAME: bwd}, (p, r, c, case["direction"])
            assert case["eval_bytes"] == {COMM_NAME: fwd}
            assert case["grouped_bytes"] == {COMM_NAME: fwd}  # channel groups: same bytes, more messages
            assert case["grouped_train_bytes"] == {COMM_NAME: fwd + bwd}
            assert case["grouped_train_err"] < FP32_TOL, case["grouped_train_err"]
            if "chunks3_bytes" in case:  # grouping the ring changes messages, not bytes
                assert case["chunks1_bytes"] == case["chunks3_bytes"] == {COMM_NAME: fwd + bwd}
    # the formula itself: ~2p tiles forward, ~4p backward, per rank
    tile = B * C * 4 * 4 * 4
    assert trimul_comm_bytes(p, 0, 0, B, 4, C, "outgoing", "forward") == tile * 2 * (p - 1)
    assert trimul_comm_bytes(p, 1, 1, B, 4, C, "incoming", "backward") == tile * (4 * (p - 1) + 4)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_bad_inputs_raise_clear_errors(p):
    for rank_res in results(p):
        bad = rank_res["bad"]
        if p > 1:
            assert bad["tile_shape"] is not None and "Pair2D tile must be" in bad["tile_shape"]
        assert bad["wrong_n"] is not None and "b = ceil(N/p)" in bad["wrong_n"]
        assert bad["mask_shape"] is not None and "mask tile has shape" in bad["mask_shape"]
        assert bad["channels"] is not None and "the module's weights expect" in bad["channels"]
        if p > 1:
            assert bad["no_n"] is not None and "n_tokens (the global N) is required" in bad["no_n"]
        else:
            assert bad["no_n"] is None  # 1x1: N is the tile size


def test_direction_detection_and_ported_modules():
    m = make_module("incoming", 1)
    assert TriangleMultiplication2D(m, SquareMesh.single()).direction == "incoming"

    class Ported(torch.nn.Module):  # same submodules, unknown class
        def __init__(self):
            super().__init__()
            src = make_module("outgoing", 2)
            for name, mod in src.named_children():
                self.add_module(name, mod)

    with pytest.raises(ValueError, match="pass direction="):
        TriangleMultiplication2D(Ported(), SquareMesh.single())
    ported = Ported()
    op = TriangleMultiplication2D(ported, SquareMesh.single(), direction="outgoing")
    ref = make_module("outgoing", 2)
    z, mask, _ = make_inputs(5, 4)
    assert _max_err(op(z, mask, n_tokens=5), ref(z, mask)) <= 1e-6
    with pytest.raises(ValueError, match="contradicts"):
        TriangleMultiplication2D(m, SquareMesh.single(), direction="outgoing")
