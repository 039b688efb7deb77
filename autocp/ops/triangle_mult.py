"""2D-parallel triangle multiplication (Boltz ``TriangleMultiplicationOutgoing`` /
``TriangleMultiplicationIncoming``), contraction by a double-buffered Cannon ring.

Shapes on rank ``(r, c)`` of a ``p x p`` mesh, ``b = ceil(N / p)``:

* input ``z_tile``  ``[B, b, b, C]`` = ``z[:, T_r, T_c, :]`` (Pair2D, padded slots anything finite)
* ``mask_tile``     ``[B, b, b]``    = ``mask[:, T_r, T_c]`` or ``None``
* output            ``[B, b, b, C]`` = ``out[:, T_r, T_c, :]`` (padded slots are 0)

Everything except the contraction over ``k`` is tile-local (LayerNorms, projections,
gates, mask multiply). The contraction, with ``a, b`` the two halves of the masked,
gated projection (fp32, channel-first tiles ``[B, C, b, b]``):

* outgoing ``out[i,j] = sum_k a[i,k] b[j,k]`` -> ``out(r,c) = sum_t a(r,t) b(c,t)^T``
* incoming ``out[i,j] = sum_k a[k,i] b[k,j]`` -> ``out(r,c) = sum_t a(t,r)^T b(t,c)``

where ``x(u,v)`` is the tile ``x[T_u, T_v]`` held by rank ``(u,v)``.

Cannon schedule (:func:`_cannon`), for ``out(r,c) = sum_t X(r,t) . Y(t,c)`` where ``X``
travels along the mesh row and ``Y`` along the mesh column and either operand may be the
grid transpose of a held tensor (``X(u,v)`` = the tile held by ``(v,u)``):

1. one *skew* exchange per operand (raw tiles travel), which also performs the grid
   transpose when needed (rank ``(r,c)`` receives ``X(r, r+c)`` and ``Y(r+c, c)``
   directly from their holders, so a transposed operand costs no extra message and the
   diagonal ranks need no special case);
2. ``p`` multiply-accumulate steps with ``t = (r + c + s) mod p``; before computing step
   ``s`` the shifts for step ``s+1`` are posted (``X`` one step along the row, ``Y`` one
   step along the column: double-buffered), and waited for after the tile product.

The six contractions (forward and the two operand gradients of both directions) are all
such products (``G`` = output gradient):

============ ============================== ==========================================
direction     forward                        backward
============ ============================== ==========================================
outgoing      ``X=a``, ``Y=b^T``(grid)        ``dA: X=G, Y=b``; ``dB: X=G^T``(grid)``, Y=a``
incoming      ``X=a^T``(grid)``, Y=b``        ``dA: X=b, Y=G^T``(grid); ``dB: X=a, Y=G``
============ ============================== ==========================================

Only the local ``a``/``b`` tiles are saved for backward (``O(b^2 C)`` per rank); the
backward recomputes nothing gathered and rings ``G`` and the saved tiles again.

Communication (bytes *sent* by rank ``(r,c)``, counted under the name ``"trimul"``): with
the tile size ``S = B * C * b^2 * itemsize`` (``itemsize`` = 4: the contraction runs in
fp32 as in Boltz), ``[cond]`` = 1 if true else 0, and ``o = [(r, c) != (0, 0)]``::

    one Cannon product  = S * (2 (p - 1) + sx + sy)
        sx = [r != 0] for a plain X, o for a grid-transposed X
        sy = [c != 0] for a plain Y, o for a grid-transposed Y
    outgoing  forward   = S * (2(p-1) + [r!=0] + o)
              backward  = S * (4(p-1) + [r!=0] + 2[c!=0] + o)
    incoming  forward   = S * (2(p-1) + o + [c!=0])
              backward  = S * (4(p-1) + 2[r!=0] + [c!=0] + o)

and 0 on a 1x1 mesh. Per rank this is ``~2pS = 2 B N^2 C * 4 / p`` bytes forward and
twice that backward (each rank sees one block row of ``a`` and one block column of
``b``). :func:`trimul_comm_bytes` evaluates it.

Memory per rank: the saved ``a``, ``b`` tiles plus, while the ring runs, two receive
buffers per operand (double buffering) and the fp32 accumulator -- all ``O(b^2 C)``,
i.e. ``O(N^2 C / P)``. The ring moves the ``B*C`` channel tiles in ``ring_chunks``
groups (default 2), so the four ring buffers together hold ``4 / ring_chunks`` tiles;
the tile products accumulate in place (no temporary product tile).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from .. import comm
from ..kernels import tri_mm
from ..layout import LayoutError
from ..mesh import COL, ROW, SquareMesh
from .common import TileCtx, check_pair_tile, chunk_spans, share_submodules

__all__ = ["TriangleMultiplication2D", "trimul_contract", "trimul_comm_bytes", "COMM_NAME"]

COMM_NAME = "trimul"
_SUBMODULES = ("norm_in", "p_in", "g_in", "norm_out", "p_out", "g_out")
_DIRECTIONS = ("outgoing", "incoming")

# (x_transposed, y_transposed) of the Cannon products, by direction and role
_PLAN = {
    "outgoing": {"fwd": (False, True), "da": (False, False), "db": (True, False)},
    "incoming": {"fwd": (True, False), "da": (False, True), "db": (False, False)},
}


# ----------------------------------------------------------------------------- Cannon ring
def _skew_peers(mesh: SquareMesh, operand: str, transposed: bool) -> tuple[int, int]:
    """(dst, src) of the initial skew (+ grid transpose) exchange.

    Rank ``(r,c)`` must start with ``X(r, r+c)`` (operand 'x', row ring) or ``Y(r+c, c)``
    ('y', column ring). ``X(u,v)`` is held by ``(u,v)``, or by ``(v,u)`` when transposed.
    """
    r, c = mesh.r, mesh.c
    ro = mesh.rank_of
    if operand == "x":
        if transposed:  # I hold X(c, r); rank (c, r-c) needs it; X(r, r+c) is at (r+c, r)
            return ro(c, r - c), ro(r + c, r)
        return ro(r, c - r), ro(r, c + r)
    if transposed:  # I hold Y(c, r); rank (c-r, r) needs it; Y(r+c, c) is at (c, r+c)
        return ro(c - r, r), ro(c, r + c)
    return ro(r - c, c), ro(r + c, c)


def _cannon(
    x: torch.Tensor, y: torch.Tensor, mesh: SquareMesh, x_t: bool, y_t: bool, chunks: int = 1
) -> torch.Tensor:
    """``out(r,c) = sum_t X(r,t) . Y(t,c)`` on tiles ``[..., b, b]`` (fp32 result).

    ``x``/``y`` are this rank's raw tiles; raw tiles travel. With ``x_t`` the operand is
    the grid transpose (``X(u,v)`` = the tile held by ``(v,u)``) and the tile product uses
    the received tile transposed; without ``y_t`` the product uses ``y`` transposed -- so
    every step is one ``tri_mm`` (``tri_mm(a, b) = a @ b^T``) on transposed *views* (no
    copies: the GEMM takes strided operands).

    ``chunks``: the leading (batch x channel) dims are split into this many groups that
    go round the ring one after the other, so the ring buffers hold ``1/chunks`` of a tile
    each. The next group's skew is posted during the current group's last step (when no
    shift is in flight), so the pipeline never drains and the buffer peak stays at four
    chunk-sized buffers. Bytes sent do not depend on ``chunks``.
    """

    def step(xs, ys, out):
        return tri_mm(xs.transpose(-1, -2) if x_t else xs, ys if y_t else ys.transpose(-1, -2), out)

    x = x.contiguous()
    y = y.contiguous()
    p = mesh.p
    if p == 1:
        return step(x, y, None)
    lead, bb = x.shape[:-2], x.shape[-2:]
    x3, y3 = x.view(-1, *bb), y.view(-1, *bb)
    m = x3.shape[0]
    chunks = max(1, min(int(chunks), m))
    edges = [m * i // chunks for i in range(chunks + 1)]
    out = torch.zeros((m, *bb), dtype=torch.float32, device=x.device)
    dx, sx = _skew_peers(mesh, "x", x_t)
    dy, sy = _skew_peers(mesh, "y", y_t)
    row_dst, row_src = mesh.neighbor(ROW, -1), mesh.neighbor(ROW, 1)
    col_dst, col_src = mesh.neighbor(COL, -1), mesh.neighbor(COL, 1)

    def post_skew(i):
        lo, hi = edges[i], edges[i + 1]
        xs_, hx_ = comm.start_exchange(x3[lo:hi], dx, sx, name=COMM_NAME)
        ys_, hy_ = comm.start_exchange(y3[lo:hi], dy, sy, name=COMM_NAME)
        return xs_, ys_, hx_, hy_

    pending = post_skew(0)
    for i in range(chunks):
        xs, ys, hx, hy = pending
        pending = None
        hx.wait()
        hy.wait()
        acc = out[edges[i]:edges[i + 1]]
        for s in range(p):
            shift = s < p - 1
            if shift:  # post step s+1's transfers before computing step s (double buffer)
                xn, hx = comm.start_exchange(xs, row_dst, row_src, name=COMM_NAME)
                yn, hy = comm.start_exchange(ys, col_dst, col_src, name=COMM_NAME)
            elif i + 1 < chunks:  # last step: prefetch the next group's skew instead
                pending = post_skew(i + 1)
            step(xs, ys, acc)
            if shift:
                hx.wait()
                hy.wait()
                xs, ys = xn, yn
                del xn, yn
        del xs, ys
    return out.view(*lead, *bb)


class _TriMulContract(torch.autograd.Function):
    """Distributed contraction; ``a``, ``b``, output: channel-first tiles ``[B, C, b, b]``."""

    @staticmethod
    def forward(ctx, a, b, mesh, direction, chunks):
        ctx.mesh, ctx.direction, ctx.chunks = mesh, direction, chunks
        ctx.save_for_backward(a, b)
        xt, yt = _PLAN[direction]["fwd"]
        with torch.autocast(a.device.type, enabled=False):
            return _cannon(a, b, mesh, xt, yt, chunks)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        mesh, plan, k = ctx.mesh, _PLAN[ctx.direction], ctx.chunks
        g = g.contiguous()
        da = db = None
        with torch.autocast(g.device.type, enabled=False):
            if ctx.direction == "outgoing":
                if ctx.needs_input_grad[0]:
                    da = _cannon(g, b, mesh, *plan["da"], chunks=k)  # dA = G B
                if ctx.needs_input_grad[1]:
                    db = _cannon(g, a, mesh, *plan["db"], chunks=k)  # dB = G^T A
            else:
                if ctx.needs_input_grad[0]:
                    da = _cannon(b, g, mesh, *plan["da"], chunks=k)  # dA = B G^T
                if ctx.needs_input_grad[1]:
                    db = _cannon(a, g, mesh, *plan["db"], chunks=k)  # dB = A G
        if da is not None:
            da = da.to(a.dtype)
        if db is not None:
            db = db.to(b.dtype)
        return da, db, None, None, None


def trimul_contract(
    a: torch.Tensor, b: torch.Tensor, mesh: SquareMesh, direction: str, chunks: int = 2
) -> torch.Tensor:
    """The distributed triangle contraction on channel-first tiles.

    ``a``, ``b``: rank ``(r,c)``'s tiles ``a[:, :, T_r, T_c]``, ``b[:, :, T_r, T_c]`` of shape
    ``[B, C, b, b]`` (padding must be zero). Returns ``out[:, :, T_r, T_c]`` ``[B, C, b, b]``
    (fp32) with ``out[i,j] = sum_k a[i,k] b[j,k]`` (outgoing) or ``sum_k a[k,i] b[k,j]``
    (incoming), summed over all ``N`` tokens ``k`` of the mesh. ``chunks``: ring the
    ``B*C`` tiles in that many groups (see :func:`_cannon`; memory vs message count).
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    if a.shape != b.shape or a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"trimul_contract: a {tuple(a.shape)} and b {tuple(b.shape)} must be equal [..., b, b] tiles")
    return _TriMulContract.apply(a, b, mesh, direction, chunks)


def trimul_comm_bytes(
    p: int, r: int, c: int, batch: int, b: int, channels: int, direction: str, which: str = "forward",
    itemsize: int = 4,
) -> int:
    """Analytic bytes sent by rank ``(r, c)`` for one forward or backward (see module doc)."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    if p == 1:
        return 0
    tile = batch * channels * b * b * itemsize
    o = int((r % p, c % p) != (0, 0))

    def one(xt, yt):
        sx = o if xt else int(r % p != 0)
        sy = o if yt else int(c % p != 0)
        return tile * (2 * (p - 1) + sx + sy)

    plan = _PLAN[direction]
    if which == "forward":
        return one(*plan["fwd"])
    if which == "backward":
        return one(*plan["da"]) + one(*plan["db"])
    raise ValueError(f"which must be 'forward' or 'backward', got {which!r}")


# ----------------------------------------------------------------------------- module
def detect_direction(module: nn.Module) -> Optional[str]:
    """'outgoing' / 'incoming' from the module class, or None when unknown.

    Never imports boltz (importing it pulls in torch._dynamo, seconds per process): a
    Boltz instance implies its module is already in ``sys.modules``.
    """
    bz = sys.modules.get("boltz.model.layers.triangular_mult")
    if bz is not None:
        if isinstance(module, bz.TriangleMultiplicationOutgoing):
            return "outgoing"
        if isinstance(module, bz.TriangleMultiplicationIncoming):
            return "incoming"
    name = type(module).__name__.lower()
    if "outgoing" in name:
        return "outgoing"
    if "incoming" in name:
        return "incoming"
    return None


class TriangleMultiplication2D(nn.Module):
    """2D-parallel counterpart of Boltz's triangle multiplication (either direction).

    ``TriangleMultiplication2D(module, mesh, direction=None)`` shares ``module``'s
    submodules ``norm_in, p_in, g_in, norm_out, p_out, g_out`` (same ``state_dict`` keys,
    same parameter objects). The direction comes from the module class
    (``TriangleMultiplicationOutgoing`` / ``...Incoming``) or from ``direction=`` for a
    ported model with the same submodules.

    ``forward(z_tile, mask_tile=None, n_tokens=None)`` on rank ``(r, c)``: ``z_tile``
    ``[B, b, b, C]`` = ``z[:, T_r, T_c]``, ``mask_tile`` ``[B, b, b]`` or ``None``,
    ``n_tokens`` = global ``N`` (required unless the mesh is 1x1). Returns the output tile
    ``[B, b, b, C]``, equal to the Boltz module's output (``use_kernels=False``) on the
    tile; padded slots are 0. Parameter gradients are per-rank partials (sum over the
    mesh with :func:`autocp.ops.common.sync_grads`).

    ``ring_chunks`` (default 2): the ``B*C`` channel tiles go round the Cannon ring in
    this many groups, so the four ring buffers hold half a tile each (1 = fewest
    messages, more = less memory; the bytes sent are the same).
    """

    def __init__(self, module: nn.Module, mesh=None, direction: Optional[str] = None, ring_chunks: int = 2,
                 recompute: bool = True):
        super().__init__()
        found = detect_direction(module)
        if direction is None:
            direction = found
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"TriangleMultiplication2D: cannot tell the direction of {type(module).__name__}; "
                f"pass direction='outgoing' or 'incoming' (got {direction!r})."
            )
        if found is not None and found != direction:
            raise ValueError(
                f"TriangleMultiplication2D: direction={direction!r} contradicts the module class "
                f"{type(module).__name__} ({found})."
            )
        missing = [n for n in _SUBMODULES if not hasattr(module, n)]
        if missing:
            raise ValueError(
                f"TriangleMultiplication2D: {type(module).__name__} lacks submodules {missing}; "
                f"expected Boltz's {list(_SUBMODULES)}."
            )
        if int(ring_chunks) < 1:
            raise ValueError(f"TriangleMultiplication2D: ring_chunks must be >= 1, got {ring_chunks}")
        self.direction = direction
        self.ring_chunks = int(ring_chunks)
        self.mesh = SquareMesh.from_any(mesh)
        share_submodules(self, module, _SUBMODULES)
        self.dim = self.p_in.in_features
        # training: _TriMulGrouped keeps z, the mask and the contraction result and recomputes
        # the rest group by group in backward; the compiler's recompute policy leaves it alone
        self.recomputes_itself = bool(recompute)

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, dim={self.dim}, p={self.mesh.p}, ring_chunks={self.ring_chunks}"

    def forward(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None, n_tokens: Optional[int] = None):
        p = self.mesh.p
        if n_tokens is None:
            if p != 1:
                raise LayoutError(
                    f"TriangleMultiplication2D: n_tokens (the global N) is required on a {p}x{p} mesh: "
                    f"it says which slots of the [B, b, b, C] tile are padding. "
                    f"Fix: call op(z_tile, mask_tile, n_tokens=N)."
                )
            n_tokens = z.shape[1] if z.dim() == 4 else 0
        ctx = TileCtx(self.mesh, int(n_tokens))
        name = f"TriangleMultiplication2D({self.direction})"
        mask = check_pair_tile(z, mask, ctx, channels=self.dim, op=name)
        if not (torch.is_grad_enabled() and (z.requires_grad or any(q.requires_grad for q in self.parameters()))):
            return self.forward_grouped(z, mask, ctx)
        if self.recomputes_itself:
            params = [q for q in self.parameters() if q.requires_grad]
            return _TriMulGrouped.apply(self, ctx, z, mask, *params)

        # tile-local: exactly Boltz's use_kernels=False path
        x = self.norm_in(z)
        x_in = x
        x = self.p_in(x) * self.g_in(x).sigmoid()
        x = x * mask.unsqueeze(-1)  # zero on masked tokens and on autocp padding
        a, b = torch.chunk(x.float(), 2, dim=-1)
        del x
        # channel-first [B, C, b, b]: the contraction is a plain batched GEMM per channel
        a = a.permute(0, 3, 1, 2).contiguous()
        b = b.permute(0, 3, 1, 2).contiguous()
        x = trimul_contract(a, b, self.mesh, self.direction, self.ring_chunks)
        del a, b
        x = x.permute(0, 2, 3, 1)
        x = self.p_out(self.norm_out(x)) * self.g_out(x_in).sigmoid()
        if ctx.n != ctx.b * p:  # padded slots: LayerNorm bias would leak into them
            x = x * ctx.pair_valid(x.device).unsqueeze(-1).to(x.dtype)
        return x

    def forward_grouped(self, z: torch.Tensor, mask: torch.Tensor, ctx: TileCtx, keep_store: bool = False):
        """Inference (no autograd): Boltz's formula one **channel group** at a time.

        Per group of ``G`` hidden channels (:func:`autocp.ops.common.chunk_spans` of ``C``):
        project + gate + mask only those ``2G`` channels of ``p_in``/``g_in``, ring them
        through the Cannon contraction (group-sized buffers), fold the fp32 result into
        running LayerNorm statistics (Chan's parallel mean/variance over channels, fp32)
        and store it in ``z``'s dtype (under autocast: in the autocast dtype, like
        ``norm_in(z)``, which is computed per row chunk). The output stage then runs per
        row chunk:
        ``norm_out`` from the stored result and the fp32 statistics, ``p_out``, and the
        output gate from ``norm_in(z)`` recomputed for the chunk. Live at the peak: ``z``,
        ``norm_in(z)``, the stored result and one group's buffers -- not ``2C`` fp32
        projections of the whole tile. Same values as the ungrouped path (the LayerNorm
        statistics are combined exactly; in fp32 only rounding differs).
        """
        mesh, p = self.mesh, self.mesh.p
        C = self.dim
        B, b = z.shape[0], z.shape[1]
        xt, yt = _PLAN[self.direction]["fwd"]
        dev = z.device.type
        # under autocast the LayerNorm output only feeds autocast Linears (which cast it to the
        # autocast dtype anyway): store it, and the contraction result, in that dtype
        low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        tile = z.numel() * z.element_size()
        x_in = self._norm_in_chunks(z, low)
        maskf = mask.unsqueeze(-1).to(x_in.dtype)
        wp, bp = self.p_in.weight, self.p_in.bias
        wg, bg = self.g_in.weight, self.g_in.bias
        store = torch.empty((B, C, b, b), dtype=low or z.dtype, device=z.device)
        mean = m2 = None
        count = 0
        groups = chunk_spans(C, 4 * tile)  # a group's fp32 projections are 2G/C of 2 fp32 tiles
        for g0, g1 in groups:
            idx = torch.cat([torch.arange(g0, g1), torch.arange(C + g0, C + g1)]).to(wp.device)
            pg = torch.nn.functional.linear(x_in, wp[idx], None if bp is None else bp[idx])
            pg = pg * torch.nn.functional.linear(x_in, wg[idx], None if bg is None else bg[idx]).sigmoid()
            pg = pg * maskf
            ab = pg.float().permute(0, 3, 1, 2)  # [B, 2G, b, b]
            del pg
            a, bb = ab[:, : g1 - g0].contiguous(), ab[:, g1 - g0:].contiguous()
            del ab
            with torch.autocast(z.device.type, enabled=False):
                # one group is already a fraction of a tile: ring it whole unless it is the only one
                res = _cannon(a, bb, mesh, xt, yt, self.ring_chunks if len(groups) == 1 else 1)
            del a, bb
            var, mu = torch.var_mean(res, dim=1, unbiased=False)  # [B, b, b] fp32
            g = g1 - g0
            if mean is None:
                mean, m2 = mu, var * g
            else:  # Chan et al.: combine (count, mean, M2) with the group's
                tot = count + g
                delta = mu - mean
                mean = mean + delta * (g / tot)
                m2 = m2 + var * g + delta * delta * (count * g / tot)
            count += g
            store[:, g0:g1] = res
            del res, var, mu
        del x_in, maskf
        ln = self.norm_out
        rstd = torch.rsqrt(m2 / count + ln.eps)
        del m2
        out = None
        valid = ctx.pair_valid(z.device) if ctx.n != ctx.b * p else None
        for r0, r1 in chunk_spans(b, tile):
            y = store[:, :, r0:r1].permute(0, 2, 3, 1).float()  # [B, rows, b, C]
            y = (y - mean[:, r0:r1, :, None]) * rstd[:, r0:r1, :, None]
            if ln.weight is not None:
                y = y * ln.weight.float()
            if ln.bias is not None:
                y = y + ln.bias.float()
            y = self.p_out(y.to(self.p_out.weight.dtype))
            y = y * self.g_out(self.norm_in(z[:, r0:r1])).sigmoid()
            if valid is not None:  # padded slots: LayerNorm bias would leak into them
                y = y * valid[r0:r1].unsqueeze(-1).to(y.dtype)
            if out is None:  # the dtype Boltz's output has (autocast: the Linear's)
                out = torch.empty(z.shape[:-1] + y.shape[-1:], dtype=y.dtype, device=z.device)
            out[:, r0:r1] = y
            del y
        return (out, store) if keep_store else out

    def _norm_in_chunks(self, z, low):
        """``norm_in(z)`` computed per row chunk into one buffer (``low``: its dtype)."""
        x = None
        for r0, r1 in chunk_spans(z.shape[1], z.numel() * z.element_size()):
            xr = self.norm_in(z[:, r0:r1])
            if x is None:
                x = torch.empty(z.shape, dtype=low or xr.dtype, device=z.device)
            x[:, r0:r1] = xr
            del xr
        return x

    def backward_grouped(self, z, mask, store, dout, ctx: TileCtx, need_dz: bool):
        """Backward of :meth:`forward_grouped` (see :class:`_TriMulGrouped`): returns
        ``(dz or None, {parameter name: grad})``."""
        F = torch.nn.functional
        mesh, p = self.mesh, self.mesh.p
        C = self.dim
        B, b = z.shape[0], z.shape[1]
        dev = z.device.type
        low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        own = dict(self.named_parameters())
        al = {k: q.detach().requires_grad_(q.requires_grad) for k, q in own.items()}
        grads = {}

        def take(names, gs):
            for k, g in zip(names, gs):
                if g is not None:
                    grads[k] = g if k not in grads else grads[k] + g

        def live(*names):
            return [k for k in names if k in al and al[k].requires_grad]

        tile = z.numel() * z.element_size()
        with torch.no_grad():
            x = self._norm_in_chunks(z, low)
        dx = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
        # the contraction result's gradient (in the autocast dtype under autocast, like the result)
        d_res = torch.empty((B, C, b, b), dtype=low or torch.float32, device=z.device)
        valid = ctx.pair_valid(z.device) if ctx.n != ctx.b * p else None
        ln = self.norm_out
        names_a = live("norm_out.weight", "norm_out.bias", "p_out.weight", "p_out.bias", "g_out.weight", "g_out.bias")
        # (A) output stage, per row chunk: d(contraction result) and the gate's d(norm_in(z))
        for r0, r1 in chunk_spans(b, tile):
            with torch.enable_grad():
                rc = store[:, :, r0:r1].permute(0, 2, 3, 1).float().requires_grad_()
                xc = x[:, r0:r1].detach().requires_grad_()
                y = F.layer_norm(rc, (C,), al.get("norm_out.weight"), al.get("norm_out.bias"), ln.eps)
                y = F.linear(y.to(al["p_out.weight"].dtype), al["p_out.weight"], al.get("p_out.bias"))
                y = y * F.linear(xc, al["g_out.weight"], al.get("g_out.bias")).sigmoid()
                if valid is not None:
                    y = y * valid[r0:r1].unsqueeze(-1).to(y.dtype)
                gs = torch.autograd.grad(y, [rc, xc] + [al[k] for k in names_a], dout[:, r0:r1].to(y.dtype),
                                         allow_unused=True)
            d_res[:, :, r0:r1] = gs[0].permute(0, 3, 1, 2)
            if gs[1] is not None:
                dx[:, r0:r1] += gs[1]
            take(names_a, gs[2:])
            del rc, xc, y, gs
        # (B) per channel group: recompute the gated projections, ring the two operand
        # gradients (the forward's backward Cannon products), backprop into norm_in(z) / p_in /
        # g_in by hand (addmm into dx; no whole-tile autograd temporaries)
        plan = _PLAN[self.direction]
        maskf = mask.unsqueeze(-1).to(x.dtype)
        names_b = live("p_in.weight", "p_in.bias", "g_in.weight", "g_in.bias")
        groups = chunk_spans(C, 4 * tile)
        k = self.ring_chunks if len(groups) == 1 else 1
        wp, wg = own["p_in.weight"].detach(), own["g_in.weight"].detach()
        bp = own["p_in.bias"].detach() if "p_in.bias" in own else None
        bg = own["g_in.bias"].detach() if "g_in.bias" in own else None
        full = {k_: torch.zeros_like(own[k_], dtype=torch.float32) for k_ in names_b}
        for g0, g1 in groups:
            G = g1 - g0
            idx = torch.cat([torch.arange(g0, g1), torch.arange(C + g0, C + g1)]).to(z.device)
            with torch.no_grad():
                # the group's gated projection, as in the forward (h = P * sigmoid(Q) * mask)
                pr = F.linear(x, wp[idx], None if bp is None else bp[idx])
                sg = F.linear(x, wg[idx], None if bg is None else bg[idx]).sigmoid()
                ab = (pr * sg * maskf).float().permute(0, 3, 1, 2)
                ac, bc = ab[:, :G].contiguous(), ab[:, G:].contiguous()
                del ab
                with torch.autocast(dev, enabled=False):
                    gg = d_res[:, g0:g1].float().contiguous()
                    if self.direction == "outgoing":
                        da = _cannon(gg, bc, mesh, *plan["da"], chunks=k)  # dA = G B
                        db = _cannon(gg, ac, mesh, *plan["db"], chunks=k)  # dB = G^T A
                    else:
                        da = _cannon(bc, gg, mesh, *plan["da"], chunks=k)  # dA = B G^T
                        db = _cannon(ac, gg, mesh, *plan["db"], chunks=k)  # dB = A G
                    del ac, bc, gg
                    # by hand (group-sized temporaries only): dh -> dP = dh m s, dQ = dh m P s (1 - s)
                    dh = torch.cat([da, db], dim=1).permute(0, 2, 3, 1) * maskf.float()  # [B, b, b, 2G]
                    del da, db
                    sf = sg.float()
                    dp = dh * sf
                    dq = dh * pr.float() * sf * (1 - sf)
                    del dh, sf, pr, sg
                    dp2, dq2 = dp.reshape(-1, 2 * G), dq.reshape(-1, 2 * G)
                    dx.view(-1, C).addmm_(dp2, wp[idx].float()).addmm_(dq2, wg[idx].float())
                x2 = x.reshape(-1, C)
                if "p_in.weight" in full:
                    full["p_in.weight"][idx] += (dp2.to(x.dtype).t() @ x2).float()
                if "g_in.weight" in full:
                    full["g_in.weight"][idx] += (dq2.to(x.dtype).t() @ x2).float()
                if "p_in.bias" in full:
                    full["p_in.bias"][idx] += dp2.sum(0)
                if "g_in.bias" in full:
                    full["g_in.bias"][idx] += dq2.sum(0)
                del dp, dq, dp2, dq2, x2
        take(list(full), list(full.values()))
        del d_res, x
        # (C) norm_in, per row chunk
        names_c = live("norm_in.weight", "norm_in.bias")
        dz = torch.empty_like(z) if need_dz else None
        for r0, r1 in chunk_spans(b, tile):
            with torch.enable_grad():
                zc = z[:, r0:r1].detach().requires_grad_(need_dz)
                xc = F.layer_norm(zc, (C,), al.get("norm_in.weight"), al.get("norm_in.bias"), self.norm_in.eps)
                wrt = ([zc] if need_dz else []) + [al[k_] for k_ in names_c]
                if not wrt:
                    break
                gs = torch.autograd.grad(xc, wrt, dx[:, r0:r1].to(xc.dtype), allow_unused=True)
            if need_dz:
                dz[:, r0:r1] = gs[0]
                gs = gs[1:]
            take(names_c, gs)
        return dz, grads


class _TriMulGrouped(torch.autograd.Function):
    """Training path of :class:`TriangleMultiplication2D` (``recompute=True``, default).

    Forward: the channel-group algorithm of ``forward_grouped`` without autograd. Saved:
    the input tile ``z``, the mask tile and the contraction result (``[B, C, b, b]`` in z's
    dtype; the autocast dtype under autocast) -- not Boltz's ~10 whole-tile intermediates.
    Backward, all in chunks: (A) per row chunk the output stage is recomputed and
    differentiated (``norm_out`` from the stored result, ``p_out``, the gate from
    ``norm_in(z)``) -> the contraction result's gradient ``G`` (fp32) and part of
    ``d norm_in(z)``; (B) per channel group the gated projections are recomputed and the
    two operand gradients are the usual backward Cannon products (same bytes as the
    whole-tile backward), backpropagated into ``norm_in(z)``, ``p_in``, ``g_in``; (C) per
    row chunk ``norm_in``'s backward gives ``dz``. Parameter gradients are returned by
    this Function (hooks on the real parameters fire once). The forward's rings are not
    replayed."""

    @staticmethod
    def forward(ctx, op, tctx, z, mask, *params):
        with torch.no_grad():
            out, store = op.forward_grouped(z, mask, tctx, keep_store=True)
        ctx.save_for_backward(z, mask, store)
        ctx.op, ctx.tctx = op, tctx
        dev = z.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return out

    @staticmethod
    def backward(ctx, dout):
        z, mask, store = ctx.saved_tensors
        op = ctx.op
        dev, enabled, dtype = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            dz, grads = op.backward_grouped(z, mask, store, dout, ctx.tctx, ctx.needs_input_grad[2])
        names = [k for k, q in op.named_parameters() if q.requires_grad]
        own = dict(op.named_parameters())
        gp = [grads[k].to(own[k].dtype) if k in grads else torch.zeros_like(own[k]) for k in names]
        return (None, None, dz, None, *gp)
