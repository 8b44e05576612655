#!/usr/bin/env bash
# The GPU suite for a lent H100/H200, in parts that fit a 15-minute device lease (two calls, back to
# back, on one warm machine). Each part caps its own time and leaves its results even when it fails.
#
#   tests    python -m pytest tests on the GPU: every kernel test on CUDA, bf16 included      (<= 240 s)
#   kernels  kernel benchmarks: attention vs SDPA-FA2, LayerNorm vs copy bandwidth and eager,
#            the fused LM head vs F.linear + F.cross_entropy (bf16 checked first)              (<= 180 s)
#   e2e      train step (batch 32 x 256: triton, torch, compiled, transformers), the loop,
#            step memory, torch-vs-triton matching, sampling (eager, CUDA graphs, split-K)    (<= 240 s)
#   train    python train.py, seed preset, 60 steps through each impl, same seed                (<= 2 x 50 s)
#
# Here (with ../shared beside the repo):  bash bench/gpu.sh --prepare      # copies data into device_data/
# There (device tool, carry device_data):  call 1: bash bench/gpu.sh tests kernels   (timeout_s 480)
#                                          call 2: bash bench/gpu.sh e2e train       (timeout_s 420)
# With no part named, all four run. Results: bench/results/<date>-<device>/ (benchmarks in
# bench_<part>.json, logs, report_<part>.md); when $OUT is set (the device tool), also $OUT/results-<parts>.tgz.
# Installs nothing: it runs on the machine's own torch/triton.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=device_data

if [ "${1:-}" = "--prepare" ]; then
  SHARED="${SHARED_DIR:-../shared}"
  mkdir -p "$DATA/tinystories"
  cp -r "$SHARED/data/gpt2-tokenizer" "$DATA/"
  cp "$SHARED/data/tinystories/tinystories-sample.jsonl" "$DATA/tinystories/"
  du -sh "$DATA"
  exit 0
fi

PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests kernels e2e train)
for part in "${PARTS[@]}"; do
  case "$part" in tests|kernels|e2e|train) ;; *) echo "gpu.sh: unknown part '$part' (tests, kernels, e2e, train)" >&2; exit 2;; esac
done

PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GPT2_TOKENIZER_DIR="$PWD/$DATA/gpt2-tokenizer" TINYSTORIES_DIR="$PWD/$DATA/tinystories"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || { echo "gpu.sh: no CUDA device" >&2; exit 1; }
RES="bench/results/$(date -u +%F)-${GPU}"
mkdir -p "$RES"
$PY - <<'PY' | tee "$RES/env.txt"
import platform, torch, triton
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}")
print(f"device {torch.cuda.get_device_name()}  capability {torch.cuda.get_device_capability()}")
PY

status=0
bench() {  # bench PART TIMEOUT PYTEST-ARGS...: one benchmark part, its JSON and log in $RES
  local part=$1 limit=$2
  shift 2
  timeout "$limit" $PY -m pytest -q "$@" -p no:cacheprovider --benchmark-json "$RES/bench_$part.json" \
    --benchmark-min-rounds 3 --benchmark-max-time 0.5 -rs 2>&1 | tee "$RES/pytest_$part.log" || status=1
}

for part in "${PARTS[@]}"; do
  echo "=== $part ($(date -u +%T))"
  case "$part" in
    tests)
      timeout 240 $PY -m pytest -q tests -p no:cacheprovider --durations=15 -rs 2>&1 | tee "$RES/pytest_tests.log" || status=1 ;;
    kernels)
      bench kernels 180 bench/test_bench_attention.py bench/test_bench_layernorm.py bench/test_bench_cross_entropy.py ;;
    e2e)
      bench e2e 240 bench/test_bench_train.py bench/test_bench_loop.py bench/test_bench_memory.py \
        bench/test_bench_match.py bench/test_bench_sample.py -k "not cpu" ;;
    train)
      for impl in torch triton; do
        timeout 50 $PY train.py --preset seed --data "$DATA/tinystories/tinystories-sample.jsonl" \
          --tokenizer "$DATA/gpt2-tokenizer" --cache-dir /tmp/gpt_cache --out-dir "/tmp/train_$impl" --overwrite \
          --impl "$impl" --max-steps 60 --warmup-steps 20 --eval-interval 30 --eval-tokens 65536 --seed 1 \
          --no-progress 2>&1 | tail -n 25 | tee "$RES/train_$impl.log" || status=1
        cp "/tmp/train_$impl/training_history.json" "$RES/train_${impl}_history.json" 2>/dev/null || status=1
      done ;;
  esac
done

for json in "$RES"/bench_*.json; do
  [ -e "$json" ] && { $PY -m bench.report "$json" || status=1; }
done
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results-$(IFS=-; echo "${PARTS[*]}").tgz" "$RES"
fi
echo "results in $RES (status $status)"
exit $status
