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
// Random weights: the UNet is bound twice through weight_binder. The first
// pass maps every key to one probe tensor of shape (1), so the binder lists
// every parameter with the shape it expected; the second pass maps each key to
// a prototype tensor of its shape (N(0, 1) / sqrt(fan_in) for matrices and
// kernels, ones for norm scales, zeros for biases). Each bound tensor is its
// own converted copy, so no file and no per-key host data is ever allocated.
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

/// A parameter the binder asked for: its key and expected shape.
struct parameter_request {
    std::string key;
    std::vector<index_t> dims;
};

/// Parses "'<key>' has shape (1), expected (a, b, ...)" (weight_binder's wording).
bool parse_problem(const std::string& problem, parameter_request& out) {
    const std::string marker = "' has shape (1), expected (";
    const auto end_key = problem.find(marker);
    if (problem.size() < 2 || problem.front() != '\'' || end_key == std::string::npos) return false;
    out.key = problem.substr(1, end_key - 1);
    out.dims.clear();
    std::string_view rest = std::string_view(problem).substr(end_key + marker.size());
    while (!rest.empty() && rest.front() != ')') {
        std::size_t used = 0;
        out.dims.push_back(std::stoll(std::string(rest), &used));
        rest.remove_prefix(used);
        while (!rest.empty() && (rest.front() == ',' || rest.front() == ' ')) rest.remove_prefix(1);
    }
    return true;
}

/// A weight_source whose every key resolves to a random tensor of the shape a
/// module asks for. `bind` binds the module (and is called twice).
template <class Bind>
modules::weight_source random_weight_source(cpu_backend::context& ctx, Bind&& bind, std::uint64_t seed) {
    // Pass 1: every key -> the probe; the binder reports each expected shape.
    dynamicid::io::safetensors_writer probe_writer;
    probe_writer.add("probe", shape({1}), std::vector<float>{0.0f});
    const auto probe_bytes = probe_writer.to_bytes();
    auto probe_file = std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(probe_bytes));
    modules::weight_source probe({probe_file}, [](std::string_view) { return std::string("probe"); });
    modules::weight_binder<cpu_backend, float> probe_binder(ctx, probe);
    bind(probe_binder);

    // Pass 2: one prototype per (shape, kind).
    std::map<std::string, std::string> key_to_proto;
    dynamicid::io::safetensors_writer writer;
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    parameter_request request;
    std::set<std::string> seen;
    for (const auto& problem : probe_binder.problems()) {
        if (!parse_problem(problem, request)) throw dynamicid::value_error("bench", "unexpected binder problem: " + problem);
        const bool vector = request.dims.size() == 1;
        const bool norm_scale = vector && request.key.ends_with(".weight");
        std::string proto = vector ? (norm_scale ? "ones" : "zeros") : "normal";
        for (auto d : request.dims) proto += "_" + std::to_string(d);
        key_to_proto[request.key] = proto;
        if (!seen.insert(proto).second) continue;
        const shape s(request.dims);
        std::vector<float> values(static_cast<std::size_t>(s.numel()));
        if (vector) {
            std::fill(values.begin(), values.end(), norm_scale ? 1.0f : 0.0f);
        } else {
            const double fan_in = static_cast<double>(s.numel() / s[0]);
            const float gain = static_cast<float>(1.0 / std::sqrt(fan_in));
            for (auto& v : values) v = normal(rng) * gain;
        }
        writer.add(proto, s, values);
    }
    const auto bytes = writer.to_bytes();
    auto file = std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(bytes));
    return modules::weight_source({file}, [map = std::move(key_to_proto)](std::string_view key) {
        const auto it = map.find(std::string(key));
        return it == map.end() ? std::string(key) : it->second;
    });
}

/// SD1.5's UNet with random weights, built once for every benchmark.
const modules::unet::unet_2d_condition<cpu_backend>& sd15_unet(cpu_backend::context& ctx) {
    static const auto unet = [&] {
        const modules::unet::unet_config cfg{};  // the defaults are SD1.5's
        const auto source = random_weight_source(
            ctx, [&](modules::weight_binder<cpu_backend, float>& b) { (void)modules::unet::unet_2d_condition<cpu_backend>::bind(b, cfg); },
            1234);
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
