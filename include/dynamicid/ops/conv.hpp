// dynamicid ops: 2-D convolution with backward (data and weight).
#pragma once

#include <dynamicid/ops/common.hpp>

#include <type_traits>

namespace dynamicid::ops {

/// Convolution hyper-parameters, as torch.nn.Conv2d spells them.
struct conv2d_options {
    index_t stride = 1, padding = 0, dilation = 1, groups = 1;
};

template <class B, class T>
struct conv2d_saved {
    conv2d_desc desc{};
    tensor<B, T> input;   ///< kept when the weight gradient is needed
    tensor<B, T> weight;  ///< kept when the input gradient is needed
    bool has_bias = false;
};

namespace detail {
template <class B, class T>
conv2d_desc make_conv_desc(const tensor<B, T>& x, const tensor<B, T>& w, const conv2d_options& o) {
    check<shape_error>(x.rank() == 4 && w.rank() == 4, "conv2d", "expects NCHW input and OIHW weight, got ", x.shape().str(), " and ",
                       w.shape().str());
    check<value_error>(o.groups >= 1 && o.stride >= 1 && o.dilation >= 1 && o.padding >= 0, "conv2d", "bad options");
    check<shape_error>(x.dim(1) % o.groups == 0 && w.dim(0) % o.groups == 0 && w.dim(1) * o.groups == x.dim(1), "conv2d",
                       "channels do not fit: input ", x.shape().str(), ", weight ", w.shape().str(), ", groups ", o.groups);
    conv2d_desc d{.n = x.dim(0), .c_in = x.dim(1), .h = x.dim(2), .w = x.dim(3), .c_out = w.dim(0), .kh = w.dim(2), .kw = w.dim(3),
                  .stride_h = o.stride, .stride_w = o.stride, .pad_h = o.padding, .pad_w = o.padding,
                  .dilation_h = o.dilation, .dilation_w = o.dilation, .groups = o.groups};
    check<shape_error>(d.out_h() >= 1 && d.out_w() >= 1, "conv2d", "kernel larger than padded input ", x.shape().str());
    return d;
}
}  // namespace detail

/// torch.nn.functional.conv2d.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> conv2d(context_t<B>& ctx, const tensor<B, T>& x, const tensor<B, T>& weight, const std::type_identity_t<tensor<B, T>>* bias = nullptr,
                    conv2d_options options = {}) {
    const auto d = detail::make_conv_desc(x, weight, options);
    const bool has_bias = bias && bias->defined();
    if (has_bias)
        check<shape_error>(bias->rank() == 1 && bias->dim(0) == d.c_out, "conv2d", "bias ", bias->shape().str(), " for ", d.c_out,
                           " channels");
    auto y = tensor<B, T>::empty(ctx, {d.n, d.c_out, d.out_h(), d.out_w()});
    B::conv2d_forward(ctx, d, x.data(), weight.data(), has_bias ? const_pointer_t<B, T>(bias->data()) : const_pointer_t<B, T>{},
                      y.data());
    return y;
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, conv2d_saved<B, T>> conv2d_forward(context_t<B>& ctx, const tensor<B, T>& x, const tensor<B, T>& weight,
                                                           const std::type_identity_t<tensor<B, T>>* bias = nullptr, conv2d_options options = {},
                                                           needs need = {}) {
    auto y = conv2d(ctx, x, weight, bias, options);
    return {y, conv2d_saved<B, T>{detail::make_conv_desc(x, weight, options), need.params ? x : tensor<B, T>{},
                                  need.input ? weight : tensor<B, T>{}, bias != nullptr && bias->defined()}};
}

template <class B, class T>
struct conv2d_grads {
    tensor<B, T> input, weight, bias;
};

template <class B, class T>
    requires computes_in<B, T>
conv2d_grads<B, T> conv2d_backward(context_t<B>& ctx, const conv2d_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    const auto& d = saved.desc;
    check<shape_error>(grad_output.shape() == shape{d.n, d.c_out, d.out_h(), d.out_w()}, "conv2d", "gradient shape ",
                       grad_output.shape().str());
    conv2d_grads<B, T> g;
    if (saved.weight.defined()) {
        g.input = tensor<B, T>::empty(ctx, {d.n, d.c_in, d.h, d.w});
        B::conv2d_backward_data(ctx, d, saved.weight.data(), grad_output.data(), g.input.data());
    }
    if (saved.input.defined()) {
        g.weight = tensor<B, T>::empty(ctx, {d.c_out, d.c_in / d.groups, d.kh, d.kw});
        if (saved.has_bias) g.bias = tensor<B, T>::empty(ctx, {d.c_out});
        B::conv2d_backward_weight(ctx, d, saved.input.data(), grad_output.data(), g.weight.data(),
                                  saved.has_bias ? g.bias.data() : pointer_t<B, T>{});
    }
    return g;
}

}  // namespace dynamicid::ops
