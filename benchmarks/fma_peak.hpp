// dynamicid benchmarks: the machine's measured fp32 FMA peak, shared by the
// kernel and backend benchmarks.
//
//     const auto isas = dynamicid::bench::supported_isas();           // widest first
//     double peak = dynamicid::bench::measure_peak(isas.front(), 2, 0.1, 3);  // GFLOP/s on 2 threads
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#define DYNAMICID_BENCH_X86 1
#include <immintrin.h>
#endif

namespace dynamicid::bench {

using clock_type = std::chrono::steady_clock;

// ---- fp32 FMA throughput ------------------------------------------------------
//
// Each kernel runs `chains` independent multiply-add chains, one vector
// register each, for `reps` rounds: acc = acc * m + a. More chains than
// (FMA latency x FMA ports) keep every port busy. The chains converge to
// a / (1 - m) = 1, so values stay normal; the sum is returned so the work
// cannot be dropped.

using fma_kernel = float (*)(std::int64_t reps, float seed);

struct fma_isa {
    const char* name;
    fma_kernel kernel;
    int lanes;   // floats per vector
    int chains;  // independent accumulators
};

#if DYNAMICID_BENCH_X86
__attribute__((target("avx512f"), noinline)) inline float fma_avx512(std::int64_t reps, float seed) {
    constexpr int chains = 16;  // 32 zmm registers: 16 chains + 2 constants
    const __m512 m = _mm512_set1_ps(0.999f), a = _mm512_set1_ps(0.001f);
    __m512 acc[chains];
    for (int i = 0; i < chains; ++i) acc[i] = _mm512_set1_ps(seed + static_cast<float>(i));
    for (std::int64_t r = 0; r < reps; ++r) {
#pragma GCC unroll 16
        for (int i = 0; i < chains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], m, a);
    }
    __m512 sum = acc[0];
    for (int i = 1; i < chains; ++i) sum = _mm512_add_ps(sum, acc[i]);
    return _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx2,fma"), noinline)) inline float fma_avx2(std::int64_t reps, float seed) {
    constexpr int chains = 12;  // 16 ymm registers: 12 chains + 2 constants
    const __m256 m = _mm256_set1_ps(0.999f), a = _mm256_set1_ps(0.001f);
    __m256 acc[chains];
    for (int i = 0; i < chains; ++i) acc[i] = _mm256_set1_ps(seed + static_cast<float>(i));
    for (std::int64_t r = 0; r < reps; ++r) {
#pragma GCC unroll 12
        for (int i = 0; i < chains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], m, a);
    }
    __m256 sum = acc[0];
    for (int i = 1; i < chains; ++i) sum = _mm256_add_ps(sum, acc[i]);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, sum);
    float total = 0;
    for (float v : lanes) total += v;
    return total;
}
#endif

// Baseline: 128-bit generic vectors (SSE2 on x86-64), multiply then add (the
// compiler may fuse them when the target has FMA).
__attribute__((noinline)) inline float fma_sse(std::int64_t reps, float seed) {
    typedef float vec4 __attribute__((vector_size(16)));
    constexpr int chains = 12;
    const vec4 m = {0.999f, 0.999f, 0.999f, 0.999f}, a = {0.001f, 0.001f, 0.001f, 0.001f};
    vec4 acc[chains];
    for (int i = 0; i < chains; ++i) {
        const float v = seed + static_cast<float>(i);
        acc[i] = vec4{v, v, v, v};
    }
    for (std::int64_t r = 0; r < reps; ++r) {
#pragma GCC unroll 12
        for (int i = 0; i < chains; ++i) acc[i] = acc[i] * m + a;
    }
    vec4 sum = acc[0];
    for (int i = 1; i < chains; ++i) sum += acc[i];
    return sum[0] + sum[1] + sum[2] + sum[3];
}

// The instruction sets this CPU runs, widest first.
inline std::vector<fma_isa> supported_isas() {
    std::vector<fma_isa> out;
#if DYNAMICID_BENCH_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) out.push_back({"avx512", fma_avx512, 16, 16});
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back({"avx2_fma", fma_avx2, 8, 12});
#endif
    out.push_back({"sse_128bit", fma_sse, 4, 12});
    return out;
}

inline volatile float g_fma_sink = 0;

// Runs the kernel on `threads` threads at once; returns wall seconds from the
// common start to the last thread's end.
inline double run_fma(const fma_isa& isa, int threads, std::int64_t reps) {
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<float> results(static_cast<std::size_t>(threads));
    std::vector<std::thread> pool;
    pool.reserve(static_cast<std::size_t>(threads));
    for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            ready.fetch_add(1);
            while (!go.load(std::memory_order_acquire)) {
            }
            results[static_cast<std::size_t>(t)] = isa.kernel(reps, 1.0f + static_cast<float>(t));
        });
    while (ready.load() < threads) std::this_thread::yield();
    const auto t0 = clock_type::now();
    go.store(true, std::memory_order_release);
    for (auto& th : pool) th.join();
    const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
    float total = 0;
    for (float r : results) total += r;
    g_fma_sink = total;
    return seconds;
}

inline double fma_flops(const fma_isa& isa, int threads, std::int64_t reps) {
    return 2.0 * isa.lanes * isa.chains * static_cast<double>(reps) * threads;
}

// Rounds per kernel call that take about `seconds` on one thread.
inline std::int64_t calibrate_reps(const fma_isa& isa, double seconds) {
    std::int64_t reps = 1 << 14;
    for (;;) {
        const double t = run_fma(isa, 1, reps);
        if (t > 0.02) return std::max<std::int64_t>(1, static_cast<std::int64_t>(static_cast<double>(reps) * seconds / t));
        reps *= 4;
    }
}

// Best of a few short runs, in GFLOP/s.
inline double measure_peak(const fma_isa& isa, int threads, double seconds_per_run, int runs) {
    const std::int64_t reps = calibrate_reps(isa, seconds_per_run);
    double best = 0;
    for (int i = 0; i < runs; ++i) best = std::max(best, fma_flops(isa, threads, reps) / run_fma(isa, threads, reps) * 1e-9);
    return best;
}

}  // namespace dynamicid::bench
