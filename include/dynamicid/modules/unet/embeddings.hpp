// dynamicid modules: the UNet's timestep embedding (diffusers Timesteps +
// TimestepEmbedding).
//
// timestep_features: the sinusoidal features of get_timestep_embedding,
//   f_i = exp(-ln(10000) * i / (half - freq_shift)),  i < half = dim / 2
//   features = [sin(t f), cos(t f)]  ([cos, sin] with flip_sin_to_cos), zero-padded to an odd dim.
// timestep_embedding: linear_2(silu(linear_1(features))).
//
//     auto features = dynamicid::modules::unet::timestep_features<B, float>(ctx, std::vector<float>{999.f, 999.f}, 320, true, 0.0);
//     auto emb = dynamicid::modules::unet::timestep_embedding<B>::bind(bind.scope("time_embedding"), 320, 1280);
//     auto temb = emb.forward(ctx, features);   // (2, 1280)
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/detail/frozen.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <cmath>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::modules::unet {

/// Sinusoidal timestep features (N, dim) for one timestep per batch entry.
/// Computed on the host in float32, step by step as torch computes it, so
/// that large timesteps (t f up to ~1000) round the same way.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> timestep_features(context_t<B>& ctx, std::span<const float> timesteps, index_t dim, bool flip_sin_to_cos,
                               double freq_shift) {
    check<value_error>(dim > 1, "timestep_embedding", "embedding dimension ", dim, " must be at least 2");
    const index_t half = dim / 2;
    check<value_error>(static_cast<double>(half) != freq_shift, "timestep_embedding", "freq_shift ", freq_shift,
                       " equals half the dimension");
    const float log_period = static_cast<float>(-std::log(10000.0));
    const float denominator = static_cast<float>(static_cast<double>(half) - freq_shift);
    std::vector<float> freqs(static_cast<std::size_t>(half));
    for (index_t i = 0; i < half; ++i) freqs[static_cast<std::size_t>(i)] = std::exp(log_period * static_cast<float>(i) / denominator);
    const auto n = static_cast<index_t>(timesteps.size());
    std::vector<T> host(static_cast<std::size_t>(n * dim), element_cast<T>(0.0f));
    for (index_t b = 0; b < n; ++b) {
        for (index_t i = 0; i < half; ++i) {
            const float arg = timesteps[static_cast<std::size_t>(b)] * freqs[static_cast<std::size_t>(i)];
            const index_t sin_at = flip_sin_to_cos ? half + i : i, cos_at = flip_sin_to_cos ? i : half + i;
            host[static_cast<std::size_t>(b * dim + sin_at)] = element_cast<T>(std::sin(arg));
            host[static_cast<std::size_t>(b * dim + cos_at)] = element_cast<T>(std::cos(arg));
        }
    }
    return tensor<B, T>::from_host(ctx, {n, dim}, std::span<const T>(host));
}

/// diffusers TimestepEmbedding: linear_1 -> SiLU -> linear_2.
template <class B, class T = float>
    requires computes_in<B, T>
class timestep_embedding {
public:
    using tensor_type = tensor<B, T>;

    struct params {
        linear_layer<B, T> linear_1, linear_2;
    };
    using param_grads = params;

    timestep_embedding() = default;

    static timestep_embedding bind(weight_binder<B, T> b, index_t in_channels, index_t time_embed_dim) {
        timestep_embedding e;
        e.params_.linear_1 = linear_layer<B, T>::bind(b, "linear_1", in_channels, time_embed_dim, true);
        e.params_.linear_2 = linear_layer<B, T>::bind(b, "linear_2", time_embed_dim, time_embed_dim, true);
        return e;
    }

    const params& weights() const noexcept { return params_; }
    const params& parameters() const noexcept { return params_; }
    /// f(name, weight, grad) for linear_1 and linear_2 below `prefix`.
    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        modules::detail::visit_layer(prefix + "linear_1", params_.linear_1, grads ? &grads->linear_1 : nullptr, f);
        modules::detail::visit_layer(prefix + "linear_2", params_.linear_2, grads ? &grads->linear_2 : nullptr, f);
    }

    /// features (N, in_channels) -> (N, time_embed_dim)
    tensor_type forward(context_t<B>& ctx, const tensor_type& features) const {
        return params_.linear_2(ctx, ops::silu(ctx, params_.linear_1(ctx, features)));
    }

    struct saved {
        ops::linear_saved<B, T> linear_1, linear_2;
        ops::unary_saved<B, T> act;
    };

    /// forward() keeping what backward() needs (frozen weights unless `trainable`).
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& features, bool trainable = false) const {
        using modules::detail::layer_forward;
        auto [h, s1] = layer_forward(ctx, params_.linear_1, features, trainable);
        auto [a, sa] = ops::unary_forward(ctx, unary_op::silu, h);
        auto [y, s2] = layer_forward(ctx, params_.linear_2, a, trainable);
        return {y, saved{std::move(s1), std::move(s2), std::move(sa)}};
    }

    /// Gradient w.r.t. the features; weight gradients added into *pg when trainable.
    tensor_type backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        using modules::detail::layer_backward;
        return layer_backward(ctx, s.linear_1,
                              ops::unary_backward(ctx, s.act, layer_backward(ctx, s.linear_2, grad_output, pg ? &pg->linear_2 : nullptr)),
                              pg ? &pg->linear_1 : nullptr);
    }

private:
    params params_{};
};

}  // namespace dynamicid::modules::unet
