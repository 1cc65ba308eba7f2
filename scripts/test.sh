#!/usr/bin/env bash
# Run the test suite (sets up .venv first). Extra arguments go to both pytest runs.
#
# Two pytest processes, because Triton decides when it is first imported whether it interprets:
#   1. the whole suite but tests/kernels/triton (the Triton kernels compiled for sm_90 included);
#   2. tests/kernels/triton with TRITON_INTERPRET=1: the CUDA kernels run on the CPU, bit for bit
#      against the reference.
# Both run even if the first fails; the script fails if either does. With extra arguments (a
# -k expression, a file) a run that they leave without tests (pytest's exit status 5) is no failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
python=.venv/bin/python

no_tests_collected=5
passed() {  # exit status of a pytest run -> whether it counts as passed
    [ "$1" -eq 0 ] || { [ "$1" -eq "$no_tests_collected" ] && [ "$#" -gt 1 ]; }
}

status=0
"$python" -m pytest -n 2 -q --ignore=tests/kernels/triton "$@" || status=$?
interpreted=0
TRITON_INTERPRET=1 "$python" -m pytest -n 2 -q tests/kernels/triton "$@" || interpreted=$?

if ! passed "$status" "$@" || ! passed "$interpreted" "$@"; then
    echo "scripts/test.sh: FAILED (suite: exit $status, Triton interpreter: exit $interpreted)" >&2
    exit 1
fi
echo "scripts/test.sh: both runs passed"
