// dynamicid test matrix: gemm, matmul, linear and attention.
#pragma once

#include <matrix/common.hpp>

namespace dynamicid::matrix {

namespace detail {

// c = alpha op(a) op(b) + beta c, straight from the gemm_desc definition.
inline void naive_gemm(const gemm_desc& d, const std::vector<double>& a, const std::vector<double>& b, std::vector<double>& c) {
    for (index_t bi = 0; bi < d.batch; ++bi)
        for (index_t i = 0; i < d.m; ++i)
            for (index_t j = 0; j < d.n; ++j) {
                double sum = 0;
                for (index_t l = 0; l < d.k; ++l) {
                    const double av = d.trans_a ? a[static_cast<std::size_t>(bi * d.stride_a + l * d.lda + i)]
                                                : a[static_cast<std::size_t>(bi * d.stride_a + i * d.lda + l)];
                    const double bv = d.trans_b ? b[static_cast<std::size_t>(bi * d.stride_b + j * d.ldb + l)]
                                                : b[static_cast<std::size_t>(bi * d.stride_b + l * d.ldb + j)];
                    sum += av * bv;
                }
                double& out = c[static_cast<std::size_t>(bi * d.stride_c + i * d.ldc + j)];
                out = d.alpha * sum + (d.beta == 0.0 ? 0.0 : d.beta * out);
            }
}

inline shape matmul_operand(std::vector<index_t> batch, index_t rows, index_t cols, bool transposed) {
    batch.push_back(transposed ? cols : rows);
    batch.push_back(transposed ? rows : cols);
    return shape(batch);
}

}  // namespace detail

/// The gemm primitive in f32 against a naive loop: every transpose pair,
/// padded leading dimensions, batch strides (including a shared operand),
/// alpha and beta; padding between rows of C must be left untouched.
template <class B>
void test_gemm_forward() {
    context_t<B> ctx{};
    std::uint64_t seed = 100;
    for (bool ta : {false, true})
        for (bool tb : {false, true})
            for (int variant = 0; variant < 3; ++variant) {
                gemm_desc d{.batch = variant == 0 ? 1 : 3, .m = 3, .n = 5, .k = 4, .trans_a = ta, .trans_b = tb};
                d.lda = (ta ? d.m : d.k) + 2;
                d.ldb = (tb ? d.k : d.n) + 1;
                d.ldc = d.n + 3;
                const index_t a_rows = ta ? d.k : d.m, b_rows = tb ? d.n : d.k;
                d.stride_a = a_rows * d.lda + 1;
                d.stride_b = variant == 2 ? 0 : b_rows * d.ldb + 2;
                d.stride_c = d.m * d.ldc + 1;
                d.alpha = variant == 0 ? 1.0 : 0.75;
                d.beta = variant == 1 ? 0.5 : 0.0;
                const auto size = [&](index_t stride, index_t rows, index_t ld) {
                    return static_cast<std::size_t>((d.batch - 1) * stride + rows * ld);
                };
                const auto a = host_normal(size(d.stride_a, a_rows, d.lda), ++seed);
                const auto b = host_normal(size(d.stride_b, b_rows, d.ldb), ++seed);
                auto c = host_normal(size(d.stride_c, d.m, d.ldc), ++seed);
                const auto da = testing::upload<B, float>(ctx, {static_cast<index_t>(a.size())}, a);
                const auto db = testing::upload<B, float>(ctx, {static_cast<index_t>(b.size())}, b);
                const auto dc = testing::upload<B, float>(ctx, {static_cast<index_t>(c.size())}, c);
                B::gemm(ctx, d, da.data(), db.data(), dc.data());
                detail::naive_gemm(d, a, b, c);
                check_close("gemm trans_a=" + std::to_string(ta) + " trans_b=" + std::to_string(tb) + " variant " +
                                std::to_string(variant),
                            testing::download(ctx, dc), c, 1e-5, 1e-5);
            }
}

/// ops::matmul in f32 against the naive loop, batched and with a shared 2-D b.
template <class B>
void test_matmul_forward() {
    context_t<B> ctx{};
    const index_t m = 3, n = 4, k = 5;
    std::uint64_t seed = 200;
    for (bool shared : {false, true})
        for (bool ta : {false, true})
            for (bool tb : {false, true}) {
                const auto sa = detail::matmul_operand({2}, m, k, ta);
                const auto sb = detail::matmul_operand(shared ? std::vector<index_t>{} : std::vector<index_t>{2}, k, n, tb);
                const auto a = host_normal(static_cast<std::size_t>(sa.numel()), ++seed);
                const auto b = host_normal(static_cast<std::size_t>(sb.numel()), ++seed);
                const auto y = ops::matmul(ctx, testing::upload<B, float>(ctx, sa, a), testing::upload<B, float>(ctx, sb, b), ta, tb, 1.5);
                REQUIRE(y.shape() == shape{2, m, n});
                gemm_desc d{.batch = 2, .m = m, .n = n, .k = k, .trans_a = ta, .trans_b = tb, .lda = ta ? m : k, .ldb = tb ? k : n,
                            .ldc = n, .stride_a = m * k, .stride_b = shared ? 0 : k * n, .stride_c = m * n, .alpha = 1.5};
                std::vector<double> want(static_cast<std::size_t>(2 * m * n));
                detail::naive_gemm(d, a, b, want);
                check_close("matmul shared_b=" + std::to_string(shared) + " trans_a=" + std::to_string(ta) +
                                " trans_b=" + std::to_string(tb),
                            testing::download(ctx, y), want, 1e-5, 1e-5);
            }
}

/// matmul backward: all four transpose pairs, batched (rank 3 and 4), a
/// shared 2-D b (its gradient sums over the batch), plain 2-D, alpha != 1.
template <class B>
void test_matmul_backward() {
    struct config {
        std::vector<index_t> batch_a, batch_b;
        bool ta, tb;
        double alpha;
    };
    std::vector<config> configs;
    for (bool ta : {false, true})
        for (bool tb : {false, true}) {
            configs.push_back({{2}, {2}, ta, tb, 1.0});
            configs.push_back({{2}, {}, ta, tb, -1.5});  // shared b
        }
    configs.push_back({{2, 2}, {2, 2}, false, true, 0.5});
    configs.push_back({{2, 2}, {}, true, false, 1.0});
    configs.push_back({{}, {}, false, false, 2.0});
    std::uint64_t seed = 300;
    for (const auto& c : configs) {
        const index_t m = 3, n = 2, k = 4;
        const auto sa = detail::matmul_operand(c.batch_a, m, k, c.ta), sb = detail::matmul_operand(c.batch_b, k, n, c.tb);
        const bool ta = c.ta, tb = c.tb;
        const double alpha = c.alpha;
        check_gradients<B>(
            "matmul " + sa.str() + (ta ? "^T" : "") + " x " + sb.str() + (tb ? "^T" : "") + " alpha " + std::to_string(alpha),
            {{sa}, {sb}},
            [=](auto& ctx, const auto& in) { return ops::matmul(ctx, in[0], in[1], ta, tb, alpha); },
            [=](auto& ctx, const auto& in, const auto& dy) {
                const auto saved = ops::matmul_forward(ctx, in[0], in[1], ta, tb, alpha).second;
                auto [da, db] = ops::matmul_backward(ctx, saved, dy);
                return grads_of(dy, da, db);
            },
            ++seed);
    }
}

/// linear (torch.nn.Linear) backward with and without bias, 1-D, 2-D and 3-D input.
template <class B>
void test_linear_backward() {
    const shape inputs[] = {{2, 3, 4}, {3, 4}, {4}};
    std::uint64_t seed = 400;
    for (const auto& xs : inputs) {
        check_gradients<B>(
            "linear with bias, x " + xs.str(), {{xs}, {{5, 4}}, {{5}}},
            [](auto& ctx, const auto& in) { return ops::linear(ctx, in[0], in[1], &in[2]); },
            [](auto& ctx, const auto& in, const auto& dy) {
                const auto saved = ops::linear_forward(ctx, in[0], in[1], &in[2]).second;
                auto g = ops::linear_backward(ctx, saved, dy);
                return grads_of(dy, g.input, g.weight, g.bias);
            },
            ++seed);
        check_gradients<B>(
            "linear without bias, x " + xs.str(), {{xs}, {{5, 4}}},
            [](auto& ctx, const auto& in) { return ops::linear(ctx, in[0], in[1]); },
            [](auto& ctx, const auto& in, const auto& dy) {
                const auto saved = ops::linear_forward(ctx, in[0], in[1]).second;
                auto g = ops::linear_backward(ctx, saved, dy);
                REQUIRE_FALSE(g.bias.defined());
                return grads_of(dy, g.input, g.weight);
            },
            ++seed);
    }
}

/// A frozen layer (needs.params = false) or a first layer (needs.input =
/// false) gets undefined tensors for what was not asked, and the same values
/// as the full backward for what was.
template <class B>
void test_linear_needs() {
    using T = float;
    context_t<B> ctx{};
    const auto x = testing::upload<B, T>(ctx, {2, 3, 4}, host_normal(24, 501));
    const auto w = testing::upload<B, T>(ctx, {5, 4}, host_normal(20, 502));
    const auto b = testing::upload<B, T>(ctx, {5}, host_normal(5, 503));
    const auto dy = ops::randn<B, T>(ctx, {2, 3, 5}, 504);
    const auto full = ops::linear_backward(ctx, ops::linear_forward(ctx, x, w, &b).second, dy);
    REQUIRE(full.input.defined());
    REQUIRE(full.weight.defined());
    REQUIRE(full.bias.defined());

    const auto frozen = ops::linear_backward(ctx, ops::linear_forward(ctx, x, w, &b, ops::needs{.params = false}).second, dy);
    CHECK_FALSE(frozen.weight.defined());
    CHECK_FALSE(frozen.bias.defined());
    REQUIRE(frozen.input.defined());
    check_close("linear needs.params=false input gradient", testing::download(ctx, frozen.input), testing::download(ctx, full.input),
                0, 0);

    const auto first = ops::linear_backward(ctx, ops::linear_forward(ctx, x, w, &b, ops::needs{.input = false}).second, dy);
    CHECK_FALSE(first.input.defined());
    REQUIRE(first.weight.defined());
    REQUIRE(first.bias.defined());
    check_close("linear needs.input=false weight gradient", testing::download(ctx, first.weight),
                testing::download(ctx, full.weight), 0, 0);
    check_close("linear needs.input=false bias gradient", testing::download(ctx, first.bias), testing::download(ctx, full.bias), 0,
                0);
}

/// Composed attention softmax(scale q k^T) v: gradients of q, k and v.
template <class B>
void test_attention_backward() {
    std::uint64_t seed = 600;
    for (double scale : {0.0, 0.3}) {
        check_gradients<B>(
            "attention scale " + std::to_string(scale), {{{2, 3, 4}}, {{2, 5, 4}}, {{2, 5, 3}}},
            [=](auto& ctx, const auto& in) { return ops::attention_forward(ctx, in[0], in[1], in[2], scale).first; },
            [=](auto& ctx, const auto& in, const auto& dy) {
                const auto saved = ops::attention_forward(ctx, in[0], in[1], in[2], scale).second;
                auto g = ops::attention_backward(ctx, saved, dy);
                return grads_of(dy, g.q, g.k, g.v);
            },
            ++seed);
    }
}

/// ops::attention (fused when the backend has it) against a naive loop in f32.
template <class B>
void test_attention_forward() {
    context_t<B> ctx{};
    const index_t batch = 2, lq = 3, lk = 5, d = 4, dv = 3;
    const auto q = host_normal(static_cast<std::size_t>(batch * lq * d), 611);
    const auto k = host_normal(static_cast<std::size_t>(batch * lk * d), 612);
    const auto v = host_normal(static_cast<std::size_t>(batch * lk * dv), 613);
    const auto y = ops::attention(ctx, testing::upload<B, float>(ctx, {batch, lq, d}, q), testing::upload<B, float>(ctx, {batch, lk, d}, k),
                                  testing::upload<B, float>(ctx, {batch, lk, dv}, v));
    std::vector<double> want(static_cast<std::size_t>(batch * lq * dv));
    for (index_t b = 0; b < batch; ++b)
        for (index_t i = 0; i < lq; ++i) {
            std::vector<double> s(static_cast<std::size_t>(lk));
            double peak = -1e300, total = 0;
            for (index_t j = 0; j < lk; ++j) {
                double dot = 0;
                for (index_t l = 0; l < d; ++l)
                    dot += q[static_cast<std::size_t>((b * lq + i) * d + l)] * k[static_cast<std::size_t>((b * lk + j) * d + l)];
                s[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(d));
                peak = std::max(peak, s[static_cast<std::size_t>(j)]);
            }
            for (auto& e : s) total += (e = std::exp(e - peak));
            for (index_t c = 0; c < dv; ++c) {
                double acc = 0;
                for (index_t j = 0; j < lk; ++j) acc += s[static_cast<std::size_t>(j)] / total * v[static_cast<std::size_t>((b * lk + j) * dv + c)];
                want[static_cast<std::size_t>((b * lq + i) * dv + c)] = acc;
            }
        }
    check_close("attention forward", testing::download(ctx, y), want, 1e-5, 1e-4);
}

}  // namespace dynamicid::matrix
