"""examples/04_fold_complex.py runs: the whole Boltz-2 on a 2x2 mesh, strict, a PDB written,
parity with the single device printed (and checked here)."""

import os
import subprocess
import sys

import pytest

boltz_full = pytest.importorskip("autocp.models.boltz_full")
if not boltz_full.boltz_full_available():
    pytest.skip("whole-model deps missing: bash scripts/install_boltz_full.sh", allow_module_level=True)

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fold_complex_example_writes_a_pdb(tmp_path):
    out = tmp_path / "fold.pdb"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "04_fold_complex.py"), "--world", "4",
                           "--n", "22", "--steps", "10", "--out", str(out)], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = {}
    for line in proc.stdout.splitlines():
        if line.startswith("  ") and ": " in line:
            k, v = line.strip().split(": ")
            rep[k] = float(v)
    assert rep["sample_atom_coords"] < 1e-3 and rep["pdistogram"] < 1e-3 and rep["ptm"] < 1e-5, rep
    assert rep["ptm_value"] > 0
    text = out.read_text().splitlines()
    assert len([ln for ln in text if ln.startswith(("ATOM", "HETATM"))]) == int(rep["atoms_written"]) > 100
    assert any(ln.startswith("HETATM") for ln in text)  # the ligand
