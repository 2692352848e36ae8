#!/usr/bin/env bash
# Downloads, here (where pip reaches PyPI), the pinned wheels of what the lent GPU
# machine's image lacks for launch/device_benchmark.sh, into WHEELS (default .whl, git-
# ignored), for the device tool's `carry`. The image has jax, flax, optax, orbax, chex,
# absl, numpy, PyYAML, tensorboard, torch and timm; it lacks ml_collections (the configs).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "${here}/common.sh"
cd "${here}/.."

wheels="${WHEELS:-.whl}"
# Pure-Python wheels, so any Python 3 and platform takes them; pinned to what is tested.
packages=(ml_collections==1.1.0)
run mkdir -p "${wheels}"
run "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: \
  --dest "${wheels}" "${packages[@]}"
run du -sh "${wheels}"
