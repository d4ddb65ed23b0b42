// dynamicid ops: pointwise activations, GEGLU and softmax, each with its backward.
#pragma once

#include <dynamicid/ops/common.hpp>

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
