"""Per-rank peak memory of one Boltz-2 Pairformer block (token_s 384, token_z 128) vs N.

* **measured vs estimate** (``--measure-n``, default 512 768 1024 on 2x2): gloo ranks run
  the tile program ``parallelize`` emits (no grad, fp32, eval) under
  :class:`autocp.memory.MemoryTracker` (parameters + the rank's input tiles + every live
  tensor); ``autocp.estimate`` predicts the same from FakeTensor runs. Also the per-rank
  CPU time of the block forward with the default chunking and with ``autocp.chunking(1.0)``
  (one chunk: the unchunked formulation), same processes, same inputs.
* **estimate curve** (``--curve-n`` on ``--curve-mesh`` p x p meshes, bf16 weights,
  ``pair_dtype=bf16``): per-rank peak up to N = 50,000, with the O(N^2/P) reference and the
  two-tile floor (z and its update), plus the per-module table at N = 30,000 on 8x8.

Writes ``benchmarks/results/memory_scale.json`` and ``memory_scale.png``.

    python benchmarks/memory_scale.py                       # both parts (~15 min on 2 cores)
    python benchmarks/memory_scale.py --skip-measure        # the estimate curve only
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from pairformer_setup import build_pairformer, pairformer_inputs
from plotting import pyplot  # noqa: E402 -- benchmarks/ is the script's directory

GIB = 2**30
CFG = dict(token_s=384, token_z=128, num_blocks=1, v2=True)


def _build(seed=0):
    return build_pairformer(CFG, seed).eval()


def _inputs(n, seed=2):
    return pairformer_inputs(CFG, n, seed)


def measure_worker(rank, world, ns):
    """Per N: measured per-rank peak (bytes) and CPU seconds, default chunking and one chunk."""
    import warnings

    import autocp
    from autocp.layout import Pair2D, RowToken
    from autocp.memory import MemoryTracker
    from autocp.passes.context import tile_context

    torch.set_num_threads(1)
    mesh = autocp.init_mesh()
    model = _build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=_inputs(12))
    rows = []
    for n in ns:
        full = _inputs(n)
        loc = [RowToken().shard(full[0], mesh).clone(), Pair2D().shard(full[1], mesh).clone(),
               RowToken().shard(full[2], mesh).clone(), Pair2D().shard(full[3], mesh).clone()]
        runner = pm._graph_for(full, {}, n, None)
        del full
        row = {"n": n}
        for label, frac in (("chunked", None), ("one_chunk", 1.0)):
            ctx = autocp.chunking(frac) if frac is not None else _null()
            with torch.no_grad(), ctx:
                with MemoryTracker(track=[*model.parameters(), *loc]) as mt:
                    t0 = time.process_time()
                    with tile_context(mesh, n):
                        out = runner(loc, {})
                    cpu = time.process_time() - t0
                del out
            row[label] = {"peak_bytes": int(mt.peak_bytes), "cpu_s": cpu}
        rows.append(row)
    return rows


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def measure(ns, p):
    import autocp
    from autocp.testing import run_distributed

    t0 = time.time()
    per_rank = run_distributed(measure_worker, p * p, list(ns), timeout=7200)
    model = _build()
    out = []
    for i, n in enumerate(ns):
        est = autocp.estimate(model, n_tokens=n, mesh_shape=(p, p))
        meas = max(r[i]["chunked"]["peak_bytes"] for r in per_rank)
        meas1 = max(r[i]["one_chunk"]["peak_bytes"] for r in per_rank)
        cpu = max(r[i]["chunked"]["cpu_s"] for r in per_rank)
        cpu1 = max(r[i]["one_chunk"]["cpu_s"] for r in per_rank)
        row = {"n": n, "p": p, "measured_bytes": meas, "estimate_bytes": est.peak_bytes,
               "ratio": est.peak_bytes / meas, "measured_one_chunk_bytes": meas1,
               "cpu_s_chunked": cpu, "cpu_s_one_chunk": cpu1, "cpu_ratio": cpu / cpu1,
               "per_module": est.per_module}
        print(f"N={n:5d} {p}x{p}: measured {meas / 2**20:9.1f} MiB, estimate {est.peak_bytes / 2**20:9.1f} MiB "
              f"(ratio {row['ratio']:.3f}); one chunk {meas1 / 2**20:9.1f} MiB; CPU s/rank chunked {cpu:.1f} "
              f"vs one chunk {cpu1:.1f} ({row['cpu_ratio']:.2f}x)", flush=True)
        out.append(row)
    print(f"(measure: {time.time() - t0:.0f} s)")
    return out


def curve(ns, meshes, dtype):
    import autocp

    model = _build().to(dtype)
    rows = []
    for p in meshes:
        for n in ns:
            if n < 2 * p:
                continue
            t0 = time.time()
            e = autocp.estimate(model, n_tokens=n, mesh_shape=(p, p), dtype=dtype, pair_dtype=dtype)
            b = -(-n // p)
            tile = b * b * CFG["token_z"] * torch.empty((), dtype=dtype).element_size()
            rows.append({"n": n, "p": p, "peak_bytes": e.peak_bytes, "tile_bytes": tile,
                         "tiles": e.peak_bytes / tile, "per_module": e.per_module})
            print(f"estimate N={n:6d} {p:2d}x{p:<2d}: {e.peak_bytes / GIB:8.3f} GiB per rank "
                  f"({e.peak_bytes / tile:.2f} z tiles; {time.time() - t0:.0f} s)", flush=True)
            if n == 30_000 and p == 8:
                print(e.table())
    return rows


def plot(res, path):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for p in sorted({r["p"] for r in res["curve"]}):
        rr = [r for r in res["curve"] if r["p"] == p]
        ns = [r["n"] for r in rr]
        (line,) = ax.loglog(ns, [r["peak_bytes"] / GIB for r in rr], "o-", label=f"estimate {p}x{p}")
        ax.loglog(ns, [2 * r["tile_bytes"] / GIB for r in rr], ":", color=line.get_color(), alpha=0.7,
                  label=f"two-tile floor {p}x{p}")
        ref = rr[-1]
        ax.loglog(ns, [ref["peak_bytes"] / GIB * (n / ref["n"]) ** 2 for n in ns], "--", color=line.get_color(),
                  alpha=0.35)
    ax.axhline(20, color="k", lw=0.8)
    ax.text(ax.get_xlim()[0] * 1.1, 21, "20 GiB", fontsize=8)
    ax.set_xlabel("N tokens")
    ax.set_ylabel("per-rank peak (GiB)")
    ax.set_title("one Boltz-2 Pairformer block, bf16 inference (dashed: O(N^2/P))")
    ax.legend(fontsize=7)
    ax = axes[1]
    if res.get("measured"):
        ns = [r["n"] for r in res["measured"]]
        ax.plot(ns, [r["measured_bytes"] / 2**20 for r in res["measured"]], "o-", label="measured (MemoryTracker)")
        ax.plot(ns, [r["estimate_bytes"] / 2**20 for r in res["measured"]], "x--", label="autocp.estimate")
        ax.plot(ns, [r["measured_one_chunk_bytes"] / 2**20 for r in res["measured"]], "s:",
                label="measured, one chunk")
        ax.set_xlabel("N tokens")
        ax.set_ylabel("per-rank peak (MiB)")
        ax.set_title(f"fp32 forward on {res['measured'][0]['p']}x{res['measured'][0]['p']} (CPU, gloo)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure-n", type=int, nargs="+", default=[512, 768, 1024])
    ap.add_argument("--mesh", type=int, default=2)
    ap.add_argument("--curve-n", type=int, nargs="+", default=[2_000, 5_000, 10_000, 20_000, 30_000, 50_000])
    ap.add_argument("--curve-mesh", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--skip-measure", action="store_true")
    ap.add_argument("--skip-curve", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "memory_scale.json")
    res = {}
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
    res["config"] = CFG
    if not args.skip_measure:
        res["measured"] = measure(args.measure_n, args.mesh)
    if not args.skip_curve:
        res["curve"] = curve(args.curve_n, args.curve_mesh, torch.bfloat16)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")
    if res.get("curve"):
        plot(res, os.path.join(args.out, "memory_scale.png"))


if __name__ == "__main__":
    main()
