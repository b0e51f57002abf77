#!/usr/bin/env bash
# Run the CPU benchmarks on the shared "small" configuration and write bench/results/*.txt / *.json.
# Usage: bench/run_cpu.sh [cache_append|guidance_batching|reuse_vs_rebuild|gpu_path_cpu|compile_cpu|fp8_golden|gpu_dry_run ...]  (default: all)
# Each benchmark waits for the (shared) machine to be quiet before it starts, uses 2 torch threads,
# and prints its table on stdout (kept in results/NAME.txt) and progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/results
mkdir -p "$OUT"
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2

run() {  # name, then the benchmark's arguments
  local name=$1; shift
  local cmd="$PY bench/$name.py --json $OUT/$name.json $*"
  echo "== $name: $cmd" >&2
  local start=$SECONDS
  { echo "# command: $cmd"; echo "# run: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $($PY -c 'import torch; print("torch", torch.__version__)')"
    $cmd; } > "$OUT/$name.txt.tmp"
  mv "$OUT/$name.txt.tmp" "$OUT/$name.txt"
  echo "== $name: done in $((SECONDS - start)) s" >&2
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(cache_append guidance_batching reuse_vs_rebuild gpu_path_cpu gpu_dry_run)
for t in "${targets[@]}"; do
  case $t in
    cache_append|guidance_batching|reuse_vs_rebuild) run "$t" ;;
    gpu_path_cpu|compile_cpu|fp8_golden) OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 run "$t" ;;  # one thread: set inside too
    gpu_dry_run)  # the GPU script's tiny CPU mode: proves it runs end to end (figures meaningless)
      echo "== gpu_bagel7b --dry-run" >&2
      $PY bench/gpu_bagel7b.py --dry-run --out "$OUT/gpu_bagel7b.dry-run.json" > /dev/null ;;
    *) echo "unknown benchmark: $t" >&2; exit 1 ;;
  esac
done
