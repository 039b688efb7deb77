"""Tile-I/O gradient parity table (issue [tile-io]): per output layout, that output's
cotangent alone (and all together) -> the worst parameter / input gradient error against
the single-device model, on 2x2 and 3x3 meshes of CPU processes.

Models: a Boltz-2 ``PairformerModule`` (RowToken s, Pair2D z out), Boltz-2
``PairWeightedAveraging`` (MsaTiles out) and a probe module with every block-level layout
at once (Pair2D, RowToken, ColToken, a replicated scalar); the cases are those of
``tests/training/test_tile_io.py`` (DTensor tiles in, ``output="local"``, cotangent padding
filled with garbage). Errors are relative to each gradient's scale, floored at 1e-3 of the
largest gradient (``param``), and, unfloored, excluding the parameters whose true gradient
is exactly zero (``param*``: softmax-invariant LayerNorm biases, |g| <= 1e-6 max|g|).

    python benchmarks/tile_io_parity.py

Writes ``benchmarks/results/tile_io_parity.json``.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

MODELS = [("pairformer", 13, ["s (RowToken)", "z (Pair2D)"]), ("pwa", 7, ["m (MsaTiles)"]),
          ("heads", 7, ["z (Pair2D)", "row (RowToken)", "col (ColToken)", "scalar (Replicated)", "z^T (Pair2D((2, 1)))"])]


def main():
    from autocp.testing import run_distributed
    from tests.training import _tile_workers as W

    rows = []
    for world in (4, 9):
        for kind, n, names in MODELS:
            res = run_distributed(W.tile_parity_worker, world, kind, n, "local", timeout=900)
            for case in res[0]["cases"]:
                c = [r["cases"][case] for r in res]
                label = "all together" if len(case) > 1 else names[case[0]]
                row = {"mesh": f"{int(world ** 0.5)}x{int(world ** 0.5)}", "model": kind, "n": n, "cotangent": label,
                       "param_err": max(x["param_err"] for x in c),
                       "param_err_nonzero": max(x["param_err_nonzero"] for x in c),
                       "input_err": max(max(x["in_err"].values()) for x in c),
                       "out_err": max(x["out_err"] for x in c)}
                rows.append(row)
                print(f"| {row['mesh']} | {kind} N={n} | {label} | {row['param_err']:.1e} | "
                      f"{row['param_err_nonzero']:.1e} | {row['input_err']:.1e} | {row['out_err']:.1e} |", flush=True)
    out = os.path.join(ROOT, "benchmarks", "results", "tile_io_parity.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
