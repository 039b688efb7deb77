"""Train a random-weight Boltz-2 trunk (MSA module + Pairformer) a few AdamW steps on a
2x2 mesh, next to the same model on one device.

    python examples/05_train_steps.py --p 2 --steps 5

No extra call after ``loss.backward()``: the parallel modules reduce their gradients
themselves (bucketed all-reduce, docs/training.md). Activation checkpointing is on.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

CM, CZ, CS, N, S = 8, 8, 16, 9, 5


def build(seed=0):
    from boltz.model.layers.pairformer import PairformerModule
    from boltz.model.modules.trunkv2 import MSAModule

    msa = MSAModule(msa_s=CM, token_z=CZ, token_s=CS, msa_blocks=1, msa_dropout=0.0, z_dropout=0.0,
                    pairwise_head_width=4, pairwise_num_heads=2, activation_checkpointing=True)
    pf = PairformerModule(CS, CZ, 2, num_heads=2, pairwise_head_width=4, pairwise_num_heads=2, dropout=0.0,
                          activation_checkpointing=True, v2=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # Boltz zero-inits output projections: re-draw every weight
        for m in (msa, pf):
            for prm in m.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    return msa.train(), pf.train()


def inputs(seed=1):
    from boltz.data import const

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, N, N, CZ, generator=g)
    s = torch.randn(1, N, CS, generator=g)
    mask = torch.ones(1, N)
    mask[0, -1] = 0
    feats = {"msa": torch.randint(0, const.num_tokens, (1, S, N), generator=g),
             "has_deletion": (torch.rand(1, S, N, generator=g) > 0.7).float(),
             "deletion_value": torch.rand(1, S, N, generator=g),
             "msa_paired": (torch.rand(1, S, N, generator=g) > 0.5).float(),
             "msa_mask": torch.ones(1, S, N, dtype=torch.long), "token_pad_mask": mask.long()}
    return z, s, mask, mask[:, :, None] * mask[:, None, :], feats


def step_loss(msa, pf, z, s, mask, pair_mask, feats):
    # reentrant checkpoint needs an input that requires grad
    z = z.clone().requires_grad_()
    z = z + msa(z, s, feats)
    s_out, z_out = pf(s, z, mask, pair_mask)
    return (s_out ** 2).mean() + (z_out ** 2).mean()


def run(rank, world, steps):
    import autocp

    mesh = autocp.init_mesh() if world > 1 else None
    msa, pf = build()
    ref = [copy.deepcopy(msa), copy.deepcopy(pf)]
    z, s, mask, pair_mask, feats = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmsa = autocp.parallelize(msa, mesh, example_inputs=(z, s, feats)).train()
        ppf = autocp.parallelize(pf, mesh, example_inputs=(s, z, mask, pair_mask)).train()
    opt = torch.optim.AdamW(list(pmsa.parameters()) + list(ppf.parameters()), lr=1e-3)
    ref_opt = torch.optim.AdamW(list(ref[0].parameters()) + list(ref[1].parameters()), lr=1e-3)
    rows = []
    for _ in range(steps):
        for mods, o, col in (((pmsa, ppf), opt, 0), (ref, ref_opt, 1)):
            o.zero_grad(set_to_none=True)
            loss = step_loss(*mods, z, s, mask, pair_mask, feats)
            loss.backward()  # parallel: gradients already complete here
            o.step()
            if col == 0:
                rows.append([float(loss)])
            else:
                rows[-1].append(float(loss))
    stats = [pmsa.grad_reducer.last_stats, ppf.grad_reducer.last_stats]
    return rows, stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    from autocp.testing import run_distributed

    world = a.p * a.p
    rows, stats = run_distributed(run, world, a.steps, timeout=600)[0] if world > 1 else run(0, 1, a.steps)
    print(f"{'step':>4} {a.p}x{a.p} loss{'':>10} single-device loss   rel diff")
    for i, (lp, l1) in enumerate(rows, 1):
        print(f"{i:>4} {lp:>18.8f} {l1:>18.8f}   {abs(lp - l1) / abs(l1):.2e}")
    print(f"gradient reduction per step (MSA, Pairformer): {stats}")


if __name__ == "__main__":
    main()
