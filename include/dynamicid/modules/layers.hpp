// dynamicid modules: the small layers every model is built from, bound by
// the reference (torch) parameter names: "<name>.weight", "<name>.bias".
//
//     auto proj = dynamicid::modules::linear_layer<B, float>::bind(binder, "to_q", 320, 320, /*bias=*/false);
//     auto y = proj(ctx, x);
#pragma once

#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <string>
#include <string_view>

namespace dynamicid::modules {

/// torch.nn.Linear: weight (out, in), optional bias (out).
template <class B, class T>
struct linear_layer {
    tensor<B, T> weight, bias;

    static linear_layer bind(weight_binder<B, T>& b, std::string_view name, index_t in, index_t out, bool has_bias) {
        auto s = b.scope(name);
        linear_layer l;
        l.weight = s.tensor("weight", {out, in});
        if (has_bias) l.bias = s.tensor("bias", {out});
        return l;
    }
    tensor<B, T> operator()(context_t<B>& ctx, const tensor<B, T>& x) const {
        return ops::linear(ctx, x, weight, bias.defined() ? &bias : nullptr);
    }
    index_t in_features() const { return weight.dim(1); }
    index_t out_features() const { return weight.dim(0); }
};

/// torch.nn.LayerNorm over the last axis.
template <class B, class T>
struct layer_norm_layer {
    tensor<B, T> weight, bias;
    double eps = 1e-5;

    static layer_norm_layer bind(weight_binder<B, T>& b, std::string_view name, index_t features, double eps = 1e-5) {
        auto s = b.scope(name);
        return {s.tensor("weight", {features}), s.tensor("bias", {features}), eps};
    }
    tensor<B, T> operator()(context_t<B>& ctx, const tensor<B, T>& x) const {
        return ops::layer_norm(ctx, x, weight.defined() ? &weight : nullptr, bias.defined() ? &bias : nullptr, eps);
    }
};

/// torch.nn.GroupNorm on (N, C, ...).
template <class B, class T>
struct group_norm_layer {
    tensor<B, T> weight, bias;
    index_t groups = 32;
    double eps = 1e-5;

    static group_norm_layer bind(weight_binder<B, T>& b, std::string_view name, index_t channels, index_t groups, double eps) {
        auto s = b.scope(name);
        return {s.tensor("weight", {channels}), s.tensor("bias", {channels}), groups, eps};
    }
    tensor<B, T> operator()(context_t<B>& ctx, const tensor<B, T>& x) const {
        return ops::group_norm(ctx, x, groups, weight.defined() ? &weight : nullptr, bias.defined() ? &bias : nullptr, eps);
    }
};

/// torch.nn.Conv2d (square kernel, symmetric padding).
template <class B, class T>
struct conv2d_layer {
    tensor<B, T> weight, bias;
    ops::conv2d_options options{};

    static conv2d_layer bind(weight_binder<B, T>& b, std::string_view name, index_t in, index_t out, index_t kernel,
                             ops::conv2d_options options = {}, bool has_bias = true) {
        auto s = b.scope(name);
        conv2d_layer l;
        l.weight = s.tensor("weight", {out, in / options.groups, kernel, kernel});
        if (has_bias) l.bias = s.tensor("bias", {out});
        l.options = options;
        return l;
    }
    tensor<B, T> operator()(context_t<B>& ctx, const tensor<B, T>& x) const {
        return ops::conv2d(ctx, x, weight, bias.defined() ? &bias : nullptr, options);
    }
};

}  // namespace dynamicid::modules
