// dynamicid pipelines (detail): DynamicID's per-layer processor weights and
// the UNet attention hooks that run them.
//
// The checkpoint holds only what the processors add to the UNet (LoRA
// adapters, to_k_ip / to_v_ip). The base projections (to_q, to_k, to_v,
// to_out.0) are the UNet's own: each hook call builds its processor from the
// attention layer it replaces (call.attn.weights(), storage shared, nothing
// copied) plus the adapter, so the UNet's attention weights are held once.
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/dynamicid/saa.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/weights.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dynamicid::pipelines {

/// One gating computation seen by the activation callback.
struct dynamicid_activation_event {
    index_t layer = 0;                ///< processor index (diffusers attn_processors order)
    std::string_view name;            ///< e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    std::int64_t step = 0;            ///< denoising step (UNet evaluation) from 0
    const modules::saa::activation_record& record;
};

/// The per-call layout controls every SAA layer receives.
struct dynamicid_layer_controls {
    index_t id_num = 1;
    std::vector<modules::saa::box> boxes{};
    bool activate_query = true;
    double infer_scale = 4.0;
    index_t infer_end = 3;
    std::optional<double> mix_scale{};
    double id_scale = 1.0;
    double threshold = 0.3;
    std::optional<index_t> root_width{}, root_height{};  ///< set for non-square images
    std::function<void(const dynamicid_activation_event&)> on_activation{};
};

namespace detail {

/// What the checkpoint adds to one attention layer.
template <class B, class T>
struct dynamicid_adapter {
    bool cross = false;  ///< attn2 (SAA processor) rather than attn1 (SA processor)
    modules::saa::lora_layer<B, T> to_q_lora, to_k_lora, to_v_lora, to_out_lora;
    tensor<B, T> to_k_ip, to_v_ip;  ///< attn2 only
};

/// Settings of the processors fixed by the checkpoint.
struct dynamicid_adapter_config {
    index_t tokens_per_id = 4;
    double lora_scale = 1.0;
    std::optional<double> network_alpha{};
};

/// Hidden width of the attention layer `name` ("down_blocks.2....", "up_blocks.1....", "mid_block...."),
/// as the released set_ip_adapter() derives it.
inline index_t layer_hidden_width(std::string_view name, const modules::unet::unet_config& cfg) {
    const auto& ch = cfg.block_out_channels;
    const auto block_index = [&](std::string_view prefix) {
        index_t v = 0;
        for (std::size_t i = prefix.size(); i < name.size() && name[i] >= '0' && name[i] <= '9'; ++i) v = v * 10 + (name[i] - '0');
        return static_cast<std::size_t>(v);
    };
    if (name.rfind("mid_block", 0) == 0) return ch.back();
    if (name.rfind("up_blocks.", 0) == 0) return ch.at(ch.size() - 1 - block_index("up_blocks."));
    if (name.rfind("down_blocks.", 0) == 0) return ch.at(block_index("down_blocks."));
    throw value_error("dynamicid", "attention layer '" + std::string(name) + "' is in no known block");
}

/// Binds one adapter per UNet attention layer from `processors` (keys
/// "<index>.to_q_lora.down.weight", ...). io_error listing every missing or
/// misshapen tensor, and processors the UNet has no layer for.
template <class B, class T>
std::vector<dynamicid_adapter<B, T>> bind_adapters(context_t<B>& ctx, const modules::weight_source& processors,
                                                   const modules::unet::unet_config& cfg, const std::vector<std::string>& layer_names,
                                                   const std::vector<index_t>& stored_indices) {
    modules::weight_binder<B, T> root(ctx, processors);
    std::vector<dynamicid_adapter<B, T>> out(layer_names.size());
    for (std::size_t i = 0; i < layer_names.size(); ++i) {
        const auto& name = layer_names[i];
        auto& a = out[i];
        a.cross = name.size() >= 15 && name.compare(name.size() - 15, 15, "attn2.processor") == 0;
        const index_t hidden = layer_hidden_width(name, cfg);
        const index_t context = a.cross ? cfg.cross_attention_dim : hidden;
        auto s = root.scope(std::to_string(i));
        a.to_q_lora = modules::saa::lora_layer<B, T>::bind(s, "to_q_lora", hidden, hidden);
        a.to_k_lora = modules::saa::lora_layer<B, T>::bind(s, "to_k_lora", context, hidden);
        a.to_v_lora = modules::saa::lora_layer<B, T>::bind(s, "to_v_lora", context, hidden);
        a.to_out_lora = modules::saa::lora_layer<B, T>::bind(s, "to_out_lora", hidden, hidden);
        if (a.cross) {
            a.to_k_ip = s.tensor("to_k_ip.weight", {hidden, context});
            a.to_v_ip = s.tensor("to_v_ip.weight", {hidden, context});
        }
    }
    for (index_t idx : stored_indices)
        if (idx >= static_cast<index_t>(layer_names.size()))
            root.report("processor " + std::to_string(idx) + " has no attention layer (the UNet has " + std::to_string(layer_names.size()) +
                        ")");
    root.finish();
    return out;
}

/// attention_hooks running DynamicID's processors on every layer. `adapters`
/// must outlive the hooks; `controls` is copied into the hooks.
template <class B, class T>
modules::unet::attention_hooks<B, T> make_hooks(std::shared_ptr<const std::vector<dynamicid_adapter<B, T>>> adapters,
                                                const dynamicid_adapter_config& cfg, dynamicid_layer_controls controls) {
    modules::unet::attention_hooks<B, T> hooks;
    auto shared = std::make_shared<const dynamicid_layer_controls>(std::move(controls));
    for (std::size_t i = 0; i < adapters->size(); ++i) {
        hooks.processors.push_back([adapters, cfg, shared, i](context_t<B>& ctx, const modules::blocks::attention_call<B, T>& call) {
            const auto& a = (*adapters)[i];
            const auto& base = call.attn.weights();
            modules::saa::lora_attention_params<B, T> p{base.to_q, base.to_k, base.to_v, base.to_out,
                                                        a.to_q_lora, a.to_k_lora, a.to_v_lora, a.to_out_lora};
            const index_t heads = call.attn.settings().heads;
            if (!a.cross) {
                const modules::saa::sa_processor<B, T> proc({heads, cfg.lora_scale, cfg.network_alpha}, std::move(p));
                return proc.forward(ctx, call.hidden_states, call.context);
            }
            check<value_error>(call.context != nullptr, "dynamicid", "layer ", call.layer, " (", call.name,
                               ") is a cross-attention layer but received no encoder states");
            const modules::saa::saa_processor<B, T> proc({heads, cfg.tokens_per_id, cfg.lora_scale, cfg.network_alpha},
                                                         {std::move(p), a.to_k_ip, a.to_v_ip});
            const auto& c = *shared;
            modules::saa::saa_controls sc;
            sc.id_num = c.id_num;
            sc.boxes = c.boxes;
            sc.activate_query = c.activate_query;
            sc.infer_scale = c.infer_scale;
            sc.infer_end = c.infer_end;
            sc.step = static_cast<index_t>(call.step);
            sc.mix_scale = c.mix_scale;
            sc.id_scale = c.id_scale;
            sc.root_width = c.root_width;
            sc.root_height = c.root_height;
            sc.threshold = c.threshold;
            if (c.on_activation) {
                sc.on_activation = [&c, &call](const modules::saa::activation_record& r) {
                    c.on_activation(dynamicid_activation_event{call.layer, call.name, call.step, r});
                };
            }
            return proc.forward(ctx, call.hidden_states, *call.context, sc);
        });
    }
    return hooks;
}

}  // namespace detail
}  // namespace dynamicid::pipelines
