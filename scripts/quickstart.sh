#!/usr/bin/env bash
# Runs the kernel on the GPU on a default workload, checks it against the CPU reference on a
# slice and prints shapes, times and TFLOP/s. Without a GPU it says so and exits non-zero.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cargo run --release --example quickstart "$@"
