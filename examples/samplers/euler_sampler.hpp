// Example: a custom sampler written against dynamicid's scheduler concepts only.
//
// Euler's method on the probability-flow ODE in the k-diffusion
// parameterisation (Karras et al. 2022), step for step as diffusers'
// EulerDiscreteScheduler with its defaults (s_churn = 0, linear sigma
// interpolation, final sigma 0):
//
//   sigma_i   = sqrt((1 - abar) / abar) interpolated at timestep t_i
//   input     = x / sqrt(sigma_i^2 + 1)                 (scale_model_input)
//   x0        = x - sigma_i * eps                       (epsilon)
//             = -sigma_i / sqrt(sigma_i^2 + 1) * v + x / (sigma_i^2 + 1)   (v_prediction)
//   x_next    = x + (x - x0) / sigma_i * (sigma_{i+1} - sigma_i)
//
// It reads nothing but what `noise_schedule` promises (num_train_timesteps,
// alphas_cumprod) and provides what `sampler` asks for, so a pipeline written
// for DDIM runs it unchanged:
//
//     using namespace dynamicid::schedulers;
//     ddpm_schedule train({.beta_schedule = beta_schedule::scaled_linear, .beta_start = 0.00085, .beta_end = 0.012});
//     examples::euler_sampler<cpu_backend, float, ddpm_schedule> euler(train, {});
//     auto latents = denoise(ctx, euler, noise, 30, unet_fn);
#pragma once

#include <dynamicid/schedulers/concepts.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

namespace dynamicid::schedulers::examples {

/// Where the inference timesteps sit (as diffusers' timestep_spacing).
enum class euler_spacing { linspace, leading, trailing };

struct euler_config {
    euler_spacing spacing = euler_spacing::linspace;
    std::int64_t steps_offset = 0;
    bool v_prediction = false;  ///< else epsilon
};

/// Euler discrete sampler over any noise schedule `S`.
template <class B, class T, class S>
    requires noise_schedule<S, B, T>
class euler_sampler {
public:
    using timestep_type = float;
    using config = euler_config;

    euler_sampler(S schedule, config c) : schedule_(std::move(schedule)), config_(c) {
        // sqrt((1 - abar) / abar) in float32, as diffusers computes it from torch tensors.
        for (const float abar : std::span<const float>(schedule_.alphas_cumprod()))
            train_sigmas_.push_back(std::sqrt((1.0f - abar) / abar));
    }

    void set_timesteps(std::size_t n) {
        const auto N = static_cast<std::int64_t>(schedule_.num_train_timesteps());
        check<value_error>(n >= 1 && static_cast<std::int64_t>(n) <= N, "euler", "steps ", n, " must be in [1, ", N, "]");
        const auto count = static_cast<std::int64_t>(n);
        std::vector<double> ts;
        switch (config_.spacing) {
            case euler_spacing::linspace: {
                const double stop = static_cast<double>(N - 1), step = count > 1 ? stop / static_cast<double>(count - 1) : 0.0;
                for (std::int64_t i = count - 1; i >= 0; --i)
                    ts.push_back(count > 1 && i == count - 1 ? stop : static_cast<double>(i) * step);
                break;
            }
            case euler_spacing::leading: {
                const std::int64_t ratio = N / count;
                for (std::int64_t i = count - 1; i >= 0; --i) ts.push_back(static_cast<double>(i * ratio + config_.steps_offset));
                break;
            }
            case euler_spacing::trailing: {
                const double ratio = static_cast<double>(N) / static_cast<double>(count), start = static_cast<double>(N);
                const auto len = static_cast<std::int64_t>(std::ceil(start / ratio));
                const double delta = (start - ratio) - start;
                for (std::int64_t i = 0; i < len; ++i) ts.push_back(std::nearbyint(start + static_cast<double>(i) * delta) - 1.0);
                break;
            }
        }
        timesteps_.clear();
        sigmas_.clear();
        for (const double t : ts) {
            const float tf = static_cast<float>(t);  // timesteps are float32 in the reference
            timesteps_.push_back(tf);
            sigmas_.push_back(static_cast<float>(interpolate(static_cast<double>(tf))));
        }
        sigmas_.push_back(0.0f);
        step_index_.reset();
    }

    const std::vector<float>& timesteps() const noexcept { return timesteps_; }
    const std::vector<float>& sigmas() const noexcept { return sigmas_; }

    double init_noise_sigma() const {
        const float max_sigma = sigmas_.empty() ? 0.0f : *std::max_element(sigmas_.begin(), sigmas_.end());
        if (config_.spacing == euler_spacing::leading) return std::sqrt(max_sigma * max_sigma + 1.0f);
        return max_sigma;
    }

    tensor<B, T> scale_model_input(context_t<B>& ctx, const tensor<B, T>& x, float t) {
        const float sigma = sigmas_[index_for(t)];
        return ops::scale(ctx, x, 1.0 / static_cast<double>(std::sqrt(sigma * sigma + 1.0f)));
    }

    tensor<B, T> step(context_t<B>& ctx, const tensor<B, T>& model_output, float t, const tensor<B, T>& x, const step_noise<B, T>& = {}) {
        const std::size_t i = index_for(t);
        const float sigma = sigmas_[i], next = sigmas_[i + 1];
        tensor<B, T> x0;
        if (config_.v_prediction) {
            const float norm = sigma * sigma + 1.0f;
            x0 = ops::add_scaled(ctx, -sigma / std::sqrt(norm), model_output, 1.0 / norm, x);
        } else {
            x0 = ops::add_scaled(ctx, -static_cast<double>(sigma), model_output, 1.0, x);
        }
        const auto derivative = ops::scale(ctx, ops::sub(ctx, x, x0), 1.0 / static_cast<double>(sigma));
        step_index_ = i + 1;
        return ops::add_scaled(ctx, static_cast<double>(next - sigma), derivative, 1.0, x);
    }

private:
    S schedule_;
    config config_;
    std::vector<float> train_sigmas_, timesteps_, sigmas_;
    std::optional<std::size_t> step_index_;

    // numpy.interp(t, arange(N), train_sigmas) in double.
    double interpolate(double t) const {
        const auto last = static_cast<double>(train_sigmas_.size() - 1);
        if (t <= 0.0) return train_sigmas_.front();
        if (t >= last) return train_sigmas_.back();
        const auto lo = static_cast<std::size_t>(std::floor(t));
        const double frac = t - static_cast<double>(lo);
        const double a = train_sigmas_[lo], b = train_sigmas_[lo + 1];
        return a + (b - a) * frac;
    }

    // Like the reference: the first call finds t (its second occurrence when
    // repeated, for img2img restarts); later calls follow the step counter.
    std::size_t index_for(float t) {
        if (!step_index_) {
            std::vector<std::size_t> hits;
            for (std::size_t i = 0; i < timesteps_.size(); ++i)
                if (timesteps_[i] == t) hits.push_back(i);
            check<value_error>(!hits.empty(), "euler", "timestep ", t, " is not in the schedule (call set_timesteps first)");
            step_index_ = hits.size() > 1 ? hits[1] : hits[0];
        }
        check<value_error>(*step_index_ + 1 < sigmas_.size(), "euler", "stepped past the last timestep");
        return *step_index_;
    }
};

}  // namespace dynamicid::schedulers::examples
