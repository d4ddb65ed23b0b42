// dynamicid benchmarks: the oneDNN backend against the reference CPU backend,
// in one run, on Stable Diffusion 1.5's dominant operations and on one full
// UNet evaluation (random weights), in f32 and bf16.
//
//   dynamicid_bench_onednn                                    # kernels, then the UNet (minutes on 2 cores)
//   dynamicid_bench_onednn --no-unet                          # kernels only (under a minute)
//   dynamicid_bench_onednn --pytorch-seconds=F32[,BF16]       # adds ratios against a PyTorch time
//   dynamicid_bench_onednn --threads=2 --image=256
//
// The PyTorch time comes from tools/bench/pytorch_cpu_baseline.py (same
// config, batch, threads and shapes). Every row reports milliseconds (best of
// several runs for the kernels, best of two timed runs after a warm-up for the
// UNet), GFLOP/s (2 flops per multiply-add), the fraction of the measured f32
// FMA peak on the same threads (bf16 rows too, so that bf16 above 1.0 means
// beyond what f32 FMAs could do), and the oneDNN / reference speed-up.
//
// Sizes: 256 x 256 images (latent 32 x 32), batch 2 (classifier-free
// guidance), 77 tokens; kernels at the UNet's widths for that latent.
//
// On a machine shared with other work, run both this and the PyTorch script
// with OMP_WAIT_POLICY=PASSIVE: OpenMP's idle threads otherwise spin between
// parallel regions and take the cores the serial parts need (on 2 busy cores
// that more than doubled every backend's UNet time, PyTorch's included).
#include "fma_peak.hpp"

#include <dynamicid/analysis/flops.hpp>
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/backends/onednn.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/weights.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

using dynamicid::bfloat16;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using dynamicid::onednn_backend;
using dynamicid::shape;
namespace modules = dynamicid::modules;

struct options {
    int threads = 0;
    index_t image = 256;
    bool unet = true;
    std::optional<double> pytorch_f32, pytorch_bf16;
};

double g_peak = 0;  // f32 FMA GFLOP/s on the benchmark's threads

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Best wall time of `fn` over at least 3 runs and 0.3 s (after one warm-up run).
double best_time(const std::function<void()>& fn) {
    fn();
    double best = 1e300, total = 0;
    for (int i = 0; i < 3 || total < 0.3; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        const double t = seconds_since(t0);
        best = std::min(best, t);
        total += t;
        if (i >= 50) break;
    }
    return best;
}

template <class B, class T>
typename B::template buffer<T> filled(typename B::context& ctx, std::size_t n, std::uint64_t seed) {
    auto buf = B::template allocate<T>(ctx, n);
    B::random_normal(ctx, seed, 0, n, buf.data());
    return buf;
}

void print_row(const std::string& what, double flops, double ref_s, double mine_s) {
    const double ref_g = flops / ref_s * 1e-9, mine_g = flops / mine_s * 1e-9;
    std::printf("  %-44s %10.2f %10.2f %8.1f %8.1f %7.2f %7.2f %7.2fx\n", what.c_str(), ref_s * 1e3, mine_s * 1e3, ref_g, mine_g, ref_g / g_peak,
                mine_g / g_peak, ref_s / mine_s);
    std::fflush(stdout);
}

void print_header(const char* first) {
    std::printf("  %-44s %10s %10s %8s %8s %7s %7s %8s\n", first, "ref_ms", "onednn_ms", "ref_GF/s", "dnn_GF/s", "ref_pk", "dnn_pk",
                "speedup");
}

// ---- kernels ------------------------------------------------------------------------

struct gemm_case {
    const char* what;
    index_t batch, m, n, k;
    bool trans_b;
};

template <class B, class T>
double time_gemm(int threads, const gemm_case& g) {
    typename B::context ctx{.threads = threads};
    const dynamicid::gemm_desc d{.batch = g.batch, .m = g.m, .n = g.n, .k = g.k, .trans_a = false, .trans_b = g.trans_b, .lda = g.k,
                                 .ldb = g.trans_b ? g.k : g.n, .ldc = g.n, .stride_a = g.m * g.k, .stride_b = g.k * g.n, .stride_c = g.m * g.n};
    const auto a = filled<B, T>(ctx, static_cast<std::size_t>(g.batch * g.m * g.k), 1);
    const auto b = filled<B, T>(ctx, static_cast<std::size_t>(g.batch * g.k * g.n), 2);
    auto c = B::template allocate<T>(ctx, static_cast<std::size_t>(g.batch * g.m * g.n));
    return best_time([&] { B::gemm(ctx, d, a.data(), b.data(), c.data()); });
}

template <class B, class T>
double time_conv(int threads, const dynamicid::conv2d_desc& d) {
    typename B::context ctx{.threads = threads};
    const auto x = filled<B, T>(ctx, static_cast<std::size_t>(d.n * d.c_in * d.h * d.w), 3);
    const auto w = filled<B, T>(ctx, static_cast<std::size_t>(d.c_out * d.c_in / d.groups * d.kh * d.kw), 4);
    const auto bias = filled<B, T>(ctx, static_cast<std::size_t>(d.c_out), 5);
    auto y = B::template allocate<T>(ctx, static_cast<std::size_t>(d.n * d.c_out * d.out_h() * d.out_w()));
    return best_time([&] { B::conv2d_forward(ctx, d, x.data(), w.data(), bias.data(), y.data()); });
}

template <class T>
void run_kernels(int threads, index_t latent, const char* type) {
    const index_t tokens = latent * latent, batch = 2;
    const gemm_case gemms[] = {
        {"proj_2048x320x320_nt", 1, batch * tokens, 320, 320, true},
        {"ff_in_2048x2560x320_nt", 1, batch * tokens, 2560, 320, true},
        {"ff_out_2048x320x1280_nt", 1, batch * tokens, 320, 1280, true},
        {"attn_qk_16x1024x1024x40_nt", 2 * 8, tokens, tokens, 40, true},
        {"attn_av_16x1024x40x1024_nn", 2 * 8, tokens, 40, tokens, false},
        {"proj_128x1280x1280_nt", 1, batch * tokens / 16, 1280, 1280, true},
    };
    std::printf("\n%s matmul (gemm primitive)\n", type);
    print_header("shape");
    for (const auto& g : gemms) {
        const double flops = 2.0 * static_cast<double>(g.batch * g.m * g.n) * static_cast<double>(g.k);
        print_row(g.what, flops, time_gemm<cpu_backend, T>(threads, g), time_gemm<onednn_backend, T>(threads, g));
    }
    auto conv3x3 = [&](index_t c, index_t hw) {
        return dynamicid::conv2d_desc{.n = batch, .c_in = c, .h = hw, .w = hw, .c_out = c, .kh = 3, .kw = 3, .pad_h = 1, .pad_w = 1};
    };
    const std::pair<std::string, dynamicid::conv2d_desc> convs[] = {
        {"conv3x3_n2_320ch_" + std::to_string(latent), conv3x3(320, latent)},
        {"conv3x3_n2_640ch_" + std::to_string(latent / 2), conv3x3(640, latent / 2)},
        {"conv3x3_n2_1280ch_" + std::to_string(latent / 4), conv3x3(1280, latent / 4)},
        {"conv3x3_n2_1280ch_" + std::to_string(latent / 8), conv3x3(1280, latent / 8)},
        {"conv3x3_n2_320ch_64 (512px level 0)", conv3x3(320, 64)},
        {"conv1x1_n2_640to320_" + std::to_string(latent),
         dynamicid::conv2d_desc{.n = batch, .c_in = 640, .h = latent, .w = latent, .c_out = 320, .kh = 1, .kw = 1}},
    };
    std::printf("\n%s conv2d forward (with bias)\n", type);
    print_header("shape");
    for (const auto& [what, d] : convs) {
        const double flops = 2.0 * static_cast<double>(d.n * d.c_out * d.out_h() * d.out_w()) * static_cast<double>(d.c_in * d.kh * d.kw);
        print_row(what, flops, time_conv<cpu_backend, T>(threads, d), time_conv<onednn_backend, T>(threads, d));
    }
}

// ---- the UNet with random weights -----------------------------------------------------
//
// The UNet is bound once against a probe file (every key maps to one (1)-shaped
// tensor), so the binder lists every parameter with its expected shape; the
// weight source then maps each key to one prototype tensor per shape (N(0, 1) /
// sqrt(fan_in) for matrices and kernels, ones for norm scales, zeros for
// biases). The source is backend-neutral, so every backend and element type
// binds (and converts) from the same small in-memory file.

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

modules::weight_source random_unet_weights(const modules::unet::unet_config& cfg, std::uint64_t seed) {
    cpu_backend::context ctx{};
    dynamicid::io::safetensors_writer probe_writer;
    probe_writer.add("probe", shape({1}), std::vector<float>{0.0f});
    const auto probe_bytes = probe_writer.to_bytes();
    auto probe_file = std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(probe_bytes));
    modules::weight_binder<cpu_backend, float> probe(ctx, modules::weight_source({probe_file}, [](std::string_view) { return std::string("probe"); }));
    (void)modules::unet::unet_2d_condition<cpu_backend>::bind(probe, cfg);

    std::map<std::string, std::string> key_to_proto;
    std::set<std::string> made;
    dynamicid::io::safetensors_writer writer;
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::string key;
    std::vector<index_t> dims;
    for (const auto& problem : probe.problems()) {
        if (!parse_problem(problem, key, dims)) throw dynamicid::value_error("bench", "unexpected binder problem: " + problem);
        const bool vector = dims.size() == 1, norm_scale = vector && key.ends_with(".weight");
        std::string proto = vector ? (norm_scale ? "ones" : "zeros") : "normal";
        for (auto d : dims) proto += "_" + std::to_string(d);
        key_to_proto[key] = proto;
        if (!made.insert(proto).second) continue;
        const shape s(dims);
        std::vector<float> values(static_cast<std::size_t>(s.numel()), norm_scale ? 1.0f : 0.0f);
        if (!vector) {
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

// Seconds per UNet evaluation on backend B in T: best of `timed` runs after a warm-up.
template <class B, class T>
double time_unet(const modules::weight_source& source, const modules::unet::unet_config& cfg, int threads, index_t latent, int timed) {
    typename B::context ctx{.threads = threads};
    const auto unet = modules::unet::unet_2d_condition<B, T>::load(ctx, source, cfg);
    const index_t batch = 2, tokens = 77;
    auto to_t = [&](const dynamicid::tensor<B, float>& x) {
        if constexpr (std::is_same_v<T, float>) {
            return x;
        } else {
            auto y = dynamicid::tensor<B, T>::empty(ctx, x.shape());
            B::convert(ctx, static_cast<const float*>(x.data()), y.data(), static_cast<std::size_t>(x.numel()));
            return y;
        }
    };
    const auto sample = to_t(dynamicid::ops::randn<B, float>(ctx, {batch, 4, latent, latent}, 7));
    const auto text = to_t(dynamicid::ops::scale(ctx, dynamicid::ops::randn<B, float>(ctx, {batch, tokens, 768}, 8), 0.5));
    const std::vector<float> timesteps(static_cast<std::size_t>(batch), 981.0f);
    double best = 1e300;
    for (int i = 0; i <= timed; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        auto out = unet.forward(ctx, sample, std::span<const float>(timesteps), text);
        B::synchronize(ctx);
        const double t = seconds_since(t0);
        if (i > 0) best = std::min(best, t);  // the first run plans primitives and touches fresh memory
    }
    return best;
}

void run_unet(const options& o, int threads) {
    const modules::unet::unet_config cfg{};  // the defaults are SD1.5's
    const index_t latent = o.image / 8;
    const double macs = static_cast<double>(
        dynamicid::analysis::unet_macs(cfg, {.batch = 2, .height = latent, .width = latent, .tokens = 77}).total());
    const double flops = 2.0 * macs;
    std::printf("\nSD1.5 UNet, %lldx%lld (latent %lld), batch 2, 77 tokens: %.1f GMAC per evaluation\n", static_cast<long long>(o.image),
                static_cast<long long>(o.image), static_cast<long long>(latent), macs * 1e-9);
    const auto source = random_unet_weights(cfg, 1234);

    struct result {
        const char* what;
        double seconds;
    };
    std::vector<result> rows;
    auto report = [&](const char* what, double s) {
        rows.push_back({what, s});
        std::printf("  %-30s %8.2f s  %7.1f GFLOP/s  %5.2f of f32 FMA peak\n", what, s, flops / s * 1e-9, flops / s * 1e-9 / g_peak);
        std::fflush(stdout);
    };
    report("onednn f32", time_unet<onednn_backend, float>(source, cfg, threads, latent, 2));
    report("onednn bf16", time_unet<onednn_backend, bfloat16>(source, cfg, threads, latent, 2));
    report("reference f32", time_unet<cpu_backend, float>(source, cfg, threads, latent, 1));

    const double dnn32 = rows[0].seconds, dnn16 = rows[1].seconds, ref32 = rows[2].seconds;
    std::printf("\n  ratios (higher is faster for the first named):\n");
    std::printf("    onednn f32 / reference f32     %6.2fx\n", ref32 / dnn32);
    std::printf("    onednn bf16 / onednn f32       %6.2fx\n", dnn32 / dnn16);
    if (o.pytorch_f32) {
        std::printf("    onednn f32 / PyTorch f32       %6.2fx   (PyTorch %.2f s)\n", *o.pytorch_f32 / dnn32, *o.pytorch_f32);
        std::printf("    reference f32 / PyTorch f32    %6.2fx\n", *o.pytorch_f32 / ref32);
    }
    if (o.pytorch_bf16) std::printf("    onednn bf16 / PyTorch bf16     %6.2fx   (PyTorch %.2f s)\n", *o.pytorch_bf16 / dnn16, *o.pytorch_bf16);
}

[[noreturn]] void usage(const char* program) {
    std::fprintf(stderr, "usage: %s [--no-unet] [--threads=N] [--image=256] [--pytorch-seconds=F32[,BF16]]\n", program);
    std::exit(2);
}

options parse(int argc, char** argv) try {
    options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        if (a == "--no-unet") o.unet = false;
        else if (a.starts_with("--threads=")) o.threads = std::stoi(std::string(a.substr(10)));
        else if (a.starts_with("--image=")) o.image = std::stoll(std::string(a.substr(8)));
        else if (a.starts_with("--pytorch-seconds=")) {
            const std::string v(a.substr(18));
            const auto comma = v.find(',');
            o.pytorch_f32 = std::stod(v.substr(0, comma));
            if (comma != std::string::npos) o.pytorch_bf16 = std::stod(v.substr(comma + 1));
        } else {
            usage(argv[0]);
        }
    }
    return o;
} catch (const std::logic_error&) {  // a number that does not parse
    usage(argv[0]);
}

}  // namespace

int main(int argc, char** argv) {
    const options o = parse(argc, argv);
    const unsigned hw = std::thread::hardware_concurrency();
    const int threads = o.threads > 0 ? o.threads : (hw ? static_cast<int>(hw) : 1);
    const auto isas = dynamicid::bench::supported_isas();
    g_peak = dynamicid::bench::measure_peak(isas.front(), threads, 0.1, 3);
    std::printf("dynamicid oneDNN backend vs reference CPU backend (one run)\n");
    std::printf("  threads %d; measured f32 FMA peak (%s) %.1f GFLOP/s on %d threads; oneDNN %d.%d.%d\n", threads, isas.front().name, g_peak,
                threads, dnnl_version()->major, dnnl_version()->minor, dnnl_version()->patch);
    std::printf("  ref_pk / dnn_pk: achieved GFLOP/s over that f32 peak; speedup: reference time / oneDNN time\n");
    const index_t latent = o.image / 8;
    run_kernels<float>(threads, latent, "f32");
    run_kernels<bfloat16>(threads, latent, "bf16 (reference widens to f32 per call; oneDNN computes in bf16)");
    if (o.unet) run_unet(o, threads);
    return 0;
}
