// dynamicid modules: diffusers' Transformer2DModel (continuous input) and its
// BasicTransformerBlock, as SD1.x's UNet uses them.
//
//   residual = x                                    x (B, C, H, W)
//   x = GroupNorm(norm_num_groups, eps 1e-6)(x)
//   tokens = proj_in(x) as (B, H*W, inner)          1x1 conv, or linear after flattening
//   per block:  t += attn1(norm1(t))                 self-attention
//               t += attn2(norm2(t), text)           cross-attention
//               t += ff(norm3(t))                    net.0 GEGLU (proj to 2*4*inner), net.2 linear
//   out = proj_out(tokens) as (B, C, H, W) + residual
//
// Every attention layer may be replaced per call through attention_hooks:
// hooks.processors[layer] (when set) computes that layer instead of the
// default attention, and receives hooks.step. Layers are numbered in
// diffusers' attn_processors order; a standalone Transformer2DModel numbers
// its own layers transformer_blocks.0.attn1, .attn2, transformer_blocks.1.attn1, ...
//
//     auto t = dynamicid::modules::unet::transformer_2d<B>::bind(bind.scope("down_blocks.0.attentions.0"),
//         {.num_attention_heads = 8, .attention_head_dim = 40, .in_channels = 320, .cross_attention_dim = 768});
//     auto y = t.forward(ctx, x, text);      // x (B, 320, H, W), text (B, 77, 768)
//
// Training (frozen weights; trainable processors plug in through
// hooks.training_processors):
//
//     auto [y, saved] = t.forward_train(ctx, x, text, &hooks);
//     auto g = t.backward(ctx, saved, grad_y);   // g.input (B, 320, H, W), g.text (B, 77, 768)
//
// Training the model's own weights too (the default attention's
// projections included; a layer run by a processor leaves its slots alone):
//
//     auto [y, saved] = t.forward_train(ctx, x, text, &hooks, /*trainable=*/true);
//     decltype(t)::param_grads pg;
//     auto g = t.backward(ctx, saved, grad_y, &pg);
//     t.for_each_parameter(&pg, "", [](const std::string& name, const auto& weight, const auto& grad) { ... });
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/blocks/attention.hpp>
#include <dynamicid/modules/detail/frozen.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::modules::unet {

/// Per-call replacements of attention layers (DynamicID's processors plug in here).
template <class B, class T>
struct attention_hooks {
    /// processors[layer] replaces that layer; an empty entry, or a layer past
    /// the end, runs the default attention.
    std::vector<blocks::attention_processor<B, T>> processors;
    /// Passed unchanged to every processor (e.g. the sampler's step index).
    std::int64_t step = 0;
    /// Used by forward_train instead of `processors`: training_processors[layer]
    /// (when set) computes that layer and returns its backward. A layer with an
    /// inference processor but no training one cannot be differentiated
    /// (unsupported_error).
    std::vector<blocks::training_attention_processor<B, T>> training_processors{};
};

/// diffusers FeedForward with GEGLU: net.0.proj (dim -> 2 * inner), GEGLU, net.2 (inner -> dim).
template <class B, class T = float>
    requires computes_in<B, T>
class feed_forward {
public:
    using tensor_type = tensor<B, T>;
    struct params {
        linear_layer<B, T> proj, out;  ///< net.0.proj, net.2
    };
    using param_grads = params;

    feed_forward() = default;

    static feed_forward bind(weight_binder<B, T> b, index_t dim, index_t inner) {
        feed_forward f;
        f.params_.proj = linear_layer<B, T>::bind(b, "net.0.proj", dim, 2 * inner, true);
        f.params_.out = linear_layer<B, T>::bind(b, "net.2", inner, dim, true);
        return f;
    }

    const params& weights() const noexcept { return params_; }
    const params& parameters() const noexcept { return params_; }

    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        modules::detail::visit_layer(prefix + "net.0.proj", params_.proj, grads ? &grads->proj : nullptr, f);
        modules::detail::visit_layer(prefix + "net.2", params_.out, grads ? &grads->out : nullptr, f);
    }

    tensor_type forward(context_t<B>& ctx, const tensor_type& x) const {
        // diffusers' GEGLU chunks the projection into [hidden | gate], as ops::geglu expects.
        return params_.out(ctx, ops::geglu(ctx, params_.proj(ctx, x)));
    }

    struct saved {
        ops::linear_saved<B, T> proj, out;
        ops::geglu_saved<B, T> geglu;
    };

    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& x, bool trainable = false) const {
        using modules::detail::layer_forward;
        auto [p, sp] = layer_forward(ctx, params_.proj, x, trainable);
        auto [g, sg] = ops::geglu_forward(ctx, p);
        auto [y, so] = layer_forward(ctx, params_.out, g, trainable);
        return {y, saved{std::move(sp), std::move(so), std::move(sg)}};
    }

    /// Gradient w.r.t. x (weight gradients added into *pg when trainable).
    tensor_type backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        using modules::detail::layer_backward;
        return layer_backward(ctx, s.proj, ops::geglu_backward(ctx, s.geglu, layer_backward(ctx, s.out, grad_output, pg ? &pg->out : nullptr)),
                              pg ? &pg->proj : nullptr);
    }

private:
    params params_{};
};

/// Hyper-parameters of BasicTransformerBlock (SD1.x: layer_norm, geglu, no attention bias).
struct basic_transformer_block_config {
    index_t dim = 320;
    index_t num_attention_heads = 8;
    index_t attention_head_dim = 40;
    index_t cross_attention_dim = 768;
    bool attention_bias = false;
    double norm_eps = 1e-5;
    index_t ff_mult = 4;
};

/// diffusers BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward, each pre-normed with a residual.
template <class B, class T = float>
    requires computes_in<B, T>
class basic_transformer_block {
public:
    using config = basic_transformer_block_config;
    using tensor_type = tensor<B, T>;
    using attention_type = blocks::attention<B, T>;

    struct params {
        layer_norm_layer<B, T> norm1, norm2, norm3;
        attention_type attn1, attn2;
        feed_forward<B, T> ff;
    };
    /// Gradients of the weights, shaped like params (the attention layers' and
    /// the feed-forward's own params structs in place of the modules).
    struct param_grads {
        layer_norm_layer<B, T> norm1, norm2, norm3;
        typename attention_type::params attn1, attn2;
        typename feed_forward<B, T>::params ff;
    };

    /// Where this block's two attention layers sit in the processor order.
    struct layer_ids {
        index_t attn1 = 0, attn2 = 1;
        std::string attn1_name, attn2_name;  ///< diffusers attn_processors keys
    };

    basic_transformer_block() = default;

    static basic_transformer_block bind(weight_binder<B, T> b, const config& c, layer_ids ids = {}) {
        check<value_error>(c.dim > 0 && c.num_attention_heads > 0 && c.attention_head_dim > 0 && c.cross_attention_dim > 0 && c.ff_mult > 0,
                           "transformer_block", "sizes must be positive");
        basic_transformer_block t;
        t.config_ = c;
        t.ids_ = std::move(ids);
        auto& p = t.params_;
        p.norm1 = layer_norm_layer<B, T>::bind(b, "norm1", c.dim, c.norm_eps);
        p.attn1 = attention_type::bind(b.scope("attn1"), {.query_dim = c.dim, .cross_attention_dim = c.dim, .heads = c.num_attention_heads,
                                                          .dim_head = c.attention_head_dim, .bias = c.attention_bias});
        p.norm2 = layer_norm_layer<B, T>::bind(b, "norm2", c.dim, c.norm_eps);
        p.attn2 = attention_type::bind(b.scope("attn2"), {.query_dim = c.dim, .cross_attention_dim = c.cross_attention_dim,
                                                          .heads = c.num_attention_heads, .dim_head = c.attention_head_dim,
                                                          .bias = c.attention_bias});
        p.norm3 = layer_norm_layer<B, T>::bind(b, "norm3", c.dim, c.norm_eps);
        p.ff = feed_forward<B, T>::bind(b.scope("ff"), c.dim, c.dim * c.ff_mult);
        return t;
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }
    const layer_ids& layers() const noexcept { return ids_; }
    /// The weights in the shape of param_grads (tensors share storage with the block's).
    param_grads parameters() const {
        return {params_.norm1, params_.norm2, params_.norm3, params_.attn1.weights(), params_.attn2.weights(), params_.ff.weights()};
    }

    /// f(name, weight, grad) for every weight, named by diffusers' keys below `prefix`.
    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        using modules::detail::visit_layer;
        visit_layer(prefix + "norm1", params_.norm1, grads ? &grads->norm1 : nullptr, f);
        params_.attn1.for_each_parameter(grads ? &grads->attn1 : nullptr, prefix + "attn1.", f);
        visit_layer(prefix + "norm2", params_.norm2, grads ? &grads->norm2 : nullptr, f);
        params_.attn2.for_each_parameter(grads ? &grads->attn2 : nullptr, prefix + "attn2.", f);
        visit_layer(prefix + "norm3", params_.norm3, grads ? &grads->norm3 : nullptr, f);
        params_.ff.for_each_parameter(grads ? &grads->ff : nullptr, prefix + "ff.", f);
    }

    /// tokens (B, height * width, dim), text (B, L, cross_attention_dim) -> (B, height * width, dim).
    tensor_type forward(context_t<B>& ctx, const tensor_type& tokens, const tensor_type& text, index_t height, index_t width,
                        const attention_hooks<B, T>* hooks = nullptr) const {
        auto h = tokens;
        h = ops::add(ctx, run(ctx, params_.attn1, ids_.attn1, ids_.attn1_name, params_.norm1(ctx, h), nullptr, height, width, hooks), h);
        h = ops::add(ctx, run(ctx, params_.attn2, ids_.attn2, ids_.attn2_name, params_.norm2(ctx, h), &text, height, width, hooks), h);
        h = ops::add(ctx, params_.ff.forward(ctx, params_.norm3(ctx, h)), h);
        return h;
    }

    /// One attention layer's record: the default attention's saved state, or a processor's backward.
    struct attention_saved {
        typename attention_type::saved default_saved;
        blocks::attention_record<B, T> processor;  ///< processor.backward set when a processor ran
    };
    struct saved {
        modules::detail::layer_norm_saved<B, T> norm1, norm2, norm3;
        attention_saved attn1, attn2;
        typename feed_forward<B, T>::saved ff;
    };
    /// Gradients w.r.t. the tokens and the text (encoder hidden states).
    struct grads {
        tensor_type input, text;
    };

    /// forward() keeping what backward() needs; layers with a training processor in `hooks` run it.
    /// With `trainable` also what the block's own weight gradients need.
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& tokens, const tensor_type& text, index_t height,
                                                index_t width, const attention_hooks<B, T>* hooks = nullptr, bool trainable = false) const {
        using modules::detail::layer_forward;
        saved s;
        auto h = tokens;
        auto [n1, sn1] = layer_forward(ctx, params_.norm1, h, trainable);
        h = ops::add(ctx, run_train(ctx, params_.attn1, ids_.attn1, ids_.attn1_name, n1, nullptr, height, width, hooks, s.attn1, trainable),
                     h);
        auto [n2, sn2] = layer_forward(ctx, params_.norm2, h, trainable);
        h = ops::add(ctx, run_train(ctx, params_.attn2, ids_.attn2, ids_.attn2_name, n2, &text, height, width, hooks, s.attn2, trainable),
                     h);
        auto [n3, sn3] = layer_forward(ctx, params_.norm3, h, trainable);
        auto [f, sf] = params_.ff.forward_train(ctx, n3, trainable);
        h = ops::add(ctx, f, h);
        s.norm1 = std::move(sn1);
        s.norm2 = std::move(sn2);
        s.norm3 = std::move(sn3);
        s.ff = std::move(sf);
        return {h, std::move(s)};
    }

    /// Input gradients; when `pg` is not null and the forward was trainable,
    /// the block's weight gradients are added into *pg.
    grads backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        using modules::detail::layer_backward;
        auto dh = ops::add(ctx, grad_output,
                           layer_backward(ctx, s.norm3, params_.ff.backward(ctx, s.ff, grad_output, pg ? &pg->ff : nullptr),
                                          pg ? &pg->norm3 : nullptr));
        grads out;
        const auto d2 = attention_backward(ctx, params_.attn2, s.attn2, dh, pg ? &pg->attn2 : nullptr);
        out.text = d2.context;
        dh = ops::add(ctx, dh, layer_backward(ctx, s.norm2, d2.hidden_states, pg ? &pg->norm2 : nullptr));
        const auto d1 = attention_backward(ctx, params_.attn1, s.attn1, dh, pg ? &pg->attn1 : nullptr);
        out.input = ops::add(ctx, dh, layer_backward(ctx, s.norm1, modules::detail::add_grads(ctx, d1.hidden_states, d1.context),
                                                     pg ? &pg->norm1 : nullptr));
        return out;
    }

private:
    static tensor_type run(context_t<B>& ctx, const attention_type& attn, index_t layer, const std::string& name, const tensor_type& x,
                           const tensor_type* text, index_t height, index_t width, const attention_hooks<B, T>* hooks) {
        if (hooks && layer >= 0 && layer < static_cast<index_t>(hooks->processors.size()) &&
            hooks->processors[static_cast<std::size_t>(layer)]) {
            const blocks::attention_call<B, T> call{attn, x, text, height, width, layer, name, hooks->step};
            auto out = hooks->processors[static_cast<std::size_t>(layer)](ctx, call);
            check<shape_error>(out.defined() && out.shape() == x.shape(), "transformer_block", "processor for layer ", layer, " (", name,
                               ") returned ", out.defined() ? out.shape().str() : std::string("nothing"), ", expected ",
                               x.shape().str());
            return out;
        }
        return attn.forward(ctx, x, text);
    }

    static tensor_type run_train(context_t<B>& ctx, const attention_type& attn, index_t layer, const std::string& name,
                                 const tensor_type& x, const tensor_type* text, index_t height, index_t width,
                                 const attention_hooks<B, T>* hooks, attention_saved& s, bool trainable) {
        const auto idx = static_cast<std::size_t>(layer);
        if (hooks && layer >= 0 && idx < hooks->training_processors.size() && hooks->training_processors[idx]) {
            const blocks::attention_call<B, T> call{attn, x, text, height, width, layer, name, hooks->step};
            s.processor = hooks->training_processors[idx](ctx, call);
            const auto& out = s.processor.output;
            check<shape_error>(out.defined() && out.shape() == x.shape() && s.processor.backward, "transformer_block",
                               "training processor for layer ", layer, " (", name, ") returned ",
                               out.defined() ? out.shape().str() : std::string("nothing"), s.processor.backward ? "" : " without a backward",
                               ", expected ", x.shape().str());
            return out;
        }
        check<unsupported_error>(!(hooks && layer >= 0 && idx < hooks->processors.size() && hooks->processors[idx]),
                                 "transformer_block", "layer ", layer, " (", name,
                                 ") has an inference processor but no training processor: it cannot be differentiated");
        auto [y, saved] = attn.forward_train(ctx, x, text, trainable);
        s.default_saved = std::move(saved);
        return y;
    }

    static blocks::attention_input_grads<B, T> attention_backward(context_t<B>& ctx, const attention_type& attn, const attention_saved& s,
                                                                  const tensor_type& g, typename attention_type::param_grads* pg) {
        if (s.processor.backward) return s.processor.backward(ctx, g);
        auto d = attn.backward(ctx, s.default_saved, g, pg);
        return {d.input, d.context};
    }

    config config_{};
    layer_ids ids_{};
    params params_{};
};

/// Hyper-parameters of Transformer2DModel (continuous input), named as diffusers names them.
struct transformer_2d_config {
    index_t num_attention_heads = 8;
    index_t attention_head_dim = 40;
    index_t in_channels = 320;
    index_t num_layers = 1;
    index_t cross_attention_dim = 768;
    index_t norm_num_groups = 32;
    bool use_linear_projection = false;
    bool attention_bias = false;
    double norm_eps = 1e-5;  ///< the blocks' LayerNorms (the input GroupNorm's is fixed at 1e-6)
};

/// diffusers Transformer2DModel on an image: GroupNorm, proj_in, transformer blocks, proj_out, residual.
template <class B, class T = float>
    requires computes_in<B, T>
class transformer_2d {
public:
    using config = transformer_2d_config;
    using tensor_type = tensor<B, T>;
    using block_type = basic_transformer_block<B, T>;

    struct params {
        group_norm_layer<B, T> norm;
        linear_layer<B, T> proj_in_linear, proj_out_linear;  ///< with use_linear_projection
        conv2d_layer<B, T> proj_in_conv, proj_out_conv;      ///< 1x1 convolutions otherwise
        std::vector<block_type> transformer_blocks;
    };
    /// Gradients of the weights, shaped like params (each block's param_grads in place of the block).
    struct param_grads {
        group_norm_layer<B, T> norm;
        linear_layer<B, T> proj_in_linear, proj_out_linear;
        conv2d_layer<B, T> proj_in_conv, proj_out_conv;
        std::vector<typename block_type::param_grads> transformer_blocks;
    };

    transformer_2d() = default;

    /// `first_layer` is the processor index of transformer_blocks.0.attn1, and
    /// `name_prefix` this model's path in the UNet ("down_blocks.0.attentions.0.").
    static transformer_2d bind(weight_binder<B, T> b, const config& c, index_t first_layer = 0, const std::string& name_prefix = "") {
        check<value_error>(c.num_attention_heads > 0 && c.attention_head_dim > 0 && c.in_channels > 0 && c.num_layers >= 1 &&
                               c.norm_num_groups > 0 && c.in_channels % c.norm_num_groups == 0,
                           "transformer_2d", "bad sizes: ", c.in_channels, " channels, ", c.norm_num_groups, " groups, ",
                           c.num_attention_heads, " heads of ", c.attention_head_dim, ", ", c.num_layers, " layers");
        transformer_2d t;
        t.config_ = c;
        const index_t inner = c.num_attention_heads * c.attention_head_dim;
        auto& p = t.params_;
        p.norm = group_norm_layer<B, T>::bind(b, "norm", c.in_channels, c.norm_num_groups, 1e-6);
        if (c.use_linear_projection) {
            p.proj_in_linear = linear_layer<B, T>::bind(b, "proj_in", c.in_channels, inner, true);
            p.proj_out_linear = linear_layer<B, T>::bind(b, "proj_out", inner, c.in_channels, true);
        } else {
            p.proj_in_conv = conv2d_layer<B, T>::bind(b, "proj_in", c.in_channels, inner, 1);
            p.proj_out_conv = conv2d_layer<B, T>::bind(b, "proj_out", inner, c.in_channels, 1);
        }
        const basic_transformer_block_config bc{.dim = inner, .num_attention_heads = c.num_attention_heads, .attention_head_dim = c.attention_head_dim,
                                    .cross_attention_dim = c.cross_attention_dim, .attention_bias = c.attention_bias,
                                    .norm_eps = c.norm_eps};
        for (index_t i = 0; i < c.num_layers; ++i) {
            const std::string block = name_prefix + "transformer_blocks." + std::to_string(i) + ".";
            typename block_type::layer_ids ids{first_layer + 2 * i, first_layer + 2 * i + 1, block + "attn1.processor",
                                               block + "attn2.processor"};
            p.transformer_blocks.push_back(block_type::bind(b.scope("transformer_blocks", i), bc, std::move(ids)));
        }
        return t;
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }
    /// The weights in the shape of param_grads (tensors share storage with the model's).
    param_grads parameters() const {
        param_grads p{params_.norm, params_.proj_in_linear, params_.proj_out_linear, params_.proj_in_conv, params_.proj_out_conv, {}};
        for (const auto& b : params_.transformer_blocks) p.transformer_blocks.push_back(b.parameters());
        return p;
    }

    /// f(name, weight, grad) for every weight, named by diffusers' keys below `prefix`.
    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        using modules::detail::visit_layer;
        visit_layer(prefix + "norm", params_.norm, grads ? &grads->norm : nullptr, f);
        visit_layer(prefix + "proj_in", params_.proj_in_linear, grads ? &grads->proj_in_linear : nullptr, f);
        visit_layer(prefix + "proj_in", params_.proj_in_conv, grads ? &grads->proj_in_conv : nullptr, f);
        for (std::size_t i = 0; i < params_.transformer_blocks.size(); ++i)
            params_.transformer_blocks[i].for_each_parameter(modules::detail::entry_of(grads ? &grads->transformer_blocks : nullptr, i),
                                                             prefix + "transformer_blocks." + std::to_string(i) + ".", f);
        visit_layer(prefix + "proj_out", params_.proj_out_linear, grads ? &grads->proj_out_linear : nullptr, f);
        visit_layer(prefix + "proj_out", params_.proj_out_conv, grads ? &grads->proj_out_conv : nullptr, f);
    }

    /// Attention layers in this model (two per transformer block).
    index_t attention_layer_count() const noexcept { return 2 * config_.num_layers; }

    /// x (B, in_channels, H, W), text (B, L, cross_attention_dim) -> (B, in_channels, H, W).
    tensor_type forward(context_t<B>& ctx, const tensor_type& x, const tensor_type& text, const attention_hooks<B, T>* hooks = nullptr) const {
        const auto& c = config_;
        check<shape_error>(x.rank() == 4 && x.dim(1) == c.in_channels, "transformer_2d", "input ", x.shape().str(), " is not (B, ",
                           c.in_channels, ", H, W)");
        check<shape_error>(text.rank() == 3 && text.dim(0) == x.dim(0) && text.dim(2) == c.cross_attention_dim, "transformer_2d",
                           "encoder_hidden_states ", text.shape().str(), " is not (", x.dim(0), ", L, ", c.cross_attention_dim, ")");
        const index_t batch = x.dim(0), height = x.dim(2), width = x.dim(3);
        const auto normed = params_.norm(ctx, x);
        tensor_type tokens;
        if (c.use_linear_projection) {
            tokens = params_.proj_in_linear(ctx, to_tokens(ctx, normed));
        } else {
            tokens = to_tokens(ctx, params_.proj_in_conv(ctx, normed));
        }
        for (const auto& block : params_.transformer_blocks) tokens = block.forward(ctx, tokens, text, height, width, hooks);
        tensor_type out;
        if (c.use_linear_projection) {
            out = to_image(ctx, params_.proj_out_linear(ctx, tokens), batch, height, width);
        } else {
            out = params_.proj_out_conv(ctx, to_image(ctx, tokens, batch, height, width));
        }
        return ops::add(ctx, out, x);
    }

    struct saved {
        modules::detail::group_norm_saved<B, T> norm;
        ops::linear_saved<B, T> proj_in_linear, proj_out_linear;
        ops::conv2d_saved<B, T> proj_in_conv, proj_out_conv;
        std::vector<typename block_type::saved> blocks;
        index_t batch = 0, height = 0, width = 0;
    };
    /// Gradients w.r.t. the image and the text (encoder hidden states).
    struct grads {
        tensor_type input, text;
    };

    /// forward() keeping what backward() needs; with `trainable` also what the weight gradients need.
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& x, const tensor_type& text,
                                                const attention_hooks<B, T>* hooks = nullptr, bool trainable = false) const {
        const auto fwd = [trainable](context_t<B>& cx, const auto& layer, const tensor_type& in) {
            return modules::detail::layer_forward(cx, layer, in, trainable);
        };
        const auto& c = config_;
        check<shape_error>(x.rank() == 4 && x.dim(1) == c.in_channels, "transformer_2d", "input ", x.shape().str(), " is not (B, ",
                           c.in_channels, ", H, W)");
        check<shape_error>(text.rank() == 3 && text.dim(0) == x.dim(0) && text.dim(2) == c.cross_attention_dim, "transformer_2d",
                           "encoder_hidden_states ", text.shape().str(), " is not (", x.dim(0), ", L, ", c.cross_attention_dim, ")");
        saved s;
        s.batch = x.dim(0);
        s.height = x.dim(2);
        s.width = x.dim(3);
        auto [normed, sn] = fwd(ctx, params_.norm, x);
        s.norm = std::move(sn);
        tensor_type tokens;
        if (c.use_linear_projection) {
            auto [t, sp] = fwd(ctx, params_.proj_in_linear, to_tokens(ctx, normed));
            tokens = t;
            s.proj_in_linear = std::move(sp);
        } else {
            auto [t, sp] = fwd(ctx, params_.proj_in_conv, normed);
            tokens = to_tokens(ctx, t);
            s.proj_in_conv = std::move(sp);
        }
        for (const auto& block : params_.transformer_blocks) {
            auto [t, sb] = block.forward_train(ctx, tokens, text, s.height, s.width, hooks, trainable);
            tokens = t;
            s.blocks.push_back(std::move(sb));
        }
        tensor_type out;
        if (c.use_linear_projection) {
            auto [y, sp] = fwd(ctx, params_.proj_out_linear, tokens);
            out = to_image(ctx, y, s.batch, s.height, s.width);
            s.proj_out_linear = std::move(sp);
        } else {
            auto [y, sp] = fwd(ctx, params_.proj_out_conv, to_image(ctx, tokens, s.batch, s.height, s.width));
            out = y;
            s.proj_out_conv = std::move(sp);
        }
        return {ops::add(ctx, out, x), std::move(s)};
    }

    /// Input gradients; when `pg` is not null and the forward was trainable,
    /// the model's weight gradients are added into *pg.
    grads backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        using modules::detail::layer_backward;
        check<shape_error>(grad_output.shape() == shape{s.batch, config_.in_channels, s.height, s.width}, "transformer_2d", "gradient ",
                           grad_output.shape().str(), " does not match the forward");
        tensor_type d_tokens;
        if (config_.use_linear_projection)
            d_tokens = layer_backward(ctx, s.proj_out_linear, to_tokens(ctx, grad_output), pg ? &pg->proj_out_linear : nullptr);
        else
            d_tokens = to_tokens(ctx, layer_backward(ctx, s.proj_out_conv, grad_output, pg ? &pg->proj_out_conv : nullptr));
        grads out;
        for (std::size_t i = s.blocks.size(); i-- > 0;) {
            auto d = params_.transformer_blocks[i].backward(
                ctx, s.blocks[i], d_tokens, modules::detail::slot_of(pg ? &pg->transformer_blocks : nullptr, i, s.blocks.size()));
            d_tokens = d.input;
            out.text = modules::detail::add_grads(ctx, out.text, d.text);
        }
        tensor_type d_normed;
        if (config_.use_linear_projection)
            d_normed = to_image(ctx, layer_backward(ctx, s.proj_in_linear, d_tokens, pg ? &pg->proj_in_linear : nullptr), s.batch, s.height,
                                s.width);
        else
            d_normed = layer_backward(ctx, s.proj_in_conv, to_image(ctx, d_tokens, s.batch, s.height, s.width),
                                      pg ? &pg->proj_in_conv : nullptr);
        out.input = ops::add(ctx, layer_backward(ctx, s.norm, d_normed, pg ? &pg->norm : nullptr), grad_output);
        return out;
    }

private:
    /// (B, C, H, W) -> (B, H*W, C)
    static tensor_type to_tokens(context_t<B>& ctx, const tensor_type& x) {
        return ops::permute(ctx, x.reshape({x.dim(0), x.dim(1), x.dim(2) * x.dim(3)}), {0, 2, 1});
    }
    /// (B, H*W, C) -> (B, C, H, W)
    static tensor_type to_image(context_t<B>& ctx, const tensor_type& t, index_t batch, index_t height, index_t width) {
        return ops::permute(ctx, t, {0, 2, 1}).reshape({batch, t.dim(2), height, width});
    }

    config config_{};
    params params_{};
};

}  // namespace dynamicid::modules::unet
