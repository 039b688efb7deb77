#!/usr/bin/env bash
# Install what the WHOLE Boltz-1 / Boltz-2 models need (autocp.models.boltz_full, the
# end-to-end parity reference), on top of scripts/install.sh. Idempotent: a package whose
# module already imports is left alone. torch is never installed or upgraded: every
# package goes in with --no-deps (pytorch-lightning's metadata would otherwise also pull
# fsspec[http] -> aiohttp, which nothing here imports), and the torch version is checked
# before and after.
#
#   bash scripts/install_boltz_full.sh
#
# Same set as autocp's `boltz-full` extra, plus what `autocp predict` needs: Boltz's input
# parsing, featurizer and writers (rdkit, numba, pandas, scikit-learn, gemmi, ihm/modelcif,
# chembl_structure_pipeline, ...) and biotite (whose bundled CCD scripts/make_test_cache.py
# turns into Boltz's molecule cache). Override a pin with e.g. AUTOCP_PL_SPEC="pytorch-lightning==2.5.0".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q --no-deps"
BOLTZ_VERSION=${AUTOCP_BOLTZ_VERSION:-2.2.1}

torch_version() { $PY -c "import torch; print(torch.__version__)" 2>/dev/null || echo "none"; }
TORCH_BEFORE=$(torch_version)
if [ "$TORCH_BEFORE" = "none" ]; then
  echo "install_boltz_full: torch is not installed; run scripts/install.sh first" >&2
  exit 1
fi

# module to import | pip spec (tested versions; the extra in pyproject.toml has ranges)
PKGS=(
  "boltz|boltz==${BOLTZ_VERSION}"
  "scipy|scipy"
  "fairscale|fairscale"
  "einops|einops"
  "pytorch_lightning|${AUTOCP_PL_SPEC:-pytorch-lightning==2.6.6}"
  "torchmetrics|${AUTOCP_TORCHMETRICS_SPEC:-torchmetrics==1.9.0}"
  "lightning_utilities|${AUTOCP_LU_SPEC:-lightning-utilities==0.15.3}"
  "einx|${AUTOCP_EINX_SPEC:-einx==0.4.3}"
  "frozendict|frozendict"
  "tqdm|tqdm"
  "yaml|pyyaml"
  "packaging|packaging"
  # autocp predict: boltz.main's parsing / featurizer / writers, and the offline test cache
  "rdkit|rdkit==2026.9.1"
  "numba|numba==0.68.1"
  "llvmlite|llvmlite==0.50.0"
  "mashumaro|mashumaro==3.23"
  "pandas|pandas==3.1.1"
  "dateutil|python-dateutil"
  "six|six"
  "narwhals|narwhals"
  "chembl_structure_pipeline|chembl_structure_pipeline==1.2.4"
  "sklearn|scikit-learn==1.9.1"
  "joblib|joblib"
  "threadpoolctl|threadpoolctl"
  "ihm|ihm==2.12"
  "modelcif|modelcif==1.8"
  "gemmi|gemmi==0.7.5"
  "click|click"
  "requests|requests"
  "urllib3|urllib3"
  "idna|idna"
  "certifi|certifi"
  "charset_normalizer|charset-normalizer"
  "biotite|biotite==1.6.0"
  "biotraj|biotraj"
  "msgpack|msgpack"
  "networkx|networkx"
  "Bio|biopython==1.88"
  "cloudpickle|cloudpickle"
)

installed=()
present=()
for entry in "${PKGS[@]}"; do
  mod=${entry%%|*}
  spec=${entry#*|}
  if [ "$mod" = "pytorch_lightning" ]; then
    check="import importlib.util as u, sys; sys.exit(0 if (u.find_spec('pytorch_lightning') or u.find_spec('lightning')) else 1)"
  else
    check="import importlib.util as u, sys; sys.exit(0 if u.find_spec('$mod') else 1)"
  fi
  if $PY -c "$check" 2>/dev/null; then
    present+=("$mod")
  else
    echo "install_boltz_full: installing $spec (--no-deps)"
    $PIP "$spec"
    installed+=("$spec")
  fi
done

TORCH_AFTER=$(torch_version)
if [ "$TORCH_AFTER" != "$TORCH_BEFORE" ]; then
  echo "install_boltz_full: ERROR torch changed from $TORCH_BEFORE to $TORCH_AFTER" >&2
  exit 1
fi

echo "install_boltz_full: installed: ${installed[*]:-(nothing)}"
echo "install_boltz_full: already present: ${present[*]:-(nothing)}"
$PY - <<'EOF'
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("_bf", "autocp/models/boltz_full.py")
bf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bf)
Boltz1, Boltz2 = bf.import_boltz_models()
print(f"install_boltz_full: OK -- {Boltz1.__module__}.Boltz1 and {Boltz2.__module__}.Boltz2 import | torch {torch.__version__}")
EOF
