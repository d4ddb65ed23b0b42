// dynamicid conformance: handlers for the official DynamicID attention
// processors and IMR modules (SAProcessor, SAAProcessor, IMR, KeyPointEncoder).
//
// Sizes come from the case's config where the weights cannot tell them
// (heads, dim_head, tokens_per_id, ...) and from the parameter shapes
// otherwise (hidden and context widths, LoRA rank, channel counts, depths).
#pragma once

#include <dynamicid/conform/detail/golden_case.hpp>
#include <dynamicid/modules/dynamicid/imr.hpp>
#include <dynamicid/modules/dynamicid/keypoint_encoder.hpp>
#include <dynamicid/modules/dynamicid/saa.hpp>
#include <dynamicid/modules/weights.hpp>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace dynamicid::conform::detail {

/// The case's file as a weight source (the case outlives the binding).
inline modules::weight_source case_weights(const golden_case& g) {
    return modules::weight_source({std::shared_ptr<const io::safetensors_file>(std::shared_ptr<void>{}, &g.file())});
}

template <class V>
std::optional<V> optional_setting(const golden_case& g, const std::string& key) {
    if (!g.has_setting(key)) return std::nullopt;
    return g.setting<V>(key);
}

/// SAProcessor: param.attn.* (base attention), param.proc.*_lora.* ; input.hidden_states
/// [+ input.encoder_hidden_states] -> output.hidden_states.
template <class B, class T>
output_map<B> sa_processor_case(context_t<B>& ctx, const golden_case& g) {
    modules::saa::lora_attention_config cfg;
    cfg.heads = g.setting<index_t>("heads", cfg.heads);
    cfg.lora_scale = g.setting<double>("lora_scale", cfg.lora_scale);
    cfg.network_alpha = optional_setting<double>(g, "network_alpha");
    const auto proc = modules::saa::sa_processor<B, T>::load(ctx, case_weights(g), cfg, "param.attn.", "param.proc.");
    const auto hidden = g.template load<B, T>(ctx, "input.hidden_states");
    std::optional<tensor<B, T>> encoder;
    if (g.has("input.encoder_hidden_states")) encoder = g.template load<B, T>(ctx, "input.encoder_hidden_states");
    output_map<B> out;
    out.insert_or_assign("hidden_states", any_tensor<B>(proc.forward(ctx, hidden, encoder ? &*encoder : nullptr)));
    return out;
}

/// The per-call controls a SAAProcessor case carries in its config.
inline modules::saa::saa_controls saa_controls_of(const golden_case& g) {
    modules::saa::saa_controls c;
    c.id_num = g.setting<index_t>("id_num", c.id_num);
    if (g.has_setting("bbox")) {
        const auto boxes = g.setting<std::vector<std::vector<double>>>("bbox");
        for (const auto& b : boxes) {
            check<value_error>(b.size() == 4, "conform", g.file_name(), ": each bbox needs 4 numbers [y_min, x_min, y_max, x_max]");
            c.boxes.push_back({b[0], b[1], b[2], b[3]});
        }
    }
    c.activate_query = g.setting<bool>("activate_query", c.activate_query);
    c.infer_scale = g.setting<double>("infer_scale", c.infer_scale);
    c.infer_end = g.setting<index_t>("infer_end", c.infer_end);
    c.step = g.setting<index_t>("count", c.step);
    c.mix_scale = optional_setting<double>(g, "mix_scale");
    c.id_scale = g.setting<double>("id_scale", c.id_scale);
    c.root_width = optional_setting<index_t>(g, "root_width");
    c.root_height = optional_setting<index_t>(g, "root_height");
    c.text_tokens = optional_setting<index_t>(g, "text_tokens");
    c.threshold = g.setting<double>("threshold", c.threshold);
    return c;
}

/// SAAProcessor: as SAProcessor plus param.proc.to_{k,v}_ip.weight;
/// input.hidden_states, input.encoder_hidden_states -> output.hidden_states.
template <class B, class T>
output_map<B> saa_processor_case(context_t<B>& ctx, const golden_case& g) {
    modules::saa::saa_config cfg;
    cfg.heads = g.setting<index_t>("heads", cfg.heads);
    cfg.tokens_per_id = g.setting<index_t>("tokens_per_id", cfg.tokens_per_id);
    cfg.lora_scale = g.setting<double>("lora_scale", cfg.lora_scale);
    cfg.network_alpha = optional_setting<double>(g, "network_alpha");
    const auto proc = modules::saa::saa_processor<B, T>::load(ctx, case_weights(g), cfg, "param.attn.", "param.proc.");
    const auto hidden = g.template load<B, T>(ctx, "input.hidden_states");
    const auto encoder = g.template load<B, T>(ctx, "input.encoder_hidden_states");
    output_map<B> out;
    out.insert_or_assign("hidden_states", any_tensor<B>(proc.forward(ctx, hidden, encoder, saa_controls_of(g))));
    return out;
}

/// IMR: param.{feature_fusion,norm_in,proj_in,disentangleNet,entangleNet,norm_out,proj_out}.*;
/// input.x, src_landmark, tgt_landmark, src_text, tgt_text -> output.tokens.
template <class B, class T>
output_map<B> imr_case(context_t<B>& ctx, const golden_case& g) {
    modules::imr::imr_config cfg;
    cfg.dim = g.setting<index_t>("dim", cfg.dim);
    cfg.dim_head = g.setting<index_t>("dim_head", cfg.dim_head);
    cfg.heads = g.setting<index_t>("heads", cfg.heads);
    cfg.num_queries = g.setting<index_t>("num_queries", cfg.num_queries);
    cfg.embedding_dim = g.setting<index_t>("embedding_dim", cfg.embedding_dim);
    cfg.txt_dim = g.setting<index_t>("txt_dim", cfg.txt_dim);
    cfg.ff_mult = g.setting<index_t>("ff_mult", cfg.ff_mult);
    cfg.disentangle_depth = optional_setting<index_t>(g, "disentangle_depth");
    cfg.entangle_depth = optional_setting<index_t>(g, "entangle_depth");
    const auto model = modules::imr::imr_model<B, T>::load(ctx, case_weights(g), cfg, "param.");
    const auto load = [&](const char* name) { return g.template load<B, T>(ctx, std::string("input.") + name); };
    output_map<B> out;
    out.insert_or_assign("tokens", any_tensor<B>(model.forward(ctx, load("x"), load("src_landmark"), load("tgt_landmark"),
                                                               load("src_text"), load("tgt_text"))));
    return out;
}

/// KeyPointEncoder: param.blocks.* (conv + BatchNorm with running stats);
/// input.landmark_image -> output.features.
template <class B, class T>
output_map<B> keypoint_encoder_case(context_t<B>& ctx, const golden_case& g) {
    modules::imr::keypoint_encoder_config cfg;
    cfg.batch_norm_eps = g.setting<double>("batch_norm_eps", cfg.batch_norm_eps);
    const auto model = modules::imr::keypoint_encoder<B, T>::load(ctx, case_weights(g), cfg, "param.");
    output_map<B> out;
    out.insert_or_assign("features", any_tensor<B>(model.forward(ctx, g.template load<B, T>(ctx, "input.landmark_image"))));
    return out;
}

/// Registers the four handlers on `r` (a conform::registry<B>). Official
/// modules are float32 models: computed in float whatever the file holds.
template <class B, class Registry>
void add_dynamicid_module_handlers(Registry& r) {
    using ctx_t = context_t<B>;
    r.add("SAProcessor", [](ctx_t& ctx, const golden_case& g) { return sa_processor_case<B, float>(ctx, g); });
    r.add("SAAProcessor", [](ctx_t& ctx, const golden_case& g) { return saa_processor_case<B, float>(ctx, g); });
    r.add("IMR", [](ctx_t& ctx, const golden_case& g) { return imr_case<B, float>(ctx, g); });
    r.add("KeyPointEncoder", [](ctx_t& ctx, const golden_case& g) { return keypoint_encoder_case<B, float>(ctx, g); });
}

}  // namespace dynamicid::conform::detail
