"""Train with tiles in and tiles out -- the only mode that exists at scale -- a few AdamW
steps of an unmodified Boltz-2 Pairformer on a p x p mesh, next to the same model on one
device.

    python examples/06_train_tiles.py --p 2 --steps 5 --tokens 13

At 30,000 tokens no rank can hold a whole ``z`` (460 GB in fp32), so each rank

1. holds only its tiles: ``z[T_r, T_c]`` (Pair2D), ``s[T_r]`` (RowToken), as DTensors
   (``layout.to_dtensor(tile, mesh, N)``; here cut from a whole tensor for the comparison,
   in a real run loaded or produced tile by tile);
2. calls the parallel module with ``output="local"``: this rank's padded tiles out;
3. computes the loss on the tiles with :func:`autocp.tile_sum` (every element
   counted once, padding ignored, one all-reduce per mesh axis): a scalar replicated on
   every rank;
4. ``loss.backward()``; ``opt.step()`` -- the gradients are the single-device ones
   (DTensor's convention for replicated values + automatic gradient reduction).
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

CS, CZ = 16, 8


def build(seed=0):
    from boltz.model.layers.pairformer import PairformerModule

    pf = PairformerModule(CS, CZ, 2, num_heads=2, pairwise_head_width=4, pairwise_num_heads=2, dropout=0.0, v2=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # Boltz zero-inits output projections: re-draw every weight
        for prm in pf.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    return pf.train()


def data(n, seed=1):
    """Whole inputs and regression targets (a masked token: tokens can be padding)."""
    g = torch.Generator().manual_seed(seed)
    s, z = torch.randn(1, n, CS, generator=g), torch.randn(1, n, n, CZ, generator=g)
    mask = torch.ones(1, n)
    mask[0, -2] = 0
    pair_mask = mask[:, :, None] * mask[:, None, :]
    s_target, z_target = torch.randn(1, n, CS, generator=g), torch.randn(1, n, n, CZ, generator=g)
    return (s, z, mask, pair_mask), (s_target, z_target)


def loss_whole(s_out, z_out, mask, pair_mask, s_target, z_target):
    """The single-device loss: masked mean squared errors of s and z."""
    ls = (((s_out - s_target) ** 2) * mask[..., None]).sum() / (mask.sum() * CS)
    lz = (((z_out - z_target) ** 2) * pair_mask[..., None]).sum() / (pair_mask.sum() * CZ)
    return ls + lz


def loss_tiles(s_out, z_out, mask, pair_mask, s_target, z_target, mesh, n):
    """The same loss on this rank's padded tiles: tile_sum counts each element once."""
    from autocp import Pair2D, RowToken, tile_sum

    count_s = tile_sum(mask, RowToken(), mesh, n) * CS
    count_z = tile_sum(pair_mask, Pair2D(), mesh, n) * CZ
    ls = tile_sum(((s_out - s_target) ** 2) * mask[..., None], RowToken(), mesh, n) / count_s
    lz = tile_sum(((z_out - z_target) ** 2) * pair_mask[..., None], Pair2D(), mesh, n) / count_z
    return ls + lz


def run(rank, world, steps, n):
    import autocp
    from autocp import Pair2D, RowToken

    mesh = autocp.SquareMesh.from_any(autocp.init_mesh())
    model = build()
    ref = copy.deepcopy(model)
    (s, z, mask, pair_mask), (s_t, z_t) = data(n)
    lays = [RowToken(), Pair2D(), RowToken(), Pair2D()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=(s, z, mask, pair_mask), input_layouts=lays)
    # this rank's tiles (padded to ceil(N/p)); nothing whole is kept below
    tiles = [lay.shard(x, mesh).contiguous() for x, lay in zip((s, z, mask, pair_mask), lays)]
    targets = [RowToken().shard(s_t, mesh).contiguous(), Pair2D().shard(z_t, mesh).contiguous()]
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    rows = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        s_out, z_out = pm(*[lay.to_dtensor(t, mesh, n) for t, lay in zip(tiles, lays)], output="local")
        loss = loss_tiles(s_out, z_out, tiles[2], tiles[3], *targets, mesh, n)
        loss.backward()  # parameter gradients complete on every rank
        opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_loss = loss_whole(*ref(s, z, mask, pair_mask), mask, pair_mask, s_t, z_t)
        ref_loss.backward()
        if not rows:  # parameters whose true gradient is zero (rounding noise only)
            gtop = max(float(p.grad.abs().max()) for p in ref.parameters())
            zero_grad = {k: float(p.grad.abs().max()) <= 1e-6 * gtop for k, p in ref.named_parameters()}
        ref_opt.step()
        rows.append((float(loss), float(ref_loss)))
    params = {k: p.detach() for k, p in pm.named_parameters()}
    top = max(float(p.abs().max()) for p in ref.parameters())
    errs = {k: float((params[k] - p.detach()).abs().max()) / max(float(p.abs().max()), 1e-3 * top)
            for k, p in ref.named_parameters()}
    # a softmax-invariant LayerNorm bias (Boltz's attention proj_z.0.bias) has an exactly-zero
    # true gradient: Adam turns its float noise into +-lr steps on any summation order
    noise = sorted(k for k in errs if zero_grad[k])
    return rows, max(v for k, v in errs.items() if k not in noise), noise


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=13)
    a = ap.parse_args()
    from autocp.testing import run_distributed

    rows, perr, noise = run_distributed(run, a.p * a.p, a.steps, a.tokens, timeout=900)[0]
    print(f"{'step':>4} {a.p}x{a.p} tile-I/O loss{'':>4} single-device loss   rel diff")
    for i, (lp, l1) in enumerate(rows, 1):
        print(f"{i:>4} {lp:>20.8f} {l1:>18.8f}   {abs(lp - l1) / abs(l1):.2e}")
    print(f"parameters after {a.steps} steps: max relative difference {perr:.2e} (all but {noise}: zero true "
          f"gradient, Adam-amplified rounding noise)")


if __name__ == "__main__":
    main()
