// dynamicid test matrix: softmax, unary activations, GEGLU, broadcasting binary ops, reductions.
#pragma once

#include <matrix/common.hpp>

#include <limits>
#include <utility>

namespace dynamicid::matrix {

namespace detail {

inline double naive_unary(unary_op op, double x) {
    const double pi = 3.14159265358979323846;
    switch (op) {
        case unary_op::relu: return x > 0 ? x : 0;
        case unary_op::silu: return x / (1 + std::exp(-x));
        case unary_op::gelu_erf: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
        case unary_op::gelu_tanh: return 0.5 * x * (1 + std::tanh(std::sqrt(2 / pi) * (x + 0.044715 * x * x * x)));
        case unary_op::quick_gelu: return x / (1 + std::exp(-1.702 * x));
        case unary_op::sigmoid: return 1 / (1 + std::exp(-x));
        case unary_op::tanh: return std::tanh(x);
        case unary_op::exp: return std::exp(x);
        case unary_op::square: return x * x;
        case unary_op::sqrt: return std::sqrt(x);
    }
    return 0;
}

inline const char* unary_name(unary_op op) {
    switch (op) {
        case unary_op::relu: return "relu";
        case unary_op::silu: return "silu";
        case unary_op::gelu_erf: return "gelu_erf";
        case unary_op::gelu_tanh: return "gelu_tanh";
        case unary_op::quick_gelu: return "quick_gelu";
        case unary_op::sigmoid: return "sigmoid";
        case unary_op::tanh: return "tanh";
        case unary_op::exp: return "exp";
        case unary_op::square: return "square";
        case unary_op::sqrt: return "sqrt";
    }
    return "?";
}

inline const char* binary_name(binary_op op) {
    switch (op) {
        case binary_op::add: return "add";
        case binary_op::sub: return "sub";
        case binary_op::mul: return "mul";
        case binary_op::div: return "div";
        case binary_op::maximum: return "maximum";
        case binary_op::minimum: return "minimum";
    }
    return "?";
}

inline double naive_binary(binary_op op, double a, double b) {
    switch (op) {
        case binary_op::add: return a + b;
        case binary_op::sub: return a - b;
        case binary_op::mul: return a * b;
        case binary_op::div: return a / b;
        case binary_op::maximum: return std::max(a, b);
        case binary_op::minimum: return std::min(a, b);
    }
    return 0;
}

// Operand pairs: equal shapes, one side broadcasting in several ways, a
// scalar-like (1,), and both sides broadcasting at once.
inline std::vector<std::pair<shape, shape>> broadcast_cases() {
    return {{{2, 3}, {2, 3}}, {{2, 3, 4}, {3, 1}}, {{2, 3, 4}, {1, 4}}, {{2, 3, 4}, {1}},
            {{2, 1, 4}, {3, 1}}, {{1}, {2, 3}},    {{3, 1}, {2, 3, 4}}};
}

// Inputs for `op` that keep the finite differences valid: no division near
// zero, and operands of maximum/minimum at least 0.25 apart (on a half-integer
// grid, the second shifted by a quarter), far beyond even the f32 step.
inline std::function<double(double)> binary_map(binary_op op, bool second) {
    if (op == binary_op::div && second) return testing::positive(0.5);
    if (op == binary_op::maximum || op == binary_op::minimum) {
        const double shift = second ? 0.25 : 0.0;
        return [shift](double x) { return std::round(2 * x) / 2 + shift; };
    }
    return {};
}

// Keeps each unary op's inputs off its kink (relu) and inside its domain (sqrt).
inline std::function<double(double)> unary_map(unary_op op) {
    if (op == unary_op::relu) return testing::away_from_zero(0.05);
    if (op == unary_op::sqrt) return testing::positive(0.5);
    return {};
}

template <class B>
void check_unary(unary_op op, std::uint64_t seed) {
    const std::string name = unary_name(op);
    context_t<B> ctx{};
    const operand arg{{3, 5}, unary_map(op)};
    auto x = testing::round_to<float>(testing::sample(arg, seed));
    std::vector<double> want(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) want[i] = naive_unary(op, x[i]);
    check_close(name + " forward", testing::download(ctx, ops::unary(ctx, op, testing::upload<B, float>(ctx, arg.dims, x))), want,
                1e-6, 1e-5);
    check_gradients<B>(
        name, {arg}, [=](auto& c, const auto& in) { return ops::unary(c, op, in[0]); },
        [=](auto& c, const auto& in, const auto& dy) {
            const auto saved = ops::unary_forward(c, op, in[0]).second;
            return grads_of(dy, ops::unary_backward(c, saved, dy));
        },
        seed);
}

}  // namespace detail

/// Softmax over the last axis against the definition, including rows with
/// -inf entries (masked: probability 0) and a fully masked row (all zeros).
template <class B>
void test_softmax_forward() {
    context_t<B> ctx{};
    const double inf = std::numeric_limits<double>::infinity();
    const index_t cols = 5;
    std::vector<double> x = host_normal(4 * cols, 1401);
    for (std::size_t i : {0u, 3u}) x[cols + i] = -inf;  // row 1: partly masked
    for (std::size_t i = 0; i < cols; ++i) x[2 * cols + i] = -inf;  // row 2: fully masked
    x[3 * cols + 1] = 30.0;  // row 3: large values must not overflow
    x[3 * cols + 2] = 29.0;
    std::vector<double> want(x.size(), 0.0);
    for (index_t r = 0; r < 4; ++r) {
        double peak = -inf, total = 0;
        for (index_t i = 0; i < cols; ++i) peak = std::max(peak, x[static_cast<std::size_t>(r * cols + i)]);
        if (peak == -inf) continue;
        for (index_t i = 0; i < cols; ++i) total += std::exp(x[static_cast<std::size_t>(r * cols + i)] - peak);
        for (index_t i = 0; i < cols; ++i)
            want[static_cast<std::size_t>(r * cols + i)] = std::exp(x[static_cast<std::size_t>(r * cols + i)] - peak) / total;
    }
    const auto got = testing::download(ctx, ops::softmax(ctx, testing::upload<B, float>(ctx, {2, 2, cols}, x)));
    check_close("softmax forward", got, want, 1e-6, 1e-5);
    CHECK(got[cols] == 0.0);
    CHECK(got[cols + 3] == 0.0);
}

/// Softmax backward over rows of several lengths.
template <class B>
void test_softmax_backward() {
    const shape shapes[] = {{4, 7}, {2, 3, 5}, {3, 1}};
    std::uint64_t seed = 1500;
    for (const auto& s : shapes)
        check_gradients<B>(
            "softmax " + s.str(), {{s}}, [](auto& ctx, const auto& in) { return ops::softmax(ctx, in[0]); },
            [](auto& ctx, const auto& in, const auto& dy) {
                const auto saved = ops::softmax_forward(ctx, in[0]).second;
                return grads_of(dy, ops::softmax_backward(ctx, saved, dy));
            },
            ++seed);
}

/// Every unary op: forward against its formula, backward by gradcheck.
template <class B>
void test_unary_ops() {
    std::uint64_t seed = 1600;
    for (unary_op op : {unary_op::relu, unary_op::silu, unary_op::gelu_erf, unary_op::gelu_tanh, unary_op::quick_gelu,
                        unary_op::sigmoid, unary_op::tanh, unary_op::exp, unary_op::square, unary_op::sqrt})
        detail::check_unary<B>(op, ++seed);
}

/// SiLU alone: the activation a backend without the full unary set must offer.
template <class B>
void test_silu() {
    detail::check_unary<B>(unary_op::silu, 1650);
}

/// GEGLU: forward against hidden * gelu_erf(gate), backward by gradcheck.
template <class B>
void test_geglu() {
    context_t<B> ctx{};
    const shape s{2, 3, 8};
    const auto x = host_normal(static_cast<std::size_t>(s.numel()), 1701);
    std::vector<double> want(x.size() / 2);
    for (std::size_t r = 0; r < 6; ++r)
        for (std::size_t i = 0; i < 4; ++i)
            want[r * 4 + i] = x[r * 8 + i] * detail::naive_unary(unary_op::gelu_erf, x[r * 8 + 4 + i]);
    const auto y = ops::geglu(ctx, testing::upload<B, float>(ctx, s, x));
    REQUIRE(y.shape() == shape{2, 3, 4});
    check_close("geglu forward", testing::download(ctx, y), want, 1e-6, 1e-5);
    check_gradients<B>(
        "geglu", {{s}}, [](auto& c, const auto& in) { return ops::geglu(c, in[0]); },
        [](auto& c, const auto& in, const auto& dy) {
            const auto saved = ops::geglu_forward(c, in[0]).second;
            return grads_of(dy, ops::geglu_backward(c, saved, dy));
        },
        1702);
}

/// Broadcasting binary ops in f32 against a naive numpy-style loop.
template <class B>
void test_binary_forward() {
    context_t<B> ctx{};
    std::uint64_t seed = 1800;
    for (binary_op op : {binary_op::add, binary_op::sub, binary_op::mul, binary_op::div, binary_op::maximum, binary_op::minimum})
        for (const auto& [sa, sb] : detail::broadcast_cases()) {
            const operand oa{sa, detail::binary_map(op, false)}, ob{sb, detail::binary_map(op, true)};
            const auto a = testing::round_to<float>(testing::sample(oa, ++seed));
            const auto b = testing::round_to<float>(testing::sample(ob, ++seed));
            const shape out = broadcast_shapes(sa, sb);
            std::vector<double> want(static_cast<std::size_t>(out.numel()));
            for (index_t i = 0; i < out.numel(); ++i) {
                const auto idx = unravel(i, out);
                want[static_cast<std::size_t>(i)] = detail::naive_binary(op, a[broadcast_index(idx, sa)], b[broadcast_index(idx, sb)]);
            }
            const auto y = ops::binary(ctx, op, testing::upload<B, float>(ctx, sa, a), testing::upload<B, float>(ctx, sb, b));
            REQUIRE(y.shape() == out);
            check_close(std::string(detail::binary_name(op)) + " forward " + sa.str() + " with " + sb.str(), testing::download(ctx, y),
                        want, 1e-6, 1e-6);
        }
}

/// Broadcasting binary ops backward: each operand's gradient in its own shape,
/// summed over the axes it was broadcast along.
template <class B>
void test_binary_backward() {
    std::uint64_t seed = 1900;
    for (binary_op op : {binary_op::add, binary_op::sub, binary_op::mul, binary_op::div, binary_op::maximum, binary_op::minimum})
        for (const auto& [sa, sb] : detail::broadcast_cases()) {
            check_gradients<B>(
                std::string(detail::binary_name(op)) + " " + sa.str() + " with " + sb.str(),
                {{sa, detail::binary_map(op, false)}, {sb, detail::binary_map(op, true)}},
                [=](auto& c, const auto& in) { return ops::binary(c, op, in[0], in[1]); },
                [=](auto& c, const auto& in, const auto& dy) {
                    const auto saved = ops::binary_forward(c, op, in[0], in[1]).second;
                    auto [da, db] = ops::binary_backward(c, saved, dy);
                    return grads_of(dy, da, db);
                },
                ++seed);
        }
}

/// Sum and mean over several axis sets (keepdims): forward against a naive
/// loop, backward by gradcheck.
template <class B>
void test_reduce() {
    context_t<B> ctx{};
    const shape s{2, 3, 4};
    const std::vector<std::vector<int>> axis_sets{{}, {0}, {1}, {2}, {-1}, {0, 2}, {1, 2}, {0, 1, 2}};
    std::uint64_t seed = 2000;
    for (bool mean : {false, true})
        for (const auto& axes : axis_sets) {
            std::string label = std::string(mean ? "mean" : "sum") + " over {";
            for (int a : axes) label += std::to_string(a) + ",";
            label += "}";
            const auto x = host_normal(static_cast<std::size_t>(s.numel()), ++seed);
            auto [y, saved] = ops::reduce_forward(ctx, testing::upload<B, float>(ctx, s, x), axes, mean);
            std::vector<index_t> out_dims = s.to_vector();
            for (int a : axes) out_dims[static_cast<std::size_t>(s.normalise(a))] = 1;
            const shape out(out_dims);
            REQUIRE(y.shape() == out);
            std::vector<double> want(static_cast<std::size_t>(out.numel()), 0.0);
            for (index_t i = 0; i < s.numel(); ++i)
                want[broadcast_index(unravel(i, s), out)] += x[static_cast<std::size_t>(i)] * (mean ? 1.0 / static_cast<double>(s.numel() / out.numel()) : 1.0);
            check_close(label + " forward", testing::download(ctx, y), want, 1e-6, 1e-5);
            check_gradients<B>(
                label, {{s}}, [=](auto& c, const auto& in) { return ops::reduce_forward(c, in[0], axes, mean).first; },
                [=](auto& c, const auto& in, const auto& dy) {
                    const auto r = ops::reduce_forward(c, in[0], axes, mean).second;
                    return grads_of(dy, ops::reduce_backward(c, r, dy));
                },
                ++seed);
        }
}

}  // namespace dynamicid::matrix
