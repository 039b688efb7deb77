#!/usr/bin/env bash
# Install the external AF3-like corpus (tests/corpus/) into the current python, pinned and
# with --no-deps (the packages' declared dependencies include a CUDA torch, lightning,
# gradio, ...; the pair stacks under test import none of them). Idempotent; needs PyPI.
#
#   bash scripts/install_corpus.sh          # PYTHON=... to choose the interpreter
#
# Then: python -m pytest -m corpus tests/corpus ; python benchmarks/corpus_report.py --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --disable-pip-version-check -q --no-deps -r tests/corpus/requirements-corpus.txt
$PY - <<'PYEOF'
import os, sys
sys.path.insert(0, os.getcwd())
from tests.corpus._workers import HARNESSES, harness
bad = {h: harness(h).unavailable() for h in HARNESSES}
for h, why in bad.items():
    print(f"corpus {h}: {'ok' if why is None else why}")
sys.exit(1 if any(bad.values()) else 0)
PYEOF
