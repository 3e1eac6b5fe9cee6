#!/usr/bin/env bash
# The GPU check: on a machine with CUDA, the CUDA tests and the loss, /detect and fine-tune benchmarks, in under
# 8 minutes (each step has its own time limit; their sum is 440 s), written to one markdown report.
#
#   benchmarks/gpu_check.sh [--dry-run] [REPORT]     (default REPORT: benchmarks/results/gpu-check.md)
#
# --dry-run (any machine): checks that every step's command starts (the tests are collected and skip without
# CUDA, each benchmark parses its arguments) and writes the report of what would run; a failed step is
# reported and the next one runs. PYTHON selects the interpreter (default .venv/bin/python, else python3).
set -uo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
REPORT="${1:-benchmarks/results/gpu-check.md}"
PYTHON="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
mkdir -p "$(dirname "$REPORT")"
STARTED=$SECONDS
FAILED=()

if [[ $DRY_RUN == 0 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: torch sees no CUDA device; run with --dry-run to check the script on this machine" >&2
    exit 2
fi

# step NAME LIMIT_S COMMAND...: run it under `timeout`, its output into the report (and the terminal)
step() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS rc
    {
        echo
        echo "## $name"
        echo
        echo "\`$*\` (limit ${limit} s)"
        echo
        echo '```'
    } >>"$REPORT"
    if [[ $DRY_RUN == 1 ]]; then
        dry_command "$@" 2>&1 | tail -n 5 | tee -a "$REPORT"
        rc=${PIPESTATUS[0]}
    else
        timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$REPORT"
        rc=${PIPESTATUS[0]}
    fi
    {
        echo '```'
        echo
        echo "exit status $rc after $((SECONDS - started)) s"
    } >>"$REPORT"
    [[ $rc == 0 ]] || FAILED+=("$name ($rc)")
}

# what a dry run executes instead: tests are collected (they skip without CUDA), benchmarks parse --help
dry_command() {
    if [[ "$2" == "-m" && "$3" == "pytest" ]]; then
        "$@" --collect-only -q
    else
        "$@" --help >/dev/null && echo "would run: $*"
    fi
}

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)$([[ $DRY_RUN == 1 ]] && echo ' (dry run)')"
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    else
        echo "no nvidia-smi"
    fi
    "$PYTHON" -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available()); print('onnxruntime', ort.__version__, ort.get_available_providers())"
    echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo '```'
} >"$REPORT"

step "CUDA tests" 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/app/serving tests/ssd_core
step "Loss, forward + backward on CUDA" 75 "$PYTHON" benchmarks/bench_loss.py --device cuda --repeats 9
step "/detect ssd-small on CUDA: torch and onnxruntime against the bare forward" 110 \
    "$PYTHON" benchmarks/bench_service.py --part backends --device cuda --seconds 4 --rounds 1
step "/detect SSD300 on CUDA: 1 and 32 clients against the bare forward at batch 1 and 32" 90 \
    "$PYTHON" benchmarks/bench_service.py --part backends --device cuda --seconds 4 --rounds 1 --model ssd300 \
    --num-classes 21 --many-clients 32 --backends torch
step "Fine-tune throughput, SSD300 on CUDA (AMP)" 45 \
    "$PYTHON" benchmarks/bench_train.py --device cuda --model ssd300 --batch-size 32 --amp --throughput-only

{
    echo
    echo "## Summary"
    echo
    echo "$((SECONDS - STARTED)) s in all; failed steps: ${FAILED[*]:-none}"
} >>"$REPORT"
echo "report: $REPORT"
[[ ${#FAILED[@]} == 0 ]]
