"""Parity of ``autocp predict`` against Boltz's own predict path.

:func:`boltz_predict_fp32` runs ``boltz predict`` (the click command's own function,
``boltz.main.predict``) on this process with Lightning's precision forced to fp32 (Boltz-2's
CLI runs bf16-mixed; fp32 is the reference a 2D run is compared to) on the CPU.
:func:`compare_predictions` reads two output trees (``boltz_results_<name>/predictions``) and
returns the largest differences: mmCIF / PDB coordinates (Angstrom), every confidence JSON
value, the PAE / PDE / pLDDT npz maps, the affinity JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["boltz_predict_fp32", "compare_predictions"]


def boltz_predict_fp32(data, out_dir, **flags) -> Path:
    """``boltz predict DATA --out_dir OUT_DIR --accelerator cpu --num_workers 0 --FLAG VALUE ...``
    in this process (its click command, parsed as on the command line), at fp32. Returns
    ``OUT_DIR/boltz_results_<stem>``. ``flags`` take ``boltz predict``'s option names
    (``cache``, ``checkpoint``, ``seed``, ``diffusion_samples``, ...); ``True`` is a bare flag."""
    import boltz.main as bm

    real = bm.Trainer

    def fp32_trainer(*args, **kw):
        kw["precision"] = 32
        return real(*args, **kw)

    args = [str(data), "--out_dir", str(out_dir), "--accelerator", "cpu", "--num_workers", "0"]
    for k, v in flags.items():  # the command line a user types: click resolves every other default itself
        if v is True:
            args.append(f"--{k}")
        elif v is not False and v is not None:
            args += [f"--{k}", str(v)]
    bm.Trainer = fp32_trainer
    try:
        bm.predict.main(args=args, standalone_mode=False)
    finally:
        bm.Trainer = real
    return Path(out_dir).expanduser() / f"boltz_results_{Path(data).stem}"


def _coords(path: Path):
    import gemmi
    import numpy as np

    st = gemmi.read_structure(str(path))
    xyz = [(a.pos.x, a.pos.y, a.pos.z) for ch in st[0] for res in ch for a in res]
    return np.asarray(xyz, dtype=np.float64)


def _flat_json(x, prefix="") -> dict:
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            out.update(_flat_json(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): float(x)}


def compare_predictions(a, b, names: Optional[list] = None) -> dict:
    """Largest absolute differences between two ``boltz_results_*`` trees (or their
    ``predictions`` folders): ``{"coords_A": ..., "confidence": ..., "pae": ..., "pde": ...,
    "plddt": ..., "affinity": ..., "files": n}``. Raises ``AssertionError`` when the trees do
    not hold the same files (a missing output is a failure, never a skipped comparison)."""
    import numpy as np

    a, b = (Path(x) / "predictions" if (Path(x) / "predictions").is_dir() else Path(x) for x in (a, b))
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if names is not None:
        fa = [p for p in fa if p.parts[0] in names]
        fb = [p for p in fb if p.parts[0] in names]
    assert fa == fb, f"output trees differ: only in {a}: {sorted(set(fa) - set(fb))}; only in {b}: {sorted(set(fb) - set(fa))}"
    assert fa, f"no prediction files under {a}"
    res = {"coords_A": 0.0, "confidence": 0.0, "pae": 0.0, "pde": 0.0, "plddt": 0.0, "affinity": 0.0,
           "files": len(fa), "pae_close": 1.0}
    for rel in fa:
        pa, pb = a / rel, b / rel
        if rel.suffix in (".cif", ".pdb"):
            ca, cb = _coords(pa), _coords(pb)
            assert ca.shape == cb.shape and len(ca), (rel, ca.shape, cb.shape)
            res["coords_A"] = max(res["coords_A"], float(np.abs(ca - cb).max()))
        elif rel.suffix == ".json":
            ja, jb = (_flat_json(json.loads(p.read_text())) for p in (pa, pb))
            assert ja.keys() == jb.keys(), (rel, sorted(ja.keys() ^ jb.keys()))
            key = "affinity" if rel.name.startswith("affinity") else "confidence"
            res[key] = max([res[key]] + [abs(ja[k] - jb[k]) for k in ja])
        elif rel.suffix == ".npz" and rel.name.split("_")[0] in ("pae", "pde", "plddt"):
            kind = rel.name.split("_")[0]
            xa, xb = np.load(pa)[kind], np.load(pb)[kind]
            assert xa.shape == xb.shape, (rel, xa.shape, xb.shape)
            diff = np.abs(xa.astype(np.float64) - xb)
            res[kind] = max(res[kind], float(diff.max()))
            if kind == "pae":  # share of entries within 1e-4 (a distance-bin flip moves whole rows / columns)
                res["pae_close"] = min(res["pae_close"], float((diff <= 1e-4).mean()))
    return res
