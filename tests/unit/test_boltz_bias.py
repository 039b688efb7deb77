"""The lazy diffusion token-transformer bias (autocp.models.boltz_bias) on plain tensors:
the calls Boltz makes stay lazy and give Boltz's values; any other call materialises the
exact concatenation; the mode selection and its error."""

import pytest
import torch
from torch import nn

from autocp.models import boltz_bias
from autocp.models.boltz_bias import LazyPairBias, bind_lazy_bias, find_bias_projections


def _projs(L=3, cz=8, h=4, seed=0):
    torch.manual_seed(seed)
    ps = [nn.Sequential(nn.LayerNorm(cz), nn.Linear(cz, h, bias=False)) for _ in range(L)]
    for p in ps:
        nn.init.normal_(p[0].weight)
        nn.init.normal_(p[0].bias)
    return ps


def _lazy(ps, z):
    parts = [LazyPairBias([(p, z)], tuple(z.shape[:-1]) + (p[-1].out_features,)) for p in ps]
    return torch.cat(parts, dim=-1)


def test_boltz_spelling_stays_lazy_and_exact():
    ps, z = _projs(), torch.randn(1, 5, 5, 8)
    ref = torch.cat([p(z) for p in ps], dim=-1)
    before = dict(boltz_bias.STATS)
    bias = _lazy(ps, z).float()
    assert isinstance(bias, LazyPairBias) and tuple(bias.shape) == tuple(ref.shape)
    B, N, M, D = bias.shape  # transformersv2.DiffusionTransformer.forward
    L = 3
    bias = bias.view(B, N, M, L, D // L)
    refv = ref.view(B, N, M, L, D // L)
    for i in range(L):
        torch.testing.assert_close(bias[:, :, :, i], refv[:, :, :, i], rtol=0, atol=0)
    assert boltz_bias.STATS["layer_reads"] - before["layer_reads"] == L
    assert boltz_bias.STATS["materialised"] == before["materialised"]


def test_float_under_bf16_autocast_stays_lazy():
    # Boltz runs bf16-mixed: the projections are bf16 and Boltz calls .float() on the whole
    # bias; that used to materialise it (20 GiB per rank at N=30k on 8x8)
    ps, z = _projs(), torch.randn(1, 5, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.cat([p(z) for p in ps], dim=-1).float().view(1, 5, 5, 3, 4)
        before = dict(boltz_bias.STATS)
        bias = _lazy(ps, z).float()
        assert isinstance(bias, LazyPairBias) and bias.dtype == torch.float32
        bias = bias.view(1, 5, 5, 3, 4)
        for i in range(3):
            got = bias[:, :, :, i]
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, ref[:, :, :, i], rtol=0, atol=0)
    assert boltz_bias.STATS["materialised"] == before["materialised"]


def test_other_uses_materialise_the_exact_bias():
    ps, z = _projs(), torch.randn(1, 4, 4, 8)
    ref = torch.cat([p(z) for p in ps], dim=-1)
    before = boltz_bias.STATS["materialised"]
    out = _lazy(ps, z) * 2 + 1
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, ref * 2 + 1, rtol=0, atol=0)
    torch.testing.assert_close(_lazy(ps, z).view(1, 16, 12), ref.view(1, 16, 12), rtol=0, atol=0)
    assert boltz_bias.STATS["materialised"] == before + 2


def test_gradients_flow_through_the_lazy_layers():
    ps = _projs()
    z = torch.randn(1, 4, 4, 8, requires_grad=True)
    ref_z = z.detach().clone().requires_grad_(True)
    b = _lazy(ps, z).view(1, 4, 4, 3, 4)
    loss = sum((b[:, :, :, i] * (i + 1)).sum() for i in range(3))
    loss.backward()
    g_lazy = [p[-1].weight.grad.clone() for p in ps]
    for p in ps:
        p.zero_grad()
    rb = torch.cat([p(ref_z) for p in ps], -1).view(1, 4, 4, 3, 4)
    sum((rb[:, :, :, i] * (i + 1)).sum() for i in range(3)).backward()
    torch.testing.assert_close(z.grad, ref_z.grad)
    for g, p in zip(g_lazy, ps):
        torch.testing.assert_close(g, p[-1].weight.grad)


class DiffusionConditioning(nn.Module):  # the type name find_bias_projections looks for
    def __init__(self, L, cz, h):
        super().__init__()
        self.token_trans_proj_z = nn.ModuleList(_projs(L, cz, h))


def test_modes():
    small = nn.Module()
    small.diffusion_conditioning = DiffusionConditioning(2, 16, 2)  # 4 bias channels <= token_z 16
    big = nn.Module()
    big.diffusion_conditioning = DiffusionConditioning(24, 128, 16)  # released Boltz-2: 384 > 128
    assert sorted(find_bias_projections(small)) == [f"diffusion_conditioning.token_trans_proj_z.{i}" for i in (0, 1)]
    assert bind_lazy_bias(small, None, "auto") == {}
    assert len(bind_lazy_bias(small, None, "lazy")) == 2
    assert len(bind_lazy_bias(big, None, "auto")) == 24
    assert bind_lazy_bias(big, None, "resident") == {}
    assert bind_lazy_bias(nn.Linear(2, 2), None, "lazy") == {}
    with pytest.raises(ValueError, match="token_bias='bf16'.*required one of"):
        bind_lazy_bias(big, None, "bf16")
