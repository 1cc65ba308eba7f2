#!/usr/bin/env bash
# The main job: set up .venv, then train a small GPT with torch AdamW, qoptim AdamW8bit and
# PagedAdamW8bit and compare memory, speed and loss. Extra arguments go to `qoptim demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/qoptim demo "$@"
