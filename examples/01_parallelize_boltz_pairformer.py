"""Compile an unmodified Boltz-2 Pairformer with ``autocp.parallelize`` on a p x p mesh and
check it (forward and backward) against the same module on one device.

CPU, no launcher (this script starts p*p gloo processes itself):

    python examples/01_parallelize_boltz_pairformer.py --mesh 2 --tokens 45

GPUs (NCCL, one process per GPU; p*p GPUs) or CPU processes (gloo) under torchrun:

    torchrun --nproc-per-node 4 examples/01_parallelize_boltz_pairformer.py --tokens 1024 --no-check

(the options are named so that torchrun's own parser does not claim them: ``--tokens``,
not ``--n``). Every rank gets the full inputs, ``parallelize`` shards them by layout
(s: RowToken, z and pair_mask: Pair2D), the full outputs come back on every rank; a loss
computed on every rank gives, after ``backward()``, the single-device gradients (parameters and inputs).
The per-rank peak memory is measured on a forward from this rank's tiles (DTensor inputs).
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch


def build(c_s: int, c_z: int, blocks: int, seed: int = 0):
    from boltz.model.layers.pairformer import PairformerModule

    m = PairformerModule(token_s=c_s, token_z=c_z, num_blocks=blocks, num_heads=4, dropout=0.0,
                         pairwise_head_width=16, pairwise_num_heads=4, v2=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # Boltz zero-inits output projections: re-draw every parameter
        for name, prm in m.named_parameters():
            if prm.dim() == 1:
                prm.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(prm.shape, generator=g))
            else:
                prm.copy_(torch.randn(prm.shape, generator=g) / prm.shape[-1] ** 0.5)
    return m


def run(rank: int, world: int, n: int, c_s: int, c_z: int, blocks: int, check: bool) -> dict:
    import autocp
    from autocp.ops.common import sync_grads

    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    mesh = autocp.init_mesh()  # p x p from the world size
    model = build(c_s, c_z, blocks).to(device).train()
    g = torch.Generator().manual_seed(1)
    s = torch.randn(1, n, c_s, generator=g).to(device)
    z = torch.randn(1, n, n, c_z, generator=g).to(device)
    mask = torch.ones(1, n, device=device)
    mask[:, -3:] = 0  # three padding tokens of the model's own
    pair_mask = mask[:, :, None] * mask[:, None, :]
    inputs = (s, z, mask, pair_mask)
    layouts = {"s": autocp.RowToken(), "z": autocp.Pair2D(), "mask": autocp.RowToken(), "pair_mask": autocp.Pair2D()}

    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        pm = autocp.parallelize(model, mesh, example_inputs=inputs, input_layouts=layouts)
    out = {"coord": mesh.coord, "gathered": [k for k, a in pm.plan.actions.items() if a.action == "fallback"],
           "warnings": [str(w.message)[:200] for w in wl]}

    # per-rank peak of a forward from this rank's tiles only (what a real run holds)
    tiles = [lay.shard(x, mesh).contiguous() for x, lay in zip(inputs, layouts.values())]
    dts = [lay.to_dtensor(t, mesh, n) for t, lay in zip(tiles, layouts.values())]
    with torch.no_grad(), autocp.MemoryTracker(track=[*model.parameters(), *tiles], device=device.type) as mt:
        pm(*dts, output="local")
    out["peak_forward_MB"] = mt.peak_bytes / 2**20

    # forward + backward with full tensors in and out; every rank computes the same loss
    s_in, z_in = s.clone().requires_grad_(), z.clone().requires_grad_()
    s_o, z_o = pm(s_in, z_in, mask, pair_mask)
    (z_o.square().sum() + s_o.square().sum()).backward()
    sync_grads(pm, mesh)  # a documented no-op: parallelize reduces gradients after backward itself
    # z_in.grad is complete on every rank too (docs/training.md)
    if check:
        grads = {k: v.grad.clone() for k, v in model.named_parameters()}
        model.zero_grad()
        s_r, z_r = s.clone().requires_grad_(), z.clone().requires_grad_()
        s_ref, z_ref = model(s_r, z_r, mask, pair_mask)
        (z_ref.square().sum() + s_ref.square().sum()).backward()
        out["z_err"] = ((z_o - z_ref).abs().max() / z_ref.abs().max()).item()
        out["s_err"] = ((s_o - s_ref).abs().max() / s_ref.abs().max()).item()
        out["dz_err"] = ((z_in.grad - z_r.grad).abs().max() / z_r.grad.abs().max()).item()
        scale = max(prm.grad.abs().max().item() for prm in model.parameters())
        out["param_grad_err"] = max((grads[k] - prm.grad).abs().max().item() for k, prm in model.named_parameters()) / scale
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", type=int, default=2, help="mesh side p (p x p processes) without torchrun, default 2")
    ap.add_argument("--tokens", type=int, default=45, help="tokens N, default 45")
    ap.add_argument("--c-s", type=int, default=32, help="single channels, default 32")
    ap.add_argument("--c-z", type=int, default=16, help="pair channels, default 16")
    ap.add_argument("--blocks", type=int, default=2, help="Pairformer blocks, default 2")
    ap.add_argument("--no-check", action="store_true", help="skip the single-device comparison (large N)")
    a = ap.parse_args()
    for name, v in (("--mesh", a.mesh), ("--tokens", a.tokens), ("--c-s", a.c_s), ("--c-z", a.c_z), ("--blocks", a.blocks)):
        if v <= 0:
            ap.error(f"{name}: given {v}; required a positive integer")
    if a.c_s % 4:
        ap.error(f"--c-s: given {a.c_s}; required a multiple of the 4 attention heads. Fix: --c-s 32")
    args = (a.tokens, a.c_s, a.c_z, a.blocks, not a.no_check)
    if "LOCAL_RANK" in os.environ:  # launched by torchrun: one process per rank, already started
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group(backend)
        world = torch.distributed.get_world_size()
        p = int(round(world ** 0.5))
        if p * p != world or a.tokens < p:
            raise SystemExit(f"world size {world} must be a square p*p with p <= --tokens ({a.tokens})")
        res = [run(torch.distributed.get_rank(), world, *args)]
        torch.distributed.destroy_process_group()
    else:
        if a.tokens < a.mesh:
            ap.error(f"--tokens: given {a.tokens} for a {a.mesh}x{a.mesh} mesh; required N >= p")
        from autocp.testing import run_distributed

        res = run_distributed(run, a.mesh * a.mesh, *args, timeout=900)
    for r in res:
        print(r)


if __name__ == "__main__":
    main()
