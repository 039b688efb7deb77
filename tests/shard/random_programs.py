"""Seeded random AF3-like programs: blocks assembled from glue pieces and triangle /
attention pieces in several spellings (module-level: picklable for the ranks).

``RandomTrunk(seed)`` draws, per block, 3-5 pieces from ``PIECES`` (with their spelling
choices) and applies them in order to ``(s, z, mask)``. Every piece reads or builds the
pair mask, outer sums, relative positions or attention from the tensors it is given, the
way AF3 re-implementations do, so the compiler sees combinations no test wrote by hand.
"""

import random

import torch
import torch.nn.functional as F
from torch import nn

CS, CZ, H = 6, 8, 2


class _Piece(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.spell = rng.randrange(2)


class PairMask(_Piece):
    """z *= pair mask built from the token mask (two spellings)."""

    def forward(self, s, z, mask):
        pm = mask[:, :, None] * mask[:, None, :] if self.spell else torch.einsum("bi,bj->bij", mask, mask)
        return s, z * pm[..., None]


class OuterSum(_Piece):
    """z += a(s)_i + b(s)_j (outer sum) or an outer product of token features."""

    def __init__(self, rng):
        super().__init__(rng)
        self.a, self.b = nn.Linear(CS, CZ), nn.Linear(CS, CZ)

    def forward(self, s, z, mask):
        if self.spell:
            return s, z + self.a(s)[:, :, None] + self.b(s)[:, None, :]
        return s, z + torch.einsum("bic,bjc->bijc", self.a(s), self.b(s)) * 0.1


class RelPos(_Piece):
    """z += Linear(one_hot(clamp(i - j)))."""

    def __init__(self, rng):
        super().__init__(rng)
        self.lin = nn.Linear(7, CZ)

    def forward(self, s, z, mask):
        i = torch.arange(z.shape[1], device=z.device)
        rel = (i[:, None] - i[None, :]).clamp(-3, 3) + 3
        return s, z + self.lin(F.one_hot(rel, 7).to(z.dtype))[None]


class Residual(_Piece):
    """In-place residual with a transposed read, or a masked_fill."""

    def __init__(self, rng):
        super().__init__(rng)
        self.lin = nn.Linear(CZ, CZ)

    def forward(self, s, z, mask):
        y = self.lin(z)
        if self.spell:
            y += 0.5 * z.transpose(1, 2)
            return s, y
        return s, z + y.masked_fill(mask[:, None, :, None] == 0, 0.0)


class ChannelMLP(_Piece):
    """LayerNorm + SwiGLU transition over channels (or a flattened [-1, C] version)."""

    def __init__(self, rng):
        super().__init__(rng)
        self.ln, self.a, self.b, self.o = nn.LayerNorm(CZ), nn.Linear(CZ, 2 * CZ), nn.Linear(CZ, 2 * CZ), nn.Linear(2 * CZ, CZ)

    def forward(self, s, z, mask):
        x = z.reshape(-1, CZ) if self.spell else z
        x = self.ln(x)
        y = self.o(F.silu(self.a(x)) * self.b(x))
        return s, z + y.reshape(z.shape)


class TriMul(_Piece):
    """Triangle update outgoing/incoming: einsum (ellipsis) or permute + matmul."""

    def __init__(self, rng):
        super().__init__(rng)
        self.outgoing = bool(rng.randrange(2))
        self.ln, self.ab, self.g, self.o = nn.LayerNorm(CZ), nn.Linear(CZ, 2 * CZ), nn.Linear(CZ, CZ), nn.Linear(CZ, CZ)

    def forward(self, s, z, mask):
        x = self.ln(z)
        pm = (mask[:, :, None] * mask[:, None, :])[..., None]
        a, b = (torch.sigmoid(self.ab(x)) * self.ab(x) * pm).chunk(2, -1)
        if self.spell:
            eq = "...ikc,...jkc->...ijc" if self.outgoing else "...kic,...kjc->...ijc"
            o = torch.einsum(eq, a, b)
        elif self.outgoing:
            o = torch.matmul(a.permute(0, 3, 1, 2), b.permute(0, 3, 2, 1)).permute(0, 2, 3, 1)
        else:
            o = torch.matmul(a.permute(0, 3, 2, 1), b.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return s, z + torch.sigmoid(self.g(x)) * self.o(o)


class TriAttn(_Piece):
    """Triangle attention (starting or ending node): decomposed einsum + where mask, or SDPA."""

    def __init__(self, rng):
        super().__init__(rng)
        self.ending = bool(rng.randrange(2))
        self.ln, self.qkv, self.bias, self.o = nn.LayerNorm(CZ), nn.Linear(CZ, 3 * CZ), nn.Linear(CZ, H), nn.Linear(CZ, CZ)

    def forward(self, s, z, mask):
        x = z.transpose(1, 2) if self.ending else z
        B, N, _, Cz = x.shape
        x = self.ln(x)
        q, k, v = self.qkv(x).reshape(B, N, N, 3, H, Cz // H).permute(3, 0, 1, 4, 2, 5)  # [B, I, H, J, D]
        bias = self.bias(x).permute(0, 3, 1, 2)[:, None]  # [B, 1, H, J, K]
        if self.spell:
            sc = torch.einsum("bihjd,bihkd->bihjk", q * (Cz // H) ** -0.5, k) + bias
            sc = torch.where(mask[:, None, None, None, :].bool(), sc, -1e9)
            o = torch.einsum("bihjk,bihkd->bihjd", sc.softmax(-1), v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + (mask[:, None, None, None, :] - 1) * 1e9)
        o = self.o(o.permute(0, 1, 3, 2, 4).reshape(B, N, N, Cz))
        return s, z + (o.transpose(1, 2) if self.ending else o)


class SingleAttn(_Piece):
    """Single-representation attention with pair bias (AttentionPairBias, unregistered)."""

    def __init__(self, rng):
        super().__init__(rng)
        self.qkv, self.bias, self.o = nn.Linear(CS, 3 * CS), nn.Linear(CZ, H), nn.Linear(CS, CS)

    def forward(self, s, z, mask):
        B, N, Cs = s.shape
        q, k, v = self.qkv(s).reshape(B, N, 3, H, Cs // H).permute(2, 0, 3, 1, 4)
        bias = self.bias(z).permute(0, 3, 1, 2).masked_fill(mask[:, None, None, :] == 0, -1e9)
        if self.spell:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            o = torch.softmax(q @ k.transpose(-1, -2) * (Cs // H) ** -0.5 + bias, -1) @ v
        return s + self.o(o.transpose(1, 2).reshape(B, N, Cs)), z


PIECES = [PairMask, OuterSum, RelPos, Residual, ChannelMLP, TriMul, TriAttn, SingleAttn]


class RandomTrunk(nn.Module):
    """``blocks`` blocks of 3-5 pieces drawn by ``seed`` (always at least one triangle piece)."""

    def __init__(self, seed: int, blocks: int = 2):
        super().__init__()
        rng = random.Random(seed)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            kinds = [rng.choice(PIECES) for _ in range(rng.randint(2, 4))] + [rng.choice([TriMul, TriAttn])]
            rng.shuffle(kinds)
            self.blocks.append(nn.ModuleList([k(rng) for k in kinds]))
        self.names = [[type(p).__name__ + str(p.spell) for p in b] for b in self.blocks]

    def forward(self, s, z, mask):
        for b in self.blocks:
            for piece in b:
                s, z = piece(s, z, mask)
        return s, z


def random_worker(rank, world, seeds, n=7):
    """Parity of ``parallelize(RandomTrunk(seed), strict=True)`` vs single device, outputs
    and every parameter gradient, per seed."""
    import autocp
    from autocp.ops.common import sync_grads

    mesh = autocp.init_mesh()
    out = {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = RandomTrunk(seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        s = torch.randn(1, n, CS, generator=g)
        z = torch.randn(1, n, n, CZ, generator=g)
        mask = torch.ones(1, n)
        mask[0, n - 2] = 0
        ref = model(s, z, mask)
        w = [torch.randn(r.shape, generator=torch.Generator().manual_seed(7)) for r in ref]
        sum((r * wi).sum() for r, wi in zip(ref, w)).backward()
        rg = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        pm = autocp.parallelize(model, mesh, example_inputs=(s, z, mask), strict=True)
        outs = pm(s, z, mask)
        sum((o * wi).sum() for o, wi in zip(outs, w)).backward()
        if not getattr(pm, "auto_grad_sync", False):
            sync_grads(pm, mesh)
        oerr = max(float((o - r).abs().max() / (r.abs().max() + 1e-12)) for o, r in zip(outs, ref))
        big = max(float(v.abs().max()) for v in rg.values())
        gerr = max(float((p.grad - rg[k]).abs().max()) / max(float(rg[k].abs().max()), 1e-2 * big)
                   for k, p in model.named_parameters() if p.grad is not None)
        out[seed] = (oerr, gerr, model.names)
    return out
