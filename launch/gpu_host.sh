#!/usr/bin/env bash
# Train on one host with all its local GPUs (one process; the mesh spans every GPU).
#
#   CONFIG=configs/imagenet.py:model=sequencer2d_s,dtype=bfloat16 \
#   WORKDIR=/checkpoints/seq_s TFDS_DATA_DIR=/data/tfds launch/gpu_host.sh [--config.key=value ...]
#
# Environment: WORKDIR (required), CONFIG (unset: resume the run in WORKDIR with the
# config saved there), TFDS_DATA_DIR (optional),
# GPUS (optional, e.g. "0,1,2,3"; default all), DRY_RUN=1 to print the command only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "${here}/common.sh"
require WORKDIR
set_config_flag

if [[ -n "${GPUS:-}" ]]; then
  export CUDA_VISIBLE_DEVICES="${GPUS}"
fi
# Let XLA take most of the GPU memory up front, as one process owns all GPUs.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
cd "${here}/.."
run python -m sequencer_jax.main "${config_flag[@]}" --workdir="${WORKDIR}" "$@"
