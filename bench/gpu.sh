#!/usr/bin/env bash
# One prepared run of lmforge's GPU checks and benchmarks, for a lent GPU machine (docs/benchmarks.md, "GPU runbook").
#
#   bash bench/gpu.sh                        # on the GPU machine, from the repo root: about 7 minutes on an H200
#   LMFORGE_GPU_SMOKE=1 bash bench/gpu.sh    # every step with tiny sizes on the CPU, to test this script
#
# Steps, each under its own `timeout` and all under one overall budget (LMFORGE_GPU_BUDGET seconds, default 480;
# a step that would start with under 15 s left is skipped), in order:
#   checks         environment, bf16 matmul rate, TF32, SDPA flash/cuDNN/efficient vs math (bf16 fwd+bwd), the
#                  model's default attention kernels, our GPT eager vs torch.compile, fp16 + GradScaler steps
#   prepare        lmforge prepare pydocs (character level; a stdlib-source corpus if pydoc_data is missing)
#   train          lmforge train --preset gpt2 --model.vocab_size 50304, bf16, compile, micro-batch 32 x 1024
#   mfu            median tokens/s and MFU of the steps after warm-up, from the run's metrics.jsonl
#   generate       bench/generate.py on the trained run (CPU: the script has no --device option)
#   decode         lmforge vs transformers greedy decoding of the trained run on the GPU (bench/gpu_checks.py)
#   torchrun       README-style: torchrun --nproc_per_node 1 -m lmforge.cli train --preset tiny --train.dist fsdp
#   torchrun_nccl  the same with lmforge's process-group path forced on for one process: NCCL + FSDP2
#   torchrun_match both runs logged the same losses
#   throughput     bench/throughput.py --sizes 12x768x1024 --batch 16 --compile (ours vs nn.TransformerEncoder)
#
# Everything printed goes to $OUT/gpu.log as well; $OUT/results.json holds every step's status and figures and is
# rewritten after each step; $OUT/train_metrics.jsonl is the gpt2 run's metrics. OUT defaults to /tmp/lmforge-gpu.
# Work files (data, run dirs, per-step output) go to LMFORGE_GPU_WORK (default: a new folder under /tmp).
# The script keeps going when a step fails and exits 1 at the end if any step failed, timed out or was skipped.
# Knobs: PYTHON (default python3), LMFORGE_GPU_BUDGET, LMFORGE_GPU_MICRO (32), LMFORGE_GPU_TRAIN_STEPS (30),
# LMFORGE_GPU_TRAIN_TIME (110 s, compile included).

set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SMOKE=${LMFORGE_GPU_SMOKE:-0}
[[ $SMOKE == 0 ]] && SMOKE=""
OUT=${OUT:-/tmp/lmforge-gpu}
WORK=${LMFORGE_GPU_WORK:-$(mktemp -d /tmp/lmforge-gpu-work.XXXXXX)}
PY=${PYTHON:-python3}
if [[ -n $SMOKE ]]; then
    MODE=smoke DEV=cpu BUDGET=${LMFORGE_GPU_BUDGET:-900}
else
    MODE=gpu DEV=cuda BUDGET=${LMFORGE_GPU_BUDGET:-480}
fi
MICRO=${LMFORGE_GPU_MICRO:-32}
TRAIN_STEPS=${LMFORGE_GPU_TRAIN_STEPS:-30}
TRAIN_TIME=${LMFORGE_GPU_TRAIN_TIME:-110}

export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}

FAILED=0
START=$SECONDS

# step NAME CAP COMMAND...: run COMMAND under timeout (CAP seconds, or what is left of the budget), its output
# shown and kept in $WORK/NAME.out; record the outcome in $WORK/steps.jsonl and rewrite results.json.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    local began=$SECONDS rc status
    if ((limit < 15)); then
        echo "=== $name: SKIPPED, ${left}s of the ${BUDGET}s budget left"
        rc=-1 status=skipped limit=0
    else
        echo
        echo "=== [$(date +%H:%M:%S), +$((SECONDS - START))s] $name (limit ${limit}s): $*"
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.out"
        rc=${PIPESTATUS[0]}
        case $rc in
            0) status=ok ;;
            124 | 137) status=timeout ;;
            *) status=failed ;;
        esac
        echo "=== $name: $status (rc $rc, $((SECONDS - began))s)"
    fi
    [[ $status == ok ]] || FAILED=$((FAILED + 1))
    printf '{"name": "%s", "status": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' \
        "$name" "$status" "$rc" "$((SECONDS - began))" "$limit" >>"$WORK/steps.jsonl"
    collect
    return 0
}

collect() {
    "$PY" "$REPO/bench/gpu_checks.py" collect "$WORK" --json "$OUT/results.json" --mode "$MODE" \
        --budget "$BUDGET" --elapsed "$((SECONDS - START))" "$@" || echo "(collecting results.json failed)"
}

# step_if PATH NAME CAP COMMAND...: step, or a skipped step when PATH (what it needs from an earlier step) is missing.
step_if() {
    local need=$1
    shift
    if [[ -e $need ]]; then
        step "$@"
    else
        echo "=== $1: SKIPPED, it needs $need from an earlier step"
        printf '{"name": "%s", "status": "skipped", "rc": -1, "seconds": 0, "limit": 0}\n' "$1" >>"$WORK/steps.jsonl"
        FAILED=$((FAILED + 1))
    fi
}

# shellcheck disable=SC2329  # run as `bash -c prepare_data` (export -f), so that timeout can run it
prepare_data() {
    if "$PY" -m lmforge.cli prepare pydocs --out "$WORK/data" --quiet; then
        return 0
    fi
    echo "pydocs failed; preparing the Python standard library's sources as text instead"
    "$PY" - "$WORK/stdlib.txt" <<'EOF'
import os, sys, sysconfig
root, out, total = sysconfig.get_paths()["stdlib"], open(sys.argv[1], "w", encoding="utf-8"), 0
for folder, _, files in sorted(os.walk(root)):
    for name in sorted(f for f in files if f.endswith(".py")):
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
            total += out.write(f.read() + "\n\n")
    if total > 8_000_000:
        break
EOF
    "$PY" -m lmforge.cli prepare "$WORK/stdlib.txt" --out "$WORK/data" --quiet --overwrite
}

main() {
    mkdir -p "$OUT" "$WORK/runs"
    rm -f "$WORK/steps.jsonl"
    echo "lmforge GPU run: mode $MODE, budget ${BUDGET}s, repo $REPO, work $WORK, out $OUT, python $PY"
    local commit
    commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "?")
    echo "host ${HOSTNAME:-?}, $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $commit, bash $BASH_VERSION"
    if [[ -z $SMOKE ]]; then
        command -v nvidia-smi >/dev/null &&
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
        "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" ||
            echo "WARNING: no CUDA device; every GPU step below will fail"
    fi
    local smoke_flag=() run="$WORK/runs/gpt2"
    [[ -n $SMOKE ]] && smoke_flag=(--smoke)

    step checks 150 "$PY" "$REPO/bench/gpu_checks.py" checks --device "$DEV" "${smoke_flag[@]}" \
        --json "$WORK/checks.json"

    # Without a working torch.compile (no triton, no C compiler for triton's launcher, ...) the MFU and throughput
    # figures are still measured, eager, rather than lost; results.json records which.
    local compile=true compile_flag=(--compile)
    local compile_ok='import json, sys; sys.exit(not json.load(open(sys.argv[1])).get("compile_ok"))'
    if [[ -f $WORK/checks.json ]] && ! "$PY" -c "$compile_ok" "$WORK/checks.json"; then
        compile=false compile_flag=()
        echo "WARNING: torch.compile failed in the checks (gpt_eager_vs_compile); train and throughput run eager"
    fi
    export -f prepare_data
    export PY WORK
    step prepare 90 bash -c prepare_data

    local size=()
    if [[ -n $SMOKE ]]; then
        size=(--model.n_layer 2 --model.n_head 2 --model.n_embd 64 --model.seq_len 64
            --train.batch_tokens 1024 --train.micro_batch_size 8 --max-steps 8 --time 120)
    else
        size=(--train.micro_batch_size "$MICRO" --max-steps "$TRAIN_STEPS" --time "$TRAIN_TIME")
    fi
    printf '{"compile": %s, "train_size_flags": "%s"}\n' "$compile" "${size[*]}" >"$WORK/settings.json"
    # metrics.jsonl as it grows: one line per optimizer step (the progress bar is off)
    tail -n +1 -F "$run/metrics.jsonl" 2>/dev/null &
    local follower=$!
    step_if "$WORK/data/meta.json" train 240 "$PY" -m lmforge.cli train --data "$WORK/data" --out "$run" \
        --preset gpt2 --model.vocab_size 50304 --train.precision bf16 --train.compile "$compile" --train.device "$DEV" \
        --train.log_every 1 --train.eval_every 1000000 --train.save_every 1000000 --train.eval_batches 2 \
        "${size[@]}" --quiet
    sleep 1
    kill "$follower" 2>/dev/null
    wait "$follower" 2>/dev/null
    [[ -f $run/metrics.jsonl ]] && cp "$run/metrics.jsonl" "$OUT/train_metrics.jsonl"

    step_if "$run/metrics.jsonl" mfu 60 "$PY" "$REPO/bench/gpu_checks.py" mfu "$run" \
        --checks-json "$WORK/checks.json" --json "$WORK/mfu.json"

    if [[ -n $SMOKE ]]; then
        step_if "$run/checkpoints" generate 120 "$PY" "$REPO/bench/generate.py" "$run" --new-tokens 8 \
            --batch-sizes 1,2 --repeats 1 --threads 2
        step_if "$run/checkpoints" decode 120 "$PY" "$REPO/bench/gpu_checks.py" decode "$run" --device "$DEV" \
            --new-tokens 8 --batch-sizes 1,2 --repeats 1 --json "$WORK/decode.json"
    else
        step_if "$run/checkpoints" generate 150 "$PY" "$REPO/bench/generate.py" "$run" --new-tokens 32 \
            --batch-sizes 1,4 --repeats 2 --threads 8
        step_if "$run/checkpoints" decode 120 "$PY" "$REPO/bench/gpu_checks.py" decode "$run" --device "$DEV" \
            --new-tokens 64 --batch-sizes 1,16 --repeats 2 --json "$WORK/decode.json"
    fi

    local tiny=(train --data "$WORK/data" --preset tiny --max-steps 12 --train.dist fsdp --train.device "$DEV"
        --train.log_every 1 --optim.schedule constant --quiet)
    local launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
    step_if "$WORK/data/meta.json" torchrun 90 "${launch[@]}" -m lmforge.cli "${tiny[@]}" --out "$WORK/runs/torchrun"
    step_if "$WORK/data/meta.json" torchrun_nccl 90 "${launch[@]}" "$REPO/bench/gpu_checks.py" dist-train \
        --json "$WORK/dist.json" -- "${tiny[@]}" --out "$WORK/runs/torchrun_nccl"
    step_if "$WORK/runs/torchrun_nccl/metrics.jsonl" torchrun_match 30 "$PY" "$REPO/bench/gpu_checks.py" \
        losses-match "$WORK/runs/torchrun" "$WORK/runs/torchrun_nccl" --json "$WORK/match.json"

    if [[ -n $SMOKE ]]; then
        step throughput 180 "$PY" "$REPO/bench/throughput.py" --device cpu --sizes 2x64x64 --batch 4 --steps 2 \
            --rounds 1 "${compile_flag[@]}"
    else
        step throughput 240 "$PY" "$REPO/bench/throughput.py" --device cuda --sizes 12x768x1024 --batch 16 \
            --steps 10 --rounds 2 "${compile_flag[@]}"
    fi

    collect --print
    echo "total $((SECONDS - START))s; $FAILED step(s) failed, timed out or skipped; results in $OUT/results.json"
    ((FAILED == 0))
}

mkdir -p "$OUT"
cd "$REPO" || exit 1
main 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
