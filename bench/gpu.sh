#!/usr/bin/env bash
# The GPU suite for a lent H100/H200, in one command, under 10 minutes (step caps 250 + 170 + 2 x 85 s):
#   bf16 correctness of every kernel on the device, the GPU benchmarks, sampling (eager and CUDA
#   graphs vs transformers), and a short training run
#   with both impls on the TinyStories sample, all written to one folder ready to commit.
#
# Here (with ../shared beside the repo):   bash bench/gpu.sh --prepare    # copies data into device_data/
# There (device tool, carry device_data):  bash bench/gpu.sh
# Results: bench/results/<date>-<device>/ ; when $OUT is set (the device tool), also $OUT/results.tgz.
# Installs nothing: it runs on the machine's own torch/triton.
set -euo pipefail
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

PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GPT2_TOKENIZER_DIR="$PWD/$DATA/gpt2-tokenizer" TINYSTORIES_DIR="$PWD/$DATA/tinystories"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
RES="bench/results/$(date -u +%F)-${GPU}"
mkdir -p "$RES"
$PY - <<'PY' | tee "$RES/env.txt"
import platform, torch, triton
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}")
print(f"device {torch.cuda.get_device_name()}  capability {torch.cuda.get_device_capability()}")
PY

status=0
# 1+2. Kernel correctness in bf16 on the device and the benchmarks (tokenization, CPU-bound, left out;
#      sampling in its own step below).
timeout 250 $PY -m pytest -q bench --ignore bench/test_bench_data.py --ignore bench/test_bench_sample.py \
  -p no:cacheprovider --benchmark-json "$RES/bench.json" \
  --benchmark-min-rounds 3 --benchmark-max-time 0.5 2>&1 | tee "$RES/pytest.log" || status=1

# 3. Sampling on the GPU: batch 1 and 64, eager and compiled (CUDA graphs), vs transformers generate;
#    the split-K decode kernel vs one program per row (bf16 checked against float64 first).
timeout 170 $PY -m pytest -q bench/test_bench_sample.py -k cuda -p no:cacheprovider \
  --benchmark-json "$RES/bench_sample.json" 2>&1 | tee "$RES/pytest_sample.log" || status=1

# 4. A short training run through each impl on the same data and seed.
for impl in torch triton; do
  timeout 85 $PY train.py --preset seed --data "$DATA/tinystories/tinystories-sample.jsonl" \
    --tokenizer "$DATA/gpt2-tokenizer" --cache-dir /tmp/gpt_cache --out-dir "/tmp/train_$impl" --overwrite \
    --impl "$impl" --max-steps 150 --warmup-steps 30 --eval-interval 50 --eval-tokens 65536 --seed 1 2>&1 \
    | tail -n 25 | tee "$RES/train_$impl.log" || status=1
  cp "/tmp/train_$impl/training_history.json" "$RES/train_${impl}_history.json" 2>/dev/null || status=1
done

$PY - "$RES" <<'PY' || status=1  # one results file: the sampling benchmarks join bench.json
import json, pathlib, sys
res = pathlib.Path(sys.argv[1])
main, extra = res / "bench.json", res / "bench_sample.json"
if extra.exists():
    data = json.loads((main if main.exists() else extra).read_text())
    if main.exists():
        data["benchmarks"] += json.loads(extra.read_text())["benchmarks"]
    main.write_text(json.dumps(data, indent=1))
    extra.unlink()
PY
$PY -m bench.report "$RES/bench.json" || status=1
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" "$RES"
fi
echo "results in $RES (status $status)"
exit $status
