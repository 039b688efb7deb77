"""Triton kernels == torch reference, in the Triton interpreter (subprocess).

``TRITON_INTERPRET=1`` has to be set before triton is imported, and this pytest process
imports triton normally (through ``autocp.kernels``), so the cases in
``_interp_cases.py`` run in a fresh interpreter process with ``TRITON_INTERPRET=1`` and
the opt-in ``AUTOCP_TRITON_INTERPRET=1``. The test fails with that process's output.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed: the Triton kernels cannot be tested")


@pytest.mark.timeout(300)
def test_triton_kernels_match_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", AUTOCP_TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("AUTOCP_KERNELS", None)  # a forced reference would make the cases fail, not pass
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_interp_cases.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter cases failed (rc={proc.returncode}):\n{out}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(lines) >= 16 and all(ln.startswith("PASS") for ln in lines), out
    print(proc.stdout)
