// dynamicid modules: the UNet's down, mid and up blocks and its resamplers,
// as diffusers builds them for SD1.x.
//
//   Downsample2D              conv 3x3, stride 2, padding 1          ("downsamplers.0.conv")
//   Upsample2D                nearest x2, then conv 3x3, padding 1   ("upsamplers.0.conv")
//   CrossAttnDownBlock2D      (resnet, transformer) x num_layers, then Downsample2D
//   DownBlock2D               resnet x num_layers, then Downsample2D
//   UNetMidBlock2DCrossAttn   resnet, then (transformer, resnet) x num_layers
//   CrossAttnUpBlock2D        (concat skip, resnet, transformer) x num_layers, then Upsample2D
//   UpBlock2D                 (concat skip, resnet) x num_layers, then Upsample2D
//
// Down blocks push every resnet/transformer output and the downsampled result
// onto the skip stack; up blocks pop from its end (diffusers'
// down_block_res_samples). A down/up block "has_cross_attention" when it is
// the CrossAttn variant.
//
//     auto down = dynamicid::modules::unet::down_block<B>::bind(bind.scope("down_blocks", 0), {.in_channels = 320, ...});
//     std::vector<tensor<B, float>> skips{h};
//     h = down.forward(ctx, h, temb, text, skips);
//
// Training (frozen weights): forward_train returns the output with the typed
// saved state; backward returns the input gradients. A down block's
// backward takes one gradient per tensor it pushed onto the skip stack (the
// last push is also its output); an up block's returns one per skip it popped.
//
//     auto [h2, saved] = down.forward_train(ctx, h, temb, text, skips);
//     auto g = down.backward(ctx, saved, grads_of_pushed);   // g.input, g.temb, g.text
//
// Training the blocks' own weights too: forward_train(..., trainable = true)
// and backward(..., &pg) with a params-shaped `param_grads` (gradients add
// into it); for_each_parameter pairs each weight with its gradient by name.
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/blocks/resnet_block.hpp>
#include <dynamicid/modules/detail/frozen.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/unet/transformer_2d.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <string>
#include <utility>
#include <vector>

namespace dynamicid::modules::unet {

/// What every UNet block shares: GroupNorm settings, time embedding width,
/// and the transformers' settings for cross-attention blocks.
struct unet_block_common {
    index_t temb_channels = 1280;
    index_t resnet_groups = 32;
    double resnet_eps = 1e-5;
    index_t num_attention_heads = 8;      ///< heads of this block's transformers (dim_head = channels / heads)
    index_t cross_attention_dim = 768;
    index_t transformer_layers = 1;       ///< BasicTransformerBlocks per Transformer2DModel
    bool use_linear_projection = false;
};

namespace detail {

template <class B, class T>
blocks::resnet_block<B, T> bind_resnet(weight_binder<B, T> b, const unet_block_common& c, index_t in, index_t out,
                                       double output_scale_factor = 1.0) {
    return blocks::resnet_block<B, T>::bind(b, {.in_channels = in, .out_channels = out, .temb_channels = c.temb_channels,
                                                .groups = c.resnet_groups, .eps = c.resnet_eps, .output_scale_factor = output_scale_factor});
}

/// Binds attentions.<i> of a block; `layer` counts processor indices across the UNet.
template <class B, class T>
transformer_2d<B, T> bind_transformer(weight_binder<B, T> b, const unet_block_common& c, index_t channels, index_t i, index_t& layer,
                                      const std::string& block_name) {
    check<value_error>(c.num_attention_heads > 0 && channels % c.num_attention_heads == 0, "unet", block_name, ": ", channels,
                       " channels are not divisible into ", c.num_attention_heads, " heads");
    const typename transformer_2d<B, T>::config tc{.num_attention_heads = c.num_attention_heads,
                                                   .attention_head_dim = channels / c.num_attention_heads,
                                                   .in_channels = channels, .num_layers = c.transformer_layers,
                                                   .cross_attention_dim = c.cross_attention_dim, .norm_num_groups = c.resnet_groups,
                                                   .use_linear_projection = c.use_linear_projection};
    auto t = transformer_2d<B, T>::bind(b.scope("attentions", i), tc, layer, block_name + "attentions." + std::to_string(i) + ".");
    layer += t.attention_layer_count();
    return t;
}

}  // namespace detail

/// Input gradients of a UNet block: its hidden input, the time embedding and the text.
template <class B, class T>
struct unet_block_grads {
    tensor<B, T> input, temb, text;
    std::vector<tensor<B, T>> skips;  ///< up blocks: one per popped skip, in pop order
};

/// diffusers Downsample2D with use_conv (padding 1): a 3x3 stride-2 convolution.
template <class B, class T = float>
    requires computes_in<B, T>
struct downsample_2d {
    conv2d_layer<B, T> conv;

    static downsample_2d bind(weight_binder<B, T> b, index_t channels) {
        return {conv2d_layer<B, T>::bind(b, "conv", channels, channels, 3, {.stride = 2, .padding = 1})};
    }
    tensor<B, T> forward(context_t<B>& ctx, const tensor<B, T>& x) const { return conv(ctx, x); }

    /// Gradient of the convolution's weights.
    struct param_grads {
        conv2d_layer<B, T> conv;
    };
    param_grads parameters() const { return {conv}; }
    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        modules::detail::visit_layer(prefix + "conv", conv, grads ? &grads->conv : nullptr, f);
    }

    using saved = ops::conv2d_saved<B, T>;
    std::pair<tensor<B, T>, saved> forward_train(context_t<B>& ctx, const tensor<B, T>& x, bool trainable = false) const {
        return modules::detail::layer_forward(ctx, conv, x, trainable);
    }
    tensor<B, T> backward(context_t<B>& ctx, const saved& s, const tensor<B, T>& grad_output, param_grads* pg = nullptr) const {
        return modules::detail::layer_backward(ctx, s, grad_output, pg ? &pg->conv : nullptr);
    }
};

/// diffusers Upsample2D with use_conv: nearest-neighbour x2, then a 3x3 convolution.
template <class B, class T = float>
    requires computes_in<B, T>
struct upsample_2d {
    conv2d_layer<B, T> conv;

    static upsample_2d bind(weight_binder<B, T> b, index_t channels) {
        return {conv2d_layer<B, T>::bind(b, "conv", channels, channels, 3, {.padding = 1})};
    }
    tensor<B, T> forward(context_t<B>& ctx, const tensor<B, T>& x) const { return conv(ctx, ops::upsample_nearest(ctx, x, 2)); }

    /// Gradient of the convolution's weights.
    struct param_grads {
        conv2d_layer<B, T> conv;
    };
    param_grads parameters() const { return {conv}; }
    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        modules::detail::visit_layer(prefix + "conv", conv, grads ? &grads->conv : nullptr, f);
    }

    struct saved {
        ops::upsample_saved<B, T> upsample;
        ops::conv2d_saved<B, T> conv;
    };
    std::pair<tensor<B, T>, saved> forward_train(context_t<B>& ctx, const tensor<B, T>& x, bool trainable = false) const {
        auto [u, su] = ops::upsample_nearest_forward(ctx, x, 2);
        auto [y, sc] = modules::detail::layer_forward(ctx, conv, u, trainable);
        return {y, saved{su, std::move(sc)}};
    }
    tensor<B, T> backward(context_t<B>& ctx, const saved& s, const tensor<B, T>& grad_output, param_grads* pg = nullptr) const {
        return ops::upsample_nearest_backward(ctx, s.upsample,
                                              modules::detail::layer_backward(ctx, s.conv, grad_output, pg ? &pg->conv : nullptr));
    }
};

/// CrossAttnDownBlock2D (has_cross_attention) or DownBlock2D.
template <class B, class T = float>
    requires computes_in<B, T>
class down_block {
public:
    struct config {
        index_t in_channels = 320, out_channels = 320, num_layers = 2;
        bool has_cross_attention = true;
        bool add_downsample = true;
        unet_block_common common{};
    };
    using tensor_type = tensor<B, T>;

    down_block() = default;

    /// `layer` is the next free processor index; advanced past this block's attention layers.
    static down_block bind(weight_binder<B, T> b, const config& c, index_t& layer, const std::string& name) {
        down_block d;
        d.config_ = c;
        for (index_t i = 0; i < c.num_layers; ++i) {
            d.resnets_.push_back(detail::bind_resnet(b.scope("resnets", i), c.common, i == 0 ? c.in_channels : c.out_channels, c.out_channels));
            if (c.has_cross_attention) d.attentions_.push_back(detail::bind_transformer(b, c.common, c.out_channels, i, layer, name));
        }
        if (c.add_downsample) d.downsampler_ = downsample_2d<B, T>::bind(b.scope("downsamplers.0"), c.out_channels);
        return d;
    }

    const config& settings() const noexcept { return config_; }
    const std::vector<transformer_2d<B, T>>& transformers() const noexcept { return attentions_; }

    /// Gradients of the weights, shaped like the block's modules (diffusers'
    /// resnets.<i>, attentions.<i>, downsamplers.0).
    struct param_grads {
        std::vector<typename blocks::resnet_block<B, T>::param_grads> resnets;
        std::vector<typename transformer_2d<B, T>::param_grads> attentions;
        typename downsample_2d<B, T>::param_grads downsampler;
    };
    /// The weights in the shape of param_grads (tensors share storage with the block's).
    param_grads parameters() const {
        param_grads p;
        for (const auto& r : resnets_) p.resnets.push_back(r.parameters());
        for (const auto& a : attentions_) p.attentions.push_back(a.parameters());
        if (config_.add_downsample) p.downsampler = downsampler_.parameters();
        return p;
    }
    /// f(name, weight, grad) for every weight, named by diffusers' keys below `prefix`.
    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        using modules::detail::entry_of;
        for (std::size_t i = 0; i < resnets_.size(); ++i) {
            resnets_[i].for_each_parameter(entry_of(grads ? &grads->resnets : nullptr, i), prefix + "resnets." + std::to_string(i) + ".", f);
            if (config_.has_cross_attention)
                attentions_[i].for_each_parameter(entry_of(grads ? &grads->attentions : nullptr, i),
                                                  prefix + "attentions." + std::to_string(i) + ".", f);
        }
        if (config_.add_downsample) downsampler_.for_each_parameter(grads ? &grads->downsampler : nullptr, prefix + "downsamplers.0.", f);
    }

    /// Appends this block's outputs to `skips` (diffusers' res_samples) and returns the last.
    tensor_type forward(context_t<B>& ctx, tensor_type h, const tensor_type& temb, const tensor_type& text, std::vector<tensor_type>& skips,
                        const attention_hooks<B, T>* hooks = nullptr) const {
        for (std::size_t i = 0; i < resnets_.size(); ++i) {
            h = resnets_[i].forward(ctx, h, &temb);
            if (config_.has_cross_attention) h = attentions_[i].forward(ctx, h, text, hooks);
            skips.push_back(h);
        }
        if (config_.add_downsample) {
            h = downsampler_.forward(ctx, h);
            skips.push_back(h);
        }
        return h;
    }

    struct saved {
        std::vector<typename blocks::resnet_block<B, T>::saved> resnets;
        std::vector<typename transformer_2d<B, T>::saved> attentions;
        typename downsample_2d<B, T>::saved downsampler;
        std::vector<shape> pushed;  ///< shapes of the pushed outputs
    };

    /// forward() keeping what backward() needs; with `trainable` also what the weight gradients need.
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, tensor_type h, const tensor_type& temb, const tensor_type& text,
                                                std::vector<tensor_type>& skips, const attention_hooks<B, T>* hooks = nullptr,
                                                bool trainable = false) const {
        saved s;
        for (std::size_t i = 0; i < resnets_.size(); ++i) {
            auto [r, sr] = resnets_[i].forward_train(ctx, h, &temb, trainable);
            h = r;
            s.resnets.push_back(std::move(sr));
            if (config_.has_cross_attention) {
                auto [t, st] = attentions_[i].forward_train(ctx, h, text, hooks, trainable);
                h = t;
                s.attentions.push_back(std::move(st));
            }
            skips.push_back(h);
            s.pushed.push_back(h.shape());
        }
        if (config_.add_downsample) {
            auto [d, sd] = downsampler_.forward_train(ctx, h, trainable);
            h = d;
            s.downsampler = std::move(sd);
            skips.push_back(h);
            s.pushed.push_back(h.shape());
        }
        return {h, std::move(s)};
    }

    /// `grad_pushed[j]`: gradient of the j-th tensor this block pushed
    /// (undefined: zero); the last one includes the output's gradient. Weight
    /// gradients are added into *pg when it is not null and the forward was trainable.
    unet_block_grads<B, T> backward(context_t<B>& ctx, const saved& s, const std::vector<tensor_type>& grad_pushed,
                                    param_grads* pg = nullptr) const {
        using modules::detail::add_grads;
        using modules::detail::slot_of;
        check<shape_error>(grad_pushed.size() == s.pushed.size(), "unet", "down block backward got ", grad_pushed.size(),
                           " gradients for ", s.pushed.size(), " outputs");
        std::size_t j = grad_pushed.size();
        tensor_type d;
        if (config_.add_downsample) {
            --j;
            d = downsampler_.backward(ctx, s.downsampler, modules::detail::grad_or_zeros(ctx, grad_pushed[j], s.pushed[j]),
                                      pg ? &pg->downsampler : nullptr);
        }
        unet_block_grads<B, T> out;
        for (std::size_t i = resnets_.size(); i-- > 0;) {
            --j;
            d = modules::detail::grad_or_zeros(ctx, add_grads(ctx, d, grad_pushed[j]), s.pushed[j]);
            if (config_.has_cross_attention) {
                auto g = attentions_[i].backward(ctx, s.attentions[i], d, slot_of(pg ? &pg->attentions : nullptr, i, attentions_.size()));
                d = g.input;
                out.text = add_grads(ctx, out.text, g.text);
            }
            auto g = resnets_[i].backward(ctx, s.resnets[i], d, slot_of(pg ? &pg->resnets : nullptr, i, resnets_.size()));
            d = g.input;
            out.temb = add_grads(ctx, out.temb, g.temb);
        }
        out.input = d;
        return out;
    }

private:
    config config_{};
    std::vector<blocks::resnet_block<B, T>> resnets_;
    std::vector<transformer_2d<B, T>> attentions_;
    downsample_2d<B, T> downsampler_{};
};

/// UNetMidBlock2DCrossAttn: resnets.0, then (attentions.i, resnets.i+1) for each layer.
template <class B, class T = float>
    requires computes_in<B, T>
class mid_block {
public:
    struct config {
        index_t channels = 1280, num_layers = 1;
        double output_scale_factor = 1.0;  ///< diffusers' mid_block_scale_factor
        unet_block_common common{};
    };
    using tensor_type = tensor<B, T>;

    mid_block() = default;

    static mid_block bind(weight_binder<B, T> b, const config& c, index_t& layer, const std::string& name) {
        mid_block m;
        m.config_ = c;
        m.resnets_.push_back(detail::bind_resnet(b.scope("resnets", 0), c.common, c.channels, c.channels, c.output_scale_factor));
        for (index_t i = 0; i < c.num_layers; ++i) {
            m.attentions_.push_back(detail::bind_transformer(b, c.common, c.channels, i, layer, name));
            m.resnets_.push_back(detail::bind_resnet(b.scope("resnets", i + 1), c.common, c.channels, c.channels, c.output_scale_factor));
        }
        return m;
    }

    const config& settings() const noexcept { return config_; }
    const std::vector<transformer_2d<B, T>>& transformers() const noexcept { return attentions_; }

    /// Gradients of the weights, shaped like the block's modules (resnets.<i>, attentions.<i>).
    struct param_grads {
        std::vector<typename blocks::resnet_block<B, T>::param_grads> resnets;
        std::vector<typename transformer_2d<B, T>::param_grads> attentions;
    };
    param_grads parameters() const {
        param_grads p;
        for (const auto& r : resnets_) p.resnets.push_back(r.parameters());
        for (const auto& a : attentions_) p.attentions.push_back(a.parameters());
        return p;
    }
    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        using modules::detail::entry_of;
        for (std::size_t i = 0; i < attentions_.size(); ++i)
            attentions_[i].for_each_parameter(entry_of(grads ? &grads->attentions : nullptr, i), prefix + "attentions." + std::to_string(i) + ".",
                                              f);
        for (std::size_t i = 0; i < resnets_.size(); ++i)
            resnets_[i].for_each_parameter(entry_of(grads ? &grads->resnets : nullptr, i), prefix + "resnets." + std::to_string(i) + ".", f);
    }

    tensor_type forward(context_t<B>& ctx, tensor_type h, const tensor_type& temb, const tensor_type& text,
                        const attention_hooks<B, T>* hooks = nullptr) const {
        h = resnets_[0].forward(ctx, h, &temb);
        for (std::size_t i = 0; i < attentions_.size(); ++i) {
            h = attentions_[i].forward(ctx, h, text, hooks);
            h = resnets_[i + 1].forward(ctx, h, &temb);
        }
        return h;
    }

    struct saved {
        std::vector<typename blocks::resnet_block<B, T>::saved> resnets;
        std::vector<typename transformer_2d<B, T>::saved> attentions;
    };

    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, tensor_type h, const tensor_type& temb, const tensor_type& text,
                                                const attention_hooks<B, T>* hooks = nullptr, bool trainable = false) const {
        saved s;
        auto [r0, s0] = resnets_[0].forward_train(ctx, h, &temb, trainable);
        h = r0;
        s.resnets.push_back(std::move(s0));
        for (std::size_t i = 0; i < attentions_.size(); ++i) {
            auto [t, st] = attentions_[i].forward_train(ctx, h, text, hooks, trainable);
            s.attentions.push_back(std::move(st));
            auto [r, sr] = resnets_[i + 1].forward_train(ctx, t, &temb, trainable);
            h = r;
            s.resnets.push_back(std::move(sr));
        }
        return {h, std::move(s)};
    }

    unet_block_grads<B, T> backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        using modules::detail::add_grads;
        using modules::detail::slot_of;
        unet_block_grads<B, T> out;
        auto d = grad_output;
        for (std::size_t i = attentions_.size(); i-- > 0;) {
            auto gr = resnets_[i + 1].backward(ctx, s.resnets[i + 1], d, slot_of(pg ? &pg->resnets : nullptr, i + 1, resnets_.size()));
            out.temb = add_grads(ctx, out.temb, gr.temb);
            auto gt = attentions_[i].backward(ctx, s.attentions[i], gr.input, slot_of(pg ? &pg->attentions : nullptr, i, attentions_.size()));
            out.text = add_grads(ctx, out.text, gt.text);
            d = gt.input;
        }
        auto g0 = resnets_[0].backward(ctx, s.resnets[0], d, slot_of(pg ? &pg->resnets : nullptr, 0, resnets_.size()));
        out.temb = add_grads(ctx, out.temb, g0.temb);
        out.input = g0.input;
        return out;
    }

private:
    config config_{};
    std::vector<blocks::resnet_block<B, T>> resnets_;
    std::vector<transformer_2d<B, T>> attentions_;
};

/// CrossAttnUpBlock2D (has_cross_attention) or UpBlock2D.
template <class B, class T = float>
    requires computes_in<B, T>
class up_block {
public:
    struct config {
        index_t in_channels = 320;           ///< channels of the last skip this block consumes
        index_t prev_output_channels = 640;  ///< channels arriving from the block below
        index_t out_channels = 320;
        index_t num_layers = 3;
        bool has_cross_attention = true;
        bool add_upsample = true;
        unet_block_common common{};
    };
    using tensor_type = tensor<B, T>;

    up_block() = default;

    static up_block bind(weight_binder<B, T> b, const config& c, index_t& layer, const std::string& name) {
        up_block u;
        u.config_ = c;
        for (index_t i = 0; i < c.num_layers; ++i) {
            const index_t skip = i == c.num_layers - 1 ? c.in_channels : c.out_channels;
            const index_t in = i == 0 ? c.prev_output_channels : c.out_channels;
            u.resnets_.push_back(detail::bind_resnet(b.scope("resnets", i), c.common, in + skip, c.out_channels));
            if (c.has_cross_attention) u.attentions_.push_back(detail::bind_transformer(b, c.common, c.out_channels, i, layer, name));
        }
        if (c.add_upsample) u.upsampler_ = upsample_2d<B, T>::bind(b.scope("upsamplers.0"), c.out_channels);
        return u;
    }

    const config& settings() const noexcept { return config_; }
    const std::vector<transformer_2d<B, T>>& transformers() const noexcept { return attentions_; }

    /// Gradients of the weights, shaped like the block's modules (resnets.<i>, attentions.<i>, upsamplers.0).
    struct param_grads {
        std::vector<typename blocks::resnet_block<B, T>::param_grads> resnets;
        std::vector<typename transformer_2d<B, T>::param_grads> attentions;
        typename upsample_2d<B, T>::param_grads upsampler;
    };
    param_grads parameters() const {
        param_grads p;
        for (const auto& r : resnets_) p.resnets.push_back(r.parameters());
        for (const auto& a : attentions_) p.attentions.push_back(a.parameters());
        if (config_.add_upsample) p.upsampler = upsampler_.parameters();
        return p;
    }
    template <class F>
    void for_each_parameter(const param_grads* grads, const std::string& prefix, F&& f) const {
        using modules::detail::entry_of;
        for (std::size_t i = 0; i < resnets_.size(); ++i) {
            resnets_[i].for_each_parameter(entry_of(grads ? &grads->resnets : nullptr, i), prefix + "resnets." + std::to_string(i) + ".", f);
            if (config_.has_cross_attention)
                attentions_[i].for_each_parameter(entry_of(grads ? &grads->attentions : nullptr, i),
                                                  prefix + "attentions." + std::to_string(i) + ".", f);
        }
        if (config_.add_upsample) upsampler_.for_each_parameter(grads ? &grads->upsampler : nullptr, prefix + "upsamplers.0.", f);
    }

    /// Consumes num_layers skips from the end of `skips`.
    tensor_type forward(context_t<B>& ctx, tensor_type h, const tensor_type& temb, const tensor_type& text, std::vector<tensor_type>& skips,
                        const attention_hooks<B, T>* hooks = nullptr) const {
        for (std::size_t i = 0; i < resnets_.size(); ++i) {
            check<shape_error>(!skips.empty(), "unet", "up block ran out of skip connections");
            const auto skip = std::move(skips.back());
            skips.pop_back();
            check<shape_error>(skip.dim(2) == h.dim(2) && skip.dim(3) == h.dim(3), "unet", "skip connection ", skip.shape().str(),
                               " does not match ", h.shape().str(), " (latent sizes must be multiples of 2^(levels - 1))");
            h = resnets_[i].forward(ctx, ops::concat(ctx, std::vector<tensor_type>{h, skip}, 1), &temb);
            if (config_.has_cross_attention) h = attentions_[i].forward(ctx, h, text, hooks);
        }
        if (config_.add_upsample) h = upsampler_.forward(ctx, h);
        return h;
    }

    struct saved {
        std::vector<typename blocks::resnet_block<B, T>::saved> resnets;
        std::vector<typename transformer_2d<B, T>::saved> attentions;
        typename upsample_2d<B, T>::saved upsampler;
        std::vector<std::pair<index_t, index_t>> split;  ///< channels of (h, skip) in each concatenation
    };

    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, tensor_type h, const tensor_type& temb, const tensor_type& text,
                                                std::vector<tensor_type>& skips, const attention_hooks<B, T>* hooks = nullptr,
                                                bool trainable = false) const {
        saved s;
        for (std::size_t i = 0; i < resnets_.size(); ++i) {
            check<shape_error>(!skips.empty(), "unet", "up block ran out of skip connections");
            const auto skip = std::move(skips.back());
            skips.pop_back();
            check<shape_error>(skip.dim(2) == h.dim(2) && skip.dim(3) == h.dim(3), "unet", "skip connection ", skip.shape().str(),
                               " does not match ", h.shape().str(), " (latent sizes must be multiples of 2^(levels - 1))");
            s.split.emplace_back(h.dim(1), skip.dim(1));
            auto [r, sr] = resnets_[i].forward_train(ctx, ops::concat(ctx, std::vector<tensor_type>{h, skip}, 1), &temb, trainable);
            h = r;
            s.resnets.push_back(std::move(sr));
            if (config_.has_cross_attention) {
                auto [t, st] = attentions_[i].forward_train(ctx, h, text, hooks, trainable);
                h = t;
                s.attentions.push_back(std::move(st));
            }
        }
        if (config_.add_upsample) {
            auto [u, su] = upsampler_.forward_train(ctx, h, trainable);
            h = u;
            s.upsampler = std::move(su);
        }
        return {h, std::move(s)};
    }

    /// Returns the gradients of the popped skips in `skips`, in pop order.
    unet_block_grads<B, T> backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output, param_grads* pg = nullptr) const {
        using modules::detail::add_grads;
        using modules::detail::slot_of;
        unet_block_grads<B, T> out;
        auto d = config_.add_upsample ? upsampler_.backward(ctx, s.upsampler, grad_output, pg ? &pg->upsampler : nullptr) : grad_output;
        out.skips.resize(resnets_.size());
        for (std::size_t i = resnets_.size(); i-- > 0;) {
            if (config_.has_cross_attention) {
                auto gt = attentions_[i].backward(ctx, s.attentions[i], d, slot_of(pg ? &pg->attentions : nullptr, i, attentions_.size()));
                out.text = add_grads(ctx, out.text, gt.text);
                d = gt.input;
            }
            auto gr = resnets_[i].backward(ctx, s.resnets[i], d, slot_of(pg ? &pg->resnets : nullptr, i, resnets_.size()));
            out.temb = add_grads(ctx, out.temb, gr.temb);
            const auto [ch_h, ch_skip] = s.split[i];
            out.skips[i] = ops::slice(ctx, gr.input, 1, ch_h, ch_skip);
            d = ops::slice(ctx, gr.input, 1, 0, ch_h);
        }
        out.input = d;
        return out;
    }

private:
    config config_{};
    std::vector<blocks::resnet_block<B, T>> resnets_;
    std::vector<transformer_2d<B, T>> attentions_;
    upsample_2d<B, T> upsampler_{};
};

}  // namespace dynamicid::modules::unet
