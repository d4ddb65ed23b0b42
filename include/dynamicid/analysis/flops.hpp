// dynamicid analysis: multiply-accumulate (MAC) counts of the SD1.x models,
// derived from their configs and input shapes alone (no weights, no run).
//
// What counts: convolutions, linear layers and the two matmuls of every
// attention (q k^T and p v). Pointwise work (norms, activations, softmax,
// residual adds, resampling copies) is ignored: it is a rounding error next
// to the matmuls and its cost is memory, not arithmetic. One MAC is two
// FLOPs; GFLOP/s figures use 2 * total().
//
// Each count is a tree that mirrors the module graph, named like diffusers'
// state-dict paths, so a breakdown can be printed or looked up:
//
//     using namespace dynamicid;
//     auto unet = analysis::unet_macs(modules::unet::unet_config{}, {.batch = 1, .height = 64, .width = 64, .tokens = 77});
//     double g = unet.total() / 1e9;                                        // ~401.6 GMAC for SD1.5
//     auto mid = unet.find("mid_block.attentions.0")->total();
//     auto vae = analysis::vae_decoder_macs(modules::vae::autoencoder_kl_config{}, {.batch = 1, .height = 64, .width = 64});
//     auto clip = analysis::text_encoder_macs(modules::clip::encoder_config{}, {.batch = 1, .tokens = 77});
#pragma once

#include <dynamicid/core/config.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/modules/clip/encoder.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/vae/autoencoder_kl.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dynamicid::analysis {

/// MACs of one module: its own primitives (`self`) plus its children's.
struct mac_node {
    std::string name;
    std::string kind;  ///< "conv2d", "linear", "attention", or the module's class ("resnet", "transformer_2d", ...)
    std::uint64_t self = 0;
    std::vector<mac_node> children;

    std::uint64_t total() const noexcept {
        std::uint64_t sum = self;
        for (const auto& c : children) sum += c.total();
        return sum;
    }

    /// Appends a child and returns it (for building nested nodes).
    mac_node& add(mac_node child) {
        children.push_back(std::move(child));
        return children.back();
    }

    /// The descendant at a dotted path of child names ("up_blocks.1.attentions.0"),
    /// or nullptr. Names may themselves contain dots ("down_blocks.0").
    const mac_node* find(std::string_view path) const {
        if (path.empty()) return this;
        for (const auto& c : children) {
            const std::string_view n = c.name;
            if (path == n) return &c;
            if (path.size() > n.size() && path.substr(0, n.size()) == n && path[n.size()] == '.')
                if (const auto* hit = c.find(path.substr(n.size() + 1))) return hit;
        }
        return nullptr;
    }

    /// Sum over every descendant primitive of one kind ("conv2d", "linear", "attention").
    std::uint64_t total_of_kind(std::string_view k) const noexcept {
        std::uint64_t sum = (kind == k) ? self : 0;
        for (const auto& c : children) sum += c.total_of_kind(k);
        return sum;
    }
};

// ---- primitives ------------------------------------------------------------------

/// Convolution producing (n, c_out, out_h, out_w) from c_in channels with a kh x kw kernel.
inline mac_node conv2d_macs(std::string name, index_t n, index_t c_in, index_t c_out, index_t kernel, index_t out_h, index_t out_w,
                            index_t groups = 1) {
    check<value_error>(n >= 0 && c_in > 0 && c_out > 0 && kernel > 0 && groups > 0 && c_in % groups == 0, "flops", "bad conv2d sizes for '",
                       name, "'");
    const auto macs = static_cast<std::uint64_t>(n) * static_cast<std::uint64_t>(out_h * out_w) * static_cast<std::uint64_t>(c_out) *
                      static_cast<std::uint64_t>(c_in / groups) * static_cast<std::uint64_t>(kernel * kernel);
    return {std::move(name), "conv2d", macs, {}};
}

/// Linear layer applied to `rows` vectors.
inline mac_node linear_macs(std::string name, index_t rows, index_t in, index_t out) {
    const auto macs = static_cast<std::uint64_t>(rows) * static_cast<std::uint64_t>(in) * static_cast<std::uint64_t>(out);
    return {std::move(name), "linear", macs, {}};
}

/// The two matmuls of scaled-dot-product attention: `batch_heads` problems of
/// (lq x d) (d x lk) and (lq x lk) (lk x dv). A causal mask does not change
/// the count (the dense product is computed and then masked).
inline mac_node attention_matmul_macs(std::string name, index_t batch_heads, index_t lq, index_t lk, index_t d, index_t dv) {
    const auto bl = static_cast<std::uint64_t>(batch_heads) * static_cast<std::uint64_t>(lq) * static_cast<std::uint64_t>(lk);
    return {std::move(name), "attention", bl * static_cast<std::uint64_t>(d + dv), {}};
}

// ---- shared building blocks --------------------------------------------------------

namespace detail {

inline mac_node group(std::string name, std::string kind) { return {std::move(name), std::move(kind), 0, {}}; }

/// ResnetBlock2D at h x w: conv1, optional time projection, conv2, 1x1 shortcut when channels change.
inline mac_node resnet_macs(std::string name, index_t n, index_t in, index_t out, index_t h, index_t w, index_t temb_channels) {
    auto r = group(std::move(name), "resnet");
    r.add(conv2d_macs("conv1", n, in, out, 3, h, w));
    if (temb_channels > 0) r.add(linear_macs("time_emb_proj", n, temb_channels, out));
    r.add(conv2d_macs("conv2", n, out, out, 3, h, w));
    if (in != out) r.add(conv2d_macs("conv_shortcut", n, in, out, 1, h, w));
    return r;
}

/// diffusers Attention with `heads` heads over inner width `inner`: q from
/// lq query tokens of width `query_dim`, k/v from lk tokens of width `kv_dim`.
inline mac_node attention_block_macs(std::string name, index_t n, index_t lq, index_t lk, index_t query_dim, index_t kv_dim, index_t inner,
                                     index_t heads) {
    auto a = group(std::move(name), "attention_layer");
    a.add(linear_macs("to_q", n * lq, query_dim, inner));
    a.add(linear_macs("to_k", n * lk, kv_dim, inner));
    a.add(linear_macs("to_v", n * lk, kv_dim, inner));
    a.add(attention_matmul_macs("scores_and_values", n * heads, lq, lk, inner / heads, inner / heads));
    a.add(linear_macs("to_out.0", n * lq, inner, query_dim));
    return a;
}

/// Transformer2DModel over a (n, c, h, w) map with `tokens` text tokens.
inline mac_node transformer_macs(std::string name, index_t n, index_t c, index_t h, index_t w, index_t heads, index_t layers,
                                 index_t cross_dim, index_t tokens, bool linear_projection) {
    auto t = group(std::move(name), "transformer_2d");
    const index_t hw = h * w;
    const index_t inner = c;  // SD1.x: heads * (c / heads)
    t.add(linear_projection ? linear_macs("proj_in", n * hw, c, inner) : conv2d_macs("proj_in", n, c, inner, 1, h, w));
    for (index_t i = 0; i < layers; ++i) {
        auto& b = t.add(group("transformer_blocks." + std::to_string(i), "basic_transformer_block"));
        b.add(attention_block_macs("attn1", n, hw, hw, inner, inner, inner, heads));
        b.add(attention_block_macs("attn2", n, hw, tokens, inner, cross_dim, inner, heads));
        auto& ff = b.add(group("ff", "feed_forward"));
        ff.add(linear_macs("net.0.proj", n * hw, inner, 8 * inner));  // GEGLU: hidden and gate halves
        ff.add(linear_macs("net.2", n * hw, 4 * inner, inner));
    }
    t.add(linear_projection ? linear_macs("proj_out", n * hw, inner, c) : conv2d_macs("proj_out", n, inner, c, 1, h, w));
    return t;
}

}  // namespace detail

// ---- UNet ---------------------------------------------------------------------------

/// One UNet evaluation: `batch` latents of height x width (latent pixels),
/// `tokens` text tokens per entry. Classifier-free guidance doubles `batch`.
struct unet_input {
    index_t batch = 1;
    index_t height = 64;
    index_t width = 64;
    index_t tokens = 77;
};

/// MACs of UNet2DConditionModel (SD1.x surface) for one evaluation.
inline mac_node unet_macs(const modules::unet::unet_config& c, const unet_input& in) {
    c.validate();
    const std::size_t levels = c.block_out_channels.size();
    const index_t factor = index_t{1} << (levels - 1);
    check<value_error>(in.batch >= 1 && in.tokens >= 1 && in.height > 0 && in.width > 0 && in.height % factor == 0 && in.width % factor == 0,
                       "flops", "unet input ", in.height, "x", in.width, " must be a positive multiple of ", factor);
    const index_t n = in.batch;
    const index_t base = c.block_out_channels[0];
    const index_t temb = c.time_embedding_dim > 0 ? c.time_embedding_dim : 4 * base;

    mac_node u = detail::group("unet", "unet_2d_condition");
    auto& te = u.add(detail::group("time_embedding", "timestep_embedding"));
    te.add(linear_macs("linear_1", n, base, temb));
    te.add(linear_macs("linear_2", n, temb, temb));
    u.add(conv2d_macs("conv_in", n, c.in_channels, base, 3, in.height, in.width));

    const auto transformer = [&](std::string name, std::size_t level, index_t ch, index_t h, index_t w) {
        return detail::transformer_macs(std::move(name), n, ch, h, w, c.attention_head_dim[level], c.transformer_layers_per_block[level],
                                        c.cross_attention_dim, in.tokens, c.use_linear_projection);
    };

    index_t h = in.height, w = in.width;
    for (std::size_t i = 0; i < levels; ++i) {
        auto& block = u.add(detail::group("down_blocks." + std::to_string(i), c.down_block_types[i]));
        const bool cross = c.down_block_types[i] == "CrossAttnDownBlock2D";
        const index_t out = c.block_out_channels[i];
        index_t ch = i == 0 ? base : c.block_out_channels[i - 1];
        for (index_t j = 0; j < c.layers_per_block[i]; ++j) {
            block.add(detail::resnet_macs("resnets." + std::to_string(j), n, ch, out, h, w, temb));
            if (cross) block.add(transformer("attentions." + std::to_string(j), i, out, h, w));
            ch = out;
        }
        if (i + 1 < levels) {
            h /= 2;
            w /= 2;
            block.add(conv2d_macs("downsamplers.0.conv", n, out, out, 3, h, w));
        }
    }

    {
        const index_t ch = c.block_out_channels[levels - 1];
        auto& mid = u.add(detail::group("mid_block", "UNetMidBlock2DCrossAttn"));
        mid.add(detail::resnet_macs("resnets.0", n, ch, ch, h, w, temb));
        mid.add(transformer("attentions.0", levels - 1, ch, h, w));
        mid.add(detail::resnet_macs("resnets.1", n, ch, ch, h, w, temb));
    }

    for (std::size_t i = 0; i < levels; ++i) {
        const std::size_t r = levels - 1 - i;  // the down level this up block mirrors
        auto& block = u.add(detail::group("up_blocks." + std::to_string(i), c.up_block_types[i]));
        const bool cross = c.up_block_types[i] == "CrossAttnUpBlock2D";
        const index_t out = c.block_out_channels[r];
        const index_t skip_in = c.block_out_channels[r == 0 ? 0 : r - 1];
        const index_t prev = c.block_out_channels[i == 0 ? levels - 1 : r + 1];
        const index_t layers = c.layers_per_block[r] + 1;
        for (index_t j = 0; j < layers; ++j) {
            const index_t skip = j == layers - 1 ? skip_in : out;
            const index_t res_in = (j == 0 ? prev : out) + skip;
            block.add(detail::resnet_macs("resnets." + std::to_string(j), n, res_in, out, h, w, temb));
            if (cross) block.add(transformer("attentions." + std::to_string(j), r, out, h, w));
        }
        if (i + 1 < levels) {
            h *= 2;
            w *= 2;
            block.add(conv2d_macs("upsamplers.0.conv", n, out, out, 3, h, w));
        }
    }
    u.add(conv2d_macs("conv_out", n, base, c.out_channels, 3, in.height, in.width));
    return u;
}

// ---- VAE ------------------------------------------------------------------------------

/// `batch` latents of height x width (latent pixels); the image is 2^(levels-1) times larger.
struct vae_input {
    index_t batch = 1;
    index_t height = 64;
    index_t width = 64;
};

namespace detail {

/// The VAE mid block: resnet, single-head spatial self-attention, resnet.
inline mac_node vae_mid_macs(const modules::vae::autoencoder_kl_config& c, index_t n, index_t ch, index_t h, index_t w) {
    auto mid = group("mid_block", "UNetMidBlock2D");
    mid.add(resnet_macs("resnets.0", n, ch, ch, h, w, 0));
    if (c.mid_block_add_attention) mid.add(attention_block_macs("attentions.0", n, h * w, h * w, ch, ch, ch, 1));
    mid.add(resnet_macs("resnets.1", n, ch, ch, h, w, 0));
    return mid;
}

}  // namespace detail

/// MACs of AutoencoderKL's decode(): post_quant_conv and the decoder.
inline mac_node vae_decoder_macs(const modules::vae::autoencoder_kl_config& c, const vae_input& in) {
    c.validate();
    check<value_error>(in.batch >= 1 && in.height > 0 && in.width > 0, "flops", "vae input sizes must be positive");
    const index_t n = in.batch;
    const std::size_t levels = c.block_out_channels.size();
    const index_t top = c.block_out_channels[levels - 1];
    mac_node v = detail::group("vae_decode", "autoencoder_kl");
    if (c.use_post_quant_conv)
        v.add(conv2d_macs("post_quant_conv", n, c.latent_channels, c.latent_channels, 1, in.height, in.width));
    auto& d = v.add(detail::group("decoder", "decoder"));
    index_t h = in.height, w = in.width;
    d.add(conv2d_macs("conv_in", n, c.latent_channels, top, 3, h, w));
    d.add(detail::vae_mid_macs(c, n, top, h, w));
    index_t ch = top;
    for (std::size_t i = 0; i < levels; ++i) {
        const index_t out = c.block_out_channels[levels - 1 - i];
        auto& level = d.add(detail::group("up_blocks." + std::to_string(i), "UpDecoderBlock2D"));
        for (index_t j = 0; j < c.layers_per_block + 1; ++j) {
            level.add(detail::resnet_macs("resnets." + std::to_string(j), n, ch, out, h, w, 0));
            ch = out;
        }
        if (i + 1 < levels) {
            h *= 2;
            w *= 2;
            level.add(conv2d_macs("upsamplers.0.conv", n, out, out, 3, h, w));
        }
    }
    d.add(conv2d_macs("conv_out", n, c.block_out_channels[0], c.out_channels, 3, h, w));
    return v;
}

/// MACs of AutoencoderKL's encode() of an image of (height, width) image pixels:
/// the encoder and quant_conv.
inline mac_node vae_encoder_macs(const modules::vae::autoencoder_kl_config& c, const vae_input& image) {
    c.validate();
    const std::size_t levels = c.block_out_channels.size();
    const index_t factor = index_t{1} << (levels - 1);
    check<value_error>(image.batch >= 1 && image.height > 0 && image.width > 0 && image.height % factor == 0 && image.width % factor == 0,
                       "flops", "vae image ", image.height, "x", image.width, " must be a positive multiple of ", factor);
    const index_t n = image.batch;
    mac_node v = detail::group("vae_encode", "autoencoder_kl");
    auto& e = v.add(detail::group("encoder", "encoder"));
    index_t h = image.height, w = image.width;
    e.add(conv2d_macs("conv_in", n, c.in_channels, c.block_out_channels[0], 3, h, w));
    index_t ch = c.block_out_channels[0];
    for (std::size_t i = 0; i < levels; ++i) {
        const index_t out = c.block_out_channels[i];
        auto& level = e.add(detail::group("down_blocks." + std::to_string(i), "DownEncoderBlock2D"));
        for (index_t j = 0; j < c.layers_per_block; ++j) {
            level.add(detail::resnet_macs("resnets." + std::to_string(j), n, ch, out, h, w, 0));
            ch = out;
        }
        if (i + 1 < levels) {
            h /= 2;
            w /= 2;
            level.add(conv2d_macs("downsamplers.0.conv", n, out, out, 3, h, w));
        }
    }
    e.add(detail::vae_mid_macs(c, n, ch, h, w));
    e.add(conv2d_macs("conv_out", n, ch, 2 * c.latent_channels, 3, h, w));
    if (c.use_quant_conv) v.add(conv2d_macs("quant_conv", n, 2 * c.latent_channels, 2 * c.latent_channels, 1, h, w));
    return v;
}

// ---- text encoder ------------------------------------------------------------------------

struct text_input {
    index_t batch = 1;
    index_t tokens = 77;
};

/// MACs of a CLIP text transformer (embeddings are lookups and cost nothing).
inline mac_node text_encoder_macs(const modules::clip::encoder_config& c, const text_input& in) {
    c.validate();
    check<value_error>(in.batch >= 1 && in.tokens >= 1, "flops", "text input sizes must be positive");
    const index_t rows = in.batch * in.tokens, d = c.hidden_size;
    mac_node t = detail::group("text_encoder", "clip_text_model");
    auto& enc = t.add(detail::group("encoder", "clip_encoder"));
    for (index_t i = 0; i < c.num_hidden_layers; ++i) {
        auto& layer = enc.add(detail::group("layers." + std::to_string(i), "clip_encoder_layer"));
        auto& attn = layer.add(detail::group("self_attn", "attention_layer"));
        attn.add(linear_macs("q_proj", rows, d, d));
        attn.add(linear_macs("k_proj", rows, d, d));
        attn.add(linear_macs("v_proj", rows, d, d));
        attn.add(attention_matmul_macs("scores_and_values", in.batch * c.num_attention_heads, in.tokens, in.tokens,
                                       d / c.num_attention_heads, d / c.num_attention_heads));
        attn.add(linear_macs("out_proj", rows, d, d));
        auto& mlp = layer.add(detail::group("mlp", "clip_mlp"));
        mlp.add(linear_macs("fc1", rows, d, c.intermediate_size));
        mlp.add(linear_macs("fc2", rows, c.intermediate_size, d));
    }
    return t;
}

// ---- a whole text-to-image run ------------------------------------------------------------

/// The sizes of one text_to_image call (see pipelines/text_to_image.hpp).
struct generation_input {
    index_t images = 1;        ///< prompts x images per prompt
    index_t width = 512;       ///< image pixels
    index_t height = 512;
    index_t steps = 50;
    index_t tokens = 77;
    bool guidance = true;      ///< classifier-free guidance doubles the UNet batch and the text batch
    index_t vae_factor = 8;
};

/// Text encoding, `steps` UNet evaluations and the VAE decode of one generation.
inline mac_node text_to_image_macs(const modules::clip::encoder_config& text, const modules::unet::unet_config& unet,
                                   const modules::vae::autoencoder_kl_config& vae, const generation_input& g) {
    check<value_error>(g.vae_factor > 0 && g.width % g.vae_factor == 0 && g.height % g.vae_factor == 0 && g.steps >= 0, "flops",
                       "image size ", g.width, "x", g.height, " is not a multiple of ", g.vae_factor);
    const index_t cfg = g.guidance ? 2 : 1;
    mac_node run = detail::group("text_to_image", "pipeline");
    run.add(text_encoder_macs(text, {.batch = cfg * g.images, .tokens = g.tokens}));
    auto step = unet_macs(unet, {.batch = cfg * g.images, .height = g.height / g.vae_factor, .width = g.width / g.vae_factor, .tokens = g.tokens});
    mac_node steps = detail::group("unet_steps", "unet_2d_condition");
    steps.self = step.total() * static_cast<std::uint64_t>(g.steps);
    run.add(std::move(steps));
    run.add(vae_decoder_macs(vae, {.batch = g.images, .height = g.height / g.vae_factor, .width = g.width / g.vae_factor}));
    return run;
}

}  // namespace dynamicid::analysis
