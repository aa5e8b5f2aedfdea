#!/usr/bin/env bash
# The one-call GPU check (docs/gpu.md): environment, gpu tests with compiled kernels, kernel and step benchmarks,
# two GRPO steps with and without CPU offload, the end-to-end benchmark (srpo_fast vs TRL where TRL imports);
# each part time-boxed; about 8 minutes on one H100/H200.
#   bash scripts/gpu_check.sh [OUT_DIR]     # default: $OUT when set, else benchmarks/results/gpu
# Uses the python on PATH as it is (no install, no network). Pure-Python wheels missing there can be put in .whl/
# of the project root: they are installed into a temporary dir first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
exec "$PY" -m srpo_fast.gpu_check ${1:+--out "$1"}
