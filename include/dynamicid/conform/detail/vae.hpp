// dynamicid conformance: handlers for the diffusers AutoencoderKL cases
// (tools/golden/make_vae_goldens.py documents them). The config is the
// model's own config dict; a case stores only the half of the model it uses.
//
//   AutoencoderKL.encode   param.encoder.*, param.quant_conv.*; input.image
//                          -> output.mean, output.logvar (clamped)
//   AutoencoderKL.decode   param.post_quant_conv.*, param.decoder.*;
//                          input.latents (no scaling) -> output.decoded
#pragma once

#include <dynamicid/conform/detail/golden_case.hpp>
#include <dynamicid/conform/detail/unet.hpp>
#include <dynamicid/modules/vae/autoencoder_kl.hpp>

namespace dynamicid::conform::detail {

template <class B, class T>
output_map<B> vae_encode_case(context_t<B>& ctx, const golden_case& g) {
    auto bind = param_binder<B, T>(ctx, g);
    const auto vae = modules::vae::autoencoder_kl<B, T>::bind(bind, modules::vae::autoencoder_kl_config::from_json(g.config()),
                                                              modules::vae::vae_parts::encoder);
    bind.finish();
    const auto dist = vae.encode(ctx, g.template load<B, T>(ctx, "input.image"));
    output_map<B> out;
    out.insert_or_assign("mean", any_tensor<B>(dist.mean));
    out.insert_or_assign("logvar", any_tensor<B>(dist.logvar));
    return out;
}

template <class B, class T>
output_map<B> vae_decode_case(context_t<B>& ctx, const golden_case& g) {
    auto bind = param_binder<B, T>(ctx, g);
    const auto vae = modules::vae::autoencoder_kl<B, T>::bind(bind, modules::vae::autoencoder_kl_config::from_json(g.config()),
                                                              modules::vae::vae_parts::decoder);
    bind.finish();
    output_map<B> out;
    out.insert_or_assign("decoded", any_tensor<B>(vae.decode(ctx, g.template load<B, T>(ctx, "input.latents"))));
    return out;
}

/// Registers "AutoencoderKL.encode" and "AutoencoderKL.decode" (float32 models).
template <class B, class Registry>
void add_vae_handlers(Registry& r) {
    using ctx_t = context_t<B>;
    r.add("AutoencoderKL.encode", [](ctx_t& ctx, const golden_case& g) { return vae_encode_case<B, float>(ctx, g); });
    r.add("AutoencoderKL.decode", [](ctx_t& ctx, const golden_case& g) { return vae_decode_case<B, float>(ctx, g); });
}

}  // namespace dynamicid::conform::detail
