// dynamicid modules (internal): training forwards of frozen layers. Each
// keeps only what the gradient w.r.t. its input needs (the weight for a
// linear or convolution, the input statistics and gamma for a norm) and
// never computes weight gradients. Not part of the public API.
#pragma once

#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/ops.hpp>

#include <utility>

namespace dynamicid::modules::detail {

inline constexpr ops::needs input_only{.input = true, .params = false};

template <class B, class T>
std::pair<tensor<B, T>, ops::linear_saved<B, T>> frozen_forward(context_t<B>& ctx, const linear_layer<B, T>& l, const tensor<B, T>& x) {
    return ops::linear_forward(ctx, x, l.weight, l.bias.defined() ? &l.bias : nullptr, input_only);
}
template <class B, class T>
tensor<B, T> frozen_backward(context_t<B>& ctx, const ops::linear_saved<B, T>& s, const tensor<B, T>& g) {
    return ops::linear_backward(ctx, s, g).input;
}

template <class B, class T>
std::pair<tensor<B, T>, ops::conv2d_saved<B, T>> frozen_forward(context_t<B>& ctx, const conv2d_layer<B, T>& l, const tensor<B, T>& x) {
    return ops::conv2d_forward(ctx, x, l.weight, l.bias.defined() ? &l.bias : nullptr, l.options, input_only);
}
template <class B, class T>
tensor<B, T> frozen_backward(context_t<B>& ctx, const ops::conv2d_saved<B, T>& s, const tensor<B, T>& g) {
    return ops::conv2d_backward(ctx, s, g).input;
}

/// GroupNorm and LayerNorm share ops::norm_saved; the tag picks the backward.
template <class B, class T>
struct group_norm_saved {
    ops::norm_saved<B, T> norm;
};
template <class B, class T>
struct layer_norm_saved {
    ops::norm_saved<B, T> norm;
};

template <class B, class T>
std::pair<tensor<B, T>, group_norm_saved<B, T>> frozen_forward(context_t<B>& ctx, const group_norm_layer<B, T>& l, const tensor<B, T>& x) {
    auto [y, s] = ops::group_norm_forward(ctx, x, l.groups, l.weight.defined() ? &l.weight : nullptr, l.bias.defined() ? &l.bias : nullptr,
                                          l.eps);
    return {y, group_norm_saved<B, T>{s}};
}
template <class B, class T>
tensor<B, T> frozen_backward(context_t<B>& ctx, const group_norm_saved<B, T>& s, const tensor<B, T>& g) {
    return ops::group_norm_backward(ctx, s.norm, g, input_only).input;
}

template <class B, class T>
std::pair<tensor<B, T>, layer_norm_saved<B, T>> frozen_forward(context_t<B>& ctx, const layer_norm_layer<B, T>& l, const tensor<B, T>& x) {
    auto [y, s] = ops::layer_norm_forward(ctx, x, l.weight.defined() ? &l.weight : nullptr, l.bias.defined() ? &l.bias : nullptr, l.eps);
    return {y, layer_norm_saved<B, T>{s}};
}
template <class B, class T>
tensor<B, T> frozen_backward(context_t<B>& ctx, const layer_norm_saved<B, T>& s, const tensor<B, T>& g) {
    return ops::layer_norm_backward(ctx, s.norm, g, input_only).input;
}

/// a + b where an undefined tensor stands for zeros (a gradient nobody produced).
template <class B, class T>
tensor<B, T> add_grads(context_t<B>& ctx, const tensor<B, T>& a, const tensor<B, T>& b) {
    if (!a.defined()) return b;
    if (!b.defined()) return a;
    return ops::add(ctx, a, b);
}

/// `g`, or zeros of shape `s` when nobody produced a gradient.
template <class B, class T>
tensor<B, T> grad_or_zeros(context_t<B>& ctx, const tensor<B, T>& g, const shape& s) {
    return g.defined() ? g : tensor<B, T>::zeros(ctx, s);
}

}  // namespace dynamicid::modules::detail
