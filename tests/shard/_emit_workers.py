def graph_parity_worker(rank, world):
    from tests.compiler._workers import parity_worker

    return {
        "v2_train": parity_worker(rank, world, 2, 7, True, emit="graph"),
        "v1_eval": parity_worker(rank, world, 1, 7, False, emit="graph"),
        "af3like": parity_worker(rank, world, 2, 7, False, kind="af3like", emit="graph"),
    }


def wrapper_parity_worker(rank, world, n=7):
    """Boltz-2 Pairformer behind PairMaskWrapper (pair mask built in the model's glue)."""
    import torch

    import autocp
    from tests.compiler._workers import build_pairformer, loss_weights, pairformer_inputs
    from tests.shard.programs import PairMaskWrapper

    mesh = autocp.init_mesh()
    model = PairMaskWrapper(build_pairformer(2)).train()
    s, z, mask, _ = pairformer_inputs(n)
    ref = model(s, z, mask)
    w = loss_weights(ref)
    sum((o * wi).sum() for o, wi in zip(ref, w)).backward()
    rg = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    pm = autocp.parallelize(model, mesh, example_inputs=(s, z, mask))
    outs = pm(s, z, mask)
    sum((o * wi).sum() for o, wi in zip(outs, w)).backward()
    from autocp.ops.common import sync_grads

    sync_grads(pm, mesh)
    floor = 1e-2 * max(float(g.abs().max()) for g in rg.values())
    gerr = max(float((p.grad - rg[k]).abs().max()) / max(float(rg[k].abs().max()), floor)
               for k, p in model.named_parameters())
    oerr = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(outs, ref))
    return {"oerr": oerr, "gerr": gerr}


def debug_wrapper_worker(rank, world, n=7):
    import autocp
    from tests.compiler._workers import build_pairformer, pairformer_inputs
    from tests.shard.programs import PairMaskWrapper

    mesh = autocp.init_mesh()
    model = PairMaskWrapper(build_pairformer(2)).train()
    s, z, mask, _ = pairformer_inputs(n)
    pm = autocp.parallelize(model, mesh, example_inputs=(s, z, mask))
    g = pm._graphs[(n, None)]
    out = pm(s, z, mask)
    ref = model(s, z, mask)
    return {"code": g.prog.gm.code, "tags": g.user_tags, "out_tags": g.out_tags, "in": pm.input_tags,
            "err": [float((a - b).abs().max()) for a, b in zip(out, ref)],
            "blocks": [(k, p.gm.code[:3000]) for k, p in g.block_progs.items()]}


def refused_glue_falls_back_worker(rank, world, n=7):
    """An unbound module whose ops the shard pass refuses runs gathered whole (warned), exact."""
    import warnings

    import torch

    import autocp
    from tests.shard.programs import RetryModel, redraw

    mesh = autocp.init_mesh()
    model = redraw(RetryModel())
    z = torch.randn(1, n, n, 8, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        pm = autocp.parallelize(model, mesh, example_inputs=(z,))
    out = pm(z)
    ref = model(z)
    return {"err": float((out - ref).abs().max() / ref.abs().max()), "action": pm.plan.actions["mix"].action,
            "warned": any("mix (UnboundWithInplaceWrite) runs gathered" in str(w.message) for w in wl)}


def view_write_worker(rank, world, n=7):
    """On the eager engine: an in-place write into a view that had to be a copy (a slice
    across token blocks) is an error naming the lines when the base is read again (it was a
    silently wrong result: relative error 0.78); the write-back idiom ``z[:, 1:4] *= 0.5`` is
    exact."""
    import torch

    import autocp
    from autocp.passes.eager import EagerShardingError
    from tests.shard.programs import RetryModel, SliceWriteBack, redraw

    mesh = autocp.init_mesh()
    z = torch.randn(1, n, n, 8, generator=torch.Generator().manual_seed(3))
    res = {}
    pm = autocp.parallelize(redraw(RetryModel()), mesh, example_inputs=(z,), emit="eager")
    try:
        pm(z)
        res["lost_write"] = "no error"
    except EagerShardingError as e:
        res["lost_write"] = str(e)
    model = redraw(SliceWriteBack())
    pm = autocp.parallelize(model, mesh, example_inputs=(z,), emit="eager", strict=False)
    zp, zr = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out, ref = pm(zp), model(zr)
    out.sum().backward()
    ref.sum().backward()
    res["write_back"] = (float((out - ref).abs().max() / ref.abs().max()),
                         float((zp.grad - zr.grad).abs().max() / zr.grad.abs().max()))
    return res
