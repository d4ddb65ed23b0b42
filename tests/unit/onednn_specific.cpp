// What the test matrix does not show about the oneDNN backend: that its
// primitives really run on oneDNN (nothing falls back to the reference code
// for the shapes a UNet uses), in f32 and bf16, at blocked-format sizes;
// that it keeps to the context's thread count; that planned primitives are
// reused; and that f64 runs the reference code bit for bit.
#if __has_include(<dynamicid/backends/onednn.hpp>)
#include <support/gradcheck.hpp>

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/backends/onednn.hpp>
#include <dynamicid/backends/onednn/xtensor.hpp>
#include <dynamicid/ops.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using dynamicid::bfloat16;
using dynamicid::cpu_backend;
using dynamicid::onednn_backend;
using dynamicid::shape;
using dynamicid::testing::check_close;
using dynamicid::testing::download;
using dynamicid::testing::round_to;
using dynamicid::testing::upload;
namespace ops = dynamicid::ops;

std::vector<double> normal(const shape& s, std::uint64_t seed) {
    std::vector<double> v(static_cast<std::size_t>(s.numel()));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(dynamicid::philox::normal(seed, i));
    return v;
}

// Runs `op` on the same inputs (rounded to T) on the oneDNN backend in T and on
// the reference backend in f32; the results must agree within `tol`.
template <class T, class Op>
void compare_with_reference(onednn_backend::context& ctx, const std::string& label, const std::vector<shape>& shapes, double tol, Op op,
                            std::uint64_t seed) {
    cpu_backend::context ref{};
    std::vector<dynamicid::tensor<onednn_backend, T>> mine;
    std::vector<dynamicid::tensor<cpu_backend, float>> theirs;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
        const auto values = round_to<T>(normal(shapes[i], seed + i));
        mine.push_back(upload<onednn_backend, T>(ctx, shapes[i], values));
        theirs.push_back(upload<cpu_backend, float>(ref, shapes[i], values));
    }
    check_close(label, download(ctx, op(ctx, mine)), download(ref, op(ref, theirs)), tol, tol);
}

// The UNet's op mix at small sizes, in T: everything must run on oneDNN.
template <class T>
void check_native_mix(double tol) {
    onednn_backend::context ctx{.threads = 2};
    const std::string t = std::is_same_v<T, float> ? " f32" : " bf16";
    compare_with_reference<T>(ctx, "conv 3x3 blocked" + t, {{2, 32, 12, 12}, {48, 32, 3, 3}, {48}}, tol,
                              [](auto& c, const auto& in) { return ops::conv2d(c, in[0], in[1], &in[2], {.padding = 1}); }, 11);
    compare_with_reference<T>(ctx, "conv 3x3 stride 2" + t, {{1, 32, 13, 12}, {32, 32, 3, 3}, {32}}, tol,
                              [](auto& c, const auto& in) { return ops::conv2d(c, in[0], in[1], &in[2], {.stride = 2, .padding = 1}); }, 21);
    compare_with_reference<T>(ctx, "conv 1x1" + t, {{2, 48, 8, 8}, {32, 48, 1, 1}, {32}}, tol,
                              [](auto& c, const auto& in) { return ops::conv2d(c, in[0], in[1], &in[2]); }, 31);
    compare_with_reference<T>(ctx, "conv backward" + t, {{2, 32, 8, 8}, {16, 32, 3, 3}, {16}, {2, 16, 8, 8}}, tol,
                              [](auto& c, const auto& in) {
                                  const auto saved = ops::conv2d_forward(c, in[0], in[1], &in[2], {.padding = 1}).second;
                                  const auto g = ops::conv2d_backward(c, saved, in[3]);
                                  return ops::concat(c, std::vector{g.input.reshape({-1}), g.weight.reshape({-1}), g.bias.reshape({-1})}, 0);
                              },
                              41);
    compare_with_reference<T>(ctx, "linear" + t, {{2, 77, 96}, {64, 96}, {64}}, tol,
                              [](auto& c, const auto& in) { return ops::linear(c, in[0], in[1], &in[2]); }, 51);
    compare_with_reference<T>(ctx, "attention" + t, {{4, 64, 40}, {4, 77, 40}, {4, 77, 40}}, tol,
                              [](auto& c, const auto& in) { return ops::attention(c, in[0], in[1], in[2]); }, 61);
    compare_with_reference<T>(ctx, "softmax backward" + t, {{6, 33}, {6, 33}}, tol,
                              [](auto& c, const auto& in) { return ops::softmax_backward(c, ops::softmax_forward(c, in[0]).second, in[1]); }, 71);
    for (auto op : {dynamicid::unary_op::silu, dynamicid::unary_op::gelu_erf, dynamicid::unary_op::quick_gelu})
        compare_with_reference<T>(ctx, "unary forward and backward" + t, {{5, 37}, {5, 37}}, tol,
                                  [op](auto& c, const auto& in) {
                                      const auto [y, saved] = ops::unary_forward(c, op, in[0]);
                                      return ops::concat(c, std::vector{y, ops::unary_backward(c, saved, in[1])}, 0);
                                  },
                                  81);
    compare_with_reference<T>(ctx, "broadcast add, broadcast first operand" + t, {{2, 1, 16}, {2, 8, 16}}, tol,
                              [](auto& c, const auto& in) { return ops::add(c, in[0], in[1]); }, 91);
    compare_with_reference<T>(ctx, "sum over two axes" + t, {{2, 40, 9}}, tol,
                              [](auto& c, const auto& in) { return ops::sum(c, in[0], {0, 2}); }, 101);
    compare_with_reference<T>(ctx, "permute and slice" + t, {{2, 5, 6, 4}}, tol,
                              [](auto& c, const auto& in) { return ops::slice(c, ops::permute(c, in[0], {0, 2, 3, 1}), 1, 1, 4); }, 111);
    compare_with_reference<T>(ctx, "upsample forward and backward" + t, {{2, 3, 8, 8}, {2, 3, 16, 16}}, tol,
                              [](auto& c, const auto& in) {
                                  const auto [y, saved] = ops::upsample_nearest_forward(c, in[0], 2);
                                  const auto dx = ops::upsample_nearest_backward(c, saved, in[1]);
                                  return ops::concat(c, std::vector{y.reshape({-1}), dx.reshape({-1})}, 0);
                              },
                              121);
    compare_with_reference<T>(ctx, "group_norm" + t, {{2, 32, 5, 5}, {32}, {32}}, tol,
                              [](auto& c, const auto& in) { return ops::group_norm(c, in[0], 8, &in[1], &in[2]); }, 131);
    compare_with_reference<T>(ctx, "group_norm forward and backward" + t, {{2, 32, 5, 5}, {32}, {32}, {2, 32, 5, 5}}, tol,
                              [](auto& c, const auto& in) {
                                  const auto [y, saved] = ops::group_norm_forward(c, in[0], 8, &in[1], &in[2]);
                                  const auto g = ops::group_norm_backward(c, saved, in[3]);
                                  return ops::concat(c, std::vector{y.reshape({-1}), g.input.reshape({-1}), g.gamma, g.beta}, 0);
                              },
                              133);
    compare_with_reference<T>(ctx, "group_norm backward, 37 positions, input gradient only" + t, {{3, 12, 37}, {12}, {12}, {3, 12, 37}},
                              tol,
                              [](auto& c, const auto& in) {
                                  const auto saved = ops::group_norm_forward(c, in[0], 4, &in[1], &in[2]).second;
                                  return ops::group_norm_backward(c, saved, in[3], {.input = true, .params = false}).input;
                              },
                              135);
    compare_with_reference<T>(ctx, "group_norm backward without affine" + t, {{2, 6, 4, 9}, {2, 6, 4, 9}}, tol,
                              [](auto& c, const auto& in) {
                                  const auto saved = ops::group_norm_forward(c, in[0], 3, nullptr, nullptr).second;
                                  const auto g = ops::group_norm_backward(c, saved, in[1]);
                                  return ops::concat(c, std::vector{g.input.reshape({-1}), g.gamma, g.beta}, 0);
                              },
                              137);
    compare_with_reference<T>(ctx, "group_norm backward, affine gradients only" + t, {{2, 6, 4, 9}, {6}, {2, 6, 4, 9}}, tol,
                              [](auto& c, const auto& in) {
                                  const auto saved = ops::group_norm_forward(c, in[0], 3, &in[1], nullptr).second;
                                  const auto g = ops::group_norm_backward(c, saved, in[2], {.input = false, .params = true});
                                  return ops::concat(c, std::vector{g.gamma, g.beta}, 0);
                              },
                              139);
    compare_with_reference<T>(ctx, "geglu" + t, {{3, 70, 2 * 48}}, tol, [](auto& c, const auto& in) { return ops::geglu(c, in[0]); }, 151);
    compare_with_reference<T>(ctx, "geglu forward and backward" + t, {{3, 70, 2 * 37}, {3, 70, 37}}, tol,
                              [](auto& c, const auto& in) {
                                  const auto [y, saved] = ops::geglu_forward(c, in[0]);
                                  return ops::concat(c, std::vector{y.reshape({-1}), ops::geglu_backward(c, saved, in[1]).reshape({-1})}, 0);
                              },
                              155);
    compare_with_reference<T>(ctx, "layer_norm forward" + t, {{7, 48}, {48}, {48}}, tol,
                              [](auto& c, const auto& in) { return ops::layer_norm(c, in[0], &in[1], &in[2]); }, 145);
    compare_with_reference<T>(ctx, "layer_norm forward and backward" + t, {{7, 48}, {48}, {48}, {7, 48}}, tol,
                              [](auto& c, const auto& in) {
                                  const auto [y, saved] = ops::layer_norm_forward(c, in[0], &in[1], &in[2]);
                                  const auto g = ops::layer_norm_backward(c, saved, in[3]);
                                  return ops::concat(c, std::vector{y.reshape({-1}), g.input.reshape({-1}), g.gamma, g.beta}, 0);
                              },
                              141);
    compare_with_reference<T>(ctx, "layer_norm backward, 37 columns, input gradient only" + t, {{9, 37}, {37}, {37}, {9, 37}}, tol,
                              [](auto& c, const auto& in) {
                                  const auto saved = ops::layer_norm_forward(c, in[0], &in[1], &in[2]).second;
                                  return ops::layer_norm_backward(c, saved, in[3], {.input = true, .params = false}).input;
                              },
                              147);
    compare_with_reference<T>(ctx, "layer_norm backward without affine" + t, {{9, 37}, {9, 37}}, tol,
                              [](auto& c, const auto& in) {
                                  const auto saved = ops::layer_norm_forward(c, in[0], nullptr, nullptr).second;
                                  return ops::layer_norm_backward(c, saved, in[1]).input;
                              },
                              149);
    // bf16 has oneDNN kernels only from AVX-512 up; elsewhere it falls back
    // to the reference (the values above are still checked).
    if (std::is_same_v<T, float> || onednn_backend::native_bf16()) {
        INFO("primitive configurations oneDNN could not plan: " << ctx.runtime().unsupported());
        CHECK(ctx.runtime().unsupported() == 0);
    }
}

}  // namespace

TEST_CASE("onednn: the UNet's primitives run on oneDNN in f32", "[onednn]") { check_native_mix<float>(1e-4); }

// bf16 inputs, bf16 results and intermediates against the f32 reference on the same inputs.
TEST_CASE("onednn: the UNet's primitives run on oneDNN in bf16", "[onednn]") { check_native_mix<bfloat16>(4e-2); }

// native_bf16() follows the CPU: AVX-512 F, BW, VL and DQ (oneDNN's
// avx512_core), unless ONEDNN_MAX_CPU_ISA caps what oneDNN may use.
TEST_CASE("onednn: native_bf16 follows the CPU's AVX-512", "[onednn]") {
    if (std::getenv("ONEDNN_MAX_CPU_ISA") || std::getenv("DNNL_MAX_CPU_ISA")) {
        WARN("oneDNN's ISA is capped by the environment: not checked");
        return;
    }
    const bool avx512_core = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    CHECK(onednn_backend::native_bf16() == avx512_core);
}

// The attention runs a block of query rows (or of heads) at a time, on one
// context or (several threads) one worker per thread; these shapes cut it into
// several blocks with a partial last one, both ways.
TEST_CASE("onednn: blocked attention matches the composed reference", "[onednn][attention]") {
    STATIC_REQUIRE(dynamicid::has_fused_attention<onednn_backend, float>);
    STATIC_REQUIRE(dynamicid::has_fused_attention<onednn_backend, bfloat16>);
    using block = std::pair<dynamicid::index_t, dynamicid::index_t>;
    const dynamicid::index_t shared = dynamicid::index_t{1} << 20, per_thread = dynamicid::index_t{1} << 18;
    CHECK(onednn_backend::attention_block(2, 1500, 1000, shared) == block{1, 1040});
    CHECK(onednn_backend::attention_block(3, 400, 1000, shared) == block{2, 400});
    CHECK(onednn_backend::attention_block(16, 4096, 77, shared) == block{3, 4096});
    CHECK(onednn_backend::attention_block(1, 1500, 1000, per_thread) == block{1, 256});
    CHECK(onednn_backend::attention_block(8, 4096, 4096, per_thread) == block{1, 64});
    auto attention = [](auto& c, const auto& in) { return ops::attention(c, in[0], in[1], in[2]); };
    for (int threads : {1, 2}) {
        onednn_backend::context ctx{.threads = threads};
        const std::string on = " on " + std::to_string(threads) + " threads";
        compare_with_reference<float>(ctx, "attention, query blocks" + on, {{2, 1500, 40}, {2, 1000, 40}, {2, 1000, 24}}, 1e-4, attention, 161);
        compare_with_reference<float>(ctx, "attention, head blocks" + on, {{3, 400, 80}, {3, 1000, 80}, {3, 1000, 80}}, 1e-4, attention, 171);
        compare_with_reference<float>(ctx, "attention, one head" + on, {{1, 700, 40}, {1, 900, 40}, {1, 900, 40}}, 1e-4, attention, 175);
        CHECK(ctx.runtime().unsupported() == 0);
        compare_with_reference<bfloat16>(ctx, "attention, query blocks bf16" + on, {{2, 1500, 40}, {2, 1000, 40}, {2, 1000, 24}}, 4e-2,
                                         attention, 181);
        if (onednn_backend::native_bf16()) CHECK(ctx.runtime().unsupported() == 0);
    }
    // Called from inside a host program's own OpenMP threads, each with its own context.
#if defined(_OPENMP)
    {
        cpu_backend::context ref{};
        const auto q = round_to<float>(normal({4, 300, 40}, 191)), k = round_to<float>(normal({4, 500, 40}, 192)),
                   v = round_to<float>(normal({4, 500, 40}, 193));
        const auto want = download(ref, ops::attention(ref, upload<cpu_backend, float>(ref, {4, 300, 40}, q),
                                                       upload<cpu_backend, float>(ref, {4, 500, 40}, k), upload<cpu_backend, float>(ref, {4, 500, 40}, v)));
        std::vector<std::vector<double>> got(3);
#pragma omp parallel num_threads(3)
        {
            onednn_backend::context mine{.threads = 2};
            got[static_cast<std::size_t>(omp_get_thread_num())] =
                download(mine, ops::attention(mine, upload<onednn_backend, float>(mine, {4, 300, 40}, q), upload<onednn_backend, float>(mine, {4, 500, 40}, k),
                                              upload<onednn_backend, float>(mine, {4, 500, 40}, v)));
        }
        for (const auto& g : got) check_close("attention inside the caller's parallel region", g, want, 1e-4, 1e-4);
    }
#endif
    // No keys: the composed path's empty softmax gives zeros.
    onednn_backend::context ctx{.threads = 2};
    const auto q = ops::randn<onednn_backend, float>(ctx, {2, 3, 8}, 1);
    const auto none = dynamicid::tensor<onednn_backend, float>::empty(ctx, {2, 0, 8});
    for (double v : download(ctx, ops::attention(ctx, q, none, none))) CHECK(v == 0.0);
}

TEST_CASE("onednn: primitives are planned once per configuration", "[onednn]") {
    onednn_backend::context ctx{.threads = 1};
    const auto x = ops::randn<onednn_backend, float>(ctx, {2, 8, 6, 6}, 1);
    const auto w = ops::randn<onednn_backend, float>(ctx, {8, 8, 3, 3}, 2);
    (void)ops::conv2d(ctx, x, w, nullptr, {.padding = 1});
    const auto size = ctx.runtime().cache_size(), misses = ctx.runtime().cache_misses(), hits = ctx.runtime().cache_hits();
    (void)ops::conv2d(ctx, x, w, nullptr, {.padding = 1});
    CHECK(ctx.runtime().cache_size() == size);
    CHECK(ctx.runtime().cache_misses() == misses);
    CHECK(ctx.runtime().cache_hits() > hits);
    // Another thread count is another plan.
    ctx.threads = 2;
    (void)ops::conv2d(ctx, x, w, nullptr, {.padding = 1});
    CHECK(ctx.runtime().cache_misses() > misses);
}

TEST_CASE("onednn: calls keep to the context's thread count and restore OpenMP's", "[onednn]") {
#if defined(_OPENMP)
    const int before = omp_get_max_threads();
#endif
    std::vector<std::vector<double>> results;
    for (int threads : {1, 2, 3}) {
        onednn_backend::context ctx{.threads = threads};
        const auto a = ops::randn<onednn_backend, float>(ctx, {64, 96}, 5);
        const auto b = ops::randn<onednn_backend, float>(ctx, {96, 80}, 6);
        results.push_back(download(ctx, ops::matmul(ctx, a, b)));
#if defined(_OPENMP)
        CHECK(omp_get_max_threads() == before);
#endif
    }
    check_close("matmul on 2 threads vs 1", results[1], results[0], 1e-4, 1e-4);
    check_close("matmul on 3 threads vs 1", results[2], results[0], 1e-4, 1e-4);
}

TEST_CASE("onednn: f64 runs the reference code exactly", "[onednn]") {
    STATIC_REQUIRE(dynamicid::supports_element<onednn_backend, double>);
    onednn_backend::context mine{};
    cpu_backend::context ref{};
    const auto xs = normal({2, 6, 5, 5}, 7), ws = normal({4, 6, 3, 3}, 8);
    const auto y = ops::conv2d(mine, upload<onednn_backend, double>(mine, {2, 6, 5, 5}, xs), upload<onednn_backend, double>(mine, {4, 6, 3, 3}, ws),
                               nullptr, {.padding = 1});
    const auto want = ops::conv2d(ref, upload<cpu_backend, double>(ref, {2, 6, 5, 5}, xs), upload<cpu_backend, double>(ref, {4, 6, 3, 3}, ws),
                                  nullptr, {.padding = 1});
    check_close("f64 conv2d", download(mine, y), download(ref, want), 0, 0);
}

TEST_CASE("onednn: the group-norm backward keeps f32 precision for inputs far from zero", "[onednn]") {
    // Values of 10^4 plus noise, 1089 per channel (more than one of the
    // kernel's 1024-value blocks, and a tail): sum(dy * x) - mean * sum(dy)
    // would cancel most of a float's digits; the kernel sums dy * (x - mean).
    // Both sides get the same f32 statistics, so the forward's rounding is out
    // of the comparison.
    onednn_backend::context mine{.threads = 2};
    cpu_backend::context ref{};
    const shape xs{2, 4, 33, 33};
    auto x = normal(xs, 17);
    for (auto& v : x) v = static_cast<float>(1e4 + 0.5 * v);
    const auto dy = normal(xs, 18), gamma = normal({4}, 19);
    const auto g32 = upload<onednn_backend, float>(mine, {4}, gamma);
    const auto x32 = upload<onednn_backend, float>(mine, xs, x);
    const auto saved = ops::group_norm_forward(mine, x32, 2, &g32, nullptr).second;
    const auto got = ops::group_norm_backward(mine, saved, upload<onednn_backend, float>(mine, xs, dy));

    const dynamicid::group_norm_desc d{.n = 2, .c = 4, .spatial = 33 * 33, .groups = 2};
    const auto mean = upload<cpu_backend, double>(ref, {2, 2}, download(mine, saved.mean));
    const auto rstd = upload<cpu_backend, double>(ref, {2, 2}, download(mine, saved.rstd));
    const auto x64 = upload<cpu_backend, double>(ref, xs, x), dy64 = upload<cpu_backend, double>(ref, xs, dy);
    const auto g64 = upload<cpu_backend, double>(ref, {4}, gamma);
    auto dx = dynamicid::tensor<cpu_backend, double>::empty(ref, xs);
    auto dgamma = dynamicid::tensor<cpu_backend, double>::empty(ref, {4});
    auto dbeta = dynamicid::tensor<cpu_backend, double>::empty(ref, {4});
    cpu_backend::group_norm_backward(ref, d, x64.data(), g64.data(), mean.data(), rstd.data(), dy64.data(), dx.data(), dgamma.data(),
                                     dbeta.data());
    check_close("group_norm backward at mean 1e4, dx", download(mine, got.input), download(ref, dx), 1e-4, 1e-4);
    check_close("group_norm backward at mean 1e4, dgamma", download(mine, got.gamma), download(ref, dgamma), 1e-4, 1e-4);
    check_close("group_norm backward at mean 1e4, dbeta", download(mine, got.beta), download(ref, dbeta), 1e-4, 1e-4);
}

TEST_CASE("onednn: a fully masked softmax row is zeros in bf16 too", "[onednn]") {
    onednn_backend::context ctx{};
    const double inf = std::numeric_limits<double>::infinity();
    std::vector<double> x{1, 2, -inf, 0.5, -inf, -inf, -inf, -inf};
    const auto y = download(ctx, ops::softmax(ctx, upload<onednn_backend, bfloat16>(ctx, {2, 4}, x)));
    for (std::size_t i = 4; i < 8; ++i) CHECK(y[i] == 0.0);
    CHECK(y[2] == 0.0);
    CHECK(std::abs(y[0] + y[1] + y[3] - 1.0) < 1e-2);
}

TEST_CASE("onednn: large host allocations are cached for reuse", "[onednn]") {
    onednn_backend::context ctx{.threads = 1};
    const std::size_t n = (std::size_t{4} << 20) / sizeof(float);  // 4 MiB
    const float* first = nullptr;
    {
        auto a = onednn_backend::allocate<float>(ctx, n);
        first = a.data();
        a.data()[n - 1] = 1.0f;
    }
    auto* pool = ctx.runtime().pool_if_made();
    REQUIRE(pool != nullptr);
    CHECK(pool->cached_bytes() >= n * sizeof(float));
    {
        auto b = onednn_backend::allocate<float>(ctx, n - 1000);  // a little smaller: the same block
        CHECK(b.data() == first);
        CHECK(pool->hits() == 1);
        CHECK(pool->cached_bytes() == 0);
        // Freed on another thread: the pool takes it back all the same.
        std::thread([moved = std::move(b)]() mutable { moved = {}; }).join();
    }
    CHECK(pool->cached_bytes() >= n * sizeof(float));
    {
        auto c = onednn_backend::allocate<float>(ctx, n * 2);  // too large for the cached block
        CHECK(pool->misses() >= 2);
    }
    onednn_backend::release_cached(ctx);
    CHECK(pool->cached_bytes() == 0);
    // Small allocations and a zero limit bypass the cache.
    { auto small = onednn_backend::allocate<float>(ctx, 16); }
    CHECK(pool->cached_bytes() == 0);
    ctx.host_cache_bytes = 0;
    { auto big = onednn_backend::allocate<float>(ctx, n); }
    CHECK(pool->cached_bytes() == 0);
    // A limit below the cached total trims the cache when it changes.
    ctx.host_cache_bytes = std::size_t{64} << 20;
    { auto big = onednn_backend::allocate<float>(ctx, n); }
    CHECK(pool->cached_bytes() >= n * sizeof(float));
    ctx.host_cache_bytes = 1;
    { auto tiny = onednn_backend::allocate<float>(ctx, 1); }
    CHECK(pool->cached_bytes() == 0);
}

TEST_CASE("onednn: the opt-in weight cache reuses reordered weights and notices rewrites", "[onednn]") {
    onednn_backend::context plain{.threads = 2};
    onednn_backend::context ctx{.threads = 2, .weight_cache_bytes = std::size_t{64} << 20};
    auto x = ops::randn<onednn_backend, float>(ctx, {2, 32, 10, 10}, 1);
    auto w = ops::randn<onednn_backend, float>(ctx, {48, 32, 3, 3}, 2);
    const auto b = ops::randn<onednn_backend, float>(ctx, {48}, 3);
    auto conv = [&](onednn_backend::context& c) { return download(c, ops::conv2d(c, x, w, &b, {.padding = 1})); };
    const auto want = conv(plain);
    auto& cache = ctx.runtime().weights();
    check_close("first call (reorders and caches)", conv(ctx), want, 1e-6, 1e-6);
    CHECK(cache.entries() == 1);
    CHECK(cache.misses() == 1);
    check_close("second call (cached weights)", conv(ctx), want, 1e-6, 1e-6);
    CHECK(cache.hits() == 1);
    // An optimiser-like rewrite in place: the fingerprint changes, the weights are reordered afresh.
    float* wp = w.data();
    for (std::size_t i = 0; i < static_cast<std::size_t>(w.numel()); ++i) wp[i] *= 0.5f;
    const auto want_half = conv(plain);
    check_close("after an in-place rewrite", conv(ctx), want_half, 1e-6, 1e-6);
    CHECK(cache.stale() == 1);
    // Too small a limit: nothing cached, same results.
    onednn_backend::context tiny{.threads = 2, .weight_cache_bytes = 64};
    check_close("weights larger than the limit", conv(tiny), want_half, 1e-6, 1e-6);
    CHECK(tiny.runtime().weights().entries() == 0);
    onednn_backend::release_cached(ctx);
    CHECK(cache.entries() == 0);
    CHECK(cache.bytes() == 0);
}

TEST_CASE("onednn: host_view aliases oneDNN backend storage", "[onednn]") {
    onednn_backend::context ctx{};
    auto x = dynamicid::tensor<onednn_backend, float>::zeros(ctx, {2, 3});
    const auto v = dynamicid::host_view(x);
    x.data()[5] = 4.0f;
    CHECK(v(1, 2) == 4.0f);
}
#endif
