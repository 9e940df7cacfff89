#!/usr/bin/env bash
# Runs the test suite: CPU tests always; GPU tests run when a GPU is present and print that they
# skipped otherwise (LONGFLASH_REQUIRE_GPU=1 turns a missing GPU into a failure).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cargo test --release "$@"
