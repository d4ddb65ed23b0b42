// dynamicid schedulers: the DDPM training noise schedule.
//
// betas, alphas = 1 - betas and alphas_cumprod = prod(alphas[0..t]) exactly
// as diffusers' DDPMScheduler builds them (float32 values; the cumulative
// product accumulated in double as torch's CPU cumprod does), plus the
// forward (noising) process used in training:
//
//     add_noise(x0, noise, t) = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise
//     velocity(x0, noise, t)  = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0
//
// with one timestep per batch element (the leading axis). The per-element
// coefficients are computed on the host and broadcast by ops, so this runs
// on any backend.
//
//     dynamicid::schedulers::ddpm_schedule sched({.beta_schedule = dynamicid::schedulers::beta_schedule::scaled_linear,
//                                                 .beta_start = 0.00085, .beta_end = 0.012});
//     auto t = sched.sample_training_timesteps(latents.dim(0), seed);
//     auto noisy = sched.add_noise(ctx, latents, noise, t);
//     auto target = sched.velocity(ctx, latents, noise, t);   // for v-prediction training
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/philox.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/ops.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace dynamicid::schedulers {

/// How betas are spaced over the training timesteps (diffusers' `beta_schedule`).
enum class beta_schedule {
    linear,             ///< linspace(beta_start, beta_end)
    scaled_linear,      ///< linspace(sqrt(beta_start), sqrt(beta_end))^2 (Stable Diffusion)
    squaredcos_cap_v2,  ///< the Glide cosine schedule, betas capped at 0.999
    sigmoid,            ///< sigmoid(linspace(-6, 6)) * (beta_end - beta_start) + beta_start (DDPM only in diffusers)
};

/// What the denoising model predicts (diffusers' `prediction_type`).
enum class prediction_type { epsilon, v_prediction, sample };

/// The noise schedule's parameters, named as in diffusers' scheduler_config.json.
struct noise_schedule_config {
    std::int64_t num_train_timesteps = 1000;
    schedulers::beta_schedule beta_schedule = schedulers::beta_schedule::linear;
    double beta_start = 0.0001;
    double beta_end = 0.02;
    std::vector<double> trained_betas = {};  ///< when non-empty, used instead of the above
    bool rescale_betas_zero_snr = false;     ///< rescale to zero terminal SNR (Lin et al. 2023)
};

namespace detail {

inline beta_schedule parse_beta_schedule(const std::string& s) {
    if (s == "linear") return beta_schedule::linear;
    if (s == "scaled_linear") return beta_schedule::scaled_linear;
    if (s == "squaredcos_cap_v2") return beta_schedule::squaredcos_cap_v2;
    if (s == "sigmoid") return beta_schedule::sigmoid;
    throw unsupported_error("scheduler", "beta_schedule '" + s + "' is not supported");
}

inline prediction_type parse_prediction_type(const std::string& s) {
    if (s == "epsilon") return prediction_type::epsilon;
    if (s == "v_prediction") return prediction_type::v_prediction;
    if (s == "sample") return prediction_type::sample;
    throw unsupported_error("scheduler", "prediction_type '" + s + "' is not supported");
}

/// Reads a JSON key into `out` when present and not null.
template <class V>
void read_key(const nlohmann::json& j, const char* key, V& out) {
    if (!j.contains(key) || j[key].is_null()) return;
    try {
        out = j[key].get<V>();
    } catch (const nlohmann::json::exception& e) {
        throw value_error("scheduler", std::string("config key \"") + key + "\" has the wrong type: " + e.what());
    }
}

inline nlohmann::json read_json_file(const std::filesystem::path& path) {
    std::ifstream in(path);
    check<io_error>(static_cast<bool>(in), "scheduler", "cannot open ", path.string());
    try {
        return nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        throw io_error("scheduler", path.string() + ": not valid JSON: " + e.what());
    }
}

inline void read_schedule_keys(const nlohmann::json& j, noise_schedule_config& c) {
    check<value_error>(j.is_object(), "scheduler", "scheduler config must be a JSON object");
    read_key(j, "num_train_timesteps", c.num_train_timesteps);
    read_key(j, "beta_start", c.beta_start);
    read_key(j, "beta_end", c.beta_end);
    std::string schedule;
    read_key(j, "beta_schedule", schedule);
    if (!schedule.empty()) c.beta_schedule = parse_beta_schedule(schedule);
    read_key(j, "trained_betas", c.trained_betas);
    read_key(j, "rescale_betas_zero_snr", c.rescale_betas_zero_snr);
}

/// torch.linspace(start, end, n, dtype=float32) on the CPU: both ends are
/// exact, each half counted from its own end (torch's vectorised loop can
/// differ from this in the last bit).
inline std::vector<float> linspace_f32(double start, double end, std::int64_t n) {
    std::vector<float> out(static_cast<std::size_t>(n));
    if (n == 1) {
        out[0] = static_cast<float>(start);
        return out;
    }
    const float s = static_cast<float>(start), e = static_cast<float>(end);
    const float step = (e - s) / static_cast<float>(n - 1);
    const std::int64_t halfway = n / 2;
    for (std::int64_t i = 0; i < n; ++i)
        out[static_cast<std::size_t>(i)] = i < halfway ? s + step * static_cast<float>(i) : e - step * static_cast<float>(n - i - 1);
    return out;
}

/// torch.cumprod on float32 (CPU): the running product is kept in double.
inline std::vector<float> cumprod_f32(const std::vector<float>& x) {
    std::vector<float> out(x.size());
    double acc = 1.0;
    for (std::size_t i = 0; i < x.size(); ++i) {
        acc *= static_cast<double>(x[i]);
        out[i] = static_cast<float>(acc);
    }
    return out;
}

inline std::vector<float> make_betas(const noise_schedule_config& c) {
    check<value_error>(c.num_train_timesteps >= 2, "scheduler", "num_train_timesteps must be at least 2, got ", c.num_train_timesteps);
    std::vector<float> betas;
    if (!c.trained_betas.empty()) {
        check<value_error>(static_cast<std::int64_t>(c.trained_betas.size()) == c.num_train_timesteps, "scheduler", "trained_betas has ",
                           c.trained_betas.size(), " values for ", c.num_train_timesteps, " timesteps");
        for (double b : c.trained_betas) betas.push_back(static_cast<float>(b));
    } else {
        switch (c.beta_schedule) {
            case beta_schedule::linear: betas = linspace_f32(c.beta_start, c.beta_end, c.num_train_timesteps); break;
            case beta_schedule::scaled_linear:
                betas = linspace_f32(std::sqrt(c.beta_start), std::sqrt(c.beta_end), c.num_train_timesteps);
                for (float& b : betas) b = b * b;
                break;
            case beta_schedule::squaredcos_cap_v2: {
                const double pi = 3.14159265358979323846;
                const auto alpha_bar = [pi](double t) {
                    const double v = std::cos((t + 0.008) / 1.008 * pi / 2);
                    return v * v;
                };
                const auto n = static_cast<double>(c.num_train_timesteps);
                for (std::int64_t i = 0; i < c.num_train_timesteps; ++i) {
                    const double t1 = static_cast<double>(i) / n, t2 = static_cast<double>(i + 1) / n;
                    betas.push_back(static_cast<float>(std::min(1.0 - alpha_bar(t2) / alpha_bar(t1), 0.999)));
                }
                break;
            }
            case beta_schedule::sigmoid: {
                betas = linspace_f32(-6.0, 6.0, c.num_train_timesteps);
                const auto scale = static_cast<float>(c.beta_end - c.beta_start), offset = static_cast<float>(c.beta_start);
                for (float& b : betas) b = 1.0f / (1.0f + std::exp(-b)) * scale + offset;
                break;
            }
        }
    }
    if (c.rescale_betas_zero_snr) {
        // Shift sqrt(alphas_cumprod) so the last is 0 and rescale so the first is unchanged.
        std::vector<float> alphas(betas.size());
        for (std::size_t i = 0; i < betas.size(); ++i) alphas[i] = 1.0f - betas[i];
        auto root = cumprod_f32(alphas);
        for (float& r : root) r = std::sqrt(r);
        const float first = root.front(), last = root.back();
        const float factor = first / (first - last);
        for (float& r : root) r = (r - last) * factor;
        std::vector<float> bar(root.size());
        for (std::size_t i = 0; i < root.size(); ++i) bar[i] = root[i] * root[i];
        betas[0] = 1.0f - bar[0];
        for (std::size_t i = 1; i < bar.size(); ++i) betas[i] = 1.0f - bar[i] / bar[i - 1];
    }
    return betas;
}

/// A (B, 1, 1, ...) tensor holding one coefficient per batch element, to
/// broadcast against a tensor of rank `rank`.
template <class B, class T>
tensor<B, T> per_batch(context_t<B>& ctx, const std::vector<double>& values, int rank) {
    std::vector<index_t> dims(static_cast<std::size_t>(std::max(rank, 1)), 1);
    dims[0] = static_cast<index_t>(values.size());
    std::vector<T> host;
    host.reserve(values.size());
    for (double v : values) {
        if constexpr (std::is_same_v<T, double>) host.push_back(v);
        else host.push_back(element_cast<T>(static_cast<float>(v)));
    }
    return tensor<B, T>::from_host(ctx, shape(dims), std::span<const T>(host));
}

}  // namespace detail

/// The DDPM forward process over a training noise schedule; a model of
/// `noise_schedule` (see concepts.hpp).
///
///     ddpm_schedule sched;                                   // diffusers' DDPMScheduler defaults
///     auto sd = ddpm_schedule::from_json_file("scheduler/scheduler_config.json");
///     auto x_t = sd.add_noise(ctx, x0, noise, std::vector<std::int64_t>{999, 10});
class ddpm_schedule {
public:
    using config = noise_schedule_config;

    ddpm_schedule() : ddpm_schedule(config{}) {}

    explicit ddpm_schedule(const config& c) : config_(c), betas_(detail::make_betas(c)) {
        alphas_.resize(betas_.size());
        for (std::size_t i = 0; i < betas_.size(); ++i) alphas_[i] = 1.0f - betas_[i];
        alphas_cumprod_ = detail::cumprod_f32(alphas_);
    }

    /// The schedule keys of a diffusers scheduler_config.json (others are ignored).
    static ddpm_schedule from_json(const nlohmann::json& j) {
        config c;
        detail::read_schedule_keys(j, c);
        return ddpm_schedule(c);
    }
    static ddpm_schedule from_json_file(const std::filesystem::path& path) { return from_json(detail::read_json_file(path)); }

    const config& settings() const noexcept { return config_; }
    std::int64_t num_train_timesteps() const noexcept { return config_.num_train_timesteps; }
    const std::vector<float>& betas() const noexcept { return betas_; }
    const std::vector<float>& alphas() const noexcept { return alphas_; }
    const std::vector<float>& alphas_cumprod() const noexcept { return alphas_cumprod_; }

    /// sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise, with timesteps[b] for batch element b.
    template <class B, class T>
        requires computes_in<B, T>
    tensor<B, T> add_noise(context_t<B>& ctx, const tensor<B, T>& original, const tensor<B, T>& noise,
                           std::span<const std::int64_t> timesteps) const {
        return combine(ctx, "add_noise", original, noise, timesteps, false);
    }

    /// The v-prediction target sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0.
    template <class B, class T>
        requires computes_in<B, T>
    tensor<B, T> velocity(context_t<B>& ctx, const tensor<B, T>& sample, const tensor<B, T>& noise,
                          std::span<const std::int64_t> timesteps) const {
        return combine(ctx, "velocity", sample, noise, timesteps, true);
    }

    /// `batch` training timesteps, uniform on [0, num_train_timesteps), drawn
    /// from Philox stream `seed` starting at element `offset`.
    std::vector<std::int64_t> sample_training_timesteps(std::int64_t batch, std::uint64_t seed, std::uint64_t offset = 0) const {
        std::vector<std::int64_t> out(static_cast<std::size_t>(batch));
        for (std::int64_t i = 0; i < batch; ++i) {
            const double u = philox::uniform(seed, offset + static_cast<std::uint64_t>(i));  // (0, 1]
            const auto t = static_cast<std::int64_t>(std::ceil(u * static_cast<double>(num_train_timesteps()))) - 1;
            out[static_cast<std::size_t>(i)] = std::clamp<std::int64_t>(t, 0, num_train_timesteps() - 1);
        }
        return out;
    }

    /// alphas_cumprod[t], checking t.
    double alpha_cumprod(std::int64_t t) const {
        check<value_error>(t >= 0 && t < num_train_timesteps(), "scheduler", "timestep ", t, " outside [0, ", num_train_timesteps(), ")");
        return alphas_cumprod_[static_cast<std::size_t>(t)];
    }

private:
    config config_;
    std::vector<float> betas_, alphas_, alphas_cumprod_;

    template <class B, class T>
    tensor<B, T> combine(context_t<B>& ctx, const char* what, const tensor<B, T>& x, const tensor<B, T>& noise,
                         std::span<const std::int64_t> timesteps, bool velocity_form) const {
        check<shape_error>(x.shape() == noise.shape(), "scheduler", what, ": sample ", x.shape().str(), " and noise ",
                           noise.shape().str(), " differ");
        check<shape_error>(x.rank() >= 1 && static_cast<index_t>(timesteps.size()) == x.dim(0), "scheduler", what, ": ",
                           timesteps.size(), " timesteps for a batch of shape ", x.shape().str());
        std::vector<double> a, s;
        for (const std::int64_t t : timesteps) {
            // As diffusers: float32 abar, its square roots in float32.
            const float abar = static_cast<float>(alpha_cumprod(t));
            a.push_back(std::sqrt(abar));
            s.push_back(std::sqrt(1.0f - abar));
        }
        const auto ca = detail::per_batch<B, T>(ctx, a, x.rank());
        const auto cs = detail::per_batch<B, T>(ctx, s, x.rank());
        if (velocity_form) return ops::sub(ctx, ops::mul(ctx, ca, noise), ops::mul(ctx, cs, x));
        return ops::add(ctx, ops::mul(ctx, ca, x), ops::mul(ctx, cs, noise));
    }
};

}  // namespace dynamicid::schedulers
