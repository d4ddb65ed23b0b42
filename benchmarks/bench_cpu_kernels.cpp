// dynamicid benchmarks: the CPU backend's GEMM and convolution against the
// machine's measured fp32 FMA peak.
//
// At start-up the program measures the fp32 fused-multiply-add throughput of
// this machine (1 thread and all threads) with the widest vector instructions
// the CPU supports, chosen at run time, so a portable build still compares its
// kernels against what the hardware can do. Every GEMM and convolution then
// reports
//   GFLOP/s        rate counter (2 flops per multiply-add),
//   frac_of_peak   GFLOP/s over the all-threads peak measured in the same run,
//   peak_GFLOP/s   that peak.
// Shapes follow Stable Diffusion 1.5 (UNet attention projections and scores,
// UNet and VAE 3x3 convolutions). The backend context uses all hardware threads.
//
//   dynamicid_bench_cpu_kernels                      # everything, under 30 s on 2 cores
//   dynamicid_bench_cpu_kernels --benchmark_filter=conv
//   dynamicid_bench_cpu_kernels --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//
// On a shared machine use repetitions and read the "_max" rows: the largest
// GFLOP/s over the repetitions is the least disturbed one. A CPU time well
// below the real time on a multi-threaded row also means the threads were
// competing with other processes (CPU time counts the calling thread only).
#include <benchmark/benchmark.h>

#include <dynamicid/backends/cpu.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "fma_peak.hpp"

namespace {

using dynamicid::cpu_backend;
using dynamicid::index_t;
using namespace dynamicid::bench;  // fma_isa, supported_isas, run_fma, measure_peak, clock_type

// ---- shared state set once in main ------------------------------------------------

int g_threads = 1;           // the backend context's thread count (all hardware threads)
double g_peak_all = 0;       // GFLOP/s, widest ISA, g_threads threads
double g_peak_single = 0;    // GFLOP/s, widest ISA, 1 thread

void report_rate(benchmark::State& st, double flops_per_iter, double seconds, double peak) {
    const double iters = static_cast<double>(st.iterations());
    const double gflops = seconds > 0 ? flops_per_iter * iters / seconds * 1e-9 : 0;
    st.counters["GFLOP/s"] = benchmark::Counter(flops_per_iter * iters * 1e-9, benchmark::Counter::kIsRate);
    st.counters["frac_of_peak"] = benchmark::Counter(peak > 0 ? gflops / peak : 0);
    st.counters["peak_GFLOP/s"] = benchmark::Counter(peak);
}

void bench_fma(benchmark::State& st, fma_isa isa, int threads, std::int64_t reps) {
    double seconds = 0;
    for (auto _ : st) {
        const double t = run_fma(isa, threads, reps);  // excludes thread start-up
        st.SetIterationTime(t);
        seconds += t;
    }
    report_rate(st, fma_flops(isa, threads, reps), seconds, threads == 1 ? g_peak_single : g_peak_all);
}

// Deterministic values in [-1, 1).
template <class T>
cpu_backend::buffer<T> make_input(cpu_backend::context& ctx, std::size_t n, std::uint32_t seed) {
    auto buf = cpu_backend::allocate<T>(ctx, n);
    std::uint32_t s = seed * 2654435761u + 12345u;
    T* p = buf.data();
    for (std::size_t i = 0; i < n; ++i) {
        s = s * 1664525u + 1013904223u;
        p[i] = dynamicid::element_cast<T>(static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
    }
    return buf;
}

// ---- GEMM -------------------------------------------------------------------------

struct gemm_case {
    const char* what;
    index_t batch, m, n, k;
    bool trans_b;
};

template <class T>
void bench_gemm(benchmark::State& st, gemm_case g, int threads) {
    cpu_backend::context ctx{.threads = threads};
    const dynamicid::gemm_desc d{.batch = g.batch, .m = g.m, .n = g.n, .k = g.k, .trans_a = false, .trans_b = g.trans_b,
                                 .lda = g.k, .ldb = g.trans_b ? g.k : g.n, .ldc = g.n,
                                 .stride_a = g.m * g.k, .stride_b = g.k * g.n, .stride_c = g.m * g.n};
    const auto a = make_input<T>(ctx, static_cast<std::size_t>(g.batch * g.m * g.k), 1);
    const auto b = make_input<T>(ctx, static_cast<std::size_t>(g.batch * g.k * g.n), 2);
    auto c = cpu_backend::allocate<T>(ctx, static_cast<std::size_t>(g.batch * g.m * g.n));
    cpu_backend::gemm<T>(ctx, d, a.data(), b.data(), c.data());  // warm-up: first touch, thread pool
    const auto t0 = clock_type::now();
    for (auto _ : st) {
        cpu_backend::gemm<T>(ctx, d, a.data(), b.data(), c.data());
        benchmark::DoNotOptimize(c.data());
        benchmark::ClobberMemory();
    }
    const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
    const double flops = 2.0 * static_cast<double>(g.batch) * static_cast<double>(g.m) * static_cast<double>(g.n) * static_cast<double>(g.k);
    report_rate(st, flops, seconds, threads == 1 ? g_peak_single : g_peak_all);
}

// ---- convolution ---------------------------------------------------------------------

struct conv_case {
    const char* what;
    dynamicid::conv2d_desc d;
};

template <class T>
void bench_conv(benchmark::State& st, conv_case cc, int threads) {
    cpu_backend::context ctx{.threads = threads};
    const auto& d = cc.d;
    const index_t k = (d.c_in / d.groups) * d.kh * d.kw;
    const auto x = make_input<T>(ctx, static_cast<std::size_t>(d.n * d.c_in * d.h * d.w), 3);
    const auto w = make_input<T>(ctx, static_cast<std::size_t>(d.c_out * k), 4);
    const auto bias = make_input<T>(ctx, static_cast<std::size_t>(d.c_out), 5);
    auto y = cpu_backend::allocate<T>(ctx, static_cast<std::size_t>(d.n * d.c_out * d.out_h() * d.out_w()));
    cpu_backend::conv2d_forward<T>(ctx, d, x.data(), w.data(), bias.data(), y.data());  // warm-up
    const auto t0 = clock_type::now();
    for (auto _ : st) {
        cpu_backend::conv2d_forward<T>(ctx, d, x.data(), w.data(), bias.data(), y.data());
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
    const double flops = 2.0 * static_cast<double>(d.n) * static_cast<double>(d.c_out) * static_cast<double>(d.out_h()) *
                         static_cast<double>(d.out_w()) * static_cast<double>(k);
    report_rate(st, flops, seconds, threads == 1 ? g_peak_single : g_peak_all);
}

dynamicid::conv2d_desc conv3x3(index_t n, index_t c, index_t hw) {
    return {.n = n, .c_in = c, .h = hw, .w = hw, .c_out = c, .kh = 3, .kw = 3, .pad_h = 1, .pad_w = 1};
}

// ---- registration ----------------------------------------------------------------------

std::string compiled_isa() {
    std::string s;
#if defined(__AVX512F__)
    s += " AVX512F";
#endif
#if defined(__AVX512BF16__)
    s += " AVX512BF16";
#endif
#if defined(__AVX2__)
    s += " AVX2";
#endif
#if defined(__FMA__)
    s += " FMA";
#endif
#if defined(__SSE2__)
    s += " SSE2";
#endif
    return s.empty() ? std::string(" (none)") : s;
}

// Largest value over repetitions. With --benchmark_repetitions=N on a shared
// machine, the counters' max is the least disturbed run (for the time columns
// it is the slowest one).
double max_of(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end()); }

benchmark::internal::Benchmark* common(benchmark::internal::Benchmark* b, double min_time) {
    return b->MinTime(min_time)->Unit(benchmark::kMillisecond)->ComputeStatistics("max", max_of);
}

void register_all(const std::vector<fma_isa>& isas) {
    constexpr double min_time = 0.3;  // seconds; large kernels then run once or twice after the warm-up

    for (const auto& isa : isas) {
        const std::int64_t reps = calibrate_reps(isa, 0.02);
        for (int t : {1, g_threads}) {
            const std::string name = "fma_peak/" + std::string(isa.name) + "/threads:" + std::to_string(t);
            common(benchmark::RegisterBenchmark(name.c_str(), bench_fma, isa, t, reps), 0.2)->UseManualTime();
            if (g_threads == 1) break;
        }
    }

    const gemm_case gemms[] = {
        {"proj_4096x320x320_nt", 1, 4096, 320, 320, true},        // attention q/k/v/out projections, 64x64 latent
        {"proj_4096x320x768_nt", 1, 4096, 320, 768, true},        // projection from a 768-wide input
        {"proj_1024x640x640_nt", 1, 1024, 640, 640, true},        // 32x32 level
        {"proj_256x1280x1280_nt", 1, 256, 1280, 1280, true},      // 16x16 level
        {"attn_qk_2x4096x4096x40_nt", 2, 4096, 4096, 40, true},   // scores, 2 heads of 40
        {"attn_av_2x4096x40x4096_nn", 2, 4096, 40, 4096, false},  // probabilities x values
        {"square_1024_nn", 1, 1024, 1024, 1024, false},
    };
    auto add_gemm = [&](const std::string& name, auto fn, const gemm_case& g, int threads) {
        common(benchmark::RegisterBenchmark(name.c_str(), fn, g, threads), min_time)->UseRealTime();
    };
    for (const auto& g : gemms) add_gemm("gemm_f32/" + std::string(g.what), bench_gemm<float>, g, g_threads);
    // Thread scaling on one shape (frac_of_peak against the 1-thread peak).
    add_gemm("gemm_f32/square_1024_nn/threads:1", bench_gemm<float>, gemms[6], 1);
    // Storage types: widened to f32 per call, so the conversions add to the f32 cost of the same shape.
    const gemm_case& storage = gemms[2];
    add_gemm("gemm_bf16/" + std::string(storage.what), bench_gemm<dynamicid::bfloat16>, storage, g_threads);
    add_gemm("gemm_f16/" + std::string(storage.what), bench_gemm<dynamicid::half>, storage, g_threads);

    const dynamicid::conv2d_desc pointwise{.n = 2, .c_in = 320, .h = 64, .w = 64, .c_out = 320, .kh = 1, .kw = 1};
    const conv_case convs[] = {
        {"unet_n2_320ch_64x64_3x3", conv3x3(2, 320, 64)},
        {"unet_n2_640ch_32x32_3x3", conv3x3(2, 640, 32)},
        {"unet_n2_1280ch_16x16_3x3", conv3x3(2, 1280, 16)},
        {"vae_n1_128ch_256x256_3x3", conv3x3(1, 128, 256)},
        {"unet_n2_320ch_64x64_1x1", pointwise},
    };
    for (const auto& c : convs) {
        const std::string name = "conv2d_f32/" + std::string(c.what);
        common(benchmark::RegisterBenchmark(name.c_str(), bench_conv<float>, c, g_threads), min_time)->UseRealTime();
    }
}

}  // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

    const unsigned hw = std::thread::hardware_concurrency();
    g_threads = hw ? static_cast<int>(hw) : 1;
    const auto isas = supported_isas();
    const fma_isa& widest = isas.front();

    // Peak measured once, on a fixed short budget (about 1 s): best of 3 runs of 0.1 s.
    g_peak_single = measure_peak(widest, 1, 0.1, 3);
    g_peak_all = g_threads == 1 ? g_peak_single : measure_peak(widest, g_threads, 0.1, 3);

    std::printf("dynamicid cpu kernels\n");
    std::printf("  measured fp32 FMA peak (%s): %.1f GFLOP/s on 1 thread, %.1f GFLOP/s on %d threads\n", widest.name,
                g_peak_single, g_peak_all, g_threads);
    std::printf("  backend context threads: %d\n", g_threads);
    std::printf("  compiled for:%s\n", compiled_isa().c_str());
    std::printf("  Eigen %d.%d.%d SIMD in use: %s\n", EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION,
                Eigen::SimdInstructionSetsInUse());
    std::printf("  frac_of_peak compares each kernel with the %d-thread peak above\n\n", g_threads);
    std::fflush(stdout);

    char buf[64];
    std::snprintf(buf, sizeof buf, "%.1f", g_peak_single);
    benchmark::AddCustomContext("fma_peak_gflops_1_thread", buf);
    std::snprintf(buf, sizeof buf, "%.1f", g_peak_all);
    benchmark::AddCustomContext("fma_peak_gflops_all_threads", buf);
    benchmark::AddCustomContext("fma_peak_isa", widest.name);
    benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
    benchmark::AddCustomContext("compiled_isa", compiled_isa());

    register_all(isas);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
