// dynamicid conformance: handlers for the official DynamicID modules.
#pragma once

#include <dynamicid/conform/detail/golden_case.hpp>
#include <dynamicid/modules/identity/proj_plus.hpp>

namespace dynamicid::conform::detail {

/// ProjPlusModel: param.proj.*, param.norm.*, param.perceiver_resampler.*;
/// input.id_embeds, input.clip_embeds -> output.tokens.
template <class B, class T>
output_map<B> proj_plus_case(context_t<B>& ctx, const golden_case& g) {
    modules::identity::proj_plus_config cfg;
    cfg.cross_attention_dim = g.setting<index_t>("cross_attention_dim", cfg.cross_attention_dim);
    cfg.id_embeddings_dim = g.setting<index_t>("id_embeddings_dim", cfg.id_embeddings_dim);
    cfg.clip_embeddings_dim = g.setting<index_t>("clip_embeddings_dim", cfg.clip_embeddings_dim);
    cfg.num_tokens = g.setting<index_t>("num_tokens", cfg.num_tokens);
    cfg.depth = g.setting<index_t>("depth", cfg.depth);
    cfg.dim_head = g.setting<index_t>("dim_head", cfg.dim_head);
    cfg.heads = g.setting<index_t>("heads", cfg.heads);
    cfg.ff_mult = g.setting<index_t>("ff_mult", cfg.ff_mult);
    const auto model = modules::identity::proj_plus_model<B, T>::load(ctx, g.file(), cfg, "param.");
    const auto id = g.template load<B, T>(ctx, "input.id_embeds");
    const auto clip = g.template load<B, T>(ctx, "input.clip_embeds");
    output_map<B> out;
    out.insert_or_assign("tokens", any_tensor<B>(model.forward(ctx, id, clip, g.setting<bool>("shortcut", false),
                                                               g.setting<double>("scale", 1.0))));
    return out;
}

}  // namespace dynamicid::conform::detail
