// dynamicid tests: finite-difference gradient checks and cross-backend checks.
//
// An op under test is described by two generic callables, so that one
// description serves every backend and element type:
//
//     forward(ctx, inputs)            -> output tensor
//     backward(ctx, inputs, grad_out) -> one gradient per input (the callable
//                                        runs the op's *_forward itself to get
//                                        what its *_backward needs)
//
// check_gradients() draws the inputs from a seeded normal distribution, takes
// the scalar loss L = sum(output * R) for a fixed random R, and compares the
// analytic gradient of every input element with the central difference
// (L(x + eps e_i) - L(x - eps e_i)) / (2 eps). Backends that compute in f64 are
// held to torch.autograd.gradcheck's tolerances; f32-only backends get a
// looser check plus an element-by-element comparison with the reference CPU
// backend.
#pragma once

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/core/philox.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/ops.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace dynamicid::testing {

/// One input of an op under test.
struct operand {
    shape dims;
    /// Applied to each N(0, 1) draw, e.g. to keep values off a kink or out of
    /// an invalid domain; empty means the draw is used as is.
    std::function<double(double)> map = {};
    /// False for inputs the backward is not expected to differentiate.
    bool differentiable = true;
};

struct tolerance {
    double eps, atol, rtol;
};

/// The widest type B computes in: gradient checks run in it.
template <class B>
using grad_t = std::conditional_t<supports_element<B, double>, double, float>;

/// torch.autograd.gradcheck's defaults in f64. In f32 the step must be much
/// larger for rounding not to swamp the difference quotient, which costs
/// truncation error, hence the loose bounds (the cross-backend check is the
/// tight one there).
template <class T>
constexpr tolerance default_tolerance() {
    if constexpr (std::is_same_v<T, double>) return {1e-6, 1e-5, 1e-3};
    else return {1e-2, 2e-2, 2e-2};
}

// ---- host <-> device helpers ------------------------------------------------

template <class B, class T>
tensor<B, T> upload(context_t<B>& ctx, const shape& dims, const std::vector<double>& values) {
    std::vector<T> narrow(values.size());
    for (std::size_t i = 0; i < values.size(); ++i) narrow[i] = element_cast<T>(values[i]);
    return tensor<B, T>::from_host(ctx, dims, std::span<const T>(narrow));
}

template <class B, class T>
std::vector<double> download(context_t<B>& ctx, const tensor<B, T>& t) {
    const auto host = t.to_host(ctx);
    std::vector<double> out(host.size());
    for (std::size_t i = 0; i < host.size(); ++i) out[i] = element_cast<double>(host[i]);
    return out;
}

/// Values rounded to T and widened back, so host copies equal what the device holds.
template <class T>
std::vector<double> round_to(std::vector<double> values) {
    for (auto& v : values) v = element_cast<double>(element_cast<T>(v));
    return values;
}

/// N(0, 1) draws from the library's own generator (independent of any backend), then `map`.
inline std::vector<double> sample(const operand& op, std::uint64_t seed) {
    std::vector<double> v(static_cast<std::size_t>(op.dims.numel()));
    for (std::size_t i = 0; i < v.size(); ++i) {
        v[i] = philox::normal(seed, i);
        if (op.map) v[i] = op.map(v[i]);
    }
    return v;
}

/// |x| pushed to at least `gap`, keeping the sign: keeps inputs off a kink at 0.
inline std::function<double(double)> away_from_zero(double gap) {
    return [gap](double x) { return x < 0 ? x - gap : x + gap; };
}

/// Strictly positive values of at least `floor` (sqrt, division).
inline std::function<double(double)> positive(double floor) {
    return [floor](double x) { return std::abs(x) + floor; };
}

/// Passes when |actual - expected| <= atol + rtol |expected| everywhere; on
/// failure reports the count and the worst element.
inline void check_close(const std::string& label, const std::vector<double>& actual, const std::vector<double>& expected,
                        double atol, double rtol) {
    REQUIRE(actual.size() == expected.size());
    std::size_t bad = 0, worst = 0;
    double worst_excess = -1.0;
    for (std::size_t i = 0; i < actual.size(); ++i) {
        const double limit = atol + rtol * std::abs(expected[i]);
        const double err = std::abs(actual[i] - expected[i]);
        const bool ok = err <= limit;  // false for NaN
        if (!ok) ++bad;
        const double excess = ok ? err - limit : 1e300;
        if (excess > worst_excess) {
            worst_excess = excess;
            worst = i;
        }
    }
    std::ostringstream msg;
    msg << label << ": " << bad << " of " << actual.size() << " elements out of tolerance (atol " << atol << ", rtol " << rtol
        << ")";
    if (!actual.empty())
        msg << "; worst at " << worst << ": got " << actual[worst] << ", expected " << expected[worst];
    INFO(msg.str());
    CHECK(bad == 0);
}

// ---- the gradient check -----------------------------------------------------

namespace detail {

inline std::uint64_t operand_seed(std::uint64_t seed, std::size_t i) { return seed * 0x9E3779B97F4A7C15ull + 7919u * (i + 1); }

template <class B, class T, class Forward, class Backward>
void finite_difference_check(const std::string& label, const std::vector<operand>& operands,
                             const std::vector<std::vector<double>>& values, std::uint64_t seed, Forward&& forward,
                             Backward&& backward, tolerance tol) {
    context_t<B> ctx{};
    std::vector<tensor<B, T>> inputs;
    for (std::size_t i = 0; i < operands.size(); ++i) inputs.push_back(upload<B, T>(ctx, operands[i].dims, values[i]));

    const tensor<B, T> y = forward(ctx, inputs);
    const auto r_tensor = ops::randn<B, T>(ctx, y.shape(), seed ^ 0xA5A5A5A5u);
    const auto r = download(ctx, r_tensor);
    const std::vector<tensor<B, T>> grads = backward(ctx, inputs, r_tensor);
    REQUIRE(grads.size() == operands.size());

    auto loss = [&](const std::vector<tensor<B, T>>& in) {
        const auto out = download(ctx, forward(ctx, in));
        REQUIRE(out.size() == r.size());
        double total = 0;
        for (std::size_t i = 0; i < out.size(); ++i) total += out[i] * r[i];
        return total;
    };

    for (std::size_t i = 0; i < operands.size(); ++i) {
        if (!operands[i].differentiable) continue;
        INFO(label << ": gradient of input " << i << " " << operands[i].dims.str());
        REQUIRE(grads[i].defined());
        REQUIRE(grads[i].shape() == operands[i].dims);
        const auto analytic = download(ctx, grads[i]);
        std::vector<double> numeric(analytic.size());
        auto perturbed = inputs;
        std::vector<double> host = values[i];
        for (std::size_t j = 0; j < host.size(); ++j) {
            const double x = values[i][j];
            // The step actually taken is what T can represent around x.
            const double up = element_cast<double>(element_cast<T>(x + tol.eps));
            const double down = element_cast<double>(element_cast<T>(x - tol.eps));
            host[j] = up;
            perturbed[i] = upload<B, T>(ctx, operands[i].dims, host);
            const double l_up = loss(perturbed);
            host[j] = down;
            perturbed[i] = upload<B, T>(ctx, operands[i].dims, host);
            const double l_down = loss(perturbed);
            host[j] = x;
            numeric[j] = (l_up - l_down) / (up - down);
        }
        check_close(label + " (input " + std::to_string(i) + ", analytic vs central difference)", analytic, numeric, tol.atol,
                    tol.rtol);
    }
}

// Runs forward and backward in f32 on B and on the reference CPU backend and
// compares every output and gradient.
template <class B, class Forward, class Backward>
void cross_check(const std::string& label, const std::vector<operand>& operands, const std::vector<std::vector<double>>& values,
                 std::uint64_t seed, Forward&& forward, Backward&& backward) {
    auto run = [&]<class C>(std::type_identity<C>) {
        context_t<C> ctx{};
        std::vector<tensor<C, float>> inputs;
        for (std::size_t i = 0; i < operands.size(); ++i) inputs.push_back(upload<C, float>(ctx, operands[i].dims, values[i]));
        const tensor<C, float> y = forward(ctx, inputs);
        const auto dy = ops::randn<C, float>(ctx, y.shape(), seed ^ 0xA5A5A5A5u);
        const std::vector<tensor<C, float>> grads = backward(ctx, inputs, dy);
        std::vector<std::vector<double>> out{download(ctx, y)};
        for (std::size_t i = 0; i < grads.size(); ++i)
            out.push_back(operands[i].differentiable && grads[i].defined() ? download(ctx, grads[i]) : std::vector<double>{});
        return out;
    };
    const auto got = run(std::type_identity<B>{});
    const auto want = run(std::type_identity<cpu_backend>{});
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < got.size(); ++i)
        check_close(label + (i == 0 ? std::string(" (output vs cpu)") : " (gradient " + std::to_string(i - 1) + " vs cpu)"),
                    got[i], want[i], 1e-4, 1e-4);
}

}  // namespace detail

/// Checks the backward of an op against central differences on backend B (in
/// f64 when B offers it, else f32), and against the CPU backend when B is
/// another backend.
template <class B, class Forward, class Backward>
void check_gradients(const std::string& label, const std::vector<operand>& operands, Forward forward, Backward backward,
                     std::uint64_t seed = 1) {
    using G = grad_t<B>;
    std::vector<std::vector<double>> values;
    for (std::size_t i = 0; i < operands.size(); ++i)
        values.push_back(round_to<float>(sample(operands[i], detail::operand_seed(seed, i))));
    detail::finite_difference_check<B, G>(label, operands, values, seed, forward, backward, default_tolerance<G>());
    if constexpr (!std::is_same_v<B, cpu_backend>) detail::cross_check<B>(label, operands, values, seed, forward, backward);
}

/// A backward's gradients as a vector of tensors of the same type as `like`.
template <class Like, class... Tensors>
std::vector<std::decay_t<Like>> grads_of(const Like&, Tensors&&... grads) {
    return {std::forward<Tensors>(grads)...};
}

}  // namespace dynamicid::testing
