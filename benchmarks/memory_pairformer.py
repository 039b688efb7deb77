"""Per-rank peak live-tensor memory of the 2D Pairformer (forward, forward+backward).

Measured with :class:`autocp.memory.MemoryTracker` (TorchDispatchMode; parameters and the
rank's input tiles are counted as live from the start), fp32, train mode, on CPU/gloo
ranks spawned by :func:`autocp.testing.run_distributed`.

* ``--target``: the issue's absolute target -- Boltz-2 ``PairformerModule(token_s=64,
  token_z=32, num_blocks=2, num_heads=4, dropout=0, pairwise_head_width=32,
  pairwise_num_heads=4, v2=True)``, N=256, 2x2 mesh; target forward <= 106 MB and
  forward+backward <= 458 MB per rank (NVIDIA Fold-CP: 152 / 654 MB; single process
  674 / 2998 MB). Also measures the single-process Boltz module for reference.
* ``--scaling``: the same module at ``--n`` tokens for P = 1, 4, 9 (our 2D module on each
  mesh, plus the single-process Boltz module): ratio single / parallel per rank.

Writes ``benchmarks/results/memory_pairformer.json`` and ``.png``.

    python benchmarks/memory_pairformer.py --target --scaling --n 72
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from pairformer_setup import build_pairformer, pairformer_inputs
from plotting import pyplot  # noqa: E402 -- benchmarks/ is the script's directory

MB = 1e6  # the figures are in MB = 10^6 bytes
CFG = dict(token_s=64, token_z=32, num_blocks=2, num_heads=4, dropout=0.0, pairwise_head_width=32,
           pairwise_num_heads=4, v2=True)


def _build(seed=0):
    return build_pairformer(CFG, seed).train()


def _inputs(n, seed=2):
    return pairformer_inputs(CFG, n, seed)


def _measure(fn_fwd, track):
    """(forward peak, forward+backward peak) in bytes, each from a fresh run."""
    from autocp.memory import MemoryTracker

    with MemoryTracker(track=track) as mt:
        out = fn_fwd()
    fwd = mt.peak_bytes
    del out
    with MemoryTracker(track=track) as mt:
        s_out, z_out = fn_fwd()
        (s_out.sum() + z_out.sum()).backward()
        del s_out, z_out
    return fwd, mt.peak_bytes


def single_process(n):
    """Boltz's own module on the full tensors (one process)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    mod = _build()
    s, z, mask, pair = _inputs(n)
    s.requires_grad_()
    z.requires_grad_()
    t0 = time.time()
    fwd, both = _measure(lambda: mod(s, z, mask, pair), [*mod.parameters(), s, z, mask, pair])
    return {"n": n, "P": 1, "impl": "boltz single process", "fwd_bytes": fwd, "fwd_bwd_bytes": both,
            "seconds": time.time() - t0}


def _rank_worker(rank, world, n):
    import autocp
    from autocp.layout import Pair2D, RowToken
    from autocp.ops.pairformer import Pairformer2D

    mesh = autocp.init_mesh()
    mod = _build()
    op = Pairformer2D(mod, mesh)
    s, z, mask, pair = _inputs(n)
    ts = RowToken().shard(s, mesh).contiguous().requires_grad_()
    tz = Pair2D().shard(z, mesh).contiguous().requires_grad_()
    tm = RowToken().shard(mask, mesh).contiguous()
    tp = Pair2D().shard(pair, mesh).contiguous()
    del s, z, mask, pair
    t0 = time.time()
    fwd, both = _measure(lambda: op(ts, tz, tm, tp, n_tokens=n), [*op.parameters(), ts, tz, tm, tp])
    return {"fwd_bytes": fwd, "fwd_bwd_bytes": both, "seconds": time.time() - t0}


def parallel(n, P):
    from autocp.testing import run_distributed

    res = run_distributed(_rank_worker, P, n, timeout=1800)
    return {"n": n, "P": P, "impl": "autocp Pairformer2D",
            "fwd_bytes": max(r["fwd_bytes"] for r in res), "fwd_bwd_bytes": max(r["fwd_bwd_bytes"] for r in res),
            "per_rank": res, "seconds": max(r["seconds"] for r in res)}


def _plot(data, path):
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if "target" in data:
        t = data["target"]
        single = t.get("single")
        labels = ["Boltz single" + ("" if single else " (issue)"), "Fold-CP 2x2", "autocp 2x2", "target"]
        fw = [single["fwd_bytes"] / MB if single else 674, 152, t["autocp"]["fwd_bytes"] / MB, 106]
        bw = [single["fwd_bwd_bytes"] / MB if single else 2998, 654, t["autocp"]["fwd_bwd_bytes"] / MB, 458]
        x = range(len(labels))
        axes[0].bar([i - 0.2 for i in x], fw, 0.4, label="forward")
        axes[0].bar([i + 0.2 for i in x], bw, 0.4, label="forward+backward")
        axes[0].set_xticks(list(x), labels, rotation=15)
        axes[0].set_ylabel("per-rank peak live tensors (MB)")
        axes[0].set_title("N=256, token_s=64, token_z=32, 2 blocks (fp32, train)")
        axes[0].legend()
    if "scaling" in data:
        sc = data["scaling"]
        Ps = [r["P"] for r in sc["autocp"]]
        for key, lab in (("fwd_bytes", "forward"), ("fwd_bwd_bytes", "forward+backward")):
            axes[1].plot(Ps, [sc["single"][key] / r[key] for r in sc["autocp"]], "o-", label=lab)
        axes[1].plot(Ps, Ps, "k--", label="ideal (= P)")
        axes[1].plot(Ps, [0.8 * p for p in Ps], "k:", label="0.8 P")
        axes[1].set_xlabel("P (ranks)")
        axes[1].set_ylabel("single-process peak / per-rank peak")
        axes[1].set_title(f"memory ratio, N={sc['n']}")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="store_true", help="the issue's N=256 2x2 configuration")
    ap.add_argument("--scaling", action="store_true", help="ratio single/parallel at P=1,4,9")
    ap.add_argument("--n", type=int, default=72, help="N of the scaling run")
    ap.add_argument("--no-single-target", action="store_true", help="skip the (slow) single-process N=256 run")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory_pairformer"))
    args = ap.parse_args(argv)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    data = {"config": CFG, "dtype": "float32", "mode": "train", "units": "bytes (MB = 1e6 in the text)"}
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f)
        for k in ("target", "scaling"):
            if k in old:
                data[k] = old[k]
    if args.target:
        ours = parallel(256, 4)
        t = {"n": 256, "mesh": "2x2", "autocp": ours, "targets_MB": {"fwd": 106, "fwd_bwd": 458},
             "fold_cp_MB": {"fwd": 152, "fwd_bwd": 654}, "issue_single_MB": {"fwd": 674, "fwd_bwd": 2998}}
        if not args.no_single_target:
            t["single"] = single_process(256)
        elif "target" in data and "single" in data["target"]:
            t["single"] = data["target"]["single"]
        data["target"] = t
        print(f"N=256 2x2 per-rank peak: forward {ours['fwd_bytes'] / MB:.1f} MB (target 106), "
              f"forward+backward {ours['fwd_bwd_bytes'] / MB:.1f} MB (target 458)")
        if "single" in t:
            print(f"  single process: forward {t['single']['fwd_bytes'] / MB:.1f} MB, "
                  f"forward+backward {t['single']['fwd_bwd_bytes'] / MB:.1f} MB")
    if args.scaling:
        single = single_process(args.n)
        rows = [parallel(args.n, P) for P in (1, 4, 9)]
        for r in rows:
            r["ratio_fwd"] = single["fwd_bytes"] / r["fwd_bytes"]
            r["ratio_fwd_bwd"] = single["fwd_bwd_bytes"] / r["fwd_bwd_bytes"]
            print(f"N={args.n} P={r['P']}: fwd {r['fwd_bytes'] / MB:.2f} MB (ratio {r['ratio_fwd']:.2f}), "
                  f"fwd+bwd {r['fwd_bwd_bytes'] / MB:.2f} MB (ratio {r['ratio_fwd_bwd']:.2f})")
        data["scaling"] = {"n": args.n, "single": single, "autocp": rows}
    with open(args.out + ".json", "w") as f:
        json.dump(data, f, indent=1, default=float)
    _plot(data, args.out + ".png")
    print("wrote", args.out + ".json")


if __name__ == "__main__":
    main()
