// dynamicid schedulers: the concepts a noise schedule and a sampler model.
//
// A pipeline is written against these concepts only, so a custom sampler
// plugs in without touching it; DDIM (ddim.hpp) is one model among others
// (examples/samplers/euler_sampler.hpp is another).
//
//   noise_schedule<S, B, T>  the training-time forward process:
//       s.num_train_timesteps()          number of training timesteps N
//       s.betas(), s.alphas_cumprod()    N values each (anything viewable as std::span<const float>)
//       s.add_noise(ctx, x0, noise, t)   x_t for per-batch timesteps t (std::span<const std::int64_t>)
//       s.velocity(ctx, x0, noise, t)    the v-prediction target
//
//   sampler<S, B, T>  the inference-time reverse process:
//       S::timestep_type                 an arithmetic type (int64 for DDIM, float for Euler)
//       s.set_timesteps(n)               choose n inference steps
//       s.timesteps()                    the timesteps to visit, in order
//       s.init_noise_sigma()             scale of the initial noise
//       s.scale_model_input(ctx, x, t)   what the denoiser sees at t
//       s.step(ctx, model_output, t, x, noise) -> x at the next timestep; `noise`
//                                        (a step_noise) feeds stochastic samplers
//
// A loop over any sampler (what generate() does, minus guidance):
//
//     template <class S> requires dynamicid::schedulers::sampler<S, B>
//     tensor<B, float> denoise(context_t<B>& ctx, S& s, tensor<B, float> x, auto&& unet) {
//         s.set_timesteps(30);
//         x = ops::scale(ctx, x, s.init_noise_sigma());
//         for (auto t : s.timesteps())
//             x = s.step(ctx, unet(s.scale_model_input(ctx, x, t), t), t, x, step_noise<B, float>{});
//         return x;
//     }
//
// (dynamicid::schedulers::denoise below is exactly that, with a seed for
// stochastic steps.) Conformance is stated next to each model:
// `static_assert(sampler<ddim_scheduler, cpu_backend>)`.
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/ops.hpp>

#include <concepts>
#include <cstdint>
#include <optional>
#include <ranges>
#include <span>
#include <type_traits>
#include <utility>

namespace dynamicid::schedulers {

/// The noise a stochastic step adds: a tensor the caller supplies (as
/// diffusers' `variance_noise`), or a Philox stream (`seed`, starting at
/// element `offset`) drawn with ops::randn in the sample's shape. Neither
/// means "no noise available": a step that needs noise then throws.
///
///     auto n1 = step_noise<B>::from(noise_tensor);
///     auto n2 = step_noise<B>::from_seed(42, step_index * sample.numel());
template <class B, class T = float>
struct step_noise {
    tensor<B, T> values{};
    std::optional<std::uint64_t> seed{};
    std::uint64_t offset = 0;

    static step_noise from(tensor<B, T> t) { return step_noise{std::move(t), std::nullopt, 0}; }
    static step_noise from_seed(std::uint64_t s, std::uint64_t off = 0) { return step_noise{{}, s, off}; }

    bool available() const noexcept { return values.defined() || seed.has_value(); }

    /// The noise for a sample of shape `s`.
    tensor<B, T> draw(context_t<B>& ctx, const shape& s) const {
        if (values.defined()) {
            check<shape_error>(values.shape() == s, "scheduler", "variance noise shape ", values.shape().str(), " differs from the sample's ",
                               s.str());
            return values;
        }
        check<value_error>(seed.has_value(), "scheduler", "this step adds noise: pass a noise tensor or a seed");
        return ops::randn<B, T>(ctx, s, *seed, offset);
    }
};

/// A training noise schedule over a fixed number of timesteps.
template <class S, class B, class T = float>
concept noise_schedule = computes_in<B, T> &&
    requires(const S& s, context_t<B>& ctx, const tensor<B, T>& x, std::span<const std::int64_t> t) {
        { s.num_train_timesteps() } -> std::convertible_to<std::int64_t>;
        { s.betas() } -> std::convertible_to<std::span<const float>>;
        { s.alphas_cumprod() } -> std::convertible_to<std::span<const float>>;
        { s.add_noise(ctx, x, x, t) } -> std::same_as<tensor<B, T>>;
        { s.velocity(ctx, x, x, t) } -> std::same_as<tensor<B, T>>;
    };

/// An inference sampler (see the file comment for each member's meaning).
template <class S, class B, class T = float>
concept sampler = computes_in<B, T> && std::is_arithmetic_v<typename S::timestep_type> &&
    requires(S& s, context_t<B>& ctx, const tensor<B, T>& x, typename S::timestep_type t, const step_noise<B, T>& noise,
             std::size_t n) {
        s.set_timesteps(n);
        { s.timesteps() } -> std::convertible_to<std::span<const typename S::timestep_type>>;
        { s.init_noise_sigma() } -> std::convertible_to<double>;
        { s.scale_model_input(ctx, x, t) } -> std::same_as<tensor<B, T>>;
        { s.step(ctx, x, t, x, noise) } -> std::same_as<tensor<B, T>>;
    };

/// Runs `sampler` from initial noise `x` (unit variance; scaled here by
/// init_noise_sigma) with `model(x_in, t) -> model_output`. Stochastic steps
/// draw from Philox stream `seed`, each step from its own range of the stream.
///
///     auto latents = denoise(ctx, ddim, ops::randn<B, float>(ctx, {1, 4, 64, 64}, seed), 30,
///                            [&](const auto& x, auto t) { return unet.forward(ctx, x, double(t), text); }, seed + 1);
template <class B, class T = float, class S, class Model>
    requires sampler<S, B, T> && std::invocable<Model&, const tensor<B, T>&, typename S::timestep_type>
tensor<B, T> denoise(context_t<B>& ctx, S& s, tensor<B, T> x, std::size_t steps, Model&& model, std::uint64_t seed = 0) {
    s.set_timesteps(steps);
    x = ops::scale(ctx, x, s.init_noise_sigma());
    // Step i draws its noise from its own window of the Philox stream, so a
    // stochastic run is reproducible whatever happened at earlier steps.
    std::uint64_t index = 0;
    for (const auto t : s.timesteps()) {
        const tensor<B, T> out = model(s.scale_model_input(ctx, x, t), t);
        x = s.step(ctx, out, t, x, step_noise<B, T>::from_seed(seed, index * static_cast<std::uint64_t>(x.numel())));
        ++index;
    }
    return x;
}

}  // namespace dynamicid::schedulers
