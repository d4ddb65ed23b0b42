#!/usr/bin/env bash
# Installs what dynamicid needs to build, test and run its examples on
# Debian 12. Runs apt only when a package is missing, so a prepared machine
# pays nothing. Needs root (or sudo) when something is missing.
set -euo pipefail

# ocl-icd-opencl-dev: oneDNN's CMake package config looks for OpenCL, which
# libdnnl-dev only recommends (and --no-install-recommends skips).
packages=(
  build-essential cmake g++ clang libclang-rt-14-dev
  libeigen3-dev libxtensor-dev xtl-dev librange-v3-dev nlohmann-json3-dev
  catch2 libbenchmark-dev libstb-dev libdnnl-dev ocl-icd-opencl-dev zlib1g-dev
  libonnx-dev libonnx-testdata libprotobuf-dev protobuf-compiler
  libopenmpi-dev openmpi-bin
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q </dev/null
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
