// dynamicid benchmarks: one evaluation of Stable Diffusion 1.5's UNet on the
// CPU backend, with random weights built from the config (no checkpoint).
//
// Sizes: 256 x 256 images (latent 32 x 32) and 512 x 512 (latent 64 x 64),
// batch 2 (classifier-free guidance: uncond + cond in one evaluation), 77 text
// tokens. Each row reports
//   GFLOP/s        2 x the MAC count of analysis::unet_macs over the wall time,
//   GMAC           that MAC count,
//   peak_RSS_MiB   the process's peak resident set so far (getrusage ru_maxrss),
//                  weights (3.4 GB in f32) included.
// The default run is one iteration per size (minutes on 2 cores):
//
//   dynamicid_bench_unet
//   dynamicid_bench_unet --benchmark_filter=256
//
// Random weights come from random_weights.hpp (one prototype tensor per shape).
#include "random_weights.hpp"

#include <benchmark/benchmark.h>

#include <dynamicid/analysis/flops.hpp>
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/weights.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace {

using dynamicid::cpu_backend;
using dynamicid::index_t;
using dynamicid::shape;
using tensor = dynamicid::tensor<cpu_backend, float>;
namespace modules = dynamicid::modules;

/// SD1.5's UNet with random weights, built once for every benchmark.
const modules::unet::unet_2d_condition<cpu_backend>& sd15_unet(cpu_backend::context& ctx) {
    static const auto unet = [&] {
        const modules::unet::unet_config cfg{};  // the defaults are SD1.5's
        const auto source = dynamicid::bench::random_weight_source<cpu_backend, float>(
            ctx, [&](auto& b) { (void)modules::unet::unet_2d_condition<cpu_backend>::bind(b, cfg); }, 1234);
        return modules::unet::unet_2d_condition<cpu_backend>::load(ctx, source, cfg);
    }();
    return unet;
}

double peak_rss_mib() {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<double>(usage.ru_maxrss) / 1024.0;  // Linux reports KiB
}

void bm_unet_sd15(benchmark::State& state) {
    const index_t image = state.range(0), latent = image / 8, batch = 2, tokens = 77;
    cpu_backend::context ctx;
    const auto& unet = sd15_unet(ctx);
    const auto sample = dynamicid::ops::randn<cpu_backend, float>(ctx, {batch, 4, latent, latent}, 7);
    const auto text = dynamicid::ops::scale(ctx, dynamicid::ops::randn<cpu_backend, float>(ctx, {batch, tokens, 768}, 8), 0.5);
    const std::vector<float> timesteps(static_cast<std::size_t>(batch), 981.0f);
    const double macs = static_cast<double>(
        dynamicid::analysis::unet_macs(unet.settings(), {.batch = batch, .height = latent, .width = latent, .tokens = tokens}).total());

    double seconds = 0.0;
    for (auto _ : state) {
        const auto start = std::chrono::steady_clock::now();
        auto out = unet.forward(ctx, sample, std::span<const float>(timesteps), text);
        cpu_backend::synchronize(ctx);
        benchmark::DoNotOptimize(out);
        const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
        seconds += elapsed.count();
        state.SetIterationTime(elapsed.count());
    }
    const double per_iteration = seconds / static_cast<double>(state.iterations());
    state.counters["seconds"] = per_iteration;
    state.counters["GMAC"] = macs / 1e9;
    state.counters["GFLOP/s"] = 2.0 * macs / per_iteration / 1e9;
    state.counters["peak_RSS_MiB"] = peak_rss_mib();
}

}  // namespace

BENCHMARK(bm_unet_sd15)->Name("unet_sd15_cfg_batch2/image")->Arg(256)->Iterations(1)->UseManualTime()->Unit(benchmark::kSecond);
BENCHMARK(bm_unet_sd15)->Name("unet_sd15_cfg_batch2/image")->Arg(512)->Iterations(1)->UseManualTime()->Unit(benchmark::kSecond);

BENCHMARK_MAIN();
