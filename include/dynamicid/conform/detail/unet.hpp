// dynamicid conformance: handlers for the diffusers UNet cases
// (tools/golden/make_unet_goldens.py documents their config keys).
//
//   UNet2DConditionModel  config = unet.config; input.sample, input.timestep,
//                         input.encoder_hidden_states -> output.sample
//   ResnetBlock2D         input.x, input.temb -> output.y
//   Transformer2DModel    input.hidden_states, input.encoder_hidden_states -> output.sample
#pragma once

#include <dynamicid/conform/detail/golden_case.hpp>
#include <dynamicid/modules/blocks/resnet_block.hpp>
#include <dynamicid/modules/unet/transformer_2d.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/weights.hpp>

#include <memory>
#include <vector>

namespace dynamicid::conform::detail {

/// A binder over the case's `param.*` tensors (the case outlives the binder).
template <class B, class T>
modules::weight_binder<B, T> param_binder(context_t<B>& ctx, const golden_case& g) {
    // Non-owning: the golden case keeps its file alive for the handler's duration.
    std::shared_ptr<const io::safetensors_file> file(std::shared_ptr<const io::safetensors_file>{}, &g.file());
    return modules::weight_binder<B, T>(ctx, modules::weight_source({file}), "param.");
}

template <class B, class T>
output_map<B> unet_2d_condition_case(context_t<B>& ctx, const golden_case& g) {
    const auto cfg = modules::unet::unet_config::from_json(g.config());
    auto bind = param_binder<B, T>(ctx, g);
    const auto unet = modules::unet::unet_2d_condition<B, T>::bind(bind, cfg);
    bind.finish();
    const auto sample = g.template load<B, T>(ctx, "input.sample");
    const auto text = g.template load<B, T>(ctx, "input.encoder_hidden_states");
    const auto steps = g.values("input.timestep");
    const std::vector<float> timesteps(steps.begin(), steps.end());
    output_map<B> out;
    out.insert_or_assign("sample", any_tensor<B>(unet.forward(ctx, sample, std::span<const float>(timesteps), text)));
    return out;
}

template <class B, class T>
output_map<B> resnet_block_case(context_t<B>& ctx, const golden_case& g) {
    auto bind = param_binder<B, T>(ctx, g);
    const auto block = modules::blocks::resnet_block<B, T>::bind(
        bind, {.in_channels = g.setting<index_t>("in_channels"), .out_channels = g.setting<index_t>("out_channels", 0),
               .temb_channels = g.setting<index_t>("temb_channels", 0), .groups = g.setting<index_t>("groups", 32),
               .eps = g.setting<double>("eps", 1e-6), .output_scale_factor = g.setting<double>("output_scale_factor", 1.0)});
    bind.finish();
    const auto x = g.template load<B, T>(ctx, "input.x");
    const auto temb = g.has("input.temb") ? g.template load<B, T>(ctx, "input.temb") : tensor<B, T>{};
    output_map<B> out;
    out.insert_or_assign("y", any_tensor<B>(block.forward(ctx, x, temb.defined() ? &temb : nullptr)));
    return out;
}

template <class B, class T>
output_map<B> transformer_2d_case(context_t<B>& ctx, const golden_case& g) {
    auto bind = param_binder<B, T>(ctx, g);
    const auto model = modules::unet::transformer_2d<B, T>::bind(
        bind, {.num_attention_heads = g.setting<index_t>("num_attention_heads"), .attention_head_dim = g.setting<index_t>("attention_head_dim"),
               .in_channels = g.setting<index_t>("in_channels"), .num_layers = g.setting<index_t>("num_layers", 1),
               .cross_attention_dim = g.setting<index_t>("cross_attention_dim"), .norm_num_groups = g.setting<index_t>("norm_num_groups", 32),
               .use_linear_projection = g.setting<bool>("use_linear_projection", false)});
    bind.finish();
    const auto x = g.template load<B, T>(ctx, "input.hidden_states");
    const auto text = g.template load<B, T>(ctx, "input.encoder_hidden_states");
    output_map<B> out;
    out.insert_or_assign("sample", any_tensor<B>(model.forward(ctx, x, text)));
    return out;
}

}  // namespace dynamicid::conform::detail
