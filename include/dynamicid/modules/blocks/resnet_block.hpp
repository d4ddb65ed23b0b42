// dynamicid modules: ResnetBlock2D, the residual block of the SD UNet and VAE.
//
//   h   = conv1(silu(norm1(x)))
//   h  += time_emb_proj(silu(temb))[:, :, None, None]      (when temb_channels > 0)
//   h   = conv2(silu(norm2(h)))
//   out = (shortcut(x) + h) / output_scale_factor
//
// shortcut is the identity, or a 1x1 convolution ("conv_shortcut") when the
// channel count changes. This is diffusers' ResnetBlock2D with its defaults
// (time_embedding_norm "default", SiLU, no up/down sampling inside the block,
// dropout inactive at inference). Weights bind by diffusers' state-dict keys:
// norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut.
//
//     dynamicid::modules::weight_binder<B, float> bind(ctx, source, "down_blocks.0.resnets.0.");
//     auto block = dynamicid::modules::blocks::resnet_block<B>::bind(
//         bind, {.in_channels = 320, .out_channels = 320, .temb_channels = 1280, .groups = 32, .eps = 1e-5});
//     bind.finish();
//     auto y = block.forward(ctx, x, &temb);   // x (N, 320, H, W), temb (N, 1280)
//
// Training (frozen weights, input gradients only):
//
//     auto [y, saved] = block.forward_train(ctx, x, &temb);
//     auto g = block.backward(ctx, saved, grad_y);   // g.input (N, 320, H, W), g.temb (N, 1280)
//
// Training the block's own weights too (a params-shaped gradient struct;
// gradients add into it, undefined entries counting as zeros):
//
//     auto [y, saved] = block.forward_train(ctx, x, &temb, /*trainable=*/true);
//     decltype(block)::param_grads pg;
//     auto g = block.backward(ctx, saved, grad_y, &pg);   // pg.conv1.weight, pg.norm1.bias, ...
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/detail/frozen.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <optional>
#include <string>
#include <utility>

namespace dynamicid::modules::blocks {

/// Hyper-parameters of ResnetBlock2D, named as diffusers names them.
struct resnet_block_config {
    index_t in_channels = 0;
    index_t out_channels = 0;      ///< 0: same as in_channels
    index_t temb_channels = 512;   ///< 0: no time embedding (the VAE's blocks)
    index_t groups = 32;           ///< GroupNorm groups of norm1
    index_t groups_out = 0;        ///< GroupNorm groups of norm2; 0: same as groups
    double eps = 1e-6;             ///< both GroupNorms' epsilon
    double output_scale_factor = 1.0;
    /// Whether the shortcut is a 1x1 convolution; unset: exactly when the channel count changes.
    std::optional<bool> use_in_shortcut{};
    bool conv_shortcut_bias = true;
};

/// diffusers ResnetBlock2D (time_embedding_norm "default").
template <class B, class T = float>
    requires computes_in<B, T>
class resnet_block {
public:
    using config = resnet_block_config;
    using tensor_type = tensor<B, T>;

    struct params {
        group_norm_layer<B, T> norm1, norm2;
        conv2d_layer<B, T> conv1, conv2;
        linear_layer<B, T> time_emb_proj;  ///< undefined weight when temb_channels == 0
        conv2d_layer<B, T> conv_shortcut;  ///< undefined weight without a 1x1 shortcut
    };
    /// Gradients of the weights, shaped like params (norm groups/eps unused).
    using param_grads = params;

    resnet_block() = default;

    /// Binds the block's weights below the binder's prefix; problems are
    /// collected in the binder (call finish() once the whole model is bound).
    static resnet_block bind(weight_binder<B, T> b, const config& c) {
        resnet_block r;
        r.config_ = normalised(c);
        const auto& n = r.config_;
        auto& p = r.params_;
        p.norm1 = group_norm_layer<B, T>::bind(b, "norm1", n.in_channels, n.groups, n.eps);
        p.conv1 = conv2d_layer<B, T>::bind(b, "conv1", n.in_channels, n.out_channels, 3, {.padding = 1});
        if (n.temb_channels > 0) p.time_emb_proj = linear_layer<B, T>::bind(b, "time_emb_proj", n.temb_channels, n.out_channels, true);
        p.norm2 = group_norm_layer<B, T>::bind(b, "norm2", n.out_channels, n.groups_out, n.eps);
        p.conv2 = conv2d_layer<B, T>::bind(b, "conv2", n.out_channels, n.out_channels, 3, {.padding = 1});
        if (*n.use_in_shortcut)
            p.conv_shortcut = conv2d_layer<B, T>::bind(b, "conv_shortcut", n.in_channels, n.out_channels, 1, {}, n.conv_shortcut_bias);
        return r;
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }
    /// The weights in the shape of param_grads (tensors share storage with the block's).
    const params& parameters() const noexcept { return params_; }

    /// f(name, weight, grad) for every weight, named by diffusers' keys below
    /// `prefix` ("conv1.weight", ...); `grads` may be null (undefined gradients).
    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        using modules::detail::visit_layer;
        visit_layer(prefix + "norm1", params_.norm1, grads ? &grads->norm1 : nullptr, f);
        visit_layer(prefix + "conv1", params_.conv1, grads ? &grads->conv1 : nullptr, f);
        visit_layer(prefix + "time_emb_proj", params_.time_emb_proj, grads ? &grads->time_emb_proj : nullptr, f);
        visit_layer(prefix + "norm2", params_.norm2, grads ? &grads->norm2 : nullptr, f);
        visit_layer(prefix + "conv2", params_.conv2, grads ? &grads->conv2 : nullptr, f);
        visit_layer(prefix + "conv_shortcut", params_.conv_shortcut, grads ? &grads->conv_shortcut : nullptr, f);
    }

    /// x (N, in_channels, H, W), temb (N, temb_channels) or null -> (N, out_channels, H, W).
    tensor_type forward(context_t<B>& ctx, const tensor_type& x, const tensor_type* temb = nullptr) const {
        const auto& c = config_;
        check<shape_error>(x.rank() == 4 && x.dim(1) == c.in_channels, "resnet_block", "input ", x.shape().str(), " is not (N, ",
                           c.in_channels, ", H, W)");
        auto h = params_.conv1(ctx, ops::silu(ctx, params_.norm1(ctx, x)));
        if (c.temb_channels > 0) {
            check<value_error>(temb && temb->defined(), "resnet_block", "this block needs a time embedding");
            check<shape_error>(temb->rank() == 2 && temb->dim(0) == x.dim(0) && temb->dim(1) == c.temb_channels, "resnet_block",
                               "time embedding ", temb->shape().str(), " is not (", x.dim(0), ", ", c.temb_channels, ")");
            const auto t = params_.time_emb_proj(ctx, ops::silu(ctx, *temb)).reshape({x.dim(0), c.out_channels, 1, 1});
            h = ops::add(ctx, h, t);
        }
        h = params_.conv2(ctx, ops::silu(ctx, params_.norm2(ctx, h)));
        const auto shortcut = *c.use_in_shortcut ? params_.conv_shortcut(ctx, x) : x;
        auto out = ops::add(ctx, shortcut, h);
        if (c.output_scale_factor != 1.0) out = ops::scale(ctx, out, 1.0 / c.output_scale_factor);
        return out;
    }

    /// What backward needs (nothing for the frozen weights beyond what input gradients use).
    struct saved {
        modules::detail::group_norm_saved<B, T> norm1, norm2;
        ops::unary_saved<B, T> act1, act2, act_temb;
        ops::conv2d_saved<B, T> conv1, conv2, conv_shortcut;
        ops::linear_saved<B, T> time_emb_proj;
        bool has_temb = false;
    };
    /// Gradients w.r.t. the inputs (temb undefined when the block has no time embedding).
    struct grads {
        tensor_type input, temb;
    };

    /// forward() keeping what backward() needs; with `trainable` also what the
    /// weight gradients need (otherwise nothing for the weights).
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& x, const tensor_type* temb = nullptr,
                                                bool trainable = false) const {
        const auto fwd = [&](context_t<B>& cx, const auto& layer, const tensor_type& in) {
            return modules::detail::layer_forward(cx, layer, in, trainable);
        };
        const auto& c = config_;
        check<shape_error>(x.rank() == 4 && x.dim(1) == c.in_channels, "resnet_block", "input ", x.shape().str(), " is not (N, ",
                           c.in_channels, ", H, W)");
        saved s;
        auto [n1, sn1] = fwd(ctx, params_.norm1, x);
        auto [a1, sa1] = ops::unary_forward(ctx, unary_op::silu, n1);
        auto [h, sc1] = fwd(ctx, params_.conv1, a1);
        s.norm1 = std::move(sn1);
        s.act1 = std::move(sa1);
        s.conv1 = std::move(sc1);
        if (c.temb_channels > 0) {
            check<value_error>(temb && temb->defined(), "resnet_block", "this block needs a time embedding");
            check<shape_error>(temb->rank() == 2 && temb->dim(0) == x.dim(0) && temb->dim(1) == c.temb_channels, "resnet_block",
                               "time embedding ", temb->shape().str(), " is not (", x.dim(0), ", ", c.temb_channels, ")");
            auto [at, sat] = ops::unary_forward(ctx, unary_op::silu, *temb);
            auto [t, stp] = fwd(ctx, params_.time_emb_proj, at);
            s.act_temb = std::move(sat);
            s.time_emb_proj = std::move(stp);
            s.has_temb = true;
            h = ops::add(ctx, h, t.reshape({x.dim(0), c.out_channels, 1, 1}));
        }
        auto [n2, sn2] = fwd(ctx, params_.norm2, h);
        auto [a2, sa2] = ops::unary_forward(ctx, unary_op::silu, n2);
        auto [h2, sc2] = fwd(ctx, params_.conv2, a2);
        s.norm2 = std::move(sn2);
        s.act2 = std::move(sa2);
        s.conv2 = std::move(sc2);
        tensor_type shortcut = x;
        if (*c.use_in_shortcut) {
            auto [y, ss] = fwd(ctx, params_.conv_shortcut, x);
            shortcut = y;
            s.conv_shortcut = std::move(ss);
        }
        auto out = ops::add(ctx, shortcut, h2);
        if (c.output_scale_factor != 1.0) out = ops::scale(ctx, out, 1.0 / c.output_scale_factor);
        return {out, std::move(s)};
    }

    /// Gradients w.r.t. x and temb for grad_output (N, out_channels, H, W);
    /// when `pg` is not null and the forward was trainable, the weight
    /// gradients are added into *pg.
    grads backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        using modules::detail::layer_backward;
        const auto& c = config_;
        check<shape_error>(grad_output.rank() == 4 && grad_output.dim(1) == c.out_channels, "resnet_block", "gradient ",
                           grad_output.shape().str(), " is not (N, ", c.out_channels, ", H, W)");
        const auto g = c.output_scale_factor != 1.0 ? ops::scale(ctx, grad_output, 1.0 / c.output_scale_factor) : grad_output;
        auto d = layer_backward(ctx, s.conv2, g, pg ? &pg->conv2 : nullptr);
        d = layer_backward(ctx, s.norm2, ops::unary_backward(ctx, s.act2, d), pg ? &pg->norm2 : nullptr);
        grads out;
        if (s.has_temb) {
            const auto dt = ops::sum(ctx, d, {2, 3}).reshape({d.dim(0), d.dim(1)});
            out.temb = ops::unary_backward(ctx, s.act_temb, layer_backward(ctx, s.time_emb_proj, dt, pg ? &pg->time_emb_proj : nullptr));
        }
        d = layer_backward(ctx, s.conv1, d, pg ? &pg->conv1 : nullptr);
        d = layer_backward(ctx, s.norm1, ops::unary_backward(ctx, s.act1, d), pg ? &pg->norm1 : nullptr);
        out.input = ops::add(ctx, d, *c.use_in_shortcut ? layer_backward(ctx, s.conv_shortcut, g, pg ? &pg->conv_shortcut : nullptr) : g);
        return out;
    }

private:
    static config normalised(config c) {
        if (c.out_channels == 0) c.out_channels = c.in_channels;
        if (c.groups_out == 0) c.groups_out = c.groups;
        if (!c.use_in_shortcut) c.use_in_shortcut = c.in_channels != c.out_channels;
        check<value_error>(c.in_channels > 0 && c.out_channels > 0 && c.temb_channels >= 0 && c.groups > 0 && c.groups_out > 0,
                           "resnet_block", "channel and group counts must be positive");
        check<value_error>(c.in_channels % c.groups == 0 && c.out_channels % c.groups_out == 0, "resnet_block", "channels (",
                           c.in_channels, ", ", c.out_channels, ") not divisible into groups (", c.groups, ", ", c.groups_out, ")");
        check<value_error>(c.output_scale_factor != 0.0, "resnet_block", "output_scale_factor must not be 0");
        check<value_error>(*c.use_in_shortcut || c.in_channels == c.out_channels, "resnet_block",
                           "an identity shortcut needs in_channels == out_channels");
        return c;
    }

    config config_{};
    params params_{};
};

}  // namespace dynamicid::modules::blocks
