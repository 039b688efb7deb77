"""AF3-like glue programs in several spellings (module-level: picklable for the ranks)."""

import torch
import torch.nn.functional as F
from torch import nn


class PairMaskGlue(nn.Module):
    """The line that was silently wrong: a pair mask built from a token mask inside the model
    (and a GLU over channels, alphafold3-pytorch's projection)."""

    def __init__(self, c=8):
        super().__init__()
        self.lin = nn.Linear(c, 2 * c)

    def forward(self, z, mask):
        pm = mask[:, :, None] * mask[:, None, :]
        return F.glu(self.lin(z), dim=-1) * pm[..., None] + z.sum(dim=2, keepdim=True)


class OuterSumRelpos(nn.Module):
    """Outer sums of token features + relative-position one-hot from arange(N)."""

    def __init__(self, cs=6, cz=8, bins=5):
        super().__init__()
        self.a, self.b = nn.Linear(cs, cz), nn.Linear(cs, cz)
        self.emb = nn.Linear(2 * bins + 1, cz)
        self.bins = bins

    def forward(self, s, z):
        n = s.shape[1]
        idx = torch.arange(n, device=s.device)
        rel = (idx[:, None] - idx[None, :]).clamp(-self.bins, self.bins) + self.bins
        oh = F.one_hot(rel, 2 * self.bins + 1).to(z.dtype)
        z = z + self.a(s)[:, :, None] + self.b(s)[:, None, :] + self.emb(oh)[None]
        z += 0.5 * z.transpose(1, 2)  # in-place residual with a transposed read
        return z


class TriMulEinsum(nn.Module):
    """Triangle multiplication (outgoing) spelled with einsum, softmax over a token axis."""

    def __init__(self, c=8):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.ab = nn.Linear(c, 2 * c)
        self.out = nn.Linear(c, c)

    def forward(self, z, pair_mask):
        x = self.ln(z)
        a, b = self.ab(x).chunk(2, dim=-1)
        a = a * pair_mask[..., None]
        o = torch.einsum("bikc,bjkc->bijc", a, b)
        w = torch.softmax(o.sum(-1), dim=-1)
        return self.out(o) + w[..., None], o.mean(dim=(1, 2))


class TriMulMatmul(nn.Module):
    """Incoming triangle update spelled permute + matmul, SDPA attention over a token axis."""

    def __init__(self, c=8, h=2):
        super().__init__()
        self.ab = nn.Linear(c, 2 * c)
        self.qkv = nn.Linear(c, 3 * c)
        self.h = h

    def forward(self, z, mask):
        a, b = self.ab(z).chunk(2, dim=-1)
        o = torch.matmul(a.permute(0, 3, 2, 1), b.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        B, N, _, C = z.shape
        q, k, v = self.qkv(z).chunk(3, dim=-1)
        sh = lambda t: t.reshape(B, N, N, self.h, C // self.h).transpose(2, 3)  # noqa: E731
        bias = (1.0 - mask[:, None, None, None, :]) * -1e4
        att = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), attn_mask=bias)
        return o + att.transpose(2, 3).reshape(B, N, N, C)


class TokenAttention(nn.Module):
    """Single-representation attention with pair bias (AF3 AttentionPairBias), unregistered."""

    def __init__(self, cs=8, cz=6, h=2):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(cs, cs), nn.Linear(cs, cs), nn.Linear(cs, cs)
        self.bias = nn.Linear(cz, h)
        self.h = h

    def forward(self, s, z, mask):
        B, N, C = s.shape
        sh = lambda t: t.view(B, N, self.h, C // self.h).transpose(1, 2)  # noqa: E731
        bias = self.bias(z).permute(0, 3, 1, 2)
        bias = bias.masked_fill(mask[:, None, None, :] == 0, -1e9)
        o = F.scaled_dot_product_attention(sh(self.q(s)), sh(self.k(s)), sh(self.v(s)), attn_mask=bias)
        return o.transpose(1, 2).reshape(B, N, C)


class TriMulEllipsisStd(nn.Module):
    """Triangle updates as alphafold3-pytorch / protenix spell them: einsum with an ellipsis
    (``'... i k d, ... j k d -> ... i j d'`` and the incoming form), operands normalised by
    their global std (protenix ``a / a.std()``), masked by a pair mask built in the glue."""

    def __init__(self, c=8):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.ab = nn.Linear(c, 4 * c)
        self.out = nn.Linear(c, c)

    def forward(self, z, mask):
        pm = (mask[:, :, None] * mask[:, None, :])[..., None]
        a, b, c, d = (self.ab(self.ln(z)) * pm).chunk(4, dim=-1)
        a, b = a / a.std(), b / b.std()
        o = torch.einsum("...ikd,...jkd->...ijd", a, b) + torch.einsum("...kid,...kjd->...ijd", c, d)
        v, m = torch.var_mean(o, dim=(1, 2), keepdim=True)
        return self.out((o - m) / (v + 1).sqrt())


class TriAttnDecomposed(nn.Module):
    """Triangle attention around the starting and the ending node, spelled as the corpus
    does: alphafold3-pytorch (rows folded into the batch, the bias repeated over them with
    expand + reshape, ``where(mask, sim, -max)``, eval dropout) and openfold3 / protenix
    (einsum with an ellipsis, ``scores += bias`` in place, an additive key mask)."""

    def __init__(self, c=8, h=2):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.bias = nn.Linear(c, h)
        self.out = nn.Linear(c, c)
        self.drop = nn.Dropout(0.0)
        self.h = h

    def _af3(self, z, mask):  # rows folded into the batch (B = 1)
        B, N, _, C = z.shape
        x = self.ln(z)
        q, k, v = self.qkv(x).reshape(B * N, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        bias = self.bias(x).permute(0, 3, 1, 2)  # [B, H, J, K]
        bias = bias[:, None].expand(B, N, self.h, N, N).reshape(B * N, self.h, N, N)
        sim = torch.einsum("bhid,bhjd->bhij", q * (C // self.h) ** -0.5, k) + bias
        keep = mask[:, None, :].expand(B, N, N).reshape(B * N, 1, 1, N).bool()
        sim = torch.where(keep, sim, -torch.finfo(sim.dtype).max)
        attn = self.drop(sim.softmax(dim=-1).to(z.dtype))
        o = torch.einsum("bhij,bhjd->bhid", attn, v)
        return o.permute(0, 2, 1, 3).reshape(B, N, N, C)

    def _of3(self, z, mask):
        B, N, _, C = z.shape
        x = self.ln(z)
        q, k, v = self.qkv(x).reshape(B, N, N, 3, self.h, C // self.h).permute(3, 0, 1, 4, 2, 5)
        bias = self.bias(x).permute(0, 3, 1, 2)[:, None]  # [B, 1, H, J, K]
        mask_bias = (1e9 * (mask - 1))[:, None, None, None, :]
        scores = torch.einsum("...qc,...kc->...qk", q, k)
        scores += bias
        scores += mask_bias
        o = torch.einsum("...qk,...kc->...qc", torch.softmax(scores, dim=-1), v)
        return o.transpose(-2, -3).reshape(B, N, N, C)

    def forward(self, z, mask):
        z = z + self.out(self._af3(z, mask))
        return z + self._of3(z.transpose(1, 2), mask).transpose(1, 2)


class TransitionFlatChunked(nn.Module):
    """protenix's eval-mode transition: the pair tensor flattened to ``[-1, C]`` (two token
    axes merged into one dim), chunked, written into a preallocated ``torch.empty`` buffer
    by slice assignment, in-place ``silu_`` / ``*=``, reshaped back."""

    def __init__(self, c=8):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.a, self.b = nn.Linear(c, 2 * c, bias=False), nn.Linear(c, 2 * c, bias=False)
        self.o = nn.Linear(2 * c, c, bias=False)

    def forward(self, z, mask):
        other, c = z.shape[:-1], z.shape[-1]
        x = z.reshape(-1, c)
        out = torch.empty((x.shape[0], c), dtype=x.dtype, device=x.device)
        start = 0
        for chunk in torch.chunk(x, 1, dim=-2):
            y = self.ln(chunk)
            a = F.silu(self.a(y), True)
            b = self.b(y)
            b *= a
            b = self.o(b)
            out[start:start + b.shape[0]] = b
            start += b.shape[0]
        pm = mask[:, :, None] * mask[:, None, :]
        return z + out.reshape(*other, c) * pm[..., None]


class _CheckBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, z, mask):
        pm = mask[:, :, None] * mask[:, None, :]
        return z + torch.tanh(self.lin(z)) * pm[..., None]


class CheckBlocks(nn.Module):
    """Three repeated blocks with a tanh inside (autocp.check's broken-rule test)."""

    def __init__(self, c=8):
        super().__init__()
        self.blocks = nn.ModuleList([_CheckBlock(c) for _ in range(3)])

    def forward(self, z, mask):
        for b in self.blocks:
            z = b(z, mask)
        return z


class TokenCumsum(nn.Module):
    """A cumulative sum along a token axis of a pair tensor: no rule makes it tile-local, so
    it runs gathered (exact) -- and strict mode refuses it."""

    def forward(self, z):
        return z.cumsum(dim=1)


def redraw(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


class ResidualAliasHazard(nn.Module):
    """Residual updates where writing in place would be wrong: ``a`` is still read later
    through a transposed *view*; the input ``z`` belongs to the caller; ``b`` and ``c`` are
    dead fresh tiles (the in-place storage pass may reuse them)."""

    def __init__(self, c=8):
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.gate = nn.Linear(c, c)

    def forward(self, z, mask):
        a = self.lin(z)
        t = a.transpose(1, 2)  # a view of a, read at the end
        b = a + z  # a must not be overwritten here
        d = (torch.rand(z.shape[0], z.shape[1], 1, 1) >= 0.0) * 1.0  # Boltz's fp32 dropout mask
        c = b + d * self.gate(b)  # dead fresh operands
        c = c * mask[:, :, None, None]
        return c + t


def cases(n):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, n, n, 8, generator=g)
    s = torch.randn(1, n, 6, generator=g)
    s8 = torch.randn(1, n, 8, generator=g)
    z6 = torch.randn(1, n, n, 6, generator=g)
    mask = torch.ones(1, n)
    mask[0, -2] = 0
    pm = mask[:, :, None] * mask[:, None, :]
    P, R = (None, "r", "c", None), (None, "r", None)
    return {
        "pair_mask_glue": (PairMaskGlue(), (z, mask), [P, (None, "r")]),
        "outer_sum_relpos": (OuterSumRelpos(), (s, z), [R, P]),
        "trimul_einsum": (TriMulEinsum(), (z, pm), [P, (None, "r", "c")]),
        "trimul_matmul_sdpa": (TriMulMatmul(), (z, mask), [P, (None, "r")]),
        "token_attention": (TokenAttention(), (s8, z6, mask), [R, P, (None, "r")]),
        "residual_alias_hazard": (ResidualAliasHazard(), (z, mask), [P, (None, "r")]),
        "trimul_ellipsis_std": (TriMulEllipsisStd(), (z, mask), [P, (None, "r")]),
        "triattn_decomposed": (TriAttnDecomposed(), (z, mask), [P, (None, "r")]),
        "transition_flat_chunked": (TransitionFlatChunked(), (z, mask), [P, (None, "r")]),
    }


class PairMaskWrapper(nn.Module):
    """The reported silently-wrong case: a 10-line wrapper that builds the pair mask from the
    token mask before calling an (unmodified) Pairformer stack."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, s, z, mask):
        pair_mask = mask[..., :, None] * mask[..., None, :]
        return self.stack(s, z, mask, pair_mask)


class InplaceSliceWrite(nn.Module):
    """An in-place write into a slice of a sharded token axis (a chunk loop's assignment)."""

    def forward(self, z):
        z = z * 2
        part = z[:, 1:4]
        part.mul_(0.5)
        return z


class UnboundWithInplaceWrite(nn.Module):
    """An unregistered module with a full-tensor op (flip over a token axis) and an in-place
    write the shard pass refuses: the whole module must fall back to a gathered run."""

    def __init__(self, c=8):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, z):
        z = self.lin(z).flip(1) + z
        part = z[:, 1:4]
        part.mul_(0.5)
        return z


class SliceWriteBack(nn.Module):
    """``z[:, 1:4] *= 0.5`` across token blocks: python's get / in-place op / set-back."""

    def __init__(self, c=8):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, z):
        z = self.lin(z) * 1.0
        z[:, 1:4] *= 0.5
        return z + 1.0


class RetryModel(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.mix = UnboundWithInplaceWrite(c)
        self.out = nn.Linear(c, c)

    def forward(self, z):
        return self.out(self.mix(z))
