// dynamicid pipelines: DynamicID generation on Stable Diffusion 1.5.
//
// Per identity (ArcFace embedding + reference image, optional box, optional edit):
//
//   clip_i   = vision_tower(CLIPImageProcessor(reference_i)).hidden_states[-2]     (1, 257, 1280)
//   tok_i    = ProjPlusModel(arcface_i, clip_i)                                      (1, 4, 768)
//   tok_i    = IMR(tok_i, KPE(src landmarks), KPE(tgt landmarks),                    only with an edit
//                  text_pooled(src face prompt), text_pooled(tgt face prompt))
//   uncond   = ProjPlusModel(zeros(512), vision_tower(zeros(1, 3, 224, 224)))         the all-zero normalised image
//   states   = [neg text (77) ; uncond x n],  [prompt text (77) ; tok_1 .. tok_n]   CFG order [uncond, cond]
//
// then the SD pipeline's denoising loop (text_to_image::generate with these
// encoder states and attention hooks; DDIM by default) with DynamicID's processors
// on every attention layer: SA (LoRA) on attn1, SAA (LoRA + gated identity
// branch, layout boost while step < infer_end, box masks or ID mixing) on
// attn2, the step being the denoising step index (one per UNet evaluation).
// Defaults are the release's and the paper's: guidance 5, 50 steps, id_scale
// 1, beta (infer_scale) 4 (the paper uses 2 for several identities),
// infer_end 3 (or alpha as a fraction of the steps), threshold 0.3, gating on.
//
//     using namespace dynamicid;
//     auto pipe = pipelines::dynamicid_pipeline<cpu_backend>::load(ctx, {.sd_model = "models/sd15", .saa_checkpoint = "SAA.bin",
//                                                                        .image_encoder = "models/clip-vit-h-14"});
//     pipelines::dynamicid_identity who{.arcface = pipelines::load_arcface("alice.safetensors"),
//                                       .reference = modules::clip::load_image("alice.png")};
//     auto out = pipe.generate(ctx, {.prompt = "a woman reading in a cafe", .seed = 42}, {who});
//     // out.rgb: 512 x 512 x 3 bytes
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/checkpoint.hpp>
#include <dynamicid/io/dynamicid_checkpoint.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/clip/image_processor.hpp>
#include <dynamicid/modules/clip/vision_model.hpp>
#include <dynamicid/modules/dynamicid/imr.hpp>
#include <dynamicid/modules/dynamicid/keypoint_encoder.hpp>
#include <dynamicid/modules/dynamicid/saa.hpp>
#include <dynamicid/modules/identity/proj_plus.hpp>
#include <dynamicid/ops.hpp>
#include <dynamicid/pipelines/detail/dynamicid_denoise.hpp>
#include <dynamicid/pipelines/detail/dynamicid_processors.hpp>
#include <dynamicid/pipelines/detail/postprocess.hpp>
#include <dynamicid/pipelines/text_to_image.hpp>

#include <nlohmann/json.hpp>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::pipelines {

/// Reads an ArcFace embedding (512 floats by default) from a safetensors file:
/// the tensor `name`, or the file's only tensor when `name` is empty.
inline std::vector<float> load_arcface(const std::filesystem::path& path, const std::string& name = {}, index_t expected = 512) {
    const auto f = io::safetensors_file::open(path);
    const auto names = f.names();
    std::string key = name;
    if (key.empty()) {
        check<value_error>(names.size() == 1, "dynamicid", path.string(), " holds ", names.size(),
                           " tensors; name the ArcFace embedding to read");
        key = names.front();
    }
    check<io_error>(f.contains(key), "dynamicid", path.string(), ": no tensor '", key, "'");
    auto v = f.to_vector<float>(key);
    check<shape_error>(static_cast<index_t>(v.size()) == expected, "dynamicid", path.string(), ": '", key, "' has ", v.size(),
                       " values, expected ", expected);
    return v;
}

/// An edit of an identity's motion through the IMR (expression / pose).
struct dynamicid_edit {
    /// Face prompt describing the reference ("in a neutral expression, in front view"
    /// when empty; see modules/dynamicid/face_prompt.hpp).
    std::string source_prompt{};
    /// The wanted expression / pose ("in a happy expression, in side view"); none: the source prompt.
    std::optional<std::string> target_prompt{};
    /// 96 x 96 landmark raster of the reference, values in [-1, 1]
    /// (modules/dynamicid/landmark_raster.hpp).
    std::vector<float> source_landmarks{};
    /// The target's raster; empty: the source's.
    std::vector<float> target_landmarks{};
};

/// One identity to place in the image.
struct dynamicid_identity {
    std::vector<float> arcface{};  ///< the L2-normalised ArcFace embedding (insightface normed_embedding)
    /// The whole reference image (CLIP features come from it) ...
    std::optional<modules::clip::image_u8> reference{};
    /// ... or its CLIP features precomputed: the vision tower's penultimate
    /// hidden state, (tokens x width) floats row-major.
    std::vector<float> clip_features{};
    /// Where the identity goes, [y_min, x_min, y_max, x_max] as fractions.
    std::optional<modules::saa::box> box{};
    std::optional<dynamicid_edit> edit{};
};

/// The settings of one DynamicID generation.
struct dynamicid_options {
    std::string prompt{};
    std::string negative_prompt{};
    double guidance_scale = 5.0;
    std::size_t steps = 50;
    std::uint64_t seed = 0;
    index_t width = 512, height = 512;
    double eta = 0.0;
    double id_scale = 1.0;
    double infer_scale = 4.0;                  ///< beta of the layout boost (the paper: 2 for several identities)
    index_t infer_end = 3;                     ///< boost while the step index < infer_end ...
    std::optional<double> infer_end_fraction{};  ///< ... or the paper's alpha: infer_end = round(alpha * steps)
    double threshold = 0.3;
    bool activate_query = true;                ///< gating (the paper's method); false: plain identity attention
    /// ID mixing: the first identity's tokens scaled by mix_scale, the others by
    /// 1 - mix_scale, all in `mix_box` (whole image by default). No per-identity boxes then.
    std::optional<double> mix_scale{};
    std::optional<modules::saa::box> mix_box{};
};

/// Observers and controls of one call; everything optional.
template <class B, class T = float>
struct dynamicid_controls {
    tensor<B, T> latents{};  ///< initial noise (1, 4, H / 8, W / 8) instead of randn(seed)
    std::function<void(std::size_t, std::size_t)> on_progress{};
    std::function<void(std::size_t, double, const tensor<B, T>&)> on_step{};
    /// Every gating computation (layer, step, normalised and final weights); see visual/activation_maps.hpp.
    std::function<void(const dynamicid_activation_event&)> on_activation{};
    std::stop_token stop{};
    const std::atomic<bool>* cancel = nullptr;
};

/// The models DynamicID adds to SD1.5. The vision tower, IMR and KeyPointEncoder are optional.
template <class B, class T = float>
    requires computes_in<B, T>
struct dynamicid_models {
    modules::identity::proj_plus_model<B, T> projection;
    std::shared_ptr<const std::vector<detail::dynamicid_adapter<B, T>>> adapters;
    detail::dynamicid_adapter_config adapter_config{};
    bool shortcut = false;  ///< IP-Adapter-FaceID-PlusV2's projection shortcut
    double shortcut_scale = 1.0;
    std::optional<modules::clip::vision_model<B, T>> image_encoder{};
    modules::clip::image_processor image_processor{};
    std::optional<modules::imr::imr_model<B, T>> imr{};
    std::optional<modules::imr::keypoint_encoder<B, T>> keypoint_encoder{};
    /// CLIP features of the all-zero normalised image (1, tokens, width), the
    /// unconditional tokens' input; computed once by set_image_encoder(), or set by
    /// a caller that gives identities as clip_features without a vision tower.
    tensor<B, T> unconditional_clip_features{};

    /// Installs the vision tower and caches its features of the all-zero image.
    void set_image_encoder(context_t<B>& ctx, modules::clip::vision_model<B, T> encoder) {
        const auto s = encoder.settings().image_size;
        const auto c = encoder.settings().num_channels;
        const std::vector<T> black(static_cast<std::size_t>(c * s * s), T(0));  // zero after normalisation, as released
        unconditional_clip_features = encoder.penultimate_hidden_state(ctx, tensor<B, T>::from_host(ctx, {1, c, s, s}, black));
        image_encoder = std::move(encoder);
    }

    /// Binds the checkpoint's projection and one adapter per attention layer of `unet`.
    static dynamicid_models bind(context_t<B>& ctx, const io::identity_checkpoint& ckpt, const modules::unet::unet_2d_condition<B, T>& unet) {
        auto proj = ckpt.load_projection<B, T>(ctx, ckpt.projection_config());
        auto adapters = detail::bind_adapters<B, T>(ctx, ckpt.processors, unet.settings(), unet.attention_layer_names(), ckpt.processor_indices);
        dynamicid_models m{std::move(proj), std::make_shared<const std::vector<detail::dynamicid_adapter<B, T>>>(std::move(adapters))};
        m.adapter_config.tokens_per_id = m.projection.settings().num_tokens;
        m.shortcut = ckpt.shortcut;
        return m;
    }
};

/// Where a pipeline's files are.
struct dynamicid_paths {
    std::filesystem::path sd_model{};        ///< diffusers folder or single .safetensors (io::sd_checkpoint)
    std::filesystem::path saa_checkpoint{};  ///< SAA.bin / .safetensors (or an IP-Adapter-FaceID-Plus file)
    std::filesystem::path image_encoder{};  ///< CLIP-ViT-H folder (config.json + model.safetensors); optional
    std::filesystem::path imr{};            ///< IMR weights (.bin or .safetensors); optional
    std::filesystem::path keypoint_encoder{};  ///< defaults to imr with "IMR" replaced by "key_point_encoder"
    /// The IMR's sizes; none: read from the weights (imr_config::from_weights).
    std::optional<modules::imr::imr_config> imr_config{};
};

/// DynamicID over the SD1.x text-to-image pipeline (its tokenizer, text
/// encoder, UNet, VAE and sampler) plus dynamicid_models.
///
/// Thread safety: immutable after construction; generate() is const and may
/// run concurrently on separate contexts.
template <class B, class T = float, class Sampler = schedulers::ddim_scheduler>
    requires computes_in<B, T> && schedulers::sampler<Sampler, B, T>
class dynamicid_pipeline {
public:
    using tensor_type = tensor<B, T>;
    using sd_pipeline = text_to_image<B, T, Sampler>;
    using models_type = dynamicid_models<B, T>;
    using options = dynamicid_options;
    using controls = dynamicid_controls<B, T>;
    using result = text_to_image_result<B, T>;

    dynamicid_pipeline(sd_pipeline sd, models_type models) : sd_(std::move(sd)), models_(std::move(models)) {
        check<value_error>(models_.adapters && models_.adapters->size() == sd_.models().unet.attention_layer_names().size(), "dynamicid",
                           "the processors do not match the UNet's attention layers");
        check<value_error>(models_.projection.settings().cross_attention_dim == sd_.models().unet.settings().cross_attention_dim,
                           "dynamicid", "the projection's width ", models_.projection.settings().cross_attention_dim,
                           " differs from the UNet's cross_attention_dim ", sd_.models().unet.settings().cross_attention_dim);
    }

    /// Loads SD (DDIM from its scheduler config), the SAA checkpoint and the optional models.
    static dynamicid_pipeline load(context_t<B>& ctx, const dynamicid_paths& paths)
        requires std::same_as<Sampler, schedulers::ddim_scheduler>
    {
        auto sd = sd_pipeline::load(ctx, paths.sd_model);
        const auto ckpt = io::identity_checkpoint::open(paths.saa_checkpoint);
        auto models = models_type::bind(ctx, ckpt, sd.models().unet);
        if (!paths.image_encoder.empty()) {
            std::ifstream in(paths.image_encoder / "config.json");
            check<io_error>(static_cast<bool>(in), "dynamicid", "cannot read ", (paths.image_encoder / "config.json").string());
            const auto cfg = modules::clip::vision_config::from_json(nlohmann::json::parse(in));
            auto files = std::vector<std::filesystem::path>{paths.image_encoder / "model.safetensors"};
            models.set_image_encoder(ctx, modules::clip::vision_model<B, T>::load(ctx, modules::weight_source::open(files), cfg));
            // The folder's preprocessor_config.json when it has one; otherwise
            // CLIPImageProcessor's defaults with the tower's own input size.
            if (std::ifstream pre(paths.image_encoder / "preprocessor_config.json"); pre) {
                models.image_processor = modules::clip::image_processor(modules::clip::image_processor_config::from_json(nlohmann::json::parse(pre)));
            } else {
                modules::clip::image_processor_config pc;
                pc.shortest_edge = pc.crop_height = pc.crop_width = cfg.image_size;
                models.image_processor = modules::clip::image_processor(pc);
            }
        }
        if (!paths.imr.empty()) {
            const auto open = [](const std::filesystem::path& p) {
                return p.extension() == ".safetensors" ? modules::weight_source::open({p}) : io::open_torch_weights(p);
            };
            const auto imr_source = open(paths.imr);
            models.imr = modules::imr::imr_model<B, T>::load(ctx, imr_source,
                                                             paths.imr_config ? *paths.imr_config : modules::imr::imr_config::from_weights(imr_source));
            auto kpe = paths.keypoint_encoder;
            if (kpe.empty()) {
                std::string name = paths.imr.filename().string();
                const auto pos = name.find("IMR");
                check<value_error>(pos != std::string::npos, "dynamicid", "name the KeyPointEncoder file (", name, " has no 'IMR' to replace)");
                name.replace(pos, 3, "key_point_encoder");
                kpe = paths.imr.parent_path() / name;
            }
            models.keypoint_encoder = modules::imr::keypoint_encoder<B, T>::load(ctx, open(kpe), {});
        }
        return dynamicid_pipeline(std::move(sd), std::move(models));
    }

    const sd_pipeline& sd() const noexcept { return sd_; }
    const models_type& models() const noexcept { return models_; }

    /// CLIP features of an identity (1, tokens, width): the given ones, or the vision tower on its reference.
    tensor_type clip_features(context_t<B>& ctx, const dynamicid_identity& who) const {
        const auto& pc = models_.projection.settings();
        if (!who.clip_features.empty()) {
            const auto n = static_cast<index_t>(who.clip_features.size());
            check<shape_error>(n % pc.clip_embeddings_dim == 0, "dynamicid", "clip_features has ", n, " values, not a multiple of ",
                               pc.clip_embeddings_dim);
            std::vector<T> v(who.clip_features.begin(), who.clip_features.end());
            return tensor_type::from_host(ctx, {1, n / pc.clip_embeddings_dim, pc.clip_embeddings_dim}, v);
        }
        check<value_error>(who.reference.has_value(), "dynamicid", "an identity needs a reference image or clip_features");
        check<value_error>(models_.image_encoder.has_value(), "dynamicid", "no image encoder loaded: give clip_features");
        const auto pixels = models_.image_processor.template preprocess<B, T>(ctx, *who.reference);
        return models_.image_encoder->penultimate_hidden_state(ctx, pixels);
    }

    /// Identity tokens (1, num_tokens, width) of one identity (edited when it has an edit).
    tensor_type identity_tokens(context_t<B>& ctx, const dynamicid_identity& who) const {
        const auto& pc = models_.projection.settings();
        check<shape_error>(static_cast<index_t>(who.arcface.size()) == pc.id_embeddings_dim, "dynamicid", "ArcFace embedding has ",
                           who.arcface.size(), " values, expected ", pc.id_embeddings_dim);
        std::vector<T> id(who.arcface.begin(), who.arcface.end());
        auto tokens = project(ctx, tensor_type::from_host(ctx, {1, pc.id_embeddings_dim}, id), clip_features(ctx, who));
        if (who.edit) tokens = edit_tokens(ctx, tokens, *who.edit);
        return tokens;
    }

    /// The unconditional identity tokens (1, num_tokens, width): the projection of a
    /// zero ArcFace embedding and of the CLIP features of an all-zero normalised image.
    tensor_type unconditional_tokens(context_t<B>& ctx) const {
        const auto& pc = models_.projection.settings();
        check<value_error>(models_.unconditional_clip_features.defined(), "dynamicid",
                           "no image encoder loaded and no unconditional_clip_features set: the unconditional tokens need one");
        const std::vector<T> zeros(static_cast<std::size_t>(pc.id_embeddings_dim), T(0));
        return project(ctx, tensor_type::from_host(ctx, {1, pc.id_embeddings_dim}, zeros), models_.unconditional_clip_features);
    }

    /// IMR edit of identity tokens (1, n, width) -> (1, n, width).
    tensor_type edit_tokens(context_t<B>& ctx, const tensor_type& tokens, const dynamicid_edit& e) const {
        check<value_error>(models_.imr.has_value() && models_.keypoint_encoder.has_value(), "dynamicid",
                           "an edit needs the IMR and KeyPointEncoder weights");
        constexpr index_t side = 96;
        const auto raster = [&](const std::vector<float>& v, const char* what) {
            check<shape_error>(static_cast<index_t>(v.size()) == side * side, "dynamicid", what, " has ", v.size(), " values, expected 96 x 96");
            std::vector<T> t(v.begin(), v.end());
            return tensor_type::from_host(ctx, {1, 1, side, side}, t);
        };
        const auto src = raster(e.source_landmarks, "source_landmarks");
        const auto tgt = e.target_landmarks.empty() ? src : raster(e.target_landmarks, "target_landmarks");
        const auto lmk = models_.keypoint_encoder->forward(ctx, ops::concat(ctx, std::vector<tensor_type>{src, tgt}, 0));
        const index_t width = lmk.dim(1);
        const auto lmk2 = lmk.reshape({2, width});
        const std::string source_prompt = e.source_prompt.empty() ? std::string("in a neutral expression, in front view") : e.source_prompt;
        const std::vector<std::string> prompts{source_prompt, e.target_prompt.value_or(source_prompt)};
        const auto& m = sd_.models();
        const auto len = static_cast<std::size_t>(m.text_encoder.settings().max_position_embeddings);
        const auto ids = m.tokenizer.encode_batch(prompts, std::min<std::size_t>(len, text::clip_tokenizer::default_context_length));
        const auto pooled = m.text_encoder.forward(ctx, ids, 2).pooler_output;
        return models_.imr->forward(ctx, tokens, lmk2.narrow_leading(0, 1), lmk2.narrow_leading(1, 1), pooled.narrow_leading(0, 1),
                                    pooled.narrow_leading(1, 1));
    }

    /// The boxes and layer controls of a call.
    dynamicid_layer_controls layer_controls(const options& o, const std::vector<dynamicid_identity>& ids) const {
        dynamicid_layer_controls c;
        c.id_num = static_cast<index_t>(ids.size());
        check<value_error>(c.id_num >= 1, "dynamicid", "at least one identity is needed");
        const auto boxed = std::count_if(ids.begin(), ids.end(), [](const auto& i) { return i.box.has_value(); });
        if (o.mix_scale) {
            check<value_error>(boxed == 0, "dynamicid", "ID mixing takes one mix_box, not per-identity boxes");
            check<value_error>(c.id_num >= 2, "dynamicid", "ID mixing needs at least two identities");
            c.boxes = {o.mix_box.value_or(modules::saa::box{})};
        } else {
            check<value_error>(boxed == 0 || boxed == c.id_num, "dynamicid", "give a box to every identity or to none (", boxed, " of ",
                               c.id_num, ")");
            for (const auto& i : ids)
                if (i.box) c.boxes.push_back(*i.box);
        }
        c.activate_query = o.activate_query;
        c.infer_scale = o.infer_scale;
        c.infer_end = o.infer_end_fraction ? static_cast<index_t>(std::lround(*o.infer_end_fraction * static_cast<double>(o.steps))) : o.infer_end;
        c.mix_scale = o.mix_scale;
        c.id_scale = o.id_scale;
        c.threshold = o.threshold;
        if (o.width != o.height) {
            c.root_width = o.width;
            c.root_height = o.height;
        }
        return c;
    }

    /// Runs one generation (see the file comment).
    result generate(context_t<B>& ctx, const options& o, const std::vector<dynamicid_identity>& ids, const controls& c = {}) const {
        check_cancel(c);
        auto lc = layer_controls(o, ids);
        const bool guided = o.guidance_scale > 1.0;
        std::vector<tensor_type> cond, uncond;
        const tensor_type u = guided ? unconditional_tokens(ctx) : tensor_type{};
        for (const auto& who : ids) {
            cond.push_back(identity_tokens(ctx, who));
            if (guided) uncond.push_back(u);
        }
        const auto sd_opts = sd_options(o);
        const tensor_type text = sd_.encode_text(ctx, sd_opts, guided);
        const tensor_type states =
            encoder_states(ctx, text, ops::concat(ctx, cond, 1), guided ? ops::concat(ctx, uncond, 1) : tensor_type{}, guided, lc.id_num);

        // The SD pipeline's loop with the identity tokens appended and the processors installed.
        lc.on_activation = c.on_activation;
        const index_t infer_end = lc.infer_end;  // the processors' host logic changes there (layout boost off)
        auto hooks = detail::make_hooks<B, T>(models_.adapters, models_.adapter_config, std::move(lc));
        typename sd_pipeline::controls sc;
        sc.latents = c.latents;
        sc.on_progress = c.on_progress;
        sc.on_step = c.on_step;
        sc.stop = c.stop;
        sc.cancel = c.cancel;
        sc.encoder_states = states;
        sc.hooks = &hooks;
        sc.capture_steps = !c.on_activation;  // activation maps are read on the host inside the UNet
        sc.graph_variant = [infer_end](std::size_t step) -> std::uint64_t { return static_cast<index_t>(step) < infer_end ? 1 : 0; };
        return sd_.generate(ctx, sd_opts, sc);
    }

    /// The UNet conditioning: [text_uncond ; uncond tokens] and [text_cond ; identity tokens]
    /// rows (guided), else [text ; identity tokens]. text is (2, L, width) [negative ; prompt]
    /// when guided, else (1, L, width); tokens (1, tokens_per_id * id_num, width).
    tensor_type encoder_states(context_t<B>& ctx, const tensor_type& text, const tensor_type& id_tokens, const tensor_type& uncond_tokens,
                               bool guided, index_t id_num) const {
        return build_states(ctx, models_, text, id_tokens, uncond_tokens, guided, id_num);
    }

    /// The denoising part: text states ([neg ; prompt] rows when guided, else the
    /// prompt's), identity tokens (1, 4 n, width) and unconditional tokens (1, 4 n, width).
    tensor_type denoise(context_t<B>& ctx, const options& o, const tensor_type& text, const tensor_type& id_tokens,
                        const tensor_type& uncond_tokens, dynamicid_layer_controls lc, const controls& c = {}) const {
        const auto latent = sd_.latent_shape(sd_options(o));
        return run_denoiser(ctx, sd_.models().unet, sd_.sampler(), models_, o, latent, text, id_tokens, uncond_tokens, std::move(lc), c);
    }

    /// The denoiser alone, for callers (and tests) holding only a UNet, a sampler and the models.
    static tensor_type run_denoiser(context_t<B>& ctx, const modules::unet::unet_2d_condition<B, T>& unet, const Sampler& sampler,
                                    const models_type& models, const options& o, const shape& latent, const tensor_type& text,
                                    const tensor_type& id_tokens, const tensor_type& uncond_tokens, dynamicid_layer_controls lc,
                                    const controls& c = {}) {
        const bool guided = o.guidance_scale > 1.0;
        const tensor_type states = build_states(ctx, models, text, id_tokens, uncond_tokens, guided, lc.id_num);
        lc.on_activation = c.on_activation;
        const index_t infer_end = lc.infer_end;  // the processors' host logic changes there (layout boost off)
        auto hooks = detail::make_hooks<B, T>(models.adapters, models.adapter_config, std::move(lc));
        detail::denoise_request<B, T> r;
        r.states = states;
        r.latents = c.latents.defined() ? c.latents : ops::randn<B, T>(ctx, latent, o.seed, 0);
        check<shape_error>(r.latents.shape() == latent, "dynamicid", "latents ", r.latents.shape().str(), " should be ", latent.str());
        r.guidance_scale = o.guidance_scale;
        r.steps = o.steps;
        r.eta = o.eta;
        r.seed = o.seed;
        r.hooks = &hooks;
        r.capture_steps = !c.on_activation;  // activation maps are read on the host inside the UNet
        r.graph_variant = [infer_end](std::size_t step) -> std::uint64_t { return static_cast<index_t>(step) < infer_end ? 1 : 0; };
        r.on_step = c.on_step;
        r.on_progress = c.on_progress;
        r.stop = c.stop;
        r.cancel = c.cancel;
        return detail::denoise_states<B, T>(ctx, unet, sampler, r);
    }

    /// The text_to_image options matching `o` (one prompt, one image).
    static text_to_image_options sd_options(const options& o) {
        text_to_image_options s;
        s.prompts = {o.prompt};
        s.negative_prompts = {o.negative_prompt};
        s.guidance_scale = o.guidance_scale;
        s.steps = o.steps;
        s.seed = o.seed;
        s.width = o.width;
        s.height = o.height;
        s.eta = o.eta;
        return s;
    }

private:
    static tensor_type build_states(context_t<B>& ctx, const models_type& models, const tensor_type& text, const tensor_type& id_tokens,
                                    const tensor_type& uncond_tokens, bool guided, index_t id_num) {
        const index_t per = models.adapter_config.tokens_per_id;
        check<shape_error>(id_tokens.rank() == 3 && id_tokens.dim(0) == 1 && id_tokens.dim(1) == per * id_num, "dynamicid",
                           "identity tokens ", id_tokens.shape().str(), " are not (1, ", per * id_num, ", width)");
        check<shape_error>(!guided || uncond_tokens.shape() == id_tokens.shape(), "dynamicid", "unconditional tokens ",
                           uncond_tokens.defined() ? uncond_tokens.shape().str() : std::string("(none)"), " differ from the identity tokens' ",
                           id_tokens.shape().str());
        check<shape_error>(text.rank() == 3 && text.dim(0) == (guided ? 2 : 1), "dynamicid", "text states ", text.shape().str(),
                           guided ? " are not (2, L, width): [negative ; prompt]" : " are not (1, L, width)");
        if (!guided) return ops::concat(ctx, std::vector<tensor_type>{text, id_tokens}, 1);
        return ops::concat(ctx, std::vector<tensor_type>{ops::concat(ctx, std::vector<tensor_type>{text.narrow_leading(0, 1), uncond_tokens}, 1),
                                                         ops::concat(ctx, std::vector<tensor_type>{text.narrow_leading(1, 1), id_tokens}, 1)},
                           0);
    }

    static void check_cancel(const controls& c) {
        if (c.stop.stop_requested() || (c.cancel && c.cancel->load(std::memory_order_relaxed)))
            throw cancelled_error("pipeline", "generation cancelled");
    }

    tensor_type project(context_t<B>& ctx, const tensor_type& id, const tensor_type& clip) const {
        return models_.projection.forward(ctx, id, clip, models_.shortcut, models_.shortcut_scale);
    }

    sd_pipeline sd_;
    models_type models_;
};

}  // namespace dynamicid::pipelines
