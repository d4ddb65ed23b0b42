// dynamicid modules: transformers' CLIPTextModel, Stable Diffusion's text encoder.
//
// On token ids (B, L) from the host:
//
//   x    = token_embedding[ids] + position_embedding[0..L)     (B, L, hidden)
//   x    = encoder(x) with a causal mask                       (CLIPEncoder)
//   last = final_layer_norm(x)                                  last_hidden_state
//   pool = last[b, p_b]                                         pooler_output
//
// The pooled position p_b follows transformers 5.24 exactly:
//   - eos_token_id == 2 (configs written before transformers PR #24773, SD1.x's
//     among them): p_b = argmax of the row's ids, the first one on ties (the
//     tokenizer's EOS 49407 is the largest id of the vocabulary);
//   - otherwise: p_b = the first position whose id equals eos_token_id, and 0
//     when the row has none (argmax of an all-false row).
//
// hidden_states[-2] (the state entering the last encoder layer, before the
// final norm) is available as `penultimate_hidden_state` for "clip skip".
//
// Weights bind by transformers' keys: "embeddings.token_embedding.weight",
// "embeddings.position_embedding.weight", "encoder.layers.<i>.*",
// "final_layer_norm.*", either bare (as transformers 5 saves CLIPTextModel)
// or below "text_model." (SD1.x checkpoints); `load` accepts both.
//
//     auto cfg = dynamicid::modules::clip::text_config::from_json(nlohmann::json::parse(config_text));
//     auto source = dynamicid::modules::weight_source::open({"text_encoder/model.safetensors"});
//     auto model = dynamicid::modules::clip::text_model<B>::load(ctx, source, cfg);
//     std::vector<std::int64_t> ids = tokenizer.encode_batch(prompts, 77);
//     auto out = model.forward(ctx, ids, /*batch=*/prompts.size());   // out.last_hidden_state (B, 77, 768)
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/clip/encoder.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dynamicid::modules::clip {

namespace detail {
/// j[key] as V when present and not null, else `fallback`; value_error on a wrong type.
template <class V>
V json_or(const nlohmann::json& j, const char* key, V fallback) {
    if (!j.contains(key) || j[key].is_null()) return fallback;
    try {
        return j[key].get<V>();
    } catch (const nlohmann::json::exception& e) {
        throw value_error("clip", std::string("config \"") + key + "\" has the wrong type: " + e.what());
    }
}

/// The sub-config `key` of a CLIPConfig, or `j` itself when it is already a tower's config.
inline const nlohmann::json& tower_json(const nlohmann::json& j, const char* key) {
    check<value_error>(j.is_object(), "clip", "config is not a JSON object");
    if (j.contains(key) && j[key].is_object()) return j[key];
    return j;
}

inline encoder_config encoder_from_json(const nlohmann::json& j, const encoder_config& defaults) {
    encoder_config c = defaults;
    c.hidden_size = json_or<index_t>(j, "hidden_size", c.hidden_size);
    c.intermediate_size = json_or<index_t>(j, "intermediate_size", c.intermediate_size);
    c.num_attention_heads = json_or<index_t>(j, "num_attention_heads", c.num_attention_heads);
    c.num_hidden_layers = json_or<index_t>(j, "num_hidden_layers", c.num_hidden_layers);
    c.layer_norm_eps = json_or<double>(j, "layer_norm_eps", c.layer_norm_eps);
    c.hidden_act = json_or<std::string>(j, "hidden_act", c.hidden_act);
    return c;
}
}  // namespace detail

/// CLIPTextConfig; defaults are transformers' (those of openai/clip-vit-base-patch32).
/// SD1.5's text encoder: hidden 768, intermediate 3072, 12 heads, 12 layers, eos_token_id 2.
struct text_config {
    index_t vocab_size = 49408;
    index_t hidden_size = 512;
    index_t intermediate_size = 2048;
    index_t num_attention_heads = 8;
    index_t num_hidden_layers = 12;
    index_t max_position_embeddings = 77;
    double layer_norm_eps = 1e-5;
    std::string hidden_act = "quick_gelu";
    index_t projection_dim = 512;  ///< used by CLIPTextModelWithProjection only
    std::int64_t eos_token_id = 49407;

    encoder_config encoder() const {
        return {.hidden_size = hidden_size, .intermediate_size = intermediate_size, .num_attention_heads = num_attention_heads,
                .num_hidden_layers = num_hidden_layers, .layer_norm_eps = layer_norm_eps, .hidden_act = hidden_act};
    }

    void validate() const {
        check<value_error>(vocab_size > 0 && max_position_embeddings > 0, "clip", "vocab_size and max_position_embeddings must be positive");
        encoder().validate();
    }

    /// Reads a transformers config.json: a CLIPTextConfig, or a CLIPConfig
    /// (its "text_config"). Absent keys keep transformers' defaults.
    static text_config from_json(const nlohmann::json& json) {
        const auto& j = detail::tower_json(json, "text_config");
        text_config c;
        const auto e = detail::encoder_from_json(j, c.encoder());
        c.hidden_size = e.hidden_size;
        c.intermediate_size = e.intermediate_size;
        c.num_attention_heads = e.num_attention_heads;
        c.num_hidden_layers = e.num_hidden_layers;
        c.layer_norm_eps = e.layer_norm_eps;
        c.hidden_act = e.hidden_act;
        c.vocab_size = detail::json_or<index_t>(j, "vocab_size", c.vocab_size);
        c.max_position_embeddings = detail::json_or<index_t>(j, "max_position_embeddings", c.max_position_embeddings);
        c.projection_dim = detail::json_or<index_t>(j, "projection_dim", c.projection_dim);
        c.eos_token_id = detail::json_or<std::int64_t>(j, "eos_token_id", c.eos_token_id);
        c.validate();
        return c;
    }
};

/// The row position whose state CLIPTextModel pools (see the file comment):
/// argmax of the ids when eos_token_id == 2, else the first id equal to
/// eos_token_id (0 when none is).
inline index_t pooled_position(std::span<const std::int64_t> row, std::int64_t eos_token_id) {
    index_t best = 0;
    if (eos_token_id == 2) {
        // transformers casts the ids to int32 before its argmax.
        for (std::size_t i = 1; i < row.size(); ++i)
            if (static_cast<std::int32_t>(row[i]) > static_cast<std::int32_t>(row[static_cast<std::size_t>(best)])) best = static_cast<index_t>(i);
        return best;
    }
    for (std::size_t i = 0; i < row.size(); ++i)
        if (row[i] == eos_token_id) return static_cast<index_t>(i);
    return 0;
}

/// CLIPTextModel (the text tower without projection).
template <class B, class T = float>
    requires computes_in<B, T>
class text_model {
public:
    using config = text_config;
    using tensor_type = tensor<B, T>;

    struct params {
        tensor_type token_embedding;     ///< embeddings.token_embedding.weight (vocab, hidden)
        tensor_type position_embedding;  ///< embeddings.position_embedding.weight (max_positions, hidden)
        clip::encoder<B, T> encoder;
        layer_norm_layer<B, T> final_layer_norm;
    };

    struct output {
        tensor_type last_hidden_state;         ///< (B, L, hidden), after final_layer_norm
        tensor_type pooler_output;             ///< (B, hidden)
        tensor_type penultimate_hidden_state;  ///< (B, L, hidden) hidden_states[-2]; only when asked for
    };

    text_model() = default;

    /// Binds the keys below `b` (the text model's root: "embeddings", "encoder", "final_layer_norm").
    static text_model bind(weight_binder<B, T> b, const config& c) {
        c.validate();
        text_model m;
        m.config_ = c;
        auto& p = m.params_;
        auto emb = b.scope("embeddings");
        p.token_embedding = emb.tensor("token_embedding.weight", {c.vocab_size, c.hidden_size});
        p.position_embedding = emb.tensor("position_embedding.weight", {c.max_position_embeddings, c.hidden_size});
        p.encoder = clip::encoder<B, T>::bind(b.scope("encoder"), c.encoder());
        p.final_layer_norm = layer_norm_layer<B, T>::bind(b, "final_layer_norm", c.hidden_size, c.layer_norm_eps);
        return m;
    }

    /// Binds from `source` below `prefix` (e.g. "param." for golden files),
    /// taking the keys below "text_model." when the checkpoint has them; throws
    /// one io_error listing every missing or misshapen weight.
    static text_model load(context_t<B>& ctx, const weight_source& source, const config& c, std::string_view prefix = "") {
        weight_binder<B, T> root(ctx, source, std::string(prefix));
        auto b = root.contains("text_model.embeddings.token_embedding.weight") ? root.scope("text_model") : root;
        auto m = bind(b, c);
        root.finish();
        return m;
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }

    /// input_ids: `batch` rows of equal length L <= max_position_embeddings,
    /// row-major, from the host. With `penultimate`, also returns hidden_states[-2].
    output forward(context_t<B>& ctx, std::span<const std::int64_t> input_ids, index_t batch, bool penultimate = false) const {
        const auto x = embed(ctx, input_ids, batch);
        const index_t len = x.dim(1), d = config_.hidden_size;
        output out;
        auto h = params_.encoder.forward(ctx, x, /*causal=*/true, penultimate ? &out.penultimate_hidden_state : nullptr);
        out.last_hidden_state = params_.final_layer_norm(ctx, h);
        // Gather each row's pooled state with device-side copies.
        out.pooler_output = tensor_type::empty(ctx, {batch, d});
        for (index_t b = 0; b < batch; ++b) {
            const auto row = input_ids.subspan(static_cast<std::size_t>(b * len), static_cast<std::size_t>(len));
            const index_t p = pooled_position(row, config_.eos_token_id);
            B::copy(ctx, const_pointer_t<B, T>(out.last_hidden_state.data() + static_cast<std::ptrdiff_t>((b * len + p) * d)),
                    out.pooler_output.data() + static_cast<std::ptrdiff_t>(b * d), static_cast<std::size_t>(d));
        }
        return out;
    }

    /// hidden_states[-2] only, skipping the last encoder layer (diffusers'
    /// clip_skip = 1 then applies final_layer_norm to it: see final_layer_norm()).
    tensor_type penultimate_hidden_state(context_t<B>& ctx, std::span<const std::int64_t> input_ids, index_t batch) const {
        return params_.encoder.forward(ctx, embed(ctx, input_ids, batch), true, nullptr, /*stop_before_last=*/true);
    }

    /// The model's final LayerNorm, for states taken before it.
    tensor_type final_layer_norm(context_t<B>& ctx, const tensor_type& x) const { return params_.final_layer_norm(ctx, x); }

    /// token_embedding[ids] + position_embedding[0..L): (B, L, hidden). The
    /// lookup copies rows on the device; only the ids come from the host.
    tensor_type embed(context_t<B>& ctx, std::span<const std::int64_t> input_ids, index_t batch) const {
        check<shape_error>(batch > 0 && !input_ids.empty() && static_cast<index_t>(input_ids.size()) % batch == 0, "clip",
                           input_ids.size(), " input ids do not split into ", batch, " rows");
        const index_t len = static_cast<index_t>(input_ids.size()) / batch, d = config_.hidden_size;
        check<shape_error>(len <= config_.max_position_embeddings, "clip", "sequence length ", len,
                           " exceeds max_position_embeddings ", config_.max_position_embeddings);
        auto tokens = tensor_type::empty(ctx, {batch, len, d});
        for (std::size_t i = 0; i < input_ids.size(); ++i) {
            const std::int64_t id = input_ids[i];
            check<value_error>(id >= 0 && id < config_.vocab_size, "clip", "token id ", id, " at position ", i,
                               " is outside the vocabulary of ", config_.vocab_size);
            B::copy(ctx, const_pointer_t<B, T>(params_.token_embedding.data() + static_cast<std::ptrdiff_t>(id * d)),
                    tokens.data() + static_cast<std::ptrdiff_t>(static_cast<index_t>(i) * d), static_cast<std::size_t>(d));
        }
        return ops::add(ctx, tokens, params_.position_embedding.narrow_leading(0, len));
    }

private:
    config config_;
    params params_;
};

}  // namespace dynamicid::modules::clip
