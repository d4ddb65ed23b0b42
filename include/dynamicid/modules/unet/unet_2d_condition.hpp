// dynamicid modules: diffusers' UNet2DConditionModel for SD1.x.
//
//   temb  = time_embedding(Timesteps(t))                  (B, 4 * block_out_channels[0])
//   h     = conv_in(sample); skips = [h]
//   h     = down_blocks[i](h, temb, text, skips)          each pushes its outputs
//   h     = mid_block(h, temb, text)
//   h     = up_blocks[i](h, temb, text, skips)            each pops len(resnets) skips
//   out   = conv_out(silu(conv_norm_out(h)))
//
// Config: `unet_config::from_json` reads a diffusers unet/config.json and
// rejects, with one message listing them, every setting outside the SD1.x
// surface. Weights bind by diffusers' state-dict keys (all problems reported
// at once by weight_binder::finish).
//
// Attention processors: every attention layer (attn1 / attn2 of every
// BasicTransformerBlock) has an index in diffusers' `unet.attn_processors`
// order, which follows module registration, NOT the forward order:
//
//   down_blocks.0.attentions.0.transformer_blocks.0.attn1, .attn2, ...,
//   down_blocks.<last cross-attn block>..., then up_blocks.1 ... up_blocks.<last>,
//   and mid_block.attentions.0... LAST
//
// (UNet2DConditionModel registers up_blocks before it assigns mid_block).
// attention_layer_names() lists the keys ("<path>.processor"); pass
// attention_hooks with processors[index] set to replace a layer, and `step`
// to hand a per-call counter to every processor.
//
//     auto cfg = dynamicid::modules::unet::unet_config::from_json(nlohmann::json::parse(config_text));
//     auto source = dynamicid::modules::weight_source::open({"unet/diffusion_pytorch_model.safetensors"});
//     auto unet = dynamicid::modules::unet::unet_2d_condition<B>::load(ctx, source, cfg);
//     auto eps = unet.forward(ctx, latents, std::vector<float>{981.f, 981.f}, text);   // (2, 4, 64, 64)
//
// Training (frozen UNet; gradients w.r.t. the latents and the encoder hidden
// states, plus whatever trainable processors deliver): forward_train records
// one tape entry per block (conv_in, each down block, the mid block, each up
// block, the output head). With checkpoint_blocks, a down/mid/up block keeps
// only its inputs and is recomputed during backward.
//
//     dynamicid::training::tape<B, float> tp(&board);
//     auto x = tp.leaf(latents), c = tp.leaf(states);
//     auto eps = unet.forward_train(ctx, tp, x, timesteps, c, &hooks, {.checkpoint_blocks = true});
//     tp.backward(ctx, eps, grad_eps);   // tp.gradient(x), tp.gradient(c)
//
// Training the UNet's own weights (a base model from scratch): pass a
// param_grads; forward_train then keeps what the weight gradients need and
// tp.backward() adds them into it (undefined entries count as zeros, so
// several backwards accumulate). for_each_parameter pairs every weight with
// its gradient under diffusers' state-dict key; the weights share storage
// with the model, so an optimizer updates the model in place.
//
//     typename decltype(unet)::param_grads grads;
//     auto eps = unet.forward_train(ctx, tp, x, timesteps, c, nullptr, {}, &grads);
//     tp.backward(ctx, eps, grad_eps);
//     unet.for_each_parameter(&grads, [&](const std::string& key, const auto& weight, const auto& grad) { ... });
#pragma once

#include <dynamicid/modules/detail/config_reader.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/unet/embeddings.hpp>
#include <dynamicid/modules/unet/transformer_2d.hpp>
#include <dynamicid/modules/unet/unet_blocks.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>
#include <dynamicid/training/tape.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <span>
#include <string>
#include <vector>

namespace dynamicid::modules::unet {

/// The SD1.x configuration surface of UNet2DConditionModel; defaults are SD1.5's.
/// Per-block lists have one entry per down block (up blocks use them reversed).
struct unet_config {
    index_t sample_size = 64;
    index_t in_channels = 4;
    index_t out_channels = 4;
    bool flip_sin_to_cos = true;
    double freq_shift = 0.0;
    std::vector<std::string> down_block_types{"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"};
    std::vector<std::string> up_block_types{"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
    std::vector<index_t> block_out_channels{320, 640, 1280, 1280};
    std::vector<index_t> layers_per_block{2, 2, 2, 2};
    /// diffusers' attention_head_dim, which SD1.x uses as the number of heads per block.
    std::vector<index_t> attention_head_dim{8, 8, 8, 8};
    std::vector<index_t> transformer_layers_per_block{1, 1, 1, 1};
    index_t cross_attention_dim = 768;
    index_t norm_num_groups = 32;
    double norm_eps = 1e-5;
    double mid_block_scale_factor = 1.0;
    bool use_linear_projection = false;
    index_t time_embedding_dim = 0;  ///< 0: 4 * block_out_channels[0]

    /// Reads a diffusers unet/config.json. Throws value_error listing every
    /// unsupported or malformed setting; keys starting with '_' and settings
    /// that only matter in half precision (upcast_attention) are ignored.
    static unet_config from_json(const nlohmann::json& j);

    /// Throws value_error when the sizes do not form a UNet.
    void validate() const;
};

inline unet_config unet_config::from_json(const nlohmann::json& j) {
    check<value_error>(j.is_object(), "unet", "config must be a JSON object");
    unet_config c;
    modules::detail::config_reader r{j, {}};
    if (r.has("_class_name")) r.require("_class_name", "UNet2DConditionModel", "is not a UNet2DConditionModel");
    r.read("sample_size", c.sample_size);
    r.read("in_channels", c.in_channels);
    r.read("out_channels", c.out_channels);
    r.read("flip_sin_to_cos", c.flip_sin_to_cos);
    r.read("freq_shift", c.freq_shift);
    r.read("down_block_types", c.down_block_types);
    r.read("up_block_types", c.up_block_types);
    r.read("block_out_channels", c.block_out_channels);
    const std::size_t blocks = c.block_out_channels.size();
    r.read_per_block("layers_per_block", c.layers_per_block, blocks);
    r.read_per_block("attention_head_dim", c.attention_head_dim, blocks);
    r.read_per_block("transformer_layers_per_block", c.transformer_layers_per_block, blocks);
    if (r.has("cross_attention_dim") && !j["cross_attention_dim"].is_number_integer())
        r.problems.push_back("\"cross_attention_dim\" must be one integer, got " + j["cross_attention_dim"].dump());
    else
        r.read("cross_attention_dim", c.cross_attention_dim);
    r.read("norm_num_groups", c.norm_num_groups);
    r.read("norm_eps", c.norm_eps);
    r.read("mid_block_scale_factor", c.mid_block_scale_factor);
    r.read("use_linear_projection", c.use_linear_projection);
    r.read("time_embedding_dim", c.time_embedding_dim);

    // Settings outside SD1.x: each must keep its diffusers default.
    r.require("act_fn", "silu");
    r.require("center_input_sample", false);
    r.require("conv_in_kernel", 3);
    r.require("conv_out_kernel", 3);
    r.require("downsample_padding", 1);
    r.require("dual_cross_attention", false);
    r.require("only_cross_attention", false);
    r.require("resnet_time_scale_shift", "default");
    r.require("time_embedding_type", "positional");
    r.require("attention_type", "default");
    r.require("mid_block_type", "UNetMidBlock2DCrossAttn");
    r.require("class_embeddings_concat", false);
    for (const char* key : {"num_attention_heads", "class_embed_type", "addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type",
                            "num_class_embeds", "time_cond_proj_dim", "timestep_post_act", "time_embedding_act_fn",
                            "projection_class_embeddings_input_dim", "cross_attention_norm", "addition_time_embed_dim",
                            "reverse_transformer_layers_per_block", "mid_block_only_cross_attention"})
        r.require_null(key);
    // resnet_out_scale_factor and resnet_skip_time_act do not reach SD1.x's
    // block types in diffusers, so any value gives the same model.
    if (!r.problems.empty()) {
        std::string message = std::to_string(r.problems.size()) + " unsupported config setting" + (r.problems.size() == 1 ? "" : "s") + ": ";
        for (std::size_t i = 0; i < r.problems.size(); ++i) message += (i ? "; " : "") + r.problems[i];
        throw value_error("unet", message);
    }
    c.validate();
    return c;
}

inline void unet_config::validate() const {
    const std::size_t n = block_out_channels.size();
    check<value_error>(n >= 1, "unet", "block_out_channels is empty");
    check<value_error>(down_block_types.size() == n && up_block_types.size() == n, "unet", down_block_types.size(), " down and ",
                       up_block_types.size(), " up block types for ", n, " block_out_channels");
    check<value_error>(layers_per_block.size() == n && attention_head_dim.size() == n && transformer_layers_per_block.size() == n, "unet",
                       "per-block lists must have ", n, " entries");
    check<value_error>(in_channels > 0 && out_channels > 0 && cross_attention_dim > 0 && norm_num_groups > 0 && time_embedding_dim >= 0,
                       "unet", "sizes must be positive");
    for (std::size_t i = 0; i < n; ++i) {
        check<value_error>(block_out_channels[i] > 0 && block_out_channels[i] % norm_num_groups == 0, "unet", "block_out_channels[", i,
                           "] = ", block_out_channels[i], " is not a positive multiple of norm_num_groups ", norm_num_groups);
        check<value_error>(layers_per_block[i] >= 1 && transformer_layers_per_block[i] >= 1 && attention_head_dim[i] >= 1, "unet",
                           "layers_per_block, transformer_layers_per_block and attention_head_dim must be positive");
        check<value_error>(down_block_types[i] == "CrossAttnDownBlock2D" || down_block_types[i] == "DownBlock2D", "unet",
                           "down block type '", down_block_types[i], "' is not supported (CrossAttnDownBlock2D, DownBlock2D)");
        check<value_error>(up_block_types[i] == "CrossAttnUpBlock2D" || up_block_types[i] == "UpBlock2D", "unet", "up block type '",
                           up_block_types[i], "' is not supported (CrossAttnUpBlock2D, UpBlock2D)");
    }
}

/// How unet_2d_condition::forward_train records.
struct unet_training_options {
    /// Keep only each down/mid/up block's inputs and recompute the block in backward.
    bool checkpoint_blocks = false;
};

/// UNet2DConditionModel (SD1.x surface).
template <class B, class T = float>
    requires computes_in<B, T>
class unet_2d_condition {
public:
    using config = unet_config;
    using tensor_type = tensor<B, T>;
    using hooks_type = attention_hooks<B, T>;

    /// The UNet's weights (or their gradients) as a tree mirroring its modules
    /// (diffusers' conv_in, time_embedding, down_blocks.<i>, mid_block,
    /// up_blocks.<i>, conv_norm_out, conv_out).
    struct param_grads {
        conv2d_layer<B, T> conv_in;
        typename timestep_embedding<B, T>::param_grads time_embedding;
        std::vector<typename down_block<B, T>::param_grads> down_blocks;
        typename unet::mid_block<B, T>::param_grads mid_block;
        std::vector<typename up_block<B, T>::param_grads> up_blocks;
        group_norm_layer<B, T> conv_norm_out;
        conv2d_layer<B, T> conv_out;
    };

    unet_2d_condition() = default;

    /// Binds every weight below the binder's prefix; problems are collected in the binder.
    static unet_2d_condition bind(weight_binder<B, T> b, const config& cfg) {
        cfg.validate();
        unet_2d_condition u;
        u.config_ = cfg;
        const auto& c = u.config_;
        const std::size_t n = c.block_out_channels.size();
        const index_t base = c.block_out_channels[0];
        const index_t temb = c.time_embedding_dim > 0 ? c.time_embedding_dim : 4 * base;
        u.conv_in_ = conv2d_layer<B, T>::bind(b, "conv_in", c.in_channels, base, 3, {.padding = 1});
        u.time_embedding_ = timestep_embedding<B, T>::bind(b.scope("time_embedding"), base, temb);
        const auto common = [&](std::size_t i) {
            return unet_block_common{.temb_channels = temb, .resnet_groups = c.norm_num_groups, .resnet_eps = c.norm_eps,
                                     .num_attention_heads = c.attention_head_dim[i], .cross_attention_dim = c.cross_attention_dim,
                                     .transformer_layers = c.transformer_layers_per_block[i],
                                     .use_linear_projection = c.use_linear_projection};
        };
        // Bound in attn_processors order (down, up, mid) so `layer` numbers the processors.
        index_t layer = 0;
        for (std::size_t i = 0; i < n; ++i) {
            const std::string name = "down_blocks." + std::to_string(i) + ".";
            const typename down_block<B, T>::config dc{.in_channels = i == 0 ? base : c.block_out_channels[i - 1],
                                                       .out_channels = c.block_out_channels[i], .num_layers = c.layers_per_block[i],
                                                       .has_cross_attention = c.down_block_types[i] == "CrossAttnDownBlock2D",
                                                       .add_downsample = i + 1 < n, .common = common(i)};
            u.down_blocks_.push_back(down_block<B, T>::bind(b.scope("down_blocks", static_cast<index_t>(i)), dc, layer, name));
        }
        for (std::size_t i = 0; i < n; ++i) {
            const std::size_t r = n - 1 - i;  // the down level this up block mirrors
            const std::string name = "up_blocks." + std::to_string(i) + ".";
            const typename up_block<B, T>::config uc{.in_channels = c.block_out_channels[r == 0 ? 0 : r - 1],
                                                     .prev_output_channels = c.block_out_channels[i == 0 ? n - 1 : r + 1],
                                                     .out_channels = c.block_out_channels[r], .num_layers = c.layers_per_block[r] + 1,
                                                     .has_cross_attention = c.up_block_types[i] == "CrossAttnUpBlock2D",
                                                     .add_upsample = i + 1 < n, .common = common(r)};
            u.up_blocks_.push_back(up_block<B, T>::bind(b.scope("up_blocks", static_cast<index_t>(i)), uc, layer, name));
        }
        const typename mid_block<B, T>::config mc{.channels = c.block_out_channels[n - 1], .num_layers = 1,
                                                  .output_scale_factor = c.mid_block_scale_factor, .common = common(n - 1)};
        u.mid_block_ = mid_block<B, T>::bind(b.scope("mid_block"), mc, layer, "mid_block.");
        u.layer_names_.resize(static_cast<std::size_t>(layer));
        u.collect_names();
        u.conv_norm_out_ = group_norm_layer<B, T>::bind(b, "conv_norm_out", base, c.norm_num_groups, c.norm_eps);
        u.conv_out_ = conv2d_layer<B, T>::bind(b, "conv_out", base, c.out_channels, 3, {.padding = 1});
        return u;
    }

    /// Binds from `source` (keys prefixed by `prefix`) and throws one io_error listing every weight problem.
    static unet_2d_condition load(context_t<B>& ctx, const weight_source& source, const config& cfg, const std::string& prefix = "") {
        weight_binder<B, T> b(ctx, source, prefix);
        auto u = bind(b, cfg);
        b.finish();
        return u;
    }

    const config& settings() const noexcept { return config_; }

    /// The weights in the shape of param_grads (tensors share storage with the model's).
    param_grads parameters() const {
        param_grads p{conv_in_, time_embedding_.parameters(), {}, mid_block_.parameters(), {}, conv_norm_out_, conv_out_};
        for (const auto& d : down_blocks_) p.down_blocks.push_back(d.parameters());
        for (const auto& u : up_blocks_) p.up_blocks.push_back(u.parameters());
        return p;
    }

    /// Calls f(key, weight, grad) for every weight of the UNet, keyed as in
    /// diffusers' state dict ("down_blocks.0.resnets.0.conv1.weight", ...);
    /// grad is undefined where `grads` (may be null) holds none.
    template <class F>
    void for_each_parameter(const param_grads* grads, F&& f) const {
        using modules::detail::entry_of;
        using modules::detail::visit_layer;
        visit_layer("conv_in", conv_in_, grads ? &grads->conv_in : nullptr, f);
        time_embedding_.for_each_parameter(grads ? &grads->time_embedding : nullptr, "time_embedding.", f);
        for (std::size_t i = 0; i < down_blocks_.size(); ++i)
            down_blocks_[i].for_each_parameter(entry_of(grads ? &grads->down_blocks : nullptr, i), "down_blocks." + std::to_string(i) + ".", f);
        for (std::size_t i = 0; i < up_blocks_.size(); ++i)
            up_blocks_[i].for_each_parameter(entry_of(grads ? &grads->up_blocks : nullptr, i), "up_blocks." + std::to_string(i) + ".", f);
        mid_block_.for_each_parameter(grads ? &grads->mid_block : nullptr, "mid_block.", f);
        visit_layer("conv_norm_out", conv_norm_out_, grads ? &grads->conv_norm_out : nullptr, f);
        visit_layer("conv_out", conv_out_, grads ? &grads->conv_out : nullptr, f);
    }

    /// diffusers attn_processors keys, indexed like attention_hooks::processors.
    const std::vector<std::string>& attention_layer_names() const noexcept { return layer_names_; }

    /// sample (B, in_channels, h, w), one timestep per batch entry, text (B, L,
    /// cross_attention_dim) -> (B, out_channels, h, w). h and w must be
    /// multiples of 2^(levels - 1).
    tensor_type forward(context_t<B>& ctx, const tensor_type& sample, std::span<const float> timesteps, const tensor_type& text,
                        const hooks_type* hooks = nullptr) const {
        check_inputs(sample, timesteps, text);
        return forward_features(ctx, sample, time_features(ctx, timesteps), text, hooks);
    }

    /// The sinusoidal features of the timesteps, (count, block_out_channels[0]),
    /// computed on the host and uploaded: forward() = forward_features(time_features()).
    tensor_type time_features(context_t<B>& ctx, std::span<const float> timesteps) const {
        const auto& c = config_;
        return timestep_features<B, T>(ctx, timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift);
    }

    /// forward() with the timesteps given as time_features(): all of its
    /// inputs are device tensors, so a recorded evaluation (step_graph) can be
    /// replayed with new timesteps.
    tensor_type forward_features(context_t<B>& ctx, const tensor_type& sample, const tensor_type& features, const tensor_type& text,
                                 const hooks_type* hooks = nullptr) const {
        const auto& c = config_;
        check<shape_error>(sample.rank() == 4, "unet", "sample ", sample.shape().str(), " is not (B, ", c.in_channels, ", h, w)");
        check<shape_error>(features.rank() == 2 && features.dim(0) == sample.dim(0) && features.dim(1) == c.block_out_channels[0], "unet",
                           "time features ", features.shape().str(), " are not (", sample.dim(0), ", ", c.block_out_channels[0], ")");
        check_inputs(sample, std::vector<float>(static_cast<std::size_t>(sample.dim(0))), text);
        const auto temb = time_embedding_.forward(ctx, features);

        auto h = conv_in_(ctx, sample);
        std::vector<tensor_type> skips{h};
        for (const auto& block : down_blocks_) h = block.forward(ctx, h, temb, text, skips, hooks);
        h = mid_block_.forward(ctx, h, temb, text, hooks);
        for (const auto& block : up_blocks_) h = block.forward(ctx, h, temb, text, skips, hooks);
        return conv_out_(ctx, ops::silu(ctx, conv_norm_out_(ctx, h)));
    }

    /// As above with the timesteps in a (B,) tensor (read back to the host).
    tensor_type forward(context_t<B>& ctx, const tensor_type& sample, const tensor_type& timesteps, const tensor_type& text,
                        const hooks_type* hooks = nullptr) const {
        check<shape_error>(timesteps.rank() <= 1, "unet", "timesteps ", timesteps.shape().str(), " must be a vector");
        const auto host = timesteps.to_host(ctx);
        std::vector<float> values(host.size());
        for (std::size_t i = 0; i < host.size(); ++i) values[i] = static_cast<float>(host[i]);
        if (values.size() == 1 && sample.rank() >= 1 && sample.dim(0) > 1) values.assign(static_cast<std::size_t>(sample.dim(0)), values[0]);
        return forward(ctx, sample, std::span<const float>(values), text, hooks);
    }

    /// forward() recorded on `tp`; returns the output variable. The model and
    /// `hooks` must outlive tp.backward(). Gradients reach `sample` and `text`
    /// (read them with tp.gradient); timesteps are not differentiated. With
    /// `grads` (which must outlive tp.backward()) the UNet's own weights are
    /// differentiated too and their gradients added into *grads; attention
    /// layers run by a processor leave their slots untouched.
    training::variable<B, T> forward_train(context_t<B>& ctx, training::tape<B, T>& tp, const training::variable<B, T>& sample,
                                           std::span<const float> timesteps, const training::variable<B, T>& text,
                                           const hooks_type* hooks = nullptr, unet_training_options options = {},
                                           param_grads* grads = nullptr) const {
        using modules::detail::layer_backward;
        using modules::detail::layer_forward;
        using variable = training::variable<B, T>;
        using pause = typename training::parameter_gradients<B, T>::pause_guard;
        const auto& c = config_;
        check_inputs(sample.value, timesteps, text.value);
        const bool trainable = grads != nullptr;
        if (grads) {
            // Sized once here: the recorded entries keep pointers into these vectors.
            grads->down_blocks.resize(down_blocks_.size());
            grads->up_blocks.resize(up_blocks_.size());
        }
        const auto features = timestep_features<B, T>(ctx, timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift);
        tensor_type temb;
        variable temb_var;  // on the tape only when the time embedding is trained
        if (trainable) {
            auto [e, s_emb] = time_embedding_.forward_train(ctx, features, true);
            temb = e;
            temb_var = tp.output(e);
            tp.record("time_embedding", [this, s_emb, temb_var, grads](context_t<B>& cx, training::tape<B, T>& t) {
                const auto g = t.take(temb_var);
                if (g.defined()) time_embedding_.backward(cx, s_emb, g, &grads->time_embedding);
            });
        } else {
            temb = time_embedding_.forward(ctx, features);  // depends on the timesteps only: a constant here
        }
        const auto add_temb = [trainable, temb_var](context_t<B>& cx, training::tape<B, T>& t, const tensor_type& g) {
            if (trainable) t.add_gradient(cx, temb_var, g);
        };
        auto* board = tp.parameters();
        const bool ckpt = options.checkpoint_blocks;

        auto [h0, s_in] = layer_forward(ctx, conv_in_, sample.value, trainable);
        variable h = tp.output(h0);
        tp.record("conv_in", [s_in, sample, h, grads](context_t<B>& cx, training::tape<B, T>& t) {
            t.add_gradient(cx, sample, layer_backward(cx, s_in, t.take(h), grads ? &grads->conv_in : nullptr));
        });
        std::vector<variable> skips{h};

        for (std::size_t bi = 0; bi < down_blocks_.size(); ++bi) {
            const auto& block = down_blocks_[bi];
            const variable in = h;
            std::vector<tensor_type> pushed;
            typename down_block<B, T>::saved saved_state;
            if (ckpt) {
                block.forward_train(ctx, in.value, temb, text.value, pushed, hooks);
            } else {
                auto r = block.forward_train(ctx, in.value, temb, text.value, pushed, hooks, trainable);
                saved_state = std::move(r.second);
            }
            auto* pg = grads ? &grads->down_blocks[bi] : nullptr;
            std::vector<variable> outs;
            for (auto& p : pushed) outs.push_back(tp.output(std::move(p)));
            skips.insert(skips.end(), outs.begin(), outs.end());
            h = outs.back();
            tp.record("down_blocks." + std::to_string(bi),
                      [&block, in, outs, text, temb, hooks, board, ckpt, pg, add_temb, s = std::move(saved_state)](context_t<B>& cx,
                                                                                                                   training::tape<B, T>& t) {
                          std::vector<tensor_type> g;
                          for (const auto& o : outs) g.push_back(t.take(o));
                          unet_block_grads<B, T> d;
                          if (ckpt) {
                              const pause guard(board);
                              std::vector<tensor_type> scratch;
                              auto r = block.forward_train(cx, in.value, temb, text.value, scratch, hooks, pg != nullptr);
                              d = block.backward(cx, r.second, g, pg);
                          } else {
                              d = block.backward(cx, s, g, pg);
                          }
                          t.add_gradient(cx, in, d.input);
                          t.add_gradient(cx, text, d.text);
                          add_temb(cx, t, d.temb);
                      });
        }

        {
            const variable in = h;
            typename mid_block<B, T>::saved saved_state;
            tensor_type y;
            if (ckpt) {
                y = mid_block_.forward_train(ctx, in.value, temb, text.value, hooks).first;
            } else {
                auto r = mid_block_.forward_train(ctx, in.value, temb, text.value, hooks, trainable);
                y = r.first;
                saved_state = std::move(r.second);
            }
            h = tp.output(y);
            auto* pg = grads ? &grads->mid_block : nullptr;
            tp.record("mid_block", [this, in, out = h, text, temb, hooks, board, ckpt, pg, add_temb, s = std::move(saved_state)](
                                       context_t<B>& cx, training::tape<B, T>& t) {
                const auto g = t.take(out);
                unet_block_grads<B, T> d;
                if (ckpt) {
                    const pause guard(board);
                    auto r = mid_block_.forward_train(cx, in.value, temb, text.value, hooks, pg != nullptr);
                    d = mid_block_.backward(cx, r.second, g, pg);
                } else {
                    d = mid_block_.backward(cx, s, g, pg);
                }
                t.add_gradient(cx, in, d.input);
                t.add_gradient(cx, text, d.text);
                add_temb(cx, t, d.temb);
            });
        }

        for (std::size_t bi = 0; bi < up_blocks_.size(); ++bi) {
            const auto& block = up_blocks_[bi];
            const variable in = h;
            const auto n = static_cast<std::size_t>(block.settings().num_layers);
            check<shape_error>(skips.size() >= n, "unet", "up block ran out of skip connections");
            // The popped skips in pop order (the stack's end first).
            std::vector<variable> popped(skips.rbegin(), skips.rbegin() + static_cast<std::ptrdiff_t>(n));
            skips.resize(skips.size() - n);
            const auto stack_of = [](const std::vector<variable>& vars) {
                std::vector<tensor_type> st;
                for (auto it = vars.rbegin(); it != vars.rend(); ++it) st.push_back(it->value);
                return st;
            };
            auto stack = stack_of(popped);
            typename up_block<B, T>::saved saved_state;
            tensor_type y;
            if (ckpt) {
                y = block.forward_train(ctx, in.value, temb, text.value, stack, hooks).first;
            } else {
                auto r = block.forward_train(ctx, in.value, temb, text.value, stack, hooks, trainable);
                y = r.first;
                saved_state = std::move(r.second);
            }
            h = tp.output(y);
            auto* pg = grads ? &grads->up_blocks[bi] : nullptr;
            tp.record("up_blocks." + std::to_string(bi), [&block, in, out = h, popped, text, temb, hooks, board, ckpt, stack_of, pg, add_temb,
                                                          s = std::move(saved_state)](context_t<B>& cx, training::tape<B, T>& t) {
                const auto g = t.take(out);
                unet_block_grads<B, T> d;
                if (ckpt) {
                    const pause guard(board);
                    auto st = stack_of(popped);
                    auto r = block.forward_train(cx, in.value, temb, text.value, st, hooks, pg != nullptr);
                    d = block.backward(cx, r.second, g, pg);
                } else {
                    d = block.backward(cx, s, g, pg);
                }
                t.add_gradient(cx, in, d.input);
                t.add_gradient(cx, text, d.text);
                add_temb(cx, t, d.temb);
                for (std::size_t k = 0; k < popped.size(); ++k) t.add_gradient(cx, popped[k], d.skips[k]);
            });
        }

        auto [n_out, s_norm] = layer_forward(ctx, conv_norm_out_, h.value, trainable);
        auto [a_out, s_act] = ops::unary_forward(ctx, unary_op::silu, n_out);
        auto [y, s_conv] = layer_forward(ctx, conv_out_, a_out, trainable);
        auto out = tp.output(y);
        tp.record("conv_out", [in = h, out, s_norm, s_act, s_conv, grads](context_t<B>& cx, training::tape<B, T>& t) {
            const auto d_act = layer_backward(cx, s_conv, t.take(out), grads ? &grads->conv_out : nullptr);
            t.add_gradient(cx, in, layer_backward(cx, s_norm, ops::unary_backward(cx, s_act, d_act), grads ? &grads->conv_norm_out : nullptr));
        });
        return out;
    }

private:
    void check_inputs(const tensor_type& sample, std::span<const float> timesteps, const tensor_type& text) const {
        const auto& c = config_;
        check<shape_error>(sample.rank() == 4 && sample.dim(1) == c.in_channels, "unet", "sample ", sample.shape().str(), " is not (B, ",
                           c.in_channels, ", h, w)");
        const index_t batch = sample.dim(0);
        check<shape_error>(static_cast<index_t>(timesteps.size()) == batch, "unet", timesteps.size(), " timesteps for a batch of ", batch);
        check<shape_error>(text.rank() == 3 && text.dim(0) == batch && text.dim(2) == c.cross_attention_dim, "unet",
                           "encoder_hidden_states ", text.shape().str(), " is not (", batch, ", L, ", c.cross_attention_dim, ")");
        const index_t factor = index_t{1} << (c.block_out_channels.size() - 1);
        check<shape_error>(sample.dim(2) % factor == 0 && sample.dim(3) % factor == 0, "unet", "sample size ", sample.dim(2), "x",
                           sample.dim(3), " is not a multiple of ", factor);
    }

    void collect_names() {
        const auto add = [this](const transformer_2d<B, T>& t) {
            for (const auto& block : t.weights().transformer_blocks) {
                const auto& ids = block.layers();
                layer_names_.at(static_cast<std::size_t>(ids.attn1)) = ids.attn1_name;
                layer_names_.at(static_cast<std::size_t>(ids.attn2)) = ids.attn2_name;
            }
        };
        for (const auto& d : down_blocks_)
            for (const auto& t : d.transformers()) add(t);
        for (const auto& u : up_blocks_)
            for (const auto& t : u.transformers()) add(t);
        for (const auto& t : mid_block_.transformers()) add(t);
    }

    config config_{};
    conv2d_layer<B, T> conv_in_{}, conv_out_{};
    timestep_embedding<B, T> time_embedding_{};
    std::vector<down_block<B, T>> down_blocks_;
    mid_block<B, T> mid_block_{};
    std::vector<up_block<B, T>> up_blocks_;
    group_norm_layer<B, T> conv_norm_out_{};
    std::vector<std::string> layer_names_;
};

}  // namespace dynamicid::modules::unet
