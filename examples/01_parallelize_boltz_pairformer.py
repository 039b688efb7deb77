"""Run a Boltz-2 Pairformer 2D-parallel on a p x p mesh and check it against one device.

CPU (spawns p*p gloo processes itself):

    python examples/01_parallelize_boltz_pairformer.py --p 2 --n 45

GPUs (NCCL, one process per GPU, p*p GPUs):

    torchrun --nproc-per-node 4 examples/01_parallelize_boltz_pairformer.py --torchrun --n 1024

Each rank holds s[:, T_r] (RowToken) and the z tile z[:, T_r, T_c] (Pair2D), runs forward
and backward, and compares its tiles and the mesh-summed parameter gradients with the
single-device module (on CPU; skipped at large N with --no-check).
"""

from __future__ import annotations

import argparse
import os

import torch


def build(c_s: int, c_z: int, blocks: int, seed: int = 0):
    from boltz.model.layers.pairformer import PairformerModule

    torch.manual_seed(seed)
    m = PairformerModule(token_s=c_s, token_z=c_z, num_blocks=blocks, num_heads=4, dropout=0.0,
                         pairwise_head_width=16, pairwise_num_heads=4, v2=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # Boltz zero-inits output projections: re-draw every weight
        for prm in m.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) / max(prm.shape[-1], 1) ** 0.5)
    return m


def run(rank: int, world: int, n: int, c_s: int, c_z: int, blocks: int, check: bool) -> dict:
    import autocp
    from autocp.memory import MemoryTracker
    from autocp.ops.common import sync_grads
    from autocp.ops.pairformer import Pairformer2D

    device = "cuda" if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl" else "cpu"
    mesh = autocp.init_mesh()
    model = build(c_s, c_z, blocks).to(device).train()
    g = torch.Generator().manual_seed(1)
    s = torch.randn(1, n, c_s, generator=g).to(device)
    z = torch.randn(1, n, n, c_z, generator=g).to(device)
    tok = torch.ones(1, n, device=device)
    tok[:, -3:] = 0  # three padding tokens of the model's own
    pair_mask = tok[:, :, None] * tok[:, None, :]

    pm = Pairformer2D(model, mesh)  # shares the parameters; same state_dict keys
    row, pair = autocp.RowToken(), autocp.Pair2D()
    s_t = row.shard(s, mesh).contiguous().requires_grad_()
    z_t = pair.shard(z, mesh).contiguous().requires_grad_()
    with MemoryTracker(track=[s_t, z_t, *model.parameters()], device=device) as mt:
        s_o, z_o = pm(s_t, z_t, row.shard(tok, mesh).contiguous(), pair.shard(pair_mask, mesh).contiguous(),
                      n_tokens=n)
        # any loss works; each rank differentiates the loss of its own tiles
        loss = (z_o * pair.valid_mask(mesh, n, ndim=4)).square().sum() + (s_o * row.valid_mask(mesh, n, ndim=3)).square().sum() / mesh.p
        loss.backward()
    sync_grads(model, mesh)
    out = {"coord": mesh.coord, "peak_MB": mt.peak_bytes / 2**20}
    if check:
        grads = {k: v.grad.clone() for k, v in model.named_parameters()}
        model.zero_grad()
        s_r, z_r = s.clone().requires_grad_(), z.clone().requires_grad_()
        s_ref, z_ref = model(s_r, z_r, tok, pair_mask)
        (z_ref.square().sum() + s_ref.square().sum()).backward()
        v = pair.valid_mask(mesh, n, ndim=4)
        out["z_err"] = ((z_o - pair.shard(z_ref, mesh)).abs() * v).max().item() / z_ref.abs().max().item()
        out["dz_err"] = ((z_t.grad - pair.shard(z_r.grad, mesh)).abs() * v).max().item() / z_r.grad.abs().max().item()
        scale = max(prm.grad.abs().max().item() for prm in model.parameters())
        out["param_grad_err"] = max((grads[k] - prm.grad).abs().max().item() for k, prm in model.named_parameters()) / scale
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=2)
    ap.add_argument("--n", type=int, default=45)
    ap.add_argument("--c-s", type=int, default=32)
    ap.add_argument("--c-z", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--torchrun", action="store_true", help="launched by torchrun (NCCL if CUDA)")
    a = ap.parse_args()
    args = (a.n, a.c_s, a.c_z, a.blocks, not a.no_check)
    if a.torchrun:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        res = [run(torch.distributed.get_rank(), torch.distributed.get_world_size(), *args)]
        torch.distributed.destroy_process_group()
    else:
        from autocp.testing import run_distributed

        res = run_distributed(run, a.p * a.p, *args, timeout=900)
    for r in res:
        print(r)


if __name__ == "__main__":
    main()
