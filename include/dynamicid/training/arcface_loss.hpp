// dynamicid training: the ArcFace additive angular margin loss, with its backward.
//
// What insightface's arcface_torch computes for a batch of embeddings x (N, E)
// and class weights W (C, E) (partial_fc_v2 with every class sampled, and
// CombinedMarginLoss with m1 = 1, m3 = 0):
//
//   cos    = clamp(normalize(x) normalize(W)^T, -1, 1)           (N, C); normalize = F.normalize, eps 1e-12
//   target = cos[i, y_i] cos(m) - sin[i, y_i] sin(m)             cos(theta + m), sin = sqrt(1 - cos^2)
//            where cos[i, y_i] > cos(pi - m); elsewhere
//            cos[i, y_i] - sin(pi - m) m                          (keeps the logit monotonic past theta = pi - m)
//            (easy_margin: the margin only where cos > 0, the plain cosine elsewhere)
//   loss   = mean_i cross_entropy(s * cos with target at y_i, y_i)
//
// The margin and the softmax run on the host in double (N x C values), the
// normalisation and the two products on the backend. At cos = +-1 exactly the
// derivative of sin is infinite; it is taken with sin floored at 1e-6 there.
//
//     auto [loss, saved] = dynamicid::training::arcface_loss_forward(ctx, embeddings, class_weights, labels);
//     auto g = dynamicid::training::arcface_loss_backward(ctx, saved);   // g.embeddings (N, E), g.class_weights (C, E)
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/ops.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <span>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// insightface's ArcFace settings (m2 of CombinedMarginLoss; s its scale).
struct arcface_options {
    double scale = 64.0;
    double margin = 0.5;
    bool easy_margin = false;
};

/// F.normalize's saved state for one matrix: rows divided by max(|row|, eps).
template <class B, class T>
struct row_normalize_saved {
    tensor<B, T> normalised;  ///< (R, E)
    tensor<B, T> radius;      ///< (R, 1) max(|row|, eps)
    ops::binary_saved<B, T> clamp;  ///< max(|row|, eps): its backward masks rows below eps
};

/// What arcface_loss_backward needs.
template <class B, class T>
struct arcface_saved {
    row_normalize_saved<B, T> embeddings, class_weights;
    tensor<B, T> grad_cosine;  ///< d loss / d (normalised x normalised W^T), (N, C)
    std::int64_t correct = 0;  ///< rows whose largest cosine is at their label (before the margin)
};

template <class B, class T>
struct arcface_grads {
    tensor<B, T> embeddings, class_weights;
};

namespace detail {

inline constexpr const char* arcface_component = "arcface_loss";

template <class B, class T>
std::pair<tensor<B, T>, row_normalize_saved<B, T>> normalize_rows(context_t<B>& ctx, const tensor<B, T>& x) {
    const auto norm = ops::unary(ctx, unary_op::sqrt, ops::sum(ctx, ops::mul(ctx, x, x), {1}));
    const auto eps = tensor<B, T>::full(ctx, {1}, element_cast<T>(1e-12));
    auto [radius, clamp] = ops::binary_forward(ctx, binary_op::maximum, norm, eps);
    auto normalised = ops::div(ctx, x, radius);
    return {normalised, row_normalize_saved<B, T>{normalised, radius, clamp}};
}

/// dx = (dy - [|x| >= eps] (dy . xn) xn) / r.
template <class B, class T>
tensor<B, T> normalize_rows_backward(context_t<B>& ctx, const row_normalize_saved<B, T>& s, const tensor<B, T>& dy) {
    const auto along = ops::sum(ctx, ops::mul(ctx, dy, s.normalised), {1});
    const auto masked = ops::binary_backward(ctx, s.clamp, along, {.input = true, .params = false}).first;
    return ops::div(ctx, ops::sub(ctx, dy, ops::mul(ctx, s.normalised, masked)), s.radius);
}

}  // namespace detail

/// The mean ArcFace loss of a batch, shape (1). labels[i] in [0, C) is row i's class.
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, arcface_saved<B, T>> arcface_loss_forward(context_t<B>& ctx, const tensor<B, T>& embeddings,
                                                                  const tensor<B, T>& class_weights, std::span<const std::int64_t> labels,
                                                                  const arcface_options& options = {}) {
    using detail::arcface_component;
    check<shape_error>(embeddings.defined() && class_weights.defined(), arcface_component, "undefined input");
    check<shape_error>(embeddings.rank() == 2 && embeddings.dim(0) >= 1 && embeddings.dim(1) >= 1, arcface_component, "embeddings ",
                       embeddings.shape().str(), " are not (N, E)");
    check<shape_error>(class_weights.rank() == 2 && class_weights.dim(0) >= 1 && class_weights.dim(1) == embeddings.dim(1), arcface_component,
                       "class weights ", class_weights.shape().str(), " are not (C, ", embeddings.dim(1), ")");
    const index_t n = embeddings.dim(0), c = class_weights.dim(0);
    check<shape_error>(static_cast<index_t>(labels.size()) == n, arcface_component, labels.size(), " labels for ", n, " embeddings");
    for (std::size_t i = 0; i < labels.size(); ++i)
        check<value_error>(labels[i] >= 0 && labels[i] < c, arcface_component, "label ", labels[i], " of row ", i, " is not in [0, ", c, ")");
    check<value_error>(std::isfinite(options.scale) && options.scale > 0, arcface_component, "scale must be finite and > 0, got ", options.scale);
    check<value_error>(std::isfinite(options.margin) && options.margin >= 0 && options.margin < std::numbers::pi / 2, arcface_component,
                       "margin must be in [0, pi/2), got ", options.margin);

    arcface_saved<B, T> saved;
    tensor<B, T> xn, wn;
    std::tie(xn, saved.embeddings) = detail::normalize_rows(ctx, embeddings);
    std::tie(wn, saved.class_weights) = detail::normalize_rows(ctx, class_weights);
    const auto cosine = ops::matmul(ctx, xn, wn, false, true).to_host(ctx);

    const double s = options.scale, m = options.margin;
    const double cos_m = std::cos(m), sin_m = std::sin(m);
    const double threshold = std::cos(std::numbers::pi - m), sinmm = std::sin(std::numbers::pi - m) * m;
    std::vector<T> grad(cosine.size());
    std::vector<double> z(static_cast<std::size_t>(c));
    double total = 0.0;
    bool finite = true;
    for (index_t i = 0; i < n; ++i) {
        const auto row = static_cast<std::size_t>(i * c);
        const auto y = static_cast<std::size_t>(labels[static_cast<std::size_t>(i)]);
        std::size_t best = 0;
        for (std::size_t j = 0; j < z.size(); ++j) {
            const double v = element_cast<double>(cosine[row + j]);
            finite = finite && std::isfinite(v);
            z[j] = std::clamp(v, -1.0, 1.0);
            if (z[j] > z[best]) best = j;
        }
        if (best == y) ++saved.correct;
        const double t = z[y];
        const double sin_t = std::sqrt(std::max(0.0, 1.0 - t * t));
        const bool margined = options.easy_margin ? t > 0.0 : t > threshold;
        const double target = margined ? t * cos_m - sin_t * sin_m : (options.easy_margin ? t : t - sinmm);
        const double slope = margined ? cos_m + sin_m * t / std::max(sin_t, 1e-6) : 1.0;
        z[y] = target;
        double top = -std::numeric_limits<double>::infinity();
        for (double& v : z) top = std::max(top, v *= s);
        double denom = 0.0;
        for (double v : z) denom += std::exp(v - top);
        total += top + std::log(denom) - z[y];
        for (std::size_t j = 0; j < z.size(); ++j) {
            const double v = element_cast<double>(cosine[row + j]);
            const double inside = (v >= -1.0 && v <= 1.0) ? 1.0 : 0.0;  // clamp's gradient, as torch's (bounds included)
            double d = (std::exp(z[j] - top) / denom - (j == y ? 1.0 : 0.0)) * s / static_cast<double>(n);
            if (j == y) d *= slope;
            grad[row + j] = element_cast<T>(d * inside);
        }
    }
    const double loss = total / static_cast<double>(n);
    check<value_error>(finite && std::isfinite(loss), arcface_component, "loss is not finite (", loss, "): NaN or Inf in the inputs?");
    saved.grad_cosine = tensor<B, T>::from_host(ctx, {n, c}, grad);
    return {tensor<B, T>::full(ctx, {1}, element_cast<T>(loss)), std::move(saved)};
}

/// Gradients of the mean loss w.r.t. the (unnormalised) embeddings and class weights.
template <class B, class T>
    requires computes_in<B, T>
arcface_grads<B, T> arcface_loss_backward(context_t<B>& ctx, const arcface_saved<B, T>& saved) {
    check<shape_error>(saved.grad_cosine.defined(), detail::arcface_component, "backward without a forward");
    const auto d_xn = ops::matmul(ctx, saved.grad_cosine, saved.class_weights.normalised);
    const auto d_wn = ops::matmul(ctx, saved.grad_cosine, saved.embeddings.normalised, true, false);
    return {detail::normalize_rows_backward(ctx, saved.embeddings, d_xn), detail::normalize_rows_backward(ctx, saved.class_weights, d_wn)};
}

}  // namespace dynamicid::training
