"""Rank functions for the compiler's distributed tests (module-level: picklable)."""

import warnings

import torch


def build_pairformer(version, blocks=2, cs=16, cz=8, seed=0):
    if version == 2:
        from boltz.model.layers.pairformer import PairformerModule

        m = PairformerModule(cs, cz, blocks, num_heads=2, pairwise_head_width=4, pairwise_num_heads=2,
                             dropout=0.0, v2=True)
    else:
        from boltz.model.modules.trunk import PairformerModule

        m = PairformerModule(cs, cz, blocks, num_heads=2, pairwise_head_width=4, pairwise_num_heads=2, dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # AF3 init zeroes output projections: re-draw everything
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def pairformer_inputs(n, cs=16, cz=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, n, cs, generator=g)
    z = torch.randn(1, n, n, cz, generator=g)
    mask = torch.ones(1, n)
    if n >= 3:
        mask[0, -2] = 0.0
    pair_mask = mask[:, :, None] * mask[:, None, :]
    return s, z, mask, pair_mask


def loss_weights(outs, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g) for o in outs]


def parity_worker(rank, world, version, n, train, kind="boltz", emit="eager"):
    import autocp
    from autocp.ops.common import sync_grads

    mesh = autocp.init_mesh()
    if kind == "boltz":
        model = build_pairformer(version)
        inputs = pairformer_inputs(n)
    else:
        from tests.compiler.af3like import Trunk

        model = Trunk()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        s, z, mask, pm_ = pairformer_inputs(n, cs=8, cz=8)
        inputs = (z, s, mask, pm_)
    model.train(train)
    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always")
        from autocp.api import parallelize

    pm = parallelize(model, mesh, example_inputs=inputs, emit=emit)
    pm.train(train)
    ref = model(*inputs)
    w = loss_weights(ref)
    loss_ref = sum((o * wi).sum() for o, wi in zip(ref, w))
    loss_ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    outs = pm(*inputs)
    loss = sum((o * wi).sum() for o, wi in zip(outs, w))
    loss.backward()
    sync_grads(pm, mesh)
    out_err = [float((a.detach() - b.detach()).abs().max()) for a, b in zip(outs, ref)]
    scale = [float(b.detach().abs().max()) for b in ref]
    moved = [float((a.detach() - b).abs().max()) for a, b in zip(ref, (inputs[0], inputs[1]) if kind == "boltz" else (inputs[0], inputs[1]))]
    # relative to max(|ref grad|, 1e-2 * largest grad): a LayerNorm bias feeding a softmax
    # has an exactly-zero true gradient whose rounding noise has no scale of its own
    floor = 1e-2 * max(float(g.abs().max()) for g in ref_grads.values())
    per_param = {k: float((p.grad - ref_grads[k]).abs().max()) / max(float(ref_grads[k].abs().max()), floor)
                 for k, p in pm.named_parameters() if p.grad is not None}
    grad_err = max(per_param.values())
    missing = [k for k, p in pm.named_parameters() if p.grad is None]
    actions = sorted({a.action for a in pm.plan.actions.values()})
    return {"out_err": out_err, "scale": scale, "grad_err": grad_err, "missing": missing,
            "same_keys": sorted(pm.state_dict()) == sorted(model.state_dict()),
            "actions": actions, "warnings": [str(x.message)[:200] for x in wlist], "moved": moved, "per_param": per_param}


def memory_worker(rank, world, n, version=2, cs=16, cz=16):
    """Measured per-rank peak (params + local inputs + live tensors) of a no-grad forward."""
    import autocp
    from autocp.api import parallelize
    from autocp.layout import Pair2D, RowToken
    from autocp.memory import MemoryTracker

    mesh = autocp.init_mesh()
    model = build_pairformer(version, blocks=2, cs=cs, cz=cz).eval()
    small = pairformer_inputs(max(2 * mesh.p, 6), cs=cs, cz=cz)
    pm = parallelize(model, mesh, example_inputs=small)
    s, z, mask, pair_mask = pairformer_inputs(n, cs=cs, cz=cz)
    loc = [RowToken().shard(s, mesh).clone(), Pair2D().shard(z, mesh).clone(),
           RowToken().shard(mask, mesh).clone(), Pair2D().shard(pair_mask, mesh).clone()]
    from autocp.passes.context import tile_context

    runner = pm._graph_for((s, z, mask, pair_mask), {}, n, None)  # the sharded tile program pm runs at N
    del s, z, mask, pair_mask
    with torch.no_grad():
        with MemoryTracker(track=[*model.parameters(), *loc]) as mt:
            with tile_context(mesh, n):
                runner(loc, {})
    return mt.peak_bytes


def combined_parity_worker(rank, world):
    """Boltz-2 (train) and Boltz-1 (eval) PairformerModule, N=7 (not divisible by 2 or 3),
    masks; plus the original is not mutated, parameters are shared, and N < p is refused."""
    import autocp
    from autocp.api import parallelize
    from autocp.mesh import MeshError

    out = {}
    out["v2_train"] = parity_worker(rank, world, 2, 7, True)
    out["v1_eval"] = parity_worker(rank, world, 1, 7, False)
    mesh = autocp.init_mesh()
    model = build_pairformer(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    pm = parallelize(model, mesh, example_inputs=pairformer_inputs(7))
    out["shared"] = all(a is b for a, b in zip(pm.parameters(), model.parameters()))
    out["not_mutated"] = (types_before == [type(m) for m in model.modules()]
                          and all(torch.equal(before[k], v) for k, v in model.state_dict().items()))
    try:
        parallelize(model, mesh, example_inputs=pairformer_inputs(mesh.p - 1 if mesh.p > 1 else 0))
        out["small_n_error"] = "no error"
    except MeshError as e:
        out["small_n_error"] = str(e)
    except Exception as e:  # noqa: BLE001
        out["small_n_error"] = f"wrong error {type(e).__name__}: {e}"
    return out


def nonsquare_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from autocp.api import parallelize
    from autocp.mesh import MeshError

    dm = init_device_mesh("cpu", (1, world))
    try:
        parallelize(build_pairformer(2), dm, example_inputs=pairformer_inputs(5))
    except MeshError as e:
        return str(e)
    return "no error"
