// dynamicid modules: transformers' CLIPVisionModelWithProjection, the image
// encoder whose penultimate hidden state DynamicID's identity projection reads.
//
// On pixel values (B, C, S, S) (CLIPImageProcessor's output, S = image_size):
//
//   patches = patch_embedding(pixels)  conv k = s = patch_size, no bias -> (B, P, hidden)
//   x       = [class_embedding; patches] + position_embedding          (B, 1 + P, hidden)
//   x       = pre_layrnorm(x)                                           (sic: transformers' key)
//   x       = encoder(x)                                                (no mask)
//   pooled  = post_layernorm(x[:, 0])                                   pooler_output
//   embeds  = visual_projection(pooled)  (no bias)                      image_embeds
//
// `penultimate_hidden_state` is transformers' hidden_states[-2] (the state
// entering the last encoder layer, without post_layernorm), what DynamicID
// and IP-Adapter-Plus feed their resamplers.
//
// Weights bind by transformers' keys below "vision_model." (embeddings.*,
// pre_layrnorm.*, encoder.layers.<i>.*, post_layernorm.*) plus
// "visual_projection.weight"; a bare CLIPVisionModel checkpoint (no
// "vision_model." prefix, no projection) loads too, without image_embeds.
//
//     auto cfg = dynamicid::modules::clip::vision_config::from_json(nlohmann::json::parse(config_text));
//     auto source = dynamicid::modules::weight_source::open({"image_encoder/model.safetensors"});
//     auto model = dynamicid::modules::clip::vision_model<B>::load(ctx, source, cfg);
//     auto out = model.forward(ctx, pixel_values);       // (B, 3, 224, 224)
//     // out.penultimate_hidden_state (B, 257, 1280), out.image_embeds (B, 1024) for ViT-H/14
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/clip/encoder.hpp>
#include <dynamicid/modules/clip/text_model.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace dynamicid::modules::clip {

/// CLIPVisionConfig; defaults are transformers' (openai/clip-vit-base-patch32).
struct vision_config {
    index_t hidden_size = 768;
    index_t intermediate_size = 3072;
    index_t projection_dim = 512;
    index_t num_hidden_layers = 12;
    index_t num_attention_heads = 12;
    index_t num_channels = 3;
    index_t image_size = 224;
    index_t patch_size = 32;
    double layer_norm_eps = 1e-5;
    std::string hidden_act = "quick_gelu";

    encoder_config encoder() const {
        return {.hidden_size = hidden_size, .intermediate_size = intermediate_size, .num_attention_heads = num_attention_heads,
                .num_hidden_layers = num_hidden_layers, .layer_norm_eps = layer_norm_eps, .hidden_act = hidden_act};
    }
    index_t grid() const noexcept { return patch_size > 0 ? image_size / patch_size : 0; }
    index_t num_positions() const noexcept { return grid() * grid() + 1; }

    void validate() const {
        check<value_error>(projection_dim > 0 && num_channels > 0 && image_size > 0 && patch_size > 0 && patch_size <= image_size,
                           "clip", "vision sizes must be positive with patch_size <= image_size (image ", image_size, ", patch ",
                           patch_size, ")");
        encoder().validate();
    }

    /// Reads a transformers config.json: a CLIPVisionConfig, or a CLIPConfig
    /// (its "vision_config"; projection_dim from the top level when the
    /// tower's config lacks it). Absent keys keep transformers' defaults.
    static vision_config from_json(const nlohmann::json& json) {
        const auto& j = detail::tower_json(json, "vision_config");
        vision_config c;
        const auto e = detail::encoder_from_json(j, c.encoder());
        c.hidden_size = e.hidden_size;
        c.intermediate_size = e.intermediate_size;
        c.num_attention_heads = e.num_attention_heads;
        c.num_hidden_layers = e.num_hidden_layers;
        c.layer_norm_eps = e.layer_norm_eps;
        c.hidden_act = e.hidden_act;
        if (&j != &json) c.projection_dim = detail::json_or<index_t>(json, "projection_dim", c.projection_dim);
        c.projection_dim = detail::json_or<index_t>(j, "projection_dim", c.projection_dim);
        c.num_channels = detail::json_or<index_t>(j, "num_channels", c.num_channels);
        c.image_size = detail::json_or<index_t>(j, "image_size", c.image_size);
        c.patch_size = detail::json_or<index_t>(j, "patch_size", c.patch_size);
        c.validate();
        return c;
    }
};

/// CLIPVisionModelWithProjection (and, without visual_projection, CLIPVisionModel).
template <class B, class T = float>
    requires computes_in<B, T>
class vision_model {
public:
    using config = vision_config;
    using tensor_type = tensor<B, T>;

    struct params {
        tensor_type class_embedding;     ///< embeddings.class_embedding (hidden)
        tensor_type patch_embedding;     ///< embeddings.patch_embedding.weight (hidden, C, p, p)
        tensor_type position_embedding;  ///< embeddings.position_embedding.weight (1 + P, hidden)
        layer_norm_layer<B, T> pre_layrnorm, post_layernorm;
        clip::encoder<B, T> encoder;
        linear_layer<B, T> visual_projection;  ///< undefined weight without a projection
    };

    struct output {
        tensor_type last_hidden_state;         ///< (B, 1 + P, hidden)
        tensor_type penultimate_hidden_state;  ///< (B, 1 + P, hidden), hidden_states[-2]
        tensor_type pooler_output;             ///< (B, hidden), post_layernorm of the class token
        tensor_type image_embeds;              ///< (B, projection_dim); undefined without a projection
    };

    vision_model() = default;

    /// Binds the tower's keys below `vision` ("embeddings", "pre_layrnorm",
    /// "encoder", "post_layernorm") and, when `projection` is given, its
    /// "visual_projection.weight".
    static vision_model bind(weight_binder<B, T> vision, const config& c, weight_binder<B, T>* projection = nullptr) {
        c.validate();
        vision_model m;
        m.config_ = c;
        auto& p = m.params_;
        const index_t d = c.hidden_size;
        auto emb = vision.scope("embeddings");
        p.class_embedding = emb.tensor("class_embedding", {d});
        p.patch_embedding = emb.tensor("patch_embedding.weight", {d, c.num_channels, c.patch_size, c.patch_size});
        p.position_embedding = emb.tensor("position_embedding.weight", {c.num_positions(), d});
        p.pre_layrnorm = layer_norm_layer<B, T>::bind(vision, "pre_layrnorm", d, c.layer_norm_eps);
        p.encoder = clip::encoder<B, T>::bind(vision.scope("encoder"), c.encoder());
        p.post_layernorm = layer_norm_layer<B, T>::bind(vision, "post_layernorm", d, c.layer_norm_eps);
        if (projection) p.visual_projection = linear_layer<B, T>::bind(*projection, "visual_projection", d, c.projection_dim, false);
        return m;
    }

    /// Binds from `source` below `prefix`: "vision_model.*" plus
    /// "visual_projection.weight" (CLIPVisionModelWithProjection, CLIPModel),
    /// or bare tower keys without projection (a CLIPVisionModel saved by
    /// transformers 5). Throws one io_error listing every problem.
    static vision_model load(context_t<B>& ctx, const weight_source& source, const config& c, std::string_view prefix = "") {
        weight_binder<B, T> root(ctx, source, std::string(prefix));
        const bool nested = root.contains("vision_model.embeddings.class_embedding");
        const bool projected = root.contains("visual_projection.weight");
        auto m = bind(nested ? root.scope("vision_model") : root, c, projected ? &root : nullptr);
        root.finish();
        return m;
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }
    bool has_projection() const noexcept { return params_.visual_projection.weight.defined(); }

    /// pixel_values (B, C, S, S) -> every output (image_embeds when the model has a projection).
    output forward(context_t<B>& ctx, const tensor_type& pixel_values) const {
        output out;
        const auto h = params_.encoder.forward(ctx, embed(ctx, pixel_values), false, &out.penultimate_hidden_state);
        out.last_hidden_state = h;
        const index_t batch = h.dim(0), d = config_.hidden_size;
        out.pooler_output = params_.post_layernorm(ctx, ops::slice(ctx, h, 1, 0, 1).reshape({batch, d}));
        if (has_projection()) out.image_embeds = params_.visual_projection(ctx, out.pooler_output);
        return out;
    }

    /// hidden_states[-2] alone, skipping the last encoder layer and the head.
    tensor_type penultimate_hidden_state(context_t<B>& ctx, const tensor_type& pixel_values) const {
        return params_.encoder.forward(ctx, embed(ctx, pixel_values), false, nullptr, /*stop_before_last=*/true);
    }

    /// The encoder's input: pre_layrnorm(patch and class embeddings + positions), (B, 1 + P, hidden).
    tensor_type embed(context_t<B>& ctx, const tensor_type& pixel_values) const {
        const auto& c = config_;
        check<shape_error>(pixel_values.rank() == 4 && pixel_values.dim(1) == c.num_channels && pixel_values.dim(2) == c.image_size &&
                               pixel_values.dim(3) == c.image_size,
                           "clip", "pixel_values ", pixel_values.shape().str(), " is not (B, ", c.num_channels, ", ", c.image_size,
                           ", ", c.image_size, ")");
        const index_t batch = pixel_values.dim(0), d = c.hidden_size, patches = c.grid() * c.grid();
        const auto grid = ops::conv2d(ctx, pixel_values, params_.patch_embedding, nullptr, {.stride = c.patch_size});
        const auto tokens = ops::permute(ctx, grid.reshape({batch, d, patches}), {0, 2, 1});  // (B, P, hidden)
        // The class embedding, broadcast over the batch.
        const auto cls = ops::add(ctx, tensor_type::zeros(ctx, {batch, 1, d}), params_.class_embedding.reshape({1, 1, d}));
        auto x = ops::concat(ctx, std::vector<tensor_type>{cls, tokens}, 1);
        x = ops::add(ctx, x, params_.position_embedding);
        return params_.pre_layrnorm(ctx, x);
    }

private:
    config config_;
    params params_;
};

}  // namespace dynamicid::modules::clip
