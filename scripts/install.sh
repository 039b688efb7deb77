#!/usr/bin/env bash
# Install autocp and what it needs, on a fresh clone. Idempotent.
#
#   bash scripts/install.sh           # runtime: torch, autocp (editable), boltz model code, matplotlib
#   bash scripts/install.sh --test    # + test tools (pytest, build, matplotlib, triton)
#
# torch: on a machine without an NVIDIA GPU we install the CPU wheel torch==2.13.0
# (an unpinned torch pulls a multi-GB CUDA build). On a GPU machine an installed CUDA
# torch (>= 2.5) is kept; if none is installed, pip's default (CUDA) torch is taken.
# Set AUTOCP_TORCH_SPEC (e.g. "torch==2.13.0") to force a spec.
#
# boltz: its model modules are the reference model. The boltz package pins heavy, old
# dependencies (numpy<2, lightning, rdkit, wandb, ...) that its model code does not
# need, so it is installed with --no-deps next to the few runtime deps its model code
# imports (autocp's `boltz-runtime` extra: numpy, scipy, einops, fairscale).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"
BOLTZ_VERSION=${AUTOCP_BOLTZ_VERSION:-2.2.1}

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ -n "${AUTOCP_TORCH_SPEC:-}" ]; then
  $PIP "$AUTOCP_TORCH_SPEC"
elif have_gpu; then
  $PY -c "import torch" 2>/dev/null || $PIP "torch>=2.5"
else
  $PY -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
    || $PIP "torch==2.13.0"
fi

extras="boltz-runtime,plot"   # plot: matplotlib, for the demo's PNG
if [ "${1:-}" = "--test" ]; then
  extras="boltz-runtime,plot,test,triton"
fi
$PIP -e ".[${extras}]"
$PY -c "import boltz" 2>/dev/null || $PIP --no-deps "boltz==${BOLTZ_VERSION}"
$PY -c "import torch, autocp, boltz.model.layers.pairformer; print('autocp', autocp.__version__, '| torch', torch.__version__)"
