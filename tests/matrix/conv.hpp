// dynamicid test matrix: conv2d and nearest upsampling.
#pragma once

#include <matrix/common.hpp>

namespace dynamicid::matrix {

namespace detail {

struct conv_case {
    const char* name;
    index_t n, c_in, c_out, h, w, kh, kw;
    ops::conv2d_options options;
    bool bias;

    shape input() const { return {n, c_in, h, w}; }
    shape weight() const { return {c_out, c_in / options.groups, kh, kw}; }
};

// Small enough for finite differences, yet every path of the CPU kernel: im2col
// with padding, strides and dilation, groups, depthwise, and the direct 1x1 path.
inline std::vector<conv_case> conv_cases() {
    return {
        {"3x3 pad 1 with bias", 2, 3, 4, 5, 4, 3, 3, {.padding = 1}, true},
        {"stride 2 pad 1", 1, 2, 3, 7, 6, 3, 3, {.stride = 2, .padding = 1}, false},
        {"dilation 2 pad 2", 1, 2, 2, 6, 7, 3, 3, {.padding = 2, .dilation = 2}, true},
        {"groups 2", 2, 4, 6, 4, 5, 3, 3, {.padding = 1, .groups = 2}, true},
        {"depthwise", 1, 4, 4, 5, 4, 3, 3, {.padding = 1, .groups = 4}, false},
        {"depthwise multiplier 2", 1, 3, 6, 4, 4, 3, 3, {.stride = 2, .padding = 1, .groups = 3}, true},
        {"1x1 with bias", 2, 3, 5, 3, 4, 1, 1, {}, true},
        {"1x1 without bias", 1, 4, 2, 4, 3, 1, 1, {}, false},
        {"1x1 groups 2", 1, 4, 6, 3, 3, 1, 1, {.groups = 2}, true},
        {"1x1 stride 2", 1, 3, 2, 5, 4, 1, 1, {.stride = 2}, true},
        {"2x3 kernel, non-square input", 1, 2, 3, 5, 8, 2, 3, {.stride = 2, .padding = 1}, true},
    };
}

// Cross-correlation straight from the definition, in double.
inline std::vector<double> naive_conv2d(const conv_case& c, const std::vector<double>& x, const std::vector<double>& w,
                                        const std::vector<double>& bias) {
    const auto& o = c.options;
    const index_t oh = (c.h + 2 * o.padding - o.dilation * (c.kh - 1) - 1) / o.stride + 1;
    const index_t ow = (c.w + 2 * o.padding - o.dilation * (c.kw - 1) - 1) / o.stride + 1;
    const index_t cg = c.c_in / o.groups, og = c.c_out / o.groups;
    std::vector<double> y(static_cast<std::size_t>(c.n * c.c_out * oh * ow));
    for (index_t n = 0; n < c.n; ++n)
        for (index_t oc = 0; oc < c.c_out; ++oc)
            for (index_t oy = 0; oy < oh; ++oy)
                for (index_t ox = 0; ox < ow; ++ox) {
                    double sum = bias.empty() ? 0.0 : bias[static_cast<std::size_t>(oc)];
                    const index_t g = oc / og;
                    for (index_t ic = 0; ic < cg; ++ic)
                        for (index_t ky = 0; ky < c.kh; ++ky)
                            for (index_t kx = 0; kx < c.kw; ++kx) {
                                const index_t iy = oy * o.stride - o.padding + ky * o.dilation;
                                const index_t ix = ox * o.stride - o.padding + kx * o.dilation;
                                if (iy < 0 || iy >= c.h || ix < 0 || ix >= c.w) continue;
                                sum += x[static_cast<std::size_t>(((n * c.c_in + g * cg + ic) * c.h + iy) * c.w + ix)] *
                                       w[static_cast<std::size_t>(((oc * cg + ic) * c.kh + ky) * c.kw + kx)];
                            }
                    y[static_cast<std::size_t>(((n * c.c_out + oc) * oh + oy) * ow + ox)] = sum;
                }
    return y;
}

}  // namespace detail

/// conv2d in f32 against the naive definition for every case.
template <class B>
void test_conv2d_forward() {
    context_t<B> ctx{};
    std::uint64_t seed = 700;
    for (const auto& c : detail::conv_cases()) {
        const auto x = host_normal(static_cast<std::size_t>(c.input().numel()), ++seed);
        const auto w = host_normal(static_cast<std::size_t>(c.weight().numel()), ++seed);
        const auto b = c.bias ? host_normal(static_cast<std::size_t>(c.c_out), ++seed) : std::vector<double>{};
        const auto bias = c.bias ? testing::upload<B, float>(ctx, {c.c_out}, b) : tensor<B, float>{};
        const auto y = ops::conv2d(ctx, testing::upload<B, float>(ctx, c.input(), x), testing::upload<B, float>(ctx, c.weight(), w),
                                   c.bias ? &bias : nullptr, c.options);
        check_close(std::string("conv2d forward ") + c.name, testing::download(ctx, y), detail::naive_conv2d(c, x, w, b), 1e-5,
                    1e-5);
    }
}

/// conv2d backward: input, weight and bias gradients for every case.
template <class B>
void test_conv2d_backward() {
    std::uint64_t seed = 800;
    for (const auto& c : detail::conv_cases()) {
        const auto options = c.options;
        std::vector<operand> operands{{c.input()}, {c.weight()}};
        if (c.bias) operands.push_back({{c.c_out}});
        const bool has_bias = c.bias;
        check_gradients<B>(
            std::string("conv2d ") + c.name, operands,
            [=](auto& ctx, const auto& in) { return ops::conv2d(ctx, in[0], in[1], has_bias ? &in[2] : nullptr, options); },
            [=](auto& ctx, const auto& in, const auto& dy) {
                const auto saved = ops::conv2d_forward(ctx, in[0], in[1], has_bias ? &in[2] : nullptr, options).second;
                auto g = ops::conv2d_backward(ctx, saved, dy);
                CHECK(g.bias.defined() == has_bias);
                return has_bias ? grads_of(dy, g.input, g.weight, g.bias) : grads_of(dy, g.input, g.weight);
            },
            ++seed);
    }
}

/// conv2d with needs: only what was asked for is computed, with the full values.
template <class B>
void test_conv2d_needs() {
    context_t<B> ctx{};
    const auto x = testing::upload<B, float>(ctx, {1, 2, 5, 5}, host_normal(50, 901));
    const auto w = testing::upload<B, float>(ctx, {4, 2, 3, 3}, host_normal(72, 902));
    const auto b = testing::upload<B, float>(ctx, {4}, host_normal(4, 903));
    const ops::conv2d_options o{.padding = 1};
    const auto dy = ops::randn<B, float>(ctx, {1, 4, 5, 5}, 904);
    const auto full = ops::conv2d_backward(ctx, ops::conv2d_forward(ctx, x, w, &b, o).second, dy);
    const auto frozen = ops::conv2d_backward(ctx, ops::conv2d_forward(ctx, x, w, &b, o, ops::needs{.params = false}).second, dy);
    CHECK_FALSE(frozen.weight.defined());
    CHECK_FALSE(frozen.bias.defined());
    REQUIRE(frozen.input.defined());
    check_close("conv2d needs.params=false input gradient", testing::download(ctx, frozen.input),
                testing::download(ctx, full.input), 0, 0);
    const auto first = ops::conv2d_backward(ctx, ops::conv2d_forward(ctx, x, w, &b, o, ops::needs{.input = false}).second, dy);
    CHECK_FALSE(first.input.defined());
    REQUIRE(first.weight.defined());
    REQUIRE(first.bias.defined());
    check_close("conv2d needs.input=false weight gradient", testing::download(ctx, first.weight),
                testing::download(ctx, full.weight), 0, 0);
    check_close("conv2d needs.input=false bias gradient", testing::download(ctx, first.bias), testing::download(ctx, full.bias), 0,
                0);
}

/// A convolution whose column matrix exceeds the CPU backend's tile budget
/// (processed in several row tiles): forward, input and weight gradients
/// against host loops.
template <class B>
void test_conv2d_tiled() {
    context_t<B> ctx{};
    const detail::conv_case c{"tiled", 1, 64, 3, 128, 128, 3, 3, {.padding = 1}, true};
    const auto x = host_normal(static_cast<std::size_t>(c.input().numel()), 991);
    const auto w = host_normal(static_cast<std::size_t>(c.weight().numel()), 992);
    const auto b = host_normal(3, 993);
    const auto bias = testing::upload<B, float>(ctx, {3}, b);
    auto [y, saved] = ops::conv2d_forward(ctx, testing::upload<B, float>(ctx, c.input(), x), testing::upload<B, float>(ctx, c.weight(), w),
                                          &bias, c.options);
    check_close("tiled conv2d forward", testing::download(ctx, y), detail::naive_conv2d(c, x, w, b), 1e-4, 1e-4);

    const auto gy = host_normal(static_cast<std::size_t>(y.numel()), 994);
    const auto g = ops::conv2d_backward(ctx, saved, testing::upload<B, float>(ctx, y.shape(), gy));
    std::vector<double> want_dx(x.size(), 0.0), want_dw(w.size(), 0.0), want_db(3, 0.0);
    const index_t h = c.h, wd = c.w;
    for (index_t oc = 0; oc < 3; ++oc)
        for (index_t oy = 0; oy < h; ++oy)
            for (index_t ox = 0; ox < wd; ++ox) {
                const double up = gy[static_cast<std::size_t>((oc * h + oy) * wd + ox)];
                want_db[static_cast<std::size_t>(oc)] += up;
                for (index_t ic = 0; ic < c.c_in; ++ic)
                    for (index_t ky = 0; ky < 3; ++ky)
                        for (index_t kx = 0; kx < 3; ++kx) {
                            const index_t iy = oy - 1 + ky, ix = ox - 1 + kx;
                            if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
                            const auto xi = static_cast<std::size_t>((ic * h + iy) * wd + ix);
                            const auto wi = static_cast<std::size_t>(((oc * c.c_in + ic) * 3 + ky) * 3 + kx);
                            want_dx[xi] += w[wi] * up;
                            want_dw[wi] += x[xi] * up;
                        }
            }
    check_close("tiled conv2d input gradient", testing::download(ctx, g.input), want_dx, 1e-4, 1e-4);
    check_close("tiled conv2d weight gradient", testing::download(ctx, g.weight), want_dw, 1e-3, 1e-4);
    check_close("tiled conv2d bias gradient", testing::download(ctx, g.bias), want_db, 1e-3, 1e-4);
}

/// Nearest upsampling by 2 and 3: forward against the definition, backward by gradcheck.
template <class B>
void test_upsample_nearest() {
    context_t<B> ctx{};
    std::uint64_t seed = 950;
    for (index_t factor : {2, 3}) {
        const shape s{2, 2, 3, 2};
        const auto x = host_normal(static_cast<std::size_t>(s.numel()), ++seed);
        const auto y = ops::upsample_nearest(ctx, testing::upload<B, float>(ctx, s, x), factor);
        REQUIRE(y.shape() == shape{2, 2, 3 * factor, 2 * factor});
        std::vector<double> want(static_cast<std::size_t>(y.numel()));
        for (index_t i = 0; i < y.numel(); ++i) {
            const auto idx = unravel(i, y.shape());
            want[static_cast<std::size_t>(i)] = x[static_cast<std::size_t>(((idx[0] * 2 + idx[1]) * 3 + idx[2] / factor) * 2 + idx[3] / factor)];
        }
        check_close("upsample_nearest forward factor " + std::to_string(factor), testing::download(ctx, y), want, 0, 0);
        check_gradients<B>(
            "upsample_nearest factor " + std::to_string(factor), {{s}},
            [=](auto& c, const auto& in) { return ops::upsample_nearest(c, in[0], factor); },
            [=](auto& c, const auto& in, const auto& dy) {
                const auto saved = ops::upsample_nearest_forward(c, in[0], factor).second;
                return grads_of(dy, ops::upsample_nearest_backward(c, saved, dy));
            },
            ++seed);
    }
}

}  // namespace dynamicid::matrix
