// dynamicid io: opening Stable Diffusion 1.x checkpoints as people have them.
//
// Two layouts:
//
//   * a diffusers folder: model_index.json, unet/ and vae/ (config.json +
//     diffusion_pytorch_model.safetensors), text_encoder/ (config.json +
//     model.safetensors), tokenizer/ (vocab.json + merges.txt),
//     scheduler/scheduler_config.json. Weights may be sharded
//     (<name>.safetensors.index.json with a "weight_map") or a variant
//     (<name>.fp16.safetensors); a folder holding only the fp16 variant is
//     read without asking.
//   * an original single-file checkpoint (v1-5-pruned-emaonly.safetensors):
//     model.diffusion_model.* (UNet), first_stage_model.* (VAE),
//     cond_stage_model.transformer.text_model.* (CLIP text encoder). Each
//     component's weight_source translates the diffusers key the binder asks
//     for into the stored key (see detail/ldm_keys.hpp), so the file stays
//     memory-mapped; only the VAE's four mid-block attention projections,
//     stored as (C, C, 1, 1) convolutions, are copied once to be bound as
//     (C, C) (with_reshaped). Configs are the caller's, a diffusers folder's
//     (options.config_folder), or inferred from tensor shapes on top of
//     SD1.5's (settings that shapes cannot show, such as head counts and
//     norm groups, keep SD1.5's values unless the caller gives a config).
//
// F32, F16 and BF16 weights all load; conversion to the working type happens
// in the binder. PyTorch pickle files (.bin, .ckpt, .pt) are refused with an
// io_error suggesting safetensors: unpickling can run arbitrary code.
//
//     auto ckpt = dynamicid::io::sd_checkpoint::open("stable-diffusion-v1-5");   // folder or single file
//     auto unet = dynamicid::modules::unet::unet_2d_condition<B>::load(ctx, ckpt.unet_weights(), ckpt.unet);
//     auto vae = dynamicid::modules::vae::autoencoder_kl<B>::load(ctx, ckpt.vae_weights(), ckpt.vae);
//     auto text = dynamicid::modules::clip::text_model<B>::load(ctx, ckpt.text_encoder_weights(), ckpt.text_encoder);
//     // tokenizer: clip_tokenizer::from_folder(*ckpt.tokenizer_folder), or load_default() when absent
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/shape.hpp>
#include <dynamicid/io/detail/ldm_keys.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/clip/text_model.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/vae/autoencoder_kl.hpp>
#include <dynamicid/modules/weights.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dynamicid::io {

inline constexpr std::string_view checkpoint_component = "checkpoint";

/// One weight key bound under another shape with the same number of elements.
struct reshape_rule {
    std::string key;  ///< the module key (what the binder asks for)
    shape to;
};

/// `source` with the tensors named in `rules` presented under the rule's
/// shape (same elements, same order: e.g. a (C, C, 1, 1) convolution bound as a
/// (C, C) linear weight). Only those tensors are copied, once, into a small
/// in-memory file; every other key still reads the memory-mapped files. A rule
/// whose tensor is absent, already has the shape, or has another element count
/// changes nothing (the binder then reports what it finds).
///
///     auto src = dynamicid::io::with_reshaped(ldm_vae, {{"decoder.mid_block.attentions.0.to_q.weight", {512, 512}}});
inline modules::weight_source with_reshaped(const modules::weight_source& source, const std::vector<reshape_rule>& rules) {
    safetensors_writer writer;
    auto aliases = std::make_shared<std::unordered_map<std::string, std::string>>();
    for (const auto& rule : rules) {
        std::string stored;
        const auto* file = source.find(rule.key, &stored);
        if (!file || aliases->contains(rule.key)) continue;
        const auto& info = file->info(stored);
        if (info.dims == rule.to || info.dims.numel() != rule.to.numel()) continue;
        // A name no real tensor has; it lives only in the in-memory file.
        std::string alias = stored + " as " + rule.to.str();
        writer.add_bytes(alias, info.type, rule.to, file->bytes(stored));
        aliases->emplace(rule.key, std::move(alias));
    }
    if (aliases->empty()) return source;
    auto files = source.files();
    const auto bytes = writer.to_bytes();
    files.push_back(std::make_shared<const safetensors_file>(safetensors_file::from_memory(bytes)));
    return modules::weight_source(std::move(files), [source, aliases](std::string_view key) {
        if (const auto it = aliases->find(std::string(key)); it != aliases->end()) return it->second;
        std::string stored;
        if (source.find(key, &stored)) return stored;
        return detail::unmapped_key(key);
    });
}

/// Which layout a checkpoint came in.
enum class checkpoint_format { diffusers, single_file };

/// Files behind one component (absent ones stay empty).
struct checkpoint_component_files {
    std::filesystem::path folder;        ///< diffusers component folder; empty for a single file
    std::filesystem::path config_file;   ///< the config read, if any
    std::vector<std::filesystem::path> weight_files;  ///< safetensors files (several when sharded)
};

/// Choices for sd_checkpoint::open.
struct sd_checkpoint_options {
    /// diffusers variant to read ("fp16" -> *.fp16.safetensors). Empty: the
    /// plain files, else the fp16 variant when only that is present.
    std::string variant{};
    /// Configs to use instead of the files' (or, for a single file, instead of inference).
    std::optional<modules::unet::unet_config> unet{};
    std::optional<modules::vae::autoencoder_kl_config> vae{};
    std::optional<modules::clip::text_config> text_encoder{};
    std::optional<nlohmann::json> scheduler_config{};
    /// Single file: read unet/vae/text_encoder/scheduler configs (and use the
    /// tokenizer) of this diffusers folder, as diffusers' from_single_file(config=...) does.
    std::optional<std::filesystem::path> config_folder{};
    /// Single file without configs: infer sizes from tensor shapes (else SD1.5's configs as they are).
    bool infer_configs = true;
};

namespace detail {

inline nlohmann::json read_checkpoint_json(const std::filesystem::path& path, std::string_view what) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw io_error(checkpoint_component, "missing " + std::string(what) + ": cannot open '" + path.string() + "'");
    std::stringstream text;
    text << in.rdbuf();
    try {
        return nlohmann::json::parse(text.str());
    } catch (const nlohmann::json::exception& e) {
        throw io_error(checkpoint_component, "'" + path.string() + "' is not valid JSON: " + e.what());
    }
}

inline bool is_pickle_path(const std::filesystem::path& p) {
    const auto ext = p.extension().string();
    return ext == ".bin" || ext == ".ckpt" || ext == ".pt" || ext == ".pth" || ext == ".pkl";
}

[[noreturn]] inline void refuse_pickle(const std::filesystem::path& p) {
    throw io_error(checkpoint_component, "'" + p.string() +
                                             "' holds PyTorch pickle weights, which are not read here (unpickling can run code); "
                                             "convert it to safetensors (e.g. diffusers save_pretrained(..., safe_serialization=True) "
                                             "or safetensors.torch.save_file) and open that");
}

/// "<base>.safetensors" with the variant inserted before the extension.
inline std::string variant_name(const std::string& base, const std::string& ext, const std::string& variant) {
    return variant.empty() ? base + ext : base + "." + variant + ext;
}

/// The shard files named by a *.safetensors.index.json, each checked to hold its tensors.
inline std::vector<std::filesystem::path> read_shard_index(const std::filesystem::path& index) {
    const auto j = read_checkpoint_json(index, "shard index");
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object() || j["weight_map"].empty())
        throw io_error(checkpoint_component, "'" + index.string() + "' has no \"weight_map\" object");
    std::vector<std::filesystem::path> files;
    std::set<std::string> seen;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
        if (!it.value().is_string())
            throw io_error(checkpoint_component, "'" + index.string() + "': weight_map[\"" + it.key() + "\"] is not a file name");
        const auto name = it.value().get<std::string>();
        // A shard is a file next to the index, never a path elsewhere.
        if (name.empty() || name.find('/') != std::string::npos || name.find('\\') != std::string::npos || name == "." || name == "..")
            throw io_error(checkpoint_component, "'" + index.string() + "': shard name '" + name + "' is not a plain file name");
        if (seen.insert(name).second) files.push_back(index.parent_path() / name);
    }
    return files;
}

/// Resolves a diffusers component's weight files (`base` = "diffusion_pytorch_model" or "model").
inline std::vector<std::filesystem::path> resolve_weights(const std::filesystem::path& folder, const std::string& base,
                                                          const std::string& variant) {
    namespace fs = std::filesystem;
    const auto candidates = [&](const std::string& v) -> std::vector<fs::path> {
        const fs::path single = folder / variant_name(base, ".safetensors", v);
        if (fs::is_regular_file(single)) return {single};
        const fs::path index = folder / (base + ".safetensors.index" + (v.empty() ? "" : "." + v) + ".json");
        if (fs::is_regular_file(index)) return read_shard_index(index);
        return {};
    };
    auto files = candidates(variant);
    if (files.empty() && variant.empty()) files = candidates("fp16");
    if (!files.empty()) return files;
    // transformers names its pickles pytorch_model.bin, diffusers diffusion_pytorch_model.bin.
    for (const std::string& stem : {base, std::string("pytorch_model")})
        for (const auto& pickle : {folder / variant_name(stem, ".bin", variant), folder / (stem + ".bin.index.json")})
            if (fs::is_regular_file(pickle)) refuse_pickle(pickle);
    throw io_error(checkpoint_component, "missing weights: no '" + (folder / variant_name(base, ".safetensors", variant)).string() +
                                             "' (nor a sharded " + base + ".safetensors.index" + (variant.empty() ? "" : "." + variant) +
                                             ".json)");
}

inline modules::weight_source open_checked(const std::vector<std::filesystem::path>& paths) {
    for (const auto& p : paths)
        if (!std::filesystem::is_regular_file(p)) throw io_error(checkpoint_component, "missing weight file '" + p.string() + "'");
    return modules::weight_source::open(paths);
}

/// Every tensor a shard index names must be in the shard it names.
inline void check_shard_index(const std::filesystem::path& folder, const std::string& base, const std::string& variant,
                              const modules::weight_source& source) {
    const auto index = folder / (base + ".safetensors.index" + (variant.empty() ? "" : "." + variant) + ".json");
    if (!std::filesystem::is_regular_file(index) || source.files().size() < 1) return;
    const auto j = read_checkpoint_json(index, "shard index");
    std::vector<std::string> missing;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it)
        if (!source.contains(it.key())) missing.push_back(it.key());
    if (!missing.empty())
        throw io_error(checkpoint_component, "'" + index.string() + "' names " + std::to_string(missing.size()) +
                                                 " tensor(s) its shards do not hold, first '" + missing.front() + "'");
}

/// diffusers folders written before diffusers 0.14 name the VAE attention
/// query / key / value / proj_attn; serve those under today's names.
inline modules::weight_source with_legacy_vae_attention(const modules::weight_source& source) {
    bool legacy = false;
    for (const auto& k : source.stored_keys())
        if (k.find("mid_block.attentions.0.query.") != std::string::npos) legacy = true;
    if (!legacy) return source;
    return source.with_map([](std::string_view key) {
        std::string k(key);
        for (const auto& [now, old] : {std::pair{".to_q.", ".query."}, std::pair{".to_k.", ".key."}, std::pair{".to_v.", ".value."},
                                       std::pair{".to_out.0.", ".proj_attn."}})
            if (const auto at = k.find(std::string("mid_block.attentions.0") + now); at != std::string::npos)
                return k.replace(at + 22, std::string_view(now).size(), old);
        return k;
    });
}

/// `groups` when it divides every channel count, else the largest count that
/// does (a guess: norm groups are not visible in tensor shapes).
inline index_t dividing_groups(index_t groups, const std::vector<index_t>& channels) {
    index_t g = groups > 0 ? groups : 1;
    for (const auto c : channels) g = std::gcd(g, c);
    return g > 0 ? g : 1;
}

/// The shape of `key` in `file`, if present.
inline std::optional<shape> stored_shape(const safetensors_file& file, const std::string& key) {
    if (!file.contains(key)) return std::nullopt;
    return file.info(key).dims;
}

}  // namespace detail

/// SD1.5's CLIP ViT-L/14 text encoder configuration (openai/clip-vit-large-patch14).
inline modules::clip::text_config sd15_text_config() {
    return {.vocab_size = 49408, .hidden_size = 768, .intermediate_size = 3072, .num_attention_heads = 12, .num_hidden_layers = 12,
            .max_position_embeddings = 77, .layer_norm_eps = 1e-5, .hidden_act = "quick_gelu", .projection_dim = 768, .eos_token_id = 2};
}

/// SD1.5's scheduler settings as a DDIMScheduler scheduler_config.json.
inline nlohmann::json sd15_scheduler_config() {
    return {{"_class_name", "DDIMScheduler"}, {"beta_start", 0.00085}, {"beta_end", 0.012}, {"beta_schedule", "scaled_linear"},
            {"clip_sample", false},         {"set_alpha_to_one", false}, {"steps_offset", 1},  {"num_train_timesteps", 1000},
            {"prediction_type", "epsilon"}, {"timestep_spacing", "leading"}};
}

/// UNet sizes read off an original checkpoint's tensor shapes (keys below
/// "model.diffusion_model."): levels, channels, layers per level, which levels
/// attend, transformer depth, cross-attention width, projection kind, in/out
/// channels, time embedding width. Everything else (head counts, norm groups,
/// eps, sample_size) is taken from `base`, except that norm groups shrink to
/// the largest count dividing every level's channels when `base`'s does not. io_error when the layout is not an SD1.x UNet.
inline modules::unet::unet_config infer_unet_config(const safetensors_file& file, modules::unet::unet_config base = {},
                                                    const std::string& prefix = "model.diffusion_model.") {
    const auto dims = [&](const std::string& k) { return detail::stored_shape(file, prefix + k); };
    const auto fail = [&](const std::string& what) {
        throw io_error(checkpoint_component, file.source() + ": cannot infer the UNet config: " + what);
    };
    const auto conv_in = dims("input_blocks.0.0.weight");
    const auto conv_out = dims("out.2.weight");
    const auto temb = dims("time_embed.0.weight");
    if (!conv_in || conv_in->rank() != 4 || !conv_out || conv_out->rank() != 4 || !temb || temb->rank() != 2)
        fail("input_blocks.0.0, out.2 or time_embed.0 is missing or not a convolution / linear weight");
    auto c = base;
    c.in_channels = (*conv_in)[1];
    c.out_channels = (*conv_out)[0];
    const index_t base_channels = (*conv_in)[0];
    c.time_embedding_dim = (*temb)[0] == 4 * base_channels ? 0 : (*temb)[0];
    c.block_out_channels.clear();
    c.layers_per_block.clear();
    c.down_block_types.clear();
    c.transformer_layers_per_block.clear();
    std::optional<index_t> cross;
    bool linear_projection = false;
    std::size_t k = 1;
    index_t layers = 0;
    bool attention = false;
    index_t depth = 1;
    const auto close_level = [&](index_t channels) {
        c.block_out_channels.push_back(channels);
        c.layers_per_block.push_back(layers);
        c.down_block_types.push_back(attention ? "CrossAttnDownBlock2D" : "DownBlock2D");
        c.transformer_layers_per_block.push_back(depth);
        layers = 0;
        attention = false;
        depth = 1;
    };
    index_t channels = base_channels;
    for (;; ++k) {
        const std::string block = "input_blocks." + std::to_string(k) + ".";
        if (dims(block + "0.op.weight")) {
            if (layers == 0) fail("a downsampler with no resnet before it at " + block);
            close_level(channels);
            continue;
        }
        const auto res = dims(block + "0.out_layers.3.weight");
        if (!res) break;
        channels = (*res)[0];
        ++layers;
        if (const auto proj = dims(block + "1.proj_in.weight")) {
            attention = true;
            linear_projection = proj->rank() == 2;
            index_t t = 0;
            while (dims(block + "1.transformer_blocks." + std::to_string(t) + ".attn2.to_k.weight")) ++t;
            depth = std::max<index_t>(t, 1);
            if (const auto to_k = dims(block + "1.transformer_blocks.0.attn2.to_k.weight")) cross = (*to_k)[1];
        }
    }
    if (layers == 0) fail("no resnet after the last downsampler");
    close_level(channels);
    const std::size_t n = c.block_out_channels.size();
    c.up_block_types.assign(n, "UpBlock2D");
    std::size_t first = 0;
    for (std::size_t i = 0; i < n; ++i) {
        if (dims("output_blocks." + std::to_string(first) + ".1.proj_in.weight")) c.up_block_types[i] = "CrossAttnUpBlock2D";
        first += static_cast<std::size_t>(c.layers_per_block[n - 1 - i]) + 1;
    }
    if (cross) c.cross_attention_dim = *cross;
    c.use_linear_projection = linear_projection;
    if (c.attention_head_dim.size() != n) c.attention_head_dim.assign(n, c.attention_head_dim.empty() ? 8 : c.attention_head_dim.front());
    c.norm_num_groups = detail::dividing_groups(c.norm_num_groups, c.block_out_channels);
    c.validate();
    return c;
}

/// VAE sizes read off an original checkpoint (keys below "first_stage_model."):
/// levels, channels, layers per level, in/out/latent channels, quant convs and
/// mid-block attention. scaling_factor and sample_size come from `base`, and
/// norm_num_groups too when it divides every level's channels (else the largest count that does).
inline modules::vae::autoencoder_kl_config infer_vae_config(const safetensors_file& file, modules::vae::autoencoder_kl_config base = {},
                                                            const std::string& prefix = "first_stage_model.") {
    const auto dims = [&](const std::string& k) { return detail::stored_shape(file, prefix + k); };
    const auto conv_in = dims("encoder.conv_in.weight");
    const auto conv_out = dims("decoder.conv_out.weight");
    const auto dec_in = dims("decoder.conv_in.weight");
    if (!conv_in || conv_in->rank() != 4 || !conv_out || conv_out->rank() != 4 || !dec_in || dec_in->rank() != 4)
        throw io_error(checkpoint_component, file.source() + ": cannot infer the VAE config: encoder.conv_in, decoder.conv_in or "
                                                              "decoder.conv_out is missing or not a convolution");
    auto c = base;
    c.in_channels = (*conv_in)[1];
    c.out_channels = (*conv_out)[0];
    c.latent_channels = (*dec_in)[1];
    c.block_out_channels.clear();
    for (std::size_t i = 0;; ++i) {
        const auto w = dims("encoder.down." + std::to_string(i) + ".block.0.conv1.weight");
        if (!w) break;
        c.block_out_channels.push_back((*w)[0]);
    }
    index_t layers = 0;
    while (dims("encoder.down.0.block." + std::to_string(layers) + ".conv1.weight")) ++layers;
    c.layers_per_block = std::max<index_t>(layers, 1);
    c.use_quant_conv = dims("quant_conv.weight").has_value();
    c.use_post_quant_conv = dims("post_quant_conv.weight").has_value();
    c.mid_block_add_attention = dims("encoder.mid.attn_1.q.weight").has_value();
    c.norm_num_groups = detail::dividing_groups(c.norm_num_groups, c.block_out_channels);
    c.validate();
    return c;
}

/// Text encoder sizes read off an original checkpoint (keys below
/// "cond_stage_model.transformer."): vocabulary, width, MLP width, positions,
/// layer count. For a width other than `base`'s, heads are width / 64 (CLIP's
/// head size) when that divides, else `base`'s when they divide the width,
/// else 1; activation, eps and eos id come from `base`.
inline modules::clip::text_config infer_text_config(const safetensors_file& file, modules::clip::text_config base = sd15_text_config(),
                                                    const std::string& prefix = "cond_stage_model.transformer.") {
    std::string root = prefix + "text_model.";
    if (!file.contains(root + "embeddings.token_embedding.weight")) root = prefix;
    const auto dims = [&](const std::string& k) { return detail::stored_shape(file, root + k); };
    const auto tok = dims("embeddings.token_embedding.weight");
    const auto pos = dims("embeddings.position_embedding.weight");
    const auto fc1 = dims("encoder.layers.0.mlp.fc1.weight");
    if (!tok || tok->rank() != 2 || !pos || pos->rank() != 2 || !fc1 || fc1->rank() != 2)
        throw io_error(checkpoint_component, file.source() + ": cannot infer the text encoder config: embeddings or encoder.layers.0 "
                                                              "missing under '" + prefix + "'");
    auto c = base;
    const index_t width = base.hidden_size;
    c.vocab_size = (*tok)[0];
    c.hidden_size = (*tok)[1];
    c.max_position_embeddings = (*pos)[0];
    c.intermediate_size = (*fc1)[0];
    index_t layers = 0;
    while (dims("encoder.layers." + std::to_string(layers) + ".mlp.fc1.weight")) ++layers;
    c.num_hidden_layers = layers;
    if (c.hidden_size != width) {
        if (c.hidden_size % 64 == 0) c.num_attention_heads = c.hidden_size / 64;
        else if (c.hidden_size % c.num_attention_heads != 0) c.num_attention_heads = 1;  // a guess; pass a config
    }
    c.validate();
    return c;
}

/// A Stable Diffusion 1.x checkpoint: where each component is, its parsed
/// config, and (weights opened, memory-mapped) a weight_source per model
/// component in diffusers' key space. Cheap to copy.
class sd_checkpoint {
public:
    modules::unet::unet_config unet;
    modules::vae::autoencoder_kl_config vae;
    modules::clip::text_config text_encoder;
    /// scheduler_config.json as read (or SD1.5's DDIM settings for a single file).
    nlohmann::json scheduler_config;
    /// vocab.json + merges.txt folder; absent for a single file without
    /// config_folder (SD1.x uses CLIP's vocabulary: clip_tokenizer::load_default()).
    std::optional<std::filesystem::path> tokenizer_folder;
    /// model_index.json (diffusers folders only).
    nlohmann::json model_index;

    /// A folder opens as diffusers, a file as an original single-file checkpoint.
    static sd_checkpoint open(const std::filesystem::path& path, const sd_checkpoint_options& options = {}) {
        if (std::filesystem::is_directory(path)) return open_diffusers(path, options);
        return open_single_file(path, options);
    }

    /// Opens a diffusers folder. io_error naming the path of the first missing
    /// or unreadable file; value_error (from the config readers) for unsupported settings.
    static sd_checkpoint open_diffusers(const std::filesystem::path& folder, const sd_checkpoint_options& options = {}) {
        namespace fs = std::filesystem;
        if (!fs::is_directory(folder)) throw io_error(checkpoint_component, "'" + folder.string() + "' is not a folder");
        sd_checkpoint c;
        c.format_ = checkpoint_format::diffusers;
        c.root_ = folder;
        c.model_index = detail::read_checkpoint_json(folder / "model_index.json", "model_index.json");
        for (const char* name : {"unet", "vae", "text_encoder", "tokenizer", "scheduler"})
            if (!fs::is_directory(folder / name))
                throw io_error(checkpoint_component, "missing component '" + std::string(name) + "': no folder '" + (folder / name).string() + "'");

        const auto model = [&](const char* name, const char* base, component_slot& slot) {
            slot.files.folder = folder / name;
            slot.files.config_file = folder / name / "config.json";
            const auto config = detail::read_checkpoint_json(slot.files.config_file, std::string(name) + " config");
            slot.files.weight_files = detail::resolve_weights(slot.files.folder, base, options.variant);
            slot.source = detail::open_checked(slot.files.weight_files);
            detail::check_shard_index(slot.files.folder, base, options.variant, slot.source);
            return config;
        };
        const auto unet_json = model("unet", "diffusion_pytorch_model", c.unet_);
        c.unet = options.unet ? *options.unet : modules::unet::unet_config::from_json(unet_json);
        const auto vae_json = model("vae", "diffusion_pytorch_model", c.vae_);
        c.vae = options.vae ? *options.vae : modules::vae::autoencoder_kl_config::from_json(vae_json);
        c.vae_.source = detail::with_legacy_vae_attention(c.vae_.source);
        const auto text_json = model("text_encoder", "model", c.text_);
        c.text_encoder = options.text_encoder ? *options.text_encoder : modules::clip::text_config::from_json(text_json);

        const auto tokenizer = folder / "tokenizer";
        for (const char* f : {"vocab.json", "merges.txt"})
            if (!fs::is_regular_file(tokenizer / f))
                throw io_error(checkpoint_component, "missing tokenizer file '" + (tokenizer / f).string() + "'");
        c.tokenizer_folder = tokenizer;
        const auto scheduler_file = folder / "scheduler" / "scheduler_config.json";
        c.scheduler_file_ = scheduler_file;
        c.scheduler_config = options.scheduler_config ? *options.scheduler_config
                                                      : detail::read_checkpoint_json(scheduler_file, "scheduler config");
        return c;
    }

    /// Opens an original SD1.x single-file checkpoint (.safetensors).
    static sd_checkpoint open_single_file(const std::filesystem::path& file, const sd_checkpoint_options& options = {}) {
        namespace fs = std::filesystem;
        if (detail::is_pickle_path(file)) detail::refuse_pickle(file);
        if (!fs::exists(file)) throw io_error(checkpoint_component, "missing checkpoint file '" + file.string() + "'");
        auto mapped = std::make_shared<const safetensors_file>(safetensors_file::open(file));
        const auto has = [&](const char* k) { return mapped->contains(k); };
        if (!has("model.diffusion_model.input_blocks.0.0.weight")) {
            std::string why = "it has no 'model.diffusion_model.input_blocks.0.0.weight'";
            if (has("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight") ||
                has("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"))
                why = "it looks like an SDXL checkpoint";
            else if (has("conv_in.weight") || has("down_blocks.0.resnets.0.conv1.weight"))
                why = "it holds diffusers-named UNet weights (open its diffusers folder instead)";
            throw io_error(checkpoint_component, "'" + file.string() + "' is not an original Stable Diffusion 1.x checkpoint: " + why);
        }
        if (has("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"))
            throw io_error(checkpoint_component, "'" + file.string() + "' is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); "
                                                                         "only SD1.x is supported");
        sd_checkpoint c;
        c.format_ = checkpoint_format::single_file;
        c.root_ = file;

        // Configs: the caller's, a diffusers folder's, inferred, or SD1.5's.
        std::optional<nlohmann::json> folder_scheduler;
        if (options.config_folder) {
            const auto& cf = *options.config_folder;
            c.unet = modules::unet::unet_config::from_json(detail::read_checkpoint_json(cf / "unet" / "config.json", "unet config"));
            c.vae = modules::vae::autoencoder_kl_config::from_json(detail::read_checkpoint_json(cf / "vae" / "config.json", "vae config"));
            c.text_encoder =
                modules::clip::text_config::from_json(detail::read_checkpoint_json(cf / "text_encoder" / "config.json", "text_encoder config"));
            folder_scheduler = detail::read_checkpoint_json(cf / "scheduler" / "scheduler_config.json", "scheduler config");
            if (fs::is_regular_file(cf / "tokenizer" / "vocab.json") && fs::is_regular_file(cf / "tokenizer" / "merges.txt"))
                c.tokenizer_folder = cf / "tokenizer";
            c.unet_.files.config_file = cf / "unet" / "config.json";
            c.vae_.files.config_file = cf / "vae" / "config.json";
            c.text_.files.config_file = cf / "text_encoder" / "config.json";
        } else if (options.infer_configs) {
            c.unet = infer_unet_config(*mapped);
            c.vae = infer_vae_config(*mapped);
            c.text_encoder = infer_text_config(*mapped);
        } else {
            c.unet = {};
            c.vae = {};
            c.text_encoder = sd15_text_config();
        }
        if (options.unet) c.unet = *options.unet;
        if (options.vae) c.vae = *options.vae;
        if (options.text_encoder) c.text_encoder = *options.text_encoder;
        if (options.scheduler_config) c.scheduler_config = *options.scheduler_config;
        else if (folder_scheduler) c.scheduler_config = *folder_scheduler;
        else c.scheduler_config = sd15_scheduler_config();
        if (folder_scheduler && !options.scheduler_config) c.scheduler_file_ = *options.config_folder / "scheduler" / "scheduler_config.json";

        const std::vector<std::shared_ptr<const safetensors_file>> files{mapped};
        for (auto* slot : {&c.unet_, &c.vae_, &c.text_}) slot->files.weight_files = {file};

        detail::ldm_unet_layout layout;
        for (const auto l : c.unet.layers_per_block) layout.layers_per_block.push_back(static_cast<std::size_t>(l));
        for (const auto& t : c.unet.up_block_types) layout.up_has_attention.push_back(t == "CrossAttnUpBlock2D");
        c.unet_.source = modules::weight_source(files, [layout](std::string_view key) {
            auto k = detail::ldm_unet_key(key, layout);
            return k.front() == '\0' ? k : "model.diffusion_model." + k;
        });

        const std::size_t levels = c.vae.block_out_channels.size();
        const auto vae_ldm = modules::weight_source(files, [levels](std::string_view key) {
            auto k = detail::ldm_vae_key(key, levels);
            return k.front() == '\0' ? k : "first_stage_model." + k;
        });
        std::vector<reshape_rule> rules;
        for (const char* side : {"encoder", "decoder"})
            for (const char* proj : {"to_q", "to_k", "to_v", "to_out.0"}) {
                const std::string key = std::string(side) + ".mid_block.attentions.0." + proj + ".weight";
                std::string stored;
                if (const auto* f = vae_ldm.find(key, &stored); f && f->info(stored).dims.rank() == 4) {
                    const auto& d = f->info(stored).dims;
                    if (d[2] == 1 && d[3] == 1) rules.push_back({key, shape{d[0], d[1]}});
                }
            }
        c.vae_.source = with_reshaped(vae_ldm, rules);

        // SD1.x stores CLIPTextModel's state dict below "cond_stage_model.transformer.",
        // with or without the "text_model." level; serve either form of the key.
        const auto text_file = mapped;
        c.text_.source = modules::weight_source(files, [text_file](std::string_view key) {
            std::string_view rest = key;
            if (rest.starts_with("text_model.")) rest.remove_prefix(11);
            std::string with_level = "cond_stage_model.transformer.text_model." + std::string(rest);
            if (text_file->contains(with_level)) return with_level;
            return "cond_stage_model.transformer." + std::string(rest);
        });
        return c;
    }

    checkpoint_format format() const noexcept { return format_; }
    /// The folder or file opened.
    const std::filesystem::path& root() const noexcept { return root_; }

    /// Weights in diffusers' key space (memory-mapped), one source per model component.
    const modules::weight_source& unet_weights() const noexcept { return unet_.source; }
    const modules::weight_source& vae_weights() const noexcept { return vae_.source; }
    const modules::weight_source& text_encoder_weights() const noexcept { return text_.source; }

    /// Paths behind each model component.
    const checkpoint_component_files& unet_files() const noexcept { return unet_.files; }
    const checkpoint_component_files& vae_files() const noexcept { return vae_.files; }
    const checkpoint_component_files& text_encoder_files() const noexcept { return text_.files; }
    /// scheduler_config.json read, if any.
    const std::optional<std::filesystem::path>& scheduler_file() const noexcept { return scheduler_file_; }

private:
    struct component_slot {
        checkpoint_component_files files;
        modules::weight_source source;
    };

    checkpoint_format format_ = checkpoint_format::diffusers;
    std::filesystem::path root_;
    component_slot unet_, vae_, text_;
    std::optional<std::filesystem::path> scheduler_file_;
};

}  // namespace dynamicid::io
