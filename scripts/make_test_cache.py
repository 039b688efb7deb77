"""Write an offline Boltz cache: CCD molecules, tiny random-weight checkpoints, example inputs.

``boltz predict`` (and ``autocp predict``) download the CCD and the released checkpoints into
``--cache`` unless the files are already there. This script writes stand-ins for all of them,
with no network, so that the whole predict pipeline (YAML parsing, featurisation, model,
writers) runs in seconds on a CPU::

    python scripts/make_test_cache.py /tmp/autocp_cache [--seed 0]
    autocp predict /tmp/autocp_cache/examples/complex_2p1l.yaml --cache /tmp/autocp_cache ...
    boltz predict /tmp/autocp_cache/examples/complex_2p1l.yaml --cache /tmp/autocp_cache \\
        --checkpoint /tmp/autocp_cache/boltz2_tiny.ckpt --accelerator cpu --no_kernels \\
        --recycling_steps 1 --sampling_steps 3

What it writes under DIR:

* ``mols/<CCD>.pkl`` -- one pickled RDKit ``Mol`` per polymer token of ``boltz.data.const``
  (20 amino acids, UNK, A/G/C/U/N, DA/DG/DC/DT/DN) plus the ligands ATP and SAH, built
  from the CCD that ships with biotite (ideal coordinates). ``mols.tar`` holds the same
  files: ``download_boltz2`` skips the download when ``mols.tar`` exists and the
  extraction when ``mols/`` exists.
* ``ccd.pkl`` -- ``{name: Mol}`` of the same molecules, what Boltz-1 loads.
* ``boltz2_tiny.ckpt``, ``boltz2_aff_tiny.ckpt``, ``boltz1_tiny.ckpt`` -- Lightning
  checkpoints of tiny models, copied to the names the downloads look for
  (``boltz2_conf.ckpt``, ``boltz2_aff.ckpt``, ``boltz1_conf.ckpt``).
* ``examples/complex_2p1l.yaml`` (proteins A, B + ATP ligand C, 99 tokens),
  ``examples/complex_2p1l_affinity.yaml`` (the same, affinity of C) and
  ``examples/single.yaml`` (one 30-residue protein); every protein has ``msa: empty``, so
  no ``--use_msa_server`` is needed.

What Boltz's loaders read from a molecule (boltz/data/parse/schema.py, featurizerv2.py,
mol.py), all set here: every atom has the string prop ``name`` (the CCD atom id; polymer
atoms are looked up by the names in ``const.ref_atoms``) and ``leaving_atom`` ("0"/"1",
read for modified residues), its element, formal charge and chirality tag (assigned from
the ideal 3D coordinates); hydrogens are kept (boltz drops them itself, and counts them
in the affinity size check); one conformer, named ``Ideal`` (``get_conformer`` tries
``Computed``, then ``Ideal``, then the first; featurizerv2 draws one of the conformers).
The molecules are sanitised (ring info, aromaticity, ``_CIPRank`` for boltz's chirality
and stereo-bond constraints) and pickled with all properties. Not set: ``symmetries`` and
the ``pb_*`` / ``chiral_*`` props of boltz's ``mols.tar`` -- read only by training and
validation featurisation (``compute_symmetries``), which ``predict`` does not run.

The checkpoints: ``boltz.main.predict`` calls ``load_from_checkpoint(strict=True)`` with
its own ``pairformer_args`` (Boltz-2 64 blocks, Boltz-1 48, 16 heads), ``msa_args``
(msa_s 64, 4 blocks), ``diffusion_process_args`` and ``steering_args``, which replace the
saved ones, so the models are built with exactly those dicts and the tiny widths of
``autocp.models.boltz_full.tiny_boltz*_config`` (token_s 32, token_z 16), then every
parameter is re-drawn from the seed (boltz zero-initialises its output projections).
Boltz-2's ``on_load_checkpoint`` reads ``self.training_args.max_lr``: boltz's own
checkpoints carry omegaconf DictConfigs, which torch's default ``weights_only=True`` load
refuses, so ``training_args`` / ``validation_args`` are saved as ``OrderedDict`` s with
their keys mirrored as instance attributes (restored by weights-only unpickling).
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
import tarfile
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

try:
    import msgpack  # noqa: F401  biotite reads its CCD (components.bcif) with it
except ImportError:
    sys.exit("make_test_cache: msgpack is missing (biotite reads its CCD with it). "
             "Fix: bash scripts/install_boltz_full.sh (or pip install msgpack).")

import biotite.structure.info as ccd_info
import pytorch_lightning as pl
from biotite.interface.rdkit import to_mol
from boltz.data import const
from boltz.main import (
    Boltz2DiffusionParams,
    BoltzDiffusionParams,
    BoltzSteeringParams,
    MSAModuleArgs,
    PairformerArgs,
    PairformerArgsV2,
)
from boltz.model.models.boltz1 import Boltz1
from boltz.model.models.boltz2 import Boltz2
from rdkit import Chem

from autocp.models.boltz_full import reinit_parameters, tiny_boltz1_config, tiny_boltz2_config

POLYMER_RESIDUES = [t for t in const.tokens if t not in ("<pad>", "-")]
LIGANDS = ["ATP", "SAH"]
CHAIN_A = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAP"  # 35 residues
CHAIN_B = "GSHMLEDPVKLAEELIKRGYSPEEVAKLLKEHG"  # 33 residues
SINGLE = "MAEGEITTFTALTEKFNLPPGNYKKPKLLY"  # 30 residues
DOWNLOAD_NAMES = {"boltz2_tiny.ckpt": "boltz2_conf.ckpt", "boltz2_aff_tiny.ckpt": "boltz2_aff.ckpt",
                  "boltz1_tiny.ckpt": "boltz1_conf.ckpt"}


# ----------------------------------------------------------------------------- molecules
def ccd_mol(name: str) -> Chem.Mol:
    """The RDKit molecule of CCD component ``name`` as Boltz's loaders read it."""
    atoms = ccd_info.residue(name)
    ids = ccd_info.get_from_ccd("chem_comp_atom", name, "atom_id").as_array()
    leaving = ccd_info.get_from_ccd("chem_comp_atom", name, "pdbx_leaving_atom_flag").as_array()
    assert list(ids) == list(atoms.atom_name), name  # same row order
    mol = to_mol(atoms, kekulize=True)
    for atom, atom_name, flag in zip(mol.GetAtoms(), atoms.atom_name, leaving):
        atom.SetProp("name", str(atom_name))
        atom.SetProp("leaving_atom", "1" if flag == "Y" else "0")
    Chem.SanitizeMol(mol)
    Chem.AssignStereochemistryFrom3D(mol)  # chiral tags, CIP ranks / codes
    mol.GetConformer().SetProp("name", "Ideal")
    mol.SetProp("PDB_NAME", name)
    return mol


def write_molecules(out: Path) -> dict[str, Chem.Mol]:
    Chem.SetDefaultPickleProperties(Chem.PropertyPickleOptions.AllProps)
    mols = {name: ccd_mol(name) for name in POLYMER_RESIDUES + LIGANDS}
    (out / "mols").mkdir(parents=True, exist_ok=True)
    for name, mol in mols.items():
        (out / "mols" / f"{name}.pkl").write_bytes(pickle.dumps(mol))
    with tarfile.open(out / "mols.tar", "w", format=tarfile.PAX_FORMAT) as tar:  # extracts to DIR/mols/
        for name in mols:
            info = tarfile.TarInfo(f"mols/{name}.pkl")
            info.size, info.mode = (out / "mols" / f"{name}.pkl").stat().st_size, 0o644  # mtime 0: reproducible
            with (out / "mols" / f"{name}.pkl").open("rb") as f:
                tar.addfile(info, f)
    (out / "ccd.pkl").write_bytes(pickle.dumps(mols))
    return mols


# ----------------------------------------------------------------------------- checkpoints
def attr_dict(d: dict) -> OrderedDict:
    """An OrderedDict whose keys are also attributes (see the module docstring)."""
    od = OrderedDict(d)
    od.__dict__.update(d)
    return od


def build(cls, cfg: dict, seed: int) -> pl.LightningModule:
    cfg = dict(cfg, training_args=attr_dict(cfg["training_args"]),
               validation_args=attr_dict(cfg["validation_args"]))
    torch.manual_seed(seed)
    np.random.seed(seed)
    return reinit_parameters(cls(**cfg), seed).eval()


def predict_overrides(version: int) -> dict:
    """The hparams ``boltz.main.predict`` passes to ``load_from_checkpoint`` (defaults)."""
    return {
        "pairformer_args": asdict(PairformerArgsV2() if version == 2 else PairformerArgs()),
        "msa_args": asdict(MSAModuleArgs(use_paired_feature=version == 2)),
        "diffusion_process_args": asdict(Boltz2DiffusionParams() if version == 2 else BoltzDiffusionParams()),
        "steering_args": asdict(BoltzSteeringParams()),
        "ema": False,
        "use_kernels": False,
    }


def save_checkpoint(model: pl.LightningModule, path: Path) -> None:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0}, path)


def tiny_config(version: int, **extra) -> dict:
    """The tiny config with predict's overrides put in whole (tiny_boltz*_config merges dicts)."""
    cfg = (tiny_boltz2_config if version == 2 else tiny_boltz1_config)(**extra)
    cfg.update(predict_overrides(version))
    return cfg


def write_checkpoints(out: Path, seed: int) -> list[Path]:
    """The three tiny checkpoints, plus copies under the names boltz's downloads look for."""
    aff = tiny_boltz2_config()["affinity_model_args"]
    cfgs = {
        "boltz2_tiny.ckpt": (Boltz2, tiny_config(2, alpha_pae=1.0, affinity_prediction=False)),
        "boltz2_aff_tiny.ckpt": (Boltz2, tiny_config(2, alpha_pae=1.0, affinity_prediction=True,
                                                     affinity_ensemble=True, affinity_model_args1=aff,
                                                     affinity_model_args2=aff)),
        "boltz1_tiny.ckpt": (Boltz1, tiny_config(1)),
    }
    for i, (name, (cls, cfg)) in enumerate(cfgs.items()):
        save_checkpoint(build(cls, cfg, seed + i), out / name)
    for src, dst in DOWNLOAD_NAMES.items():
        shutil.copyfile(out / src, out / dst)
    return [out / name for name in cfgs]


def check_checkpoint(path: Path) -> int:
    """Load ``path`` as ``boltz.main.predict`` does (strict); return the parameter count."""
    version = 1 if path.name.startswith("boltz1") else 2
    cls = Boltz1 if version == 1 else Boltz2
    model = cls.load_from_checkpoint(path, strict=True, map_location="cpu",
                                     predict_args={"recycling_steps": 0}, **predict_overrides(version))
    ckpt = torch.load(path, map_location="cpu")  # weights_only, as Lightning 2.6 loads it
    assert all(ckpt["hyper_parameters"][k] == v for k, v in predict_overrides(version).items()), path.name
    state = ckpt["state_dict"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    zero = [k for k, v in state.items() if v.is_floating_point() and v.numel() > 1 and not v.any()]
    assert not zero, f"{path.name}: all-zero tensors {zero[:5]}"
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- examples
def protein(chain: str, seq: str) -> str:
    return f"  - protein:\n      id: {chain}\n      sequence: {seq}\n      msa: empty\n"


def write_examples(out: Path) -> list[Path]:
    ex = out / "examples"
    ex.mkdir(parents=True, exist_ok=True)
    complex_ = ("version: 1\nsequences:\n" + protein("A", CHAIN_A) + protein("B", CHAIN_B)
                + "  - ligand:\n      id: C\n      ccd: ATP\n")
    files = {
        "complex_2p1l.yaml": complex_,
        "complex_2p1l_affinity.yaml": complex_ + "properties:\n  - affinity:\n      binder: C\n",
        "single.yaml": "version: 1\nsequences:\n" + protein("A", SINGLE),
    }
    for name, text in files.items():
        (ex / name).write_text(text)
    return [ex / name for name in files]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="cache directory to write (boltz --cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the checkpoint weights")
    parser.add_argument("--no-check", action="store_true", help="skip re-loading the checkpoints")
    args = parser.parse_args(argv)
    out = args.dir.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    mols = write_molecules(out)
    print(f"wrote {out}/mols/*.pkl, mols.tar, ccd.pkl: {len(mols)} CCD molecules ({' '.join(mols)}) "
          f"[{time.perf_counter() - t0:.1f}s]")
    t0 = time.perf_counter()
    for path in write_checkpoints(out, args.seed):
        check = "" if args.no_check else f", {check_checkpoint(path) / 1e6:.2f}M params, loads strict as in predict"
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB{check}) and its copy {DOWNLOAD_NAMES[path.name]}")
    print(f"checkpoints done [{time.perf_counter() - t0:.1f}s]")
    for path in write_examples(out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
