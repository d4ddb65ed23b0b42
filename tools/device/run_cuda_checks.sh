#!/usr/bin/env bash
# CUDA backend checks on a machine with an NVIDIA GPU (sm_90 build: H100/H200).
#
# The device machine has nvcc, cmake and PyTorch but not the library's C++
# dependencies (Eigen, xtensor, range-v3, nlohmann_json, Catch2), so the test
# and benchmark programs are normally built on the development machine and
# carried over:
#
#   tools/device/run_cuda_checks.sh stage          # here: build, copy into .devbuild/
#   (on the device, carrying .devbuild, and .whl for diffusers if wanted:)
#   tools/device/run_cuda_checks.sh                # run everything, logs in $OUT
#
# Without .devbuild/ the script configures and builds in build-device/ (needs
# those dependencies where it runs) and runs the tests through ctest -L gpu.
#
# The golden cases the tests read are about 70 MB. Where the tree that reaches
# the GPU machine cannot hold them all, stage them in parts and run the test
# program once per part (the programs and logs stay from the first run):
#
#   GOLDEN_AREAS="torch official vae clip schedulers" tools/device/run_cuda_checks.sh stage
#   GOLDEN_AREAS="unet" tools/device/run_cuda_checks.sh golden   # only refresh .devdata/golden
#   tools/device/run_cuda_checks.sh tests "[conform]"           # there: the test step alone, with Catch filters
#
# When tests/data/golden has no files (the tracked data left behind), the
# staged .devdata/golden stands in for it.
#
# Steps, each with its own time limit and log, each run even when an earlier
# one failed: device info, the CUDA test program (matrix, fused attention,
# SAA gate, allocator, goldens), the PyTorch baseline
# (tools/bench/pytorch_cuda_baseline.py: SDPA and the diffusers UNet), then
# dynamicid_bench_cuda (Google Benchmark: fused and composed attention, one
# SD1.5 UNet evaluation, f16, batch 2, 512x512) given PyTorch's figures so
# that it prints the ratios (vs_torch). Logs and
# summary.txt go to $OUT (default ./device-out). About 1-2 minutes in all with
# staged programs (64 s on an H200). PROFILE=1 adds per-kernel times of the
# UNet benchmark from Nsight Compute ($OUT/ncu.csv).
#
# The diffusers UNet baseline needs diffusers on the device: carry its wheel
# (.whl/diffusers-*.whl, see the device notes) and it is installed to
# /tmp/site first; without it that part is skipped with a note.
set -u

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"

# golden: copies the golden areas named in GOLDEN_AREAS into .devdata/golden.
stage_goldens() {
    rm -rf .devdata && mkdir -p .devdata/golden
    for area in ${GOLDEN_AREAS:-}; do cp -r "tests/data/golden/$area" .devdata/golden/; done
    grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo '/.devdata/' >> .git/info/exclude
    du -sh .devdata
}
if [ "${1:-}" = "golden" ]; then
    stage_goldens
    exit 0
fi

if [ "${1:-}" = "stage" ]; then
    set -e
    build="${BUILD_DIR:-build-cuda}"
    cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90
    cmake --build "$build" -j2 --target dynamicid_cuda_tests dynamicid_bench_cuda
    rm -rf .devbuild && mkdir -p .devbuild/lib
    cp "$build/tests/cuda/dynamicid_cuda_tests" "$build/benchmarks/dynamicid_bench_cuda" .devbuild/
    strip .devbuild/dynamicid_cuda_tests .devbuild/dynamicid_bench_cuda || true
    # OpenMP runtime of the host compiler (the CPU reference backend in the
    # tests) and Google Benchmark: the device machine has neither.
    gomp="$(g++ -print-file-name=libgomp.so.1)"
    [ -f "$gomp" ] && cp -L "$gomp" .devbuild/lib/
    for lib in $(ldd .devbuild/dynamicid_bench_cuda | grep -o '/[^ ]*libbenchmark[^ ]*'); do cp -L "$lib" .devbuild/lib/; done
    echo "$repo" > .devbuild/source_dir   # where the test data path was compiled in
    grep -qx '/.devbuild/' .git/info/exclude 2>/dev/null || echo '/.devbuild/' >> .git/info/exclude
    du -sh .devbuild
    [ -n "${GOLDEN_AREAS:-}" ] && stage_goldens
    exit 0
fi

if [ -d .devdata/golden ] && [ -z "$(find tests/data/golden -type f -name '*.safetensors' 2>/dev/null | head -n 1)" ]; then
    rm -rf tests/data/golden && mkdir -p tests/data && ln -s ../../.devdata/golden tests/data/golden
fi
mode="${1:-all}"
[ "$mode" = "tests" ] && shift

OUT="${OUT:-$repo/device-out}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, log in $OUT/NAME.log.
step() {
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    echo "== $name: $*" | tee -a "$summary"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$summary"
    tail -n 5 "$OUT/$name.log" | sed 's/^/   /' >> "$summary"
    return 0
}

# Libraries: the toolkit's, cuDNN from the Python wheel PyTorch uses, and what was staged.
# Python wheel libraries (cuDNN, cuBLAS) as a fallback behind the toolkit's own.
wheel_libs="$(python3 -c 'import os, importlib
for name in ("nvidia.cudnn", "nvidia.cublas", "nvidia.cu13"):
    try:
        m = importlib.import_module(name)
        for p in m.__path__:
            for sub in ("lib", "lib64"):
                if os.path.isdir(os.path.join(p, sub)): print(os.path.join(p, sub))
    except Exception:
        pass' 2>/dev/null | paste -sd: -)"
export LD_LIBRARY_PATH="$repo/.devbuild/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:${wheel_libs}:${LD_LIBRARY_PATH:-}"

step info 30 bash -c 'nvidia-smi; nvcc --version; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; [ -x .devbuild/dynamicid_cuda_tests ] && ldd .devbuild/dynamicid_cuda_tests | grep -E "cud|not found"'

if [ -x .devbuild/dynamicid_cuda_tests ]; then
    # The tests read goldens from the source path compiled in: make it exist.
    src="$(cat .devbuild/source_dir 2>/dev/null || echo /work/main)"
    if [ ! -d "$src/tests/data" ]; then
        mkdir -p "$(dirname "$src")" && ln -sfn "$repo" "$src"
    fi
    tests=(.devbuild/dynamicid_cuda_tests)
    bench=.devbuild/dynamicid_bench_cuda
    echo "== using the staged programs in .devbuild (sources: $src)" | tee -a "$summary"
else
    step build 300 bash -c "cmake -S . -B build-device -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DDYNAMICID_BUILD_EXAMPLES=OFF -DDYNAMICID_BUILD_TOOLS=OFF && \
        cmake --build build-device -j16 --target dynamicid_cuda_tests dynamicid_bench_cuda"
    tests=(ctest --test-dir build-device -L gpu --output-on-failure -j1)
    bench=build-device/benchmarks/dynamicid_bench_cuda
fi

if [ "${tests[0]}" = "ctest" ]; then
    step tests 150 "${tests[@]}"
elif [ "$mode" = "tests" ]; then
    step tests 150 "${tests[@]}" --durations yes "$@"
    echo "== done in $SECONDS s" | tee -a "$summary"
    exit 0
else
    step tests 150 "${tests[@]}" --durations yes
fi
if ls .whl/*.whl > /dev/null 2>&1; then
    step wheels 40 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
step torch 100 env PYTHONUNBUFFERED=1 python3 tools/bench/pytorch_cuda_baseline.py --iters 10

# PyTorch's figures of this run go to the benchmark, which prints the ratios (vs_torch).
torch_flags=()
t4096="$(grep -o 'tokens=4096 dim=40: [0-9.]*' "$OUT/torch.log" | awk '{print $3}')"
t1024="$(grep -o 'tokens=1024 dim=80: [0-9.]*' "$OUT/torch.log" | awk '{print $3}')"
tunet="$(grep -o 'image=512: [0-9.]*' "$OUT/torch.log" | awk '{print $2}')"
[ -n "$t4096" ] && [ -n "$t1024" ] && torch_flags+=("--torch-attention-ms=$t4096,$t1024")
[ -n "$tunet" ] && torch_flags+=("--torch-unet-ms=$tunet")
step bench 120 "$bench" "${torch_flags[@]}" --benchmark_counters_tabular=true

# Optional per-kernel times of one UNet evaluation (Nsight Compute; PROFILE=1).
if [ "${PROFILE:-0}" = 1 ] && command -v ncu > /dev/null; then
    step profile 150 ncu --metrics gpu__time_duration.sum --csv --log-file "$OUT/ncu.csv" "$bench" --benchmark_filter=unet --unet-iterations=1
fi

echo "== done in $SECONDS s" | tee -a "$summary"
