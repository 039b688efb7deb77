"""Atom windows split over the whole mesh (autocp.ops.atom_windows) against the
single-device definitions: Boltz's own ``single_to_keys``, the halo exchange, the pair
band ``einsum("bijd,bwki,bwlj->bwkld")`` and the token <-> atom maps, on 1x1 / 2x2 / 3x3,
with atom counts whose window count is not divisible by P, padded atoms and ranks that
own no real window; forward and backward."""

import pytest
import torch

from autocp.testing import run_distributed


def test_window_keys_match_boltz():
    enc = pytest.importorskip("boltz.model.modules.encodersv2")
    from autocp.ops.atom_windows import window_keys

    for K in (1, 3, 7):
        x = torch.randn(2, 32 * K, 5)
        ref = enc.single_to_keys(x, enc.get_indexing_matrix(K, 32, 128, "cpu"), 32, 128)
        assert torch.equal(window_keys(x, 32, 128), ref)


def _case(M, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, D = 2, 3
    x = torch.randn(B, M, D, generator=g)
    z = torch.randn(B, N, N, D, generator=g)
    # sorted atom -> token map, some atoms of no token (padding at the end, one inside)
    idx = torch.sort(torch.randint(0, N, (B, M), generator=g), dim=1).values
    idx[:, -5:] = -1
    idx[0, 3] = -1
    return x, z, idx


def _worker(rank, world, M, N):
    import autocp
    from autocp.ops import atom_windows as A
    from autocp.passes.rewrite import shard_tags

    mesh = autocp.init_mesh()
    x, z, idx = _case(M, N)
    W, H = 32, 128
    plan = A.WindowPlan(mesh, M, W, H)
    # halo keys of the local windows == the local windows of Boltz's keys of the whole tensor
    xl = plan.local(x).clone().requires_grad_(True)
    keys = plan.halo_keys(xl)
    ref_keys = plan.local_windows(A.window_keys(x, W, H))
    real = (torch.arange(plan.kb) + plan.f * plan.kb < plan.K).view(1, -1, 1, 1)  # padding windows: anything
    err_keys = float(((keys - ref_keys) * real).detach().abs().max())
    # backward of the exchange: d(sum keys * G) / dx  == the local block of the full grad
    G = torch.randn(x.shape[0], x.shape[1] // W, H, x.shape[2], generator=torch.Generator().manual_seed(1))
    (keys * plan.local_windows(G)).sum().backward()
    xf = x.clone().requires_grad_(True)
    (A.window_keys(xf, W, H) * G).sum().backward()
    gl = xl.grad.clone()
    err_kgrad = float((gl - plan.local(xf.grad)).abs().max())
    # pair band
    onehot = torch.nn.functional.one_hot(idx.clamp(min=0), N).float() * (idx >= 0).unsqueeze(-1).float()
    zt = shard_tags(z, (None, "r", "c", None), mesh).clone().requires_grad_(True)
    band = A.band_gather(zt, idx, plan, N)
    q = onehot.view(x.shape[0], -1, W, N)
    k = A.window_keys(onehot, W, H)
    zf = z.clone().requires_grad_(True)
    ref = torch.einsum("bijd,bwki,bwlj->bwkld", zf, q, k)
    err_band = float((band - plan.local_windows(ref)).detach().abs().max())
    Gb = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    (band * plan.local_windows(Gb)).sum().backward()
    (ref * Gb).sum().backward()
    err_bgrad = float((zt.grad - shard_tags(zf.grad, (None, "r", "c", None), mesh)).abs().max()) / \
        max(1.0, float(zf.grad.abs().max()))  # relative: a sum over many atom pairs
    # token <-> atom
    ix = A.atom_token_index(shard_tags(onehot, (None, None, "r"), mesh), mesh, N)
    err_idx = int((ix != idx).sum())
    s = torch.randn(x.shape[0], N, 4)
    st = shard_tags(s, (None, "r", None), mesh)
    t2a = A.tokens_to_atoms(st, mesh, N, plan.local(idx + 1) - 1)
    err_t2a = float((t2a - plan.local(torch.bmm(onehot, s))).abs().max())
    cnt = onehot.sum(1)
    w = 1.0 / (torch.gather(cnt, 1, idx.clamp(min=0)) + 1e-6)
    a2t = A.atoms_to_tokens(plan.local(x), plan.local(idx + 1) - 1, plan.local(w), mesh, N)
    mean = onehot / (onehot.sum(1, keepdim=True) + 1e-6)
    err_a2t = float((a2t - shard_tags(torch.bmm(mean.transpose(1, 2), x), (None, "r", None), mesh)).abs().max())
    full = plan.gather_atoms(plan.local(x))
    err_gather = float((full - x).abs().max())
    return dict(keys=err_keys, kgrad=err_kgrad, band=err_band, bgrad=err_bgrad, idx=err_idx, t2a=err_t2a,
                a2t=err_a2t, gather=err_gather)


@pytest.mark.distributed
@pytest.mark.parametrize("world,M,N", [(1, 96, 11), (4, 224, 13), (4, 1184, 50), (9, 224, 13), (9, 608, 40)])
def test_atom_windows_match_single_device(world, M, N):
    for rank, r in enumerate(run_distributed(_worker, world, M, N)):
        for k, v in r.items():
            assert v <= 1e-5, (world, rank, k, v)
