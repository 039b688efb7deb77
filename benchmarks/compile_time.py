"""Compile time of the autocp front end on a Boltz-2-size trunk.

Of a 48-block Boltz-2 ``PairformerModule`` (token_s=384, token_z=128) at a small example
N: the compile stages (capture + claims: ``compile_stages``) and the whole
``autocp.parallelize`` on a 1x1 mesh (stages + sharding every graph + building the module).
Each distinct repeated block is captured once and reused for all 48 layers (a full export
of the 48 blocks takes ~30 s).

    python benchmarks/compile_time.py [--blocks 48] [--n 16] [--json out.json]
"""

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=48)
    ap.add_argument("--n", type=int, default=None, help="example N (default: the planner's, no channel width)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from boltz.model.layers.pairformer import PairformerModule

    from autocp.passes.pipeline import compile_stages, planning_n, resolve_input_tags
    from autocp.mesh import SquareMesh

    t0 = time.perf_counter()
    model = PairformerModule(384, 128, args.blocks, v2=True).eval()
    t_build = time.perf_counter() - t0
    n = args.n or planning_n(model, 8)
    inputs = (torch.randn(1, n, 384), torch.randn(1, n, n, 128), torch.ones(1, n), torch.ones(1, n, n))
    t0 = time.perf_counter()
    tags, nn_ = resolve_input_tags(model, inputs, {}, None)
    stages = compile_stages(model, inputs, {}, tags, nn_, SquareMesh.single())
    cap, plan = stages[0], stages[-1]
    t_compile = time.perf_counter() - t0
    import warnings

    import autocp
    fresh = PairformerModule(384, 128, args.blocks, v2=True).eval()  # no capture cached on it
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autocp.parallelize(fresh, SquareMesh.single(), example_inputs=inputs)
    t_par = time.perf_counter() - t0
    res = {
        "blocks": args.blocks,
        "token_s": 384,
        "token_z": 128,
        "n_example": n,
        "build_model_s": round(t_build, 3),
        "compile_stages_s": round(t_compile, 3),
        "parallelize_s": round(t_par, 3),
        "capture_s": round(cap.seconds, 3),
        "captured_nodes": cap.n_nodes,
        "block_groups": {g: len(b.paths) for g, b in cap.blocks.items()},
        "modules_as_2d_ops": sum(1 for a in plan.actions.values() if a.action == "op"),
        "fallbacks": sum(1 for a in plan.actions.values() if a.action == "fallback"),
        "target_s": 5.0,
    }
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
