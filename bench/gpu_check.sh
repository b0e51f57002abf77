#!/usr/bin/env bash
# The GPU path's device check: one call on one H100/H200 as the device machine comes (its python3
# has CUDA torch, transformers, safetensors, pillow, pytest; nothing is fetched or installed),
# in under 8 minutes:
#   1. the GPU tests: tests/model/generation/test_gpu.py (CUDA graphs vs eager in bf16 judged by BF16.md's
#      near-tie rule, with the masked and the compiled flex kernels; graphs reused across jobs; the
#      mask-free prefill; a non-default device; golden cases in fp32, within the bf16 bounds
#      compiled, and with FP8 weights within theirs; no host sync in the denoising loop), the GPU
#      path's and the attention's CPU-form tests and the branch-parallel tests (NCCL with two GPUs);
#   2. bench/attention_table.py --install: every SDPA backend on BAGEL's attention shapes ->
#      bench/results/attention_table.json, and this GPU's rules into model/network/attention_table.json
#      (which the benchmark after it, and the model, then use);
#   3. bench/gpu_e2e.py: the real BAGEL-7B-MoT shape with random bf16 weights, eager vs compiled
#      vs FP8: decode ms/token at 1k and 8k context, 512^2 20-step and 1024^2 default
#      text-to-image, one whole guided iteration at 1024^2, peak GPU memory, the FP8 and compiled
#      latents' distance from eager -> bench/results/gpu_e2e.json;
#   4. bench/gpu_train.py: one LoRA training step on the BAGEL-7B-MoT shape with random bf16 weights
#      at a 10k-token packed sequence (step time, tokens/s, peak memory) -> bench/results/gpu_train.json.
# Commit what it wrote: both JSON files under bench/results/ and model/network/attention_table.json.
# Exit status: non-zero when a test fails (loudly, after the benchmark still ran) or the benchmark
# fails. Logs and JSON are also copied into $OUT when it is set (the device tool's return folder).
#
# Usage: bench/gpu_check.sh              # on the device machine: device tool `run` with
#                                        # command "bench/gpu_check.sh", timeout_s 540
#        bench/gpu_check.sh --dry-run    # CPU: the same steps on a tiny model (tests/bench/test_bench.py)
# Env: PY (default python3), GPU_CHECK_TESTS (test paths), GPU_CHECK_RESULTS (default bench/results),
#      GPU_CHECK_BUDGET_S (default 420: the benchmark skips what would end past it, counted from
#      the script's start; a skipped mode or row is listed in the JSON's "skipped"),
#      GPU_CHECK_MODES (default eager,compiled,fp8).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
TESTS=${GPU_CHECK_TESTS:-tests/model/generation/test_gpu.py tests/model/generation/test_gpu_path.py tests/model/network/test_attention.py tests/model/generation/test_parallel.py}
MODES=${GPU_CHECK_MODES:-eager,compiled,fp8}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
TRAIN_S=100  # what step 4 (bench/gpu_train.py) takes on an H100, with its model's build
RESULTS=${GPU_CHECK_RESULTS:-bench/results}
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
[ $DRY = 1 ] && export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
start=$SECONDS
status=0

echo "== gpu_check: $(date -u +%FT%TZ) $($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(), "GPUs")')"
[ $DRY = 0 ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }

echo "== 1. GPU tests: $TESTS"
# shellcheck disable=SC2086
$PY -m pytest -c bench/gpu_pytest.ini --rootdir=. --confcutdir=tests/model -q $TESTS 2>&1 | tee "$LOGS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
if [ "$tests_rc" -ne 0 ]; then
  echo "!! GPU TESTS FAILED (pytest exit $tests_rc): see the log above; the benchmark still runs" >&2
  status=1
fi

echo "== 2. attention backends per shape ($((SECONDS - start)) s used)"
if [ $DRY = 1 ]; then
  table_out=$RESULTS/attention_table.dry-run.json
  $PY bench/attention_table.py --dry-run --out "$table_out" 2> >(tee "$LOGS/attention_table.log" >&2)
else
  table_out=$RESULTS/attention_table.json
  $PY bench/attention_table.py --install --out "$table_out" 2> >(tee "$LOGS/attention_table.log" >&2)
fi
table_rc=$?
if [ "$table_rc" -ne 0 ]; then
  echo "!! ATTENTION TABLE FAILED (exit $table_rc): the benchmark runs with torch's own choices" >&2
  status=1
fi

echo "== 3. BAGEL-7B-MoT shape end to end, modes $MODES ($((SECONDS - start)) s used of the ${BUDGET} s budget)"
if [ $DRY = 1 ]; then
  bench_out=$RESULTS/gpu_e2e.dry-run.json
  $PY bench/gpu_e2e.py --dry-run --modes "$MODES" --out "$bench_out" > "$LOGS/gpu_e2e.json" 2> >(tee "$LOGS/gpu_e2e.log" >&2)
else
  bench_out=$RESULTS/gpu_e2e.json
  # the training step after it takes about TRAIN_S: the benchmark's share of the budget leaves it that
  $PY bench/gpu_e2e.py --modes "$MODES" --budget-s $((BUDGET - TRAIN_S - (SECONDS - start))) --out "$bench_out" > "$LOGS/gpu_e2e.json" 2> >(tee "$LOGS/gpu_e2e.log" >&2)
fi
bench_rc=$?
if [ "$bench_rc" -ne 0 ]; then
  echo "!! BENCHMARK FAILED (exit $bench_rc)" >&2
  status=1
fi

echo "== 4. one LoRA training step, BAGEL-7B-MoT shape, a 10k-token pack ($((SECONDS - start)) s used)"
train_out=$RESULTS/gpu_train$([ $DRY = 1 ] && echo .dry-run).json
$PY bench/gpu_train.py $([ $DRY = 1 ] && echo --dry-run) --out "$train_out" > "$LOGS/gpu_train.log" \
  || { echo "!! GPU TRAINING STEP FAILED" >&2; status=1; }

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$LOGS"/*.log "$OUT"/ 2>/dev/null
  [ -f "$bench_out" ] && cp "$bench_out" "$OUT"/
  [ -f "$table_out" ] && cp "$table_out" "$OUT"/
  [ -f "$train_out" ] && cp "$train_out" "$OUT"/
  [ $DRY = 0 ] && cp model/network/attention_table.json "$OUT"/attention_table.installed.json
fi
rm -rf "$LOGS"
echo "== gpu_check: $([ $status = 0 ] && echo PASSED || echo FAILED) in $((SECONDS - start)) s"
exit $status
