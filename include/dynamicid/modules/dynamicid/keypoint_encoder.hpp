// dynamicid modules: DynamicID's KeyPointEncoder (landmark image -> motion feature).
//
// A stack of Conv2d + BatchNorm2d + ReLU units; a residual unit adds its input
// before the ReLU. The released layout (96x96 single-channel input in [-1, 1]):
//
//   block 0: 7x7 1->16
//   blocks 1..5: a stride-2 3x3 unit to 32, 64, 128, 256, 512 followed by
//                2, 3, 2, 2, 1 residual 3x3 units
//   block 6: an unpadded 3x3 512->512 unit and a 1x1 unit 512->embedding_dim
//
// giving (B, embedding_dim, 1, 1). Channel counts come from the weights;
// kernel, stride, padding and the residual flag from the config layout.
// forward() runs BatchNorm in eval mode: its running statistics, the conv
// bias and the affine parameters are folded into one per-channel scale and
// shift (y = conv(x) * scale + shift).
//
//     auto source = dynamicid::modules::weight_source::open({"key_point_encoder.safetensors"});
//     auto enc = dynamicid::modules::imr::keypoint_encoder<dynamicid::cpu_backend>::load(ctx, source, {});
//     auto features = enc.forward(ctx, landmark_image);     // (B, 1, 96, 96) -> (B, 768, 1, 1)
//
// Training: like torch.nn.BatchNorm2d, the module has a mode. In training
// mode (train()) forward_train normalises with the batch's own statistics
// (biased variance) and moves the running statistics towards them
// (running = (1 - momentum) running + momentum batch, with the unbiased
// variance); in eval mode (eval(), the default) it uses the running
// statistics. backward gives a `params` of gradients (running statistics
// undefined) and, with ops::needs::input, the landmark image's gradient.
//
//     enc.train();
//     auto [features, saved] = enc.forward_train(ctx, landmark_images);    // updates running_mean / running_var
//     auto g = enc.backward(ctx, saved, grad_features);                    // g.weights.blocks[i][j].conv_weight, ...
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/detail/backprop.hpp>
#include <dynamicid/modules/dynamicid/detail/heads.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <cmath>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace dynamicid::modules::imr {

/// One Conv2d + BatchNorm2d + ReLU unit of the layout.
struct keypoint_unit {
    index_t kernel = 3, stride = 1, padding = 1;
    bool residual = false;
};

/// The released KeyPointEncoder layout: blocks of units.
inline std::vector<std::vector<keypoint_unit>> released_keypoint_layout() {
    const keypoint_unit down{3, 2, 1, false}, res{3, 1, 1, true};
    return {
        {{7, 1, 3, false}},
        {down, res, res},
        {down, res, res, res},
        {down, res, res},
        {down, res, res},
        {down, res},
        {{3, 1, 0, false}, {1, 1, 0, false}},
    };
}

struct keypoint_encoder_config {
    std::vector<std::vector<keypoint_unit>> blocks = released_keypoint_layout();
    double batch_norm_eps = 1e-5;
    double batch_norm_momentum = 0.1;  ///< torch's default: the weight of the batch statistics in the running update
};

template <class B, class T = float>
    requires computes_in<B, T>
class keypoint_encoder {
public:
    using config = keypoint_encoder_config;
    using tensor_type = tensor<B, T>;

    /// blocks.<i>.<j>.conv_block.0 (Conv2d) and .1 (BatchNorm2d), torch names.
    struct unit_params {
        tensor_type conv_weight, conv_bias;                            ///< (out, in, k, k), (out)
        tensor_type bn_weight, bn_bias, running_mean, running_var;     ///< (out) each
    };
    struct params {
        std::vector<std::vector<unit_params>> blocks;
    };

    /// Validates the weights against the layout and folds each BatchNorm.
    keypoint_encoder(context_t<B>& ctx, config cfg, params weights) : config_(std::move(cfg)), params_(std::move(weights)) {
        using modules::detail::expect_weight;
        check<value_error>(config_.batch_norm_eps >= 0.0, "keypoint_encoder", "batch_norm_eps must be >= 0");
        check<value_error>(config_.batch_norm_momentum >= 0.0 && config_.batch_norm_momentum <= 1.0, "keypoint_encoder",
                           "batch_norm_momentum must be in [0, 1]");
        check<shape_error>(params_.blocks.size() == config_.blocks.size(), "keypoint_encoder", params_.blocks.size(),
                           " weight blocks for a layout of ", config_.blocks.size());
        index_t channels = -1;
        for (std::size_t i = 0; i < config_.blocks.size(); ++i) {
            check<shape_error>(params_.blocks[i].size() == config_.blocks[i].size(), "keypoint_encoder", "block ", i, " has ",
                               params_.blocks[i].size(), " units, the layout ", config_.blocks[i].size());
            for (std::size_t j = 0; j < config_.blocks[i].size(); ++j) {
                const auto& u = config_.blocks[i][j];
                const auto& p = params_.blocks[i][j];
                const std::string name = "blocks." + std::to_string(i) + "." + std::to_string(j) + ".conv_block.";
                check<shape_error>(p.conv_weight.defined() && p.conv_weight.rank() == 4, "keypoint_encoder", "weight ", name,
                                   "0.weight is missing");
                const index_t out = p.conv_weight.dim(0), in = p.conv_weight.dim(1);
                if (channels >= 0)
                    check<shape_error>(in == channels, "keypoint_encoder", name, "0.weight takes ", in, " channels, the previous unit gives ",
                                       channels);
                check<value_error>(u.kernel > 0 && u.stride > 0 && u.padding >= 0, "keypoint_encoder", "bad layout at ", name);
                check<shape_error>(!u.residual || (in == out && u.stride == 1 && 2 * u.padding + 1 == u.kernel), "keypoint_encoder",
                                   "residual unit ", name, " must keep its shape");
                expect_weight("keypoint_encoder", p.conv_weight, {out, in, u.kernel, u.kernel}, name + "0.weight");
                for (const auto* t : {&p.conv_bias, &p.bn_weight, &p.bn_bias, &p.running_mean, &p.running_var})
                    expect_weight("keypoint_encoder", *t, {out}, name + "0/1 per-channel tensor");
                channels = out;
                folded_.push_back(fold(ctx, p));
            }
        }
        check<shape_error>(channels > 0, "keypoint_encoder", "empty layout");
        in_channels_ = params_.blocks.front().front().conv_weight.dim(1);
        out_channels_ = channels;
    }

    /// Binds `blocks.<i>.<j>.conv_block.{0,1}.*` for every unit of cfg's layout.
    static params bind(weight_binder<B, T>& b, const config& cfg) {
        params p;
        for (std::size_t i = 0; i < cfg.blocks.size(); ++i) {
            std::vector<unit_params> units;
            for (std::size_t j = 0; j < cfg.blocks[i].size(); ++j) {
                auto s = b.scope("blocks." + std::to_string(i) + "." + std::to_string(j) + ".conv_block");
                unit_params u;
                u.conv_weight = s.tensor_any_shape("0.weight");
                const index_t out = u.conv_weight.defined() && u.conv_weight.rank() == 4 ? u.conv_weight.dim(0) : 0;
                if (out > 0) {
                    u.conv_bias = s.tensor("0.bias", {out});
                    u.bn_weight = s.tensor("1.weight", {out});
                    u.bn_bias = s.tensor("1.bias", {out});
                    u.running_mean = s.tensor("1.running_mean", {out});
                    u.running_var = s.tensor("1.running_var", {out});
                }
                units.push_back(std::move(u));
            }
            p.blocks.push_back(std::move(units));
        }
        return p;
    }

    /// Binds under `prefix` ("" for a bare state dict, "param." for golden files).
    static keypoint_encoder load(context_t<B>& ctx, const weight_source& source, const config& cfg, std::string_view prefix = "") {
        weight_binder<B, T> b(ctx, source, std::string(prefix));
        auto p = bind(b, cfg);
        b.finish();
        return keypoint_encoder(ctx, cfg, std::move(p));
    }

    /// landmark_image (B, 1, H, W) -> (B, embedding_dim, h, w); (B, 768, 1, 1) for 96x96 with the released layout.
    tensor_type forward(context_t<B>& ctx, const tensor_type& landmark_image) const {
        check_input(landmark_image);
        auto x = landmark_image;
        std::size_t k = 0;
        for (std::size_t i = 0; i < config_.blocks.size(); ++i)
            for (std::size_t j = 0; j < config_.blocks[i].size(); ++j, ++k) {
                const auto& u = config_.blocks[i][j];
                const auto& f = folded_[k];
                auto y = ops::conv2d(ctx, x, params_.blocks[i][j].conv_weight, nullptr, {.stride = u.stride, .padding = u.padding});
                y = ops::add(ctx, ops::mul(ctx, y, f.scale), f.shift);
                if (u.residual) y = ops::add(ctx, y, x);
                x = ops::relu(ctx, y);
            }
        return x;
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }
    index_t embedding_dim() const noexcept { return out_channels_; }

    /// Training mode: forward_train uses and updates batch statistics.
    void train(bool on = true) noexcept { training_ = on; }
    /// Eval mode (the default): forward_train uses the running statistics.
    void eval() noexcept { training_ = false; }
    bool training() const noexcept { return training_; }

    /// One unit's saved state.
    struct unit_saved {
        ops::conv2d_saved<B, T> conv;
        modules::detail::batch_norm_saved<B, T> norm;
        ops::unary_saved<B, T> act;
        bool residual = false;
    };
    /// What backward needs from forward_train.
    struct saved_state {
        std::vector<unit_saved> units;
        ops::needs need;
    };
    /// Gradients: `weights` mirrors params (running statistics undefined);
    /// landmark_image is defined when the input gradient was asked for.
    struct grads {
        params weights;
        tensor_type landmark_image;
    };

    /// forward() keeping what backward needs, with BatchNorm in the current
    /// mode. In training mode the running statistics are replaced by updated
    /// tensors (the old ones, possibly shared, are left alone) and forward()
    /// follows them. `need.input`: the landmark image's gradient (off by
    /// default: the image is data); `need.params`: the weights'.
    std::pair<tensor_type, saved_state> forward_train(context_t<B>& ctx, const tensor_type& landmark_image,
                                                      ops::needs need = {.input = false, .params = true}) {
        check_input(landmark_image);
        saved_state s;
        s.need = need;
        auto x = landmark_image;
        std::size_t k = 0;
        const double m = config_.batch_norm_momentum;
        for (std::size_t i = 0; i < config_.blocks.size(); ++i)
            for (std::size_t j = 0; j < config_.blocks[i].size(); ++j, ++k) {
                const auto& u = config_.blocks[i][j];
                auto& p = params_.blocks[i][j];
                unit_saved us;
                us.residual = u.residual;
                tensor_type y;
                std::tie(y, us.conv) = ops::conv2d_forward(ctx, x, p.conv_weight, &p.conv_bias, {.stride = u.stride, .padding = u.padding},
                                                           {.input = k > 0 || need.input, .params = need.params});
                const index_t c = y.dim(1);
                if (training_) {
                    const index_t count = y.numel() / c;
                    check<value_error>(count > 1, "keypoint_encoder", "training-mode BatchNorm needs more than one value per channel, got ",
                                       y.shape().str(), " at block ", i, " unit ", j);
                    const auto [mean, var] = modules::detail::batch_moments(ctx, y);
                    std::tie(y, us.norm) = modules::detail::batch_norm_apply(ctx, y, mean, var, p.bn_weight, p.bn_bias,
                                                                             config_.batch_norm_eps, true);
                    const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
                    p.running_mean = ops::add_scaled(ctx, m, mean.reshape({c}), 1.0 - m, p.running_mean);
                    p.running_var = ops::add_scaled(ctx, m * unbias, var.reshape({c}), 1.0 - m, p.running_var);
                    folded_[k] = fold(ctx, p);
                } else {
                    std::tie(y, us.norm) = modules::detail::batch_norm_apply(ctx, y, p.running_mean.reshape({1, c, 1, 1}),
                                                                             p.running_var.reshape({1, c, 1, 1}), p.bn_weight, p.bn_bias,
                                                                             config_.batch_norm_eps, false);
                }
                if (u.residual) y = ops::add(ctx, y, x);
                std::tie(x, us.act) = ops::unary_forward(ctx, unary_op::relu, y);
                s.units.push_back(std::move(us));
            }
        return {x, std::move(s)};
    }

    /// Gradients of sum(output * grad_output) for the state of one forward_train.
    grads backward(context_t<B>& ctx, const saved_state& s, const tensor_type& grad_output) const {
        check<shape_error>(!s.units.empty() && grad_output.shape() == s.units.back().act.input.shape(), "keypoint_encoder", "grad_output ",
                           grad_output.shape().str(), " does not fit the saved forward");
        grads g;
        for (const auto& block : config_.blocks) g.weights.blocks.emplace_back(block.size());
        auto d = grad_output;
        std::size_t k = s.units.size();
        for (std::size_t i = config_.blocks.size(); i-- > 0;)
            for (std::size_t j = config_.blocks[i].size(); j-- > 0;) {
                const auto& us = s.units[--k];
                d = ops::unary_backward(ctx, us.act, d);
                const auto bn = modules::detail::batch_norm_backward(ctx, us.norm, d, {.input = true, .params = s.need.params});
                const auto conv = ops::conv2d_backward(ctx, us.conv, bn.input);
                auto& gu = g.weights.blocks[i][j];
                gu.conv_weight = conv.weight;
                // Batch statistics subtract the bias again: its gradient is exactly zero
                // (what the backward kernels would return is rounding noise).
                gu.conv_bias = us.norm.batch_statistics && conv.bias.defined() ? tensor_type::zeros(ctx, conv.bias.shape()) : conv.bias;
                gu.bn_weight = bn.weight;
                gu.bn_bias = bn.bias;
                d = us.residual ? modules::detail::add_grad(ctx, conv.input, d) : conv.input;
            }
        if (s.need.input) g.landmark_image = d;
        return g;
    }

private:
    void check_input(const tensor_type& landmark_image) const {
        check<shape_error>(landmark_image.rank() == 4 && landmark_image.dim(1) == in_channels_, "keypoint_encoder", "landmark_image ",
                           landmark_image.shape().str(), " is not (B, ", in_channels_, ", H, W)");
    }

    struct folded_unit {
        tensor_type scale, shift;  ///< (1, out, 1, 1)
    };

    /// scale = gamma / sqrt(var + eps); shift = beta + (conv_bias - mean) * scale, in double.
    folded_unit fold(context_t<B>& ctx, const unit_params& p) const {
        const auto gamma = p.bn_weight.to_host(ctx), beta = p.bn_bias.to_host(ctx), mean = p.running_mean.to_host(ctx),
                   var = p.running_var.to_host(ctx), bias = p.conv_bias.to_host(ctx);
        std::vector<T> scale(gamma.size()), shift(gamma.size());
        for (std::size_t c = 0; c < gamma.size(); ++c) {
            const double s = static_cast<double>(gamma[c]) / std::sqrt(static_cast<double>(var[c]) + config_.batch_norm_eps);
            check<value_error>(std::isfinite(s), "keypoint_encoder", "BatchNorm scale is not finite (running_var + eps <= 0?)");
            scale[c] = static_cast<T>(s);
            shift[c] = static_cast<T>(static_cast<double>(beta[c]) + (static_cast<double>(bias[c]) - static_cast<double>(mean[c])) * s);
        }
        const index_t out = static_cast<index_t>(gamma.size());
        return {tensor_type::from_host(ctx, {1, out, 1, 1}, scale), tensor_type::from_host(ctx, {1, out, 1, 1}, shift)};
    }

    config config_;
    params params_;
    std::vector<folded_unit> folded_;
    index_t in_channels_ = 0, out_channels_ = 0;
    bool training_ = false;
};

}  // namespace dynamicid::modules::imr
