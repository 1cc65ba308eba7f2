#!/usr/bin/env bash
# Every GPU test and the GPU benchmark, on a CUDA machine, in under 8 minutes, ending with one
# summary table (device, torch / triton versions, test counts, benchmark figures).
#
#   bash scripts/gpu-check.sh            # exit status 0 only if every step passed
#
# Needs no network. Python: $PYTHON if set, else .venv/bin/python, else python3, the first whose
# torch sees a CUDA device and which has triton, numba and pytest (a CUDA machine's image often
# has them all); failing that, and only if the machine has an NVIDIA GPU at all,
# `bash scripts/setup.sh test` (from the local wheel cache) and .venv. qoptim runs from src/.
# Steps, each under its own time limit (timeout), in this order:
#   1. tests/gpu but test_whole_gpu.py, in parallel (pytest-xdist where installed);
#   2. benchmarks/step_cuda.py, one size (16.7M, bf16) and the many-tensor model;
#   3. tests/gpu/test_whole_gpu.py alone (it fills the GPU's memory), last.
# Logs and results go to $GPU_CHECK_OUT (default: a new temporary folder), named at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
total_limit=420  # seconds for everything from here, set-up included: with the kill grace and the summary, under 8 minutes
out="${GPU_CHECK_OUT:-$(mktemp -d -t qoptim-gpu-check.XXXXXX)}"
mkdir -p "$out"
: >"$out/runs.tsv"

fail() {
    echo "gpu-check: $*" >&2
    exit 2
}

# ---- a Python that sees the GPU -------------------------------------------------------------
usable() {  # $1: a python; true if its torch sees CUDA and it has what the steps import
    [ -x "$(command -v "$1" 2>/dev/null)" ] || return 1
    timeout 60 "$1" - <<'EOF' >/dev/null 2>&1
import importlib, sys, torch
for name in ("triton", "numba", "numpy", "pytest"):
    importlib.import_module(name)
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
}

has_nvidia_gpu() {
    { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; } || ls /dev/nvidia[0-9]* >/dev/null 2>&1
}

python=""
for candidate in ${PYTHON:-} .venv/bin/python python3; do
    if usable "$candidate"; then
        python="$candidate"
        break
    fi
done
if [ -z "$python" ]; then
    has_nvidia_gpu || fail "no NVIDIA GPU found (no nvidia-smi GPU, no /dev/nvidia*, and no Python whose torch sees CUDA): nothing to check"
    echo "gpu-check: no Python here with a CUDA torch, triton, numba and pytest; setting up .venv (scripts/setup.sh)"
    timeout 240 bash scripts/setup.sh test || fail "scripts/setup.sh failed (no network here: only the local wheel cache can serve it)"
    usable .venv/bin/python || fail "the GPU is there, but .venv's torch does not see CUDA (a CPU-only torch wheel?): install a CUDA torch and triton, or set PYTHON"
    python=.venv/bin/python
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels: the GPU tests refuse the interpreter
echo "gpu-check: $("$python" -c 'import torch, triton; print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)') | $python"

workers=$("$python" - <<'EOF'
import importlib.util, os
print(min(8, max(1, (os.cpu_count() or 2) // 2)) if importlib.util.find_spec("xdist") else 0)
EOF
)
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers")

# ---- the steps ------------------------------------------------------------------------------
limit_for() {  # $1: the step's own limit; $2: seconds kept for the steps after it
    local left=$((total_limit - (SECONDS - start) - $2))
    [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

step() {  # $1: name, $2: JUnit file or -, $3: time limit (s), then the command
    local name=$1 junit=$2 limit=$3 began=$SECONDS status=0
    shift 3
    if [ "$limit" -le 5 ]; then
        echo "gpu-check: no time left for $name"
        status=124
    else
        echo "gpu-check: $name (at most $limit s)"
        timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee "$out/$(echo "$name" | tr -c 'A-Za-z0-9_.\n-' '_').log"
        status=${PIPESTATUS[0]}
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$junit" "$status" "$((SECONDS - began))" "$limit" >>"$out/runs.tsv"
}

pytest_args=(-q -p no:cacheprovider -o junit_family=xunit2)
step "tests/gpu (all but test_whole_gpu.py)" tests.xml "$(limit_for 240 160)" \
    "$python" -m pytest "${pytest_args[@]}" "${parallel[@]}" tests/gpu --ignore=tests/gpu/test_whole_gpu.py \
    --junitxml="$out/tests.xml"
step "benchmarks/step_cuda.py (16.7M bf16, gpt2-small)" - "$(limit_for 110 50)" \
    "$python" benchmarks/step_cuda.py --sizes 16.7M --dtypes bf16 --steps 10 --warmup 2 --record "$out/bench.json"
step "tests/gpu/test_whole_gpu.py (alone)" whole.xml "$(limit_for 50 0)" \
    "$python" -m pytest "${pytest_args[@]}" tests/gpu/test_whole_gpu.py --junitxml="$out/whole.xml"

"$python" scripts/gpu_check_summary.py "$out"
status=$?
echo "gpu-check: $((SECONDS - start)) s in all; logs and results in $out"
exit $status
