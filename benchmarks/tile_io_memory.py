"""Per-rank forward+backward peak in tile mode vs full-tensor mode (issue [tile-io]).

A Boltz-2 ``PairformerModule(64, 32, 2 blocks, 4 heads, pairwise 4x32, v2)``, train mode,
dropout 0, fp32, on a ``p x p`` mesh of CPU processes (gloo), one step = forward, a loss,
backward (parameter gradients reduced by the module):

* ``full``: whole ``s, z, mask, pair_mask`` on every rank in, whole outputs out
  (``pm(s, z, ...)``), loss ``(s_out * w_s).sum() + (z_out * w_z).sum()`` on the whole outputs;
* ``tiles``: this rank's tiles in as DTensors, padded local tiles out (``output="local"``),
  the same loss with :func:`autocp.tile_sum` on the tiles (weights cut to tiles too).

Memory: :class:`autocp.memory.MemoryTracker` (live tensor storages; parameters and the
inputs this mode holds counted from the start): ``peak`` and ``largest`` (the largest single
storage) and ``whole_pair_tensors``: how many tensors with two dims of length N (up to
padding) or a [N^2, C] flattening (1-D buffers -- gradient buckets, byte buffers -- excluded) (a whole ``z``, its gradient, a whole pair-shaped
weight or mask) existed on the rank, inputs included. The figure per mode is the worst rank's.
Losses and gradients of the two modes are compared too.

    python benchmarks/tile_io_memory.py --n 256 --mesh 2

Writes ``benchmarks/results/tile_io_memory.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
from pairformer_setup import build_pairformer, pairformer_inputs

MB = 2**20
CFG = dict(token_s=64, token_z=32, num_blocks=2, num_heads=4, dropout=0.0, pairwise_head_width=32,
           pairwise_num_heads=4, v2=True)


def _rank(rank, world, n, mode):
    import autocp
    from autocp import Pair2D, RowToken, tile_sum
    from autocp.memory import MemoryTracker

    torch.set_num_threads(1)
    mesh = autocp.SquareMesh.from_any(autocp.init_mesh())
    model = build_pairformer(CFG, 0).train()
    full = pairformer_inputs(CFG, n)
    g = torch.Generator().manual_seed(9)
    w_s, w_z = torch.randn(full[0].shape, generator=g), torch.randn(full[1].shape, generator=g)
    lays = [RowToken(), Pair2D(), RowToken(), Pair2D()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=full, input_layouts=lays)
    if mode == "tiles":
        held = [lay.shard(x, mesh).contiguous() for x, lay in zip(full, lays)]
        ws, wz = RowToken().shard(w_s, mesh).contiguous(), Pair2D().shard(w_z, mesh).contiguous()
        del full, w_s, w_z  # nothing whole is kept on the rank
    else:
        held, ws, wz = list(full), w_s, w_z
    held[0].requires_grad_()
    held[1].requires_grad_()
    # a whole pair tensor (two token dims of length N) anywhere on the rank, inputs included
    def is_whole(shape):  # two dims of length N (up to padding), or a flattened N^2 dim
        return sum(n <= d < n + mesh.p for d in shape) >= 2 or (len(shape) >= 2 and any(d >= n * n for d in shape))

    whole = [x for x in (*held, ws, wz) if is_whole(x.shape)]
    with MemoryTracker(track=[*model.parameters(), *held, ws, wz], flag=is_whole) as mt:
        if mode == "tiles":
            s_o, z_o = pm(*[lay.to_dtensor(t, mesh, n) for t, lay in zip(held, lays)], output="local")
            loss = tile_sum(s_o * ws, RowToken(), mesh, n) + tile_sum(z_o * wz, Pair2D(), mesh, n)
        else:
            s_o, z_o = pm(*held)
            loss = (s_o * ws).sum() + (z_o * wz).sum()
        loss.backward()
        del s_o, z_o
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return {"peak": mt.peak_bytes, "largest": mt.largest_bytes, "largest_what": mt.largest_what,
            "whole_pair": len(whole) + len(mt.flagged), "loss": float(loss),
            "grad_norm": float(sum(v.double().square().sum() for v in grads.values()) ** 0.5),
            "grads": {k: v.numpy() for k, v in grads.items()}}


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 -- the JSON is the result; the plot is optional
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"N={r['n']} {r['mesh']}\n{r['mode']}" for r in rows]
    ax.bar(range(len(rows)), [r["peak_mb"] for r in rows], label="fwd+bwd peak per rank")
    ax.bar(range(len(rows)), [r["largest_mb"] for r in rows], label="largest single tensor", alpha=0.7)
    if rows:
        ax.axhline(rows[0]["whole_z_mb"], color="k", ls="--", lw=1, label="one whole z")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title("Boltz-2 Pairformer (2 blocks), train step: tile I/O vs full tensors")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[256])
    ap.add_argument("--mesh", type=int, nargs="+", default=[2])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tile_io_memory"))
    a = ap.parse_args()
    from autocp.testing import run_distributed

    rows = []
    for n in a.n:
        for p in a.mesh:
            res = {m: run_distributed(_rank, p * p, n, m, timeout=3600) for m in ("full", "tiles")}
            gf, gt = res["full"][0]["grads"], res["tiles"][0]["grads"]
            top = max(float(abs(v).max()) for v in gf.values())
            gerr = max(float(abs(gt[k] - v).max()) / max(float(abs(v).max()), 1e-3 * top) for k, v in gf.items())
            for m, rr in res.items():
                row = {"n": n, "mesh": f"{p}x{p}", "mode": m,
                       "peak_mb": max(r["peak"] for r in rr) / MB, "largest_mb": max(r["largest"] for r in rr) / MB,
                       "largest_what": rr[0]["largest_what"], "whole_pair_tensors": max(r["whole_pair"] for r in rr),
                       "whole_z_mb": n * n * CFG["token_z"] * 4 / MB, "loss": rr[0]["loss"],
                       "grad_err_vs_full": gerr if m == "tiles" else 0.0}
                rows.append(row)
                print(f"N={n} {p}x{p} {m:>5}: fwd+bwd peak {row['peak_mb']:8.1f} MiB/rank, largest tensor "
                      f"{row['largest_mb']:7.2f} MiB {row['largest_what']} (one whole z: {row['whole_z_mb']:.2f} MiB), "
                      f"whole [N, N, ...] tensors {row['whole_pair_tensors']}, loss {row['loss']:.6f}"
                      + (f", grads vs full mode {gerr:.1e}" if m == "tiles" else ""))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"config": CFG, "rows": rows}, f, indent=1)
    _plot(rows, a.out + ".png")
    print("wrote", a.out + ".json", a.out + ".png")


if __name__ == "__main__":
    main()
