#!/usr/bin/env bash
# Set up .venv with qoptim installed in editable mode, on a fresh machine or an existing one.
# Usage: scripts/setup.sh [EXTRAS]   (default extras: test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Install torch first and pinned: an unpinned torch requirement pulls a multi-GB CUDA build,
# while 2.13.0 resolves to the CPU wheel kept on these machines.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
