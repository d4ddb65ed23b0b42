// dynamicid modules: diffusers' AutoencoderKL (the Stable Diffusion VAE).
//
//   encode:  h = encoder(image)                       (B, 2 * latent, H / f, W / f)
//            h = quant_conv(h)                        (when use_quant_conv)
//            mean, logvar = split(h, channels)        logvar clamped to [-30, 20]
//   sample:  z = mean + exp(logvar / 2) * noise       noise ~ N(0, 1) from Philox
//   decode:  z = post_quant_conv(latents)             (when use_post_quant_conv)
//            image = decoder(z)                       (B, out, h * f, w * f)
//
// with f = 2^(len(block_out_channels) - 1). The encoder is conv_in, one
// DownEncoderBlock2D per level (resnets, then a stride-2 Downsample2D except
// on the last level), a UNetMidBlock2D (resnet, spatial self-attention,
// resnet), GroupNorm, SiLU and conv_out. The decoder mirrors it with
// UpDecoderBlock2D levels (layers_per_block + 1 resnets, then a nearest x2
// Upsample2D except on the last level). Every GroupNorm uses eps 1e-6.
//
// decode() takes latents as the VAE sees them: a pipeline divides the UNet's
// latents by `scaling_factor` first (and multiplies encoded samples by it).
// Weights bind by diffusers' state-dict keys (encoder.*, quant_conv.*,
// post_quant_conv.*, decoder.*); every missing or misshapen tensor is
// reported at once by weight_binder::finish.
//
//     auto cfg = dynamicid::modules::vae::autoencoder_kl_config::from_json(nlohmann::json::parse(config_text));
//     auto source = dynamicid::modules::weight_source::open({"vae/diffusion_pytorch_model.safetensors"});
//     auto vae = dynamicid::modules::vae::autoencoder_kl<B>::load(ctx, source, cfg);
//     auto image = vae.decode(ctx, ops::scale(ctx, latents, 1.0 / cfg.scaling_factor));   // (1, 3, 512, 512)
//     auto dist = vae.encode(ctx, image);                                                // dist.mean (1, 4, 64, 64)
//     auto z = vae.sample(ctx, dist, /*seed=*/42);
//
// Training (input and weight gradients; every weight's gradient is added into
// a param_grads tree mirroring the model, undefined entries counting as zeros):
//
//     typename decltype(vae)::param_grads grads;
//     auto [dist, s_enc] = vae.encode_train(ctx, image, /*trainable=*/true);
//     auto [z, s_z] = vae.sample_forward(ctx, dist, noise);            // z = mean + exp(logvar / 2) * noise
//     auto [recon, s_dec] = vae.decode_train(ctx, z, true);
//     auto kl = vae.kl(ctx, dist);                                        // (N,), DiagonalGaussianDistribution.kl()
//     auto dz = vae.decode_backward(ctx, s_dec, grad_recon, &grads);
//     auto dd = vae.sample_backward(ctx, s_z, dz);                        // dd.mean, dd.logvar
//     auto dk = vae.kl_backward(ctx, dist, grad_kl);                      // grad_kl (N,)
//     auto dimage = vae.encode_backward(ctx, s_enc, add(dd.mean, dk.mean), add(dd.logvar, dk.logvar), &grads);
//     vae.for_each_parameter(&grads, [](const std::string& key, const auto& weight, const auto& grad) { ... });
#pragma once

#include <dynamicid/modules/detail/config_reader.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/blocks/attention.hpp>
#include <dynamicid/modules/blocks/resnet_block.hpp>
#include <dynamicid/modules/detail/frozen.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace dynamicid::modules::vae {

/// The configuration surface of diffusers' AutoencoderKL with
/// DownEncoderBlock2D / UpDecoderBlock2D levels. The member defaults are
/// SD1.x's VAE; from_json fills absent keys with diffusers' own defaults.
struct autoencoder_kl_config {
    index_t in_channels = 3;
    index_t out_channels = 3;
    std::vector<index_t> block_out_channels{128, 256, 512, 512};
    index_t layers_per_block = 2;
    index_t latent_channels = 4;
    index_t norm_num_groups = 32;
    index_t sample_size = 512;  ///< informative (tiling); any image size works
    double scaling_factor = 0.18215;
    std::optional<double> shift_factor{};  ///< pipelines subtract it before scaling (null for SD1.x)
    bool use_quant_conv = true;
    bool use_post_quant_conv = true;
    bool mid_block_add_attention = true;

    /// AutoencoderKL.__init__'s defaults (what a config.json without a key means).
    static autoencoder_kl_config diffusers_defaults() {
        return {.in_channels = 3, .out_channels = 3, .block_out_channels = {64}, .layers_per_block = 1, .latent_channels = 4,
                .norm_num_groups = 32, .sample_size = 32, .scaling_factor = 0.18215};
    }

    /// Reads a diffusers vae/config.json. Throws value_error listing every
    /// unsupported or malformed setting; keys starting with '_' and settings
    /// that do not change the computation in float32 (force_upcast,
    /// latents_mean, latents_std) are ignored.
    static autoencoder_kl_config from_json(const nlohmann::json& j);

    /// Throws value_error when the sizes do not form a VAE.
    void validate() const;

    /// Image pixels per latent pixel along each axis: 2^(levels - 1).
    index_t downscale_factor() const { return index_t{1} << (block_out_channels.size() - 1); }
};

inline autoencoder_kl_config autoencoder_kl_config::from_json(const nlohmann::json& j) {
    check<value_error>(j.is_object(), "vae", "config must be a JSON object");
    auto c = diffusers_defaults();
    modules::detail::config_reader r{j, {}};
    if (r.has("_class_name") && j["_class_name"] != "AutoencoderKL")
        r.problems.push_back("\"_class_name\" = " + j["_class_name"].dump() + " is not an AutoencoderKL");
    r.read("in_channels", c.in_channels);
    r.read("out_channels", c.out_channels);
    r.read("block_out_channels", c.block_out_channels);
    if (r.has("layers_per_block") && !j["layers_per_block"].is_number_integer())
        r.problems.push_back("\"layers_per_block\" must be one integer, got " + j["layers_per_block"].dump());
    else
        r.read("layers_per_block", c.layers_per_block);
    r.read("latent_channels", c.latent_channels);
    r.read("norm_num_groups", c.norm_num_groups);
    // diffusers also accepts [height, width]; only the tiling heuristics read it, so keep the first.
    if (r.has("sample_size") && j["sample_size"].is_array()) {
        const auto& s = j["sample_size"];
        if (!s.empty() && s[0].is_number_integer())
            c.sample_size = s[0].get<index_t>();
        else
            r.problems.push_back("\"sample_size\" must be an integer or [height, width], got " + s.dump());
    } else {
        r.read("sample_size", c.sample_size);
    }
    r.read("scaling_factor", c.scaling_factor);
    if (r.has("shift_factor")) {
        double shift = 0.0;
        r.read("shift_factor", shift);
        c.shift_factor = shift;
    }
    r.read("use_quant_conv", c.use_quant_conv);
    r.read("use_post_quant_conv", c.use_post_quant_conv);
    r.read("mid_block_add_attention", c.mid_block_add_attention);

    const std::size_t levels = c.block_out_channels.size();
    r.require_all("down_block_types", "DownEncoderBlock2D", levels);
    r.require_all("up_block_types", "UpDecoderBlock2D", levels);
    if (r.has("act_fn") && j["act_fn"] != "silu")
        r.problems.push_back("\"act_fn\" = " + j["act_fn"].dump() + " is not supported (supported: \"silu\")");
    if (!r.problems.empty()) {
        std::string message = std::to_string(r.problems.size()) + " unsupported config setting" + (r.problems.size() == 1 ? "" : "s") + ": ";
        for (std::size_t i = 0; i < r.problems.size(); ++i) message += (i ? "; " : "") + r.problems[i];
        throw value_error("vae", message);
    }
    c.validate();
    return c;
}

inline void autoencoder_kl_config::validate() const {
    check<value_error>(!block_out_channels.empty() && block_out_channels.size() <= 16, "vae", "block_out_channels needs 1 to 16 entries, got ",
                       block_out_channels.size());
    check<value_error>(in_channels > 0 && out_channels > 0 && latent_channels > 0 && norm_num_groups > 0 && layers_per_block >= 1, "vae",
                       "in/out/latent channels, norm_num_groups and layers_per_block must be positive");
    for (std::size_t i = 0; i < block_out_channels.size(); ++i)
        check<value_error>(block_out_channels[i] > 0 && block_out_channels[i] % norm_num_groups == 0, "vae", "block_out_channels[", i,
                           "] = ", block_out_channels[i], " is not a positive multiple of norm_num_groups ", norm_num_groups);
    check<value_error>(scaling_factor != 0.0, "vae", "scaling_factor must not be 0");
}

/// diffusers Downsample2D as the VAE builds it (padding 0): the image is
/// zero-padded by one row at the bottom and one column at the right only,
/// then a 3x3 convolution with stride 2 and no padding. A symmetric padding
/// of 1 would shift every window by one pixel, so the pad is explicit.
/// Key: "conv".
template <class B, class T = float>
    requires computes_in<B, T>
class downsample {
public:
    using tensor_type = tensor<B, T>;

    static downsample bind(weight_binder<B, T> b, index_t channels) {
        downsample d;
        d.conv_ = conv2d_layer<B, T>::bind(b, "conv", channels, channels, 3, {.stride = 2, .padding = 0});
        return d;
    }

    /// (N, C, H, W) -> (N, C, floor((H - 2) / 2) + 1, floor((W - 2) / 2) + 1)
    tensor_type forward(context_t<B>& ctx, const tensor_type& x) const {
        check<shape_error>(x.rank() == 4, "vae", "downsample input ", x.shape().str(), " is not (N, C, H, W)");
        const index_t n = x.dim(0), c = x.dim(1), h = x.dim(2), w = x.dim(3);
        // Padding by concatenation keeps the forward made of ops with backward rules.
        const auto wide = ops::concat(ctx, std::vector<tensor_type>{x, tensor_type::zeros(ctx, {n, c, h, 1})}, 3);
        const auto padded = ops::concat(ctx, std::vector<tensor_type>{wide, tensor_type::zeros(ctx, {n, c, 1, w + 1})}, 2);
        return conv_(ctx, padded);
    }

    const conv2d_layer<B, T>& conv() const noexcept { return conv_; }

    struct param_grads {
        conv2d_layer<B, T> conv;
    };
    struct saved {
        ops::conv2d_saved<B, T> conv;
        index_t height = 0, width = 0;
    };
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& x, bool trainable = false) const {
        check<shape_error>(x.rank() == 4, "vae", "downsample input ", x.shape().str(), " is not (N, C, H, W)");
        const index_t n = x.dim(0), c = x.dim(1), h = x.dim(2), w = x.dim(3);
        const auto wide = ops::concat(ctx, std::vector<tensor_type>{x, tensor_type::zeros(ctx, {n, c, h, 1})}, 3);
        const auto padded = ops::concat(ctx, std::vector<tensor_type>{wide, tensor_type::zeros(ctx, {n, c, 1, w + 1})}, 2);
        auto [y, sc] = modules::detail::layer_forward(ctx, conv_, padded, trainable);
        return {y, saved{std::move(sc), h, w}};
    }
    tensor_type backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        const auto d = modules::detail::layer_backward(ctx, s.conv, grad_output, pg ? &pg->conv : nullptr);
        return ops::slice(ctx, ops::slice(ctx, d, 2, 0, s.height), 3, 0, s.width);
    }

private:
    conv2d_layer<B, T> conv_;
};

/// diffusers Upsample2D with a convolution: nearest x2, then 3x3 conv (padding 1). Key: "conv".
template <class B, class T = float>
    requires computes_in<B, T>
class upsample {
public:
    using tensor_type = tensor<B, T>;

    static upsample bind(weight_binder<B, T> b, index_t channels) {
        upsample u;
        u.conv_ = conv2d_layer<B, T>::bind(b, "conv", channels, channels, 3, {.padding = 1});
        return u;
    }

    /// (N, C, H, W) -> (N, C, 2H, 2W)
    tensor_type forward(context_t<B>& ctx, const tensor_type& x) const { return conv_(ctx, ops::upsample_nearest(ctx, x, 2)); }

    const conv2d_layer<B, T>& conv() const noexcept { return conv_; }

    struct param_grads {
        conv2d_layer<B, T> conv;
    };
    struct saved {
        ops::upsample_saved<B, T> upsample;
        ops::conv2d_saved<B, T> conv;
    };
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& x, bool trainable = false) const {
        auto [u, su] = ops::upsample_nearest_forward(ctx, x, 2);
        auto [y, sc] = modules::detail::layer_forward(ctx, conv_, u, trainable);
        return {y, saved{su, std::move(sc)}};
    }
    tensor_type backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        return ops::upsample_nearest_backward(ctx, s.upsample,
                                              modules::detail::layer_backward(ctx, s.conv, grad_output, pg ? &pg->conv : nullptr));
    }

private:
    conv2d_layer<B, T> conv_;
};

/// diffusers UNetMidBlock2D as the VAE builds it (no time embedding, one
/// layer): resnets.0, then attentions.0 (one head over all channels, with
/// GroupNorm and a residual; absent when mid_block_add_attention is false),
/// then resnets.1.
template <class B, class T = float>
    requires computes_in<B, T>
class mid_block {
public:
    using tensor_type = tensor<B, T>;

    static mid_block bind(weight_binder<B, T> b, index_t channels, index_t groups, bool add_attention) {
        mid_block m;
        const blocks::resnet_block_config rc{.in_channels = channels, .out_channels = channels, .temb_channels = 0, .groups = groups, .eps = 1e-6};
        m.first_ = blocks::resnet_block<B, T>::bind(b.scope("resnets", 0), rc);
        if (add_attention)
            m.attention_ = blocks::attention<B, T>::bind(
                b.scope("attentions", 0), {.query_dim = channels, .heads = 1, .dim_head = channels, .bias = true, .out_bias = true,
                                           .norm_num_groups = groups, .norm_eps = 1e-6, .residual_connection = true});
        m.second_ = blocks::resnet_block<B, T>::bind(b.scope("resnets", 1), rc);
        return m;
    }

    /// (N, C, H, W) -> (N, C, H, W)
    tensor_type forward(context_t<B>& ctx, const tensor_type& x) const {
        auto h = first_.forward(ctx, x);
        if (attention_) h = attention_->forward_spatial(ctx, h);
        return second_.forward(ctx, h);
    }

    bool has_attention() const noexcept { return attention_.has_value(); }

    using resnet_grads = typename blocks::resnet_block<B, T>::param_grads;
    /// Weight gradients: resnets.0, resnets.1 and attentions.0 (undefined without attention).
    struct param_grads {
        resnet_grads resnet_0, resnet_1;
        typename blocks::attention<B, T>::param_grads attention;
    };
    struct saved {
        typename blocks::resnet_block<B, T>::saved first, second;
        typename blocks::attention<B, T>::spatial_saved attention;
    };
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& x, bool trainable = false) const {
        saved s;
        auto [h, s1] = first_.forward_train(ctx, x, nullptr, trainable);
        s.first = std::move(s1);
        if (attention_) {
            auto [a, sa] = attention_->forward_spatial_train(ctx, h, trainable);
            h = a;
            s.attention = std::move(sa);
        }
        auto [y, s2] = second_.forward_train(ctx, h, nullptr, trainable);
        s.second = std::move(s2);
        return {y, std::move(s)};
    }
    tensor_type backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        auto d = second_.backward(ctx, s.second, grad_output, pg ? &pg->resnet_1 : nullptr).input;
        if (attention_) d = attention_->backward_spatial(ctx, s.attention, d, pg ? &pg->attention : nullptr);
        return first_.backward(ctx, s.first, d, pg ? &pg->resnet_0 : nullptr).input;
    }
    template <class F>
    void for_each_parameter(const param_grads* g, const std::string& prefix, F&& f) const {
        first_.for_each_parameter(g ? &g->resnet_0 : nullptr, prefix + "resnets.0.", f);
        if (attention_) attention_->for_each_parameter(g ? &g->attention : nullptr, prefix + "attentions.0.", f);
        second_.for_each_parameter(g ? &g->resnet_1 : nullptr, prefix + "resnets.1.", f);
    }

private:
    blocks::resnet_block<B, T> first_, second_;
    std::optional<blocks::attention<B, T>> attention_;
};

/// diffusers' VAE Encoder with double_z: image (N, in_channels, H, W) ->
/// moments (N, 2 * latent_channels, H / f, W / f) (each downsampler maps a
/// size s to floor((s - 2) / 2) + 1). Keys below "encoder.".
template <class B, class T = float>
    requires computes_in<B, T>
class encoder {
public:
    using config = autoencoder_kl_config;
    using tensor_type = tensor<B, T>;

    struct level {
        std::vector<blocks::resnet_block<B, T>> resnets;
        std::optional<downsample<B, T>> downsampler;
    };

    static encoder bind(weight_binder<B, T> b, const config& c) {
        c.validate();
        encoder e;
        e.config_ = c;
        const auto& boc = c.block_out_channels;
        const index_t groups = c.norm_num_groups;
        e.conv_in_ = conv2d_layer<B, T>::bind(b, "conv_in", c.in_channels, boc.front(), 3, {.padding = 1});
        for (std::size_t i = 0; i < boc.size(); ++i) {
            auto lb = b.scope("down_blocks", static_cast<index_t>(i));
            level l;
            const index_t in = i == 0 ? boc.front() : boc[i - 1], out = boc[i];
            for (index_t j = 0; j < c.layers_per_block; ++j)
                l.resnets.push_back(blocks::resnet_block<B, T>::bind(
                    lb.scope("resnets", j), {.in_channels = j == 0 ? in : out, .out_channels = out, .temb_channels = 0, .groups = groups, .eps = 1e-6}));
            if (i + 1 < boc.size()) l.downsampler = downsample<B, T>::bind(lb.scope("downsamplers", 0), out);
            e.levels_.push_back(std::move(l));
        }
        e.mid_ = mid_block<B, T>::bind(b.scope("mid_block"), boc.back(), groups, c.mid_block_add_attention);
        e.conv_norm_out_ = group_norm_layer<B, T>::bind(b, "conv_norm_out", boc.back(), groups, 1e-6);
        e.conv_out_ = conv2d_layer<B, T>::bind(b, "conv_out", boc.back(), 2 * c.latent_channels, 3, {.padding = 1});
        return e;
    }

    void check_input(const tensor_type& image) const {
        check<shape_error>(image.rank() == 4 && image.dim(1) == config_.in_channels, "vae", "image ", image.shape().str(), " is not (N, ",
                           config_.in_channels, ", H, W)");
    }

    tensor_type forward(context_t<B>& ctx, const tensor_type& image) const {
        check_input(image);
        auto h = conv_in_(ctx, image);
        for (const auto& l : levels_) {
            for (const auto& r : l.resnets) h = r.forward(ctx, h);
            if (l.downsampler) h = l.downsampler->forward(ctx, h);
        }
        h = mid_.forward(ctx, h);
        return conv_out_(ctx, ops::silu(ctx, conv_norm_out_(ctx, h)));
    }

    using resnet_grads = typename blocks::resnet_block<B, T>::param_grads;
    /// Weight gradients of one level: resnets.<j> and downsamplers.0.
    struct level_grads {
        std::vector<resnet_grads> resnets;
        typename downsample<B, T>::param_grads downsampler;
    };
    /// Weight gradients shaped like the encoder (diffusers' keys below "encoder.").
    struct param_grads {
        conv2d_layer<B, T> conv_in;
        std::vector<level_grads> down_blocks;
        typename modules::vae::mid_block<B, T>::param_grads mid_block;
        group_norm_layer<B, T> conv_norm_out;
        conv2d_layer<B, T> conv_out;
    };
    struct level_saved {
        std::vector<typename blocks::resnet_block<B, T>::saved> resnets;
        typename downsample<B, T>::saved downsampler;
    };
    struct saved {
        ops::conv2d_saved<B, T> conv_in, conv_out;
        std::vector<level_saved> levels;
        typename mid_block<B, T>::saved mid;
        modules::detail::group_norm_saved<B, T> norm_out;
        ops::unary_saved<B, T> act_out;
    };

    /// forward() keeping what backward() needs; with `trainable` also what the weight gradients need.
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& x, bool trainable = false) const {
        using modules::detail::layer_forward;
        check_input(x);
        saved s;
        tensor_type h;
        std::tie(h, s.conv_in) = layer_forward(ctx, conv_in_, x, trainable);
        for (const auto& l : levels_) {
            level_saved ls;
            for (const auto& r : l.resnets) {
                auto [y, sr] = r.forward_train(ctx, h, nullptr, trainable);
                h = y;
                ls.resnets.push_back(std::move(sr));
            }
            if (l.downsampler) std::tie(h, ls.downsampler) = l.downsampler->forward_train(ctx, h, trainable);
            s.levels.push_back(std::move(ls));
        }
        {
            auto [y, sm] = mid_.forward_train(ctx, h, trainable);
            h = y;
            s.mid = std::move(sm);
        }
        std::tie(h, s.norm_out) = layer_forward(ctx, conv_norm_out_, h, trainable);
        std::tie(h, s.act_out) = ops::unary_forward(ctx, unary_op::silu, h);
        std::tie(h, s.conv_out) = layer_forward(ctx, conv_out_, h, trainable);
        return {h, std::move(s)};
    }

    /// Gradient w.r.t. the input; weight gradients added into *pg when the forward was trainable.
    tensor_type backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        using modules::detail::layer_backward;
        using modules::detail::slot_of;
        auto d = layer_backward(ctx, s.conv_out, grad_output, pg ? &pg->conv_out : nullptr);
        d = layer_backward(ctx, s.norm_out, ops::unary_backward(ctx, s.act_out, d), pg ? &pg->conv_norm_out : nullptr);
        d = mid_.backward(ctx, s.mid, d, pg ? &pg->mid_block : nullptr);
        for (std::size_t i = levels_.size(); i-- > 0;) {
            const auto& l = levels_[i];
            auto* lg = slot_of(pg ? &pg->down_blocks : nullptr, i, levels_.size());
            if (l.downsampler) d = l.downsampler->backward(ctx, s.levels[i].downsampler, d, lg ? &lg->downsampler : nullptr);
            for (std::size_t j = l.resnets.size(); j-- > 0;)
                d = l.resnets[j].backward(ctx, s.levels[i].resnets[j], d, slot_of(lg ? &lg->resnets : nullptr, j, l.resnets.size())).input;
        }
        return layer_backward(ctx, s.conv_in, d, pg ? &pg->conv_in : nullptr);
    }

    /// f(name, weight, grad) for every weight, named by diffusers' keys below `prefix` ("encoder.", "decoder.").
    template <class F>
    void for_each_parameter(const param_grads* g, const std::string& prefix, F&& f) const {
        using modules::detail::entry_of;
        using modules::detail::visit_layer;
        visit_layer(prefix + "conv_in", conv_in_, g ? &g->conv_in : nullptr, f);
        for (std::size_t i = 0; i < levels_.size(); ++i) {
            const auto* lg = entry_of(g ? &g->down_blocks : nullptr, i);
            const std::string lp = prefix + "down_blocks." + std::to_string(i) + ".";
            for (std::size_t j = 0; j < levels_[i].resnets.size(); ++j)
                levels_[i].resnets[j].for_each_parameter(entry_of(lg ? &lg->resnets : nullptr, j), lp + "resnets." + std::to_string(j) + ".", f);
            if (levels_[i].downsampler) visit_layer(lp + "downsamplers.0.conv", levels_[i].downsampler->conv(), lg ? &lg->downsampler.conv : nullptr, f);
        }
        mid_.for_each_parameter(g ? &g->mid_block : nullptr, prefix + "mid_block.", f);
        visit_layer(prefix + "conv_norm_out", conv_norm_out_, g ? &g->conv_norm_out : nullptr, f);
        visit_layer(prefix + "conv_out", conv_out_, g ? &g->conv_out : nullptr, f);
    }

    const config& settings() const noexcept { return config_; }
    const std::vector<level>& levels() const noexcept { return levels_; }

private:
    config config_{};
    conv2d_layer<B, T> conv_in_, conv_out_;
    std::vector<level> levels_;
    mid_block<B, T> mid_;
    group_norm_layer<B, T> conv_norm_out_;
};

/// diffusers' VAE Decoder: latents (N, latent_channels, h, w) -> image
/// (N, out_channels, h * f, w * f). Keys below "decoder.".
template <class B, class T = float>
    requires computes_in<B, T>
class decoder {
public:
    using config = autoencoder_kl_config;
    using tensor_type = tensor<B, T>;

    struct level {
        std::vector<blocks::resnet_block<B, T>> resnets;
        std::optional<upsample<B, T>> upsampler;
    };

    static decoder bind(weight_binder<B, T> b, const config& c) {
        c.validate();
        decoder d;
        d.config_ = c;
        const std::vector<index_t> widths(c.block_out_channels.rbegin(), c.block_out_channels.rend());
        const index_t groups = c.norm_num_groups;
        d.conv_in_ = conv2d_layer<B, T>::bind(b, "conv_in", c.latent_channels, widths.front(), 3, {.padding = 1});
        d.mid_ = mid_block<B, T>::bind(b.scope("mid_block"), widths.front(), groups, c.mid_block_add_attention);
        for (std::size_t i = 0; i < widths.size(); ++i) {
            auto lb = b.scope("up_blocks", static_cast<index_t>(i));
            level l;
            const index_t in = i == 0 ? widths.front() : widths[i - 1], out = widths[i];
            for (index_t j = 0; j <= c.layers_per_block; ++j)
                l.resnets.push_back(blocks::resnet_block<B, T>::bind(
                    lb.scope("resnets", j), {.in_channels = j == 0 ? in : out, .out_channels = out, .temb_channels = 0, .groups = groups, .eps = 1e-6}));
            if (i + 1 < widths.size()) l.upsampler = upsample<B, T>::bind(lb.scope("upsamplers", 0), out);
            d.levels_.push_back(std::move(l));
        }
        d.conv_norm_out_ = group_norm_layer<B, T>::bind(b, "conv_norm_out", widths.back(), groups, 1e-6);
        d.conv_out_ = conv2d_layer<B, T>::bind(b, "conv_out", widths.back(), c.out_channels, 3, {.padding = 1});
        return d;
    }

    void check_input(const tensor_type& z) const {
        check<shape_error>(z.rank() == 4 && z.dim(1) == config_.latent_channels, "vae", "latents ", z.shape().str(), " are not (N, ",
                           config_.latent_channels, ", h, w)");
    }

    tensor_type forward(context_t<B>& ctx, const tensor_type& z) const {
        check_input(z);
        auto h = mid_.forward(ctx, conv_in_(ctx, z));
        for (const auto& l : levels_) {
            for (const auto& r : l.resnets) h = r.forward(ctx, h);
            if (l.upsampler) h = l.upsampler->forward(ctx, h);
        }
        return conv_out_(ctx, ops::silu(ctx, conv_norm_out_(ctx, h)));
    }

    using resnet_grads = typename blocks::resnet_block<B, T>::param_grads;
    /// Weight gradients of one level: resnets.<j> and upsamplers.0.
    struct level_grads {
        std::vector<resnet_grads> resnets;
        typename upsample<B, T>::param_grads upsampler;
    };
    /// Weight gradients shaped like the decoder (diffusers' keys below "decoder.").
    struct param_grads {
        conv2d_layer<B, T> conv_in;
        std::vector<level_grads> up_blocks;
        typename modules::vae::mid_block<B, T>::param_grads mid_block;
        group_norm_layer<B, T> conv_norm_out;
        conv2d_layer<B, T> conv_out;
    };
    struct level_saved {
        std::vector<typename blocks::resnet_block<B, T>::saved> resnets;
        typename upsample<B, T>::saved upsampler;
    };
    struct saved {
        ops::conv2d_saved<B, T> conv_in, conv_out;
        std::vector<level_saved> levels;
        typename mid_block<B, T>::saved mid;
        modules::detail::group_norm_saved<B, T> norm_out;
        ops::unary_saved<B, T> act_out;
    };

    /// forward() keeping what backward() needs; with `trainable` also what the weight gradients need.
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& x, bool trainable = false) const {
        using modules::detail::layer_forward;
        check_input(x);
        saved s;
        tensor_type h;
        std::tie(h, s.conv_in) = layer_forward(ctx, conv_in_, x, trainable);
        {
            auto [y, sm] = mid_.forward_train(ctx, h, trainable);
            h = y;
            s.mid = std::move(sm);
        }
        for (const auto& l : levels_) {
            level_saved ls;
            for (const auto& r : l.resnets) {
                auto [y, sr] = r.forward_train(ctx, h, nullptr, trainable);
                h = y;
                ls.resnets.push_back(std::move(sr));
            }
            if (l.upsampler) std::tie(h, ls.upsampler) = l.upsampler->forward_train(ctx, h, trainable);
            s.levels.push_back(std::move(ls));
        }
        std::tie(h, s.norm_out) = layer_forward(ctx, conv_norm_out_, h, trainable);
        std::tie(h, s.act_out) = ops::unary_forward(ctx, unary_op::silu, h);
        std::tie(h, s.conv_out) = layer_forward(ctx, conv_out_, h, trainable);
        return {h, std::move(s)};
    }

    /// Gradient w.r.t. the input; weight gradients added into *pg when the forward was trainable.
    tensor_type backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        using modules::detail::layer_backward;
        using modules::detail::slot_of;
        auto d = layer_backward(ctx, s.conv_out, grad_output, pg ? &pg->conv_out : nullptr);
        d = layer_backward(ctx, s.norm_out, ops::unary_backward(ctx, s.act_out, d), pg ? &pg->conv_norm_out : nullptr);
        for (std::size_t i = levels_.size(); i-- > 0;) {
            const auto& l = levels_[i];
            auto* lg = slot_of(pg ? &pg->up_blocks : nullptr, i, levels_.size());
            if (l.upsampler) d = l.upsampler->backward(ctx, s.levels[i].upsampler, d, lg ? &lg->upsampler : nullptr);
            for (std::size_t j = l.resnets.size(); j-- > 0;)
                d = l.resnets[j].backward(ctx, s.levels[i].resnets[j], d, slot_of(lg ? &lg->resnets : nullptr, j, l.resnets.size())).input;
        }
        d = mid_.backward(ctx, s.mid, d, pg ? &pg->mid_block : nullptr);
        return layer_backward(ctx, s.conv_in, d, pg ? &pg->conv_in : nullptr);
    }

    /// f(name, weight, grad) for every weight, named by diffusers' keys below `prefix` ("encoder.", "decoder.").
    template <class F>
    void for_each_parameter(const param_grads* g, const std::string& prefix, F&& f) const {
        using modules::detail::entry_of;
        using modules::detail::visit_layer;
        visit_layer(prefix + "conv_in", conv_in_, g ? &g->conv_in : nullptr, f);
        for (std::size_t i = 0; i < levels_.size(); ++i) {
            const auto* lg = entry_of(g ? &g->up_blocks : nullptr, i);
            const std::string lp = prefix + "up_blocks." + std::to_string(i) + ".";
            for (std::size_t j = 0; j < levels_[i].resnets.size(); ++j)
                levels_[i].resnets[j].for_each_parameter(entry_of(lg ? &lg->resnets : nullptr, j), lp + "resnets." + std::to_string(j) + ".", f);
            if (levels_[i].upsampler) visit_layer(lp + "upsamplers.0.conv", levels_[i].upsampler->conv(), lg ? &lg->upsampler.conv : nullptr, f);
        }
        mid_.for_each_parameter(g ? &g->mid_block : nullptr, prefix + "mid_block.", f);
        visit_layer(prefix + "conv_norm_out", conv_norm_out_, g ? &g->conv_norm_out : nullptr, f);
        visit_layer(prefix + "conv_out", conv_out_, g ? &g->conv_out : nullptr, f);
    }

    const config& settings() const noexcept { return config_; }
    const std::vector<level>& levels() const noexcept { return levels_; }

private:
    config config_{};
    conv2d_layer<B, T> conv_in_, conv_out_;
    mid_block<B, T> mid_;
    std::vector<level> levels_;
    group_norm_layer<B, T> conv_norm_out_;
};

/// Which halves of the VAE to bind: text-to-image pipelines only decode.
enum class vae_parts : std::uint8_t { encoder = 1, decoder = 2, both = 3 };

/// The diagonal Gaussian the encoder predicts: mean and (clamped) log-variance, (N, latent, h, w) each.
template <class B, class T>
struct latent_distribution {
    tensor<B, T> mean, logvar;
};

/// diffusers AutoencoderKL (see the file comment).
template <class B, class T = float>
    requires computes_in<B, T>
class autoencoder_kl {
public:
    using config = autoencoder_kl_config;
    using tensor_type = tensor<B, T>;
    using distribution = latent_distribution<B, T>;

    autoencoder_kl() = default;

    /// Binds `parts` below the binder's prefix; problems are collected in the
    /// binder (call finish() once the whole model is bound).
    static autoencoder_kl bind(weight_binder<B, T> b, const config& c, vae_parts parts = vae_parts::both) {
        c.validate();
        autoencoder_kl v;
        v.config_ = c;
        const index_t latent = c.latent_channels;
        if (has(parts, vae_parts::encoder)) {
            v.encoder_ = encoder<B, T>::bind(b.scope("encoder"), c);
            if (c.use_quant_conv) v.quant_conv_ = conv2d_layer<B, T>::bind(b, "quant_conv", 2 * latent, 2 * latent, 1);
        }
        if (has(parts, vae_parts::decoder)) {
            if (c.use_post_quant_conv) v.post_quant_conv_ = conv2d_layer<B, T>::bind(b, "post_quant_conv", latent, latent, 1);
            v.decoder_ = decoder<B, T>::bind(b.scope("decoder"), c);
        }
        return v;
    }

    /// Binds from `source` and throws io_error listing every weight problem.
    static autoencoder_kl load(context_t<B>& ctx, const weight_source& source, const config& c, vae_parts parts = vae_parts::both) {
        weight_binder<B, T> b(ctx, source);
        auto v = bind(b, c, parts);
        b.finish();
        return v;
    }

    const config& settings() const noexcept { return config_; }
    bool has_encoder() const noexcept { return encoder_.has_value(); }
    bool has_decoder() const noexcept { return decoder_.has_value(); }

    /// image (N, in_channels, H, W), values in [-1, 1] -> the latent
    /// distribution (unscaled: multiply samples by scaling_factor for the UNet).
    distribution encode(context_t<B>& ctx, const tensor_type& image) const {
        check<value_error>(has_encoder(), "vae", "encode() needs the encoder; it was not bound");
        auto moments = encoder_->forward(ctx, image);
        if (config_.use_quant_conv) moments = quant_conv_(ctx, moments);
        const index_t latent = config_.latent_channels;
        const auto mean = ops::slice(ctx, moments, 1, 0, latent);
        auto logvar = ops::slice(ctx, moments, 1, latent, latent);
        // diffusers clamps before anything derives std or var from it.
        const auto lo = tensor_type::full(ctx, {1}, element_cast<T>(-30.0f));
        const auto hi = tensor_type::full(ctx, {1}, element_cast<T>(20.0f));
        logvar = ops::binary(ctx, binary_op::minimum, ops::binary(ctx, binary_op::maximum, logvar, lo), hi);
        return {mean, logvar};
    }

    /// mean + exp(logvar / 2) * noise, noise element i = philox::normal(seed,
    /// offset + i) (ops::randn). Not torch's generator: same seed, other numbers.
    static tensor_type sample(context_t<B>& ctx, const tensor_type& mean, const tensor_type& logvar, std::uint64_t seed,
                              std::uint64_t offset = 0) {
        check<shape_error>(mean.shape() == logvar.shape(), "vae", "mean ", mean.shape().str(), " and logvar ", logvar.shape().str(),
                           " differ");
        const auto stddev = ops::unary(ctx, unary_op::exp, ops::scale(ctx, logvar, 0.5));
        const auto noise = ops::randn<B, T>(ctx, mean.shape(), seed, offset);
        return ops::add(ctx, mean, ops::mul(ctx, stddev, noise));
    }
    static tensor_type sample(context_t<B>& ctx, const distribution& d, std::uint64_t seed, std::uint64_t offset = 0) {
        return sample(ctx, d.mean, d.logvar, seed, offset);
    }

    /// latents (N, latent_channels, h, w) as the VAE sees them (already divided
    /// by scaling_factor) -> image (N, out_channels, h * f, w * f), roughly in [-1, 1].
    tensor_type decode(context_t<B>& ctx, const tensor_type& latents) const {
        check<value_error>(has_decoder(), "vae", "decode() needs the decoder; it was not bound");
        check<shape_error>(latents.rank() == 4 && latents.dim(1) == config_.latent_channels, "vae", "latents ", latents.shape().str(),
                           " are not (N, ", config_.latent_channels, ", h, w)");
        const auto z = config_.use_post_quant_conv ? post_quant_conv_(ctx, latents) : latents;
        return decoder_->forward(ctx, z);
    }

    // ---- training --------------------------------------------------------------

    /// Weight gradients shaped like the model (diffusers' encoder.*, quant_conv,
    /// post_quant_conv, decoder.*); parts that were not bound stay empty.
    struct param_grads {
        typename encoder<B, T>::param_grads encoder;
        conv2d_layer<B, T> quant_conv, post_quant_conv;
        typename decoder<B, T>::param_grads decoder;
    };

    struct encode_saved {
        typename encoder<B, T>::saved encoder;
        ops::conv2d_saved<B, T> quant_conv;
        ops::binary_saved<B, T> clamp_low, clamp_high;
    };
    /// encode() keeping what encode_backward() needs; with `trainable` also what the weight gradients need.
    std::pair<distribution, encode_saved> encode_train(context_t<B>& ctx, const tensor_type& image, bool trainable = false) const {
        check<value_error>(has_encoder(), "vae", "encode_train() needs the encoder; it was not bound");
        encode_saved s;
        auto [moments, se] = encoder_->forward_train(ctx, image, trainable);
        s.encoder = std::move(se);
        if (config_.use_quant_conv) std::tie(moments, s.quant_conv) = modules::detail::layer_forward(ctx, quant_conv_, moments, trainable);
        const index_t latent = config_.latent_channels;
        const auto mean = ops::slice(ctx, moments, 1, 0, latent);
        const auto raw = ops::slice(ctx, moments, 1, latent, latent);
        const auto lo = tensor_type::full(ctx, {1}, element_cast<T>(-30.0f));
        const auto hi = tensor_type::full(ctx, {1}, element_cast<T>(20.0f));
        tensor_type low, logvar;
        std::tie(low, s.clamp_low) = ops::binary_forward(ctx, binary_op::maximum, raw, lo);
        std::tie(logvar, s.clamp_high) = ops::binary_forward(ctx, binary_op::minimum, low, hi);
        return {distribution{mean, logvar}, std::move(s)};
    }
    /// Gradient w.r.t. the image for the gradients of mean and (clamped) logvar
    /// (either may be undefined: zero); weight gradients added into *pg.
    tensor_type encode_backward(context_t<B>& ctx, const encode_saved& s, const tensor_type& grad_mean, const tensor_type& grad_logvar,
                                param_grads* pg = nullptr) const {
        check<value_error>(has_encoder(), "vae", "encode_backward() needs the encoder; it was not bound");
        const auto& shape_of = s.clamp_low.a.shape();
        check<shape_error>((!grad_mean.defined() || grad_mean.shape() == shape_of) && (!grad_logvar.defined() || grad_logvar.shape() == shape_of),
                           "vae", "latent gradients do not match the encoded shape ", shape_of.str());
        const auto dm = modules::detail::grad_or_zeros(ctx, grad_mean, shape_of);
        auto dl = modules::detail::grad_or_zeros(ctx, grad_logvar, shape_of);
        dl = ops::binary_backward(ctx, s.clamp_high, dl, {.input = true, .params = false}).first;
        dl = ops::binary_backward(ctx, s.clamp_low, dl, {.input = true, .params = false}).first;
        auto d = ops::concat(ctx, std::vector<tensor_type>{dm, dl}, 1);
        if (config_.use_quant_conv) d = modules::detail::layer_backward(ctx, s.quant_conv, d, pg ? &pg->quant_conv : nullptr);
        return encoder_->backward(ctx, s.encoder, d, pg ? &pg->encoder : nullptr);
    }

    /// What sample_backward needs: the noise and the standard deviation.
    struct sample_saved {
        tensor_type noise, stddev;
    };
    /// Gradients of a reparameterised sample w.r.t. the distribution.
    struct distribution_grads {
        tensor_type mean, logvar;
    };
    /// z = mean + exp(logvar / 2) * noise for a given noise (N, latent, h, w).
    static std::pair<tensor_type, sample_saved> sample_forward(context_t<B>& ctx, const distribution& d, const tensor_type& noise) {
        check<shape_error>(d.mean.shape() == d.logvar.shape() && noise.shape() == d.mean.shape(), "vae", "mean ", d.mean.shape().str(),
                           ", logvar ", d.logvar.shape().str(), " and noise ", noise.shape().str(), " differ");
        const auto stddev = ops::unary(ctx, unary_op::exp, ops::scale(ctx, d.logvar, 0.5));
        return {ops::add(ctx, d.mean, ops::mul(ctx, stddev, noise)), sample_saved{noise, stddev}};
    }
    /// As above with Philox noise (the same numbers as sample()).
    static std::pair<tensor_type, sample_saved> sample_forward(context_t<B>& ctx, const distribution& d, std::uint64_t seed,
                                                               std::uint64_t offset = 0) {
        return sample_forward(ctx, d, ops::randn<B, T>(ctx, d.mean.shape(), seed, offset));
    }
    /// d mean = g, d logvar = g * noise * std / 2.
    static distribution_grads sample_backward(context_t<B>& ctx, const sample_saved& s, const tensor_type& grad_z) {
        check<shape_error>(grad_z.shape() == s.noise.shape(), "vae", "sample gradient ", grad_z.shape().str(), " is not ",
                           s.noise.shape().str());
        return {grad_z, ops::scale(ctx, ops::mul(ctx, grad_z, ops::mul(ctx, s.noise, s.stddev)), 0.5)};
    }

    /// diffusers DiagonalGaussianDistribution.kl() against N(0, 1):
    /// 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar) over (C, H, W) -> (N,).
    static tensor_type kl(context_t<B>& ctx, const distribution& d) {
        check<shape_error>(d.mean.rank() == 4 && d.mean.shape() == d.logvar.shape(), "vae", "mean ", d.mean.shape().str(), " and logvar ",
                           d.logvar.shape().str(), " are not matching (N, C, H, W)");
        const auto var = ops::unary(ctx, unary_op::exp, d.logvar);
        const auto terms = ops::sub(ctx, ops::add(ctx, ops::mul(ctx, d.mean, d.mean), var),
                                    ops::add(ctx, d.logvar, tensor_type::full(ctx, {1}, element_cast<T>(1.0f))));
        return ops::scale(ctx, ops::sum(ctx, terms, {1, 2, 3}), 0.5).reshape({d.mean.dim(0)});
    }
    /// Gradients of kl() for grad_kl (N,): d mean = g mean, d logvar = g (exp(logvar) - 1) / 2.
    static distribution_grads kl_backward(context_t<B>& ctx, const distribution& d, const tensor_type& grad_kl) {
        check<shape_error>(d.mean.rank() == 4 && grad_kl.rank() == 1 && grad_kl.dim(0) == d.mean.dim(0), "vae", "KL gradient ",
                           grad_kl.shape().str(), " is not (", d.mean.dim(0), ")");
        const auto g = grad_kl.reshape({d.mean.dim(0), 1, 1, 1});
        const auto var = ops::unary(ctx, unary_op::exp, d.logvar);
        const auto dl = ops::sub(ctx, var, tensor_type::full(ctx, {1}, element_cast<T>(1.0f)));
        return {ops::mul(ctx, d.mean, g), ops::scale(ctx, ops::mul(ctx, dl, g), 0.5)};
    }

    struct decode_saved {
        ops::conv2d_saved<B, T> post_quant_conv;
        typename decoder<B, T>::saved decoder;
    };
    /// decode() keeping what decode_backward() needs; with `trainable` also what the weight gradients need.
    std::pair<tensor_type, decode_saved> decode_train(context_t<B>& ctx, const tensor_type& latents, bool trainable = false) const {
        check<value_error>(has_decoder(), "vae", "decode_train() needs the decoder; it was not bound");
        check<shape_error>(latents.rank() == 4 && latents.dim(1) == config_.latent_channels, "vae", "latents ", latents.shape().str(),
                           " are not (N, ", config_.latent_channels, ", h, w)");
        decode_saved s;
        auto z = latents;
        if (config_.use_post_quant_conv) std::tie(z, s.post_quant_conv) = modules::detail::layer_forward(ctx, post_quant_conv_, latents, trainable);
        auto [image, sd] = decoder_->forward_train(ctx, z, trainable);
        s.decoder = std::move(sd);
        return {image, std::move(s)};
    }
    /// Gradient w.r.t. the latents for grad_image; weight gradients added into *pg.
    tensor_type decode_backward(context_t<B>& ctx, const decode_saved& s, const tensor_type& grad_image, param_grads* pg = nullptr) const {
        check<value_error>(has_decoder(), "vae", "decode_backward() needs the decoder; it was not bound");
        auto d = decoder_->backward(ctx, s.decoder, grad_image, pg ? &pg->decoder : nullptr);
        if (config_.use_post_quant_conv) d = modules::detail::layer_backward(ctx, s.post_quant_conv, d, pg ? &pg->post_quant_conv : nullptr);
        return d;
    }

    /// Calls f(key, weight, grad) for every bound weight, keyed as in
    /// diffusers' state dict ("encoder.conv_in.weight", ...); grad is
    /// undefined where `grads` (may be null) holds none.
    template <class F>
    void for_each_parameter(const param_grads* grads, F&& f) const {
        using modules::detail::visit_layer;
        if (encoder_) {
            encoder_->for_each_parameter(grads ? &grads->encoder : nullptr, "encoder.", f);
            visit_layer("quant_conv", quant_conv_, grads ? &grads->quant_conv : nullptr, f);
        }
        if (decoder_) {
            visit_layer("post_quant_conv", post_quant_conv_, grads ? &grads->post_quant_conv : nullptr, f);
            decoder_->for_each_parameter(grads ? &grads->decoder : nullptr, "decoder.", f);
        }
    }

    const encoder<B, T>& encoder_part() const {
        check<value_error>(has_encoder(), "vae", "the encoder was not bound");
        return *encoder_;
    }
    const decoder<B, T>& decoder_part() const {
        check<value_error>(has_decoder(), "vae", "the decoder was not bound");
        return *decoder_;
    }

private:
    static bool has(vae_parts parts, vae_parts part) {
        return (static_cast<std::uint8_t>(parts) & static_cast<std::uint8_t>(part)) != 0;
    }

    config config_{};
    std::optional<encoder<B, T>> encoder_;
    std::optional<decoder<B, T>> decoder_;
    conv2d_layer<B, T> quant_conv_, post_quant_conv_;
};

}  // namespace dynamicid::modules::vae
