// dynamicid benchmarks: the oneDNN backend against the reference CPU backend
// and against diffusers on PyTorch CPU, in one run, on Stable Diffusion 1.5's
// dominant operations and whole modules (random weights), in f32 and bf16.
//
//   dynamicid_bench_onednn                                  # everything (about 15 minutes on 2 cores)
//   dynamicid_bench_onednn --benchmark_filter=kernels       # the kernel rows only (a few minutes)
//   dynamicid_bench_onednn --benchmark_filter='unet_sd15/512' --pytorch=off
//   dynamicid_bench_onednn --threads=2 --pytorch=saved.txt  # PyTorch figures from an earlier run
//
// Rows:
//   kernels/gemm|conv/<shape>/<type>/<backend>    SD1.5's largest matmuls and convolutions at 512 x 512
//   kernels/attention/<shape>/<type>/composed|blocked
//                                                 the oneDNN backend's attention: gemm + softmax + gemm
//                                                 over the whole score matrix, or its blocked path
//   kernels/layer_norm_backward|geglu_backward|group_norm_backward/<shape>/<type>/<backend>
//                                                 training ops
//   unet_sd15/<image>/<type>/<backend>            one UNet evaluation, batch 2 (classifier-free
//                                                 guidance), 77 tokens, at 256 and 512; backend
//                                                 onednn_wcache: with context::weight_cache_bytes
//   vae_decode/512/<type>/<backend>               one VAE decode of a 64 x 64 latent
//   text_encoder/<type>/<backend>                 one CLIP ViT-L/14 text pass, batch 2 x 77 tokens
//
// Counters: GFLOP/s (2 per multiply-add, from analysis/flops.hpp for the
// modules), of_peak (that over the f32 FMA peak measured at start-up on the
// same threads; bf16 above 1 beats what f32 FMAs could do), and ratios against
// baselines measured earlier in the same run: vs_reference (reference f32
// time / this), vs_f32 (oneDNN f32 / this bf16), vs_composed (composed
// attention / this), vs_onednn (without the weight cache / with) and
// vs_pytorch (PyTorch's time for the same module, type, shapes and threads /
// this). Module rows time one run after a warm-up (two
// for oneDNN), kernels the best of several.
//
// PyTorch: with --pytorch=auto (the default) the program first runs
// tools/bench/pytorch_cpu_baseline.py when python3 can import torch and
// diffusers, before any of its own work so the two never share the cores;
// --pytorch=FILE reads that script's output from a file; --pytorch=off skips it.
//
// On a machine shared with other work, run with OMP_WAIT_POLICY=PASSIVE:
// idle OpenMP threads otherwise spin between parallel regions and take the
// cores the serial parts need.
#include "fma_peak.hpp"
#include "random_weights.hpp"

#include <benchmark/benchmark.h>

#include <dynamicid/analysis/flops.hpp>
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/backends/onednn.hpp>
#include <dynamicid/modules/clip/text_model.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/vae/autoencoder_kl.hpp>
#include <dynamicid/ops/attention.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#ifndef DYNAMICID_SOURCE_DIR
#define DYNAMICID_SOURCE_DIR "."
#endif

namespace {

using dynamicid::bfloat16;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using dynamicid::onednn_backend;
namespace modules = dynamicid::modules;

struct options {
    int threads = 0;
    std::string pytorch = "auto";
    std::string filter;  // --benchmark_filter, passed on to the PyTorch script
};
options g_options;
double g_peak = 0;                           // f32 FMA GFLOP/s on the benchmark's threads
std::map<std::string, double> g_seconds;     // row name -> best seconds, for the ratios
std::map<std::string, double> g_pytorch;     // "unet_sd15/512/f32" -> PyTorch seconds

int threads() { return g_options.threads; }

template <class T>
constexpr const char* type_name() {
    return std::is_same_v<T, float> ? "f32" : "bf16";
}
template <class B>
constexpr const char* backend_name() {
    return std::is_same_v<B, cpu_backend> ? "reference" : "onednn";
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Times `fn` once per benchmark iteration (manual time) and records the best.
double run_timed(benchmark::State& state, const std::function<void()>& fn) {
    double best = 1e300;
    for (auto _ : state) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        const double t = seconds_since(t0);
        state.SetIterationTime(t);
        best = std::min(best, t);
    }
    return best;
}

// Rate and ratio counters for row `name` (family/shape/type/backend) that took `seconds`.
void report(benchmark::State& state, const std::string& family, const std::string& type, const std::string& backend, double flops,
            double seconds) {
    g_seconds[family + "/" + type + "/" + backend] = seconds;
    const double gflops = flops / seconds * 1e-9;
    state.counters["GFLOP/s"] = gflops;
    state.counters["of_peak"] = gflops / g_peak;
    state.counters["seconds"] = seconds;
    auto ratio = [&](const char* counter, const std::string& baseline) {
        const auto it = g_seconds.find(baseline);
        if (it != g_seconds.end()) state.counters[counter] = it->second / seconds;
    };
    if (backend != "reference") ratio("vs_reference", family + "/f32/reference");
    if (type == "bf16") ratio("vs_f32", family + "/f32/" + backend);
    if (backend == "blocked") ratio("vs_composed", family + "/" + type + "/composed");
    if (backend == "onednn_wcache") ratio("vs_onednn", family + "/" + type + "/onednn");
    if (const auto it = g_pytorch.find(family + "/" + type); it != g_pytorch.end() && backend.starts_with("onednn"))
        state.counters["vs_pytorch"] = it->second / seconds;
}

template <class B, class T>
dynamicid::tensor<B, T> random_tensor(typename B::context& ctx, const dynamicid::shape& s, std::uint64_t seed, double scale = 1.0) {
    const auto x = dynamicid::ops::scale(ctx, dynamicid::ops::randn<B, float>(ctx, s, seed), scale);
    if constexpr (std::is_same_v<T, float>) {
        return x;
    } else {
        auto y = dynamicid::tensor<B, T>::empty(ctx, s);
        B::convert(ctx, static_cast<const float*>(x.data()), y.data(), static_cast<std::size_t>(x.numel()));
        return y;
    }
}

// ---- kernels ----------------------------------------------------------------------------

struct gemm_case {
    const char* name;
    index_t batch, m, n, k;
    bool trans_b;
};
// At 512 x 512 (latent 64, 4096 tokens), batch 2.
constexpr gemm_case gemm_cases[] = {
    {"proj_8192x320x320", 1, 8192, 320, 320, true},
    {"ff_in_8192x2560x320", 1, 8192, 2560, 320, true},
    {"ff_out_8192x320x1280", 1, 8192, 320, 1280, true},
    {"proj_512x1280x1280", 1, 512, 1280, 1280, true},
};

template <class B, class T>
void bm_gemm(benchmark::State& state, gemm_case g) {
    typename B::context ctx{.threads = threads()};
    const dynamicid::gemm_desc d{.batch = g.batch, .m = g.m, .n = g.n, .k = g.k, .trans_a = false, .trans_b = g.trans_b, .lda = g.k,
                                 .ldb = g.trans_b ? g.k : g.n, .ldc = g.n, .stride_a = g.m * g.k, .stride_b = g.k * g.n, .stride_c = g.m * g.n};
    const auto a = random_tensor<B, T>(ctx, {g.batch * g.m * g.k}, 1);
    const auto b = random_tensor<B, T>(ctx, {g.batch * g.k * g.n}, 2);
    auto c = dynamicid::tensor<B, T>::empty(ctx, {g.batch * g.m * g.n});
    B::gemm(ctx, d, a.data(), b.data(), c.data());
    const double s = run_timed(state, [&] { B::gemm(ctx, d, a.data(), b.data(), c.data()); });
    report(state, std::string("kernels/gemm/") + g.name, type_name<T>(), backend_name<B>(), 2.0 * double(g.batch * g.m * g.n) * double(g.k), s);
}

struct conv_case {
    const char* name;
    dynamicid::conv2d_desc d;
};
constexpr conv_case conv_cases[] = {
    {"3x3_n2_320ch_64", {.n = 2, .c_in = 320, .h = 64, .w = 64, .c_out = 320, .kh = 3, .kw = 3, .pad_h = 1, .pad_w = 1}},
    {"3x3_n2_640ch_32", {.n = 2, .c_in = 640, .h = 32, .w = 32, .c_out = 640, .kh = 3, .kw = 3, .pad_h = 1, .pad_w = 1}},
    {"3x3_n2_1280ch_16", {.n = 2, .c_in = 1280, .h = 16, .w = 16, .c_out = 1280, .kh = 3, .kw = 3, .pad_h = 1, .pad_w = 1}},
    {"3x3_n2_1280ch_8", {.n = 2, .c_in = 1280, .h = 8, .w = 8, .c_out = 1280, .kh = 3, .kw = 3, .pad_h = 1, .pad_w = 1}},
    {"1x1_n2_640to320_64", {.n = 2, .c_in = 640, .h = 64, .w = 64, .c_out = 320, .kh = 1, .kw = 1}},
};

template <class B, class T>
void bm_conv(benchmark::State& state, conv_case c) {
    const auto& d = c.d;
    typename B::context ctx{.threads = threads()};
    const auto x = random_tensor<B, T>(ctx, {d.n * d.c_in * d.h * d.w}, 3);
    const auto w = random_tensor<B, T>(ctx, {d.c_out * d.c_in / d.groups * d.kh * d.kw}, 4, 0.05);
    const auto bias = random_tensor<B, T>(ctx, {d.c_out}, 5);
    auto y = dynamicid::tensor<B, T>::empty(ctx, {d.n * d.c_out * d.out_h() * d.out_w()});
    B::conv2d_forward(ctx, d, x.data(), w.data(), bias.data(), y.data());
    const double s = run_timed(state, [&] { B::conv2d_forward(ctx, d, x.data(), w.data(), bias.data(), y.data()); });
    const double flops = 2.0 * double(d.n * d.c_out * d.out_h() * d.out_w()) * double(d.c_in / d.groups * d.kh * d.kw);
    report(state, std::string("kernels/conv/") + c.name, type_name<T>(), backend_name<B>(), flops, s);
}

struct attention_case {
    const char* name;
    index_t batch, lq, lk, d;
};
constexpr attention_case attention_cases[] = {
    {"16x4096x4096_d40", 16, 4096, 4096, 40},  // level 0 self-attention at 512
    {"16x1024x1024_d80", 16, 1024, 1024, 80},  // level 1
    {"16x4096x77_d40", 16, 4096, 77, 40},      // level 0 cross-attention
};

template <class T, bool Blocked>
void bm_attention(benchmark::State& state, attention_case a) {
    onednn_backend::context ctx{.threads = threads()};
    const auto q = random_tensor<onednn_backend, T>(ctx, {a.batch, a.lq, a.d}, 6);
    const auto k = random_tensor<onednn_backend, T>(ctx, {a.batch, a.lk, a.d}, 7);
    const auto v = random_tensor<onednn_backend, T>(ctx, {a.batch, a.lk, a.d}, 8);
    auto run = [&] {
        if constexpr (Blocked) benchmark::DoNotOptimize(dynamicid::ops::attention(ctx, q, k, v));
        else benchmark::DoNotOptimize(dynamicid::ops::attention_forward(ctx, q, k, v).first);
    };
    run();
    const double s = run_timed(state, run);
    const double macs = static_cast<double>(dynamicid::analysis::attention_matmul_macs("a", a.batch, a.lq, a.lk, a.d, a.d).total());
    report(state, std::string("kernels/attention/") + a.name, type_name<T>(), Blocked ? "blocked" : "composed", 2.0 * macs, s);
}

struct rows_cols_case {
    const char* name;
    index_t rows, cols;
};
constexpr rows_cols_case layer_norm_cases[] = {
    {"8192x320", 8192, 320},  // level 0 of a 512 UNet, batch 2
    {"2048x640", 2048, 640},  // level 1
};

// The layer norm's backward (input and affine gradients), a training op. It is
// memory-bound; GFLOP/s counts 8 floating-point operations per element.
template <class B, class T>
void bm_layer_norm_backward(benchmark::State& state, rows_cols_case c) {
    typename B::context ctx{.threads = threads()};
    const auto x = random_tensor<B, T>(ctx, {c.rows, c.cols}, 9);
    const auto gamma = random_tensor<B, T>(ctx, {c.cols}, 10);
    const auto beta = random_tensor<B, T>(ctx, {c.cols}, 11);
    const auto dy = random_tensor<B, T>(ctx, {c.rows, c.cols}, 12);
    const auto saved = dynamicid::ops::layer_norm_forward(ctx, x, &gamma, &beta).second;
    // Outputs allocated once, outside the timing (the backends allocate differently).
    auto dx = dynamicid::tensor<B, T>::empty(ctx, {c.rows, c.cols});
    auto dgamma = dynamicid::tensor<B, T>::empty(ctx, {c.cols});
    auto dbeta = dynamicid::tensor<B, T>::empty(ctx, {c.cols});
    const dynamicid::layer_norm_desc d{.rows = c.rows, .cols = c.cols};
    auto run = [&] {
        B::layer_norm_backward(ctx, d, x.data(), gamma.data(), saved.mean.data(), saved.rstd.data(), dy.data(), dx.data(), dgamma.data(),
                               dbeta.data());
    };
    run();
    const double s = run_timed(state, run);
    report(state, std::string("kernels/layer_norm_backward/") + c.name, type_name<T>(), backend_name<B>(), 8.0 * double(c.rows * c.cols), s);
}

// The GEGLU's backward (the feed-forward's gate), a training op: rows x cols
// outputs from rows x 2 cols inputs. GFLOP/s counts 20 operations per output.
template <class B, class T>
void bm_geglu_backward(benchmark::State& state, rows_cols_case c) {
    typename B::context ctx{.threads = threads()};
    const auto x = random_tensor<B, T>(ctx, {c.rows, 2 * c.cols}, 13);
    const auto dy = random_tensor<B, T>(ctx, {c.rows, c.cols}, 14);
    auto dx = dynamicid::tensor<B, T>::empty(ctx, {c.rows, 2 * c.cols});
    const dynamicid::geglu_desc d{.rows = c.rows, .cols = c.cols};
    auto run = [&] { B::geglu_backward(ctx, d, x.data(), dy.data(), dx.data()); };
    run();
    const double s = run_timed(state, run);
    report(state, std::string("kernels/geglu_backward/") + c.name, type_name<T>(), backend_name<B>(), 20.0 * double(c.rows * c.cols), s);
}

struct group_norm_case {
    const char* name;
    index_t n, c, side;
};
constexpr group_norm_case group_norm_cases[] = {
    {"2x320x64x64", 2, 320, 64},  // a resnet's norm at level 0 of a 512 UNet, batch 2
    {"2x640x32x32", 2, 640, 32},  // level 1
};

// The group norm's backward (input and affine gradients, 32 groups), a
// training op. Memory-bound; GFLOP/s counts 8 operations per element.
template <class B, class T>
void bm_group_norm_backward(benchmark::State& state, group_norm_case c) {
    typename B::context ctx{.threads = threads()};
    const dynamicid::shape s{c.n, c.c, c.side, c.side};
    const auto x = random_tensor<B, T>(ctx, s, 15);
    const auto gamma = random_tensor<B, T>(ctx, {c.c}, 16);
    const auto beta = random_tensor<B, T>(ctx, {c.c}, 17);
    const auto dy = random_tensor<B, T>(ctx, s, 18);
    const auto saved = dynamicid::ops::group_norm_forward(ctx, x, 32, &gamma, &beta).second;
    auto dx = dynamicid::tensor<B, T>::empty(ctx, s);
    auto dgamma = dynamicid::tensor<B, T>::empty(ctx, {c.c});
    auto dbeta = dynamicid::tensor<B, T>::empty(ctx, {c.c});
    const dynamicid::group_norm_desc d{.n = c.n, .c = c.c, .spatial = c.side * c.side, .groups = 32};
    auto run = [&] {
        B::group_norm_backward(ctx, d, x.data(), gamma.data(), saved.mean.data(), saved.rstd.data(), dy.data(), dx.data(), dgamma.data(),
                               dbeta.data());
    };
    run();
    const double t = run_timed(state, run);
    report(state, std::string("kernels/group_norm_backward/") + c.name, type_name<T>(), backend_name<B>(), 8.0 * double(s.numel()), t);
}

// ---- modules ----------------------------------------------------------------------------

// Loads a module of type M<B, T> with random weights (one source per config,
// shared by every backend); `extra` goes to both bind() and load() after the config.
template <template <class, class> class M, class B, class T, class Config, class... Extra>
M<B, T> random_module(typename B::context& ctx, const Config& cfg, const Extra&... extra) {
    cpu_backend::context host{};
    const auto source = dynamicid::bench::random_weight_source<cpu_backend, float>(
        host, [&](auto& b) { (void)M<cpu_backend, float>::bind(b, cfg, extra...); }, 1234);
    return M<B, T>::load(ctx, source, cfg, extra...);
}

template <class B, class T, bool CacheWeights = false>
void bm_unet(benchmark::State& state) {
    const index_t image = state.range(0), latent = image / 8, batch = 2, tokens = 77;
    typename B::context ctx{.threads = threads()};
    if constexpr (CacheWeights) ctx.weight_cache_bytes = std::size_t{8} << 30;
    const modules::unet::unet_config cfg{};  // the defaults are SD1.5's
    const auto unet = random_module<modules::unet::unet_2d_condition, B, T>(ctx, cfg);
    const auto sample = random_tensor<B, T>(ctx, {batch, 4, latent, latent}, 7);
    const auto text = random_tensor<B, T>(ctx, {batch, tokens, 768}, 8, 0.5);
    const std::vector<float> timesteps(static_cast<std::size_t>(batch), 981.0f);
    auto run = [&] {
        benchmark::DoNotOptimize(unet.forward(ctx, sample, std::span<const float>(timesteps), text));
        B::synchronize(ctx);
    };
    run();  // plans primitives and touches fresh memory
    const double s = run_timed(state, run);
    const double macs =
        static_cast<double>(dynamicid::analysis::unet_macs(cfg, {.batch = batch, .height = latent, .width = latent, .tokens = tokens}).total());
    report(state, "unet_sd15/" + std::to_string(image), type_name<T>(), CacheWeights ? "onednn_wcache" : backend_name<B>(), 2.0 * macs, s);
}

template <class B, class T>
void bm_vae_decode(benchmark::State& state) {
    const index_t latent = 64;
    typename B::context ctx{.threads = threads()};
    const modules::vae::autoencoder_kl_config cfg{};  // SD1.5's
    const auto vae = random_module<modules::vae::autoencoder_kl, B, T>(ctx, cfg, modules::vae::vae_parts::decoder);
    const auto z = random_tensor<B, T>(ctx, {1, 4, latent, latent}, 9);
    auto run = [&] {
        benchmark::DoNotOptimize(vae.decode(ctx, z));
        B::synchronize(ctx);
    };
    run();
    const double s = run_timed(state, run);
    const double macs = static_cast<double>(dynamicid::analysis::vae_decoder_macs(cfg, {.batch = 1, .height = latent, .width = latent}).total());
    report(state, "vae_decode/512", type_name<T>(), backend_name<B>(), 2.0 * macs, s);
}

// CLIP ViT-L/14's text tower, SD1.5's text encoder.
modules::clip::text_config sd15_text_config() {
    return {.hidden_size = 768, .intermediate_size = 3072, .num_attention_heads = 12, .num_hidden_layers = 12, .projection_dim = 768};
}

template <class B, class T>
void bm_text_encoder(benchmark::State& state) {
    const index_t batch = 2, tokens = 77;
    typename B::context ctx{.threads = threads()};
    const auto cfg = sd15_text_config();
    const auto model = random_module<modules::clip::text_model, B, T>(ctx, cfg);
    std::vector<std::int64_t> ids(static_cast<std::size_t>(batch * tokens), 49407);
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = i % 77 == 0 ? 49406 : static_cast<std::int64_t>(320 + (i * 7919) % 40000);
    auto run = [&] {
        benchmark::DoNotOptimize(model.forward(ctx, ids, batch));
        B::synchronize(ctx);
    };
    run();
    const double s = run_timed(state, run);
    const double macs = static_cast<double>(dynamicid::analysis::text_encoder_macs(cfg.encoder(), {.batch = batch, .tokens = tokens}).total());
    report(state, "text_encoder", type_name<T>(), backend_name<B>(), 2.0 * macs, s);
}

// ---- PyTorch ----------------------------------------------------------------------------

// Lines "pytorch <row> <seconds>" (tools/bench/pytorch_cpu_baseline.py) from `text`.
void parse_pytorch(const std::string& text) {
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream words(line);
        std::string tag, row;
        double seconds = 0;
        if (words >> tag >> row >> seconds && tag == "pytorch" && seconds > 0) g_pytorch[row] = seconds;
    }
}

void load_pytorch() {
    const std::string& how = g_options.pytorch;
    if (how == "off") return;
    if (how != "auto") {
        std::ifstream in(how);
        if (!in) {
            std::fprintf(stderr, "bench: cannot read PyTorch figures from '%s'\n", how.c_str());
            std::exit(2);
        }
        std::stringstream all;
        all << in.rdbuf();
        parse_pytorch(all.str());
        return;
    }
    if (std::system("python3 -c 'import torch, diffusers' > /dev/null 2>&1") != 0) {
        std::printf("PyTorch or diffusers is not installed: no vs_pytorch ratios (pip install torch diffusers)\n");
        return;
    }
    std::string command = "python3 " DYNAMICID_SOURCE_DIR "/tools/bench/pytorch_cpu_baseline.py --threads " + std::to_string(threads());
    // Its rows lack the backend part of ours ("unet_sd15/512/f32"); a filter naming a backend matches none.
    if (!g_options.filter.empty() && g_options.filter.find('\'') == std::string::npos) command += " --filter '" + g_options.filter + "'";
    std::printf("running the PyTorch baseline first: %s\n", command.c_str());
    std::fflush(stdout);
    FILE* pipe = popen(command.c_str(), "r");
    if (!pipe) return;
    std::string text;
    char buffer[512];
    while (std::fgets(buffer, sizeof buffer, pipe)) {
        text += buffer;
        std::fputs(buffer, stdout);
    }
    pclose(pipe);
    parse_pytorch(text);
}

// ---- registration -----------------------------------------------------------------------

// A kernel row: manual time, milliseconds, at least 0.2 s of runs.
template <class Fn, class Case>
void register_kernel(const std::string& name, Fn fn, const Case& c) {
    benchmark::RegisterBenchmark(name.c_str(), fn, c)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
}

template <class T>
void register_kernels() {
    const std::string t = std::string("/") + type_name<T>();
    for (const auto& g : gemm_cases) {
        register_kernel("kernels/gemm/" + std::string(g.name) + t + "/reference", bm_gemm<cpu_backend, T>, g);
        register_kernel("kernels/gemm/" + std::string(g.name) + t + "/onednn", bm_gemm<onednn_backend, T>, g);
    }
    for (const auto& c : conv_cases) {
        register_kernel("kernels/conv/" + std::string(c.name) + t + "/reference", bm_conv<cpu_backend, T>, c);
        register_kernel("kernels/conv/" + std::string(c.name) + t + "/onednn", bm_conv<onednn_backend, T>, c);
    }
    for (const auto& a : attention_cases) {
        register_kernel("kernels/attention/" + std::string(a.name) + t + "/composed", bm_attention<T, false>, a);
        register_kernel("kernels/attention/" + std::string(a.name) + t + "/blocked", bm_attention<T, true>, a);
    }
    for (const auto& c : {rows_cols_case{"8192x1280", 8192, 1280}}) {  // level 0's feed-forward at 512, batch 2
        register_kernel("kernels/geglu_backward/" + std::string(c.name) + t + "/reference", bm_geglu_backward<cpu_backend, T>, c);
        register_kernel("kernels/geglu_backward/" + std::string(c.name) + t + "/onednn", bm_geglu_backward<onednn_backend, T>, c);
    }
    for (const auto& c : group_norm_cases) {
        register_kernel("kernels/group_norm_backward/" + std::string(c.name) + t + "/reference", bm_group_norm_backward<cpu_backend, T>, c);
        register_kernel("kernels/group_norm_backward/" + std::string(c.name) + t + "/onednn", bm_group_norm_backward<onednn_backend, T>, c);
    }
    for (const auto& c : layer_norm_cases) {
        register_kernel("kernels/layer_norm_backward/" + std::string(c.name) + t + "/reference", bm_layer_norm_backward<cpu_backend, T>, c);
        register_kernel("kernels/layer_norm_backward/" + std::string(c.name) + t + "/onednn", bm_layer_norm_backward<onednn_backend, T>, c);
    }
}

template <class B, class T>
void register_modules(int timed) {
    const std::string suffix = std::string("/") + type_name<T>() + "/" + backend_name<B>();
    for (index_t image : {256, 512})
        benchmark::RegisterBenchmark(("unet_sd15/" + std::to_string(image) + suffix).c_str(), bm_unet<B, T>)
            ->Arg(image)->Iterations(timed)->UseManualTime()->Unit(benchmark::kSecond);
    benchmark::RegisterBenchmark(("vae_decode/512" + suffix).c_str(), bm_vae_decode<B, T>)
        ->Iterations(timed)->UseManualTime()->Unit(benchmark::kSecond);
    benchmark::RegisterBenchmark(("text_encoder" + suffix).c_str(), bm_text_encoder<B, T>)
        ->Iterations(timed)->UseManualTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
    // Our flags first; the rest go to Google Benchmark.
    std::vector<char*> rest{argv[0]};
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        if (a.starts_with("--threads=")) g_options.threads = std::atoi(argv[i] + 10);
        else if (a.starts_with("--pytorch=")) g_options.pytorch = std::string(a.substr(10));
        else {
            if (a.starts_with("--benchmark_filter=")) g_options.filter = std::string(a.substr(19));
            rest.push_back(argv[i]);
        }
    }
    if (g_options.threads <= 0) {
        const unsigned hw = std::thread::hardware_concurrency();
        g_options.threads = hw ? static_cast<int>(hw) : 1;
    }
    int rest_argc = static_cast<int>(rest.size());
    benchmark::Initialize(&rest_argc, rest.data());
    if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 2;

    load_pytorch();
    const auto isas = dynamicid::bench::supported_isas();
    g_peak = dynamicid::bench::measure_peak(isas.front(), threads(), 0.1, 3);
    std::printf("threads %d; measured f32 FMA peak (%s) %.1f GFLOP/s; oneDNN %d.%d.%d\n", threads(), isas.front().name, g_peak,
                dnnl_version()->major, dnnl_version()->minor, dnnl_version()->patch);
    const bool bf16 = dynamicid::onednn_backend::native_bf16();
    if (!bf16)
        std::printf("oneDNN has no bf16 kernels here (no AVX-512, or ONEDNN_MAX_CPU_ISA caps it): the bf16 rows time the reference fallback\n");
    benchmark::AddCustomContext("onednn_native_bf16", bf16 ? "yes" : "no");
    benchmark::AddCustomContext("f32_fma_peak_GFLOP/s", std::to_string(g_peak));
    benchmark::AddCustomContext("threads", std::to_string(threads()));

    // Baselines register first: Google Benchmark runs rows in registration order.
    register_kernels<float>();
    register_kernels<bfloat16>();
    register_modules<cpu_backend, float>(1);
    register_modules<onednn_backend, float>(2);
    register_modules<onednn_backend, bfloat16>(2);
    // The UNet again with the opt-in weight cache (context::weight_cache_bytes).
    for (index_t image : {256, 512}) {
        benchmark::RegisterBenchmark(("unet_sd15/" + std::to_string(image) + "/f32/onednn_wcache").c_str(), bm_unet<onednn_backend, float, true>)
            ->Arg(image)->Iterations(2)->UseManualTime()->Unit(benchmark::kSecond);
        benchmark::RegisterBenchmark(("unet_sd15/" + std::to_string(image) + "/bf16/onednn_wcache").c_str(), bm_unet<onednn_backend, bfloat16, true>)
            ->Arg(image)->Iterations(2)->UseManualTime()->Unit(benchmark::kSecond);
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
