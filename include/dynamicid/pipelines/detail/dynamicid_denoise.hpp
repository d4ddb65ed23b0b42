// dynamicid pipelines (detail): the denoising loop with caller-supplied
// encoder states and attention hooks.
//
// The same loop as text_to_image::generate (same noise streams, guidance and
// cancellation points; text_to_image_controls::encoder_states / hooks give
// it the same inputs) over a bare UNet and sampler, for callers that hold no
// text encoder or VAE: dynamicid_pipeline::run_denoiser. hooks.step is the
// evaluation index (0, 1, ...: one per denoising step, the CFG halves batched
// in one evaluation). The pipeline test checks both loops agree exactly.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/ops.hpp>
#include <dynamicid/schedulers/concepts.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <stop_token>
#include <vector>

namespace dynamicid::pipelines::detail {

/// One denoising run. `states` is (2N, L, C) [uncond rows ; cond rows] when
/// guided (guidance_scale > 1), else (N, L, C).
template <class B, class T>
struct denoise_request {
    tensor<B, T> states;
    tensor<B, T> latents;  ///< (N, C, h, w) unit-variance noise (scaled by init_noise_sigma here)
    double guidance_scale = 5.0;
    std::size_t steps = 50;
    double eta = 0.0;
    std::uint64_t seed = 0;
    modules::unet::attention_hooks<B, T>* hooks = nullptr;  ///< step is overwritten per evaluation
    std::function<void(std::size_t, double, const tensor<B, T>&)> on_step{};
    std::function<void(std::size_t, std::size_t)> on_progress{};
    std::stop_token stop{};
    const std::atomic<bool>* cancel = nullptr;
    /// UNet evaluations through step_runner: recorded once per graph_variant
    /// value and replayed (see text_to_image_controls::capture_steps).
    bool capture_steps = true;
    std::function<std::uint64_t(std::size_t step)> graph_variant{};
};

template <class B, class T>
void check_cancel(const denoise_request<B, T>& r) {
    if (r.stop.stop_requested() || (r.cancel && r.cancel->load(std::memory_order_relaxed)))
        throw cancelled_error("pipeline", "generation cancelled");
}

/// Runs the sampler (a copy) and returns the final latents.
template <class B, class T, class Sampler>
    requires schedulers::sampler<Sampler, B, T>
tensor<B, T> denoise_states(context_t<B>& ctx, const modules::unet::unet_2d_condition<B, T>& unet, Sampler s,
                            const denoise_request<B, T>& r) {
    const bool guided = r.guidance_scale > 1.0;
    const index_t n = r.latents.dim(0);
    check<shape_error>(r.states.rank() == 3 && r.states.dim(0) == (guided ? 2 * n : n), "pipeline", "encoder states ",
                       r.states.shape().str(), " do not match ", n, " latents", guided ? " with guidance (uncond + cond rows)" : "");
    check<value_error>(r.steps >= 1, "pipeline", "steps must be at least 1");
    if constexpr (requires { s.set_eta(r.eta); }) {
        s.set_eta(r.eta);
    } else {
        check<value_error>(r.eta == 0.0, "pipeline", "eta ", r.eta, " needs a sampler with set_eta()");
    }
    s.set_timesteps(r.steps);
    tensor<B, T> x = ops::scale(ctx, r.latents, static_cast<double>(s.init_noise_sigma()));
    const auto timesteps = std::span<const typename Sampler::timestep_type>(s.timesteps());
    const std::size_t total = timesteps.size();
    const auto per_step = static_cast<std::uint64_t>(r.latents.numel());
    step_runner<B> runner;
    runner.enabled = r.capture_steps && (!r.hooks || r.graph_variant);
    for (std::size_t i = 0; i < total; ++i) {
        const auto t = timesteps[i];
        check_cancel(r);
        const tensor<B, T> in = s.scale_model_input(ctx, x, t);
        const tensor<B, T> model_in = guided ? ops::concat(ctx, std::vector<tensor<B, T>>{in, in}, 0) : in;
        const std::vector<float> ts(static_cast<std::size_t>(model_in.dim(0)), static_cast<float>(t));
        if (r.hooks) r.hooks->step = static_cast<std::int64_t>(i);
        const tensor<B, T> features = unet.time_features(ctx, ts);
        tensor<B, T> eps = runner.run(
            ctx, r.graph_variant ? r.graph_variant(i) : 0,
            [&](const tensor<B, T>& sample, const tensor<B, T>& f) { return unet.forward_features(ctx, sample, f, r.states, r.hooks); },
            model_in, features);
        if (guided) {
            const tensor<B, T> uncond = eps.narrow_leading(0, n);
            const tensor<B, T> cond = eps.narrow_leading(n, n);
            eps = ops::add_scaled(ctx, 1.0, uncond, r.guidance_scale, ops::sub(ctx, cond, uncond));
        }
        x = s.step(ctx, eps, t, x, schedulers::step_noise<B, T>::from_seed(r.seed, per_step * (i + 1)));
        if (r.on_step) r.on_step(i, static_cast<double>(t), x);
        if (r.on_progress) r.on_progress(i + 1, total);
    }
    check_cancel(r);
    return x;
}

}  // namespace dynamicid::pipelines::detail
