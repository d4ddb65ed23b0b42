#!/usr/bin/env bash
# Configures (Release), builds everything and runs the test suite except the
# tests labelled `long` (run those with: ctest --test-dir build -L long).
#   BUILD_DIR   build directory (default: build)
set -euo pipefail

cd "$(dirname "$0")/../.."
build_dir="${BUILD_DIR:-build}"

cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build_dir" -j"$(nproc)"
ctest --test-dir "$build_dir" --output-on-failure -j2 -LE "long|gpu"
