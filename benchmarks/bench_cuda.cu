// dynamicid benchmarks on the CUDA backend (Google Benchmark; needs a GPU).
// Each call is timed with CUDA events on the context's stream (manual time).
//
//   attention_f16/fused     the fused attention kernel alone, f16, at SD1.5's
//                           two largest self-attention shapes: 2 images x 8
//                           heads, 4096 tokens, head dimension 40 (64x64
//                           latent) and 1024 tokens, dimension 80
//   attention_f16/composed  the same through gemm + softmax + gemm: the
//                           baseline of the same run (vs_composed)
//   unet_sd15_f16           one SD1.5 UNet evaluation in f16, batch 2
//                           (classifier-free guidance) at 512 x 512 (latent
//                           64 x 64), 77 text tokens, random weights built from
//                           the config (no checkpoint needed)
//   unet_sd15_f16/.../graph the same through cuda_backend::step_graph, as the
//                           pipelines run it: recorded once into a CUDA
//                           graph, then replayed with the new timestep of
//                           each call
//
//   dynamicid_bench_cuda [--torch-attention-ms=A,B] [--torch-unet-ms=U]
//                        [--peak-tflops=P] [--unet-iterations=N] [benchmark flags]
//
// Counters: TFLOP/s from the FLOP counter (dynamicid::analysis for the UNet),
// of_peak against P (default 989, the H100/H200 SXM dense f16 tensor peak),
// and vs_torch = PyTorch's time / ours when the PyTorch figures of the same
// run are given (tools/bench/pytorch_cuda_baseline.py prints them; the device
// script tools/device/run_cuda_checks.sh passes them on). host_ms: the host's
// time to queue one UNet call (when it is close to the event time, the
// evaluation is bound by launch cost, not by the GPU).
#include "random_weights.hpp"

#include <dynamicid/analysis/flops.hpp>
#include <dynamicid/backends/cuda.cuh>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/weights.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace {

using dynamicid::cuda_backend;
using dynamicid::half;
using dynamicid::index_t;
using dynamicid::shape;
namespace modules = dynamicid::modules;
namespace ops = dynamicid::ops;

struct options {
    std::optional<double> torch_attention_ms[2];
    std::optional<double> torch_unet_ms;
    double peak_tflops = 989.0;
    int unet_iterations = 10;
};
options g_options;
std::map<std::string, double> g_composed_ms;  // composed attention per shape, for vs_composed

/// CUDA events around work queued on a context's stream.
class event_timer {
public:
    explicit event_timer(cuda_backend::context& ctx) : ctx_(ctx) {
        dynamicid::cuda::detail::check_cuda(cudaEventCreate(&start_), "cudaEventCreate");
        dynamicid::cuda::detail::check_cuda(cudaEventCreate(&stop_), "cudaEventCreate");
    }
    ~event_timer() {
        cudaEventDestroy(start_);
        cudaEventDestroy(stop_);
    }
    event_timer(const event_timer&) = delete;
    event_timer& operator=(const event_timer&) = delete;
    void start() { dynamicid::cuda::detail::check_cuda(cudaEventRecord(start_, ctx_.queue()), "cudaEventRecord"); }
    /// Milliseconds since start(), once the queued work is done.
    double stop() {
        dynamicid::cuda::detail::check_cuda(cudaEventRecord(stop_, ctx_.queue()), "cudaEventRecord");
        dynamicid::cuda::detail::check_cuda(cudaEventSynchronize(stop_), "cudaEventSynchronize");
        float ms = 0;
        dynamicid::cuda::detail::check_cuda(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
        return ms;
    }

private:
    cuda_backend::context& ctx_;
    cudaEvent_t start_{}, stop_{};
};

/// Runs `run` under the benchmark loop (after `warmup` untimed calls) and
/// returns the median milliseconds of the timed calls.
template <class Run>
double timed_loop(benchmark::State& state, cuda_backend::context& ctx, int warmup, Run&& run) {
    for (int i = 0; i < warmup; ++i) run();
    cuda_backend::synchronize(ctx);
    event_timer timer(ctx);
    std::vector<double> ms;
    for (auto _ : state) {
        timer.start();
        run();
        const double m = timer.stop();
        state.SetIterationTime(m / 1e3);
        ms.push_back(m);
    }
    std::sort(ms.begin(), ms.end());
    return ms.empty() ? 0.0 : ms[ms.size() / 2];
}

void set_rate(benchmark::State& state, double flops, double ms) {
    const double tflops = flops / ms / 1e9;
    state.counters["TFLOP/s"] = tflops;
    state.counters["of_peak"] = tflops / g_options.peak_tflops;
    state.counters["median_ms"] = ms;
}

/// Args: tokens, head dimension; 16 = 2 images x 8 heads.
template <bool Fused>
void bm_attention(benchmark::State& state) {
    const index_t batch = 16, tokens = state.range(0), dim = state.range(1);
    cuda_backend::context ctx;
    const auto q = ops::randn<cuda_backend, half>(ctx, {batch, tokens, dim}, 1);
    const auto k = ops::randn<cuda_backend, half>(ctx, {batch, tokens, dim}, 2);
    const auto v = ops::randn<cuda_backend, half>(ctx, {batch, tokens, dim}, 3);
    const double ms = timed_loop(state, ctx, 3, [&] {
        if constexpr (Fused) (void)ops::attention(ctx, q, k, v);
        else (void)ops::attention_forward(ctx, q, k, v).first;
    });
    const auto flops = 4.0 * static_cast<double>(batch) * static_cast<double>(tokens) * static_cast<double>(tokens) * static_cast<double>(dim);
    set_rate(state, flops, ms);
    const std::string key = std::to_string(tokens) + "x" + std::to_string(dim);
    if constexpr (!Fused) {
        g_composed_ms[key] = ms;
    } else {
        if (g_composed_ms.count(key)) state.counters["vs_composed"] = g_composed_ms[key] / ms;
        const auto& torch_ms = g_options.torch_attention_ms[tokens == 4096 ? 0 : 1];
        if (torch_ms) state.counters["vs_torch"] = *torch_ms / ms;
    }
}

/// Random SD1.5 UNet weights (random_weights.hpp), bound in f16.
modules::weight_source random_unet_weights(cuda_backend::context& ctx, const modules::unet::unet_config& cfg) {
    return dynamicid::bench::random_weight_source<cuda_backend, half>(
        ctx, [&](auto& b) { (void)modules::unet::unet_2d_condition<cuda_backend, half>::bind(b, cfg); }, 1234);
}

/// One SD1.5 UNet evaluation; with Graph, through a step_graph as the
/// pipelines run it (the first call normal, the second recorded, the rest
/// replayed with new latents and timestep features copied in). host_ms: the
/// host's time to queue one timed call.
template <bool Graph>
void bm_unet(benchmark::State& state) {
    cuda_backend::context ctx;
    const modules::unet::unet_config cfg{};  // SD1.5's
    using unet_t = modules::unet::unet_2d_condition<cuda_backend, half>;
    const auto unet = unet_t::load(ctx, random_unet_weights(ctx, cfg), cfg);
    const index_t batch = 2, latent = 64, tokens = 77;
    const auto sample = ops::randn<cuda_backend, half>(ctx, {batch, 4, latent, latent}, 7);
    const auto text = ops::scale(ctx, ops::randn<cuda_backend, half>(ctx, {batch, tokens, 768}, 8), 0.5);
    std::vector<float> timesteps(static_cast<std::size_t>(batch), 981.0f);
    cuda_backend::step_graph graph;
    double host_seconds = 0;
    std::size_t calls = 0;  // all calls, the first `warmup` untimed
    constexpr std::size_t warmup = 2;
    const double ms = timed_loop(state, ctx, static_cast<int>(warmup), [&] {
        // A different timestep each call, as in a denoising loop.
        std::fill(timesteps.begin(), timesteps.end(), static_cast<float>(981 - 20 * (calls % 40)));
        const auto start = std::chrono::steady_clock::now();
        if constexpr (Graph) {
            using tensor_t = dynamicid::tensor<cuda_backend, half>;
            (void)graph.run(
                ctx, 0, [&](const tensor_t& x, const tensor_t& f) { return unet.forward_features(ctx, x, f, text); }, sample,
                unet.time_features(ctx, timesteps));
        } else {
            (void)unet.forward(ctx, sample, std::span<const float>(timesteps), text);
        }
        if (calls >= warmup) host_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        ++calls;
    });
    const double macs = static_cast<double>(
        dynamicid::analysis::unet_macs(cfg, {.batch = batch, .height = latent, .width = latent, .tokens = tokens}).total());
    set_rate(state, 2.0 * macs, ms);
    state.counters["host_ms"] = calls > warmup ? 1e3 * host_seconds / static_cast<double>(calls - warmup) : 0.0;
    state.counters["device_MiB"] = static_cast<double>(cuda_backend::allocated_bytes(ctx)) / (1024.0 * 1024.0);
    if (g_options.torch_unet_ms) state.counters["vs_torch"] = *g_options.torch_unet_ms / ms;
    if constexpr (Graph) {
        const auto& st = graph.stats();
        state.counters["recorded"] = static_cast<double>(st.recorded);
        state.counters["replayed"] = static_cast<double>(st.replayed);
        state.counters["graph_MiB"] = static_cast<double>(graph.held_bytes()) / (1024.0 * 1024.0);
        if (!st.fallback.empty()) state.SetLabel("no graph: " + st.fallback);
    }
}

/// Takes this program's own flags out of argv (Google Benchmark gets the rest).
bool parse_options(int& argc, char** argv) {
    int kept = 1;
    try {
        for (int i = 1; i < argc; ++i) {
            const std::string_view a = argv[i];
            if (a.starts_with("--torch-attention-ms=")) {
                const std::string v(a.substr(21));
                const auto comma = v.find(',');
                g_options.torch_attention_ms[0] = std::stod(v.substr(0, comma));
                if (comma != std::string::npos) g_options.torch_attention_ms[1] = std::stod(v.substr(comma + 1));
            } else if (a.starts_with("--torch-unet-ms=")) {
                g_options.torch_unet_ms = std::stod(std::string(a.substr(16)));
            } else if (a.starts_with("--peak-tflops=")) {
                g_options.peak_tflops = std::stod(std::string(a.substr(14)));
            } else if (a.starts_with("--unet-iterations=")) {
                g_options.unet_iterations = std::max(1, std::stoi(std::string(a.substr(18))));
            } else {
                argv[kept++] = argv[i];
            }
        }
    } catch (const std::logic_error&) {
        return false;
    }
    argc = kept;
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    if (!parse_options(argc, argv)) {
        std::fprintf(stderr, "usage: %s [--torch-attention-ms=A,B] [--torch-unet-ms=U] [--peak-tflops=P] [--unet-iterations=N] [benchmark flags]\n",
                     argv[0]);
        return 2;
    }
    for (const auto& [tokens, dim] : {std::pair<index_t, index_t>{4096, 40}, {1024, 80}}) {
        benchmark::RegisterBenchmark("attention_f16/composed", bm_attention<false>)
            ->Args({tokens, dim})
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond)
            ->Iterations(20);
        benchmark::RegisterBenchmark("attention_f16/fused", bm_attention<true>)
            ->Args({tokens, dim})
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond)
            ->Iterations(20);
    }
    benchmark::RegisterBenchmark("unet_sd15_f16/batch2/512", bm_unet<false>)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(g_options.unet_iterations);
    benchmark::RegisterBenchmark("unet_sd15_f16/batch2/512/graph", bm_unet<true>)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(g_options.unet_iterations);
    benchmark::Initialize(&argc, argv);
    try {
        benchmark::RunSpecifiedBenchmarks();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    benchmark::Shutdown();
    return 0;
}
