#!/usr/bin/env bash
# The GPU or TPU rows of the README's benchmark table, on one accelerator of this host:
#   1. the fused Pallas recurrence against the nn.scan path, on the device (float32
#      matmuls at full precision, so both sides compute the same numbers);
#   2. for each model and dtype, our images/s, compile time, memory and MFU with each
#      recurrence, timm's (eager, cuDNN LSTM, AMP for bfloat16) next to the first on GPUs;
#   3. sequencer2d_l at batch 64 with scan_blocks and remat: does it fit in 16 GB?
#
#   OUT=/tmp/bench PEAK_TFLOPS_FLOAT32=67 PEAK_TFLOPS_BFLOAT16=989 launch/device_benchmark.sh
#   OUT=/tmp/bench PEAK_TFLOPS_BFLOAT16=197 TIMM=0 launch/device_benchmark.sh   # TPU v5e
#
# Environment: OUT (required; one JSON per run), MODELS (default "sequencer2d_s
# sequencer2d_m sequencer2d_l"), DTYPES ("float32 bfloat16"), RECURRENCES ("natural
# pallas"), BATCH_SIZE (64), PEAK_TFLOPS_FLOAT32 / PEAK_TFLOPS_BFLOAT16 (the device's
# dense peak; adds MFU), TIMM (1: compare with timm; 0 on TPUs, where torch has no
# device), GPU (default 0), DRY_RUN=1 to print the commands only.
# Needs: pip install -e ".[test]", jax for the device (pip install "jax[cuda12]" or
# "jax[tpu]"), and for TIMM=1 the torch extra (pip install -e ".[test,torch]").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "${here}/common.sh"
require OUT

export CUDA_VISIBLE_DEVICES="${GPU:-0}"
read -r -a models <<< "${MODELS:-sequencer2d_s sequencer2d_m sequencer2d_l}"
read -r -a dtypes <<< "${DTYPES:-float32 bfloat16}"
read -r -a recurrences <<< "${RECURRENCES:-natural pallas}"
batch_size="${BATCH_SIZE:-64}"
cd "${here}/.."
run mkdir -p "${OUT}"

run env JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest -q -p no:xdist \
  tests/test_pallas_recurrence.py tests/test_models.py -k 'pallas or fast_recurrence'

for model in "${models[@]}"; do
  for dtype in "${dtypes[@]}"; do
    peak="PEAK_TFLOPS_${dtype^^}"
    for recurrence in "${recurrences[@]}"; do
      args=(--model="${model}" --batch_size="${batch_size}" --dtype="${dtype}"
            --model_args="{\"recurrence\": \"${recurrence}\"}"
            --output_json="${OUT}/${model}_${dtype}_${recurrence}.json")
      if [[ "${TIMM:-1}" == 1 && "${recurrence}" == "${recurrences[0]}" ]]; then
        args+=(--compare_timm)
      fi
      if [[ -n "${!peak:-}" ]]; then
        args+=(--peak_tflops="${!peak}")
      fi
      run python -m sequencer_jax.benchmark "${args[@]}"
    done
  done
done

run python -m sequencer_jax.benchmark --model=sequencer2d_l --batch_size=64 \
  --model_args='{"scan_blocks": true, "remat": true}' --output_json="${OUT}/sequencer2d_l_b64_remat.json"
