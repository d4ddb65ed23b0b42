// dynamicid modules: the transformer stack shared by CLIP's text and vision
// towers (transformers' CLIPEncoder / CLIPEncoderLayer).
//
// One layer, on tokens x (B, L, hidden):
//
//   h = x + out_proj(attention(layer_norm1(x)))      q/k/v/out_proj with biases,
//                                                     heads of hidden / heads,
//                                                     scale head_dim^-0.5,
//                                                     causal for the text tower
//   y = h + fc2(act(fc1(layer_norm2(h))))            act: config hidden_act
//
// Weights bind by transformers' keys below the encoder:
// "layers.<i>.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}".
//
//     dynamicid::modules::clip::encoder_config cfg{.hidden_size = 768, .intermediate_size = 3072,
//                                                  .num_attention_heads = 12, .num_hidden_layers = 12};
//     auto enc = dynamicid::modules::clip::encoder<B>::bind(binder.scope("encoder"), cfg);
//     tensor<B, float> penultimate;
//     auto y = enc.forward(ctx, x, /*causal=*/false, &penultimate);  // penultimate = hidden_states[-2]
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace dynamicid::modules::clip {

/// transformers' ACT2FN name -> the pointwise op. "gelu" is the exact erf
/// form; "gelu_new", "gelu_pytorch_tanh" and "gelu_fast" the tanh one.
inline unary_op activation_of(std::string_view hidden_act) {
    if (hidden_act == "quick_gelu") return unary_op::quick_gelu;
    if (hidden_act == "gelu") return unary_op::gelu_erf;
    if (hidden_act == "gelu_new" || hidden_act == "gelu_pytorch_tanh" || hidden_act == "gelu_fast") return unary_op::gelu_tanh;
    if (hidden_act == "relu") return unary_op::relu;
    if (hidden_act == "silu" || hidden_act == "swish") return unary_op::silu;
    throw value_error("clip", "unsupported hidden_act '" + std::string(hidden_act) + "'");
}

/// The sizes both towers' encoders share (named as transformers' configs name them).
struct encoder_config {
    index_t hidden_size = 768;
    index_t intermediate_size = 3072;
    index_t num_attention_heads = 12;
    index_t num_hidden_layers = 12;
    double layer_norm_eps = 1e-5;
    std::string hidden_act = "quick_gelu";

    /// Throws value_error for non-positive sizes, heads that do not divide
    /// the width, or an unknown activation.
    void validate() const {
        check<value_error>(hidden_size > 0 && intermediate_size > 0 && num_attention_heads > 0 && num_hidden_layers >= 0, "clip",
                           "encoder sizes must be positive (hidden ", hidden_size, ", intermediate ", intermediate_size, ", heads ",
                           num_attention_heads, ", layers ", num_hidden_layers, ")");
        check<value_error>(hidden_size % num_attention_heads == 0, "clip", "hidden_size ", hidden_size,
                           " is not divisible by num_attention_heads ", num_attention_heads);
        check<value_error>(layer_norm_eps > 0.0, "clip", "layer_norm_eps must be positive");
        (void)activation_of(hidden_act);
    }
};

/// CLIPEncoderLayer: pre-norm self-attention and MLP, each with a residual.
template <class B, class T = float>
    requires computes_in<B, T>
class encoder_layer {
public:
    using tensor_type = tensor<B, T>;

    struct params {
        layer_norm_layer<B, T> layer_norm1, layer_norm2;
        linear_layer<B, T> q_proj, k_proj, v_proj, out_proj;  ///< self_attn.*
        linear_layer<B, T> fc1, fc2;                          ///< mlp.*
    };

    encoder_layer() = default;

    /// Binds the keys below one "layers.<i>" scope.
    static encoder_layer bind(weight_binder<B, T> b, const encoder_config& c) {
        c.validate();
        encoder_layer l;
        l.heads_ = c.num_attention_heads;
        l.hidden_ = c.hidden_size;
        l.act_ = activation_of(c.hidden_act);
        auto& p = l.params_;
        const index_t d = c.hidden_size;
        p.layer_norm1 = layer_norm_layer<B, T>::bind(b, "layer_norm1", d, c.layer_norm_eps);
        p.layer_norm2 = layer_norm_layer<B, T>::bind(b, "layer_norm2", d, c.layer_norm_eps);
        auto attn = b.scope("self_attn");
        p.q_proj = linear_layer<B, T>::bind(attn, "q_proj", d, d, true);
        p.k_proj = linear_layer<B, T>::bind(attn, "k_proj", d, d, true);
        p.v_proj = linear_layer<B, T>::bind(attn, "v_proj", d, d, true);
        p.out_proj = linear_layer<B, T>::bind(attn, "out_proj", d, d, true);
        auto mlp = b.scope("mlp");
        p.fc1 = linear_layer<B, T>::bind(mlp, "fc1", d, c.intermediate_size, true);
        p.fc2 = linear_layer<B, T>::bind(mlp, "fc2", c.intermediate_size, d, true);
        return l;
    }

    const params& weights() const noexcept { return params_; }

    /// x (B, L, hidden) -> (B, L, hidden). `causal` masks keys after each query (the text tower).
    tensor_type forward(context_t<B>& ctx, const tensor_type& x, bool causal) const {
        check<shape_error>(x.rank() == 3 && x.dim(2) == hidden_, "clip", "encoder layer input ", x.shape().str(), " is not (B, L, ",
                           hidden_, ")");
        auto h = ops::add(ctx, x, self_attention(ctx, params_.layer_norm1(ctx, x), causal));
        auto m = params_.fc1(ctx, params_.layer_norm2(ctx, h));
        m = ops::unary(ctx, act_, m);
        return ops::add(ctx, h, params_.fc2(ctx, m));
    }

private:
    /// (B, L, heads * hd) -> (B * heads, L, hd)
    tensor_type split_heads(context_t<B>& ctx, const tensor_type& t) const {
        const index_t batch = t.dim(0), len = t.dim(1), hd = hidden_ / heads_;
        return ops::permute(ctx, t.reshape({batch, len, heads_, hd}), {0, 2, 1, 3}).reshape({batch * heads_, len, hd});
    }

    tensor_type self_attention(context_t<B>& ctx, const tensor_type& x, bool causal) const {
        const index_t batch = x.dim(0), len = x.dim(1), hd = hidden_ / heads_;
        const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
        const auto q = split_heads(ctx, params_.q_proj(ctx, x));
        const auto k = split_heads(ctx, params_.k_proj(ctx, x));
        const auto v = split_heads(ctx, params_.v_proj(ctx, x));
        tensor_type o;
        if (!causal) {
            o = ops::attention(ctx, q, k, v, scale);
        } else {
            // softmax(scale q k^T + mask) v with -inf above the diagonal; every row
            // keeps its diagonal, so no row is all -inf.
            auto scores = ops::matmul(ctx, q, k, false, true, scale);
            scores = ops::add(ctx, scores, causal_mask(ctx, len));
            o = ops::matmul(ctx, ops::softmax(ctx, scores), v);
        }
        o = ops::permute(ctx, o.reshape({batch, heads_, len, hd}), {0, 2, 1, 3}).reshape({batch, len, hidden_});
        return params_.out_proj(ctx, o);
    }

    /// (1, L, L): 0 on and below the diagonal, -inf above. Built on the host
    /// and uploaded (a constant of the sequence length, never read back).
    static tensor_type causal_mask(context_t<B>& ctx, index_t len) {
        std::vector<T> host(static_cast<std::size_t>(len * len), element_cast<T>(0.0f));
        const T minus_inf = element_cast<T>(-std::numeric_limits<float>::infinity());
        for (index_t i = 0; i < len; ++i)
            for (index_t j = i + 1; j < len; ++j) host[static_cast<std::size_t>(i * len + j)] = minus_inf;
        return tensor_type::from_host(ctx, {1, len, len}, std::span<const T>(host));
    }

    params params_;
    index_t heads_ = 1, hidden_ = 0;
    unary_op act_ = unary_op::quick_gelu;
};

/// CLIPEncoder: `num_hidden_layers` encoder layers in sequence.
template <class B, class T = float>
    requires computes_in<B, T>
class encoder {
public:
    using tensor_type = tensor<B, T>;
    using layer_type = encoder_layer<B, T>;

    encoder() = default;

    /// Binds "layers.<i>.*" below `b` (the "encoder" scope of a tower).
    static encoder bind(weight_binder<B, T> b, const encoder_config& c) {
        c.validate();
        encoder e;
        e.config_ = c;
        for (index_t i = 0; i < c.num_hidden_layers; ++i) e.layers_.push_back(layer_type::bind(b.scope("layers", i), c));
        return e;
    }

    const encoder_config& settings() const noexcept { return config_; }
    const std::vector<layer_type>& layers() const noexcept { return layers_; }

    /// x (B, L, hidden) -> the last layer's output. When `penultimate` is
    /// given it receives transformers' hidden_states[-2]: the state entering
    /// the last layer (x itself for a one-layer encoder). `stop_before_last`
    /// skips the last layer and returns that state (clip skip).
    tensor_type forward(context_t<B>& ctx, const tensor_type& x, bool causal, tensor_type* penultimate = nullptr,
                        bool stop_before_last = false) const {
        check<shape_error>(x.rank() == 3 && x.dim(2) == config_.hidden_size, "clip", "encoder input ", x.shape().str(),
                           " is not (B, L, ", config_.hidden_size, ")");
        auto h = x;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            if (i + 1 == layers_.size()) {
                if (penultimate) *penultimate = h;
                if (stop_before_last) return h;
            }
            h = layers_[i].forward(ctx, h, causal);
        }
        // No layers: there is no hidden_states[-2]; report the input.
        if (layers_.empty() && penultimate) *penultimate = h;
        return h;
    }

private:
    encoder_config config_;
    std::vector<layer_type> layers_;
};

}  // namespace dynamicid::modules::clip
