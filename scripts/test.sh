#!/usr/bin/env bash
# The test command of a fresh machine: set-up, then the whole test suite (release build, one warm target dir).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release "$@"
