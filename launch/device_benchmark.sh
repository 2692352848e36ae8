#!/usr/bin/env bash
# The first GPU run, as one command within one time budget (sequencer_jax/device_benchmark.py
# says what each phase measures). From the repository root, no network needed:
#
#   OUT=/tmp/bench launch/device_benchmark.sh             # the GPU machine
#   OUT=/tmp/bench SMOKE=1 BUDGET_S=300 launch/device_benchmark.sh   # any CPU, toy sizes
#
# Environment: OUT (required: one JSON per phase and progress.log), BUDGET_S (default
# 450: wall-clock seconds for every phase together, after the wheels' install and a GPU
# check of a few seconds; phases that do not fit are skipped),
# SMOKE=1 (toy sizes, CPU allowed), WHEELS (default .whl: packages the machine lacks,
# written by launch/device_wheels.sh and installed into SITE, default a new temporary
# folder, put first on PYTHONPATH), PYTHON (default python3), DRY_RUN=1 to print the
# commands only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "${here}/common.sh"
require OUT
cd "${here}/.."

python="${PYTHON:-python3}"
wheels="${WHEELS:-.whl}"
if compgen -G "${wheels}/*.whl" > /dev/null; then
  site="${SITE:-$(mktemp -d)}"
  run "${python}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "${site}" "${wheels}"/*.whl
  export PYTHONPATH="${site}${PYTHONPATH:+:${PYTHONPATH}}"
fi
export PYTHONPATH=".${PYTHONPATH:+:${PYTHONPATH}}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
smoke=false
[[ "${SMOKE:-0}" == 1 ]] && smoke=true
run "${python}" -m sequencer_jax.device_benchmark --out="${OUT}" \
  --budget_s="${BUDGET_S:-450}" --smoke="${smoke}"
