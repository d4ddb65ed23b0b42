// dynamicid modules: ProjPlusModel, DynamicID's identity projection.
//
// Maps an ArcFace identity embedding (B, id_dim) and CLIP image features
// (B, L, clip_dim) to `num_tokens` identity tokens (B, num_tokens, cross_dim):
//
//   tokens  = LayerNorm(Linear(GELU(Linear(id))).reshape(B, num_tokens, cross))   "proj", "norm"
//   x       = proj_in(clip)                                                         perceiver_resampler
//   latents = tokens; per layer: latents += attention(x, latents); latents += ff(latents)
//   out     = norm_out(proj_out(latents));  shortcut: tokens + scale * out
//
// PerceiverAttention layer-normalises x (norm1) and the latents (norm2), takes
// queries from the latents and keys/values from concat(x, latents) along the
// sequence (one to_kv linear, split in half along features), runs multi-head
// attention with scale 1/sqrt(dim_head) and projects with to_out; its three
// linears have no bias. FeedForward is LayerNorm -> Linear -> GELU(erf) -> Linear,
// without biases.
//
// Weights are bound by the reference state-dict keys:
//
//     auto file = dynamicid::io::safetensors_file::open("proj.safetensors");
//     dynamicid::modules::identity::proj_plus_config cfg;             // SD1.5 defaults
//     auto model = dynamicid::modules::identity::proj_plus_model<dynamicid::cpu_backend>::load(ctx, file, cfg, "");
//     auto tokens = model.forward(ctx, id_embeds, clip_embeds);       // (B, 4, 768)
//
// Training: forward_train keeps what backward needs; backward returns the
// gradient of every weight (a `params` of gradients) and, when asked for with
// ops::needs::input, of the two inputs (they come from frozen encoders, so
// the default skips them). The module has no dropout or batch statistics, so
// it has no train/eval switch.
//
//     auto [tokens, saved] = model.forward_train(ctx, id_embeds, clip_embeds);
//     auto g = model.backward(ctx, saved, grad_tokens);    // g.weights.proj_0.weight, g.weights.layers[0].attention.to_q, ...
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/detail/backprop.hpp>
#include <dynamicid/ops.hpp>

#include <cmath>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace dynamicid::modules::identity {

/// Hyper-parameters of ProjPlusModel; the defaults are the released SD1.5 ones.
/// The first linear's width (id_embeddings_dim * 2 in the release) is read
/// from the weights.
struct proj_plus_config {
    index_t cross_attention_dim = 768;
    index_t id_embeddings_dim = 512;
    index_t clip_embeddings_dim = 1280;
    index_t num_tokens = 4;
    index_t depth = 4;
    index_t dim_head = 64;
    index_t heads = 12;
    index_t ff_mult = 4;
    double layer_norm_eps = 1e-5;
};

template <class B, class T = float>
    requires computes_in<B, T>
class proj_plus_model {
public:
    using config = proj_plus_config;
    using tensor_type = tensor<B, T>;

    /// A linear layer; `bias` is undefined for bias-free layers.
    struct linear_params {
        tensor_type weight, bias;
    };
    struct norm_params {
        tensor_type weight, bias;
    };
    /// perceiver_resampler.layers.<i>.0
    struct attention_params {
        norm_params norm1, norm2;
        tensor_type to_q, to_kv, to_out;
    };
    /// perceiver_resampler.layers.<i>.1: .0 LayerNorm, .1 Linear up, .3 Linear down.
    struct feed_forward_params {
        norm_params norm;
        tensor_type up, down;
    };
    struct layer_params {
        attention_params attention;
        feed_forward_params feed_forward;
    };
    struct params {
        linear_params proj_0, proj_2;  ///< proj.0, proj.2
        norm_params norm;              ///< norm
        linear_params proj_in, proj_out;
        norm_params norm_out;
        std::vector<layer_params> layers;  ///< depth entries
    };

    /// Validates every weight's shape against `cfg` (shape_error on mismatch).
    proj_plus_model(config cfg, params weights) : config_(cfg), params_(std::move(weights)) { validate(); }

    /// Reads the weights stored under `prefix` + the reference key names
    /// (e.g. prefix "param." for golden files, "" for a bare state dict).
    static params load_params(context_t<B>& ctx, const io::safetensors_file& file, const config& cfg, std::string_view prefix = "") {
        const std::string p(prefix);
        const auto get = [&](const std::string& key) {
            check<io_error>(file.contains(p + key), "proj_plus", file.source(), ": missing weight '", p + key, "'");
            return file.template load<B, T>(ctx, p + key);
        };
        const auto norm = [&](const std::string& key) { return norm_params{get(key + ".weight"), get(key + ".bias")}; };
        const auto linear = [&](const std::string& key) { return linear_params{get(key + ".weight"), get(key + ".bias")}; };
        params w;
        w.proj_0 = linear("proj.0");
        w.proj_2 = linear("proj.2");
        w.norm = norm("norm");
        const std::string r = "perceiver_resampler.";
        w.proj_in = linear(r + "proj_in");
        w.proj_out = linear(r + "proj_out");
        w.norm_out = norm(r + "norm_out");
        check<value_error>(cfg.depth >= 0, "proj_plus", "negative depth ", cfg.depth);
        for (index_t i = 0; i < cfg.depth; ++i) {
            const std::string l = r + "layers." + std::to_string(i) + ".";
            layer_params layer;
            layer.attention = attention_params{norm(l + "0.norm1"), norm(l + "0.norm2"), get(l + "0.to_q.weight"),
                                               get(l + "0.to_kv.weight"), get(l + "0.to_out.weight")};
            layer.feed_forward = feed_forward_params{norm(l + "1.0"), get(l + "1.1.weight"), get(l + "1.3.weight")};
            w.layers.push_back(std::move(layer));
        }
        return w;
    }

    static proj_plus_model load(context_t<B>& ctx, const io::safetensors_file& file, const config& cfg, std::string_view prefix = "") {
        return proj_plus_model(cfg, load_params(ctx, file, cfg, prefix));
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }

    /// id_embeds (B, id_dim), clip_embeds (B, L, clip_dim) -> (B, num_tokens, cross_dim).
    /// With `shortcut`, returns tokens + scale * resampler output.
    tensor_type forward(context_t<B>& ctx, const tensor_type& id_embeds, const tensor_type& clip_embeds, bool shortcut = false,
                        double scale = 1.0) const {
        const auto& c = config_;
        check_inputs(id_embeds, clip_embeds);
        const index_t batch = id_embeds.dim(0);

        // proj: Linear -> GELU -> Linear, reshape into tokens, LayerNorm.
        auto h = ops::gelu(ctx, linear(ctx, id_embeds, params_.proj_0));
        auto tokens = linear(ctx, h, params_.proj_2).reshape({batch, c.num_tokens, c.cross_attention_dim});
        tokens = layer_norm(ctx, tokens, params_.norm);

        // perceiver_resampler
        const auto x = linear(ctx, clip_embeds, params_.proj_in);
        auto latents = tokens;
        for (const auto& layer : params_.layers) {
            latents = ops::add(ctx, latents, attention(ctx, layer.attention, x, latents));
            latents = ops::add(ctx, latents, feed_forward(ctx, layer.feed_forward, latents));
        }
        auto out = layer_norm(ctx, linear(ctx, latents, params_.proj_out), params_.norm_out);
        if (shortcut) out = ops::add_scaled(ctx, scale, out, 1.0, tokens);
        return out;
    }

    /// One resampler layer's saved state.
    struct layer_saved {
        modules::detail::perceiver_saved<B, T> attention;
        modules::detail::feed_forward_saved<B, T> feed_forward;
    };
    /// What backward needs from forward_train.
    struct saved_state {
        ops::linear_saved<B, T> proj_0, proj_2, proj_in, proj_out;
        ops::unary_saved<B, T> act;
        ops::norm_saved<B, T> norm, norm_out;
        std::vector<layer_saved> layers;
        shape clip_shape;
        ops::needs need;
        bool shortcut = false;
        double scale = 1.0;
    };
    /// Gradients: `weights` mirrors params (undefined when params were not
    /// asked for); the input gradients are defined when inputs were.
    struct grads {
        params weights;
        tensor_type id_embeds, clip_embeds;
    };

    /// forward() keeping what backward needs. `need.input`: gradients for
    /// id_embeds and clip_embeds; `need.params`: for the weights (false for a
    /// frozen projection).
    std::pair<tensor_type, saved_state> forward_train(context_t<B>& ctx, const tensor_type& id_embeds, const tensor_type& clip_embeds,
                                                      ops::needs need = {.input = false, .params = true}, bool shortcut = false,
                                                      double scale = 1.0) const {
        using namespace modules::detail;
        const auto& c = config_;
        check_inputs(id_embeds, clip_embeds);
        const index_t batch = id_embeds.dim(0);
        const bool p = need.params;
        const ops::needs first{.input = need.input, .params = p};
        saved_state s;
        s.need = need;
        s.shortcut = shortcut;
        s.scale = scale;
        s.clip_shape = clip_embeds.shape();
        const auto& w = params_;
        tensor_type h, tokens, x, out;
        std::tie(h, s.proj_0) = ops::linear_forward(ctx, id_embeds, w.proj_0.weight, ptr_if(w.proj_0.bias), first);
        std::tie(h, s.act) = ops::unary_forward(ctx, unary_op::gelu_erf, h);
        std::tie(h, s.proj_2) = ops::linear_forward(ctx, h, w.proj_2.weight, ptr_if(w.proj_2.bias), with_params(p));
        std::tie(tokens, s.norm) = ops::layer_norm_forward(ctx, h.reshape({batch, c.num_tokens, c.cross_attention_dim}),
                                                           ptr_if(w.norm.weight), ptr_if(w.norm.bias), c.layer_norm_eps);
        std::tie(x, s.proj_in) = ops::linear_forward(ctx, clip_embeds, w.proj_in.weight, ptr_if(w.proj_in.bias), first);
        auto latents = tokens;
        for (const auto& layer : w.layers) {
            const auto& a = layer.attention;
            const auto& f = layer.feed_forward;
            layer_saved ls;
            tensor_type y;
            std::tie(y, ls.attention) = perceiver_forward<B, T>(ctx, {a.norm1.weight, a.norm1.bias, c.layer_norm_eps},
                                                                {a.norm2.weight, a.norm2.bias, c.layer_norm_eps}, a.to_q, a.to_kv,
                                                                a.to_out, x, latents, c.heads, c.dim_head, p);
            latents = ops::add(ctx, latents, y);
            std::tie(y, ls.feed_forward) = feed_forward_forward(ctx, latents, f.norm.weight, f.norm.bias, c.layer_norm_eps, f.up, f.down, p);
            latents = ops::add(ctx, latents, y);
            s.layers.push_back(std::move(ls));
        }
        std::tie(out, s.proj_out) = ops::linear_forward(ctx, latents, w.proj_out.weight, ptr_if(w.proj_out.bias), with_params(p));
        std::tie(out, s.norm_out) = ops::layer_norm_forward(ctx, out, ptr_if(w.norm_out.weight), ptr_if(w.norm_out.bias), c.layer_norm_eps);
        if (shortcut) out = ops::add_scaled(ctx, scale, out, 1.0, tokens);
        return {out, std::move(s)};
    }

    /// Gradients of sum(output * grad_output) for the state of one forward_train.
    grads backward(context_t<B>& ctx, const saved_state& s, const tensor_type& grad_output) const {
        using namespace modules::detail;
        const auto& c = config_;
        check<shape_error>(grad_output.rank() == 3 && grad_output.dim(1) == c.num_tokens && grad_output.dim(2) == c.cross_attention_dim &&
                               s.layers.size() == params_.layers.size(),
                           "proj_plus", "grad_output ", grad_output.shape().str(), " does not fit the saved forward");
        const index_t batch = grad_output.dim(0);
        const bool p = s.need.params;
        grads g;
        auto& gw = g.weights;
        gw.layers.resize(s.layers.size());
        const auto d_out = s.shortcut ? ops::scale(ctx, grad_output, s.scale) : grad_output;
        auto n = ops::layer_norm_backward(ctx, s.norm_out, d_out, with_params(p));
        gw.norm_out = {n.gamma, n.beta};
        auto po = ops::linear_backward(ctx, s.proj_out, n.input);
        gw.proj_out = {po.weight, po.bias};
        tensor_type d_lat = po.input, d_x;
        for (std::size_t i = s.layers.size(); i-- > 0;) {
            auto f = feed_forward_backward(ctx, s.layers[i].feed_forward, d_lat, p);
            d_lat = ops::add(ctx, d_lat, f.input);
            auto a = perceiver_backward(ctx, s.layers[i].attention, d_lat, p);
            d_lat = ops::add(ctx, d_lat, a.queries);
            d_x = add_grad(ctx, d_x, a.context);
            gw.layers[i].feed_forward = {{f.norm_weight, f.norm_bias}, f.up, f.down};
            gw.layers[i].attention = {{a.norm1_weight, a.norm1_bias}, {a.norm2_weight, a.norm2_bias}, a.to_q, a.to_kv, a.to_out};
        }
        if (s.shortcut) d_lat = ops::add(ctx, d_lat, grad_output);
        auto nt = ops::layer_norm_backward(ctx, s.norm, d_lat, with_params(p));
        gw.norm = {nt.gamma, nt.beta};
        auto p2 = ops::linear_backward(ctx, s.proj_2, nt.input.reshape({batch, c.num_tokens * c.cross_attention_dim}));
        gw.proj_2 = {p2.weight, p2.bias};
        auto p0 = ops::linear_backward(ctx, s.proj_0, ops::unary_backward(ctx, s.act, p2.input));
        gw.proj_0 = {p0.weight, p0.bias};
        g.id_embeds = p0.input;
        // Without resampler layers the image features do not reach the output.
        if (!d_x.defined()) d_x = tensor_type::zeros(ctx, {batch, s.clip_shape[1], c.cross_attention_dim});
        auto pin = ops::linear_backward(ctx, s.proj_in, d_x);
        gw.proj_in = {pin.weight, pin.bias};
        g.clip_embeds = pin.input;
        return g;
    }

private:
    void check_inputs(const tensor_type& id_embeds, const tensor_type& clip_embeds) const {
        const auto& c = config_;
        check<shape_error>(id_embeds.rank() == 2 && id_embeds.dim(1) == c.id_embeddings_dim, "proj_plus", "id_embeds ",
                           id_embeds.shape().str(), " is not (B, ", c.id_embeddings_dim, ")");
        const index_t batch = id_embeds.dim(0);
        check<shape_error>(clip_embeds.rank() == 3 && clip_embeds.dim(0) == batch && clip_embeds.dim(2) == c.clip_embeddings_dim,
                           "proj_plus", "clip_embeds ", clip_embeds.shape().str(), " is not (", batch, ", L, ",
                           c.clip_embeddings_dim, ")");
    }

    tensor_type linear(context_t<B>& ctx, const tensor_type& x, const linear_params& l) const {
        return ops::linear(ctx, x, l.weight, l.bias.defined() ? &l.bias : nullptr);
    }
    tensor_type layer_norm(context_t<B>& ctx, const tensor_type& x, const norm_params& n) const {
        return ops::layer_norm(ctx, x, &n.weight, &n.bias, config_.layer_norm_eps);
    }

    /// (B, n, heads * dim_head) -> (B * heads, n, dim_head)
    tensor_type split_heads(context_t<B>& ctx, const tensor_type& t) const {
        const index_t batch = t.dim(0), n = t.dim(1);
        return ops::permute(ctx, t.reshape({batch, n, config_.heads, config_.dim_head}), {0, 2, 1, 3})
            .reshape({batch * config_.heads, n, config_.dim_head});
    }

    tensor_type attention(context_t<B>& ctx, const attention_params& a, const tensor_type& x, const tensor_type& latents) const {
        const index_t batch = latents.dim(0), n_latents = latents.dim(1);
        const index_t inner = config_.heads * config_.dim_head;
        const auto xn = layer_norm(ctx, x, a.norm1);
        const auto ln = layer_norm(ctx, latents, a.norm2);
        const auto q = ops::linear(ctx, ln, a.to_q);
        const auto kv = ops::linear(ctx, ops::concat(ctx, std::vector<tensor_type>{xn, ln}, 1), a.to_kv);
        const auto k = ops::slice(ctx, kv, -1, 0, inner);
        const auto v = ops::slice(ctx, kv, -1, inner, inner);
        // q and k each scaled by dim_head^-1/4 in the reference: together 1/sqrt(dim_head).
        const double scale = 1.0 / std::sqrt(static_cast<double>(config_.dim_head));
        auto o = ops::attention(ctx, split_heads(ctx, q), split_heads(ctx, k), split_heads(ctx, v), scale);
        o = ops::permute(ctx, o.reshape({batch, config_.heads, n_latents, config_.dim_head}), {0, 2, 1, 3})
                .reshape({batch, n_latents, inner});
        return ops::linear(ctx, o, a.to_out);
    }

    tensor_type feed_forward(context_t<B>& ctx, const feed_forward_params& f, const tensor_type& latents) const {
        auto h = ops::gelu(ctx, ops::linear(ctx, layer_norm(ctx, latents, f.norm), f.up));
        return ops::linear(ctx, h, f.down);
    }

    static void expect(const tensor_type& t, const shape& s, const std::string& what) {
        check<shape_error>(t.defined(), "proj_plus", "weight ", what, " is missing");
        check<shape_error>(t.shape() == s, "proj_plus", "weight ", what, " has shape ", t.shape().str(), ", expected ", s.str());
    }

    void validate() const {
        const auto& c = config_;
        check<value_error>(c.cross_attention_dim > 0 && c.id_embeddings_dim > 0 && c.clip_embeddings_dim > 0 && c.num_tokens > 0 &&
                               c.depth >= 0 && c.dim_head > 0 && c.heads > 0 && c.ff_mult > 0,
                           "proj_plus", "every size in the config must be positive");
        const index_t dim = c.cross_attention_dim, inner = c.heads * c.dim_head;
        const auto& w = params_;
        check<shape_error>(w.proj_0.weight.defined() && w.proj_0.weight.rank() == 2, "proj_plus", "weight proj.0.weight is missing");
        const index_t hidden = w.proj_0.weight.dim(0);
        expect(w.proj_0.weight, {hidden, c.id_embeddings_dim}, "proj.0.weight");
        expect(w.proj_0.bias, {hidden}, "proj.0.bias");
        expect(w.proj_2.weight, {dim * c.num_tokens, hidden}, "proj.2.weight");
        expect(w.proj_2.bias, {dim * c.num_tokens}, "proj.2.bias");
        expect(w.norm.weight, {dim}, "norm.weight");
        expect(w.norm.bias, {dim}, "norm.bias");
        expect(w.proj_in.weight, {dim, c.clip_embeddings_dim}, "perceiver_resampler.proj_in.weight");
        expect(w.proj_in.bias, {dim}, "perceiver_resampler.proj_in.bias");
        expect(w.proj_out.weight, {dim, dim}, "perceiver_resampler.proj_out.weight");
        expect(w.proj_out.bias, {dim}, "perceiver_resampler.proj_out.bias");
        expect(w.norm_out.weight, {dim}, "perceiver_resampler.norm_out.weight");
        expect(w.norm_out.bias, {dim}, "perceiver_resampler.norm_out.bias");
        check<shape_error>(static_cast<index_t>(w.layers.size()) == c.depth, "proj_plus", w.layers.size(), " layers for depth ",
                           c.depth);
        for (std::size_t i = 0; i < w.layers.size(); ++i) {
            const std::string l = "perceiver_resampler.layers." + std::to_string(i) + ".";
            const auto& a = w.layers[i].attention;
            const auto& f = w.layers[i].feed_forward;
            expect(a.norm1.weight, {dim}, l + "0.norm1.weight");
            expect(a.norm1.bias, {dim}, l + "0.norm1.bias");
            expect(a.norm2.weight, {dim}, l + "0.norm2.weight");
            expect(a.norm2.bias, {dim}, l + "0.norm2.bias");
            expect(a.to_q, {inner, dim}, l + "0.to_q.weight");
            expect(a.to_kv, {2 * inner, dim}, l + "0.to_kv.weight");
            expect(a.to_out, {dim, inner}, l + "0.to_out.weight");
            expect(f.norm.weight, {dim}, l + "1.0.weight");
            expect(f.norm.bias, {dim}, l + "1.0.bias");
            expect(f.up, {dim * c.ff_mult, dim}, l + "1.1.weight");
            expect(f.down, {dim, dim * c.ff_mult}, l + "1.3.weight");
        }
    }

    config config_;
    params params_;
};

}  // namespace dynamicid::modules::identity
