// dynamicid io: diffusers module keys -> original (CompVis / LDM) Stable
// Diffusion 1.x checkpoint keys.
//
// The binder asks for diffusers keys; these functions give the key under which
// an original single-file checkpoint stores the same tensor (without the
// "model.diffusion_model." / "first_stage_model." prefix). The layout facts:
//
// UNet, with L_i = layers_per_block of level i and n levels:
//   conv_in                               input_blocks.0.0
//   time_embedding.linear_1 / linear_2    time_embed.0 / time_embed.2
//   down_blocks.i.resnets.j               input_blocks.(1 + sum_{k<i}(L_k + 1) + j).0
//   down_blocks.i.attentions.j            input_blocks.(same).1
//   down_blocks.i.downsamplers.0.conv     input_blocks.(1 + sum_{k<i}(L_k + 1) + L_i).0.op
//   mid_block.resnets.j                   middle_block.(2 j)
//   mid_block.attentions.0                middle_block.1
//   up_blocks.i.resnets.j                 output_blocks.(sum_{k<i}(L_{n-1-k} + 1) + j).0
//   up_blocks.i.attentions.j              output_blocks.(same).1
//   up_blocks.i.upsamplers.0.conv         output_blocks.(last layer of block i).2.conv when the
//                                         block has attentions, else .1.conv
//   conv_norm_out / conv_out              out.0 / out.2
// A resnet's norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut are
// in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3,
// skip_connection; everything inside a spatial transformer keeps its name.
//
// VAE (encoder / decoder):
//   down_blocks.i.resnets.j               down.i.block.j
//   down_blocks.i.downsamplers.0.conv     down.i.downsample.conv
//   up_blocks.i.resnets.j                 up.(n - 1 - i).block.j        (LDM numbers levels bottom-up)
//   up_blocks.i.upsamplers.0.conv         up.(n - 1 - i).upsample.conv
//   mid_block.resnets.0 / .1              mid.block_1 / mid.block_2
//   mid_block.attentions.0.group_norm     mid.attn_1.norm
//   mid_block.attentions.0.to_q/k/v       mid.attn_1.q / k / v          (1x1 convolutions in LDM)
//   mid_block.attentions.0.to_out.0       mid.attn_1.proj_out           (1x1 convolution in LDM)
//   conv_norm_out                         norm_out
//   resnet conv_shortcut                  nin_shortcut
//   conv_in, conv_out, quant_conv, post_quant_conv keep their names.
#pragma once

#include <dynamicid/core/shape.hpp>

#include <charconv>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dynamicid::io::detail {

/// A stored key that no safetensors file can hold (headers may not contain
/// NUL), returned for a module key with no LDM counterpart so the binder
/// reports it as missing under its own name.
inline std::string unmapped_key(std::string_view key) { return std::string(1, '\0') + std::string(key); }

inline std::vector<std::string_view> split_key(std::string_view key) {
    std::vector<std::string_view> parts;
    std::size_t start = 0;
    while (true) {
        const auto dot = key.find('.', start);
        parts.push_back(key.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start));
        if (dot == std::string_view::npos) break;
        start = dot + 1;
    }
    return parts;
}

inline std::optional<std::size_t> key_index(std::string_view part) {
    std::size_t v = 0;
    const auto [end, ec] = std::from_chars(part.data(), part.data() + part.size(), v);
    if (ec != std::errc{} || end != part.data() + part.size() || part.empty()) return std::nullopt;
    return v;
}

/// parts[from..] joined with '.'.
inline std::string join_from(const std::vector<std::string_view>& parts, std::size_t from) {
    std::string out;
    for (std::size_t i = from; i < parts.size(); ++i) {
        if (i > from) out += '.';
        out += parts[i];
    }
    return out;
}

/// diffusers resnet parameter name (norm1, conv1, ...) -> the UNet's LDM name; empty when unknown.
inline std::string_view ldm_unet_resnet_part(std::string_view name) {
    if (name == "norm1") return "in_layers.0";
    if (name == "conv1") return "in_layers.2";
    if (name == "time_emb_proj") return "emb_layers.1";
    if (name == "norm2") return "out_layers.0";
    if (name == "conv2") return "out_layers.3";
    if (name == "conv_shortcut") return "skip_connection";
    return {};
}

/// What the UNet mapping needs to know of the config.
struct ldm_unet_layout {
    std::vector<std::size_t> layers_per_block;  ///< per down level
    std::vector<bool> up_has_attention;         ///< per up block (diffusers order)
};

/// diffusers UNet2DConditionModel key -> LDM key below "model.diffusion_model.";
/// unmapped_key(key) when the key has no place in the layout.
inline std::string ldm_unet_key(std::string_view key, const ldm_unet_layout& layout) {
    const auto p = split_key(key);
    const std::size_t n = layout.layers_per_block.size();
    const auto resnet = [&](std::size_t from) -> std::optional<std::string> {
        if (p.size() < from + 2) return std::nullopt;
        const auto name = ldm_unet_resnet_part(p[from]);
        if (name.empty()) return std::nullopt;
        return std::string(name) + "." + join_from(p, from + 1);
    };
    const auto fail = [&] { return unmapped_key(key); };
    if (p.size() == 2 && p[0] == "conv_in") return "input_blocks.0.0." + std::string(p[1]);
    if (p.size() == 2 && p[0] == "conv_norm_out") return "out.0." + std::string(p[1]);
    if (p.size() == 2 && p[0] == "conv_out") return "out.2." + std::string(p[1]);
    if (p.size() == 3 && p[0] == "time_embedding") {
        if (p[1] == "linear_1") return "time_embed.0." + std::string(p[2]);
        if (p[1] == "linear_2") return "time_embed.2." + std::string(p[2]);
        return fail();
    }
    if (p.size() >= 4 && p[0] == "mid_block") {
        const auto j = key_index(p[2]);
        if (!j) return fail();
        if (p[1] == "resnets") {
            const auto r = resnet(3);
            return r ? "middle_block." + std::to_string(2 * *j) + "." + *r : fail();
        }
        if (p[1] == "attentions" && *j == 0) return "middle_block.1." + join_from(p, 3);
        return fail();
    }
    if (p.size() < 5 || (p[0] != "down_blocks" && p[0] != "up_blocks")) return fail();
    const auto i = key_index(p[1]);
    const auto j = key_index(p[3]);
    if (!i || !j || *i >= n) return fail();
    if (p[0] == "down_blocks") {
        std::size_t first = 1;
        for (std::size_t k = 0; k < *i; ++k) first += layout.layers_per_block[k] + 1;
        const std::size_t layers = layout.layers_per_block[*i];
        if (p[2] == "downsamplers") {
            if (*j != 0 || p.size() != 6 || p[4] != "conv") return fail();
            return "input_blocks." + std::to_string(first + layers) + ".0.op." + std::string(p[5]);
        }
        if (*j >= layers) return fail();
        if (p[2] == "resnets") {
            const auto r = resnet(4);
            return r ? "input_blocks." + std::to_string(first + *j) + ".0." + *r : fail();
        }
        if (p[2] == "attentions") return "input_blocks." + std::to_string(first + *j) + ".1." + join_from(p, 4);
        return fail();
    }
    std::size_t first = 0;
    for (std::size_t k = 0; k < *i; ++k) first += layout.layers_per_block[n - 1 - k] + 1;
    const std::size_t layers = layout.layers_per_block[n - 1 - *i] + 1;
    const bool attention = *i < layout.up_has_attention.size() && layout.up_has_attention[*i];
    if (p[2] == "upsamplers") {
        if (*j != 0 || p.size() != 6 || p[4] != "conv") return fail();
        return "output_blocks." + std::to_string(first + layers - 1) + (attention ? ".2.conv." : ".1.conv.") + std::string(p[5]);
    }
    if (*j >= layers) return fail();
    if (p[2] == "resnets") {
        const auto r = resnet(4);
        return r ? "output_blocks." + std::to_string(first + *j) + ".0." + *r : fail();
    }
    if (p[2] == "attentions") return "output_blocks." + std::to_string(first + *j) + ".1." + join_from(p, 4);
    return fail();
}

/// diffusers AutoencoderKL key -> LDM key below "first_stage_model."; `levels`
/// is len(block_out_channels). unmapped_key(key) when the key has no place.
inline std::string ldm_vae_key(std::string_view key, std::size_t levels) {
    const auto p = split_key(key);
    const auto fail = [&] { return unmapped_key(key); };
    if (p.size() == 2 && (p[0] == "quant_conv" || p[0] == "post_quant_conv")) return std::string(key);
    if (p.size() < 3 || (p[0] != "encoder" && p[0] != "decoder")) return fail();
    const std::string side(p[0]);
    const auto resnet = [&](std::size_t from) -> std::string {
        if (p.size() != from + 2) return fail();
        const std::string_view name = p[from];
        if (name == "conv_shortcut") return "nin_shortcut." + std::string(p[from + 1]);
        if (name == "norm1" || name == "conv1" || name == "norm2" || name == "conv2") return std::string(name) + "." + std::string(p[from + 1]);
        return fail();
    };
    if (p.size() == 3 && (p[1] == "conv_in" || p[1] == "conv_out")) return std::string(key);
    if (p.size() == 3 && p[1] == "conv_norm_out") return side + ".norm_out." + std::string(p[2]);
    if (p[1] == "mid_block" && p.size() >= 5) {
        const auto j = key_index(p[3]);
        if (!j) return fail();
        if (p[2] == "resnets" && *j < 2) {
            const auto r = resnet(4);
            return r.front() == '\0' ? r : side + ".mid.block_" + std::to_string(*j + 1) + "." + r;
        }
        if (p[2] != "attentions" || *j != 0) return fail();
        const std::string_view param = p.back();
        if (p.size() == 6) {
            if (p[4] == "group_norm") return side + ".mid.attn_1.norm." + std::string(param);
            if (p[4] == "to_q") return side + ".mid.attn_1.q." + std::string(param);
            if (p[4] == "to_k") return side + ".mid.attn_1.k." + std::string(param);
            if (p[4] == "to_v") return side + ".mid.attn_1.v." + std::string(param);
        }
        if (p.size() == 7 && p[4] == "to_out" && p[5] == "0") return side + ".mid.attn_1.proj_out." + std::string(param);
        return fail();
    }
    if ((p[1] == "down_blocks" || p[1] == "up_blocks") && p.size() >= 6) {
        const auto i = key_index(p[2]);
        const auto j = key_index(p[4]);
        if (!i || !j || *i >= levels) return fail();
        const bool down = p[1] == "down_blocks";
        const std::string level = (down ? "down." : "up.") + std::to_string(down ? *i : levels - 1 - *i);
        if (p[3] == "resnets") {
            const auto r = resnet(5);
            return r.front() == '\0' ? r : side + "." + level + ".block." + std::to_string(*j) + "." + r;
        }
        if (p[3] == (down ? "downsamplers" : "upsamplers") && *j == 0 && p.size() == 7 && p[5] == "conv")
            return side + "." + level + (down ? ".downsample.conv." : ".upsample.conv.") + std::string(p[6]);
        return fail();
    }
    return fail();
}

/// True for the VAE mid-block attention projections, which LDM stores as
/// (C, C, 1, 1) convolutions and diffusers binds as (C, C) linear weights.
inline bool is_vae_attention_projection(std::string_view key) {
    const auto p = split_key(key);
    if (p.size() < 6 || (p[0] != "encoder" && p[0] != "decoder") || p[1] != "mid_block" || p[2] != "attentions" || p.back() != "weight")
        return false;
    return (p.size() == 6 && (p[4] == "to_q" || p[4] == "to_k" || p[4] == "to_v")) || (p.size() == 7 && p[4] == "to_out" && p[5] == "0");
}

}  // namespace dynamicid::io::detail
