#!/usr/bin/env bash
# Creates .venv (if missing) and installs cps_hf with its dev extra.
# torch/torchvision go in first as a matching pair so pip never swaps torch afterwards;
# override the pair with CPS_TORCH_SPEC (e.g. "torch==2.5.1 torchvision==0.20.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH_SPEC=${CPS_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  python -m pip install -q $TORCH_SPEC
fi
# Pin whatever torch is now installed so resolving the package cannot replace it.
python - <<'PY' > .venv/torch-constraints.txt
import torch, torchvision
print(f"torch=={torch.__version__.split('+')[0]}")
print(f"torchvision=={torchvision.__version__.split('+')[0]}")
PY
python -m pip install -q -c .venv/torch-constraints.txt -e ".[dev,study]"
python -c "import cps_hf, timm, transformers; print('cps_hf ready:', 'torch', __import__('torch').__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
