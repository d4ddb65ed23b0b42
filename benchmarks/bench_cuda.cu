// dynamicid benchmarks on the CUDA backend (needs a GPU; timed with CUDA events).
//
//   attention   the fused attention kernel alone, f16, at SD1.5's two largest
//               self-attention shapes: 2 images x 8 heads, 4096 tokens, head
//               dimension 40 (64x64 latent) and 1024 tokens, dimension 80.
//   unet        one SD1.5 UNet evaluation in f16, batch 2 (classifier-free
//               guidance) at 512 x 512 (latent 64 x 64), 77 text tokens, with
//               random weights built from the config (no checkpoint needed).
//
//   dynamicid_bench_cuda                 # both
//   dynamicid_bench_cuda attention       # one of them
//   dynamicid_bench_cuda unet --iters 5
//
// Each line: what, milliseconds per call (median of the timed calls), and the
// arithmetic rate. Warm-up calls (allocator, cuDNN plans) are not timed.
#include <dynamicid/analysis/flops.hpp>
#include <dynamicid/backends/cuda.cuh>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/weights.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
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

/// Milliseconds per call of `run` on ctx's stream: median of `iters` timed calls after `warmup`.
template <class Run>
double time_ms(cuda_backend::context& ctx, int warmup, int iters, Run&& run) {
    for (int i = 0; i < warmup; ++i) run();
    cuda_backend::synchronize(ctx);
    std::vector<double> ms;
    cudaEvent_t start, stop;
    dynamicid::cuda::detail::check_cuda(cudaEventCreate(&start), "cudaEventCreate");
    dynamicid::cuda::detail::check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
    for (int i = 0; i < iters; ++i) {
        dynamicid::cuda::detail::check_cuda(cudaEventRecord(start, ctx.queue()), "cudaEventRecord");
        run();
        dynamicid::cuda::detail::check_cuda(cudaEventRecord(stop, ctx.queue()), "cudaEventRecord");
        dynamicid::cuda::detail::check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
        float elapsed = 0;
        dynamicid::cuda::detail::check_cuda(cudaEventElapsedTime(&elapsed, start, stop), "cudaEventElapsedTime");
        ms.push_back(elapsed);
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

void bench_attention(int iters) {
    cuda_backend::context ctx;
    struct shape_case {
        index_t batch, tokens, dim;
    };
    for (const shape_case c : {shape_case{16, 4096, 40}, shape_case{16, 1024, 80}}) {
        const auto q = ops::randn<cuda_backend, half>(ctx, {c.batch, c.tokens, c.dim}, 1);
        const auto k = ops::randn<cuda_backend, half>(ctx, {c.batch, c.tokens, c.dim}, 2);
        const auto v = ops::randn<cuda_backend, half>(ctx, {c.batch, c.tokens, c.dim}, 3);
        const double ms = time_ms(ctx, 3, iters, [&] { (void)ops::attention(ctx, q, k, v); });
        const double flops = 4.0 * static_cast<double>(c.batch) * static_cast<double>(c.tokens) * static_cast<double>(c.tokens) *
                             static_cast<double>(c.dim);
        std::printf("attention_f16 batch*heads=%lld tokens=%lld dim=%lld: %.3f ms, %.1f TFLOP/s\n", static_cast<long long>(c.batch),
                    static_cast<long long>(c.tokens), static_cast<long long>(c.dim), ms, flops / ms / 1e9);
    }
}

/// Parses "'<key>' has shape (1), expected (a, b, ...)" (weight_binder's wording).
bool parse_problem(const std::string& problem, std::string& key, std::vector<index_t>& dims) {
    const std::string marker = "' has shape (1), expected (";
    const auto end_key = problem.find(marker);
    if (problem.size() < 2 || problem.front() != '\'' || end_key == std::string::npos) return false;
    key = problem.substr(1, end_key - 1);
    dims.clear();
    std::string_view rest = std::string_view(problem).substr(end_key + marker.size());
    while (!rest.empty() && rest.front() != ')') {
        std::size_t used = 0;
        dims.push_back(std::stoll(std::string(rest), &used));
        rest.remove_prefix(used);
        while (!rest.empty() && (rest.front() == ',' || rest.front() == ' ')) rest.remove_prefix(1);
    }
    return true;
}

/// Random SD1.5 UNet weights: a first bind against a one-tensor file makes the
/// binder list every parameter's expected shape; the second maps each key to
/// a shared prototype of its shape (N(0, 1/fan_in) matrices and kernels, ones
/// for norm scales, zeros for biases).
modules::weight_source random_unet_weights(cuda_backend::context& ctx, const modules::unet::unet_config& cfg) {
    using unet_t = modules::unet::unet_2d_condition<cuda_backend, half>;
    dynamicid::io::safetensors_writer probe_writer;
    probe_writer.add("probe", shape({1}), std::vector<float>{0.0f});
    const auto probe_bytes = probe_writer.to_bytes();
    auto probe_file = std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(probe_bytes));
    modules::weight_source probe({probe_file}, [](std::string_view) { return std::string("probe"); });
    modules::weight_binder<cuda_backend, half> probe_binder(ctx, probe);
    (void)unet_t::bind(probe_binder, cfg);

    std::map<std::string, std::string> key_to_proto;
    std::set<std::string> seen;
    dynamicid::io::safetensors_writer writer;
    std::mt19937_64 rng(1234);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::string key;
    std::vector<index_t> dims;
    for (const auto& problem : probe_binder.problems()) {
        if (!parse_problem(problem, key, dims)) throw dynamicid::value_error("bench", "unexpected binder problem: " + problem);
        const bool vector = dims.size() == 1, norm_scale = vector && key.ends_with(".weight");
        std::string proto = vector ? (norm_scale ? "ones" : "zeros") : "normal";
        for (auto d : dims) proto += "_" + std::to_string(d);
        key_to_proto[key] = proto;
        if (!seen.insert(proto).second) continue;
        const shape s(dims);
        std::vector<float> values(static_cast<std::size_t>(s.numel()));
        if (vector) {
            std::fill(values.begin(), values.end(), norm_scale ? 1.0f : 0.0f);
        } else {
            const float gain = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.numel() / s[0])));
            for (auto& v : values) v = normal(rng) * gain;
        }
        writer.add(proto, s, values);
    }
    const auto bytes = writer.to_bytes();
    auto file = std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(bytes));
    return modules::weight_source({file}, [map = std::move(key_to_proto)](std::string_view k) {
        const auto it = map.find(std::string(k));
        return it == map.end() ? std::string(k) : it->second;
    });
}

void bench_unet(int iters) {
    cuda_backend::context ctx;
    const modules::unet::unet_config cfg{};  // SD1.5's
    using unet_t = modules::unet::unet_2d_condition<cuda_backend, half>;
    const auto unet = unet_t::load(ctx, random_unet_weights(ctx, cfg), cfg);
    const index_t batch = 2, latent = 64, tokens = 77;
    const auto sample = ops::randn<cuda_backend, half>(ctx, {batch, 4, latent, latent}, 7);
    const auto text = ops::scale(ctx, ops::randn<cuda_backend, half>(ctx, {batch, tokens, 768}, 8), 0.5);
    const std::vector<float> timesteps(static_cast<std::size_t>(batch), 981.0f);
    const double ms = time_ms(ctx, 2, iters, [&] { (void)unet.forward(ctx, sample, std::span<const float>(timesteps), text); });
    const double macs = static_cast<double>(
        dynamicid::analysis::unet_macs(cfg, {.batch = batch, .height = latent, .width = latent, .tokens = tokens}).total());
    std::printf("unet_sd15_f16 batch=2 image=512: %.2f ms, %.1f TFLOP/s, device memory held %.0f MiB\n", ms, 2.0 * macs / ms / 1e9,
                static_cast<double>(cuda_backend::allocated_bytes(ctx)) / (1024.0 * 1024.0));
}

}  // namespace

int main(int argc, char** argv) {
    bool attention = true, unet = true;
    int iters = 10;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "attention") unet = false;
        else if (arg == "unet") attention = false;
        else if (arg == "--iters" && i + 1 < argc) iters = std::max(1, std::atoi(argv[++i]));
        else {
            std::fprintf(stderr, "usage: %s [attention|unet] [--iters N]\n", argv[0]);
            return 2;
        }
    }
    try {
        if (attention) bench_attention(iters);
        if (unet) bench_unet(std::max(1, iters / 2));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return 0;
}
