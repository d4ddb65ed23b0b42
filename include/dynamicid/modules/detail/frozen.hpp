// dynamicid modules (internal): training forwards of the small layers. A
// frozen forward keeps only what the gradient w.r.t. its input needs (the
// weight for a linear or convolution, the input statistics and gamma for a
// norm) and never computes weight gradients; a trainable one (layer_forward
// with `trainable`) also keeps what the weight gradients need, and
// layer_backward adds those into a layer-shaped gradient struct. Not part of
// the public API.
#pragma once

#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/ops.hpp>

#include <cstddef>
#include <string>
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
    bool params = false;  ///< whether the affine parameters are differentiated
};
template <class B, class T>
struct layer_norm_saved {
    ops::norm_saved<B, T> norm;
    bool params = false;
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

// ---- layers whose weights may be trained ----------------------------------------
// layer_forward(ctx, layer, x, trainable) keeps exactly what frozen_forward
// keeps unless `trainable`; layer_backward returns the input gradient and,
// when `grads` is not null and the forward was trainable, adds the weight
// (and bias) gradients into grads->weight / grads->bias (undefined: zero).

inline ops::needs layer_needs(bool trainable) { return {.input = true, .params = trainable}; }

template <class B, class T>
std::pair<tensor<B, T>, ops::linear_saved<B, T>> layer_forward(context_t<B>& ctx, const linear_layer<B, T>& l, const tensor<B, T>& x,
                                                               bool trainable) {
    return ops::linear_forward(ctx, x, l.weight, l.bias.defined() ? &l.bias : nullptr, layer_needs(trainable));
}
template <class B, class T>
tensor<B, T> layer_backward(context_t<B>& ctx, const ops::linear_saved<B, T>& s, const tensor<B, T>& g, linear_layer<B, T>* grads) {
    auto r = ops::linear_backward(ctx, s, g);
    if (grads && r.weight.defined()) {
        grads->weight = add_grads(ctx, grads->weight, r.weight);
        if (r.bias.defined()) grads->bias = add_grads(ctx, grads->bias, r.bias);
    }
    return r.input;
}

template <class B, class T>
std::pair<tensor<B, T>, ops::conv2d_saved<B, T>> layer_forward(context_t<B>& ctx, const conv2d_layer<B, T>& l, const tensor<B, T>& x,
                                                               bool trainable) {
    return ops::conv2d_forward(ctx, x, l.weight, l.bias.defined() ? &l.bias : nullptr, l.options, layer_needs(trainable));
}
template <class B, class T>
tensor<B, T> layer_backward(context_t<B>& ctx, const ops::conv2d_saved<B, T>& s, const tensor<B, T>& g, conv2d_layer<B, T>* grads) {
    auto r = ops::conv2d_backward(ctx, s, g);
    if (grads && r.weight.defined()) {
        grads->weight = add_grads(ctx, grads->weight, r.weight);
        if (r.bias.defined()) grads->bias = add_grads(ctx, grads->bias, r.bias);
    }
    return r.input;
}

template <class B, class T>
std::pair<tensor<B, T>, group_norm_saved<B, T>> layer_forward(context_t<B>& ctx, const group_norm_layer<B, T>& l, const tensor<B, T>& x,
                                                              bool trainable) {
    auto r = frozen_forward(ctx, l, x);
    r.second.params = trainable && l.weight.defined();
    return r;
}
template <class B, class T>
tensor<B, T> layer_backward(context_t<B>& ctx, const group_norm_saved<B, T>& s, const tensor<B, T>& g, group_norm_layer<B, T>* grads) {
    const bool params = grads && s.params;
    auto r = ops::group_norm_backward(ctx, s.norm, g, {.input = true, .params = params});
    if (params) {
        grads->weight = add_grads(ctx, grads->weight, r.gamma);
        grads->bias = add_grads(ctx, grads->bias, r.beta);
    }
    return r.input;
}

template <class B, class T>
std::pair<tensor<B, T>, layer_norm_saved<B, T>> layer_forward(context_t<B>& ctx, const layer_norm_layer<B, T>& l, const tensor<B, T>& x,
                                                              bool trainable) {
    auto r = frozen_forward(ctx, l, x);
    r.second.params = trainable && l.weight.defined();
    return r;
}
template <class B, class T>
tensor<B, T> layer_backward(context_t<B>& ctx, const layer_norm_saved<B, T>& s, const tensor<B, T>& g, layer_norm_layer<B, T>* grads) {
    const bool params = grads && s.params;
    auto r = ops::layer_norm_backward(ctx, s.norm, g, {.input = true, .params = params});
    if (params) {
        grads->weight = add_grads(ctx, grads->weight, r.gamma);
        grads->bias = add_grads(ctx, grads->bias, r.beta);
    }
    return r.input;
}

/// `&v[i]`, growing `v` to `n` entries first; null when `v` is null (no gradients wanted).
template <class V>
auto slot_of(V* v, std::size_t i, std::size_t n) -> decltype(&(*v)[i]) {
    if (!v) return nullptr;
    if (v->size() < n) v->resize(n);
    return &(*v)[i];
}

/// Calls f(prefix + ".weight", weight, grad) and the same for ".bias" for
/// every defined weight of a layer; `grads` may be null (undefined gradients).
template <class L, class F>
void visit_layer(const std::string& prefix, const L& weights, const L* grads, F&& f) {
    using tensor_type = decltype(weights.weight);
    const tensor_type none{};
    if (weights.weight.defined()) f(prefix + ".weight", weights.weight, grads ? grads->weight : none);
    if (weights.bias.defined()) f(prefix + ".bias", weights.bias, grads ? grads->bias : none);
}

/// `&v[i]` when `v` is not null and has an entry i, else null.
template <class V>
auto entry_of(const V* v, std::size_t i) -> decltype(&(*v)[i]) {
    return v && i < v->size() ? &(*v)[i] : nullptr;
}

/// `g`, or zeros of shape `s` when nobody produced a gradient.
template <class B, class T>
tensor<B, T> grad_or_zeros(context_t<B>& ctx, const tensor<B, T>& g, const shape& s) {
    return g.defined() ? g : tensor<B, T>::zeros(ctx, s);
}

}  // namespace dynamicid::modules::detail
