#!/usr/bin/env bash
# The main job of a fresh machine: set-up, then `csp-tch run-all` with your flags
# (e.g. `scripts/run-all.sh --preset quick`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo run --release --quiet -- run-all "$@"
