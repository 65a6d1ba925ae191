#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (see benchmarks/gpu.py's docstring).
#   bash benchmarks/gpu.sh            # results in $OUT (or benchmarks/results): gpu.json, gpu.log
#   bash benchmarks/gpu.sh --quick    # the small smoke run
#   bash benchmarks/gpu.sh --sdxl     # instead: the SDXL CoDi step at 1024x1024 (bf16 frozen,
#                                     # float32 adapter, remat), batch 1, 2, 4, ... until out of
#                                     # memory (benchmarks/sdxl_step.py; sdxl_gpu.json / .log)
# One lent device's 15 minutes hold one of the two runs (each stops by 570 s), not both.
# Installs the wheels in benchmarks/.wheels (from `pip download beartype diffusers --no-deps
# -d benchmarks/.wheels`) where present and the package is missing; stops at 570 s whatever
# happens (the JSON is rewritten after each phase, so what was measured stays).
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-$(command -v python || command -v python3)}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
for pkg in beartype diffusers; do
  if ! "$py" -c "import $pkg" 2>/dev/null; then
    wheels=$(ls benchmarks/.wheels/"$pkg"-*.whl 2>/dev/null | head -n 1)
    if [ -n "$wheels" ]; then
      "$py" -m pip install --quiet --no-index --no-deps "$wheels" || echo "could not install $wheels"
    else
      echo "$pkg: not installed, no wheel in benchmarks/.wheels (fine for beartype; diffusers only adds the PyTorch side)"
    fi
  fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
if [ "${1:-}" = "--sdxl" ]; then
  shift
  timeout --signal=TERM --kill-after=15 570 "$py" benchmarks/sdxl_step.py --resolution 1024 \
    --phases run --batch_search --repeats 3 --json "$out/sdxl_gpu.json" "$@" 2>&1 | tee "$out/sdxl_gpu.log"
  exit "${PIPESTATUS[0]}"
fi
timeout --signal=TERM --kill-after=15 570 "$py" benchmarks/gpu.py --json "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
exit "${PIPESTATUS[0]}"
