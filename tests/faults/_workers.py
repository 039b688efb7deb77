"""Rank functions of the fault suite (module-level: picklable). Each returns a dict of
what happened per step: ``{"step": (outcome, seconds, message)}`` -- outcome ``"ok"`` or
the exception's class name -- so the parent checks every rank, not only the first error."""

from __future__ import annotations

import os
import time
import warnings

import torch

TIMEOUT = 3.0  # init_mesh(timeout=...) of every fault case, seconds
N = 7


def build(seed=0):
    from boltz.model.layers.pairformer import PairformerModule

    m = PairformerModule(16, 8, 2, num_heads=2, pairwise_head_width=4, pairwise_num_heads=2, dropout=0.0, v2=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # AF3 init zeroes output projections: re-draw everything
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def inputs(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, n, 16, generator=g)
    z = torch.randn(1, n, n, 8, generator=g)
    mask = torch.ones(1, n)
    mask[0, -2] = 0.0
    return s, z, mask, mask[:, :, None] * mask[:, None, :]


def attempt(fn):
    t0 = time.monotonic()
    try:
        fn()
        return ("ok", time.monotonic() - t0, "")
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__, time.monotonic() - t0, str(e))


def setup(model=None, **kw):
    import autocp

    mesh = autocp.init_mesh(timeout=TIMEOUT)
    model = model if model is not None else build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=inputs(), **kw)
    return mesh, model, pm


def _inject(pm, rank):
    """A forward pre-hook that raises on ``rank``, in the second layer (after comm ran)."""
    target = [m for name, m in pm.named_modules() if name.startswith("layers.1.tri_mul_out")][0]  # a matched op: it runs in graph mode too

    def hook(mod, args):
        raise RuntimeError(f"injected fault on rank {rank}")

    return target.register_forward_pre_hook(hook)


def raise_then_retry(rank, world, culprit=1):
    mesh, model, pm = setup()
    res = {"warmup": attempt(lambda: pm(*inputs()))}
    h = _inject(pm, rank) if rank == culprit else None
    res["faulty"] = attempt(lambda: pm(*inputs()))
    if h is not None:
        h.remove()
    res["retry"] = attempt(lambda: pm(*inputs()))
    res["again"] = attempt(lambda: pm(*inputs()))
    return res


def raise_before_comm_then_retry(rank, world, culprit=1):
    """A rank whose own input check fails: every rank refuses that call, the next one works."""
    mesh, model, pm = setup()
    s, z, mask, pair = inputs()
    bad = mask[:, :-1] if rank == culprit else mask
    res = {"faulty": attempt(lambda: pm(s, z, bad, pair))}
    out = {}
    res["retry"] = attempt(lambda: out.setdefault("z", pm(s, z, mask, pair)[1]))
    ref = model(s, z, mask, pair)[1]
    res["err"] = float((out["z"] - ref).abs().max()) if "z" in out else None
    return res


def exits(rank, world, out_dir, culprit=2):
    mesh, model, pm = setup()
    if rank == culprit:
        os._exit(3)
    res = {"call": attempt(lambda: pm(*inputs()))}
    res["again"] = attempt(lambda: pm(*inputs()))
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(repr(res))
    return res


def slow(rank, world, culprit=3, sleep=2 * TIMEOUT + 2):
    mesh, model, pm = setup()
    if rank == culprit:
        time.sleep(sleep)
    return {"call": attempt(lambda: pm(*inputs()))}


def weights_disagree(rank, world, culprit=1):
    import autocp

    mesh = autocp.init_mesh(timeout=TIMEOUT)
    model = build()
    if rank == culprit:
        with torch.no_grad():
            model.layers[0].transition_z.fc1.weight[0, 0] += 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = {"parallelize": attempt(lambda: autocp.parallelize(model, mesh, example_inputs=inputs()))}
        box = {}
        res["broadcast"] = attempt(lambda: box.setdefault("pm", autocp.parallelize(
            model, mesh, example_inputs=inputs(), broadcast_from=0)))
    ref = build()(*inputs())[1]
    res["err"] = float((box["pm"](*inputs())[1] - ref).abs().max()) if "pm" in box else None
    return res


def call_disagrees(rank, world, what, culprit=2):
    mesh, model, pm = setup(check_inputs="hash" if what == "values" else "shape")
    s, z, mask, pair = inputs()
    if rank == culprit:
        if what == "n":
            s, z, mask, pair = inputs(N - 1)
        elif what == "dtype":
            pair = pair.double()
        elif what == "values":
            z = z + 1e-3
    res = {"call": attempt(lambda: pm(s, z, mask, pair))}
    res["retry"] = attempt(lambda: pm(*inputs()))
    return res


def dtensor_other_mesh(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh, model, pm = setup()
    other = init_device_mesh("cpu", (world,))
    s, z, mask, pair = inputs()
    zd = distribute_tensor(z, other, [Shard(1)])
    return {"call": attempt(lambda: pm(s, zd, mask, pair))}
