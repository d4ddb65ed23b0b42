// dynamicid training: dynamic loss scaling for f16 training, as torch's GradScaler does it.
//
// Each iteration: seed the backward with `scale()` (the gradient of scale *
// loss), unscale the gradients (before clipping them), step unless a gradient
// is inf or NaN, then update the scale: times backoff_factor after an
// overflow, times growth_factor after growth_interval clean steps in a row.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/training/detail/flat_ops.hpp>
#include <dynamicid/training/optim.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace dynamicid::training {

/// GradScaler's constructor arguments and defaults.
struct loss_scaler_options {
    double init_scale = 65536.0;
    double growth_factor = 2.0;
    double backoff_factor = 0.5;
    std::int64_t growth_interval = 2000;
    bool enabled = true;  ///< when false: scale() is 1, nothing is checked, every step runs
};

/// torch.amp.GradScaler for one optimizer.
///
///     training::loss_scaler scaler;                          // 65536, x2 every 2000 clean steps, x0.5 on overflow
///     auto seed = tensor::full(ctx, loss.shape(), scaler.scale());   // backward of scale * loss
///     ... backward into grads ...
///     scaler.unscale(ctx, std::span(grads));                 // before clipping
///     training::clip_grad_norm(ctx, std::span(grads), 1.0);
///     bool stepped = scaler.step(ctx, optimizer, std::span(grads));  // skipped on inf/NaN
///     scaler.update();
class loss_scaler {
public:
    explicit loss_scaler(loss_scaler_options options = {}) : options_(options) {
        check(std::isfinite(options.init_scale) && options.init_scale > 0.0, component, "init_scale must be finite and > 0, got ",
              options.init_scale);
        check(options.growth_factor > 1.0, component, "growth_factor must be > 1, got ", options.growth_factor);
        check(options.backoff_factor > 0.0 && options.backoff_factor < 1.0, component, "backoff_factor must be in (0, 1), got ",
              options.backoff_factor);
        check(options.growth_interval > 0, component, "growth_interval must be > 0, got ", options.growth_interval);
        scale_ = static_cast<float>(options.init_scale);
    }

    bool enabled() const noexcept { return options_.enabled; }
    /// The factor the loss (the backward's seed) is multiplied by; a float32 value as in torch.
    double scale() const noexcept { return options_.enabled ? static_cast<double>(scale_) : 1.0; }
    /// Clean steps since the last growth or backoff.
    std::int64_t growth_tracker() const noexcept { return growth_tracker_; }
    /// Whether the gradients unscaled in this iteration held an inf or NaN.
    bool found_inf() const noexcept { return found_inf_; }

    /// Divides the gradients by scale() in place and records whether any is
    /// non-finite; returns that. Once per iteration (between update() calls).
    template <class B, class T>
        requires backend<B>
    bool unscale(context_t<B>& ctx, std::span<const tensor<B, T>> grads) {
        if (!options_.enabled) return false;
        check(!unscaled_, component, "unscale() was already called since the last update()");
        // torch: inv_scale = float(1 / double(scale)); grads *= inv_scale, even when one is inf.
        const auto inv_scale = static_cast<float>(1.0 / static_cast<double>(scale_));
        bool inf = false;
        for (const auto& g : grads) {
            if (!g.defined()) continue;
            detail::scale_in_place(ctx, g, static_cast<double>(inv_scale));
            if (!inf && !detail::all_finite(ctx, g)) inf = true;
        }
        found_inf_ = inf;
        unscaled_ = true;
        return inf;
    }
    template <class B, class T>
        requires backend<B>
    bool unscale(context_t<B>& ctx, const std::vector<tensor<B, T>>& grads) {
        return unscale(ctx, std::span<const tensor<B, T>>(grads));
    }

    /// Unscales (unless already done this iteration) and runs optimizer.step
    /// unless a gradient was inf or NaN. Returns whether the step ran.
    template <class B, class T>
    bool step(context_t<B>& ctx, adamw<B, T>& optimizer, std::span<const tensor<B, T>> grads) {
        if (options_.enabled && !unscaled_) unscale(ctx, grads);
        if (options_.enabled && found_inf_) return false;
        optimizer.step(ctx, grads);
        return true;
    }
    template <class B, class T>
    bool step(context_t<B>& ctx, adamw<B, T>& optimizer, const std::vector<tensor<B, T>>& grads) {
        return step(ctx, optimizer, std::span<const tensor<B, T>>(grads));
    }

    /// Ends the iteration: backs off after an overflow, grows after
    /// growth_interval clean iterations, and clears the per-iteration state.
    void update() {
        if (!options_.enabled) return;
        check(unscaled_, component, "update() without unscale() or step() in this iteration: no inf checks were recorded");
        if (found_inf_) {
            scale_ = scale_ * static_cast<float>(options_.backoff_factor);
            growth_tracker_ = 0;
        } else if (++growth_tracker_ == options_.growth_interval) {
            const auto grown = static_cast<float>(static_cast<double>(scale_) * options_.growth_factor);
            if (std::isfinite(grown)) scale_ = grown;
            growth_tracker_ = 0;
        }
        unscaled_ = found_inf_ = false;
    }

    /// For checkpoints: the scale and growth tracker, restored by load_state.
    struct state {
        double scale = 65536.0;
        std::int64_t growth_tracker = 0;
    };
    state get_state() const noexcept { return {static_cast<double>(scale_), growth_tracker_}; }
    void load_state(const state& s) {
        check(std::isfinite(s.scale) && s.scale > 0.0, component, "scale must be finite and > 0, got ", s.scale);
        check(s.growth_tracker >= 0 && s.growth_tracker < options_.growth_interval, component, "growth_tracker ",
              s.growth_tracker, " is outside [0, growth_interval)");
        scale_ = static_cast<float>(s.scale);
        growth_tracker_ = s.growth_tracker;
        unscaled_ = found_inf_ = false;
    }

private:
    static constexpr const char* component = "loss_scaler";

    loss_scaler_options options_;
    float scale_ = 65536.0f;
    std::int64_t growth_tracker_ = 0;
    bool unscaled_ = false, found_inf_ = false;
};

}  // namespace dynamicid::training
