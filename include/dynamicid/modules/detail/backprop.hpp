// dynamicid modules (internal): forward/backward pairs for the pieces the
// identity modules share (LayerNorm, Linear, GELU feed-forward, multi-head
// attention with a fused to_kv, the perceiver attention and BatchNorm2d with
// batch statistics). Not part of the public API; the modules that use them
// expose typed saved state and gradients of their own.
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/dynamicid/detail/heads.hpp>
#include <dynamicid/ops.hpp>

#include <cmath>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace dynamicid::modules::detail {

/// a + b where either may be undefined (an absent gradient counts as zero).
/// Never writes into a or b: gradients may share storage with saved state.
template <class B, class T>
tensor<B, T> add_grad(context_t<B>& ctx, const tensor<B, T>& a, const tensor<B, T>& b) {
    if (!a.defined()) return b;
    if (!b.defined()) return a;
    return ops::add(ctx, a, b);
}

template <class B, class T>
const tensor<B, T>* ptr_if(const tensor<B, T>& t) {
    return t.defined() ? &t : nullptr;
}

/// Which parameters a backward differentiates: `params` false keeps no
/// activations for weight gradients (a frozen module).
inline ops::needs with_params(bool params) { return {.input = true, .params = params}; }

// ---- LayerNorm -> Linear (up) -> GELU(erf) -> Linear (down), no biases -------------------

template <class B, class T>
struct feed_forward_saved {
    ops::norm_saved<B, T> norm;
    ops::linear_saved<B, T> up, down;
    ops::unary_saved<B, T> act;
};

template <class B, class T>
struct feed_forward_grads {
    tensor<B, T> input, norm_weight, norm_bias, up, down;
};

template <class B, class T>
std::pair<tensor<B, T>, feed_forward_saved<B, T>> feed_forward_forward(context_t<B>& ctx, const tensor<B, T>& x,
                                                                         const tensor<B, T>& norm_weight, const tensor<B, T>& norm_bias,
                                                                         double eps, const tensor<B, T>& up, const tensor<B, T>& down,
                                                                         bool params) {
    feed_forward_saved<B, T> s;
    tensor<B, T> h;
    std::tie(h, s.norm) = ops::layer_norm_forward(ctx, x, ptr_if(norm_weight), ptr_if(norm_bias), eps);
    std::tie(h, s.up) = ops::linear_forward(ctx, h, up, nullptr, with_params(params));
    std::tie(h, s.act) = ops::unary_forward(ctx, unary_op::gelu_erf, h);
    std::tie(h, s.down) = ops::linear_forward(ctx, h, down, nullptr, with_params(params));
    return {h, s};
}

template <class B, class T>
feed_forward_grads<B, T> feed_forward_backward(context_t<B>& ctx, const feed_forward_saved<B, T>& s, const tensor<B, T>& dy,
                                               bool params) {
    feed_forward_grads<B, T> g;
    auto d = ops::linear_backward(ctx, s.down, dy);
    g.down = d.weight;
    auto u = ops::linear_backward(ctx, s.up, ops::unary_backward(ctx, s.act, d.input));
    g.up = u.weight;
    auto n = ops::layer_norm_backward(ctx, s.norm, u.input, with_params(params));
    g.input = n.input;
    g.norm_weight = n.gamma;
    g.norm_bias = n.beta;
    return g;
}

// ---- multi-head attention: q = to_q(queries), k|v = to_kv(kv_input), to_out(softmax(q k^T / sqrt d) v) --------

template <class B, class T>
struct mha_saved {
    ops::linear_saved<B, T> to_q, to_kv, to_out;
    ops::attention_saved<B, T> attention;
    index_t heads = 1, inner = 0;
};

template <class B, class T>
struct mha_grads {
    tensor<B, T> queries, kv_input, to_q, to_kv, to_out;
};

template <class B, class T>
std::pair<tensor<B, T>, mha_saved<B, T>> mha_forward(context_t<B>& ctx, const tensor<B, T>& to_q, const tensor<B, T>& to_kv,
                                                     const tensor<B, T>& to_out, const tensor<B, T>& queries, const tensor<B, T>& kv_input,
                                                     index_t heads, index_t dim_head, bool params) {
    mha_saved<B, T> s;
    s.heads = heads;
    s.inner = heads * dim_head;
    tensor<B, T> q, kv, o, y;
    std::tie(q, s.to_q) = ops::linear_forward(ctx, queries, to_q, nullptr, with_params(params));
    std::tie(kv, s.to_kv) = ops::linear_forward(ctx, kv_input, to_kv, nullptr, with_params(params));
    const auto k = ops::slice(ctx, kv, -1, 0, s.inner);
    const auto v = ops::slice(ctx, kv, -1, s.inner, s.inner);
    const double scale = 1.0 / std::sqrt(static_cast<double>(dim_head));
    std::tie(o, s.attention) =
        ops::attention_forward(ctx, split_heads(ctx, q, heads), split_heads(ctx, k, heads), split_heads(ctx, v, heads), scale);
    std::tie(y, s.to_out) = ops::linear_forward(ctx, merge_heads(ctx, o, heads), to_out, nullptr, with_params(params));
    return {y, s};
}

template <class B, class T>
mha_grads<B, T> mha_backward(context_t<B>& ctx, const mha_saved<B, T>& s, const tensor<B, T>& dy) {
    mha_grads<B, T> g;
    auto out = ops::linear_backward(ctx, s.to_out, dy);
    g.to_out = out.weight;
    // merge_heads and split_heads are each other's inverse (and so each other's backward).
    auto a = ops::attention_backward(ctx, s.attention, split_heads(ctx, out.input, s.heads));
    const auto dkv = ops::concat(ctx, std::vector<tensor<B, T>>{merge_heads(ctx, a.k, s.heads), merge_heads(ctx, a.v, s.heads)}, -1);
    auto kv = ops::linear_backward(ctx, s.to_kv, dkv);
    auto q = ops::linear_backward(ctx, s.to_q, merge_heads(ctx, a.q, s.heads));
    g.kv_input = kv.input;
    g.to_kv = kv.weight;
    g.queries = q.input;
    g.to_q = q.weight;
    return g;
}

// ---- PerceiverAttention: norm1 on the context, norm2 on the queries,
//      q from the normed queries, k|v from concat(normed context, normed queries) ----------

template <class B, class T>
struct perceiver_saved {
    ops::norm_saved<B, T> norm1, norm2;
    mha_saved<B, T> mha;
    index_t context_length = 0;
};

template <class B, class T>
struct perceiver_grads {
    tensor<B, T> context, queries, norm1_weight, norm1_bias, norm2_weight, norm2_bias, to_q, to_kv, to_out;
};

template <class B, class T>
struct layer_norm_ref {
    const tensor<B, T>& weight;
    const tensor<B, T>& bias;
    double eps;
};

template <class B, class T>
std::pair<tensor<B, T>, perceiver_saved<B, T>> perceiver_forward(context_t<B>& ctx, layer_norm_ref<B, T> norm1, layer_norm_ref<B, T> norm2,
                                                                 const tensor<B, T>& to_q, const tensor<B, T>& to_kv,
                                                                 const tensor<B, T>& to_out, const tensor<B, T>& context,
                                                                 const tensor<B, T>& queries, index_t heads, index_t dim_head, bool params) {
    perceiver_saved<B, T> s;
    tensor<B, T> cn, qn, y;
    std::tie(cn, s.norm1) = ops::layer_norm_forward(ctx, context, ptr_if(norm1.weight), ptr_if(norm1.bias), norm1.eps);
    std::tie(qn, s.norm2) = ops::layer_norm_forward(ctx, queries, ptr_if(norm2.weight), ptr_if(norm2.bias), norm2.eps);
    s.context_length = context.dim(1);
    std::tie(y, s.mha) =
        mha_forward(ctx, to_q, to_kv, to_out, qn, ops::concat(ctx, std::vector<tensor<B, T>>{cn, qn}, 1), heads, dim_head, params);
    return {y, s};
}

template <class B, class T>
perceiver_grads<B, T> perceiver_backward(context_t<B>& ctx, const perceiver_saved<B, T>& s, const tensor<B, T>& dy, bool params) {
    perceiver_grads<B, T> g;
    auto m = mha_backward(ctx, s.mha, dy);
    const index_t total = m.kv_input.dim(1);
    const auto d_cn = ops::slice(ctx, m.kv_input, 1, 0, s.context_length);
    const auto d_qn = ops::add(ctx, m.queries, ops::slice(ctx, m.kv_input, 1, s.context_length, total - s.context_length));
    auto n1 = ops::layer_norm_backward(ctx, s.norm1, d_cn, with_params(params));
    auto n2 = ops::layer_norm_backward(ctx, s.norm2, d_qn, with_params(params));
    g.context = n1.input;
    g.queries = n2.input;
    g.norm1_weight = n1.gamma;
    g.norm1_bias = n1.beta;
    g.norm2_weight = n2.gamma;
    g.norm2_bias = n2.beta;
    g.to_q = m.to_q;
    g.to_kv = m.to_kv;
    g.to_out = m.to_out;
    return g;
}

// ---- BatchNorm2d ----------------------------------------------------------------

/// What a BatchNorm2d backward needs: the normalised input, 1/sqrt(var + eps)
/// (batch or running variance), gamma, and whether the statistics were the
/// batch's own (then they depend on the input too).
template <class B, class T>
struct batch_norm_saved {
    tensor<B, T> normalised;  ///< (N, C, H, W)
    tensor<B, T> rstd;        ///< (1, C, 1, 1)
    tensor<B, T> gamma;       ///< (1, C, 1, 1)
    bool batch_statistics = false;
};

template <class B, class T>
struct batch_norm_grads {
    tensor<B, T> input, weight, bias;
};

/// Batch mean and biased variance per channel, (1, C, 1, 1) each.
template <class B, class T>
std::pair<tensor<B, T>, tensor<B, T>> batch_moments(context_t<B>& ctx, const tensor<B, T>& x) {
    const auto mean = ops::mean(ctx, x, {0, 2, 3});
    const auto centred = ops::sub(ctx, x, mean);
    return {mean, ops::mean(ctx, ops::mul(ctx, centred, centred), {0, 2, 3})};
}

/// y = (x - mean) * rstd * gamma + beta with the given (1, C, 1, 1) statistics.
template <class B, class T>
std::pair<tensor<B, T>, batch_norm_saved<B, T>> batch_norm_apply(context_t<B>& ctx, const tensor<B, T>& x, const tensor<B, T>& mean,
                                                                 const tensor<B, T>& var, const tensor<B, T>& weight,
                                                                 const tensor<B, T>& bias, double eps, bool batch_statistics) {
    const index_t c = x.dim(1);
    const auto eps_t = tensor<B, T>::full(ctx, {1, c, 1, 1}, element_cast<T>(eps));
    const auto rstd = ops::div(ctx, tensor<B, T>::full(ctx, {1, c, 1, 1}, element_cast<T>(1.0)),
                               ops::unary(ctx, unary_op::sqrt, ops::add(ctx, var, eps_t)));
    const auto normalised = ops::mul(ctx, ops::sub(ctx, x, mean), rstd);
    const auto gamma = weight.reshape({1, c, 1, 1});
    const auto y = ops::add(ctx, ops::mul(ctx, normalised, gamma), bias.reshape({1, c, 1, 1}));
    return {y, batch_norm_saved<B, T>{normalised, rstd, gamma, batch_statistics}};
}

/// With batch statistics: dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy gamma;
/// with fixed (running) statistics: dx = rstd g.
template <class B, class T>
batch_norm_grads<B, T> batch_norm_backward(context_t<B>& ctx, const batch_norm_saved<B, T>& s, const tensor<B, T>& dy, ops::needs need) {
    ops::check_same_shape("batch_norm", s.normalised, dy);
    const index_t c = dy.dim(1);
    batch_norm_grads<B, T> g;
    if (need.params) {
        g.weight = ops::sum(ctx, ops::mul(ctx, dy, s.normalised), {0, 2, 3}).reshape({c});
        g.bias = ops::sum(ctx, dy, {0, 2, 3}).reshape({c});
    }
    if (need.input) {
        auto gy = ops::mul(ctx, dy, s.gamma);
        if (s.batch_statistics) {
            const auto mean_g = ops::mean(ctx, gy, {0, 2, 3});
            const auto mean_gx = ops::mean(ctx, ops::mul(ctx, gy, s.normalised), {0, 2, 3});
            gy = ops::sub(ctx, ops::sub(ctx, gy, mean_g), ops::mul(ctx, s.normalised, mean_gx));
        }
        g.input = ops::mul(ctx, gy, s.rstd);
    }
    return g;
}

}  // namespace dynamicid::modules::detail
