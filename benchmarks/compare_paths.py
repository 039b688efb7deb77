"""Both autocp paths side by side in one run: ``autocp.parallelize`` (the compiler) and the
hand-assembled ``Pairformer2D``, per-rank peak memory and CPU time, forward and
forward+backward, on a Boltz-2 ``PairformerModule(64, 32, 2 blocks, 4 heads, pairwise 4x32,
v2)`` in train mode (dropout 0, fp32).

Method (the same for both paths, every rank):

* inputs: this rank's tiles (s RowToken, z / pair_mask Pair2D, mask RowToken); the
  compiler path gets them as DTensors and returns local tiles (``output="local"``);
* memory: :class:`autocp.memory.MemoryTracker` (live tensor storages, DTensors at their
  local bytes; parameters and input tiles counted from the start); forward = ``no_grad``,
  fwd+bwd = one backward of ``s.sum() + z.sum()`` of the output tiles;
* CPU time: ``time.process_time`` of this rank (``OMP_NUM_THREADS=1``), median of
  ``--repeats`` after one warm-up; the figure is the slowest rank's.

``--original`` adds the unmodified Boltz module on the full tensors (one process; 1x1
overhead reference). Fold-CP figures are not run here (its checkout is not part of this
project); ``--foldcp-json FILE`` adds rows measured elsewhere (a list of dicts with the
keys of a row below) to the table and plot.

    python benchmarks/compare_paths.py --n 192 --mesh 1 2 3 --original
    python benchmarks/compare_paths.py --n 256 --mesh 2

Writes ``benchmarks/results/compare_paths.json`` and ``.png`` (rows are merged by
(n, mesh, impl) with earlier runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch
from pairformer_setup import build_pairformer, pairformer_inputs
from plotting import pyplot  # noqa: E402 -- benchmarks/ is the script's directory

MB = 1e6
CFG = dict(token_s=64, token_z=32, num_blocks=2, num_heads=4, dropout=0.0, pairwise_head_width=32,
           pairwise_num_heads=4, v2=True)


def _build(seed=0):
    return build_pairformer(CFG, seed).train()


def _inputs(n, seed=2):
    return pairformer_inputs(CFG, n, seed)


def _timed(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts)


def _measure(fwd, track, repeats):
    from autocp.memory import MemoryTracker

    def step():
        s_o, z_o = fwd()
        (s_o.sum() + z_o.sum()).backward()

    with torch.no_grad(), MemoryTracker(track=track) as mt:
        out = fwd()
    peak_f = mt.peak_bytes
    del out
    with MemoryTracker(track=track) as mt:
        step()
    peak_fb = mt.peak_bytes
    with torch.no_grad():
        t_f = _timed(fwd, repeats)
    t_fb = _timed(step, repeats)
    return {"fwd_bytes": peak_f, "fwd_bwd_bytes": peak_fb, "fwd_s": t_f, "fwd_bwd_s": t_fb}


def _rank_worker(rank, world, n, impl, repeats):
    torch.set_num_threads(1)
    import autocp
    from autocp.layout import Pair2D, RowToken
    from autocp.ops.pairformer import Pairformer2D

    mesh = autocp.SquareMesh.from_any(autocp.init_mesh())
    mod = _build()
    full = _inputs(n)
    lays = [RowToken(), Pair2D(), RowToken(), Pair2D()]
    tiles = [lay.shard(x, mesh).contiguous() for x, lay in zip(full, lays)]
    ts, tz = (t.requires_grad_() for t in tiles[:2])
    tm, tp = tiles[2:]
    info = {}
    if impl.startswith("parallelize"):
        recompute = impl.split(":")[1] if ":" in impl else "ops"
        with warnings.catch_warnings(record=True) as wl:
            warnings.simplefilter("always")
            pm = autocp.parallelize(mod, mesh, example_inputs=full, input_layouts=dict(zip(
                ("s", "z", "mask", "pair_mask"), lays)), recompute=recompute)
        info["warnings"] = len([w for w in wl if "autocp" in str(w.message)])
        info["gathered"] = [k for k, a in pm.plan.actions.items() if a.action == "fallback"]
        del full

        def fwd():
            dts = [lay.to_dtensor(t, mesh, n) for t, lay in zip((ts, tz, tm, tp), lays)]
            return pm(*dts, output="local")

        params = list(pm.parameters())
    else:
        del full
        op = Pairformer2D(mod, mesh)

        def fwd():
            return op(ts, tz, tm, tp, n_tokens=n)

        params = list(op.parameters())
    res = _measure(fwd, [*params, *tiles], repeats)
    res.update(info)
    return res


def parallel_row(n, p, impl, repeats):
    from autocp.testing import run_distributed

    res = run_distributed(_rank_worker, p * p, n, impl, repeats, timeout=3600)
    row = {"n": n, "mesh": f"{p}x{p}", "impl": impl}
    for k in ("fwd_bytes", "fwd_bwd_bytes", "fwd_s", "fwd_bwd_s"):
        row[k] = max(r[k] for r in res)
    if impl.startswith("parallelize"):
        row["warnings"] = res[0]["warnings"]
        row["gathered"] = res[0]["gathered"]
    return row


def original_row(n, repeats):
    torch.set_num_threads(1)
    mod = _build()
    s, z, mask, pair = _inputs(n)
    s.requires_grad_()
    z.requires_grad_()
    res = _measure(lambda: mod(s, z, mask, pair), [*mod.parameters(), s, z, mask, pair], repeats)
    return {"n": n, "mesh": "1 process", "impl": "boltz (original)", **res}


def _plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"N={r['n']} {r['mesh']}\n{r['impl']}" for r in rows]
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [r["fwd_bytes"] / MB for r in rows], 0.4, label="forward")
    axes[0].bar([i + 0.2 for i in x], [r["fwd_bwd_bytes"] / MB for r in rows], 0.4, label="fwd+bwd")
    axes[0].set_ylabel("per-rank peak (MB, live tensors)")
    axes[1].bar([i - 0.2 for i in x], [r["fwd_s"] for r in rows], 0.4, label="forward")
    axes[1].bar([i + 0.2 for i in x], [r["fwd_bwd_s"] for r in rows], 0.4, label="fwd+bwd")
    axes[1].set_ylabel("per-rank CPU s (slowest rank)")
    for ax in axes:
        ax.set_xticks(list(x), labels, rotation=90, fontsize=6)
        ax.legend()
    fig.suptitle("Boltz-2 PairformerModule(64, 32, 2 blocks), train, fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[192])
    ap.add_argument("--mesh", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--impl", nargs="+", default=["parallelize", "Pairformer2D"],
                    help="parallelize[:ops|:blocks|:none] (the recompute policy) and/or Pairformer2D")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--original", action="store_true", help="also the unmodified Boltz module (one process)")
    ap.add_argument("--foldcp-json", help="rows measured for Fold-CP elsewhere, merged into the table")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "compare_paths"))
    args = ap.parse_args(argv)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows = []
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            rows = json.load(f).get("rows", [])
    new = []
    for n in args.n:
        if args.original:
            new.append(original_row(n, args.repeats))
        for p in args.mesh:
            for impl in args.impl:
                new.append(parallel_row(n, p, impl, args.repeats))
                r = new[-1]
                print(f"N={n} {r['mesh']} {impl:13s} fwd {r['fwd_bytes'] / MB:7.1f} MB  fwd+bwd "
                      f"{r['fwd_bwd_bytes'] / MB:7.1f} MB  fwd {r['fwd_s']:.2f} s  fwd+bwd {r['fwd_bwd_s']:.2f} s"
                      + (f"  ({r['warnings']} warnings, gathered {r['gathered']})" if r.get("warnings") else ""),
                      flush=True)
    if args.foldcp_json:
        with open(args.foldcp_json) as f:
            new.extend(json.load(f))
    keys = {(r["n"], r["mesh"], r["impl"]) for r in new}
    rows = [r for r in rows if (r["n"], r["mesh"], r["impl"]) not in keys] + new
    rows.sort(key=lambda r: (r["n"], r["mesh"], r["impl"]))
    print("\n| N | mesh | impl | fwd peak MB | fwd+bwd peak MB | fwd CPU s/rank | fwd+bwd CPU s/rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['mesh']} | {r['impl']} | {r['fwd_bytes'] / MB:.1f} | {r['fwd_bwd_bytes'] / MB:.1f} | "
              f"{r['fwd_s']:.2f} | {r['fwd_bwd_s']:.2f} |")
    with open(args.out + ".json", "w") as f:
        json.dump({"config": CFG, "dtype": "float32", "mode": "train", "units": "bytes; CPU seconds",
                   "torch": torch.__version__, "rows": rows}, f, indent=1, default=float)
    _plot(rows, args.out + ".png")
    print("wrote", args.out + ".json", args.out + ".png")


if __name__ == "__main__":
    main()
