#!/usr/bin/env bash
# The README's main command: builds/reuses .venv, then runs the SRPO loop on the embedded default
# (tiny offline Qwen2.5-VL, synthetic visual task, CPU). Extra args are dotted config overrides.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m srpo_fast.demo --config configs/demo_cpu.yaml "$@"
