// dynamicid test matrix: sizes large enough for a backend to split its work.
//
// The gradient checks use tiny tensors, which a threaded backend runs on one
// thread. These bodies use sizes above the CPU backend's splitting thresholds
// (with an odd thread count where the context has one, so chunks start in the
// middle of rows and broadcast runs) and compare with host loops.
#pragma once

#include <matrix/common.hpp>
#include <matrix/linear_algebra.hpp>

namespace dynamicid::matrix {

namespace detail {

template <class B>
context_t<B> split_context() {
    context_t<B> ctx{};
    if constexpr (requires { ctx.threads = 3; }) ctx.threads = 3;
    return ctx;
}

}  // namespace detail

/// Pointwise, broadcast, softmax, reduce, permute and random ops at split sizes.
template <class B>
void test_large_pointwise() {
    auto ctx = detail::split_context<B>();
    const shape big{4, 97, 80};
    const auto n = static_cast<std::size_t>(big.numel());
    const auto a = host_normal(n, 3001), b = host_normal(n, 3002), g = host_normal(n, 3003);
    const auto da = testing::upload<B, float>(ctx, big, a), db = testing::upload<B, float>(ctx, big, b);
    const auto dg = testing::upload<B, float>(ctx, big, g);

    {  // same-shape binary op, forward and backward
        auto [y, saved] = ops::binary_forward(ctx, binary_op::mul, da, db);
        auto [ga, gb] = ops::binary_backward(ctx, saved, dg);
        std::vector<double> want_y(n), want_ga(n), want_gb(n);
        for (std::size_t i = 0; i < n; ++i) {
            want_y[i] = a[i] * b[i];
            want_ga[i] = g[i] * b[i];
            want_gb[i] = g[i] * a[i];
        }
        check_close("large mul forward", testing::download(ctx, y), want_y, 1e-6, 1e-6);
        check_close("large mul gradient a", testing::download(ctx, ga), want_ga, 1e-6, 1e-6);
        check_close("large mul gradient b", testing::download(ctx, gb), want_gb, 1e-6, 1e-6);
    }
    {  // both operands broadcast: (4, 1, 80) with (97, 1) -> (4, 97, 80)
        const shape sa{4, 1, 80}, sb{97, 1};
        const auto xa = host_normal(320, 3011), xb = host_normal(97, 3012);
        auto [y, saved] = ops::binary_forward(ctx, binary_op::sub, testing::upload<B, float>(ctx, sa, xa), testing::upload<B, float>(ctx, sb, xb));
        REQUIRE(y.shape() == big);
        auto [ga, gb] = ops::binary_backward(ctx, saved, dg);
        std::vector<double> want_y(n), want_ga(320, 0.0), want_gb(97, 0.0);
        for (index_t i = 0; i < big.numel(); ++i) {
            const auto idx = unravel(i, big);
            const auto ia = broadcast_index(idx, sa), ib = broadcast_index(idx, sb);
            want_y[static_cast<std::size_t>(i)] = xa[ia] - xb[ib];
            want_ga[ia] += g[static_cast<std::size_t>(i)];
            want_gb[ib] -= g[static_cast<std::size_t>(i)];
        }
        check_close("large broadcast sub forward", testing::download(ctx, y), want_y, 1e-6, 1e-6);
        check_close("large broadcast sub gradient a", testing::download(ctx, ga), want_ga, 1e-4, 1e-5);
        check_close("large broadcast sub gradient b", testing::download(ctx, gb), want_gb, 1e-4, 1e-5);
    }
    {  // SiLU
        auto [y, saved] = ops::unary_forward(ctx, unary_op::silu, da);
        const auto dx = ops::unary_backward(ctx, saved, dg);
        std::vector<double> want_y(n), want_dx(n);
        for (std::size_t i = 0; i < n; ++i) {
            const double s = 1 / (1 + std::exp(-a[i]));
            want_y[i] = a[i] * s;
            want_dx[i] = g[i] * s * (1 + a[i] * (1 - s));
        }
        check_close("large silu forward", testing::download(ctx, y), want_y, 1e-6, 1e-5);
        check_close("large silu backward", testing::download(ctx, dx), want_dx, 1e-6, 1e-5);
    }
    {  // softmax over rows of 80
        auto [y, saved] = ops::softmax_forward(ctx, da);
        const auto dx = ops::softmax_backward(ctx, saved, dg);
        std::vector<double> want_y(n), want_dx(n);
        for (std::size_t r = 0; r < n / 80; ++r) {
            double peak = -1e300, total = 0, dot = 0;
            for (std::size_t i = 0; i < 80; ++i) peak = std::max(peak, a[r * 80 + i]);
            for (std::size_t i = 0; i < 80; ++i) total += std::exp(a[r * 80 + i] - peak);
            for (std::size_t i = 0; i < 80; ++i) {
                want_y[r * 80 + i] = std::exp(a[r * 80 + i] - peak) / total;
                dot += want_y[r * 80 + i] * g[r * 80 + i];
            }
            for (std::size_t i = 0; i < 80; ++i) want_dx[r * 80 + i] = want_y[r * 80 + i] * (g[r * 80 + i] - dot);
        }
        check_close("large softmax forward", testing::download(ctx, y), want_y, 1e-6, 1e-5);
        check_close("large softmax backward", testing::download(ctx, dx), want_dx, 1e-6, 1e-4);
    }
    {  // sum over the middle axis, and its backward (a broadcast)
        auto [y, saved] = ops::reduce_forward(ctx, da, {1}, false);
        REQUIRE(y.shape() == shape{4, 1, 80});
        const auto gy = host_normal(320, 3021);
        const auto dx = ops::reduce_backward(ctx, saved, testing::upload<B, float>(ctx, {4, 1, 80}, gy));
        std::vector<double> want_y(320, 0.0), want_dx(n);
        for (index_t i = 0; i < big.numel(); ++i) {
            const auto o = broadcast_index(unravel(i, big), shape{4, 1, 80});
            want_y[o] += a[static_cast<std::size_t>(i)];
            want_dx[static_cast<std::size_t>(i)] = gy[o];
        }
        check_close("large sum forward", testing::download(ctx, y), want_y, 1e-4, 1e-5);
        check_close("large sum backward", testing::download(ctx, dx), want_dx, 0, 0);
    }
    {  // permute
        const auto y = ops::permute(ctx, da, {2, 0, 1});
        std::vector<double> want(n);
        for (index_t i = 0; i < y.numel(); ++i) {
            const auto idx = unravel(i, y.shape());
            want[static_cast<std::size_t>(i)] = a[broadcast_index({idx[1], idx[2], idx[0]}, big)];
        }
        check_close("large permute", testing::download(ctx, y), want, 0, 0);
    }
    {  // random streams, split across threads
        const auto r = ops::randn<B, float>(ctx, {3, 10007}, 77, 11).to_host(ctx);
        std::size_t mismatches = 0;
        for (std::size_t i = 0; i < r.size(); ++i) mismatches += r[i] != static_cast<float>(philox::normal(77, 11 + i));
        CHECK(mismatches == 0);
    }
}

/// gemm at sizes where a threaded backend splits rows (one matrix) or the
/// batch (several), with every transpose pair.
template <class B>
void test_large_gemm() {
    auto ctx = detail::split_context<B>();
    std::uint64_t seed = 3100;
    for (index_t batch : {1, 3})
        for (bool ta : {false, true})
            for (bool tb : {false, true}) {
                gemm_desc d{.batch = batch, .m = 70, .n = 41, .k = 33, .trans_a = ta, .trans_b = tb, .alpha = 1.25, .beta = 0.5};
                d.lda = ta ? d.m : d.k;
                d.ldb = tb ? d.k : d.n;
                d.ldc = d.n;
                d.stride_a = d.m * d.k;
                d.stride_b = d.k * d.n;
                d.stride_c = d.m * d.n;
                const auto a = host_normal(static_cast<std::size_t>(batch * d.stride_a), ++seed);
                const auto b = host_normal(static_cast<std::size_t>(batch * d.stride_b), ++seed);
                auto c = host_normal(static_cast<std::size_t>(batch * d.stride_c), ++seed);
                const auto ta_ = testing::upload<B, float>(ctx, {static_cast<index_t>(a.size())}, a);
                const auto tb_ = testing::upload<B, float>(ctx, {static_cast<index_t>(b.size())}, b);
                const auto tc = testing::upload<B, float>(ctx, {static_cast<index_t>(c.size())}, c);
                B::gemm(ctx, d, ta_.data(), tb_.data(), tc.data());
                detail::naive_gemm(d, a, b, c);
                check_close("large gemm batch " + std::to_string(batch) + " trans_a=" + std::to_string(ta) +
                                " trans_b=" + std::to_string(tb),
                            testing::download(ctx, tc), c, 1e-4, 1e-5);
            }
}

}  // namespace dynamicid::matrix
