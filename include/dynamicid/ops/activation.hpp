// dynamicid ops: pointwise activations, PReLU, GEGLU and softmax, each with its backward.
#pragma once

#include <dynamicid/ops/common.hpp>
#include <dynamicid/ops/elementwise.hpp>

#include <utility>
#include <vector>

namespace dynamicid::ops {

template <class B, class T>
struct unary_saved {
    unary_op op{};
    tensor<B, T> input;
};

/// y = f(x) for a pointwise f (relu, silu, gelu_erf, quick_gelu, ...).
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> unary(context_t<B>& ctx, unary_op op, const tensor<B, T>& x) {
    auto y = empty_like(ctx, x);
    B::unary_forward(ctx, op, static_cast<std::size_t>(x.numel()), x.data(), y.data());
    return y;
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, unary_saved<B, T>> unary_forward(context_t<B>& ctx, unary_op op, const tensor<B, T>& x) {
    return {unary(ctx, op, x), unary_saved<B, T>{op, x}};
}

template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> unary_backward(context_t<B>& ctx, const unary_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    check_same_shape("unary", saved.input, grad_output);
    auto dx = empty_like(ctx, grad_output);
    B::unary_backward(ctx, saved.op, static_cast<std::size_t>(dx.numel()), saved.input.data(), grad_output.data(), dx.data());
    return dx;
}

/// SiLU (swish), the UNet's and VAE's activation.
template <class B, class T>
tensor<B, T> silu(context_t<B>& ctx, const tensor<B, T>& x) { return unary(ctx, unary_op::silu, x); }
/// GELU, exact erf form.
template <class B, class T>
tensor<B, T> gelu(context_t<B>& ctx, const tensor<B, T>& x) { return unary(ctx, unary_op::gelu_erf, x); }
template <class B, class T>
tensor<B, T> relu(context_t<B>& ctx, const tensor<B, T>& x) { return unary(ctx, unary_op::relu, x); }
template <class B, class T>
tensor<B, T> quick_gelu(context_t<B>& ctx, const tensor<B, T>& x) { return unary(ctx, unary_op::quick_gelu, x); }

template <class B, class T>
struct prelu_saved {
    tensor<B, T> input;   ///< x
    tensor<B, T> weight;  ///< the slopes as given, (C) or (1)
    needs need;
};

template <class B, class T>
struct prelu_grads {
    tensor<B, T> input, weight;
};

namespace detail {
/// The slopes shaped to broadcast along axis 1 of x: (1, C, 1, ...), or (1) for one shared slope.
template <class B, class T>
tensor<B, T> prelu_slopes(const tensor<B, T>& x, const tensor<B, T>& weight) {
    check<shape_error>(x.defined() && weight.defined(), "prelu", "undefined input or weight");
    check<shape_error>(weight.rank() == 1, "prelu", "weight must be rank 1, got ", weight.shape().str());
    if (weight.numel() == 1) return weight;
    check<shape_error>(x.rank() >= 2 && x.dim(1) == weight.dim(0), "prelu", "weight ", weight.shape().str(),
                       " does not match the channels (axis 1) of ", x.shape().str());
    std::vector<index_t> dims(static_cast<std::size_t>(x.rank()), 1);
    dims[1] = weight.dim(0);
    return weight.reshape(std::move(dims));
}
template <class B, class T>
tensor<B, T> scalar_zero(context_t<B>& ctx) {
    return tensor<B, T>::zeros(ctx, shape({1}));
}
}  // namespace detail

/// torch.nn.PReLU: y = x for x > 0, weight[c] * x otherwise, with c the index
/// along axis 1 (a one-element weight is shared by every channel).
///
///     auto y = ops::prelu(ctx, x, slopes);                        // x (N, C, H, W), slopes (C)
///     auto [y2, saved] = ops::prelu_forward(ctx, x, slopes);
///     auto g = ops::prelu_backward(ctx, saved, dy);               // g.input, g.weight
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> prelu(context_t<B>& ctx, const tensor<B, T>& x, const tensor<B, T>& weight) {
    const auto a = detail::prelu_slopes(x, weight);
    const auto zero = detail::scalar_zero<B, T>(ctx);
    return add(ctx, binary(ctx, binary_op::maximum, zero, x), mul(ctx, binary(ctx, binary_op::minimum, x, zero), a));
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, prelu_saved<B, T>> prelu_forward(context_t<B>& ctx, const tensor<B, T>& x, const tensor<B, T>& weight,
                                                         needs need = {}) {
    return {prelu(ctx, x, weight), prelu_saved<B, T>{x, weight, need}};
}

/// dx = dy where x > 0, weight dy elsewhere (torch's choice at x = 0);
/// dweight = the sum of dy min(x, 0) over every axis but 1.
template <class B, class T>
    requires computes_in<B, T>
prelu_grads<B, T> prelu_backward(context_t<B>& ctx, const prelu_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    check_same_shape("prelu", saved.input, grad_output);
    const auto& x = saved.input;
    const auto a = detail::prelu_slopes(x, saved.weight);
    const auto zero = detail::scalar_zero<B, T>(ctx);
    prelu_grads<B, T> g;
    if (saved.need.input) {
        // max(0, x) sends ties to its first operand, so this is dy [x > 0].
        const binary_saved<B, T> positive{binary_op::maximum, zero, x};
        const auto d_pos = binary_backward(ctx, positive, grad_output, {.input = false, .params = true}).second;
        g.input = add(ctx, d_pos, mul(ctx, sub(ctx, grad_output, d_pos), a));
    }
    if (saved.need.params) {
        const auto contrib = mul(ctx, grad_output, binary(ctx, binary_op::minimum, x, zero));
        std::vector<int> axes;
        for (int i = 0; i < x.rank(); ++i)
            if (i != 1 || saved.weight.numel() == 1) axes.push_back(i);
        g.weight = sum(ctx, contrib, axes).reshape(saved.weight.shape().to_vector());
    }
    return g;
}

template <class B, class T>
struct geglu_saved {
    tensor<B, T> input;
};

/// GEGLU on the last axis: x = [hidden | gate] -> hidden * gelu(gate).
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> geglu(context_t<B>& ctx, const tensor<B, T>& x) {
    check<shape_error>(x.rank() >= 1 && x.dim(-1) % 2 == 0, "geglu", "last axis must be even, got ", x.shape().str());
    auto dims = x.shape().to_vector();
    dims.back() /= 2;
    auto y = tensor<B, T>::empty(ctx, shape(dims));
    const geglu_desc d{.rows = x.dim(-1) ? x.numel() / x.dim(-1) : 0, .cols = dims.back()};
    B::geglu_forward(ctx, d, x.data(), y.data());
    return y;
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, geglu_saved<B, T>> geglu_forward(context_t<B>& ctx, const tensor<B, T>& x) {
    return {geglu(ctx, x), geglu_saved<B, T>{x}};
}

template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> geglu_backward(context_t<B>& ctx, const geglu_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    const auto& x = saved.input;
    check<shape_error>(grad_output.numel() * 2 == x.numel(), "geglu", "gradient shape ", grad_output.shape().str(),
                       " does not match input ", x.shape().str());
    auto dx = empty_like(ctx, x);
    const geglu_desc d{.rows = x.dim(-1) ? x.numel() / x.dim(-1) : 0, .cols = x.dim(-1) / 2};
    B::geglu_backward(ctx, d, x.data(), grad_output.data(), dx.data());
    return dx;
}

template <class B, class T>
struct softmax_saved {
    tensor<B, T> output;
};

/// Softmax over the last axis. A row that is entirely -inf gives zeros.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> softmax(context_t<B>& ctx, const tensor<B, T>& x) {
    check<shape_error>(x.rank() >= 1, "softmax", "needs rank >= 1");
    auto y = empty_like(ctx, x);
    const softmax_desc d{.rows = x.dim(-1) ? x.numel() / x.dim(-1) : 0, .cols = x.dim(-1)};
    B::softmax_forward(ctx, d, x.data(), y.data());
    return y;
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, softmax_saved<B, T>> softmax_forward(context_t<B>& ctx, const tensor<B, T>& x) {
    auto y = softmax(ctx, x);
    return {y, softmax_saved<B, T>{y}};
}

template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> softmax_backward(context_t<B>& ctx, const softmax_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    check_same_shape("softmax", saved.output, grad_output);
    auto dx = empty_like(ctx, grad_output);
    const auto& y = saved.output;
    const softmax_desc d{.rows = y.dim(-1) ? y.numel() / y.dim(-1) : 0, .cols = y.dim(-1)};
    B::softmax_backward(ctx, d, y.data(), grad_output.data(), dx.data());
    return dx;
}

}  // namespace dynamicid::ops
