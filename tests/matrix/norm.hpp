// dynamicid test matrix: group and layer normalisation.
#pragma once

#include <matrix/common.hpp>

namespace dynamicid::matrix {

namespace detail {

// Normalises `segments` runs of `len` values; feature(s, i) picks gamma/beta.
template <class Feature>
std::vector<double> naive_normalise(const std::vector<double>& x, index_t segments, index_t len, double eps,
                                    const std::vector<double>& gamma, const std::vector<double>& beta, Feature feature) {
    std::vector<double> y(x.size());
    for (index_t s = 0; s < segments; ++s) {
        double mean = 0, var = 0;
        for (index_t i = 0; i < len; ++i) mean += x[static_cast<std::size_t>(s * len + i)];
        mean /= static_cast<double>(len);
        for (index_t i = 0; i < len; ++i) {
            const double c = x[static_cast<std::size_t>(s * len + i)] - mean;
            var += c * c;
        }
        var /= static_cast<double>(len);
        for (index_t i = 0; i < len; ++i) {
            const auto f = static_cast<std::size_t>(feature(s, i));
            const double g = gamma.empty() ? 1.0 : gamma[f], b = beta.empty() ? 0.0 : beta[f];
            y[static_cast<std::size_t>(s * len + i)] = (x[static_cast<std::size_t>(s * len + i)] - mean) / std::sqrt(var + eps) * g + b;
        }
    }
    return y;
}

}  // namespace detail

/// group_norm forward against the definition, with and without affine.
template <class B>
void test_group_norm_forward() {
    context_t<B> ctx{};
    const index_t n = 2, c = 6, spatial = 12, groups = 3, cg = c / groups;
    const shape s{n, c, 3, 4};
    const auto x = host_normal(static_cast<std::size_t>(s.numel()), 1001);
    const auto gamma = host_normal(static_cast<std::size_t>(c), 1002), beta = host_normal(static_cast<std::size_t>(c), 1003);
    const auto dx = testing::upload<B, float>(ctx, s, x);
    const auto dg = testing::upload<B, float>(ctx, {c}, gamma), db = testing::upload<B, float>(ctx, {c}, beta);
    const auto feature = [&](index_t seg, index_t i) { return (seg % groups) * cg + i / spatial; };
    check_close("group_norm forward with affine", testing::download(ctx, ops::group_norm(ctx, dx, groups, &dg, &db)),
                detail::naive_normalise(x, n * groups, cg * spatial, 1e-5, gamma, beta, feature), 1e-5, 1e-4);
    check_close("group_norm forward without affine", testing::download(ctx, ops::group_norm<B, float>(ctx, dx, groups, nullptr, nullptr)),
                detail::naive_normalise(x, n * groups, cg * spatial, 1e-5, {}, {}, feature), 1e-5, 1e-4);

    // Few long segments (a large feature map): backends may split each over
    // several workers. An offset of 3 tests that the variance survives it.
    const index_t long_groups = 4, long_c = 8, long_cg = long_c / long_groups, long_spatial = 64 * 128;
    const shape ls{n, long_c, 64, 128};
    auto lx = host_normal(static_cast<std::size_t>(ls.numel()), 1004);
    for (auto& v : lx) v = 3.0 + 0.5 * v;
    const auto lgamma = host_normal(static_cast<std::size_t>(long_c), 1005), lbeta = host_normal(static_cast<std::size_t>(long_c), 1006);
    const auto ldx = testing::upload<B, float>(ctx, ls, lx);
    const auto ldg = testing::upload<B, float>(ctx, {long_c}, lgamma), ldb = testing::upload<B, float>(ctx, {long_c}, lbeta);
    const auto long_feature = [&](index_t seg, index_t i) { return (seg % long_groups) * long_cg + i / long_spatial; };
    const auto [ly, saved] = ops::group_norm_forward(ctx, ldx, long_groups, &ldg, &ldb);
    check_close("group_norm forward, long segments", testing::download(ctx, ly),
                detail::naive_normalise(lx, n * long_groups, long_cg * long_spatial, 1e-5, lgamma, lbeta, long_feature), 1e-4, 1e-3);
    const auto means = testing::download(ctx, saved.mean);
    for (index_t seg = 0; seg < n * long_groups; ++seg) {
        double mean = 0;
        for (index_t i = 0; i < long_cg * long_spatial; ++i) mean += lx[static_cast<std::size_t>(seg * long_cg * long_spatial + i)];
        mean /= static_cast<double>(long_cg * long_spatial);
        CHECK(std::abs(means[static_cast<std::size_t>(seg)] - mean) < 1e-5);
    }
}

/// group_norm backward with affine (input, gamma, beta) and without (input).
template <class B>
void test_group_norm_backward() {
    const shape shapes[] = {{2, 6, 3, 2}, {2, 4, 5}, {3, 4}};  // spatial 6, 5 and 1
    std::uint64_t seed = 1100;
    for (const auto& s : shapes) {
        const index_t groups = s[1] / 2;
        check_gradients<B>(
            "group_norm with affine " + s.str(), {{s}, {{s[1]}}, {{s[1]}}},
            [=](auto& ctx, const auto& in) { return ops::group_norm(ctx, in[0], groups, &in[1], &in[2]); },
            [=](auto& ctx, const auto& in, const auto& dy) {
                const auto saved = ops::group_norm_forward(ctx, in[0], groups, &in[1], &in[2]).second;
                auto g = ops::group_norm_backward(ctx, saved, dy);
                return grads_of(dy, g.input, g.gamma, g.beta);
            },
            ++seed);
        check_gradients<B>(
            "group_norm without affine " + s.str(), {{s}},
            [=](auto& ctx, const auto& in) { return ops::group_norm(ctx, in[0], groups, nullptr, nullptr); },
            [=](auto& ctx, const auto& in, const auto& dy) {
                const auto saved = ops::group_norm_forward(ctx, in[0], groups, nullptr, nullptr).second;
                return grads_of(dy, ops::group_norm_backward(ctx, saved, dy, ops::needs{.params = false}).input);
            },
            ++seed);
    }
}

/// layer_norm forward against the definition.
template <class B>
void test_layer_norm_forward() {
    context_t<B> ctx{};
    const index_t rows = 6, cols = 5;
    const auto x = host_normal(static_cast<std::size_t>(rows * cols), 1201);
    const auto gamma = host_normal(static_cast<std::size_t>(cols), 1202), beta = host_normal(static_cast<std::size_t>(cols), 1203);
    const auto dx = testing::upload<B, float>(ctx, {2, 3, cols}, x);
    const auto dg = testing::upload<B, float>(ctx, {cols}, gamma), db = testing::upload<B, float>(ctx, {cols}, beta);
    const auto feature = [](index_t, index_t i) { return i; };
    check_close("layer_norm forward with affine", testing::download(ctx, ops::layer_norm(ctx, dx, &dg, &db)),
                detail::naive_normalise(x, rows, cols, 1e-5, gamma, beta, feature), 1e-5, 1e-4);
    check_close("layer_norm forward without affine", testing::download(ctx, ops::layer_norm<B, float>(ctx, dx, nullptr, nullptr)),
                detail::naive_normalise(x, rows, cols, 1e-5, {}, {}, feature), 1e-5, 1e-4);
}

/// layer_norm backward over the last axis, with and without affine.
template <class B>
void test_layer_norm_backward() {
    check_gradients<B>(
        "layer_norm with affine", {{{3, 2, 5}}, {{5}}, {{5}}},
        [](auto& ctx, const auto& in) { return ops::layer_norm(ctx, in[0], &in[1], &in[2]); },
        [](auto& ctx, const auto& in, const auto& dy) {
            const auto saved = ops::layer_norm_forward(ctx, in[0], &in[1], &in[2]).second;
            auto g = ops::layer_norm_backward(ctx, saved, dy);
            return grads_of(dy, g.input, g.gamma, g.beta);
        },
        1301);
    check_gradients<B>(
        "layer_norm without affine", {{{4, 6}}},
        [](auto& ctx, const auto& in) { return ops::layer_norm(ctx, in[0], nullptr, nullptr); },
        [](auto& ctx, const auto& in, const auto& dy) {
            const auto saved = ops::layer_norm_forward(ctx, in[0], nullptr, nullptr).second;
            return grads_of(dy, ops::layer_norm_backward(ctx, saved, dy, ops::needs{.params = false}).input);
        },
        1302);
}

}  // namespace dynamicid::matrix
