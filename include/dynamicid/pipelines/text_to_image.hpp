// dynamicid pipelines: Stable Diffusion 1.x text-to-image (diffusers'
// StableDiffusionPipeline), written against the sampler concept.
//
//   ids      = tokenizer(prompts), tokenizer(negative prompts)         77 ids each
//   text     = [text_encoder(negative) ; text_encoder(prompt)]         one batch, uncond first
//   x        = randn(seed) * init_noise_sigma                          (N, 4, H / f, W / f)
//   for t in sampler.timesteps():
//       eps_u, eps_c = unet([x_in ; x_in], t, text)                    ONE evaluation per step
//       eps      = eps_u + guidance_scale * (eps_c - eps_u)
//       x        = sampler.step(eps, t, x)
//   image    = vae.decode(x / scaling_factor)                          then (image / 2 + 0.5) clamped to [0, 1]
//
// with x_in = sampler.scale_model_input(x, t) and f the VAE's downsampling
// factor. Guidance is off (one text batch, no uncond half) when
// guidance_scale <= 1, as in diffusers.
//
// Thread safety: a pipeline is immutable after construction. Its weights are
// tensors that share storage, and generate() is const: it copies the sampler
// (which is stateful) and runs everything on the caller's context. Several
// threads may therefore call generate() on one pipeline at the same time, each
// with its own context, and get what sequential calls give.
//
//     using namespace dynamicid;
//     auto pipe = pipelines::text_to_image<cpu_backend>::load(ctx, "models/sd15");   // diffusers folder or one .safetensors
//     auto out = pipe.generate(ctx, {.prompts = {"a lighthouse at dusk"}, .steps = 30, .seed = 42},
//                              {.on_progress = [](std::size_t step, std::size_t total) { ... }});
//     // out.rgb: 512 x 512 x 3 bytes per image; out.pixels the same in [0, 1]
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/checkpoint.hpp>
#include <dynamicid/modules/clip/text_model.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/vae/autoencoder_kl.hpp>
#include <dynamicid/ops.hpp>
#include <dynamicid/pipelines/detail/postprocess.hpp>
#include <dynamicid/schedulers/concepts.hpp>
#include <dynamicid/schedulers/ddim.hpp>
#include <dynamicid/text/clip_tokenizer.hpp>

#include <atomic>
#include <concepts>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <stop_token>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::pipelines {

/// The settings of one text-to-image call (diffusers' argument names where they exist).
struct text_to_image_options {
    std::vector<std::string> prompts{};
    /// Empty (every negative prompt ""), one (used for every prompt), or one per prompt.
    std::vector<std::string> negative_prompts{};
    double guidance_scale = 7.5;
    std::size_t steps = 50;
    std::uint64_t seed = 0;
    index_t width = 512;   ///< image pixels; a multiple of 8
    index_t height = 512;
    index_t images_per_prompt = 1;
    /// DDIM's eta (0: deterministic). Samplers without set_eta accept only 0.
    double eta = 0.0;
};

/// What a caller may watch or control during one call. Everything is optional.
template <class B, class T = float>
struct text_to_image_controls {
    /// Initial latents (N, latent_channels, H / f, W / f), N = prompts x images_per_prompt,
    /// used instead of randn(seed); they are scaled by init_noise_sigma as drawn noise is.
    tensor<B, T> latents{};
    /// After each step: (steps done, total steps).
    std::function<void(std::size_t, std::size_t)> on_progress{};
    /// After each step: (step index from 0, timestep, the latents after that step).
    std::function<void(std::size_t, double, const tensor<B, T>&)> on_step{};
    /// Cancellation: either token stops the call with cancelled_error. Checked
    /// before the text encoder, before every UNet evaluation and before the
    /// decode, so a request takes effect within one UNet evaluation.
    std::stop_token stop{};
    const std::atomic<bool>* cancel = nullptr;
    /// The UNet conditioning to use instead of encoding the prompts (diffusers'
    /// prompt_embeds with negative_prompt_embeds): (2N, L, cross_attention_dim)
    /// with the negative rows first when guided, else (N, L, ...). encode_text()
    /// gives it for the prompts; a caller may append tokens or edit it.
    tensor<B, T> encoder_states{};
    /// Attention processors for every UNet evaluation; hooks->step is set to
    /// the step index before each one. Owned by the caller, one per call.
    modules::unet::attention_hooks<B, T>* hooks = nullptr;
    /// On backends with has_step_graph (CUDA), the second UNet evaluation is
    /// recorded into a graph and the later ones replay it, the latents and
    /// timestep features being its inputs, so the host launches one graph per
    /// step. With hooks, the processors' host code runs only when a recording
    /// is made, so steps are replayed only when graph_variant is given: steps
    /// with the same value share a recording (a processor whose behaviour
    /// changes at some step returns a new value from there). Turn
    /// capture_steps off for hooks whose callbacks read device data on the
    /// host every step.
    bool capture_steps = true;
    std::function<std::uint64_t(std::size_t step)> graph_variant{};
};

/// The images of one call: `count` images of height x width RGB, row-major HWC.
template <class B, class T = float>
struct text_to_image_result {
    index_t count = 0, width = 0, height = 0;
    std::vector<std::uint8_t> rgb;  ///< count x height x width x 3, round(255 * pixel)
    std::vector<float> pixels;      ///< the same layout, values in [0, 1] (diffusers' output_type "np")
    tensor<B, T> latents;           ///< the final latents, before the 1 / scaling_factor

    std::size_t image_bytes() const noexcept { return static_cast<std::size_t>(width * height * 3); }
    std::span<const std::uint8_t> image(index_t i) const {
        check<value_error>(i >= 0 && i < count, "pipeline", "image ", i, " of ", count);
        return std::span<const std::uint8_t>(rgb).subspan(static_cast<std::size_t>(i) * image_bytes(), image_bytes());
    }
};

/// The models of an SD1.x checkpoint that text-to-image uses.
template <class B, class T = float>
    requires computes_in<B, T>
struct sd_components {
    text::clip_tokenizer tokenizer;
    modules::clip::text_model<B, T> text_encoder;
    modules::unet::unet_2d_condition<B, T> unet;
    modules::vae::autoencoder_kl<B, T> vae;  ///< the decoder at least

    /// Binds the models of an opened checkpoint (the VAE's decoder only unless
    /// `vae_parts` says otherwise); the tokenizer comes from the checkpoint's
    /// tokenizer folder, else CLIP's default vocabulary.
    static sd_components load(context_t<B>& ctx, const io::sd_checkpoint& ckpt,
                              modules::vae::vae_parts vae_parts = modules::vae::vae_parts::decoder) {
        return {ckpt.tokenizer_folder ? text::clip_tokenizer::from_folder(*ckpt.tokenizer_folder) : text::clip_tokenizer::load_default(),
                modules::clip::text_model<B, T>::load(ctx, ckpt.text_encoder_weights(), ckpt.text_encoder),
                modules::unet::unet_2d_condition<B, T>::load(ctx, ckpt.unet_weights(), ckpt.unet),
                modules::vae::autoencoder_kl<B, T>::load(ctx, ckpt.vae_weights(), ckpt.vae, vae_parts)};
    }
};

/// Stable Diffusion 1.x text-to-image over any sampler (DDIM by default).
template <class B, class T = float, class Sampler = schedulers::ddim_scheduler>
    requires computes_in<B, T> && schedulers::sampler<Sampler, B, T>
class text_to_image {
public:
    using tensor_type = tensor<B, T>;
    using components_type = sd_components<B, T>;
    using options = text_to_image_options;
    using controls = text_to_image_controls<B, T>;
    using result = text_to_image_result<B, T>;
    using sampler_type = Sampler;

    /// Takes the models and a sampler prototype (copied for every call).
    text_to_image(components_type models, Sampler sampler) : models_(std::move(models)), sampler_(std::move(sampler)) {
        check<value_error>(models_.vae.has_decoder(), "pipeline", "the VAE has no decoder bound");
        check<value_error>(models_.text_encoder.settings().hidden_size == models_.unet.settings().cross_attention_dim, "pipeline",
                           "the text encoder's width ", models_.text_encoder.settings().hidden_size,
                           " differs from the UNet's cross_attention_dim ", models_.unet.settings().cross_attention_dim);
        check<value_error>(models_.vae.settings().latent_channels == models_.unet.settings().in_channels &&
                               models_.unet.settings().out_channels == models_.unet.settings().in_channels,
                           "pipeline", "the VAE's latent_channels ", models_.vae.settings().latent_channels,
                           " differ from the UNet's in/out channels ", models_.unet.settings().in_channels, "/",
                           models_.unet.settings().out_channels);
    }

    /// Opens `path` (a diffusers folder or an original single .safetensors
    /// file) and binds its models, with a DDIM sampler built from the
    /// checkpoint's scheduler config.
    static text_to_image load(context_t<B>& ctx, const std::filesystem::path& path, const io::sd_checkpoint_options& options = {})
        requires std::same_as<Sampler, schedulers::ddim_scheduler>
    {
        return load(ctx, io::sd_checkpoint::open(path, options));
    }
    static text_to_image load(context_t<B>& ctx, const io::sd_checkpoint& ckpt)
        requires std::same_as<Sampler, schedulers::ddim_scheduler>
    {
        return text_to_image(components_type::load(ctx, ckpt), schedulers::ddim_scheduler::from_json(ckpt.scheduler_config));
    }
    /// The same with the caller's sampler.
    static text_to_image load(context_t<B>& ctx, const io::sd_checkpoint& ckpt, Sampler sampler) {
        return text_to_image(components_type::load(ctx, ckpt), std::move(sampler));
    }

    const components_type& models() const noexcept { return models_; }
    const Sampler& sampler() const noexcept { return sampler_; }

    /// Image pixels per latent pixel: 2^(VAE levels - 1).
    index_t vae_scale_factor() const noexcept { return index_t{1} << (models_.vae.settings().block_out_channels.size() - 1); }

    /// The latent shape of a call (what controls::latents must have).
    shape latent_shape(const options& o) const {
        validate(o);
        const index_t f = vae_scale_factor();
        return shape({static_cast<index_t>(o.prompts.size()) * o.images_per_prompt, models_.unet.settings().in_channels, o.height / f,
                      o.width / f});
    }

    /// Runs one generation on `ctx` (see the file comment). Throws value_error
    /// for bad options, cancelled_error when a token asks to stop.
    result generate(context_t<B>& ctx, const options& o, const controls& c = {}) const {
        const shape latent = latent_shape(o);
        const index_t n = latent[0];
        const bool guided = o.guidance_scale > 1.0;
        check_cancel(c);

        // Text: negative rows first, as diffusers concatenates them.
        tensor_type text;
        if (c.encoder_states.defined()) {
            const index_t rows = guided ? 2 * n : n;
            check<shape_error>(c.encoder_states.rank() == 3 && c.encoder_states.dim(0) == rows &&
                                   c.encoder_states.dim(2) == models_.unet.settings().cross_attention_dim,
                               "pipeline", "encoder_states ", c.encoder_states.shape().str(), " should be (", rows, ", L, ",
                               models_.unet.settings().cross_attention_dim, ")");
            text = c.encoder_states;
        } else {
            text = encode_text(ctx, o, guided);
        }

        Sampler s = sampler_;
        if constexpr (requires { s.set_eta(o.eta); }) {
            s.set_eta(o.eta);
        } else {
            check<value_error>(o.eta == 0.0, "pipeline", "eta ", o.eta, " needs a sampler with set_eta()");
        }
        s.set_timesteps(o.steps);

        tensor_type x;
        if (c.latents.defined()) {
            check<shape_error>(c.latents.shape() == latent, "pipeline", "latents ", c.latents.shape().str(), " should be ", latent.str());
            x = c.latents;
        } else {
            x = ops::randn<B, T>(ctx, latent, o.seed, 0);
        }
        x = ops::scale(ctx, x, static_cast<double>(s.init_noise_sigma()));

        const auto timesteps = std::span<const typename Sampler::timestep_type>(s.timesteps());
        const std::size_t total = timesteps.size();
        const auto per_step = static_cast<std::uint64_t>(latent.numel());
        step_runner<B> runner;
        runner.enabled = c.capture_steps && (!c.hooks || c.graph_variant);
        for (std::size_t i = 0; i < total; ++i) {
            const auto t = timesteps[i];
            check_cancel(c);
            const tensor_type in = s.scale_model_input(ctx, x, t);
            const tensor_type model_in = guided ? ops::concat(ctx, std::vector<tensor_type>{in, in}, 0) : in;
            const std::vector<float> ts(static_cast<std::size_t>(model_in.dim(0)), static_cast<float>(t));
            if (c.hooks) c.hooks->step = static_cast<std::int64_t>(i);
            const tensor_type features = models_.unet.time_features(ctx, ts);
            tensor_type eps = runner.run(
                ctx, c.graph_variant ? c.graph_variant(i) : 0,
                [&](const tensor_type& sample, const tensor_type& f) { return models_.unet.forward_features(ctx, sample, f, text, c.hooks); },
                model_in, features);
            if (guided) {
                const tensor_type uncond = eps.narrow_leading(0, n);
                const tensor_type cond = eps.narrow_leading(n, n);
                eps = ops::add_scaled(ctx, 1.0, uncond, o.guidance_scale, ops::sub(ctx, cond, uncond));
            }
            // Stochastic steps draw from the seed's stream after the initial latents, one range per step.
            x = s.step(ctx, eps, t, x, schedulers::step_noise<B, T>::from_seed(o.seed, per_step * (i + 1)));
            if (c.on_step) c.on_step(i, static_cast<double>(t), x);
            if (c.on_progress) c.on_progress(i + 1, total);
        }

        check_cancel(c);
        result r;
        r.count = n;
        r.width = o.width;
        r.height = o.height;
        r.latents = x;
        const tensor_type image = models_.vae.decode(ctx, ops::scale(ctx, x, 1.0 / models_.vae.settings().scaling_factor));
        detail::to_hwc_unit(image.to_host(ctx), n, image.dim(1), o.height, o.width, r.pixels, r.rgb);
        return r;
    }

    /// The text conditioning generate() feeds the UNet: (2N or N, 77, hidden),
    /// negative rows first when guided.
    tensor_type encode_text(context_t<B>& ctx, const options& o, bool guided) const {
        validate(o);
        const std::size_t p = o.prompts.size();
        std::vector<std::string> rows;
        if (guided) {
            for (std::size_t i = 0; i < p; ++i)
                rows.push_back(o.negative_prompts.empty() ? std::string() : o.negative_prompts[o.negative_prompts.size() == 1 ? 0 : i]);
        }
        rows.insert(rows.end(), o.prompts.begin(), o.prompts.end());
        const auto len = static_cast<std::size_t>(models_.text_encoder.settings().max_position_embeddings);
        const auto ids = models_.tokenizer.encode_batch(rows, std::min<std::size_t>(len, text::clip_tokenizer::default_context_length));
        const auto states = models_.text_encoder.forward(ctx, ids, static_cast<index_t>(rows.size())).last_hidden_state;
        if (o.images_per_prompt == 1) return states;
        // Each prompt's row repeated images_per_prompt times, in place (diffusers' repeat + view).
        std::vector<tensor_type> parts;
        for (index_t r = 0; r < static_cast<index_t>(rows.size()); ++r)
            for (index_t k = 0; k < o.images_per_prompt; ++k) parts.push_back(states.narrow_leading(r, 1));
        return ops::concat(ctx, parts, 0);
    }

    /// Throws value_error "[pipeline] ..." for options no generation can run with.
    void validate(const options& o) const {
        check<value_error>(!o.prompts.empty(), "pipeline", "at least one prompt is needed");
        check<value_error>(o.negative_prompts.empty() || o.negative_prompts.size() == 1 || o.negative_prompts.size() == o.prompts.size(),
                           "pipeline", o.negative_prompts.size(), " negative prompts for ", o.prompts.size(), " prompts (give 0, 1 or one each)");
        check<value_error>(o.width > 0 && o.height > 0 && o.width % 8 == 0 && o.height % 8 == 0, "pipeline", "width and height must be ",
                           "positive multiples of 8, got ", o.width, "x", o.height);
        const index_t f = vae_scale_factor();
        const index_t unet_factor = index_t{1} << (models_.unet.settings().block_out_channels.size() - 1);
        check<value_error>(o.width % (f * unet_factor) == 0 && o.height % (f * unet_factor) == 0, "pipeline", "width and height must be ",
                           "multiples of ", f * unet_factor, " for this model (the UNet halves the latent ",
                           models_.unet.settings().block_out_channels.size() - 1, " times), got ", o.width, "x", o.height);
        check<value_error>(o.steps >= 1, "pipeline", "steps must be at least 1");
        check<value_error>(o.images_per_prompt >= 1, "pipeline", "images_per_prompt must be at least 1, got ", o.images_per_prompt);
        check<value_error>(std::isfinite(o.guidance_scale), "pipeline", "guidance_scale must be finite");
        check<value_error>(o.eta >= 0.0 && std::isfinite(o.eta), "pipeline", "eta must be >= 0, got ", o.eta);
    }

private:
    static void check_cancel(const controls& c) {
        if (c.stop.stop_requested() || (c.cancel && c.cancel->load(std::memory_order_relaxed)))
            throw cancelled_error("pipeline", "generation cancelled");
    }

    components_type models_;
    Sampler sampler_;
};

}  // namespace dynamicid::pipelines
