// dynamicid schedulers: DDIM (Song et al., "Denoising Diffusion Implicit Models"),
// step for step as diffusers' DDIMScheduler.
//
// For timestep t and prev = t - N / n (integer division, whatever the spacing,
// as diffusers does), with abar the schedule's alphas_cumprod and
// abar_prev = abar[prev] or, for prev < 0, 1 (set_alpha_to_one) / abar[0]:
//
//   x0   = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)     epsilon
//        = model_output                                  sample
//        = sqrt(abar_t) x - sqrt(1 - abar_t) v            v_prediction
//   eps  = model_output | (x - sqrt(abar_t) x0) / sqrt(1 - abar_t) | sqrt(abar_t) v + sqrt(1 - abar_t) x
//   x0   = clamp(x0, -clip_sample_range, clip_sample_range)  when clip_sample
//   sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
//   x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma * noise
//
// Timesteps (N training steps, n inference steps):
//   leading   arange(n) * (N / n), reversed, + steps_offset
//   trailing  round(arange(N, 0, -N / n)) - 1           (float ratio, numpy's arange: for
//             some n it yields n + 1 values ending in -1, which diffusers then
//             steps with alphas_cumprod[-1]; reproduced here)
//   linspace  round(linspace(0, N - 1, n)), reversed
//
// Everything on tensors is an op (scalars are computed on the host), so the
// scheduler runs on any backend. Dynamic thresholding (a per-sample quantile)
// has no op and is refused with unsupported_error.
//
//     using namespace dynamicid::schedulers;
//     auto ddim = ddim_scheduler::from_json_file("sd15/scheduler/scheduler_config.json");
//     ddim.set_timesteps(30);
//     for (auto t : ddim.timesteps()) {
//         auto eps = unet.forward(ctx, latents, double(t), text);
//         latents = ddim.step(ctx, eps, t, latents);
//     }
#pragma once

#include <dynamicid/schedulers/concepts.hpp>
#include <dynamicid/schedulers/ddpm.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace dynamicid::schedulers {

/// How inference timesteps are spread over the training range.
enum class timestep_spacing { leading, trailing, linspace };

namespace detail {
inline timestep_spacing parse_spacing(const std::string& s) {
    if (s == "leading") return timestep_spacing::leading;
    if (s == "trailing") return timestep_spacing::trailing;
    if (s == "linspace") return timestep_spacing::linspace;
    throw unsupported_error("scheduler", "timestep_spacing '" + s + "' is not supported");
}
}  // namespace detail

/// DDIMScheduler's configuration: diffusers' keys and defaults, plus the two
/// step() options diffusers takes per call (eta, use_clipped_model_output).
struct ddim_config {
    noise_schedule_config schedule = {};
    bool clip_sample = true;
    double clip_sample_range = 1.0;
    bool set_alpha_to_one = true;
    std::int64_t steps_offset = 0;
    schedulers::prediction_type prediction_type = schedulers::prediction_type::epsilon;
    schedulers::timestep_spacing timestep_spacing = schedulers::timestep_spacing::leading;
    bool thresholding = false;  ///< unsupported: must stay false
    double dynamic_thresholding_ratio = 0.995;
    double sample_max_value = 1.0;
    double eta = 0.0;                       ///< 0: deterministic DDIM; 1: DDPM-like
    bool use_clipped_model_output = false;  ///< re-derive eps from the clipped x0

    /// SD1.5's released scheduler settings (scaled_linear 0.00085..0.012,
    /// set_alpha_to_one false, steps_offset 1, no clipping).
    static ddim_config stable_diffusion_v1() {
        ddim_config c;
        c.schedule.beta_schedule = beta_schedule::scaled_linear;
        c.schedule.beta_start = 0.00085;
        c.schedule.beta_end = 0.012;
        c.clip_sample = false;
        c.set_alpha_to_one = false;
        c.steps_offset = 1;
        return c;
    }

    /// From a diffusers scheduler_config.json object. Keys of other schedulers
    /// (SD1.5 ships a PNDMScheduler config) are ignored; missing keys take
    /// DDIMScheduler's defaults, as DDIMScheduler.from_config does.
    static ddim_config from_json(const nlohmann::json& j) {
        ddim_config c;
        detail::read_schedule_keys(j, c.schedule);
        detail::read_key(j, "clip_sample", c.clip_sample);
        detail::read_key(j, "clip_sample_range", c.clip_sample_range);
        detail::read_key(j, "set_alpha_to_one", c.set_alpha_to_one);
        detail::read_key(j, "steps_offset", c.steps_offset);
        detail::read_key(j, "thresholding", c.thresholding);
        detail::read_key(j, "dynamic_thresholding_ratio", c.dynamic_thresholding_ratio);
        detail::read_key(j, "sample_max_value", c.sample_max_value);
        std::string s;
        detail::read_key(j, "prediction_type", s);
        if (!s.empty()) c.prediction_type = detail::parse_prediction_type(s);
        s.clear();
        detail::read_key(j, "timestep_spacing", s);
        if (!s.empty()) c.timestep_spacing = detail::parse_spacing(s);
        return c;
    }
};

/// DDIM; models `sampler` and `noise_schedule`.
///
///     ddim_scheduler ddim(ddim_config::stable_diffusion_v1());
///     ddim.set_timesteps(50);                 // 981, 961, ..., 1
///     x = ddim.step(ctx, eps, ddim.timesteps()[0], x);
class ddim_scheduler {
public:
    using config = ddim_config;
    using timestep_type = std::int64_t;

    ddim_scheduler() : ddim_scheduler(config{}) {}

    explicit ddim_scheduler(const config& c) : config_(c), schedule_(c.schedule) {
        check<unsupported_error>(!c.thresholding, "ddim", "dynamic thresholding is not supported (it needs a per-sample quantile)");
        check<value_error>(c.eta >= 0.0, "ddim", "eta must be >= 0, got ", c.eta);
        final_alpha_cumprod_ = c.set_alpha_to_one ? 1.0 : schedule_.alphas_cumprod().front();
        // Until set_timesteps: every training timestep, as diffusers.
        for (std::int64_t t = num_train_timesteps() - 1; t >= 0; --t) timesteps_.push_back(t);
    }

    /// From a diffusers scheduler_config.json object (see ddim_config::from_json).
    static ddim_scheduler from_json(const nlohmann::json& j) { return ddim_scheduler(config::from_json(j)); }
    static ddim_scheduler from_json_file(const std::filesystem::path& path) { return from_json(detail::read_json_file(path)); }

    const config& settings() const noexcept { return config_; }
    /// Step options may change between runs.
    void set_eta(double eta) {
        check<value_error>(eta >= 0.0, "ddim", "eta must be >= 0, got ", eta);
        config_.eta = eta;
    }

    // ---- noise_schedule ------------------------------------------------------------
    std::int64_t num_train_timesteps() const noexcept { return schedule_.num_train_timesteps(); }
    const std::vector<float>& betas() const noexcept { return schedule_.betas(); }
    const std::vector<float>& alphas_cumprod() const noexcept { return schedule_.alphas_cumprod(); }
    const ddpm_schedule& schedule() const noexcept { return schedule_; }

    template <class B, class T>
        requires computes_in<B, T>
    tensor<B, T> add_noise(context_t<B>& ctx, const tensor<B, T>& x0, const tensor<B, T>& noise, std::span<const std::int64_t> t) const {
        return schedule_.add_noise(ctx, x0, noise, t);
    }
    template <class B, class T>
        requires computes_in<B, T>
    tensor<B, T> velocity(context_t<B>& ctx, const tensor<B, T>& x0, const tensor<B, T>& noise, std::span<const std::int64_t> t) const {
        return schedule_.velocity(ctx, x0, noise, t);
    }

    // ---- sampler -------------------------------------------------------------------
    void set_timesteps(std::size_t n) {
        const std::int64_t N = num_train_timesteps();
        check<value_error>(n >= 1 && static_cast<std::int64_t>(n) <= N, "ddim", "num_inference_steps ", n, " must be in [1, ", N, "]");
        num_inference_steps_ = static_cast<std::int64_t>(n);
        timesteps_.clear();
        const auto count = static_cast<std::int64_t>(n);
        switch (config_.timestep_spacing) {
            case timestep_spacing::leading: {
                const std::int64_t ratio = N / count;
                for (std::int64_t i = count - 1; i >= 0; --i) timesteps_.push_back(i * ratio + config_.steps_offset);
                break;
            }
            case timestep_spacing::trailing: {
                // numpy: arange(N, 0, -ratio) has ceil(N / ratio) elements start + i * delta,
                // delta = (start - ratio) - start; then round half to even, minus one.
                const double ratio = static_cast<double>(N) / static_cast<double>(count);
                const double start = static_cast<double>(N);
                const auto len = static_cast<std::int64_t>(std::ceil((0.0 - start) / -ratio));
                const double delta = (start + -ratio) - start;
                for (std::int64_t i = 0; i < len; ++i)
                    timesteps_.push_back(static_cast<std::int64_t>(std::nearbyint(start + static_cast<double>(i) * delta)) - 1);
                break;
            }
            case timestep_spacing::linspace: {
                // numpy.linspace(0, N - 1, n): i * step, the last exactly N - 1.
                const double stop = static_cast<double>(N - 1);
                std::vector<std::int64_t> up;
                const double step = count > 1 ? stop / static_cast<double>(count - 1) : 0.0;
                for (std::int64_t i = 0; i < count; ++i) {
                    const double v = (count > 1 && i == count - 1) ? stop : static_cast<double>(i) * step;
                    up.push_back(static_cast<std::int64_t>(std::nearbyint(v)));
                }
                timesteps_.assign(up.rbegin(), up.rend());
                break;
            }
        }
    }

    const std::vector<std::int64_t>& timesteps() const noexcept { return timesteps_; }
    std::int64_t num_inference_steps() const noexcept { return num_inference_steps_; }
    double init_noise_sigma() const noexcept { return 1.0; }

    /// DDIM does not scale the model input.
    template <class B, class T>
        requires computes_in<B, T>
    tensor<B, T> scale_model_input(context_t<B>&, const tensor<B, T>& sample, std::int64_t) const {
        return sample;
    }

    /// One DDIM step from timestep t (see the file comment). `noise` is used
    /// only when eta > 0.
    template <class B, class T>
        requires computes_in<B, T>
    tensor<B, T> step(context_t<B>& ctx, const tensor<B, T>& model_output, std::int64_t t, const tensor<B, T>& sample,
                      const step_noise<B, T>& noise = {}) const {
        check<value_error>(num_inference_steps_ > 0, "ddim", "call set_timesteps() before step()");
        check<shape_error>(model_output.shape() == sample.shape(), "ddim", "model output ", model_output.shape().str(), " and sample ",
                           sample.shape().str(), " differ");
        const std::int64_t prev = t - num_train_timesteps() / num_inference_steps_;
        // Coefficients as diffusers computes them: float32 abar values, then float32 arithmetic.
        // A negative t indexes from the end, as a Python index does: "trailing"
        // spacing can produce t = -1 (numpy's arange overshoots for some n) and
        // diffusers then reads alphas_cumprod[-1].
        check<value_error>(t >= -num_train_timesteps() && t < num_train_timesteps(), "ddim", "timestep ", t, " outside [",
                           -num_train_timesteps(), ", ", num_train_timesteps(), ")");
        const float a_t = static_cast<float>(schedule_.alpha_cumprod(t < 0 ? t + num_train_timesteps() : t));
        const float a_prev = prev >= 0 ? static_cast<float>(schedule_.alpha_cumprod(prev)) : static_cast<float>(final_alpha_cumprod_);
        const float b_t = 1.0f - a_t;
        const double sa = std::sqrt(a_t), sb = std::sqrt(b_t);

        tensor<B, T> x0, eps;
        switch (config_.prediction_type) {
            case prediction_type::epsilon:
                x0 = ops::add_scaled(ctx, -sb / sa, model_output, 1.0 / sa, sample);
                eps = model_output;
                break;
            case prediction_type::sample:
                x0 = model_output;
                eps = ops::add_scaled(ctx, -sa / sb, model_output, 1.0 / sb, sample);
                break;
            case prediction_type::v_prediction:
                x0 = ops::add_scaled(ctx, sa, sample, -sb, model_output);
                eps = ops::add_scaled(ctx, sa, model_output, sb, sample);
                break;
        }
        if (config_.clip_sample) {
            const auto r = static_cast<float>(config_.clip_sample_range);
            const auto hi = tensor<B, T>::full(ctx, {1}, element_cast<T>(r));
            const auto lo = tensor<B, T>::full(ctx, {1}, element_cast<T>(-r));
            x0 = ops::binary(ctx, binary_op::minimum, ops::binary(ctx, binary_op::maximum, x0, lo), hi);
        }
        const float variance = (1.0f - a_prev) / b_t * (1.0f - a_t / a_prev);
        const double std_dev = config_.eta * std::sqrt(static_cast<double>(variance));
        if (config_.use_clipped_model_output) eps = ops::add_scaled(ctx, -sa / sb, x0, 1.0 / sb, sample);
        const double direction = std::sqrt(static_cast<double>(1.0f - a_prev) - std_dev * std_dev);
        auto prev_sample = ops::add_scaled(ctx, std::sqrt(static_cast<double>(a_prev)), x0, direction, eps);
        if (config_.eta > 0.0) {
            const auto z = noise.draw(ctx, sample.shape());
            ops::accumulate(ctx, prev_sample, ops::scale(ctx, z, std_dev));
        }
        return prev_sample;
    }

private:
    config config_;
    ddpm_schedule schedule_;
    double final_alpha_cumprod_ = 1.0;
    std::int64_t num_inference_steps_ = 0;
    std::vector<std::int64_t> timesteps_;

};

}  // namespace dynamicid::schedulers
