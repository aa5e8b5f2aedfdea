#!/usr/bin/env bash
# The README's test command: builds/reuses .venv, lints (ruff.toml), then runs the whole suite (extra args go to
# pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check .
python -m pytest -q --timeout=900 --durations=15 "$@"
