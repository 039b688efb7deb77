"""Rank functions for the tile-I/O tests (module-level: picklable): tiles in, tiles out,
DTensor gradient semantics (autocp.tile_io)."""

import warnings

import torch
from torch import nn


def _redraw(m, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # AF3 init zeroes output projections: re-draw everything
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return m


class Heads(nn.Module):
    """Every block-level output layout at once: a Pair2D pair update, a RowToken and a
    ColToken token readout (a masked mean over the other token axis), a replicated scalar,
    and the pair update transposed (rank (r, c) holds z[T_c, T_r]: Pair2D((2, 1)))."""

    def __init__(self, cs=8, cz=6):
        super().__init__()
        self.lin_z = nn.Linear(cz, cz)
        self.lin_s = nn.Linear(cs, cz)
        self.norm = nn.LayerNorm(cz)

    def forward(self, s, z, mask, pair_mask):
        zc = self.norm(self.lin_z(z)) * pair_mask[..., None]
        col = zc.sum(1) / (pair_mask.sum(1)[..., None] + 1.0)
        row = self.lin_s(s) * mask[..., None] + zc.mean(2)
        scalar = (row.square() * mask[..., None]).sum() / mask.sum() + col.tanh().sum()
        return zc, row, col, scalar, zc.transpose(1, 2) * 2.0


def _heads_case(n):
    g = torch.Generator().manual_seed(1)
    s, z = torch.randn(1, n, 8, generator=g), torch.randn(1, n, n, 6, generator=g)
    mask = torch.ones(1, n)
    mask[0, -2] = 0.0
    return _redraw(Heads()), (s, z, mask, mask[:, :, None] * mask[:, None, :])


def build_case(kind, n):
    """``(model, full inputs, input layouts, indices of the inputs that get gradients)``."""
    from autocp.layout import Pair2D, RowToken

    lays = [RowToken(), Pair2D(), RowToken(), Pair2D()]
    if kind == "pairformer":
        from tests.compiler._workers import build_pairformer, pairformer_inputs

        return build_pairformer(2, blocks=2), pairformer_inputs(n), lays, (0, 1)
    if kind == "heads":
        m, inputs = _heads_case(n)
        return m, inputs, lays, (0, 1)
    if kind == "pwa":  # Boltz-2 PairWeightedAveraging: an MSA tile (MsaTiles) out of m, z and the pair mask
        from boltz.model.layers.pair_averaging import PairWeightedAveraging

        from autocp.layout import MsaTiles

        m = _redraw(PairWeightedAveraging(c_m=8, c_z=8, c_h=4, num_heads=2))
        g = torch.Generator().manual_seed(1)
        s_rows = 5
        msa, z = torch.randn(1, s_rows, n, 8, generator=g), torch.randn(1, n, n, 8, generator=g)
        mask = torch.ones(1, n)
        mask[0, -2] = 0.0
        return m, (msa, z, mask[:, :, None] * mask[:, None, :]), [MsaTiles(), Pair2D(), Pair2D()], (0, 1)
    raise ValueError(kind)


def _tile(full, tags, mesh, garbage=None, n=None, n_seq=None):
    """This rank's padded tile of ``full``; padded slots filled with ``garbage`` values (a
    cotangent's padding must be ignored)."""
    from autocp.passes.rewrite import shard_tags
    from autocp.tile_io import padded_slots

    t = shard_tags(full, tags, mesh).clone()
    if garbage is not None:
        for d, valid, b in padded_slots(tags, mesh, n, n_seq):
            t.narrow(d, valid, b - valid).fill_(garbage)
    return t


def _valid(t, tags, mesh, n, n_seq=None):
    from autocp.tile_io import padded_slots

    for d, valid, b in padded_slots(tags, mesh, n, n_seq):
        t = t.narrow(d, 0, valid)
    return t


def _rel(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def _grad_errs(got: dict, ref: dict) -> float:
    """Worst error over parameters, relative to each gradient's scale floored at 1e-3 of the
    largest (gradients that are zero in exact arithmetic carry only rounding noise)."""
    top = max(float(r.abs().max()) for r in ref.values())
    return max(float((got[k] - r).abs().max()) / max(float(r.abs().max()), 1e-3 * top) for k, r in ref.items())


def _grad_errs_nonzero(got: dict, ref: dict) -> float:
    """Worst error relative to each gradient's own scale, over the parameters whose true
    gradient is not exactly zero (|g| > 1e-6 max|g|: rounding noise only)."""
    top = max(float(r.abs().max()) for r in ref.values())
    return max(float((got[k] - r).abs().max()) / float(r.abs().max()) for k, r in ref.items()
               if float(r.abs().max()) > 1e-6 * top)


def tile_parity_worker(rank, world, kind, n, mode="local", cases=None):
    """Forward + backward in tile mode (DTensor inputs, ``output=mode`` tiles out): for each
    output's cotangent alone and all together, the outputs, the parameter gradients and the
    input gradients (each replica's) vs the single-device model."""
    import autocp
    from autocp.layout import Pair2D  # noqa: F401

    mesh = autocp.SquareMesh.from_any(autocp.init_mesh())
    model, full, lays, gidx = build_case(kind, n)
    model.train()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ref_outs = model(*full)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    cots = [torch.randn(o.shape, generator=g) for o in ref_outs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=full, input_layouts=lays)
    ns = pm.example_n_seq

    def sizes(lay):
        return (ns, n) if lay.name == "MsaTiles" else n

    def tile(x, tags, **kw):
        return _tile(x, tags, mesh, n=n, n_seq=ns, **kw)

    def valid(x, tags):
        return _valid(x, tags, mesh, n, ns)

    out_tags = list(pm.output_tags)
    n_out = len(ref_outs)
    cases = cases or [[i] for i in range(n_out)] + [list(range(n_out))]
    res = {"out_tags": out_tags, "cases": {}, "rc": (mesh.r, mesh.c), "in_layouts": [lay.name for lay in lays]}
    for case in cases:
        # single device
        model.zero_grad(set_to_none=True)
        xin = [x.clone().requires_grad_() if i in gidx else x for i, x in enumerate(full)]
        outs = model(*xin)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward([outs[i] for i in case], [cots[i] for i in case])
        ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        ref_in = {i: (xin[i].grad if xin[i].grad is not None else torch.zeros_like(xin[i])) for i in gidx}
        # tiles in (DTensors of this rank's tiles), tiles out
        model.zero_grad(set_to_none=True)
        tiles = [lay.shard(x, mesh).contiguous() for x, lay in zip(full, lays)]
        leaves = [t.clone().requires_grad_() if i in gidx else t for i, t in enumerate(tiles)]
        dts = [lay.to_dtensor(t, mesh, sizes(lay)) for t, lay in zip(leaves, lays)]
        pouts = pm(*dts, output=mode)
        pouts = pouts if isinstance(pouts, tuple) else (pouts,)
        if mode == "local":
            ct = [tile(cots[i], out_tags[i], garbage=3.0) for i in case]
            torch.autograd.backward([pouts[i] for i in case], ct)
            o_err = max(_rel(valid(pouts[i].detach(), out_tags[i]), valid(tile(ref_outs[i], out_tags[i]), out_tags[i]))
                        for i in range(n_out))
        else:
            from torch.distributed.tensor import DTensor

            ct = [DTensor.from_local(valid(tile(cots[i], out_tags[i]), out_tags[i]),
                                     mesh.device_mesh, pouts[i].placements, run_check=False,
                                     shape=pouts[i].shape, stride=pouts[i].stride())
                  if isinstance(pouts[i], DTensor) else cots[i] for i in case]
            torch.autograd.backward([pouts[i] for i in case], ct)
            o_err = max(_rel(pouts[i].full_tensor().detach() if isinstance(pouts[i], DTensor) else pouts[i].detach(),
                             ref_outs[i]) for i in range(n_out))
        got = {k: p.grad for k, p in pm.named_parameters() if p.grad is not None}
        missing = sorted(set(ref) - set(got))
        in_errs = {}
        for i in gidx:
            gl = leaves[i].grad if leaves[i].grad is not None else torch.zeros_like(leaves[i])
            tags = _tags_of(lays[i], full[i].dim())
            want = tile(ref_in[i], tags)
            scale = max(float(ref_in[i].abs().max()), 1e-30)
            in_errs[i] = (float((valid(gl, tags) - valid(want, tags)).abs().max()) / scale,
                          float(gl.abs().max()), gl.detach().numpy().copy())
        res["cases"][tuple(case)] = {
            "out_err": o_err, "param_err": _grad_errs(got, ref) if not missing else float("inf"),
            "param_err_nonzero": _grad_errs_nonzero(got, ref) if not missing else float("inf"),
            "missing": missing, "in_err": {i: v[0] for i, v in in_errs.items()},
            "in_tiles": {i: v[2] for i, v in in_errs.items()},
            "ref_in_scale": {i: float(ref_in[i].abs().max()) for i in gidx},
            "worst": sorted(((float((got[k] - r).abs().max()), float(r.abs().max()), k) for k, r in ref.items()
                             if k in got), key=lambda e: -e[0] / max(e[1], 1e-30))[:3],
        }
    return res


def _tags_of(layout, ndim):
    from autocp.tile_io import tags_of_layout

    return tags_of_layout(layout, ndim)


def bad_cotangent_worker(rank, world):
    """A partial cotangent for a replicated (RowToken) output -- the true one on the first
    replica, zero elsewhere -- must raise CotangentError on every rank, not run."""
    import autocp
    from autocp.tile_io import CotangentError

    mesh = autocp.SquareMesh.from_any(autocp.init_mesh())
    model, full, lays, _ = build_case("heads", 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=full, input_layouts=lays)
    dts = [lay.to_dtensor(lay.shard(x, mesh).contiguous(), mesh, 7) for x, lay in zip(full, lays)]
    zc, row, col, scalar, _ = pm(*dts, output="local")
    ct = torch.ones_like(row) if mesh.c == 0 else torch.zeros_like(row)
    try:
        try:
            row.backward(ct)
        except Exception:  # noqa: BLE001 -- a model's / user's except Exception must not swallow it
            return "swallowed"
    except CotangentError as e:
        msg = str(e)
    else:
        return "no error"
    # a per-rank loss (each rank's scalar counted once per rank) is refused too
    zc, row, col, scalar, _ = pm(*dts, output="local")
    try:
        (scalar * (1.0 + mesh.rank_of(mesh.r, mesh.c))).backward()
    except CotangentError as e:
        return msg, str(e)
    return msg, "no error"


def tile_sum_worker(rank, world, n):
    """A loss written on padded local tiles with autocp.tile_io.tile_sum: the loss value and
    every parameter / input gradient equal the single device's."""
    import autocp
    from autocp.layout import ColToken, Pair2D, Replicated, RowToken
    from autocp.tile_io import tile_sum

    mesh = autocp.SquareMesh.from_any(autocp.init_mesh())
    model, full, lays, gidx = build_case("heads", n)
    g = torch.Generator().manual_seed(3)
    w = [torch.randn(o.shape, generator=g) for o in model(*full)]

    def loss_full(outs):
        return sum((o * wi).sum() for o, wi in zip(outs, w))

    xin = [x.clone().requires_grad_() if i in gidx else x for i, x in enumerate(full)]
    ref_loss = loss_full(model(*xin))
    ref_loss.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=full, input_layouts=lays)
    leaves = [lay.shard(x, mesh).contiguous() for x, lay in zip(full, lays)]
    leaves = [t.requires_grad_() if i in gidx else t for i, t in enumerate(leaves)]
    outs = pm(*[lay.to_dtensor(t, mesh, n) for t, lay in zip(leaves, lays)], output="local")
    out_lays = [Pair2D(), RowToken(), ColToken(), Replicated(), Pair2D((2, 1))]
    loss = sum(tile_sum(o * _tile(wi, _tags_of(lay, o.dim()), mesh), lay, mesh, n)
               for o, wi, lay in zip(outs, w, out_lays))
    loss.backward()
    got = {k: p.grad for k, p in pm.named_parameters()}
    in_err = 0.0
    for i in gidx:
        tags = _tags_of(lays[i], full[i].dim())
        in_err = max(in_err, float((_valid(leaves[i].grad, tags, mesh, n)
                                    - _valid(_tile(xin[i].grad, tags, mesh), tags, mesh, n)).abs().max())
                     / float(xin[i].grad.abs().max()))
    out = {"loss": float(loss), "ref_loss": float(ref_loss), "param_err": _grad_errs(got, ref), "in_err": in_err}
    # the same loss written with DTensor ops on output="dtensor" (DTensor's own propagation)
    from torch.distributed.tensor import DTensor, Replicate

    pm.zero_grad(set_to_none=True)
    douts = pm(*[lay.to_dtensor(t, mesh, n) for t, lay in zip(leaves, lays)], output="dtensor")
    dloss = 0.0
    for o, wi in zip(douts, w):
        wd = DTensor.from_local(wi, mesh.device_mesh, [Replicate(), Replicate()], run_check=False)
        wd = wd.redistribute(mesh.device_mesh, o.placements)
        dloss = dloss + (o * wd).sum().full_tensor()
    dloss.backward()
    out["dtensor_loss"] = float(dloss)
    out["dtensor_param_err"] = _grad_errs({k: p.grad for k, p in pm.named_parameters()}, ref)
    return out


def whole_pair_worker(rank, world, n):
    """How many whole pair tensors -- two dims of length N (up to padding) or one flattened
    dim of N^2 -- exist on the rank during forward + backward, in tile mode and in
    full-tensor mode (the check must be able to fail: full mode has them)."""
    import autocp
    from autocp import Pair2D, RowToken, tile_sum
    from autocp.memory import MemoryTracker

    mesh = autocp.SquareMesh.from_any(autocp.init_mesh())
    model, full, lays, _ = build_case("pairformer", n)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=full, input_layouts=lays)
    tiles = [lay.shard(x, mesh).contiguous() for x, lay in zip(full, lays)]
    tiles[1].requires_grad_()
    out = {}

    def whole(shape):
        return sum(n <= d < n + mesh.p for d in shape) >= 2 or (len(shape) >= 2 and any(d >= n * n for d in shape))

    with MemoryTracker(flag=whole) as mt:
        s_o, z_o = pm(*[lay.to_dtensor(t, mesh, n) for t, lay in zip(tiles, lays)], output="local")
        (tile_sum(s_o, RowToken(), mesh, n) + tile_sum(z_o.square(), Pair2D(), mesh, n)).backward()
    out["tiles"] = mt.flagged
    z = full[1].clone().requires_grad_()
    with MemoryTracker(flag=whole) as mt:
        s_o, z_o = pm(full[0], z, *full[2:])
        (s_o.sum() + z_o.square().sum()).backward()
    out["full"] = mt.flagged
    return out
