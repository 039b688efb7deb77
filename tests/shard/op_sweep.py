"""Differential op sweep: one tiny program per rule family of ``autocp.passes.shard.RULES``
(module-level: picklable for the ranks), each applied to inputs in several layouts.

Like PyTorch's ``test/distributed/tensor/test_dtensor_ops.py``: every case runs on the
mesh as a tile program and is compared with the single-device op, forward and input
gradients, for every layout in ``LAYOUTS`` (r/c on the token axes, swapped, one axis
whole, all whole). N=7 (not divisible by 2 or 3).
"""

import torch
import torch.nn.functional as F

N, C = 7, 4
P_ = (None, "r", "c", None)  # pair [B, N, N, C]
LAYOUTS = {
    "pair2d": P_,
    "swapped": (None, "c", "r", None),
    "rows_only": (None, "r", None, None),
    "cols_only": (None, None, "c", None),
    "whole": (None, None, None, None),
}


class Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, z):
        return self.fn(z)


def _mask_from(z):
    return z[..., 0] > 0


# name -> fn(z) on z [1, N, N, C]; every fn is a python function (picklable by name)
def pw_unary(z): return torch.tanh(z) + torch.exp(-z.abs()) + torch.sigmoid(z) * F.gelu(z)
def pw_binary_bcast(z): return z * z.mean(dim=2, keepdim=True) - z.transpose(1, 2) / (1 + z.square())
def where_fill(z): return torch.where(_mask_from(z)[..., None], z, -z).masked_fill(z > 1.0, 0.5)
def sum_token(z): return z.sum(dim=1) + z.sum(dim=(1, 2))[:, None]
def mean_amax(z): return z.mean(dim=2) * z.amax(dim=1)
def var_std(z): return z.var(dim=(1, 2), keepdim=True) + z.std(dim=1, keepdim=True) + z.std()
def softmax_token(z): return torch.softmax(z, dim=1) + torch.log_softmax(z, dim=2)
def logsumexp_token(z): return torch.logsumexp(z, dim=2)
def any_all(z): return z * (z > 0).any(dim=1, keepdim=True) + (z > -2).all(dim=2, keepdim=True).float()
def layer_norm(z): return F.layer_norm(z, (C,)) * 2.0
def reshape_merge(z): return (z.reshape(-1, C) * 2).reshape(z.shape)
def reshape_row(z): return z.reshape(1, N, N * C).flip(-1).reshape(z.shape)
def permute_t(z): return z.permute(0, 2, 1, 3) + z.transpose(1, 2)
def unsq_sq(z): return z.unsqueeze(0).squeeze(0).unsqueeze(-1)[..., 0]
def cat_stack(z): return torch.cat([z, z * 2], dim=-1) + torch.stack([z, -z], dim=-1).sum(-1).repeat(1, 1, 1, 2)
def cat_token(z): return torch.cat([z, z[:, :2]], dim=1).sum(dim=1)
def slice_token(z): return z[:, 1:5] * 1.0
def narrow_select(z): return z.narrow(2, 2, 3).sum(2) + z.select(1, 3)
def index_select_token(z): return z.index_select(1, torch.tensor([0, 3, 6]))
def contraction_channel(z): return torch.einsum("bijc,cd->bijd", z, torch.ones(C, C) / C)
def contraction_token(z): return torch.einsum("bijc,bijd->bcd", z, z)
def trimul_out(z): return torch.einsum("...ikc,...jkc->...ijc", z, z.flip(-1))
def trimul_in(z): return torch.matmul(z.permute(0, 3, 2, 1), z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
def matvec_token(z): return torch.matmul(z.permute(0, 3, 1, 2), z[..., 0].mean(1)[:, None, :, None].expand(1, C, N, 1))[..., 0]
def cumsum_channel(z): return z.cumsum(dim=-1)
def cumsum_token(z): return z.cumsum(dim=1)  # no rule over a token axis: gathered (exact)
def sort_channel(z): return z.sort(dim=-1).values
def max_dim_token(z):
    v, i = z.max(dim=1)
    w, _ = torch.min(z, 2, keepdim=True)
    return v + i.to(z.dtype) + z.argmin(dim=2).to(z.dtype) + w[:, :, 0] + z.argmax(dim=-1).to(z.dtype)[:, 0, :, None]
def one_hot_relpos(z):
    i = torch.arange(z.shape[1])
    rel = (i[:, None] - i[None, :]).clamp(-2, 2) + 2
    return z + F.one_hot(rel, 5)[None, :, :, :C].to(z.dtype)
def einsum3_token(z):  # Boltz-2's atom-pair bias: z read through two token->atom-window maps
    q = torch.arange(2 * 3 * N, dtype=z.dtype).reshape(1, 2, 3, N).sin()
    k = torch.arange(2 * 4 * N, dtype=z.dtype).reshape(1, 2, 4, N).cos()
    return torch.einsum("bijd,bwki,bwlj->bwkld", z, q, k)[:, None]
def expand_token_pair(z):  # template res_type_i / res_type_j: a token vector broadcast to a pair
    v = z.mean(2)                                          # [B, N, C] token vector
    vi = v[:, :, None].expand(-1, -1, z.shape[2], -1)      # [B, N, N, C], equal along j
    vj = v[:, None, :].expand(-1, z.shape[1], -1, -1)      # equal along i
    return torch.cat([z * vi, vj, vi.sum(2, keepdim=True).expand_as(z)], -1)
def glu_channel(z): return F.glu(torch.cat([z, z], -1), dim=-1)
def sdpa_tri(z):
    q = z.permute(0, 1, 2, 3)[:, :, None]  # [B, I, 1, J, C]
    bias = z.mean(-1)[:, None, None]  # [B, 1, 1, J, K]
    return F.scaled_dot_product_attention(q, q, q, attn_mask=bias)[:, :, 0]
def attn_decomposed(z):
    s = torch.einsum("bijc,bikc->bijk", z, z) + z.mean(-1)[:, None]
    return torch.einsum("bijk,bikc->bijc", torch.softmax(s, dim=-1), z)
def inplace_residual(z):
    y = z * 1.0
    y += 0.5 * z.transpose(1, 2)
    y.mul_(2.0)
    return y
def fresh_buffer(z):
    out = torch.empty_like(z.reshape(-1, C))
    out[0:out.shape[0]] = torch.tanh(z.reshape(-1, C))
    return out.reshape(z.shape)


CASES = [pw_unary, pw_binary_bcast, where_fill, sum_token, mean_amax, var_std, softmax_token, logsumexp_token,
         any_all, layer_norm, reshape_merge, reshape_row, permute_t, unsq_sq, cat_stack, cat_token, slice_token,
         narrow_select, index_select_token, contraction_channel, contraction_token, trimul_out, trimul_in,
         matvec_token, cumsum_channel, cumsum_token, sort_channel, max_dim_token, einsum3_token, expand_token_pair, one_hot_relpos, glu_channel, sdpa_tri,
         attn_decomposed, inplace_residual, fresh_buffer]
# ops with no rule over a token axis: exact by gathering, refused under strict=True
GATHERED = {"cumsum_token", "reshape_row", "cat_token"}


def sweep_worker(rank, world, extra_layouts=True):
    """Every case in the Pair2D layout (+ one other layout per case, rotating through
    ``LAYOUTS``, when ``extra_layouts``): max relative error of outputs and input gradients
    vs single device, whether it gathered a pair tensor; for the ``GATHERED`` cases the
    strict-mode error."""
    import autocp
    from autocp.passes.program import compile_tile_program, run_tile_program
    from autocp.passes.shard import ShardingError

    mesh = autocp.init_mesh()
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, N, N, C, generator=g)
    others = [k for k in LAYOUTS if k != "pair2d"]
    res = {}
    for ci, fn in enumerate(CASES):
        names = ["pair2d"] + ([others[ci % len(others)]] if extra_layouts else [])
        for lname in names:
            tags = LAYOUTS[lname]
            m = Op(fn)
            z = z0.clone().requires_grad_(True)
            ref = fn(z)
            w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
            (ref * w).sum().backward()
            rg = z.grad.clone()
            prog, _ = compile_tile_program(m, (z0,), [tags], n=N, p=mesh.p)
            zz = z0.clone().requires_grad_(True)
            out = run_tile_program(prog, mesh, [zz], [tags], N)[0]
            ((out * w).sum() / (mesh.p ** 2)).backward()
            grad = zz.grad
            if mesh.p > 1:
                import torch.distributed as dist

                dist.all_reduce(grad)
            oerr = float((out.detach() - ref.detach()).abs().max() / (ref.detach().abs().max() + 1e-12))
            gerr = float((grad - rg).abs().max() / (rg.abs().max() + 1e-12))
            pair = any(nt.pair and nt.what in ("gather", "op-gather") for nt in prog.notes)
            strict = ""
            if fn.__name__ in GATHERED and lname == "pair2d":
                try:
                    compile_tile_program(m, (z0,), [tags], n=N, p=mesh.p, strict=True)
                    strict = "ok"
                except ShardingError as e:
                    strict = str(e)
            res[(fn.__name__, lname)] = (oerr, gerr, pair, strict)
    return res
