import torch


def all_cases_worker(rank, world, n):
    from tests.shard.programs import cases

    return {name: parity_worker(rank, world, name, n) for name in cases(n)}


def parity_worker(rank, world, name, n):
    import autocp
    from autocp.passes.program import compile_tile_program, run_tile_program
    from tests.shard.programs import cases, redraw

    mesh = autocp.init_mesh()
    model, inputs, tags = cases(n)[name]
    redraw(model)
    ref = model(*[x.clone() for x in inputs])
    ref = list(ref) if isinstance(ref, tuple) else [ref]
    w = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3)) for o in ref]
    sum((o * wi).sum() for o, wi in zip(ref, w)).backward()
    rg = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    prog, _ = compile_tile_program(model, inputs, tags, n=n, p=mesh.p)
    outs = run_tile_program(prog, mesh, [x.clone() for x in inputs], tags, n)
    P = mesh.p * mesh.p
    loss = sum((o * wi).sum() for o, wi in zip(outs, w)) / P
    loss.backward()
    if mesh.p > 1:  # partial-gradient convention: sum over the mesh
        import torch.distributed as dist

        for p in model.parameters():
            dist.all_reduce(p.grad)
    oerr = max(float((a.detach() - b.detach()).abs().max() / (b.detach().abs().max() + 1e-12)) for a, b in zip(outs, ref))
    big = max(float(g.abs().max()) for g in rg.values())
    # relative to max(|ref grad|, 1e-2 * largest grad): softmax-shift-invariant biases have an
    # exactly-zero true gradient whose rounding noise has no scale of its own
    gerr = max(float((p.grad - rg[k]).abs().max()) / max(float(rg[k].abs().max()), 1e-2 * big)
               for k, p in model.named_parameters())
    notes = [(nt.what, nt.detail, nt.pair) for nt in prog.notes]
    # inference with the storage passes (in-place reuse of dead fresh tiles): same outputs,
    # the caller's inputs untouched
    from autocp.passes.storage import apply_storage_passes

    prog2, _ = compile_tile_program(model, inputs, tags, n=n, p=mesh.p)
    counts = apply_storage_passes(prog2, [getattr(e, "kind", None) == "module" for e in prog2.op_keys])
    ins = [x.clone() for x in inputs]
    with torch.no_grad():
        outs2 = run_tile_program(prog2, mesh, ins, tags, n)
    nerr = max(float((a - b.detach()).abs().max() / (b.detach().abs().max() + 1e-12)) for a, b in zip(outs2, ref))
    ierr = max(float((a - b).abs().max()) for a, b in zip(ins, inputs))
    return {"oerr": oerr, "gerr": gerr, "notes": notes, "moved": float(ref[0].abs().max()),
            "nograd_err": nerr, "input_changed": ierr, "inplace": counts["inplace"]}


def strict_worker(rank, world):
    """strict=True refuses a pair gather, naming the op and the source line; an in-place
    write into a narrowed sharded slice is refused in any mode."""
    import autocp
    from autocp.passes.program import compile_tile_program
    from autocp.passes.shard import ShardingError
    from tests.shard.programs import InplaceSliceWrite, TokenCumsum, cases

    mesh = autocp.init_mesh()
    model, inputs, tags = cases(7)["trimul_einsum"]
    out = {}
    try:
        compile_tile_program(TokenCumsum(), inputs[:1], tags[:1], n=7, p=mesh.p, strict=True)
        out["strict"] = "no error"
    except ShardingError as e:
        out["strict"] = str(e)
    z = inputs[0]
    try:
        compile_tile_program(InplaceSliceWrite(), (z.clone(),), [(None, "r", "c", None)], n=7, p=mesh.p)
        out["inplace"] = "no error"
    except ShardingError as e:
        out["inplace"] = str(e)
    return out


def check_worker(rank, world):
    """autocp.check on a correct program (ok) and on one whose tanh rule is broken on
    purpose (the report names the tanh node and its source line in programs.py), on the
    top-level graph and inside a repeated block."""
    import autocp
    from autocp.passes import shard
    from tests.shard.programs import CheckBlocks, cases, redraw

    mesh = autocp.init_mesh()
    model, inputs, _tags = cases(7)["pair_mask_glue"]
    redraw(model)
    out = {}
    pm = autocp.parallelize(model, mesh, example_inputs=inputs)
    out["ok"] = str(autocp.check(pm, *inputs))
    blocks = redraw(CheckBlocks())
    pmb = autocp.parallelize(blocks, mesh, example_inputs=inputs)
    out["blocks_ok"] = autocp.check(pmb, *inputs).ok
    aten = __import__("torch").ops.aten
    saved = shard.RULES.get(aten.tanh.default)

    def broken(s, node):  # tile-local tanh, then off by 0.5 -- a wrong rule
        x = node.args[0]
        s.set(node, s.emit(__import__("torch").add, s.emit(aten.tanh.default, s.env[x]), 0.5), s.tg(x))

    shard.RULES[aten.tanh.default] = broken
    try:
        pmb2 = autocp.parallelize(blocks, mesh, example_inputs=inputs)
        rep = autocp.check(pmb2, *inputs)
    finally:
        if saved is None:
            del shard.RULES[aten.tanh.default]
        else:
            shard.RULES[aten.tanh.default] = saved
    out["bad"] = (rep.ok, rep.node, rep.where, rep.source, str(rep))
    return out
