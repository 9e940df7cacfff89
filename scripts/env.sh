# Sourced by the scripts: installs what a fresh machine lacks (scripts/install-toolchain.sh) and
# exports NVCC for build.rs.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NVCC=$("$root/scripts/install-toolchain.sh" | tail -n 1)
export NVCC
cd "$root"
