"""Per-rank peak memory of the WHOLE Boltz-2 inference (trunk, MSA, templates, diffusion
sampling, confidence, affinity) through autocp, P = 1 / 4 / 9, with a per-module table.

    bash scripts/install_boltz_full.sh
    python benchmarks/memory_e2e.py [--n 64] [--worlds 1 4 9] [--steps 10]
        [--tt-depth 24 --tt-heads 2] [--token-bias auto|lazy|resident]

A tiny random-weight Boltz-2 (autocp.models.boltz_full) on a synthetic 2-chain complex +
ligand. Memory: ``autocp.MemoryTracker`` (live tensor storages on this rank, parameters and
input features included) around a no-grad forward; per top-level module the peak while it
ran (the tracker's peak reset at its entry). The single-device numbers are the original
model on one process. Writes JSON + PNG to benchmarks/results/memory_e2e.{json,png}.
"""

import argparse
import json
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from autocp.testing import run_distributed  # noqa: E402

MiB = 2.0 ** 20
MODULES = ("input_embedder", "msa_module", "template_module", "pairformer_module", "distogram_module",
           "diffusion_conditioning", "structure_module.score_model", "confidence_module", "affinity_module")


def _hooks(root, mt, table):
    handles = []
    for name in MODULES:
        try:
            mod = root.get_submodule(name)
        except AttributeError:
            continue

        def pre(m, a, kw=None, name=name):
            table.setdefault(name, {"peak": 0, "outer": mt.peak_bytes, "delta": 0})
            table[name]["entry"] = mt.live_bytes
            table[name]["outer"] = max(table[name]["outer"], mt.peak_bytes)
            mt.peak_bytes = mt.live_bytes

        def post(m, a, out, name=name):
            table[name]["peak"] = max(table[name]["peak"], mt.peak_bytes)
            table[name]["delta"] = max(table[name]["delta"], mt.peak_bytes - table[name]["entry"])
            mt.peak_bytes = max(mt.peak_bytes, table[name]["outer"])

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    return handles


def worker(rank, world, n, steps, min_chunk=None, overrides=None, token_bias="auto"):
    import autocp
    from autocp.models.boltz_full import make_features, tiny_boltz2

    model = tiny_boltz2(seed=0, **(overrides or {}))
    feats = make_features(n, seed=0)
    kw = dict(recycling_steps=0, num_sampling_steps=steps, diffusion_samples=1, max_parallel_samples=1)
    res = {"n": n, "world": world}
    feat_tensors = [v for v in feats.values() if isinstance(v, torch.Tensor)]
    if world == 1:
        table = {}
        with torch.no_grad(), autocp.chunking(min_bytes=min_chunk), autocp.MemoryTracker(track=[*model.parameters(), *feat_tensors]) as mt:
            hs = _hooks(model, mt, table)
            torch.manual_seed(0)
            t0 = time.time()
            model(dict(feats), **kw)
            res["single_s"] = round(time.time() - t0, 2)
            for h in hs:
                h.remove()
        res["single_peak"] = mt.peak_bytes
        res["single_modules"] = {k: v["peak"] for k, v in table.items()}
        res["single_deltas"] = {k: v["delta"] for k, v in table.items()}
        res["single_entries"] = {k: v["entry"] for k, v in table.items()}
    mesh = autocp.init_mesh()
    pm = autocp.parallelize(model, mesh, options=dict(token_bias=token_bias))
    res["token_bias"] = pm.token_bias
    table = {}
    tiles = pm.distribute_features(feats)  # this rank's tiles; the whole dict is dropped (sharded data loading)
    del feats
    with torch.no_grad(), warnings.catch_warnings(), autocp.chunking(min_bytes=min_chunk):
        warnings.simplefilter("ignore")
        leaves = [t.local if hasattr(t, "local") else t for t in tiles.values() if isinstance(t, torch.Tensor)]
        with autocp.MemoryTracker(track=[*model.parameters(), *leaves]) as mt:
            hs = _hooks(pm.inner, mt, table)
            torch.manual_seed(0)
            t0 = time.time()
            pm(tiles, **kw, output="tiles")  # outputs stay tiles: a whole-tensor gather is O(N^2) by definition
            res["rank_s"] = round(time.time() - t0, 2)
            for h in hs:
                h.remove()
    res["rank_peak"] = mt.peak_bytes
    res["rank_modules"] = {k: v["peak"] for k, v in table.items()}
    res["rank_deltas"] = {k: v["delta"] for k, v in table.items()}
    res["rank_entries"] = {k: v["entry"] for k, v in table.items()}  # live at entry (score model: the resident bias)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 4, 9])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--min-chunk-mib", type=float, default=None,
                    help="autocp.chunking(min_bytes=...) for the 2D ops (default: the library default, 16 MiB)")
    ap.add_argument("--tt-depth", type=int, default=None, help="score model token_transformer_depth (tiny: 1; "
                    "released Boltz-2: 24)")
    ap.add_argument("--tt-heads", type=int, default=None, help="token_transformer_heads (tiny: 2; released: 16)")
    ap.add_argument("--token-bias", default="auto", choices=("auto", "lazy", "resident"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "memory_e2e.json"))
    args = ap.parse_args()
    min_chunk = None if args.min_chunk_mib is None else int(args.min_chunk_mib * MiB)
    sm = {k: v for k, v in (("token_transformer_depth", args.tt_depth), ("token_transformer_heads", args.tt_heads))
          if v is not None}
    overrides = {"score_model_args": sm} if sm else {}
    wargs = (args.n, args.steps, min_chunk, overrides, args.token_bias)
    rows = {}
    for w in args.worlds:
        res = run_distributed(worker, w, *wargs, timeout=3000)
        rows[w] = res
        print(f"P={w}: per-rank peak MiB {[round(r['rank_peak'] / MiB, 2) for r in res]}, "
              f"time {max(r['rank_s'] for r in res)} s")
    single = rows[1][0] if 1 in rows else run_distributed(worker, 1, *wargs, timeout=3000)[0]
    out = {"n": args.n, "steps": args.steps, "min_chunk_mib": args.min_chunk_mib, "score_model_overrides": sm,
           "token_bias": single["token_bias"], "single_peak_MiB": round(single["single_peak"] / MiB, 2),
           "single_s": single["single_s"], "worlds": {}}
    print(f"\nN={args.n}, single device peak {out['single_peak_MiB']} MiB ({single['single_s']} s)")
    hdr = "| module | single MiB | " + " | ".join(f"P={w} max rank MiB (ratio)" for w in args.worlds) + " |"
    print(hdr)
    print("|" + "---|" * (2 + len(args.worlds)))
    for name in MODULES:
        if name not in single["single_modules"]:
            continue
        sm = single["single_modules"][name] / MiB
        cells = []
        for w in args.worlds:
            mr = max(r["rank_modules"].get(name, 0) for r in rows[w]) / MiB
            cells.append(f"{mr:.2f} ({sm / mr if mr else float('nan'):.2f})")
        print(f"| {name} | {sm:.2f} | " + " | ".join(cells) + " |")
    print("\nper-module increment (peak while it ran minus what was live at its entry: the module's own "
          "temporaries and outputs, without the resident parameters / features / trunk outputs)")
    print(hdr.replace("single MiB", "single increment MiB"))
    print("|" + "---|" * (2 + len(args.worlds)))
    for name in MODULES:
        if name not in single["single_deltas"]:
            continue
        sm = single["single_deltas"][name] / MiB
        cells = []
        for w in args.worlds:
            mr = max(r["rank_deltas"].get(name, 0) for r in rows[w]) / MiB
            cells.append(f"{mr:.2f} ({sm / mr if mr else float('nan'):.2f})")
        print(f"| {name} | {sm:.2f} | " + " | ".join(cells) + " |")
    for w in args.worlds:
        mx = max(r["rank_peak"] for r in rows[w]) / MiB
        out["worlds"][w] = {"rank_peak_MiB": [round(r["rank_peak"] / MiB, 2) for r in rows[w]],
                            "ratio": round(out["single_peak_MiB"] / mx, 2), "rank_s": max(r["rank_s"] for r in rows[w]),
                            "modules_MiB": {k: round(max(r["rank_modules"].get(k, 0) for r in rows[w]) / MiB, 2)
                                            for k in MODULES if k in single["single_modules"]},
                            "module_increments_MiB": {k: round(max(r["rank_deltas"].get(k, 0) for r in rows[w]) / MiB, 2)
                                                      for k in MODULES if k in single["single_deltas"]},
                            "module_entries_MiB": {k: round(max(r["rank_entries"].get(k, 0) for r in rows[w]) / MiB, 2)
                                                   for k in MODULES if k in single["single_entries"]}}
        print(f"whole model P={w}: max rank {mx:.2f} MiB, single / max rank = {out['worlds'][w]['ratio']} (ideal {w})")
    out["single_modules_MiB"] = {k: round(v / MiB, 2) for k, v in single["single_modules"].items()}
    out["single_module_increments_MiB"] = {k: round(v / MiB, 2) for k, v in single["single_deltas"].items()}
    out["single_module_entries_MiB"] = {k: round(v / MiB, 2) for k, v in single["single_entries"].items()}
    sk = "structure_module.score_model"
    if sk in single["single_entries"]:
        print(f"live at score-model entry (resident through sampling; autocp token_bias={single['token_bias']}): Boltz "
              f"{out['single_module_entries_MiB'][sk]} MiB, " + ", ".join(
                  f"P={w} {out['worlds'][w]['module_entries_MiB'][sk]} MiB" for w in args.worlds))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [k for k in MODULES if k in single["single_modules"]]
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / (1 + len(args.worlds))
        xs = range(len(names))
        ax.bar([x - 0.4 + width / 2 for x in xs], [out["single_modules_MiB"][k] for k in names], width,
               label="single device")
        for i, w in enumerate(args.worlds):
            ax.bar([x - 0.4 + width * (i + 1.5) for x in xs], [out["worlds"][w]["modules_MiB"][k] for k in names],
                   width, label=f"P={w} (max rank)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("peak MiB")
        ax.set_title(f"Boltz-2 (tiny) whole inference, N={args.n}: per-module peak")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out.replace(".json", ".png"), dpi=110)
    except Exception as e:  # noqa: BLE001
        print("plot skipped:", e)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
