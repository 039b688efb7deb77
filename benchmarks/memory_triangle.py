#!/usr/bin/env python
"""Per-rank peak memory of the triangle ops, forward + backward, P = 1, 4, 9 (CPU, gloo).

    python benchmarks/memory_triangle.py                    # N=240, C=64 (about 2-3 min)
    python benchmarks/memory_triangle.py --n 192 --c 32     # quicker

For each op -- Boltz ``TriangleMultiplicationOutgoing`` / ``Incoming`` (autocp
``TriangleMultiplication2D``) and ``TriangleAttentionStartingNode`` / ``EndingNode``
(autocp ``TriangleAttention2D``, included when ``autocp/ops/triangle_attn.py`` exists;
otherwise a note is printed) -- it measures the peak live-tensor bytes of one
``out = op(z, mask); out.backward(g)`` with :class:`autocp.MemoryTracker`, counting the
parameters, the input tile, the mask tile and the output gradient as live from the
start (so nothing is hidden). ``B = 1``.

* ``single``: the Boltz module itself on the full ``[1, N, N, C]`` tensor, one process.
* ``autocp P=1``: the autocp op on a 1x1 mesh (its overhead over Boltz).
* ``P=4`` / ``P=9``: the autocp op on 2x2 / 3x3 gloo meshes; each rank holds its
  ``[1, b, b, C]`` tile (``b = ceil(N/p)``); the table reports the max over ranks.

``ratio = single / max-rank peak``; the target is ``>= 0.8 * P``. Writes
``benchmarks/results/memory_triangle.json`` and ``memory_triangle.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

BOLTZ_MODULES = ["boltz.model.layers.triangular_mult", "boltz.model.layers.triangular_attention.attention"]
OPS = ["trimul_outgoing", "trimul_incoming", "triattn_starting", "triattn_ending"]
HEADS, HEAD_DIM = 4, 32  # Boltz pairformer defaults for triangle attention


def have_triangle_attention() -> bool:
    try:
        from autocp.ops.triangle_attn import TriangleAttention2D  # noqa: F401
    except ImportError as e:
        print(f"NOTE: autocp.ops.triangle_attn.TriangleAttention2D is not importable ({e}); "
              f"triangle attention is skipped in this run.")
        return False
    return True


def build(op: str, c: int, seed: int = 0):
    """(Boltz module with re-drawn parameters, autocp class)."""
    if op.startswith("trimul"):
        from boltz.model.layers.triangular_mult import (
            TriangleMultiplicationIncoming,
            TriangleMultiplicationOutgoing,
        )

        from autocp.ops.triangle_mult import TriangleMultiplication2D

        cls = TriangleMultiplicationOutgoing if op.endswith("outgoing") else TriangleMultiplicationIncoming
        m, op_cls = cls(c), TriangleMultiplication2D
    else:
        from boltz.model.layers.triangular_attention.attention import (
            TriangleAttentionEndingNode,
            TriangleAttentionStartingNode,
        )

        from autocp.ops.triangle_attn import TriangleAttention2D

        cls = TriangleAttentionStartingNode if op.endswith("starting") else TriangleAttentionEndingNode
        m, op_cls = cls(c, HEAD_DIM, HEADS), TriangleAttention2D
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in m.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
    return m, op_cls


def measure(fn_forward, params, z, mask, grad_out_shape) -> int:
    from autocp.memory import MemoryTracker

    z = z.clone().requires_grad_(True)
    g = torch.randn(grad_out_shape)
    with MemoryTracker(track=[*params, z, mask, g]) as mt:
        out = fn_forward(z, mask)
        out.backward(g)
        del out
    return mt.peak_bytes


def single_peak(op: str, n: int, c: int, use_autocp: bool) -> int:
    m, op_cls = build(op, c)
    z = torch.randn(1, n, n, c)
    mask = torch.ones(1, n, n)
    if use_autocp:
        from autocp.mesh import SquareMesh

        mod = op_cls(m, SquareMesh.single())
        fwd = lambda x, mk: mod(x, mk, n_tokens=n)  # noqa: E731
    else:
        fwd = lambda x, mk: m(x, mk)  # noqa: E731
    return measure(fwd, list(m.parameters()), z, mask, (1, n, n, c))


def rank_peak(rank, world, op: str, n: int, c: int):
    """Worker: peak bytes of this rank's forward + backward on its [1, b, b, C] tile."""
    torch.manual_seed(rank)
    from autocp import init_mesh
    from autocp.layout import block_size

    mesh = init_mesh()
    m, op_cls = build(op, c)
    mod = op_cls(m, mesh)
    b = block_size(n, mesh.p)
    z = torch.randn(1, b, b, c)
    mask = torch.ones(1, b, b)
    peak = measure(lambda x, mk: mod(x, mk, n_tokens=n), list(m.parameters()), z, mask, (1, b, b, c))
    return {"coord": mesh.coord, "peak_bytes": peak}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(res["ops"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.35
    for i, P in enumerate((4, 9)):
        vals = [res["ops"][o]["ratio"].get(str(P), 0.0) for o in ops]
        xs = [k + (i - 0.5) * width for k in range(len(ops))]
        ax.bar(xs, vals, width, label=f"P={P}")
        ax.axhline(0.8 * P, ls="--", lw=1, color=f"C{i}", label=f"target 0.8*P={0.8 * P:.1f}")
        ax.axhline(P, ls=":", lw=1, color=f"C{i}")
    ax.set_xticks(range(len(ops)))
    ax.set_xticklabels(ops, rotation=15)
    ax.set_ylabel("single-device peak / per-rank peak")
    ax.set_title(f"Triangle ops fwd+bwd memory ratio (N={res['n']}, C={res['c']}, CPU tracker)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=240, help="tokens N (default 240: b = 120 / 80)")
    ap.add_argument("--c", type=int, default=64, help="pair channels C (default 64)")
    ap.add_argument("--meshes", type=int, nargs="+", default=[2, 3], help="mesh sides p (default 2 3)")
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--out", default=os.path.join(RESULTS, "memory_triangle.json"))
    args = ap.parse_args(argv)

    from autocp import testing

    # ranks import boltz once, in the forkserver (torch._dynamo makes it ~5 s per process)
    testing._context().set_forkserver_preload(["torch", "torch.distributed", "autocp", *BOLTZ_MODULES])

    ops = [o for o in args.ops if o.startswith("trimul") or have_triangle_attention()]
    res = {"n": args.n, "c": args.c, "batch": 1, "device": "cpu", "tracker": "autocp.MemoryTracker",
           "heads": HEADS, "head_dim": HEAD_DIM, "ops": {}}
    t0 = time.time()
    for op in ops:
        row = {"single_boltz": single_peak(op, args.n, args.c, False),
               "autocp_p1": single_peak(op, args.n, args.c, True), "per_rank": {}, "max_rank": {}, "ratio": {}}
        for p in args.meshes:
            P = p * p
            out = testing.run_distributed(rank_peak, P, op, args.n, args.c, timeout=600)
            peaks = [r["peak_bytes"] for r in out]
            row["per_rank"][str(P)] = peaks
            row["max_rank"][str(P)] = max(peaks)
            row["ratio"][str(P)] = row["single_boltz"] / max(peaks)
        res["ops"][op] = row
        print(f"[{time.time() - t0:6.1f}s] {op} done", flush=True)

    mb = 2 ** 20
    print(f"\nPeak live tensor bytes, fwd+bwd, N={args.n}, C={args.c}, B=1 (MiB; P>1: max over ranks)")
    hdr = f"{'op':<18}{'Boltz P=1':>11}{'autocp P=1':>12}" + "".join(
        f"{'P=' + str(p * p):>10}{'ratio':>8}{'target':>8}" for p in args.meshes)
    print(hdr)
    print("-" * len(hdr))
    for op, row in res["ops"].items():
        line = f"{op:<18}{row['single_boltz'] / mb:>11.1f}{row['autocp_p1'] / mb:>12.1f}"
        for p in args.meshes:
            P = str(p * p)
            line += f"{row['max_rank'][P] / mb:>10.1f}{row['ratio'][P]:>8.2f}{0.8 * p * p:>8.1f}"
        print(line)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    png = os.path.splitext(args.out)[0] + ".png"
    try:
        plot(res, png)
        print(f"wrote {args.out} and {png}")
    except ImportError:
        print(f"wrote {args.out} (matplotlib missing: no plot; pip install matplotlib)")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
