// dynamicid training: learning-rate schedules as diffusers' get_scheduler builds them.
//
// A schedule maps the optimizer step index (0 for the first step) to a factor
// of the base learning rate, exactly as torch's LambdaLR does with diffusers'
// lambdas, so `lr(step)` equals `optimizer.param_groups[g]["lr"]` before the
// step-th `optimizer.step()` of a diffusers training script.
#pragma once

#include <dynamicid/core/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <string_view>

namespace dynamicid::training {

/// The schedule families of diffusers.optimization.get_scheduler supported here.
enum class lr_schedule_kind : std::uint8_t {
    constant,              ///< factor 1
    constant_with_warmup,  ///< step / warmup during warm-up, then 1
    linear,                ///< warm-up, then linear decay to 0 at total_steps
    cosine,                ///< warm-up, then half a cosine period down to 0 at total_steps
};

/// A learning-rate schedule: `lr(step) = base_lr * factor(step)`.
///
///     training::lr_schedule s{.kind = training::lr_schedule_kind::linear, .base_lr = 1e-4,
///                             .warmup_steps = 500, .total_steps = 10000};
///     for (std::int64_t step = 0; step < 10000; ++step) {
///         optimizer.set_lr(s.lr(step));  // every group, or per group with set_lr(g, ...)
///         ...
///     }
struct lr_schedule {
    lr_schedule_kind kind = lr_schedule_kind::constant;
    double base_lr = 1e-4;
    std::int64_t warmup_steps = 0;
    std::int64_t total_steps = 0;  ///< used by linear and cosine
    double num_cycles = 0.5;       ///< cosine only, as diffusers' default

    /// The multiplier of base_lr at `step` (diffusers' lr_lambda).
    double factor(std::int64_t step) const {
        check(step >= 0, "lr_schedule", "step must be >= 0, got ", step);
        check(warmup_steps >= 0 && total_steps >= 0, "lr_schedule", "warmup_steps and total_steps must be >= 0");
        const auto d = [](std::int64_t v) { return static_cast<double>(v); };
        switch (kind) {
            case lr_schedule_kind::constant:
                return 1.0;
            case lr_schedule_kind::constant_with_warmup:
                if (step < warmup_steps) return d(step) / d(std::max<std::int64_t>(1, warmup_steps));
                return 1.0;
            case lr_schedule_kind::linear:
                if (step < warmup_steps) return d(step) / d(std::max<std::int64_t>(1, warmup_steps));
                return std::max(0.0, d(total_steps - step) / d(std::max<std::int64_t>(1, total_steps - warmup_steps)));
            case lr_schedule_kind::cosine: {
                if (step < warmup_steps) return d(step) / d(std::max<std::int64_t>(1, warmup_steps));
                const double progress = d(step - warmup_steps) / d(std::max<std::int64_t>(1, total_steps - warmup_steps));
                return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * num_cycles * 2.0 * progress)));
            }
        }
        return 1.0;
    }

    /// The learning rate of step `step`.
    double lr(std::int64_t step) const { return base_lr * factor(step); }
};

/// Parses diffusers' scheduler names: "constant", "constant_with_warmup", "linear", "cosine".
inline lr_schedule_kind lr_schedule_kind_from_name(std::string_view name) {
    if (name == "constant") return lr_schedule_kind::constant;
    if (name == "constant_with_warmup") return lr_schedule_kind::constant_with_warmup;
    if (name == "linear") return lr_schedule_kind::linear;
    if (name == "cosine") return lr_schedule_kind::cosine;
    throw value_error("lr_schedule", "unknown schedule '" + std::string(name) +
                                         "' (expected constant, constant_with_warmup, linear or cosine)");
}

}  // namespace dynamicid::training
