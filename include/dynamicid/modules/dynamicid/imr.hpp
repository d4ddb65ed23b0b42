// dynamicid modules: DynamicID's Identity-Motion Reconfigurator (IMR).
//
// Edits identity tokens so they follow a target motion (landmarks + face prompt):
//
//   latents = feature_fusion(concat(landmark, text))       LN -> Linear -> GELU -> LN -> Linear -> GELU,
//                                                          reshaped to num_queries latents of width dim;
//                                                          source (row 0) and targets together
//   x       = proj_in(norm_in(tokens))                     (1, n, dim)
//   disentangleNet, per layer (source latents m):
//       x += cross(x, m); x += self(x); x += ff(x)
//   x       = x repeated once per target
//   entangleNet, per layer: the same with the target latents
//   out     = proj_out(norm_out(x))                        (targets, n, embedding_dim)
//
// cross(x, m) is the resampler's PerceiverAttention with the roles swapped:
// the query comes from norm2(x); keys/values from to_kv(concat(norm1(m), norm2(x)))
// along the sequence. self(x) is LayerNorm then the same attention over x
// alone. Both use ordinary multi-head attention (scale 1/sqrt(dim_head)) with
// bias-free to_q, to_kv (split in half along features) and to_out. The
// released model.py cannot run (its reshape_tensor folds heads into the
// batch); this follows its intended multi-head form. ff: LayerNorm ->
// Linear(dim, ff_mult*dim) -> GELU(erf) -> Linear back, without biases.
// Depths are a property of the checkpoint: counted from the weights unless
// the config fixes them.
//
//     auto source = dynamicid::modules::weight_source::open({"IMR.safetensors"});
//     auto imr = dynamicid::modules::imr::imr_model<dynamicid::cpu_backend>::load(ctx, source, {});
//     auto edited = imr.forward(ctx, tokens, src_landmark, tgt_landmarks, src_text, tgt_texts);   // (T, 4, 768)
//
// Training (any depth of either half): forward_train keeps what backward
// needs; backward returns a `params` of weight gradients and, with
// ops::needs::input, the gradients of all five inputs (the landmark features
// carry the gradient on to the KeyPointEncoder). No dropout, no train/eval switch.
//
//     auto [edited, saved] = imr.forward_train(ctx, tokens, src_landmark, tgt_landmarks, src_text, tgt_texts);
//     auto g = imr.backward(ctx, saved, grad_edited);   // g.weights.entangle[0].cross.to_q.weight, g.tgt_landmark, ...
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/detail/backprop.hpp>
#include <dynamicid/modules/dynamicid/detail/heads.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace dynamicid::modules::imr {

/// Hyper-parameters; the defaults are the released inference ones.
struct imr_config {
    index_t dim = 1024;
    index_t dim_head = 64;
    index_t heads = 16;
    index_t num_queries = 4;       ///< motion latents per image
    index_t embedding_dim = 768;   ///< identity token and landmark feature width
    index_t txt_dim = 768;         ///< face prompt embedding width
    index_t ff_mult = 4;
    std::optional<index_t> disentangle_depth{}, entangle_depth{};  ///< none: counted from the weights
    double layer_norm_eps = 1e-5;

    /// The sizes of the IMR whose state dict `source` holds, read from the
    /// shapes of proj_in, feature_fusion and the first disentangleNet layer.
    /// The head width is the released 64 (the whole attention width when that
    /// is narrower); give a config by hand for other head splits. io_error for
    /// missing or inconsistent weights.
    static imr_config from_weights(const weight_source& source) {
        const auto dims = [&](const char* key) {
            std::string stored;
            const auto* f = source.find(key, &stored);
            check<io_error>(f != nullptr && f->info(stored).dims.rank() == 2, "imr", "weights: '", key, "' is missing or not a matrix");
            return f->info(stored).dims;
        };
        imr_config c;
        const auto proj_in = dims("proj_in.weight"), fusion1 = dims("feature_fusion.1.weight"), fusion4 = dims("feature_fusion.4.weight"),
                   q = dims("disentangleNet.0.0.to_q.weight"), ff = dims("disentangleNet.0.2.1.weight");
        c.dim = proj_in[0];
        c.embedding_dim = proj_in[1];
        c.txt_dim = fusion1[1] - c.embedding_dim;
        c.num_queries = fusion4[0] / c.dim;
        c.ff_mult = ff[0] / c.dim;
        c.dim_head = std::min<index_t>(64, q[0]);
        c.heads = q[0] / c.dim_head;
        check<io_error>(c.txt_dim > 0 && c.num_queries * c.dim == fusion4[0] && c.ff_mult * c.dim == ff[0] && c.heads * c.dim_head == q[0] &&
                            c.heads > 0,
                        "imr", "weights have inconsistent sizes (attention width ", q[0],
                        " is not a multiple of 64?); give the config by hand");
        return c;
    }
};

template <class B, class T = float>
    requires computes_in<B, T>
class imr_model {
public:
    using config = imr_config;
    using tensor_type = tensor<B, T>;
    using linear = linear_layer<B, T>;
    using norm = layer_norm_layer<B, T>;

    /// <net>.<i>.0: PerceiverAttention (norm1 on the motion latents, norm2 on x).
    struct cross_attention_params {
        norm norm1, norm2;
        linear to_q, to_kv, to_out;
    };
    /// <net>.<i>.1: MultAttention.
    struct self_attention_params {
        norm norm1;
        linear to_q, to_kv, to_out;
    };
    /// <net>.<i>.2: .0 LayerNorm, .1 Linear up, .3 Linear down.
    struct feed_forward_params {
        norm norm0;
        linear up, down;
    };
    struct layer_params {
        cross_attention_params cross;
        self_attention_params self;
        feed_forward_params ff;
    };
    struct params {
        norm fusion_norm0, fusion_norm3;   ///< feature_fusion.0, feature_fusion.3
        linear fusion_linear1, fusion_linear4;  ///< feature_fusion.1, feature_fusion.4
        norm norm_in, norm_out;
        linear proj_in, proj_out;
        std::vector<layer_params> disentangle, entangle;  ///< disentangleNet, entangleNet
    };

    imr_model(config cfg, params weights) : config_(cfg), params_(std::move(weights)) { validate(); }

    /// Binds every weight by its state-dict key (below the binder's prefix).
    static params bind(weight_binder<B, T>& b, config& cfg) {
        const auto& c = cfg;
        check<value_error>(c.dim > 0 && c.dim_head > 0 && c.heads > 0 && c.num_queries > 0 && c.embedding_dim > 0 && c.txt_dim > 0 &&
                               c.ff_mult > 0,
                           "imr", "every size in the config must be positive");
        const index_t dim = c.dim, inner = c.heads * c.dim_head, motion = c.embedding_dim + c.txt_dim;
        params p;
        p.fusion_norm0 = norm::bind(b, "feature_fusion.0", motion, c.layer_norm_eps);
        p.fusion_linear1 = linear::bind(b, "feature_fusion.1", motion, dim, true);
        p.fusion_norm3 = norm::bind(b, "feature_fusion.3", dim, c.layer_norm_eps);
        p.fusion_linear4 = linear::bind(b, "feature_fusion.4", dim, c.num_queries * dim, true);
        p.norm_in = norm::bind(b, "norm_in", c.embedding_dim, c.layer_norm_eps);
        p.proj_in = linear::bind(b, "proj_in", c.embedding_dim, dim, true);
        p.norm_out = norm::bind(b, "norm_out", dim, c.layer_norm_eps);
        p.proj_out = linear::bind(b, "proj_out", dim, c.embedding_dim, true);
        const auto net = [&](const char* name, std::optional<index_t>& depth) {
            if (!depth) {
                index_t n = 0;
                while (b.contains(std::string(name) + "." + std::to_string(n) + ".0.to_q.weight")) ++n;
                depth = n;
            }
            std::vector<layer_params> layers;
            for (index_t i = 0; i < *depth; ++i) {
                auto l = b.scope(name, i);
                layer_params lp;
                auto a = l.scope("0");
                lp.cross = {norm::bind(a, "norm1", dim, c.layer_norm_eps), norm::bind(a, "norm2", dim, c.layer_norm_eps),
                            linear::bind(a, "to_q", dim, inner, false), linear::bind(a, "to_kv", dim, 2 * inner, false),
                            linear::bind(a, "to_out", inner, dim, false)};
                auto s = l.scope("1");
                lp.self = {norm::bind(s, "norm1", dim, c.layer_norm_eps), linear::bind(s, "to_q", dim, inner, false),
                           linear::bind(s, "to_kv", dim, 2 * inner, false), linear::bind(s, "to_out", inner, dim, false)};
                auto f = l.scope("2");
                lp.ff = {norm::bind(f, "0", dim, c.layer_norm_eps), linear::bind(f, "1", dim, c.ff_mult * dim, false),
                         linear::bind(f, "3", c.ff_mult * dim, dim, false)};
                layers.push_back(std::move(lp));
            }
            return layers;
        };
        p.disentangle = net("disentangleNet", cfg.disentangle_depth);
        p.entangle = net("entangleNet", cfg.entangle_depth);
        return p;
    }

    /// Binds under `prefix` ("" for a bare state dict, "param." for golden files); io_error lists every problem.
    static imr_model load(context_t<B>& ctx, const weight_source& source, config cfg, std::string_view prefix = "") {
        weight_binder<B, T> b(ctx, source, std::string(prefix));
        auto p = bind(b, cfg);
        b.finish();
        return imr_model(cfg, std::move(p));
    }

    /// tokens (1, n, embedding_dim); src_landmark (1, embedding_dim), tgt_landmark (T, embedding_dim);
    /// src_text (1, txt_dim), tgt_text (T, txt_dim) -> (T, n, embedding_dim).
    tensor_type forward(context_t<B>& ctx, const tensor_type& tokens, const tensor_type& src_landmark, const tensor_type& tgt_landmark,
                        const tensor_type& src_text, const tensor_type& tgt_text) const {
        const auto& c = config_;
        check_inputs(tokens, src_landmark, tgt_landmark, src_text, tgt_text);
        const index_t targets = tgt_landmark.dim(0);

        // Source and targets through feature_fusion together: (1 + T, num_queries, dim).
        const auto motion = ops::concat(ctx, std::vector<tensor_type>{ops::concat(ctx, std::vector<tensor_type>{src_landmark, src_text}, 1),
                                                                      ops::concat(ctx, std::vector<tensor_type>{tgt_landmark, tgt_text}, 1)},
                                        0);
        const auto& p = params_;
        auto h = ops::gelu(ctx, p.fusion_linear1(ctx, p.fusion_norm0(ctx, motion)));
        h = ops::gelu(ctx, p.fusion_linear4(ctx, p.fusion_norm3(ctx, h)));
        const auto latents = h.reshape({1 + targets, c.num_queries, c.dim});
        const auto src_latents = latents.narrow_leading(0, 1);
        const auto tgt_latents = latents.narrow_leading(1, targets);

        auto x = p.proj_in(ctx, p.norm_in(ctx, tokens));
        for (const auto& layer : p.disentangle) x = apply_layer(ctx, layer, x, src_latents);
        if (targets > 1) x = ops::concat(ctx, std::vector<tensor_type>(static_cast<std::size_t>(targets), x), 0);
        for (const auto& layer : p.entangle) x = apply_layer(ctx, layer, x, tgt_latents);
        return p.proj_out(ctx, p.norm_out(ctx, x));
    }

    /// One layer's saved state: cross attention, self-attention, feed-forward.
    struct layer_saved {
        modules::detail::perceiver_saved<B, T> cross;
        ops::norm_saved<B, T> self_norm;
        modules::detail::mha_saved<B, T> self;
        modules::detail::feed_forward_saved<B, T> ff;
    };
    /// What backward needs from forward_train.
    struct saved_state {
        ops::norm_saved<B, T> fusion_norm0, fusion_norm3, norm_in, norm_out;
        ops::linear_saved<B, T> fusion_linear1, fusion_linear4, proj_in, proj_out;
        ops::unary_saved<B, T> fusion_act2, fusion_act5;
        std::vector<layer_saved> disentangle, entangle;
        index_t targets = 0, tokens = 0;
        ops::needs need;
    };
    /// Gradients: `weights` mirrors params (undefined when params were not asked
    /// for); the five input gradients are defined when inputs were.
    struct grads {
        params weights;
        tensor_type tokens, src_landmark, tgt_landmark, src_text, tgt_text;
    };

    /// forward() keeping what backward needs. `need.input`: gradients for the
    /// five inputs; `need.params`: for the weights.
    std::pair<tensor_type, saved_state> forward_train(context_t<B>& ctx, const tensor_type& tokens, const tensor_type& src_landmark,
                                                      const tensor_type& tgt_landmark, const tensor_type& src_text,
                                                      const tensor_type& tgt_text, ops::needs need = {}) const {
        using modules::detail::ptr_if;
        using modules::detail::with_params;
        const auto& c = config_;
        check_inputs(tokens, src_landmark, tgt_landmark, src_text, tgt_text);
        const index_t targets = tgt_landmark.dim(0);
        const bool pw = need.params;
        saved_state s;
        s.targets = targets;
        s.tokens = tokens.dim(1);
        s.need = need;
        const auto& p = params_;
        const auto motion = ops::concat(ctx, std::vector<tensor_type>{ops::concat(ctx, std::vector<tensor_type>{src_landmark, src_text}, 1),
                                                                      ops::concat(ctx, std::vector<tensor_type>{tgt_landmark, tgt_text}, 1)},
                                        0);
        tensor_type h, x;
        std::tie(h, s.fusion_norm0) = ops::layer_norm_forward(ctx, motion, ptr_if(p.fusion_norm0.weight), ptr_if(p.fusion_norm0.bias),
                                                              p.fusion_norm0.eps);
        std::tie(h, s.fusion_linear1) = ops::linear_forward(ctx, h, p.fusion_linear1.weight, ptr_if(p.fusion_linear1.bias), with_params(pw));
        std::tie(h, s.fusion_act2) = ops::unary_forward(ctx, unary_op::gelu_erf, h);
        std::tie(h, s.fusion_norm3) =
            ops::layer_norm_forward(ctx, h, ptr_if(p.fusion_norm3.weight), ptr_if(p.fusion_norm3.bias), p.fusion_norm3.eps);
        std::tie(h, s.fusion_linear4) = ops::linear_forward(ctx, h, p.fusion_linear4.weight, ptr_if(p.fusion_linear4.bias), with_params(pw));
        std::tie(h, s.fusion_act5) = ops::unary_forward(ctx, unary_op::gelu_erf, h);
        const auto latents = h.reshape({1 + targets, c.num_queries, c.dim});
        const auto src_latents = latents.narrow_leading(0, 1);
        const auto tgt_latents = latents.narrow_leading(1, targets);

        std::tie(x, s.norm_in) = ops::layer_norm_forward(ctx, tokens, ptr_if(p.norm_in.weight), ptr_if(p.norm_in.bias), p.norm_in.eps);
        // norm_in's weights need the gradient through proj_in as much as the tokens do.
        std::tie(x, s.proj_in) =
            ops::linear_forward(ctx, x, p.proj_in.weight, ptr_if(p.proj_in.bias), {.input = need.input || pw, .params = pw});
        for (const auto& layer : p.disentangle) s.disentangle.push_back(train_layer(ctx, layer, x, src_latents, pw));
        if (targets > 1) x = ops::concat(ctx, std::vector<tensor_type>(static_cast<std::size_t>(targets), x), 0);
        for (const auto& layer : p.entangle) s.entangle.push_back(train_layer(ctx, layer, x, tgt_latents, pw));
        std::tie(x, s.norm_out) = ops::layer_norm_forward(ctx, x, ptr_if(p.norm_out.weight), ptr_if(p.norm_out.bias), p.norm_out.eps);
        std::tie(x, s.proj_out) = ops::linear_forward(ctx, x, p.proj_out.weight, ptr_if(p.proj_out.bias), with_params(pw));
        return {x, std::move(s)};
    }

    /// Gradients of sum(output * grad_output) for the state of one forward_train.
    grads backward(context_t<B>& ctx, const saved_state& s, const tensor_type& grad_output) const {
        using modules::detail::add_grad;
        using modules::detail::with_params;
        const auto& c = config_;
        check<shape_error>(grad_output.shape() == shape{s.targets, s.tokens, c.embedding_dim} &&
                               s.disentangle.size() == params_.disentangle.size() && s.entangle.size() == params_.entangle.size(),
                           "imr", "grad_output ", grad_output.shape().str(), " does not fit the saved forward");
        const bool pw = s.need.params;
        grads g;
        auto& gw = g.weights;
        const auto set_linear = [](linear& l, const ops::linear_grads<B, T>& lg) { l.weight = lg.weight, l.bias = lg.bias; };
        const auto set_norm = [](norm& n, const ops::norm_grads<B, T>& ng) { n.weight = ng.gamma, n.bias = ng.beta; };

        auto po = ops::linear_backward(ctx, s.proj_out, grad_output);
        set_linear(gw.proj_out, po);
        auto no = ops::layer_norm_backward(ctx, s.norm_out, po.input, with_params(pw));
        set_norm(gw.norm_out, no);
        tensor_type d_x = no.input, d_src, d_tgt;
        gw.entangle.resize(s.entangle.size());
        for (std::size_t i = s.entangle.size(); i-- > 0;) d_tgt = add_grad(ctx, d_tgt, backward_layer(ctx, s.entangle[i], d_x, gw.entangle[i], pw));
        // x was repeated once per target: its gradient is the sum over the copies.
        if (s.targets > 1) d_x = ops::sum(ctx, d_x, {0});
        gw.disentangle.resize(s.disentangle.size());
        for (std::size_t i = s.disentangle.size(); i-- > 0;)
            d_src = add_grad(ctx, d_src, backward_layer(ctx, s.disentangle[i], d_x, gw.disentangle[i], pw));
        auto pi = ops::linear_backward(ctx, s.proj_in, d_x);
        set_linear(gw.proj_in, pi);
        if (pi.input.defined()) {
            auto ni = ops::layer_norm_backward(ctx, s.norm_in, pi.input, {.input = s.need.input, .params = pw});
            set_norm(gw.norm_in, ni);
            g.tokens = ni.input;
        }

        // Latents that reached no layer get a zero gradient.
        if (!d_src.defined()) d_src = tensor_type::zeros(ctx, {1, c.num_queries, c.dim});
        if (!d_tgt.defined()) d_tgt = tensor_type::zeros(ctx, {s.targets, c.num_queries, c.dim});
        auto d_h = ops::concat(ctx, std::vector<tensor_type>{d_src, d_tgt}, 0).reshape({1 + s.targets, c.num_queries * c.dim});
        auto l4 = ops::linear_backward(ctx, s.fusion_linear4, ops::unary_backward(ctx, s.fusion_act5, d_h));
        set_linear(gw.fusion_linear4, l4);
        auto n3 = ops::layer_norm_backward(ctx, s.fusion_norm3, l4.input, with_params(pw));
        set_norm(gw.fusion_norm3, n3);
        auto l1 = ops::linear_backward(ctx, s.fusion_linear1, ops::unary_backward(ctx, s.fusion_act2, n3.input));
        set_linear(gw.fusion_linear1, l1);
        if (!s.need.input && !pw) return g;
        auto n0 = ops::layer_norm_backward(ctx, s.fusion_norm0, l1.input, {.input = s.need.input, .params = pw});
        set_norm(gw.fusion_norm0, n0);
        if (s.need.input) {
            const auto d_src_motion = n0.input.narrow_leading(0, 1), d_tgt_motion = n0.input.narrow_leading(1, s.targets);
            g.src_landmark = ops::slice(ctx, d_src_motion, 1, 0, c.embedding_dim);
            g.src_text = ops::slice(ctx, d_src_motion, 1, c.embedding_dim, c.txt_dim);
            g.tgt_landmark = ops::slice(ctx, d_tgt_motion, 1, 0, c.embedding_dim);
            g.tgt_text = ops::slice(ctx, d_tgt_motion, 1, c.embedding_dim, c.txt_dim);
        }
        return g;
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }

private:
    void check_inputs(const tensor_type& tokens, const tensor_type& src_landmark, const tensor_type& tgt_landmark,
                      const tensor_type& src_text, const tensor_type& tgt_text) const {
        const auto& c = config_;
        check<shape_error>(tokens.rank() == 3 && tokens.dim(0) == 1 && tokens.dim(2) == c.embedding_dim, "imr", "tokens ",
                           tokens.shape().str(), " is not (1, n, ", c.embedding_dim, ")");
        const auto check_2d = [](const tensor_type& t, index_t rows, index_t width, const char* what) {
            check<shape_error>(t.rank() == 2 && (rows < 0 || t.dim(0) == rows) && t.dim(1) == width, "imr", what, " ", t.shape().str(),
                               " is not (", rows < 0 ? std::string("T") : std::to_string(rows), ", ", width, ")");
        };
        check_2d(src_landmark, 1, c.embedding_dim, "src_landmark");
        check_2d(src_text, 1, c.txt_dim, "src_text");
        check_2d(tgt_landmark, -1, c.embedding_dim, "tgt_landmark");
        const index_t targets = tgt_landmark.dim(0);
        check<shape_error>(targets >= 1, "imr", "no targets");
        check_2d(tgt_text, targets, c.txt_dim, "tgt_text");
    }

    /// apply_layer keeping what backward needs; x is updated in place.
    layer_saved train_layer(context_t<B>& ctx, const layer_params& l, tensor_type& x, const tensor_type& motion, bool pw) const {
        using modules::detail::ptr_if;
        const auto& c = config_;
        layer_saved ls;
        tensor_type y, xn;
        const auto& a = l.cross;
        std::tie(y, ls.cross) = modules::detail::perceiver_forward<B, T>(ctx, {a.norm1.weight, a.norm1.bias, a.norm1.eps},
                                                                         {a.norm2.weight, a.norm2.bias, a.norm2.eps}, a.to_q.weight,
                                                                         a.to_kv.weight, a.to_out.weight, motion, x, c.heads, c.dim_head, pw);
        x = ops::add(ctx, x, y);
        const auto& sa = l.self;
        std::tie(xn, ls.self_norm) = ops::layer_norm_forward(ctx, x, ptr_if(sa.norm1.weight), ptr_if(sa.norm1.bias), sa.norm1.eps);
        std::tie(y, ls.self) = modules::detail::mha_forward(ctx, sa.to_q.weight, sa.to_kv.weight, sa.to_out.weight, xn, xn, c.heads,
                                                            c.dim_head, pw);
        x = ops::add(ctx, x, y);
        const auto& f = l.ff;
        std::tie(y, ls.ff) = modules::detail::feed_forward_forward(ctx, x, f.norm0.weight, f.norm0.bias, f.norm0.eps, f.up.weight,
                                                                   f.down.weight, pw);
        x = ops::add(ctx, x, y);
        return ls;
    }

    /// Backward through one layer: d_x is updated in place, the motion latents' gradient returned.
    tensor_type backward_layer(context_t<B>& ctx, const layer_saved& ls, tensor_type& d_x, layer_params& gl, bool pw) const {
        using modules::detail::with_params;
        auto f = modules::detail::feed_forward_backward(ctx, ls.ff, d_x, pw);
        d_x = ops::add(ctx, d_x, f.input);
        gl.ff.norm0.weight = f.norm_weight, gl.ff.norm0.bias = f.norm_bias, gl.ff.up.weight = f.up, gl.ff.down.weight = f.down;
        auto m = modules::detail::mha_backward(ctx, ls.self, d_x);
        auto n = ops::layer_norm_backward(ctx, ls.self_norm, ops::add(ctx, m.queries, m.kv_input), with_params(pw));
        d_x = ops::add(ctx, d_x, n.input);
        gl.self.norm1.weight = n.gamma, gl.self.norm1.bias = n.beta;
        gl.self.to_q.weight = m.to_q, gl.self.to_kv.weight = m.to_kv, gl.self.to_out.weight = m.to_out;
        auto a = modules::detail::perceiver_backward(ctx, ls.cross, d_x, pw);
        d_x = ops::add(ctx, d_x, a.queries);
        gl.cross.norm1.weight = a.norm1_weight, gl.cross.norm1.bias = a.norm1_bias;
        gl.cross.norm2.weight = a.norm2_weight, gl.cross.norm2.bias = a.norm2_bias;
        gl.cross.to_q.weight = a.to_q, gl.cross.to_kv.weight = a.to_kv, gl.cross.to_out.weight = a.to_out;
        return a.context;
    }

    tensor_type apply_layer(context_t<B>& ctx, const layer_params& l, tensor_type x, const tensor_type& motion) const {
        x = ops::add(ctx, x, cross_attention(ctx, l.cross, x, motion));
        x = ops::add(ctx, x, self_attention(ctx, l.self, x));
        const auto& f = l.ff;
        return ops::add(ctx, x, f.down(ctx, ops::gelu(ctx, f.up(ctx, f.norm0(ctx, x)))));
    }

    /// q from `queries`, keys/values from `kv_input` (both already normalised).
    tensor_type attend(context_t<B>& ctx, const linear& to_q, const linear& to_kv, const linear& to_out, const tensor_type& queries,
                       const tensor_type& kv_input) const {
        using modules::detail::merge_heads;
        using modules::detail::split_heads;
        const index_t inner = config_.heads * config_.dim_head;
        const auto q = to_q(ctx, queries);
        const auto kv = to_kv(ctx, kv_input);
        const auto k = ops::slice(ctx, kv, -1, 0, inner);
        const auto v = ops::slice(ctx, kv, -1, inner, inner);
        const double scale = 1.0 / std::sqrt(static_cast<double>(config_.dim_head));
        const auto o = ops::attention(ctx, split_heads(ctx, q, config_.heads), split_heads(ctx, k, config_.heads),
                                      split_heads(ctx, v, config_.heads), scale);
        return to_out(ctx, merge_heads(ctx, o, config_.heads));
    }

    tensor_type cross_attention(context_t<B>& ctx, const cross_attention_params& a, const tensor_type& x, const tensor_type& motion) const {
        const auto xn = a.norm2(ctx, x);
        const auto mn = a.norm1(ctx, motion);
        return attend(ctx, a.to_q, a.to_kv, a.to_out, xn, ops::concat(ctx, std::vector<tensor_type>{mn, xn}, 1));
    }

    tensor_type self_attention(context_t<B>& ctx, const self_attention_params& a, const tensor_type& x) const {
        const auto xn = a.norm1(ctx, x);
        return attend(ctx, a.to_q, a.to_kv, a.to_out, xn, xn);
    }

    void validate() const {
        using modules::detail::expect_weight;
        const auto& c = config_;
        check<value_error>(c.dim > 0 && c.dim_head > 0 && c.heads > 0 && c.num_queries > 0 && c.embedding_dim > 0 && c.txt_dim > 0 &&
                               c.ff_mult > 0,
                           "imr", "every size in the config must be positive");
        const index_t dim = c.dim, inner = c.heads * c.dim_head, motion = c.embedding_dim + c.txt_dim;
        const auto& p = params_;
        const auto ln = [&](const norm& n, index_t width, const std::string& name) {
            expect_weight("imr", n.weight, {width}, name + ".weight");
            expect_weight("imr", n.bias, {width}, name + ".bias");
        };
        const auto lin = [&](const linear& l, index_t in, index_t out, bool bias, const std::string& name) {
            expect_weight("imr", l.weight, {out, in}, name + ".weight");
            if (bias) expect_weight("imr", l.bias, {out}, name + ".bias");
        };
        ln(p.fusion_norm0, motion, "feature_fusion.0");
        lin(p.fusion_linear1, motion, dim, true, "feature_fusion.1");
        ln(p.fusion_norm3, dim, "feature_fusion.3");
        lin(p.fusion_linear4, dim, c.num_queries * dim, true, "feature_fusion.4");
        ln(p.norm_in, c.embedding_dim, "norm_in");
        lin(p.proj_in, c.embedding_dim, dim, true, "proj_in");
        ln(p.norm_out, dim, "norm_out");
        lin(p.proj_out, dim, c.embedding_dim, true, "proj_out");
        const auto net = [&](const std::vector<layer_params>& layers, const std::optional<index_t>& depth, const std::string& name) {
            check<shape_error>(!depth || static_cast<index_t>(layers.size()) == *depth, "imr", name, " has ", layers.size(),
                               " layers, the config says ", depth.value_or(0));
            for (std::size_t i = 0; i < layers.size(); ++i) {
                const std::string l = name + "." + std::to_string(i) + ".";
                const auto& lp = layers[i];
                ln(lp.cross.norm1, dim, l + "0.norm1");
                ln(lp.cross.norm2, dim, l + "0.norm2");
                lin(lp.cross.to_q, dim, inner, false, l + "0.to_q");
                lin(lp.cross.to_kv, dim, 2 * inner, false, l + "0.to_kv");
                lin(lp.cross.to_out, inner, dim, false, l + "0.to_out");
                ln(lp.self.norm1, dim, l + "1.norm1");
                lin(lp.self.to_q, dim, inner, false, l + "1.to_q");
                lin(lp.self.to_kv, dim, 2 * inner, false, l + "1.to_kv");
                lin(lp.self.to_out, inner, dim, false, l + "1.to_out");
                ln(lp.ff.norm0, dim, l + "2.0");
                lin(lp.ff.up, dim, c.ff_mult * dim, false, l + "2.1");
                lin(lp.ff.down, c.ff_mult * dim, dim, false, l + "2.3");
            }
        };
        net(p.disentangle, c.disentangle_depth, "disentangleNet");
        net(p.entangle, c.entangle_depth, "entangleNet");
    }

    config config_;
    params params_;
};

}  // namespace dynamicid::modules::imr
