// dynamicid conformance: handlers for transformers' CLIP modules
// (CLIPTextModel, CLIPVisionModelWithProjection, CLIPImageProcessor).
//
// The case's config is the transformers config dict (model.config or the
// processor's to_dict()), read by the modules' own from_json.
#pragma once

#include <dynamicid/conform/detail/golden_case.hpp>
#include <dynamicid/modules/clip/image_processor.hpp>
#include <dynamicid/modules/clip/text_model.hpp>
#include <dynamicid/modules/clip/vision_model.hpp>
#include <dynamicid/modules/weights.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dynamicid::conform::detail {

/// The case's file as a weight source (the case outlives the binding).
inline modules::weight_source clip_case_weights(const golden_case& g) {
    return modules::weight_source({std::shared_ptr<const io::safetensors_file>(std::shared_ptr<void>{}, &g.file())});
}

/// CLIPTextModel: param.[text_model.]*; input.input_ids (B, L) I64 ->
/// output.last_hidden_state, pooler_output, penultimate_hidden_state.
template <class B, class T>
output_map<B> clip_text_model_case(context_t<B>& ctx, const golden_case& g) {
    const auto cfg = modules::clip::text_config::from_json(g.config());
    const auto model = modules::clip::text_model<B, T>::load(ctx, clip_case_weights(g), cfg, "param.");
    const auto dims = g.dims("input.input_ids");
    check<shape_error>(dims.rank() == 2, "conform", g.file_name(), ": input_ids ", dims.str(), " is not (B, L)");
    const auto ids = g.file().template to_vector<std::int64_t>("input.input_ids");
    const auto r = model.forward(ctx, ids, dims[0], /*penultimate=*/true);
    output_map<B> out;
    out.insert_or_assign("last_hidden_state", any_tensor<B>(r.last_hidden_state));
    out.insert_or_assign("pooler_output", any_tensor<B>(r.pooler_output));
    out.insert_or_assign("penultimate_hidden_state", any_tensor<B>(r.penultimate_hidden_state));
    return out;
}

/// CLIPVisionModelWithProjection: param.vision_model.*, param.visual_projection.weight;
/// input.pixel_values -> output.penultimate_hidden_state, image_embeds,
/// last_hidden_state, pooler_output (those the file holds are compared).
template <class B, class T>
output_map<B> clip_vision_model_case(context_t<B>& ctx, const golden_case& g) {
    const auto cfg = modules::clip::vision_config::from_json(g.config());
    const auto model = modules::clip::vision_model<B, T>::load(ctx, clip_case_weights(g), cfg, "param.");
    const auto r = model.forward(ctx, g.template load<B, T>(ctx, "input.pixel_values"));
    output_map<B> out;
    out.insert_or_assign("penultimate_hidden_state", any_tensor<B>(r.penultimate_hidden_state));
    out.insert_or_assign("last_hidden_state", any_tensor<B>(r.last_hidden_state));
    out.insert_or_assign("pooler_output", any_tensor<B>(r.pooler_output));
    if (r.image_embeds.defined()) out.insert_or_assign("image_embeds", any_tensor<B>(r.image_embeds));
    return out;
}

/// CLIPImageProcessor: config = the processor's to_dict(); input.image (H, W, 3) U8 ->
/// output.pixel_values (1, 3, h, w) (and pixel_values_pil, the PIL backend's, where stored).
template <class B>
output_map<B> clip_image_processor_case(context_t<B>& ctx, const golden_case& g) {
    const modules::clip::image_processor proc(modules::clip::image_processor_config::from_json(g.config()));
    const auto dims = g.dims("input.image");
    check<shape_error>(dims.rank() == 3, "conform", g.file_name(), ": image ", dims.str(), " is not (H, W, C)");
    const auto bytes = g.file().template to_vector<std::uint8_t>("input.image");
    const auto img = modules::clip::image_u8::from_rgb(bytes.data(), dims[0], dims[1], dims[2]);
    const auto pixels = proc.preprocess<B, float>(ctx, img);
    output_map<B> out;
    out.insert_or_assign("pixel_values", any_tensor<B>(pixels));
    out.insert_or_assign("pixel_values_pil", any_tensor<B>(pixels));
    return out;
}

/// Registers the CLIP handlers on `r` (a conform::registry<B>); float32 models.
template <class B, class Registry>
void add_clip_handlers(Registry& r) {
    using ctx_t = context_t<B>;
    r.add("CLIPTextModel", [](ctx_t& ctx, const golden_case& g) { return clip_text_model_case<B, float>(ctx, g); });
    r.add("CLIPVisionModelWithProjection", [](ctx_t& ctx, const golden_case& g) { return clip_vision_model_case<B, float>(ctx, g); });
    r.add("CLIPImageProcessor", [](ctx_t& ctx, const golden_case& g) { return clip_image_processor_case<B>(ctx, g); });
}

}  // namespace dynamicid::conform::detail
