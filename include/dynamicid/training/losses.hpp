// dynamicid training: the losses of DynamicID's two training stages, each
// with its backward.
//
//   anchoring stage       MSE(eps_pred, eps)                          mse_loss
//                         or mean(w * (eps_pred - eps)^2), w larger
//                         on the face                                 weighted_mse_loss
//   reconfiguration stage DFM + lambda * LDC                          reconfiguration_loss
//       DFM = MSE(predicted tokens, target tokens)                    feature_matching_loss
//       LDC = MSE(UNet eps with predicted tokens, UNet eps with target tokens)
//
// Every MSE is torch.nn.functional.mse_loss with reduction="mean" (the weighted
// one is torch's (weight * (prediction - target) ** 2).mean()). Losses are
// one-element tensors; a loss that is not finite throws value_error.
//
//     auto [loss, saved] = dynamicid::training::mse_loss_forward(ctx, eps_pred, eps);
//     auto g = dynamicid::training::mse_loss_backward(ctx, saved);   // g.prediction: d loss / d eps_pred
//
//     auto [l, s] = dynamicid::training::reconfiguration_loss_forward(ctx, pred_tokens, target_tokens, eps_pred, eps_target);
//     auto rg = dynamicid::training::reconfiguration_loss_backward(ctx, s);   // rg.predicted_tokens, rg.noise_prediction
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/ops.hpp>

#include <cmath>
#include <string_view>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// What mse_loss_backward needs: prediction - target.
template <class B, class T>
struct mse_saved {
    tensor<B, T> difference;
};

/// Gradients of an MSE; `target` only when asked for.
template <class B, class T>
struct mse_grads {
    tensor<B, T> prediction, target;
};

/// Which MSE gradients to compute (the target is usually data, or a frozen branch).
struct mse_needs {
    bool prediction = true;
    bool target = false;
};

namespace detail {

template <class B, class T>
void check_finite_loss(context_t<B>& ctx, std::string_view component, const tensor<B, T>& loss) {
    const auto host = loss.to_host(ctx);
    check<value_error>(std::isfinite(element_cast<double>(host.front())), component, "loss is not finite (", element_cast<double>(host.front()),
                       "): NaN or Inf in the inputs?");
}

// mean(weight (prediction - target)^2), weight undefined: 1. Returns the loss and prediction - target.
template <class B, class T>
std::pair<tensor<B, T>, tensor<B, T>> weighted_mean_square(context_t<B>& ctx, std::string_view component, const tensor<B, T>& prediction,
                                                           const tensor<B, T>& target, const tensor<B, T>& weight) {
    check<shape_error>(prediction.defined() && target.defined(), component, "undefined input");
    check<shape_error>(prediction.shape() == target.shape(), component, "prediction ", prediction.shape().str(), " and target ",
                       target.shape().str(), " differ in shape");
    check<shape_error>(prediction.numel() > 0, component, "empty input ", prediction.shape().str());
    if (weight.defined()) {
        bool fits = weight.rank() <= prediction.rank();
        for (int i = 1; fits && i <= weight.rank(); ++i) {
            const index_t w = weight.dim(weight.rank() - i), p = prediction.dim(prediction.rank() - i);
            fits = w == p || w == 1;
        }
        check<shape_error>(fits, component, "weight ", weight.shape().str(), " does not broadcast to ", prediction.shape().str());
        for (const auto v : weight.to_host(ctx)) {
            const double d = element_cast<double>(v);
            check<value_error>(std::isfinite(d) && d >= 0, component, "weight holds ", d, "; weights must be finite and >= 0");
        }
    }
    auto diff = ops::sub(ctx, prediction, target);
    std::vector<int> axes(static_cast<std::size_t>(diff.rank()));
    for (int i = 0; i < diff.rank(); ++i) axes[static_cast<std::size_t>(i)] = i;
    auto square = ops::mul(ctx, diff, diff);
    if (weight.defined()) square = ops::mul(ctx, square, weight);
    auto loss = ops::mean(ctx, square, axes).reshape({1});
    check_finite_loss(ctx, component, loss);
    return {loss, diff};
}

// The gradients of grad_output * mean(weight (prediction - target)^2), weight undefined: 1.
template <class B, class T>
mse_grads<B, T> weighted_mean_square_backward(context_t<B>& ctx, std::string_view component, const tensor<B, T>& diff,
                                              const tensor<B, T>& weight, const tensor<B, T>& grad_output, mse_needs need) {
    check<shape_error>(diff.defined() && grad_output.numel() == 1, component, "grad_output ", grad_output.shape().str(),
                       " is not a single value");
    mse_grads<B, T> g;
    if (!need.prediction && !need.target) return g;
    const std::vector<index_t> ones(static_cast<std::size_t>(diff.rank()), 1);
    const auto scaled = ops::mul(ctx, weight.defined() ? ops::mul(ctx, diff, weight) : diff, grad_output.reshape(ones));
    const auto d = ops::scale(ctx, scaled, 2.0 / static_cast<double>(diff.numel()));
    if (need.prediction) g.prediction = d;
    if (need.target) g.target = ops::scale(ctx, d, -1.0);
    return g;
}

template <class B, class T>
std::pair<tensor<B, T>, mse_saved<B, T>> mse(context_t<B>& ctx, std::string_view component, const tensor<B, T>& prediction,
                                             const tensor<B, T>& target) {
    auto [loss, diff] = weighted_mean_square(ctx, component, prediction, target, tensor<B, T>{});
    return {loss, mse_saved<B, T>{diff}};
}

}  // namespace detail

/// torch F.mse_loss(prediction, target, reduction="mean"): mean((prediction - target)^2), shape (1).
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, mse_saved<B, T>> mse_loss_forward(context_t<B>& ctx, const tensor<B, T>& prediction, const tensor<B, T>& target) {
    return detail::mse(ctx, "mse_loss", prediction, target);
}

template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> mse_loss(context_t<B>& ctx, const tensor<B, T>& prediction, const tensor<B, T>& target) {
    return mse_loss_forward(ctx, prediction, target).first;
}

/// d (grad_output * loss): 2 grad_output (prediction - target) / numel for the
/// prediction, its negative for the target. grad_output has one element.
template <class B, class T>
    requires computes_in<B, T>
mse_grads<B, T> mse_loss_backward(context_t<B>& ctx, const mse_saved<B, T>& saved, const tensor<B, T>& grad_output, mse_needs need = {}) {
    return detail::weighted_mean_square_backward(ctx, "mse_loss", saved.difference, tensor<B, T>{}, grad_output, need);
}

/// The gradient of the loss itself (grad_output = 1).
template <class B, class T>
    requires computes_in<B, T>
mse_grads<B, T> mse_loss_backward(context_t<B>& ctx, const mse_saved<B, T>& saved, mse_needs need = {}) {
    return mse_loss_backward(ctx, saved, tensor<B, T>::full(ctx, {1}, element_cast<T>(1.0)), need);
}

/// What weighted_mse_loss_backward needs: prediction - target, and the weight.
template <class B, class T>
struct weighted_mse_saved {
    tensor<B, T> difference, weight;
};

/// mean(weight * (prediction - target)^2) over every element of the
/// prediction, shape (1); in torch `(weight * (prediction - target) ** 2).mean()`.
/// The weight broadcasts against the prediction (a (N, 1, H, W) map against
/// (N, C, H, W) latents) and holds finite values >= 0; a weight of ones is
/// mse_loss. The anchoring trainer uses it to give the face more of the
/// denoising loss (anchor_trainer_config::face_loss_weight).
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, weighted_mse_saved<B, T>> weighted_mse_loss_forward(context_t<B>& ctx, const tensor<B, T>& prediction,
                                                                           const tensor<B, T>& target, const tensor<B, T>& weight) {
    check<shape_error>(weight.defined(), "weighted_mse_loss", "undefined weight");
    auto [loss, diff] = detail::weighted_mean_square(ctx, "weighted_mse_loss", prediction, target, weight);
    return {loss, weighted_mse_saved<B, T>{diff, weight}};
}

template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> weighted_mse_loss(context_t<B>& ctx, const tensor<B, T>& prediction, const tensor<B, T>& target, const tensor<B, T>& weight) {
    return weighted_mse_loss_forward(ctx, prediction, target, weight).first;
}

/// d (grad_output * loss): 2 grad_output weight (prediction - target) / numel
/// for the prediction, its negative for the target. The weight gets none.
template <class B, class T>
    requires computes_in<B, T>
mse_grads<B, T> weighted_mse_loss_backward(context_t<B>& ctx, const weighted_mse_saved<B, T>& saved, const tensor<B, T>& grad_output,
                                           mse_needs need = {}) {
    return detail::weighted_mean_square_backward(ctx, "weighted_mse_loss", saved.difference, saved.weight, grad_output, need);
}

template <class B, class T>
    requires computes_in<B, T>
mse_grads<B, T> weighted_mse_loss_backward(context_t<B>& ctx, const weighted_mse_saved<B, T>& saved, mse_needs need = {}) {
    return weighted_mse_loss_backward(ctx, saved, tensor<B, T>::full(ctx, {1}, element_cast<T>(1.0)), need);
}

/// DFM: MSE between the IMR's edited identity tokens and the target image's
/// own tokens, both (T, n, D) (official-semantics section 5).
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, mse_saved<B, T>> feature_matching_loss_forward(context_t<B>& ctx, const tensor<B, T>& predicted_tokens,
                                                                       const tensor<B, T>& target_tokens) {
    check<shape_error>(predicted_tokens.rank() == 3, "feature_matching_loss", "tokens ", predicted_tokens.shape().str(),
                       " are not (T, n, D)");
    return detail::mse(ctx, "feature_matching_loss", predicted_tokens, target_tokens);
}

template <class B, class T>
    requires computes_in<B, T>
mse_grads<B, T> feature_matching_loss_backward(context_t<B>& ctx, const mse_saved<B, T>& saved, const tensor<B, T>& grad_output,
                                               mse_needs need = {}) {
    return mse_loss_backward(ctx, saved, grad_output, need);
}

template <class B, class T>
    requires computes_in<B, T>
mse_grads<B, T> feature_matching_loss_backward(context_t<B>& ctx, const mse_saved<B, T>& saved, mse_needs need = {}) {
    return mse_loss_backward(ctx, saved, need);
}

/// The reconfiguration-stage losses, each (1).
template <class B, class T>
struct reconfiguration_losses {
    tensor<B, T> total, feature_matching, consistency;
};

template <class B, class T>
struct reconfiguration_loss_saved {
    mse_saved<B, T> feature_matching, consistency;
    double lambda = 1.0;
};

/// Gradients of the total: for the IMR's tokens (DFM) and for the UNet's noise
/// prediction made with them (LDC; the prediction made with the target tokens
/// gets none, the released script has no gradient path through it).
template <class B, class T>
struct reconfiguration_loss_grads {
    tensor<B, T> predicted_tokens, noise_prediction;
};

/// total = MSE(predicted_tokens, target_tokens) + lambda * MSE(noise_prediction, target_noise_prediction), lambda = 1 in the paper.
template <class B, class T>
    requires computes_in<B, T>
std::pair<reconfiguration_losses<B, T>, reconfiguration_loss_saved<B, T>> reconfiguration_loss_forward(
    context_t<B>& ctx, const tensor<B, T>& predicted_tokens, const tensor<B, T>& target_tokens, const tensor<B, T>& noise_prediction,
    const tensor<B, T>& target_noise_prediction, double lambda = 1.0) {
    check<value_error>(std::isfinite(lambda), "reconfiguration_loss", "lambda is not finite");
    auto [dfm, dfm_saved] = feature_matching_loss_forward(ctx, predicted_tokens, target_tokens);
    auto [ldc, ldc_saved] = detail::mse(ctx, "reconfiguration_loss", noise_prediction, target_noise_prediction);
    auto total = ops::add_scaled(ctx, lambda, ldc, 1.0, dfm);
    return {reconfiguration_losses<B, T>{total, dfm, ldc}, reconfiguration_loss_saved<B, T>{dfm_saved, ldc_saved, lambda}};
}

/// Gradients of grad_output * total (grad_output = 1 when omitted).
template <class B, class T>
    requires computes_in<B, T>
reconfiguration_loss_grads<B, T> reconfiguration_loss_backward(context_t<B>& ctx, const reconfiguration_loss_saved<B, T>& saved,
                                                               const tensor<B, T>& grad_output) {
    auto dfm = mse_loss_backward(ctx, saved.feature_matching, grad_output);
    auto ldc = mse_loss_backward(ctx, saved.consistency, grad_output);
    return {dfm.prediction, saved.lambda == 1.0 ? ldc.prediction : ops::scale(ctx, ldc.prediction, saved.lambda)};
}

template <class B, class T>
    requires computes_in<B, T>
reconfiguration_loss_grads<B, T> reconfiguration_loss_backward(context_t<B>& ctx, const reconfiguration_loss_saved<B, T>& saved) {
    return reconfiguration_loss_backward(ctx, saved, tensor<B, T>::full(ctx, {1}, element_cast<T>(1.0)));
}

}  // namespace dynamicid::training
