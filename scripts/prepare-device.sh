#!/usr/bin/env bash
# Builds .device/ for the GPU machine with ../shared/gpu/prepare-device (csp-tch against that machine's
# libtorch 2.11, the data and its decoder), then checks what it built: the binary must start here
# against the same libtorch and report CUDA graphs available, since `--cuda-graphs auto` is the
# default there and scripts/gpu-check.sh measures that path. Fails loudly otherwise.
# Usage: scripts/prepare-device.sh [CHECKOUT] [DEST]   (as ../shared/gpu/prepare-device)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
checkout=$(cd "${1:-$repo}" && pwd)
dest=${2:-$checkout/.device}
"$repo/../shared/gpu/prepare-device" "$checkout" "$dest"
torch_lib=$(echo "${CSP_TCH_DEVICE_HOME:-$HOME/.cache/csp-tch-device}"/venv/lib/python3*/site-packages/torch/lib)
env_out=$(LD_LIBRARY_PATH=$torch_lib "$dest/csp-tch" env) || { echo "prepare-device: $dest/csp-tch does not start" >&2; exit 1; }
if ! grep -q '^CUDA graphs: available in this build' <<<"$env_out"; then
  echo "prepare-device: FAILED: $dest/csp-tch was built without CUDA graphs:" >&2
  grep '^CUDA graphs' <<<"$env_out" >&2
  echo "(see the build log in ${CSP_TCH_DEVICE_HOME:-$HOME/.cache/csp-tch-device}/build/build.log)" >&2
  exit 1
fi
echo "prepare-device: $dest/csp-tch has CUDA graphs; on the device: OUT=\$OUT bash scripts/gpu-check.sh"
