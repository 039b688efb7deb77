"""Fold a synthetic 2-chain protein complex + ligand with the WHOLE Boltz-2 model on a 2x2
mesh and write the sampled coordinates as a PDB file.

    bash scripts/install_boltz_full.sh                      # once: the whole-model deps
    python examples/04_fold_complex.py                      # 2x2 gloo mesh on CPU (4 processes)
    python examples/04_fold_complex.py --world 9 --n 40     # 3x3
    torchrun --nproc-per-node 4 examples/04_fold_complex.py --torchrun   # under torchrun

The model is a tiny random-weight Boltz-2 (``autocp.models.boltz_full.tiny_boltz2``; load
real weights with ``Boltz2.load_from_checkpoint`` and pass the model the same way) and the
features a seeded synthetic complex (``make_features``). ``autocp.parallelize`` routes a
``Boltz1`` / ``Boltz2`` instance to its whole-model driver (``autocp.models.boltz_e2e``):
Boltz's own forward -- recycling, sampling loop, confidence, affinity -- runs on 2D tiles.
Rank 0 also runs the single-device model and prints the differences (fixed seed: the same
noise is drawn). Random weights fold nothing meaningful: this shows the mechanics.
"""

import argparse
import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_pdb(path, coords, feats):
    """A minimal PDB: one ATOM / HETATM record per real atom, residues and chains from the
    token features (Boltz's own writer needs a parsed ``Structure``, which a synthetic
    feature dict does not have)."""
    from boltz.data import const  # the residue names of Boltz's token vocabulary

    a2t = feats["atom_to_token"][0].float().argmax(-1)
    pad = feats["atom_pad_mask"][0].bool()
    res = feats["res_type"][0].argmax(-1)
    asym = feats["asym_id"][0]
    mol = feats["mol_type"][0]
    resi = feats["residue_index"][0]
    lines, serial = [], 1
    for a in range(coords.shape[0]):
        if not pad[a]:
            continue
        t = int(a2t[a])
        name = const.tokens[int(res[t])] if int(mol[t]) == 0 else "LIG"
        rec = "ATOM  " if int(mol[t]) == 0 else "HETATM"
        chain = chr(ord("A") + int(asym[t]) % 26)
        x, y, z = (float(v) for v in coords[a])
        lines.append(f"{rec}{serial:5d}  C   {name[:3]:>3s} {chain}{int(resi[t]) + 1:4d}    "
                     f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C")
        serial += 1
    lines.append("END")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return serial - 1


def fold(rank, world, n, steps, out_path):
    import autocp
    from autocp.models.boltz_full import make_features, tiny_boltz2

    model = tiny_boltz2(seed=0)
    feats = make_features(n, seed=0)  # 2 protein chains + a ligand, MSA and a template
    kw = dict(recycling_steps=1, num_sampling_steps=steps, diffusion_samples=1, max_parallel_samples=1)
    mesh = autocp.init_mesh()
    pm = autocp.parallelize(model, mesh, strict=True)  # strict: no pair tensor gathered anywhere
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        out = pm(dict(feats), **kw)
    report = {}
    if rank == 0:
        torch.manual_seed(0)
        with torch.no_grad():
            ref = model(dict(feats), **kw)
        for k in ("pdistogram", "z", "sample_atom_coords", "plddt", "pae", "ptm", "iptm", "affinity_pred_value"):
            report[k] = float((out[k] - ref[k]).abs().max())
        report["ptm_value"] = float(out["ptm"].flatten()[0])
        report["atoms_written"] = write_pdb(out_path, out["sample_atom_coords"][0], feats)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--n", type=int, default=30, help="tokens")
    ap.add_argument("--steps", type=int, default=10, help="diffusion sampling steps")
    ap.add_argument("--out", default="fold_complex.pdb")
    ap.add_argument("--torchrun", action="store_true")
    args = ap.parse_args(argv)
    if args.torchrun:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rep = fold(dist.get_rank(), dist.get_world_size(), args.n, args.steps, args.out)
    else:
        from autocp.testing import run_distributed

        rep = run_distributed(fold, args.world, args.n, args.steps, os.path.abspath(args.out), timeout=1800)[0]
    if rep:
        print(f"N={args.n} tokens on {args.world} ranks; max |parallel - single device|:")
        for k, v in rep.items():
            print(f"  {k}: {v:.3g}")
        print(f"wrote {args.out}")
    return rep


if __name__ == "__main__":
    main()
