"""Rank functions for the training tests (module-level: picklable)."""

import warnings

import torch


def _grad_err(got: dict, ref: dict) -> float:
    """Worst relative error over parameters, relative to max(max|ref_p|, 1e-2 * max over all):
    gradients that are exactly zero in exact arithmetic only carry rounding noise."""
    floor = 1e-2 * max(float(r.abs().max()) for r in ref.values())
    return max(float((got[k] - r).abs().max()) / max(float(r.abs().max()), floor) for k, r in ref.items())


def build(kind, ckpt=False):
    if kind == "pairformer":
        from tests.compiler._workers import build_pairformer, pairformer_inputs

        m = build_pairformer(2, blocks=2)
        m.activation_checkpointing = ckpt
        s, z, mask, pm_ = pairformer_inputs(7)
        return m, (s, z, mask, pm_), (0, 1)
    if kind == "msa":
        from tests.compiler.test_msa_dtensor import build_msa, msa_inputs

        m = build_msa()
        m.activation_checkpointing = ckpt
        z, emb, feats = msa_inputs()
        return m, (z, emb, feats), (0, 1)
    from tests.compiler.af3like import Trunk

    torch.manual_seed(0)
    m = Trunk()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    gen = torch.Generator().manual_seed(1)
    n = 7
    z, s = torch.randn(1, n, n, 8, generator=gen), torch.randn(1, n, 8, generator=gen)
    mask = torch.ones(1, n)
    mask[0, -2] = 0
    return m, (z, s, mask, mask[:, :, None] * mask[:, None, :]), (0, 1)


def _loss(out):
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])]
    g = torch.Generator().manual_seed(2)
    return sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)


def _with_grad(inputs, idx):
    return tuple(x.clone().requires_grad_() if i in idx else x for i, x in enumerate(inputs))


def grad_parity_worker(rank, world, kind, ckpt=False, bucket_mb=25.0, recompute="ops"):
    """No extra call: parameter and input gradients after backward() vs single device."""
    import autocp
    from autocp import comm

    mesh = autocp.init_mesh() if world > 1 else None
    if ckpt in ("reentrant", "nonreentrant"):  # Boltz calls checkpoint(...) without use_reentrant
        import functools

        import torch.utils.checkpoint as tuc

        tuc.checkpoint = functools.partial(tuc.checkpoint, use_reentrant=ckpt == "reentrant")
    model, inputs, idx = build(kind, bool(ckpt))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=inputs, grad_bucket_mb=bucket_mb, recompute=recompute)
    pm.train()
    ref_in = _with_grad(inputs, idx)
    _loss(model(*ref_in)).backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    x = _with_grad(inputs, idx)
    comm.STATS.reset()
    _loss(pm(*x)).backward()
    snap = comm.STATS.snapshot()
    got = {k: p.grad for k, p in pm.named_parameters() if p.grad is not None}
    in_err = max(float((a.grad - b.grad).abs().max() / b.grad.abs().max()) for a, b in
                 [(x[i], ref_in[i]) for i in idx])
    return {"err": _grad_err(got, ref), "in_err": in_err, "missing": sorted(set(ref) - set(got)),
            "stats": dict(pm.grad_reducer.last_stats), "n_params": len(ref), "comm": snap}


def accumulate_worker(rank, world):
    """no_sync accumulation, sync_grads no-op, bad input."""
    import autocp
    from autocp.grad_sync import GradSyncError
    from autocp.ops.common import sync_grads

    mesh = autocp.init_mesh()
    model, inputs, idx = build("af3")
    pm = autocp.parallelize(model, mesh, example_inputs=inputs)
    for _ in range(2):
        _loss(model(*inputs)).backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with pm.no_sync():
        _loss(pm(*inputs)).backward()
        nested = ""
        try:
            with pm.no_sync():
                pass
        except GradSyncError as e:
            nested = str(e)
    _loss(pm(*inputs)).backward()
    acc_err = _grad_err({k: p.grad for k, p in pm.named_parameters()}, ref)
    before = {k: p.grad.clone() for k, p in pm.named_parameters()}
    sync_grads(pm, mesh.device_mesh)  # documented no-op: already complete
    noop = max(float((p.grad - before[k]).abs().max()) for k, p in pm.named_parameters())
    # no_sync, then a manual sync_grads outside it reduces the accumulated partials
    pm.zero_grad(set_to_none=True)
    with pm.no_sync():
        _loss(pm(*inputs)).backward()
    sync_grads(pm, mesh)
    half = {k: v / 2 for k, v in ref.items()}
    manual_err = _grad_err({k: p.grad for k, p in pm.named_parameters()}, half)
    # synced step, no zero_grad, synced step: accumulates like DDP
    pm.zero_grad(set_to_none=True)
    _loss(pm(*inputs)).backward()
    _loss(pm(*inputs)).backward()
    acc2_err = _grad_err({k: p.grad for k, p in pm.named_parameters()}, ref)
    return {"acc_err": acc_err, "nested": nested, "noop": noop, "manual_err": manual_err, "acc2_err": acc2_err}


def dp_worker(rank, world, p):
    """dp replicas x p x p: each replica its own batch; grads = mean over dp of the replica grads."""
    import autocp
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // (p * p)
    mesh3 = init_device_mesh("cpu", (dp, p, p), mesh_dim_names=("dp", "row", "col"))
    model, inputs, idx = build("af3")
    gen = torch.Generator().manual_seed(10)
    batches = [tuple(x + 0.1 * torch.randn(x.shape, generator=gen) if i < 2 else x for i, x in enumerate(inputs))
               for _ in range(dp)]
    for b in batches:
        _loss(model(*b)).backward()
    ref = {k: pr.grad.clone() / dp for k, pr in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    pm = autocp.parallelize(model, mesh3, example_inputs=inputs)
    me = mesh3.get_local_rank("dp")
    _loss(pm(*batches[me])).backward()
    return {"err": _grad_err({k: q.grad for k, q in pm.named_parameters()}, ref),
            "stats": dict(pm.grad_reducer.last_stats)}


def bad_dp_worker(rank, world):
    import autocp
    from torch.distributed.device_mesh import DeviceMesh

    model, inputs, idx = build("af3")
    mesh = DeviceMesh("cpu", torch.arange(2).reshape(2, 1, 1), mesh_dim_names=("dp", "row", "col"))
    try:
        autocp.parallelize(model, mesh, example_inputs=inputs) if rank < 2 else None
    except ValueError as e:
        return str(e)
    return ""


def adamw_worker(rank, world, steps=5, ckpt=True, bf16=False, dropout=0.0):
    """AdamW steps on the mesh vs single device: per-step losses and final parameters.
    ``dropout > 0``: every layer's dropout set to it; both runs are seeded alike per step,
    so Boltz's row/column-shared masks must come out the same on the mesh."""
    import copy

    import autocp

    mesh = autocp.init_mesh() if world > 1 else None
    model, inputs, idx = build("pairformer", ckpt)
    for layer in model.layers:
        layer.dropout = dropout
    model.train()
    ref_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=inputs)
    pm.train()
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3)
    losses, ref_losses = [], []
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else (lambda: torch.autocast("cpu", enabled=False))
    for step in range(steps):
        for mdl, o, acc in ((pm, opt, losses), (ref_model, ref_opt, ref_losses)):
            torch.manual_seed(100 + step)  # the same dropout draws for both runs
            o.zero_grad(set_to_none=True)
            with ctx():
                # reentrant checkpoint needs an input that requires grad (single device too)
                loss = _loss(mdl(*_with_grad(inputs, idx)))
            loss.backward()
            if mdl is ref_model and not ref_losses:
                first_grads = {k: q.grad.clone() for k, q in ref_model.named_parameters()}
            o.step()
            acc.append(float(loss))
    ref_p = dict(ref_model.named_parameters())
    errs = {k: float((q - ref_p[k]).abs().max() / ref_p[k].abs().max().clamp_min(1e-12))
            for k, q in pm.named_parameters()}
    # parameters whose gradient is zero in exact arithmetic (a LayerNorm bias feeding a
    # shift-invariant softmax): Adam normalises their rounding noise into +-lr steps of
    # random sign, on one device vs another summation order alike -- reported apart
    g0 = {k: float(v.abs().max()) for k, v in first_grads.items()}
    floor = 1e-3 * max(g0.values())
    real = {k: e for k, e in errs.items() if g0[k] > floor}
    out = {"losses": losses, "ref_losses": ref_losses, "param_err": max(real.values()),
           "noise_params": sorted(k for k in errs if k not in real), "param_err_all": max(errs.values())}
    if bf16:  # Boltz's own bf16-vs-fp32 difference, single device, same start
        m32, _, _ = build("pairformer", ckpt)
        m32.train()
        out["ref_fp32_loss"] = float(_loss(m32(*inputs)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["ref_bf16_loss"] = float(_loss(m32(*inputs)))
    return out


def recompute_memory_worker(rank, world, n):
    """Per-rank fwd+bwd peak (MemoryTracker, local tiles as DTensors) for each recompute
    policy, and the output/gradient agreement between the policies."""
    import autocp
    from autocp.layout import Pair2D, RowToken
    from autocp.memory import MemoryTracker
    from tests.compiler._workers import build_pairformer, pairformer_inputs

    mesh = autocp.SquareMesh.from_any(autocp.init_mesh())
    model = build_pairformer(2, blocks=2).train()
    full = pairformer_inputs(n)
    lays = [RowToken(), Pair2D(), RowToken(), Pair2D()]
    tiles = [lay.shard(x, mesh).contiguous() for x, lay in zip(full, lays)]
    res = {}
    for policy in ("none", "ops", "blocks"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = autocp.parallelize(model, mesh, example_inputs=full, recompute=policy)
        ts, tz = (t.clone().requires_grad_() for t in tiles[:2])
        loc = [ts, tz, *tiles[2:]]
        model.zero_grad(set_to_none=True)
        with MemoryTracker(track=[*model.parameters(), *loc]) as mt:
            s_o, z_o = pm(*[lay.to_dtensor(t, mesh, n) for t, lay in zip(loc, lays)], output="local")
            (s_o.sum() + z_o.square().sum()).backward()
        res[policy] = {"peak": mt.peak_bytes, "out": z_o.detach().clone(), "gz": tz.grad.clone(),
                       "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}}
    ref = res["none"]
    out = {"peak": {k: v["peak"] for k, v in res.items()}}
    for k in ("ops", "blocks"):
        out[k + "_out_err"] = float((res[k]["out"] - ref["out"]).abs().max())
        out[k + "_gz_err"] = float((res[k]["gz"] - ref["gz"]).abs().max() / ref["gz"].abs().max())
        out[k + "_grad_err"] = _grad_err(res[k]["grads"], ref["grads"])
    return out
