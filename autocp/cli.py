"""Command line: ``autocp demo`` (also ``python -m autocp demo``).

``autocp demo`` spawns a 2x2 gloo mesh of CPU processes, builds random-weight Boltz-2
modules, runs each single-device and 2D-parallel on the same inputs (N not divisible
by p, with a token mask), and prints the max error, per-rank peak memory and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["main"]


def _randomize(module, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():
            if prm.dim() == 1:  # LayerNorm weights/biases: around 1 / 0
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1 + (1.0 if prm.mean() > 0.5 else 0.0))
            else:  # Boltz zero-inits output projections: re-draw every weight
                prm.copy_(torch.randn(prm.shape, generator=g) / prm.shape[-1] ** 0.5)


def _demo_modules(c: int):
    """(name, boltz module factory, autocp op factory) of the ops the demo runs."""
    from boltz.model.layers.triangular_attention.attention import (
        TriangleAttentionEndingNode,
        TriangleAttentionStartingNode,
    )
    from boltz.model.layers.triangular_mult import TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing

    from .ops.triangle_attn import TriangleAttention2D
    from .ops.triangle_mult import TriangleMultiplication2D

    return [
        ("TriangleMultiplicationOutgoing", lambda: TriangleMultiplicationOutgoing(c), TriangleMultiplication2D),
        ("TriangleMultiplicationIncoming", lambda: TriangleMultiplicationIncoming(c), TriangleMultiplication2D),
        ("TriangleAttentionStartingNode", lambda: TriangleAttentionStartingNode(c, 16, 4), TriangleAttention2D),
        ("TriangleAttentionEndingNode", lambda: TriangleAttentionEndingNode(c, 16, 4), TriangleAttention2D),
    ]


def _demo_rank(rank: int, world: int, n: int, c: int) -> list:
    import torch

    from . import Pair2D, init_mesh
    from .memory import MemoryTracker

    mesh = init_mesh()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, n, n, c, generator=g)
    tok = torch.ones(1, n)
    tok[:, -2:] = 0  # two masked tokens
    mask = tok[:, :, None] * tok[:, None, :]
    rows = []
    for i, (name, make, op_cls) in enumerate(_demo_modules(c)):
        ref_mod = make()
        _randomize(ref_mod, seed=10 + i)
        ref_mod.eval()
        with MemoryTracker(track=[z, mask, *ref_mod.parameters()]) as mt_ref:
            ref = ref_mod(z, mask=mask)
        op = op_cls(ref_mod, mesh)
        zt, mt = Pair2D().shard(z, mesh).contiguous(), Pair2D().shard(mask, mesh).contiguous()
        with MemoryTracker(track=[zt, mt, *ref_mod.parameters()]) as mt_par:
            out = op(zt, mt, n_tokens=n)
        want = Pair2D().shard(ref, mesh)
        valid = Pair2D().valid_mask(mesh, n)[..., None]
        err = ((out - want).abs() * valid).max().item()
        rows.append(
            {
                "op": name,
                "max_abs_err": err,
                "ref_scale": ref.abs().max().item(),
                "peak_single_MB": mt_ref.peak_bytes / 2**20,
                "peak_rank_MB": mt_par.peak_bytes / 2**20,
            }
        )
    rows.append(_demo_pairformer(mesh, n, c, z, tok, mask))
    return rows


def _demo_pairformer(mesh, n: int, c: int, z, tok, pair_mask) -> dict:
    """A random-weight 2-block Boltz-2 PairformerModule (the trunk's pair stack)."""
    import torch
    from boltz.model.layers.pairformer import PairformerModule

    from . import Pair2D, RowToken
    from .memory import MemoryTracker
    from .ops.pairformer import Pairformer2D

    torch.manual_seed(0)
    ref_mod = PairformerModule(token_s=2 * c, token_z=c, num_blocks=2, num_heads=4, dropout=0.0,
                               pairwise_head_width=16, pairwise_num_heads=4, v2=True)
    _randomize(ref_mod, seed=99)
    ref_mod.eval()
    s = torch.randn(1, n, 2 * c, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), MemoryTracker(track=[z, s, pair_mask, *ref_mod.parameters()]) as mt_ref:
        s_ref, z_ref = ref_mod(s, z, tok, pair_mask)
    par = Pairformer2D(ref_mod, mesh)
    st, zt = RowToken().shard(s, mesh).contiguous(), Pair2D().shard(z, mesh).contiguous()
    tt, mt = RowToken().shard(tok, mesh).contiguous(), Pair2D().shard(pair_mask, mesh).contiguous()
    with torch.no_grad(), MemoryTracker(track=[st, zt, mt, *ref_mod.parameters()]) as mt_par:
        s_out, z_out = par(st, zt, tt, mt, n_tokens=n)
    zv = Pair2D().valid_mask(mesh, n)[..., None]
    sv = RowToken().valid_mask(mesh, n)[..., None]
    err = max(((z_out - Pair2D().shard(z_ref, mesh)).abs() * zv).max().item(),
              ((s_out - RowToken().shard(s_ref, mesh)).abs() * sv).max().item())
    return {
        "op": "PairformerModule(v2, 2 blocks)",
        "max_abs_err": err,
        "ref_scale": max(z_ref.abs().max().item(), s_ref.abs().max().item()),
        "peak_single_MB": mt_ref.peak_bytes / 2**20,
        "peak_rank_MB": mt_par.peak_bytes / 2**20,
    }


def demo(args) -> int:
    from .testing import run_distributed

    p = args.p
    t0 = time.time()
    print(f"autocp demo: {p}x{p} mesh of CPU processes (gloo), N={args.n} tokens (not divisible by {p}), "
          f"C={args.c}, 2 masked tokens, random weights", flush=True)
    results = run_distributed(_demo_rank, p * p, args.n, args.c, timeout=600)
    worst = 0.0
    print(f"{'op':32s} {'max|err|':>10s} {'|ref|max':>9s} {'1-dev MB':>9s} {'rank MB':>9s} {'ratio':>6s}")
    for i, row in enumerate(results[0]):
        err = max(r[i]["max_abs_err"] for r in results)
        peak = max(r[i]["peak_rank_MB"] for r in results)
        worst = max(worst, err / max(row["ref_scale"], 1e-12))
        print(f"{row['op']:32s} {err:10.2e} {row['ref_scale']:9.3f} {row['peak_single_MB']:9.2f} {peak:9.2f} "
              f"{row['peak_single_MB'] / peak:6.2f}")
    ok = worst <= 1e-4
    print(f"relative max error {worst:.2e}: {'MATCH' if ok else 'MISMATCH'} ({time.time() - t0:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"p": p, "n": args.n, "c": args.c, "ranks": results}, f, indent=1)
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="autocp", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="2D-parallel vs single-device Boltz ops on a CPU mesh")
    d.add_argument("--p", type=int, default=2, help="mesh side (p x p processes), default 2")
    d.add_argument("--n", type=int, default=63, help="tokens, default 63")
    d.add_argument("--c", type=int, default=32, help="pair channels, default 32")
    d.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        return demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
