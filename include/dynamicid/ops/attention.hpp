// dynamicid ops: scaled dot-product attention.
//
// Uses the backend's fused kernel when it has the has_fused_attention
// capability (inference), and otherwise composes gemm + softmax + gemm; the
// composed path is also the one that records what backward needs.
#pragma once

#include <dynamicid/ops/activation.hpp>
#include <dynamicid/ops/linear_algebra.hpp>

#include <cmath>

namespace dynamicid::ops {

template <class B, class T>
struct attention_saved {
    matmul_saved<B, T> scores;
    softmax_saved<B, T> probabilities;
    matmul_saved<B, T> output;
};

/// softmax(scale * q k^T) v for q (batch, lq, d), k (batch, lk, d), v (batch, lk, dv);
/// scale defaults to 1/sqrt(d).
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, attention_saved<B, T>> attention_forward(context_t<B>& ctx, const tensor<B, T>& q, const tensor<B, T>& k,
                                                                 const tensor<B, T>& v, double scale = 0.0) {
    check<shape_error>(q.rank() == 3 && k.rank() == 3 && v.rank() == 3 && q.dim(0) == k.dim(0) && k.dim(0) == v.dim(0) &&
                           q.dim(2) == k.dim(2) && k.dim(1) == v.dim(1),
                       "attention", "q ", q.shape().str(), ", k ", k.shape().str(), ", v ", v.shape().str(), " do not fit");
    if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(q.dim(2)));
    auto [s, s_saved] = matmul_forward(ctx, q, k, false, true, scale);
    auto [p, p_saved] = softmax_forward(ctx, s);
    auto [o, o_saved] = matmul_forward(ctx, p, v);
    return {o, attention_saved<B, T>{s_saved, p_saved, o_saved}};
}

template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> attention(context_t<B>& ctx, const tensor<B, T>& q, const tensor<B, T>& k, const tensor<B, T>& v, double scale = 0.0) {
    if constexpr (has_fused_attention<B, T>) {
        check<shape_error>(q.rank() == 3 && k.rank() == 3 && v.rank() == 3 && q.dim(0) == k.dim(0) && k.dim(0) == v.dim(0) &&
                               q.dim(2) == k.dim(2) && k.dim(1) == v.dim(1),
                           "attention", "q ", q.shape().str(), ", k ", k.shape().str(), ", v ", v.shape().str(), " do not fit");
        if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(q.dim(2)));
        auto o = tensor<B, T>::empty(ctx, {q.dim(0), q.dim(1), v.dim(2)});
        B::attention_forward(ctx, q.dim(0), q.dim(1), k.dim(1), q.dim(2), v.dim(2), scale, q.data(), k.data(), v.data(), o.data());
        return o;
    } else {
        return attention_forward(ctx, q, k, v, scale).first;
    }
}

template <class B, class T>
struct attention_grads {
    tensor<B, T> q, k, v;
};

template <class B, class T>
    requires computes_in<B, T>
attention_grads<B, T> attention_backward(context_t<B>& ctx, const attention_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    auto [dp, dv] = matmul_backward(ctx, saved.output, grad_output);
    auto ds = softmax_backward(ctx, saved.probabilities, dp);
    auto [dq, dk] = matmul_backward(ctx, saved.scores, ds);
    return {dq, dk, dv};
}

}  // namespace dynamicid::ops
