"""A small AF3-like trunk written *differently* from Boltz: other class names, matmul +
permute instead of einsum, hand-written attention, other argument order. Used to check
that the compiler's structural rules do not depend on one codebase's spelling."""

import torch
from torch import nn


class TriMulPermute(nn.Module):
    """Triangle multiplication via permute + matmul. outgoing: sum_k a[i,k] b[j,k]."""

    def __init__(self, c, hidden, outgoing=True):
        super().__init__()
        self.outgoing = outgoing
        self.ln = nn.LayerNorm(c)
        self.proj = nn.Linear(c, 2 * hidden)
        self.gate_in = nn.Linear(c, 2 * hidden)
        self.ln_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, c)
        self.gate_out = nn.Linear(c, c)

    def forward(self, pair_mask, x):  # other argument order
        x = self.ln(x)
        ab = self.proj(x) * torch.sigmoid(self.gate_in(x)) * pair_mask.unsqueeze(-1)
        a, b = ab.chunk(2, dim=-1)
        if self.outgoing:
            a = a.permute(0, 3, 1, 2)  # [B, H, i, k]
            b = b.permute(0, 3, 2, 1)  # [B, H, k, j]
        else:
            a = a.permute(0, 3, 2, 1)  # [B, H, i, k] with k over rows
            b = b.permute(0, 3, 1, 2)  # [B, H, k, j]
        o = torch.matmul(a, b).permute(0, 2, 3, 1)
        return self.out(self.ln_out(o)) * torch.sigmoid(self.gate_out(x))


class RowAttention(nn.Module):
    """Triangle attention around the starting node (rows), hand-written; ``transpose``
    outside gives the ending node."""

    def __init__(self, c, heads, dim):
        super().__init__()
        self.h, self.d = heads, dim
        self.ln = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * heads * dim, bias=False)
        self.bias = nn.Linear(c, heads, bias=False)
        self.gate = nn.Linear(c, heads * dim)
        self.o = nn.Linear(heads * dim, c)

    def forward(self, x, pair_mask):
        B, I, J, _ = x.shape
        x = self.ln(x)
        q, k, v = self.qkv(x).view(B, I, J, 3, self.h, self.d).unbind(3)
        q = q.permute(0, 1, 3, 2, 4)  # B I H J D
        k = k.permute(0, 1, 3, 4, 2)  # B I H D J
        v = v.permute(0, 1, 3, 2, 4)
        logits = torch.matmul(q, k) * self.d ** -0.5
        logits = logits + self.bias(x).permute(0, 3, 1, 2).unsqueeze(1)  # B 1 H J K
        logits = logits.masked_fill(pair_mask[:, :, None, None, :] < 0.5, -1e9)
        w = torch.softmax(logits, dim=-1)
        o = torch.matmul(w, v).permute(0, 1, 3, 2, 4).reshape(B, I, J, self.h * self.d)
        return self.o(o * torch.sigmoid(self.gate(x)))


class SingleAttention(nn.Module):
    """Single-representation attention with a pair bias, via F.scaled_dot_product_attention-free math."""

    def __init__(self, cs, cz, heads):
        super().__init__()
        self.h = heads
        self.d = cs // heads
        self.ln = nn.LayerNorm(cs)
        self.q = nn.Linear(cs, cs)
        self.kv = nn.Linear(cs, 2 * cs, bias=False)
        self.zb = nn.Sequential(nn.LayerNorm(cz), nn.Linear(cz, heads, bias=False))
        self.o = nn.Linear(cs, cs)

    def forward(self, s, z, mask):
        B, N, C = s.shape
        x = self.ln(s)
        q = self.q(x).view(B, N, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.h, self.d).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        a = torch.matmul(q, k.transpose(-1, -2)) / self.d ** 0.5 + self.zb(z).permute(0, 3, 1, 2)
        a = a + (mask[:, None, None, :] - 1.0) * 1e9
        a = a.softmax(-1)
        return self.o(torch.matmul(a, v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, cs, cz, hidden=8, heads=2, dim=4):
        super().__init__()
        self.mul_o = TriMulPermute(cz, hidden, outgoing=True)
        self.mul_i = TriMulPermute(cz, hidden, outgoing=False)
        self.att_row = RowAttention(cz, heads, dim)
        self.att_col = RowAttention(cz, heads, dim)
        self.ff = nn.Sequential(nn.LayerNorm(cz), nn.Linear(cz, 2 * cz), nn.ReLU(), nn.Linear(2 * cz, cz))
        self.single = SingleAttention(cs, cz, heads)

    def forward(self, z, s, mask, pair_mask):
        z = z + self.mul_o(pair_mask, z)
        z = z + self.mul_i(pair_mask, z)
        z = z + self.att_row(z, pair_mask)
        z = z + self.att_col(z.transpose(1, 2), pair_mask.transpose(1, 2)).transpose(1, 2)
        z = z + self.ff(z)
        s = s + self.single(s, z, mask)
        return z, s


class Trunk(nn.Module):
    def __init__(self, cs=8, cz=8, blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList([Block(cs, cz) for _ in range(blocks)])

    def forward(self, z, s, mask, pair_mask):
        for b in self.blocks:
            z, s = b(z, s, mask, pair_mask)
        return z, s
