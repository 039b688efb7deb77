"""Plan memory for a large complex without any device: per-rank peak of a Boltz-2
Pairformer at token length N on p x p meshes, and the smallest mesh that fits a GPU.

    python examples/03_plan_memory.py                       # N=30,000 on 8x8 (64 GPUs)
    python examples/03_plan_memory.py --n 2048 --mesh 2 4 --gpu-gib 80 --train

The numbers come from FakeTensor runs of the parallelized model (``autocp.estimate``):
the model is captured at N on fake tensors and the tile program of rank (0, 1) runs with
autocp's real 2D ops (their chunks, ring and receive buffers; communication simulated).
Nothing is allocated, so N=30,000 is fine on a laptop. ``--bf16`` also keeps the glue's pair
tensors in bf16 (``pair_dtype``). Checked against measured peaks in
tests/compiler/test_estimate.py (forward) and tests/compiler/test_explain_estimate.py
(forward + backward): equal.
"""

import argparse

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--token-s", type=int, default=384)
    ap.add_argument("--token-z", type=int, default=128)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--mesh", type=int, nargs="+", default=[8], help="mesh sides p to print (p x p)")
    ap.add_argument("--max-p", type=int, default=8, help="largest p tried for 'smallest mesh that fits'")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--train", action="store_true", help="forward + backward (one training step)")
    ap.add_argument("--fit", action="store_true", help="also search the smallest p x p mesh that fits "
                    "--gpu-gib (one fake run per p: minutes at N=30,000 on a CPU)")
    args = ap.parse_args()
    from boltz.model.layers.pairformer import PairformerModule

    from autocp.api import estimate

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = PairformerModule(args.token_s, args.token_z, args.blocks, v2=True).train(args.train)
    what = "forward+backward" if args.train else "forward"
    print(f"Boltz-2 Pairformer, {args.blocks} block(s), token_s={args.token_s}, token_z={args.token_z}, "
          f"N={args.n:,}, {what}, {dtype}")
    for p in args.mesh:
        e = estimate(model, n_tokens=args.n, mesh_shape=(p, p), dtype=dtype, backward=args.train,
                     pair_dtype=dtype if args.bf16 else None)
        print(f"  {p}x{p} mesh ({p * p:3d} devices): per-rank peak {e.peak_bytes / 2**30:8.3f} GiB")
        print("\n".join("      " + line for line in e.table().splitlines()[1:]))
    if not args.fit:
        return
    e = estimate(model, n_tokens=args.n, mesh_shape=(args.mesh[0],) * 2, dtype=dtype, backward=args.train,
                 pair_dtype=dtype if args.bf16 else None, device_bytes=int(args.gpu_gib * 2**30), max_p=args.max_p)
    if e.fits:
        print(f"smallest square mesh within {args.gpu_gib} GiB per device: {e.fits[0]}x{e.fits[1]}")
    else:
        print(f"no mesh up to {args.max_p}x{args.max_p} fits {args.gpu_gib} GiB per device")


if __name__ == "__main__":
    main()
