#!/usr/bin/env bash
# Prepares the GPU measurement on this (CPU) machine: builds the CUDA binary with the recipe in
# ../shared/gpu/, strips and compresses it into .gpu/ (git-ignored), copies the runner beside it,
# and downloads the diffusers wheels the device machine lacks into .whl/ (git-ignored).
# Then, on the device machine (the `device` tool's run, carrying .gpu and .whl):
#     bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${STEPSTREAM_SHARED:-../shared}"
# shellcheck disable=SC1091
source "$shared/gpu/cuda-env.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
cargo build --release --features cuda --bin stepstream
mkdir -p .gpu
strip -o .gpu/stepstream "$CARGO_TARGET_DIR/release/stepstream"
xz -T2 -6 -f .gpu/stepstream            # -> .gpu/stepstream.xz (the raw binary is too big to carry)
cp "$shared/gpu/gpu-run.sh" .gpu/
if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d .whl diffusers==0.42.1 importlib_metadata
fi
ls -la .gpu .whl
