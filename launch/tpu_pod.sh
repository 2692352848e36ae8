#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create (or reuse) it, install, run on all workers.
#
#   TPU_NAME=seq-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 PROJECT=my-project \
#   WORKDIR=gs://bucket/seq_s TFDS_DATA_DIR=gs://bucket/tfds \
#   CONFIG=configs/imagenet.py:model=sequencer2d_s,dtype=bfloat16 launch/tpu_pod.sh
#
# Environment: TPU_NAME, ZONE, ACCELERATOR_TYPE, PROJECT, WORKDIR (gs://), TFDS_DATA_DIR
# (gs://, where imagenet2012 was prepared) are required; CONFIG (unset: resume the run in
# WORKDIR with the config saved there), RUNTIME_VERSION (default tpu-ubuntu2204-base),
# REPO_URL (default: this checkout's origin), BRANCH (default main), DRY_RUN=1 to print the
# gcloud commands.
# Extra arguments go to the trainer. jax.distributed initialises itself on TPU pods.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "${here}/common.sh"
require TPU_NAME ZONE ACCELERATOR_TYPE PROJECT WORKDIR TFDS_DATA_DIR
set_config_flag
runtime="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
repo="${REPO_URL:-$(git -C "${here}" remote get-url origin 2>/dev/null || echo unset)}"
branch="${BRANCH:-main}"
tpu=(gcloud compute tpus tpu-vm --project="${PROJECT}" --zone="${ZONE}")

if [[ "${DRY_RUN:-0}" == "1" ]] || ! "${tpu[@]}" describe "${TPU_NAME}" >/dev/null 2>&1; then
  run "${tpu[@]}" create "${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --version="${runtime}"
fi

install="set -e; if [ ! -d sequencer-jax ]; then git clone --branch ${branch} ${repo} sequencer-jax; fi; \
cd sequencer-jax && git fetch -q && git checkout -q ${branch} && git pull -q && \
pip install -q -U 'jax[tpu]' && pip install -q -e ."
run "${tpu[@]}" ssh "${TPU_NAME}" --worker=all --command="${install}"

args=""
for arg in "${config_flag[@]}" "$@"; do
  args+=" $(printf '%q' "${arg}")"
done
train="cd sequencer-jax && TFDS_DATA_DIR=${TFDS_DATA_DIR} python3 -m sequencer_jax.main \
--workdir=${WORKDIR}${args}"
run "${tpu[@]}" ssh "${TPU_NAME}" --worker=all --command="${train}"
