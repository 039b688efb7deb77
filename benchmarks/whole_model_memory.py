"""The whole Boltz-2 prediction: per-rank memory estimated (``autocp.models.boltz_estimate``)
and, at small N, measured.

    python benchmarks/whole_model_memory.py [--only validate scale fit] [--out benchmarks/results]

* validate: the whole-model estimate against the measured per-rank peak of the same
  prediction (live-tensor tracker on rank (0, 1) of a real p x p gloo run: parameters,
  this rank's feature tiles and everything the prediction allocates; outputs kept as
  tiles) at N = 128 and 256 on 2x2 and 3x3, fp32. The model: the released widths
  (token_s 384, token_z 128, atom_s 128, atom_z 16, MSA 64, templates 64, 16 / 4 heads)
  at reduced depths (1 block per stack, 2 token-transformer layers) so the CPU run ends;
  the estimate runs the same model. Features: Boltz's featurizer keys of a 2-chain +
  ligand complex (``make_features``), 32 MSA rows, 1 recycling step, 3 sampling steps.
* scale: the released Boltz-2 (``released_boltz2_config``: 64 Pairformer blocks) at
  N = 30,000 on 8x8, bf16-mixed, 1 and 5 samples: per-module table.
* fit: estimates at N = 10k / 20k / 30k on 8x8 and 60k on 16x16; one least-squares fit
  ``peak = a ceil(N/p)^2 + c N + d`` over them (what a rank holds depends on its tile side
  and N only); the largest N whose fitted peak fits 20 / 40 / 80 GiB on 8x8 and 16x16,
  and a plot.

Recycling / sampling steps: the estimate of the scale / fit runs uses 1 recycling step
and 2 sampling steps; every recycling pass and every sampling step frees what the
previous one allocated, so the peak does not depend on their count (checked at small N by
``validate``'s ``steps`` rows: the estimate at 1 vs 3 recycling and 2 vs 6 sampling steps).

Writes ``whole_model_memory.json`` and ``whole_model_memory.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from plotting import pyplot  # noqa: E402 -- benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def small_config() -> dict:
    """Released widths, 1 block per stack (see the module doc)."""
    from autocp.models.boltz_estimate import released_boltz2_config

    return released_boltz2_config(
        pairformer_args={"num_blocks": 1}, msa_args={"msa_blocks": 1}, template_args={"template_blocks": 1},
        score_model_args={"token_transformer_depth": 2, "atom_encoder_depth": 1, "atom_decoder_depth": 1},
        embedder_args={"atom_encoder_depth": 1},
        confidence_model_args={"pairformer_args": {"num_blocks": 1}},
    )


KW = dict(recycling_steps=1, sampling_steps=3, diffusion_samples=1, max_parallel_samples=1)
MSA_ROWS = 32


def measure_worker(rank, world, n):
    """Rank (0, 1)'s peak of the real prediction (live tensors, parameters and tiles counted)."""
    import autocp
    from autocp.models.boltz_estimate import PredictShape, measure_boltz
    from autocp.models.boltz_full import make_features, tiny_boltz2

    model = tiny_boltz2(seed=0, **small_config())
    feats = make_features(n, seed=0, msa_depth=MSA_ROWS)
    atoms = int(feats["atom_pad_mask"].shape[1])
    mesh = autocp.init_mesh()
    peak = measure_boltz(model, feats, PredictShape(n, n_atoms=atoms, msa_rows=MSA_ROWS, n_templates=1, **KW), mesh)
    return {"coord": mesh.coord, "peak": peak, "atoms": atoms}


def estimate_small(n, p, atoms, **kw):
    import torch

    from autocp.models.boltz_estimate import PredictShape, estimate_boltz

    shape = PredictShape(n, n_atoms=atoms, msa_rows=MSA_ROWS, n_templates=1, **{**KW, **kw})
    return estimate_boltz(shape=shape, p=p, dtype=torch.float32, config=small_config())


def validate(res):
    from autocp.testing import run_distributed

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for n in (128, 256):
        for p in (2, 3):
            t = time.time()
            meas = run_distributed(measure_worker, p * p, n, timeout=3000)
            got = next(r for r in meas if tuple(r["coord"]) == (0, 1))
            t1 = time.time()
            e = estimate_small(n, p, got["atoms"])
            err = (e.peak_bytes - got["peak"]) / got["peak"]
            row = {"n": n, "p": p, "atoms": got["atoms"], "measured_bytes": got["peak"], "estimated_bytes": e.peak_bytes,
                   "rel_error": err, "measure_s": t1 - t, "estimate_s": time.time() - t1,
                   "per_module": {k: v["peak_bytes"] for k, v in e.per_module.items()}}
            print(f"validate N={n} {p}x{p}: measured {got['peak'] / 2**20:.1f} MiB, estimated "
                  f"{e.peak_bytes / 2**20:.1f} MiB ({100 * err:+.2f}%)", flush=True)
            rows.append(row)
    steps = []
    base = estimate_small(128, 2, rows[0]["atoms"]).peak_bytes
    for kw in ({"recycling_steps": 3}, {"sampling_steps": 6}):
        other = estimate_small(128, 2, rows[0]["atoms"], **kw).peak_bytes
        steps.append({"change": kw, "peak": other, "base": base})
        print(f"steps: {kw}: {other / 2**20:.2f} MiB vs {base / 2**20:.2f} MiB", flush=True)
    res["validate"] = rows
    res["steps"] = steps


def scale(res, n=30000, p=8):
    out = []
    for samples in (1, 5):
        t = time.time()
        e = _peak(n, p, samples)
        print(e.table("GiB"), flush=True)
        out.append({"n": n, "p": p, "samples": samples, "peak_bytes": e.peak_bytes, "params_bytes": e.params_bytes,
                    "seconds": time.time() - t, "details": {k: v for k, v in e.details.items() if k != "shape"},
                    "per_module": {k: {"peak_bytes": v["peak_bytes"], "own_bytes": v["transient_bytes"]}
                                   for k, v in e.per_module.items()},
                    "large": [list(x) for x in e.details.get("large", [])]})
    res["scale"] = out


def _peak(n, p, samples=1):
    import torch

    from autocp.models.boltz_estimate import PredictShape, estimate_boltz

    shape = PredictShape(n, recycling_steps=1, sampling_steps=2, diffusion_samples=samples,
                         max_parallel_samples=samples)
    return estimate_boltz(shape=shape, p=p, dtype=torch.bfloat16)


FIT_GRID = {8: (10000, 20000, 30000), 16: (60000,)}
BUDGETS_GIB = (20, 40, 80)


def _features(n, p):
    return [float(-(-n // p)) ** 2, float(n), 1.0]


def fit(res, only_known: bool = False):
    """Per-rank peak at a few (N, p); the largest N under each budget from one least-squares
    fit of ``peak = a b^2 + c N + d`` over all points (b = ceil(N / p): pair tiles; N: token
    and atom features; d: parameters), since what a rank holds depends on (b, N) only.
    ``only_known``: fit the points already in the JSON (no new estimates)."""
    import numpy as np

    known = {(r["n"], r["p"]): r["peak_bytes"] for r in res.get("scale", []) if r["samples"] == 1}
    if only_known:  # else every point is estimated again (an earlier run's figures may be stale)
        known = {**{(q["n"], q["p"]): q["peak_bytes"] for q in res.get("fit", {}).get("points", [])}, **known}
    if not only_known:
        for p, grid in FIT_GRID.items():
            for n in grid:
                if (n, p) not in known:
                    t = time.time()
                    known[(n, p)] = _peak(n, p).peak_bytes
                    print(f"fit: N={n} {p}x{p}: {known[(n, p)] / GIB:.2f} GiB ({time.time() - t:.0f} s)", flush=True)
    pts = [{"n": n, "p": p, "peak_bytes": b} for (n, p), b in sorted(known.items())]
    xs = np.array([_features(q["n"], q["p"]) for q in pts])
    ys = np.array([q["peak_bytes"] for q in pts], dtype=float)
    coef = np.linalg.lstsq(xs, ys, rcond=None)[0]
    resid = {f"{q['n']}@{q['p']}x{q['p']}": float(coef @ _features(q["n"], q["p"]) / q["peak_bytes"] - 1) for q in pts}
    largest = {}
    for p in (8, 16):
        for budget in BUDGETS_GIB:
            lo, hi = 0, 1
            while hi < 10**7 and coef @ _features(hi, p) <= budget * GIB:
                lo, hi = hi, hi * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if coef @ _features(mid, p) <= budget * GIB else (lo, mid)
            largest[f"{p}x{p}@{budget}GiB"] = lo
            print(f"largest N on {p}x{p} within {budget} GiB per rank: {lo:,}", flush=True)
    res["fit"] = {"points": pts, "largest_n": largest, "coef_a_b2_c_n_d": [float(c) for c in coef],
                  "fit_rel_error": resid, "model": "peak = a*ceil(N/p)^2 + c*N + d (least squares over the points)"}
    _plot(res, coef)


def _plot(res, coef=None):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    import numpy as np

    for p, color in ((8, "C0"), (16, "C1")):
        pts = sorted((q["n"], q["peak_bytes"] / GIB) for q in res["fit"]["points"] if q["p"] == p)
        if pts:
            ax.plot([a for a, _ in pts], [b for _, b in pts], "o", color=color, label=f"{p}x{p}: estimated")
        if coef is not None:
            ns = np.linspace(2000, 80000, 80)
            ax.plot(ns, [coef @ _features(int(n), p) / GIB for n in ns], "-", color=color, lw=1,
                    label=f"{p}x{p}: fit a b^2 + c N + d")
    for budget in BUDGETS_GIB:
        ax.axhline(budget, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("tokens N (9 atoms per token, 8192 MSA rows)")
    ax.set_ylabel("per-rank peak, GiB (bf16-mixed)")
    ax.set_title("whole Boltz-2 prediction, 1 sample: autocp.models.boltz_estimate")
    ax.legend()
    fig.tight_layout()
    out = Path(res["_out"]) / "whole_model_memory.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=["validate", "scale", "fit"], choices=["validate", "scale", "fit"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--fit-known", action="store_true", help="fit: only the points already in the JSON")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "whole_model_memory.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if "validate" in args.only:
        validate(res)
    if "scale" in args.only:
        scale(res)
    res["_out"] = str(out)
    if "fit" in args.only:
        fit(res, only_known=args.fit_known)
    res.pop("_out", None)
    res["machine"] = "2-core CPU, FakeTensor estimate; measured: gloo, live-tensor tracker"
    path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
