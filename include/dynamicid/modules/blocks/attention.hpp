// dynamicid modules: diffusers' Attention (multi-head scaled dot-product
// attention with its projections), as SD1.x's transformer blocks and the VAE's
// mid-block use it.
//
// On tokens x (B, N, query_dim), with context c (B, L, cross_attention_dim)
// for cross-attention or c = x for self-attention:
//
//   residual = x
//   x   = group_norm(x over channels)             (when norm_num_groups > 0; the VAE)
//   q   = to_q(x), k = to_k(c), v = to_v(c)       (bias optional)
//   o   = softmax(q_h k_h^T / sqrt(dim_head)) v_h  for each of `heads` heads
//   out = to_out.0(o)                             (with bias by default)
//   out = (out + residual) / rescale_output_factor (residual_connection; the VAE)
//
// Heads are split as diffusers does: (B, N, heads * dim_head) -> (B, heads, N,
// dim_head). Weights bind by diffusers' keys: to_q, to_k, to_v, to_out.0,
// group_norm.
//
//     // SD1.5 first-level cross-attention: 8 heads of 40, context width 768
//     auto attn = dynamicid::modules::blocks::attention<B>::bind(
//         bind.scope("attn2"), {.query_dim = 320, .cross_attention_dim = 768, .heads = 8, .dim_head = 40});
//     auto y = attn.forward(ctx, x, &text);           // x (B, N, 320), text (B, 77, 768)
//
//     // VAE mid-block spatial attention: one head over 512 channels, GroupNorm(32), residual
//     auto vae_attn = dynamicid::modules::blocks::attention<B>::bind(bind.scope("mid_block.attentions.0"),
//         {.query_dim = 512, .heads = 1, .dim_head = 512, .bias = true, .norm_num_groups = 32, .norm_eps = 1e-6,
//          .residual_connection = true});
//     auto z = vae_attn.forward_spatial(ctx, h);      // h (B, 512, H, W)
//
// Training on tokens (frozen projections: input gradients only):
//
//     auto [y, saved] = attn.forward_train(ctx, x, &text);
//     auto g = attn.backward(ctx, saved, grad_y);     // g.input (B, N, 320), g.context (B, 77, 768)
//
// Training the projections too (gradients add into a params-shaped struct):
//
//     auto [y, saved] = attn.forward_train(ctx, x, &text, /*trainable=*/true);
//     decltype(attn)::param_grads pg;
//     auto g = attn.backward(ctx, saved, grad_y, &pg);   // pg.to_q.weight, pg.to_out.bias, ...
//
// The VAE's spatial variant (group norm and residual included):
//
//     auto [z, saved] = vae_attn.forward_spatial_train(ctx, h, /*trainable=*/true);
//     auto dh = vae_attn.backward_spatial(ctx, saved, grad_z, &pg);   // (B, 512, H, W)
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/detail/frozen.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>

namespace dynamicid::modules::blocks {

/// Hyper-parameters of diffusers' Attention, named as diffusers names them.
struct attention_config {
    index_t query_dim = 0;
    index_t cross_attention_dim = 0;  ///< context width; 0: query_dim (self-attention)
    index_t heads = 8;
    index_t dim_head = 64;
    bool bias = false;      ///< bias on to_q, to_k, to_v
    bool out_bias = true;   ///< bias on to_out.0
    index_t norm_num_groups = 0;  ///< > 0: GroupNorm over channels before the projections
    double norm_eps = 1e-5;
    bool residual_connection = false;
    double rescale_output_factor = 1.0;
};

/// diffusers Attention with its default processor (AttnProcessor2_0 semantics).
template <class B, class T = float>
    requires computes_in<B, T>
class attention {
public:
    using config = attention_config;
    using tensor_type = tensor<B, T>;

    struct params {
        group_norm_layer<B, T> group_norm;  ///< undefined weights when norm_num_groups == 0
        linear_layer<B, T> to_q, to_k, to_v;
        linear_layer<B, T> to_out;  ///< diffusers' to_out.0 (to_out.1 is dropout)
    };
    /// Gradients of the weights, shaped like params.
    using param_grads = params;

    attention() = default;

    static attention bind(weight_binder<B, T> b, const config& c) {
        attention a;
        a.config_ = normalised(c);
        const auto& n = a.config_;
        const index_t inner = n.heads * n.dim_head;
        auto& p = a.params_;
        if (n.norm_num_groups > 0) p.group_norm = group_norm_layer<B, T>::bind(b, "group_norm", n.query_dim, n.norm_num_groups, n.norm_eps);
        p.to_q = linear_layer<B, T>::bind(b, "to_q", n.query_dim, inner, n.bias);
        p.to_k = linear_layer<B, T>::bind(b, "to_k", n.cross_attention_dim, inner, n.bias);
        p.to_v = linear_layer<B, T>::bind(b, "to_v", n.cross_attention_dim, inner, n.bias);
        p.to_out = linear_layer<B, T>::bind(b, "to_out.0", inner, n.query_dim, n.out_bias);
        return a;
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }
    /// The weights in the shape of param_grads (tensors share storage with the layer's).
    const params& parameters() const noexcept { return params_; }

    /// f(name, weight, grad) for every weight, named by diffusers' keys below
    /// `prefix` ("to_q.weight", "to_out.0.bias", ...); `grads` may be null.
    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        using modules::detail::visit_layer;
        visit_layer(prefix + "group_norm", params_.group_norm, grads ? &grads->group_norm : nullptr, f);
        visit_layer(prefix + "to_q", params_.to_q, grads ? &grads->to_q : nullptr, f);
        visit_layer(prefix + "to_k", params_.to_k, grads ? &grads->to_k : nullptr, f);
        visit_layer(prefix + "to_v", params_.to_v, grads ? &grads->to_v : nullptr, f);
        visit_layer(prefix + "to_out.0", params_.to_out, grads ? &grads->to_out : nullptr, f);
    }

    index_t inner_dim() const noexcept { return config_.heads * config_.dim_head; }

    /// Attention.forward on tokens: x (B, N, query_dim), context (B, L,
    /// cross_attention_dim) or null for self-attention -> (B, N, query_dim).
    tensor_type forward(context_t<B>& ctx, const tensor_type& x, const tensor_type* context = nullptr) const {
        check_tokens(x);
        auto h = x;
        if (config_.norm_num_groups > 0)
            h = ops::permute(ctx, params_.group_norm(ctx, ops::permute(ctx, x, {0, 2, 1})), {0, 2, 1});
        auto out = attend(ctx, h, context ? *context : h);
        return finish_residual(ctx, out, x);
    }

    /// Attention.forward on an image x (B, query_dim, H, W), as the VAE calls
    /// it: the pixels are the tokens; returns (B, query_dim, H, W).
    tensor_type forward_spatial(context_t<B>& ctx, const tensor_type& x) const {
        check<shape_error>(x.rank() == 4 && x.dim(1) == config_.query_dim, "attention", "input ", x.shape().str(), " is not (B, ",
                           config_.query_dim, ", H, W)");
        const index_t batch = x.dim(0), channels = x.dim(1), height = x.dim(2), width = x.dim(3);
        // GroupNorm of NCHW equals diffusers' norm of the transposed tokens, without the transposes.
        const auto normed = config_.norm_num_groups > 0 ? params_.group_norm(ctx, x) : x;
        const auto tokens = ops::permute(ctx, normed.reshape({batch, channels, height * width}), {0, 2, 1});
        const auto out = attend(ctx, tokens, tokens);
        const auto image = ops::permute(ctx, out, {0, 2, 1}).reshape({batch, channels, height, width});
        return finish_residual(ctx, image, x);
    }

    /// The projections, the multi-head attention and to_out, without the
    /// group norm or residual: x (B, N, query_dim), context (B, L, cross) -> (B, N, query_dim).
    tensor_type attend(context_t<B>& ctx, const tensor_type& x, const tensor_type& context) const {
        check_tokens(x);
        check<shape_error>(context.rank() == 3 && context.dim(0) == x.dim(0) && context.dim(2) == config_.cross_attention_dim,
                           "attention", "context ", context.shape().str(), " is not (", x.dim(0), ", L, ", config_.cross_attention_dim,
                           ")");
        const auto q = params_.to_q(ctx, x);
        const auto k = params_.to_k(ctx, context);
        const auto v = params_.to_v(ctx, context);
        return params_.to_out(ctx, multi_head(ctx, q, k, v));
    }

    /// softmax(q k^T / sqrt(dim_head)) v per head, on projected q (B, N, inner),
    /// k and v (B, L, inner) -> (B, N, inner). Exposed for processors that
    /// change the projections (LoRA, extra identity keys) but not the attention.
    tensor_type multi_head(context_t<B>& ctx, const tensor_type& q, const tensor_type& k, const tensor_type& v) const {
        const index_t batch = q.dim(0), n = q.dim(1);
        const double scale = 1.0 / std::sqrt(static_cast<double>(config_.dim_head));
        const auto o = ops::attention(ctx, split_heads(ctx, q), split_heads(ctx, k), split_heads(ctx, v), scale);
        return merge_heads(ctx, o, batch, n);
    }

    /// (B, N, heads * dim_head) -> (B * heads, N, dim_head)
    tensor_type split_heads(context_t<B>& ctx, const tensor_type& t) const {
        check<shape_error>(t.rank() == 3 && t.dim(2) == inner_dim(), "attention", "projection ", t.shape().str(), " is not (B, N, ",
                           inner_dim(), ")");
        const index_t batch = t.dim(0), n = t.dim(1);
        return ops::permute(ctx, t.reshape({batch, n, config_.heads, config_.dim_head}), {0, 2, 1, 3})
            .reshape({batch * config_.heads, n, config_.dim_head});
    }

    /// (B * heads, N, dim_head) -> (B, N, heads * dim_head)
    tensor_type merge_heads(context_t<B>& ctx, const tensor_type& t, index_t batch, index_t n) const {
        return ops::permute(ctx, t.reshape({batch, config_.heads, n, config_.dim_head}), {0, 2, 1, 3}).reshape({batch, n, inner_dim()});
    }

    /// What backward needs: the projections' inputs are kept only when trainable.
    struct saved {
        ops::linear_saved<B, T> to_q, to_k, to_v, to_out;
        ops::attention_saved<B, T> attention;
        bool self_attention = true;
        index_t batch = 0, queries = 0, keys = 0;
    };
    /// Gradients w.r.t. the tokens and the context (undefined for self-attention).
    struct grads {
        tensor_type input, context;
    };

    /// forward() on tokens keeping what backward() needs (the group-norm
    /// variant is not differentiable here: see forward_spatial_train). With
    /// `trainable` the projections' inputs are kept for their weight gradients.
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& x, const tensor_type* context = nullptr,
                                                bool trainable = false) const {
        check_tokens(x);
        check<unsupported_error>(config_.norm_num_groups == 0, "attention", "training through the group-norm variant is not supported");
        const tensor_type& c = context ? *context : x;
        check<shape_error>(c.rank() == 3 && c.dim(0) == x.dim(0) && c.dim(2) == config_.cross_attention_dim, "attention", "context ",
                           c.shape().str(), " is not (", x.dim(0), ", L, ", config_.cross_attention_dim, ")");
        auto [out, s] = attend_train(ctx, x, c, context == nullptr, trainable);
        return {finish_residual(ctx, out, x), std::move(s)};
    }

    /// Gradients for grad_output (B, N, query_dim); when `pg` is not null and
    /// the forward was trainable, the projections' gradients are added into *pg.
    grads backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        check<shape_error>(grad_output.shape() == shape{s.batch, s.queries, config_.query_dim}, "attention", "gradient ",
                           grad_output.shape().str(), " is not (", s.batch, ", ", s.queries, ", ", config_.query_dim, ")");
        const auto g = config_.rescale_output_factor != 1.0 ? ops::scale(ctx, grad_output, 1.0 / config_.rescale_output_factor)
                                                            : grad_output;
        auto out = attend_backward(ctx, s, g, pg);
        if (config_.residual_connection) out.input = ops::add(ctx, out.input, g);
        return out;
    }

    /// What backward_spatial needs.
    struct spatial_saved {
        modules::detail::group_norm_saved<B, T> norm;
        saved attention;
        bool normed = false;
        index_t batch = 0, channels = 0, height = 0, width = 0;
    };

    /// forward_spatial() keeping what backward_spatial() needs (the VAE's
    /// mid-block attention: group norm, self-attention over the pixels,
    /// residual). With `trainable` also what the weight gradients need.
    std::pair<tensor_type, spatial_saved> forward_spatial_train(context_t<B>& ctx, const tensor_type& x, bool trainable = false) const {
        check<shape_error>(x.rank() == 4 && x.dim(1) == config_.query_dim, "attention", "input ", x.shape().str(), " is not (B, ",
                           config_.query_dim, ", H, W)");
        spatial_saved s;
        s.batch = x.dim(0);
        s.channels = x.dim(1);
        s.height = x.dim(2);
        s.width = x.dim(3);
        tensor_type normed = x;
        if (config_.norm_num_groups > 0) {
            auto [n, sn] = modules::detail::layer_forward(ctx, params_.group_norm, x, trainable);
            normed = n;
            s.norm = std::move(sn);
            s.normed = true;
        }
        const auto tokens = ops::permute(ctx, normed.reshape({s.batch, s.channels, s.height * s.width}), {0, 2, 1});
        auto [out, sa] = attend_train(ctx, tokens, tokens, true, trainable);
        s.attention = std::move(sa);
        const auto image = ops::permute(ctx, out, {0, 2, 1}).reshape({s.batch, s.channels, s.height, s.width});
        return {finish_residual(ctx, image, x), std::move(s)};
    }

    /// Gradient w.r.t. the image for grad_output (B, query_dim, H, W); weight
    /// gradients are added into *pg as in backward().
    tensor_type backward_spatial(context_t<B>& ctx, const spatial_saved& s, const tensor_type& grad_output,
                                 param_grads* pg = nullptr) const {
        check<shape_error>(grad_output.shape() == shape{s.batch, s.channels, s.height, s.width}, "attention", "gradient ",
                           grad_output.shape().str(), " does not match the forward");
        const auto g = config_.rescale_output_factor != 1.0 ? ops::scale(ctx, grad_output, 1.0 / config_.rescale_output_factor)
                                                            : grad_output;
        const auto g_tokens = ops::permute(ctx, g.reshape({s.batch, s.channels, s.height * s.width}), {0, 2, 1});
        const auto d = attend_backward(ctx, s.attention, g_tokens, pg);
        auto d_image = ops::permute(ctx, d.input, {0, 2, 1}).reshape({s.batch, s.channels, s.height, s.width});
        if (s.normed) d_image = modules::detail::layer_backward(ctx, s.norm, d_image, pg ? &pg->group_norm : nullptr);
        if (config_.residual_connection) d_image = ops::add(ctx, d_image, g);
        return d_image;
    }

private:
    /// The projections, attention and to_out of a training forward (no norm, no residual).
    std::pair<tensor_type, saved> attend_train(context_t<B>& ctx, const tensor_type& x, const tensor_type& c, bool self_attention,
                                               bool trainable) const {
        using modules::detail::layer_forward;
        saved s;
        s.self_attention = self_attention;
        s.batch = x.dim(0);
        s.queries = x.dim(1);
        s.keys = c.dim(1);
        auto [q, sq] = layer_forward(ctx, params_.to_q, x, trainable);
        auto [k, sk] = layer_forward(ctx, params_.to_k, c, trainable);
        auto [v, sv] = layer_forward(ctx, params_.to_v, c, trainable);
        const double scale = 1.0 / std::sqrt(static_cast<double>(config_.dim_head));
        auto [o, sa] = ops::attention_forward(ctx, split_heads(ctx, q), split_heads(ctx, k), split_heads(ctx, v), scale);
        auto [out, so] = layer_forward(ctx, params_.to_out, merge_heads(ctx, o, s.batch, s.queries), trainable);
        s.to_q = std::move(sq);
        s.to_k = std::move(sk);
        s.to_v = std::move(sv);
        s.attention = std::move(sa);
        s.to_out = std::move(so);
        return {out, std::move(s)};
    }

    /// Backward of attend_train for the gradient of its output (already divided by rescale_output_factor).
    grads attend_backward(context_t<B>& ctx, const saved& s, const tensor_type& g, param_grads* pg) const {
        using modules::detail::layer_backward;
        const auto d_heads = split_heads(ctx, layer_backward(ctx, s.to_out, g, pg ? &pg->to_out : nullptr));
        const auto d = ops::attention_backward(ctx, s.attention, d_heads);
        grads out;
        out.input = layer_backward(ctx, s.to_q, merge_heads(ctx, d.q, s.batch, s.queries), pg ? &pg->to_q : nullptr);
        auto dc = ops::add(ctx, layer_backward(ctx, s.to_k, merge_heads(ctx, d.k, s.batch, s.keys), pg ? &pg->to_k : nullptr),
                           layer_backward(ctx, s.to_v, merge_heads(ctx, d.v, s.batch, s.keys), pg ? &pg->to_v : nullptr));
        if (s.self_attention) out.input = ops::add(ctx, out.input, dc);
        else out.context = std::move(dc);
        return out;
    }

    void check_tokens(const tensor_type& x) const {
        check<shape_error>(x.rank() == 3 && x.dim(2) == config_.query_dim, "attention", "input ", x.shape().str(), " is not (B, N, ",
                           config_.query_dim, ")");
    }

    tensor_type finish_residual(context_t<B>& ctx, tensor_type out, const tensor_type& residual) const {
        if (config_.residual_connection) out = ops::add(ctx, out, residual);
        if (config_.rescale_output_factor != 1.0) out = ops::scale(ctx, out, 1.0 / config_.rescale_output_factor);
        return out;
    }

    static config normalised(config c) {
        if (c.cross_attention_dim == 0) c.cross_attention_dim = c.query_dim;
        check<value_error>(c.query_dim > 0 && c.cross_attention_dim > 0 && c.heads > 0 && c.dim_head > 0 && c.norm_num_groups >= 0,
                           "attention", "sizes must be positive (query_dim ", c.query_dim, ", heads ", c.heads, ", dim_head ",
                           c.dim_head, ")");
        check<value_error>(c.norm_num_groups == 0 || c.query_dim % c.norm_num_groups == 0, "attention", c.query_dim,
                           " channels not divisible into ", c.norm_num_groups, " groups");
        check<value_error>(c.rescale_output_factor != 0.0, "attention", "rescale_output_factor must not be 0");
        return c;
    }

    config config_{};
    params params_{};
};

/// What an attention processor receives for one call of one attention layer.
///
/// `hidden_states` is the layer's (already layer-normalised) input (B, N,
/// query_dim); `context` is null for self-attention (attn1) and the encoder
/// hidden states (B, L, cross) for cross-attention (attn2). `height` x `width`
/// is the latent token grid (N == height * width). `layer` is the layer's
/// position in diffusers' `unet.attn_processors` order, `name` its key there
/// (e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"),
/// and `step` the caller's per-call counter, passed through unchanged.
template <class B, class T>
struct attention_call {
    const attention<B, T>& attn;
    const tensor<B, T>& hidden_states;
    const tensor<B, T>* context = nullptr;
    index_t height = 0, width = 0;
    index_t layer = 0;
    std::string_view name;
    std::int64_t step = 0;
};

/// Replaces an attention layer's computation (diffusers' attention processor):
/// returns what Attention.forward would, (B, N, query_dim). The default is
/// `call.attn.forward(ctx, call.hidden_states, call.context)`.
template <class B, class T>
using attention_processor = std::function<tensor<B, T>(context_t<B>&, const attention_call<B, T>&)>;

/// Gradients an attention layer's backward returns: w.r.t. its
/// hidden_states and, for cross-attention, its context.
template <class B, class T>
struct attention_input_grads {
    tensor<B, T> hidden_states, context;
};

/// What a training processor returns for one call: the output and the
/// backward of this very call (a closure owning the call's saved state).
/// The backward returns input gradients and delivers the processor's own
/// parameter gradients wherever the processor was told to (e.g. a
/// training::parameter_gradients board).
template <class B, class T>
struct attention_record {
    tensor<B, T> output;
    std::function<attention_input_grads<B, T>(context_t<B>&, const tensor<B, T>&)> backward;
};

/// The training variant of attention_processor.
///
///     blocks::training_attention_processor<B, float> p = [](auto& ctx, const auto& call) {
///         auto [y, saved] = call.attn.forward_train(ctx, call.hidden_states, call.context);
///         return blocks::attention_record<B, float>{y, [&attn = call.attn, saved](auto& ctx, const auto& g) {
///             auto d = attn.backward(ctx, saved, g);
///             return blocks::attention_input_grads<B, float>{d.input, d.context};
///         }};
///     };
template <class B, class T>
using training_attention_processor = std::function<attention_record<B, T>(context_t<B>&, const attention_call<B, T>&)>;

}  // namespace dynamicid::modules::blocks
