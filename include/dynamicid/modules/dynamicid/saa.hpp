// dynamicid modules: DynamicID's attention processors for the SD1.5 UNet.
//
// Every transformer block of the UNet keeps its attention weights (to_q, to_k,
// to_v, to_out.0) and gets a processor with LoRA adapters on all four
// projections (`<p>(x) + s * up(down(x))`, s = lora_scale, times
// network_alpha / rank when an alpha is given):
//
// - sa_processor: ordinary (self- or cross-) attention with LoRA (attn1).
// - saa_processor: Semantic-Activated Attention (attn2). The encoder states are
//   the text tokens followed by `tokens_per_id` identity tokens per identity.
//   The text part is ordinary cross-attention; the identity part uses its own
//   to_k_ip / to_v_ip projections, and its output is scaled per query by an
//   activation weight and by id_scale before it joins the text output ahead of
//   the output projection:
//
//     S   = q k_ip^T / sqrt(d)                              per head, (B, heads, N, K)
//     w   = minmax_over_queries(sum_{heads, K} S)          per batch element
//     w   = 0 where w < threshold                          (0.3, as released)
//     w'  = w / (beta + 1) outside every box, then per box (in order) w' <- w' (beta + 1) + beta
//           i.e. w + beta inside a box; beta = infer_scale while step < infer_end, else 0
//     S'  = S with the other identities' tokens at -inf inside each identity's box
//           (one box and several identities instead: first identity x mix_scale,
//           the rest x (1 - mix_scale))
//     out = to_out(attn_text + id_scale * w' * softmax(S') v_ip)
//
// Behaviour that differs from the released code on purpose:
// - All queries tie (max == min of the summed scores): the released code
//   divides by zero and produces NaN. Here every normalised weight is 0 (no
//   query stands out, so none is activated); the layout boost still adds beta
//   inside the boxes.
// - A query whose identity tokens are all masked (overlapping boxes of
//   different identities) gets a zero identity output instead of NaN.
// - The layer's step index is an explicit control (`saa_controls::step`, the
//   released `count`), not a counter hidden in the processor.
// - Gating (`activate_query`) defaults to on, as in the paper.
// - Boxes outside [0, 1], inverted or empty are rejected with value_error.
//
//     namespace saa = dynamicid::modules::saa;
//     auto source = dynamicid::modules::weight_source::open({"attn2_block0.safetensors"});
//     auto proc = saa::saa_processor<dynamicid::cpu_backend>::load(ctx, source, {.heads = 8}, "attn.", "proc.");
//     saa::saa_controls c{.id_num = 2, .infer_scale = 2, .step = denoising_step};
//     c.on_activation = [](const saa::activation_record& r) { /* heat map of r.normalized */ };
//     auto out = proc.forward(ctx, hidden_states, encoder_hidden_states, c);
//
// Training: forward_train / backward give the gradients w.r.t. hidden_states
// and encoder_hidden_states (text and identity tokens) and w.r.t. the
// processor's own weights (LoRA down/up, to_k_ip, to_v_ip); the base
// projections are frozen. The gate is differentiated as torch autograd does
// through the released code: w' depends on the scores through the min-max
// normalisation (the min and max pass their gradient to the arg-min and
// arg-max query), the threshold is a constant 0/1 mask (queries below it get
// no gradient), the layout boost is affine (its slope (beta + 1)^(boxes - 1)
// scales the gradient), and the -inf identity mask and mix factors are
// constants. In the tie case (max == min) the gate is 0 and gets no gradient.
//
//     auto [y, saved] = proc.forward_train(ctx, hidden_states, encoder_hidden_states, c);
//     auto g = proc.backward(ctx, saved, grad_y);   // g.hidden_states, g.encoder_hidden_states, g.to_k_ip, g.to_q_lora.down, ...
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/detail/frozen.hpp>
#include <dynamicid/modules/dynamicid/detail/heads.hpp>
#include <dynamicid/modules/layers.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace dynamicid::modules::saa {

// ---- layout helpers (host side, independent of the backend) ------------------

/// A box `[y_min, x_min, y_max, x_max]` as fractions of the image (0..1).
struct box {
    double y_min = 0, x_min = 0, y_max = 1, x_max = 1;
};

/// Rows [y0, y1) and columns [x0, x1) of the latent grid.
struct cell_box {
    index_t y0 = 0, x0 = 0, y1 = 0, x1 = 0;
};

/// The latent grid a query sequence covers.
struct grid_shape {
    index_t height = 0, width = 0;
};

/// Grid of `query_len` queries. Square images (no root size): side =
/// sqrt(query_len). Otherwise ratio = int(sqrt(W * H / query_len)) (integer
/// division first, as released) and the grid is (H / ratio, W / ratio).
/// shape_error when the grid does not hold exactly `query_len` cells.
inline grid_shape query_grid(index_t query_len, std::optional<index_t> root_width = {}, std::optional<index_t> root_height = {}) {
    check<value_error>(root_width.has_value() == root_height.has_value(), "saa",
                       "give both root_width and root_height, or neither");
    check<shape_error>(query_len > 0, "saa", "no queries");
    if (!root_width) {
        auto side = static_cast<index_t>(std::sqrt(static_cast<double>(query_len)));
        while (side * side > query_len) --side;
        while ((side + 1) * (side + 1) <= query_len) ++side;
        check<shape_error>(side * side == query_len, "saa", query_len,
                           " queries do not form a square grid; give root_width and root_height for non-square images");
        return {side, side};
    }
    const index_t w = *root_width, h = *root_height;
    check<value_error>(w > 0 && h > 0, "saa", "root_width and root_height must be positive, got ", w, " x ", h);
    const auto ratio = static_cast<index_t>(std::sqrt(static_cast<double>((w * h) / query_len)));
    check<shape_error>(ratio >= 1 && (h / ratio) * (w / ratio) == query_len, "saa", query_len,
                       " queries do not fit an image of ", w, " x ", h);
    return {h / ratio, w / ratio};
}

/// Throws value_error ("[saa] box i ...") unless every coordinate is in
/// [0, 1] and the box is non-empty (y_min < y_max, x_min < x_max).
inline void validate_box(const box& b, std::size_t index) {
    const double v[4] = {b.y_min, b.x_min, b.y_max, b.x_max};
    for (double x : v)
        check<value_error>(std::isfinite(x) && x >= 0.0 && x <= 1.0, "saa", "box ", index, " [", b.y_min, ", ", b.x_min, ", ",
                           b.y_max, ", ", b.x_max, "] has a coordinate outside [0, 1]");
    check<value_error>(b.y_min < b.y_max && b.x_min < b.x_max, "saa", "box ", index, " [", b.y_min, ", ", b.x_min, ", ", b.y_max,
                       ", ", b.x_max, "] is inverted or empty (need y_min < y_max and x_min < x_max)");
}

/// The boxes in use: `boxes` validated, or with none given `id_num` equal
/// vertical strips left to right, box i = [0, i/n, 1, (i+1)/n].
inline std::vector<box> resolve_boxes(const std::vector<box>& boxes, index_t id_num) {
    if (boxes.empty()) {
        std::vector<box> strips;
        for (index_t i = 0; i < id_num; ++i)
            strips.push_back({0.0, static_cast<double>(i) / static_cast<double>(id_num), 1.0,
                              static_cast<double>(i + 1) / static_cast<double>(id_num)});
        return strips;
    }
    check<value_error>(static_cast<index_t>(boxes.size()) <= id_num, "saa", boxes.size(), " boxes for ", id_num,
                       " identities (one box per identity at most)");
    for (std::size_t i = 0; i < boxes.size(); ++i) validate_box(boxes[i], i);
    return boxes;
}

/// Latent cells of `b`: int(fraction * side), truncating (a box may cover no
/// cell on a coarse grid).
inline cell_box to_cells(const box& b, grid_shape g) {
    const auto cell = [](double f, index_t side) { return static_cast<index_t>(f * static_cast<double>(side)); };
    return {cell(b.y_min, g.height), cell(b.x_min, g.width), cell(b.y_max, g.height), cell(b.x_max, g.width)};
}

/// Min-max normalises each batch element's `sums` (batch x queries, row-major)
/// over its queries and zeroes values below `threshold`. All queries tie
/// (max == min): every weight is 0.
inline std::vector<double> normalise_activation(std::span<const double> sums, index_t batch, double threshold) {
    check<shape_error>(batch > 0 && static_cast<index_t>(sums.size()) % batch == 0, "saa", sums.size(),
                       " activation sums for batch ", batch);
    const auto n = static_cast<std::size_t>(static_cast<index_t>(sums.size()) / batch);
    std::vector<double> out(sums.size(), 0.0);
    for (std::size_t b = 0; b < static_cast<std::size_t>(batch); ++b) {
        const auto row = sums.subspan(b * n, n);
        const auto [lo, hi] = std::minmax_element(row.begin(), row.end());
        const double range = *hi - *lo;
        if (!(range > 0.0)) continue;  // the tie rule: no query is activated
        for (std::size_t i = 0; i < n; ++i) {
            const double w = (row[i] - *lo) / range;
            out[b * n + i] = w < threshold ? 0.0 : w;
        }
    }
    return out;
}

/// The layout boost (eq. 3) applied to normalised weights (batch x grid):
/// w / (beta + 1) everywhere, then for each box in order the covered cells
/// become w' (beta + 1) + beta. beta = 0 leaves the weights unchanged.
inline void apply_layout_boost(std::vector<double>& weights, index_t batch, grid_shape g, const std::vector<box>& boxes,
                               double beta) {
    const index_t n = g.height * g.width;
    for (auto& w : weights) w /= beta + 1.0;
    for (const auto& b : boxes) {
        const auto c = to_cells(b, g);
        for (index_t s = 0; s < batch; ++s)
            for (index_t y = c.y0; y < std::min(c.y1, g.height); ++y)
                for (index_t x = c.x0; x < std::min(c.x1, g.width); ++x) {
                    auto& w = weights[static_cast<std::size_t>(s * n + y * g.width + x)];
                    w = w * (beta + 1.0) + beta;
                }
    }
}

/// What one gated identity-branch call computed, for heat maps.
struct activation_record {
    index_t batch = 0;
    grid_shape grid;
    double beta = 0;              ///< layout boost in effect (0 after infer_end)
    std::vector<float> normalized;  ///< (batch, height, width): min-max normalised, thresholded (released attn_maps)
    std::vector<float> weights;     ///< (batch, height, width): w', the factor on the identity output
};

/// Per-call controls of saa_processor (the released processor's attributes).
struct saa_controls {
    index_t id_num = 1;                ///< identities in the encoder states
    std::vector<box> boxes{};          ///< one per identity (or one, for ID mixing); empty: vertical strips
    bool activate_query = true;        ///< gating; false: w' = 1, no masking, no mixing
    double infer_scale = 4.0;          ///< beta of the layout boost (the paper uses 2 for several identities)
    index_t infer_end = 3;             ///< boost while step < infer_end
    index_t step = 0;                  ///< this layer's call index (once per UNet evaluation)
    std::optional<double> mix_scale{}; ///< needed with one box and several identities
    double id_scale = 1.0;             ///< weight of the identity branch
    std::optional<index_t> root_width{}, root_height{};  ///< image size for non-square grids
    std::optional<index_t> text_tokens{};  ///< when set, the text token count must equal it
    double threshold = 0.3;            ///< activation weights below it are zeroed
    std::function<void(const activation_record&)> on_activation{};  ///< called once per gated forward
};

// ---- weights ------------------------------------------------------------------

/// A LoRA adapter: down (rank, in), up (out, rank); applied as up(down(x)).
template <class B, class T>
struct lora_layer {
    tensor<B, T> down, up;

    /// Binds `<name>.down.weight` / `<name>.up.weight`, the rank read from down.
    static lora_layer bind(weight_binder<B, T>& b, std::string_view name, index_t in, index_t out) {
        auto s = b.scope(name);
        lora_layer l;
        const auto down_shape = s.shape_of("down.weight");
        if (down_shape && down_shape->rank() == 2) {
            l.down = s.tensor("down.weight", {(*down_shape)[0], in});
            l.up = s.tensor("up.weight", {out, (*down_shape)[0]});
        } else if (down_shape) {
            b.report("'" + s.prefix() + "down.weight' has shape " + down_shape->str() + ", expected (rank, " + std::to_string(in) + ")");
        } else {
            l.down = s.tensor_any_shape("down.weight");  // records the missing key
        }
        return l;
    }
    index_t rank() const { return down.dim(0); }
    tensor<B, T> operator()(context_t<B>& ctx, const tensor<B, T>& x) const { return ops::linear(ctx, ops::linear(ctx, x, down), up); }
};

/// Settings shared by both processors.
struct lora_attention_config {
    index_t heads = 8;                    ///< attention heads (SD1.5: 8 at every level)
    double lora_scale = 1.0;              ///< the released lora_scale
    std::optional<double> network_alpha{};  ///< diffusers' LoRA alpha: scale alpha / rank; none = 1
};

/// The base attention's projections plus their LoRA adapters.
template <class B, class T>
struct lora_attention_params {
    linear_layer<B, T> to_q, to_k, to_v, to_out;  ///< attn.to_q, attn.to_k, attn.to_v (no bias), attn.to_out.0 (bias)
    lora_layer<B, T> to_q_lora, to_k_lora, to_v_lora, to_out_lora;

    /// `attn` scopes the base attention ("...attn2."), `proc` the processor ("3." in SAA.bin).
    static lora_attention_params bind(weight_binder<B, T>& attn, weight_binder<B, T>& proc) {
        lora_attention_params p;
        const auto q_shape = attn.shape_of("to_q.weight");
        const auto k_shape = attn.shape_of("to_k.weight");
        if (!q_shape || q_shape->rank() != 2 || !k_shape || k_shape->rank() != 2) {
            attn.report("'" + attn.prefix() + "to_q.weight' and '" + attn.prefix() +
                        "to_k.weight' must exist as matrices (they give the hidden and context widths)");
            return p;
        }
        const index_t hidden = (*q_shape)[0], context = (*k_shape)[1];
        p.to_q = linear_layer<B, T>::bind(attn, "to_q", hidden, hidden, false);
        p.to_k = linear_layer<B, T>::bind(attn, "to_k", context, hidden, false);
        p.to_v = linear_layer<B, T>::bind(attn, "to_v", context, hidden, false);
        p.to_out = linear_layer<B, T>::bind(attn, "to_out.0", hidden, hidden, true);
        p.to_q_lora = lora_layer<B, T>::bind(proc, "to_q_lora", hidden, hidden);
        p.to_k_lora = lora_layer<B, T>::bind(proc, "to_k_lora", context, hidden);
        p.to_v_lora = lora_layer<B, T>::bind(proc, "to_v_lora", context, hidden);
        p.to_out_lora = lora_layer<B, T>::bind(proc, "to_out_lora", hidden, hidden);
        return p;
    }
};

namespace detail {

/// Shape checks for hand-built weights; returns (hidden, context).
template <class B, class T>
std::pair<index_t, index_t> validate_lora_attention(const lora_attention_params<B, T>& p, const lora_attention_config& c) {
    using modules::detail::expect_weight;
    check<value_error>(c.heads > 0, "saa", "heads must be positive");
    check<shape_error>(p.to_q.weight.defined() && p.to_q.weight.rank() == 2 && p.to_k.weight.defined() && p.to_k.weight.rank() == 2,
                       "saa", "to_q and to_k weights are missing");
    const index_t hidden = p.to_q.weight.dim(0), context = p.to_k.weight.dim(1);
    check<shape_error>(hidden % c.heads == 0, "saa", "hidden width ", hidden, " is not divisible by ", c.heads, " heads");
    expect_weight("saa", p.to_q.weight, {hidden, hidden}, "to_q.weight");
    expect_weight("saa", p.to_k.weight, {hidden, context}, "to_k.weight");
    expect_weight("saa", p.to_v.weight, {hidden, context}, "to_v.weight");
    expect_weight("saa", p.to_out.weight, {hidden, hidden}, "to_out.0.weight");
    expect_weight("saa", p.to_out.bias, {hidden}, "to_out.0.bias");
    const auto lora = [&](const lora_layer<B, T>& l, index_t in, const char* name) {
        check<shape_error>(l.down.defined() && l.down.rank() == 2, "saa", "weight ", name, ".down.weight is missing");
        expect_weight("saa", l.down, {l.down.dim(0), in}, std::string(name) + ".down.weight");
        expect_weight("saa", l.up, {hidden, l.down.dim(0)}, std::string(name) + ".up.weight");
    };
    lora(p.to_q_lora, hidden, "to_q_lora");
    lora(p.to_k_lora, context, "to_k_lora");
    lora(p.to_v_lora, context, "to_v_lora");
    lora(p.to_out_lora, hidden, "to_out_lora");
    return {hidden, context};
}

/// base(x) + lora_scale * (alpha / rank) * up(down(x))
template <class B, class T>
tensor<B, T> with_lora(context_t<B>& ctx, const linear_layer<B, T>& base, const lora_layer<B, T>& lora, const lora_attention_config& c,
                       const tensor<B, T>& x) {
    double s = c.lora_scale;
    if (c.network_alpha) s *= *c.network_alpha / static_cast<double>(lora.rank());
    return ops::add_scaled(ctx, 1.0, base(ctx, x), s, lora(ctx, x));
}

/// Multi-head attention of projected q (B, N, hidden), k, v (B, L, hidden) -> (B, N, hidden).
template <class B, class T>
tensor<B, T> heads_attention(context_t<B>& ctx, const tensor<B, T>& q, const tensor<B, T>& k, const tensor<B, T>& v, index_t heads) {
    using modules::detail::merge_heads;
    using modules::detail::split_heads;
    const double scale = 1.0 / std::sqrt(static_cast<double>(q.dim(2) / heads));
    return merge_heads(ctx, ops::attention(ctx, split_heads(ctx, q, heads), split_heads(ctx, k, heads), split_heads(ctx, v, heads), scale),
                       heads);
}

template <class B, class T>
struct lora_saved {
    ops::linear_saved<B, T> base, down, up;
    double scale = 1.0;
};

/// with_lora() keeping what backward needs: nothing for the frozen base weight's gradient, everything for the adapter's.
template <class B, class T>
std::pair<tensor<B, T>, lora_saved<B, T>> with_lora_forward(context_t<B>& ctx, const linear_layer<B, T>& base, const lora_layer<B, T>& lora,
                                                            const lora_attention_config& c, const tensor<B, T>& x) {
    double s = c.lora_scale;
    if (c.network_alpha) s *= *c.network_alpha / static_cast<double>(lora.rank());
    auto [b, sb] = modules::detail::frozen_forward(ctx, base, x);
    auto [d, sd] = ops::linear_forward(ctx, x, lora.down);
    auto [u, su] = ops::linear_forward(ctx, d, lora.up);
    return {ops::add_scaled(ctx, 1.0, b, s, u), lora_saved<B, T>{std::move(sb), std::move(sd), std::move(su), s}};
}

/// Returns d input; writes the adapter's gradients.
template <class B, class T>
tensor<B, T> with_lora_backward(context_t<B>& ctx, const lora_saved<B, T>& s, const tensor<B, T>& g, lora_layer<B, T>& grads) {
    const auto gs = s.scale != 1.0 ? ops::scale(ctx, g, s.scale) : g;
    auto gu = ops::linear_backward(ctx, s.up, gs);
    auto gd = ops::linear_backward(ctx, s.down, gu.input);
    grads.up = gu.weight;
    grads.down = gd.weight;
    return ops::add(ctx, modules::detail::frozen_backward(ctx, s.base, g), gd.input);
}

template <class B, class T>
void check_states(const tensor<B, T>& hidden_states, index_t hidden, const tensor<B, T>* encoder, index_t context) {
    check<shape_error>(hidden_states.rank() == 3 && hidden_states.dim(2) == hidden, "saa", "hidden_states ",
                       hidden_states.shape().str(), " is not (B, N, ", hidden, ")");
    if (encoder)
        check<shape_error>(encoder->rank() == 3 && encoder->dim(0) == hidden_states.dim(0) && encoder->dim(2) == context, "saa",
                           "encoder_hidden_states ", encoder->shape().str(), " is not (", hidden_states.dim(0), ", L, ", context, ")");
}

}  // namespace detail

// ---- sa_processor ---------------------------------------------------------------

/// The released SAProcessor: attention with LoRA on q, k, v and out.
///
///     auto sa = dynamicid::modules::saa::sa_processor<dynamicid::cpu_backend>::load(ctx, source, {.heads = 8}, "attn.", "proc.");
///     auto y = sa.forward(ctx, hidden_states);             // self-attention (attn1)
///     auto z = sa.forward(ctx, hidden_states, &text);      // cross-attention
template <class B, class T = float>
    requires computes_in<B, T>
class sa_processor {
public:
    using config = lora_attention_config;
    using params = lora_attention_params<B, T>;
    using tensor_type = tensor<B, T>;

    sa_processor(config cfg, params weights) : config_(cfg), params_(std::move(weights)) {
        std::tie(hidden_, context_) = detail::validate_lora_attention(params_, config_);
    }

    /// Binds through `attn` / `proc`; io_error listing every missing or misshapen weight.
    static sa_processor bind(weight_binder<B, T>& attn, weight_binder<B, T>& proc, const config& cfg) {
        auto p = params::bind(attn, proc);
        attn.finish();
        proc.finish();
        return sa_processor(cfg, std::move(p));
    }

    /// Binds keys `<attn_prefix>to_q.weight`, `<proc_prefix>to_q_lora.down.weight`, ...
    static sa_processor load(context_t<B>& ctx, const weight_source& source, const config& cfg, std::string_view attn_prefix = "attn.",
                             std::string_view proc_prefix = "proc.") {
        weight_binder<B, T> root(ctx, source);
        auto attn = attn_prefix.empty() ? root : root.scope(strip_dot(attn_prefix));
        auto proc = proc_prefix.empty() ? root : root.scope(strip_dot(proc_prefix));
        return bind(attn, proc, cfg);
    }

    /// hidden_states (B, N, hidden); encoder_hidden_states (B, L, context) or
    /// nullptr for self-attention -> (B, N, hidden).
    tensor_type forward(context_t<B>& ctx, const tensor_type& hidden_states, const tensor_type* encoder_hidden_states = nullptr) const {
        detail::check_states(hidden_states, hidden_, encoder_hidden_states, context_);
        const auto& p = params_;
        const tensor_type& source = encoder_hidden_states ? *encoder_hidden_states : hidden_states;
        check<shape_error>(encoder_hidden_states || context_ == hidden_, "saa", "self-attention needs to_k of width ", hidden_,
                           ", it has ", context_);
        const auto q = detail::with_lora(ctx, p.to_q, p.to_q_lora, config_, hidden_states);
        const auto k = detail::with_lora(ctx, p.to_k, p.to_k_lora, config_, source);
        const auto v = detail::with_lora(ctx, p.to_v, p.to_v_lora, config_, source);
        const auto o = detail::heads_attention(ctx, q, k, v, config_.heads);
        return detail::with_lora(ctx, p.to_out, p.to_out_lora, config_, o);
    }

    struct saved {
        detail::lora_saved<B, T> q, k, v, out;
        ops::attention_saved<B, T> attention;
        bool self_attention = true;
    };
    /// Input gradients and the adapters' gradients (down/up of each LoRA).
    struct grads {
        tensor_type hidden_states, encoder_hidden_states;  ///< the latter undefined for self-attention
        lora_layer<B, T> to_q_lora, to_k_lora, to_v_lora, to_out_lora;
    };

    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& hidden_states,
                                                const tensor_type* encoder_hidden_states = nullptr) const {
        using modules::detail::split_heads;
        detail::check_states(hidden_states, hidden_, encoder_hidden_states, context_);
        const auto& p = params_;
        const tensor_type& source = encoder_hidden_states ? *encoder_hidden_states : hidden_states;
        check<shape_error>(encoder_hidden_states || context_ == hidden_, "saa", "self-attention needs to_k of width ", hidden_,
                           ", it has ", context_);
        saved s;
        s.self_attention = encoder_hidden_states == nullptr;
        auto [q, sq] = detail::with_lora_forward(ctx, p.to_q, p.to_q_lora, config_, hidden_states);
        auto [k, sk] = detail::with_lora_forward(ctx, p.to_k, p.to_k_lora, config_, source);
        auto [v, sv] = detail::with_lora_forward(ctx, p.to_v, p.to_v_lora, config_, source);
        const index_t heads = config_.heads;
        const double scale = 1.0 / std::sqrt(static_cast<double>(hidden_ / heads));
        auto [o, sa] = ops::attention_forward(ctx, split_heads(ctx, q, heads), split_heads(ctx, k, heads), split_heads(ctx, v, heads), scale);
        auto [y, so] = detail::with_lora_forward(ctx, p.to_out, p.to_out_lora, config_, modules::detail::merge_heads(ctx, o, heads));
        s.q = std::move(sq);
        s.k = std::move(sk);
        s.v = std::move(sv);
        s.attention = std::move(sa);
        s.out = std::move(so);
        return {y, std::move(s)};
    }

    grads backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output) const {
        using modules::detail::merge_heads;
        using modules::detail::split_heads;
        const index_t heads = config_.heads;
        grads g;
        const auto d_o = detail::with_lora_backward(ctx, s.out, grad_output, g.to_out_lora);
        const auto d = ops::attention_backward(ctx, s.attention, split_heads(ctx, d_o, heads));
        g.hidden_states = detail::with_lora_backward(ctx, s.q, merge_heads(ctx, d.q, heads), g.to_q_lora);
        auto dc = ops::add(ctx, detail::with_lora_backward(ctx, s.k, merge_heads(ctx, d.k, heads), g.to_k_lora),
                           detail::with_lora_backward(ctx, s.v, merge_heads(ctx, d.v, heads), g.to_v_lora));
        if (s.self_attention) g.hidden_states = ops::add(ctx, g.hidden_states, dc);
        else g.encoder_hidden_states = std::move(dc);
        return g;
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }
    index_t hidden_size() const noexcept { return hidden_; }
    index_t context_size() const noexcept { return context_; }

    static std::string strip_dot(std::string_view prefix) {
        std::string s(prefix);
        if (!s.empty() && s.back() == '.') s.pop_back();
        return s;
    }

private:
    config config_;
    params params_;
    index_t hidden_ = 0, context_ = 0;
};

// ---- saa_processor --------------------------------------------------------------

/// Settings of saa_processor fixed by the checkpoint.
struct saa_config {
    index_t heads = 8;                    ///< attention heads
    index_t tokens_per_id = 4;            ///< identity tokens per identity (ProjPlusModel num_tokens)
    double lora_scale = 1.0;
    std::optional<double> network_alpha{};  ///< LoRA alpha (scale alpha / rank); none = 1
};

/// The released SAAProcessor (attn2): cross-attention with LoRA plus the
/// gated identity branch (see the top of this file).
///
///     auto p = dynamicid::modules::saa::saa_processor<dynamicid::cpu_backend>::load(ctx, source, {}, "attn.", "proc.");
///     auto y = p.forward(ctx, hidden_states, encoder_hidden_states, {.id_num = 1, .step = 0});
template <class B, class T = float>
    requires computes_in<B, T>
class saa_processor {
public:
    using config = saa_config;
    using tensor_type = tensor<B, T>;
    struct params {
        lora_attention_params<B, T> attention;
        tensor_type to_k_ip, to_v_ip;  ///< proc.to_k_ip.weight, proc.to_v_ip.weight: (hidden, context), no bias
    };

    saa_processor(config cfg, params weights) : config_(cfg), params_(std::move(weights)) {
        check<value_error>(config_.tokens_per_id > 0, "saa", "tokens_per_id must be positive");
        std::tie(hidden_, context_) = detail::validate_lora_attention(params_.attention, base_config());
        modules::detail::expect_weight("saa", params_.to_k_ip, {hidden_, context_}, "to_k_ip.weight");
        modules::detail::expect_weight("saa", params_.to_v_ip, {hidden_, context_}, "to_v_ip.weight");
    }

    static saa_processor bind(weight_binder<B, T>& attn, weight_binder<B, T>& proc, const config& cfg) {
        params p;
        p.attention = lora_attention_params<B, T>::bind(attn, proc);
        if (p.attention.to_q.weight.defined() && p.attention.to_k.weight.defined()) {
            const index_t hidden = p.attention.to_q.weight.dim(0), context = p.attention.to_k.weight.dim(1);
            p.to_k_ip = proc.tensor("to_k_ip.weight", {hidden, context});
            p.to_v_ip = proc.tensor("to_v_ip.weight", {hidden, context});
        }
        attn.finish();
        proc.finish();
        return saa_processor(cfg, std::move(p));
    }

    static saa_processor load(context_t<B>& ctx, const weight_source& source, const config& cfg, std::string_view attn_prefix = "attn.",
                              std::string_view proc_prefix = "proc.") {
        weight_binder<B, T> root(ctx, source);
        auto attn = attn_prefix.empty() ? root : root.scope(sa_processor<B, T>::strip_dot(attn_prefix));
        auto proc = proc_prefix.empty() ? root : root.scope(sa_processor<B, T>::strip_dot(proc_prefix));
        return bind(attn, proc, cfg);
    }

    /// hidden_states (B, N, hidden), encoder_hidden_states (B, text + tokens_per_id * id_num, context)
    /// -> (B, N, hidden). shape_error when the token count does not fit id_num
    /// (or text_tokens), value_error for bad controls.
    tensor_type forward(context_t<B>& ctx, const tensor_type& hidden_states, const tensor_type& encoder_hidden_states,
                        const saa_controls& c = {}) const {
        using modules::detail::merge_heads;
        using modules::detail::split_heads;
        detail::check_states(hidden_states, hidden_, &encoder_hidden_states, context_);
        check<value_error>(c.id_num >= 1, "saa", "id_num must be at least 1, got ", c.id_num);
        const index_t batch = hidden_states.dim(0), queries = hidden_states.dim(1), heads = config_.heads;
        const index_t id_tokens = config_.tokens_per_id * c.id_num, total = encoder_hidden_states.dim(1);
        const index_t text = total - id_tokens;
        check<shape_error>(text >= 1, "saa", "encoder_hidden_states has ", total, " tokens: too few for ", c.id_num, " identities of ",
                           config_.tokens_per_id, " tokens plus text");
        check<shape_error>(!c.text_tokens || *c.text_tokens == text, "saa", "encoder_hidden_states has ", total, " tokens, expected ",
                           c.text_tokens.value_or(0), " text + ", id_tokens, " identity tokens (id_num ", c.id_num, ")");
        check<value_error>(std::isfinite(c.id_scale), "saa", "id_scale must be finite");

        // Everything about the layout is checked before any computation.
        std::vector<box> boxes;
        grid_shape grid;
        double beta = 0.0;
        bool mixing = false;
        if (c.activate_query) {
            check<value_error>(std::isfinite(c.infer_scale) && c.infer_scale >= 0.0, "saa", "infer_scale must be >= 0, got ",
                               c.infer_scale);
            check<value_error>(std::isfinite(c.threshold), "saa", "threshold must be finite");
            boxes = resolve_boxes(c.boxes, c.id_num);
            grid = query_grid(queries, c.root_width, c.root_height);
            beta = c.step < c.infer_end ? c.infer_scale : 0.0;
            mixing = boxes.size() == 1 && c.id_num > 1;
            check<value_error>(!mixing || (c.mix_scale && std::isfinite(*c.mix_scale)), "saa", "one box with ", c.id_num,
                               " identities mixes them: set mix_scale");
        }

        const auto& a = params_.attention;
        const auto cfg = base_config();
        const auto text_states = ops::slice(ctx, encoder_hidden_states, 1, 0, text);
        const auto id_states = ops::slice(ctx, encoder_hidden_states, 1, text, id_tokens);

        const auto q = detail::with_lora(ctx, a.to_q, a.to_q_lora, cfg, hidden_states);
        const auto k = detail::with_lora(ctx, a.to_k, a.to_k_lora, cfg, text_states);
        const auto v = detail::with_lora(ctx, a.to_v, a.to_v_lora, cfg, text_states);
        const auto text_out = detail::heads_attention(ctx, q, k, v, heads);

        // Identity branch: S = q k_ip^T / sqrt(d), (B * heads, N, K).
        const double scale = 1.0 / std::sqrt(static_cast<double>(hidden_ / heads));
        const auto q_heads = split_heads(ctx, q, heads);
        const auto k_ip_flat = ops::linear(ctx, id_states, params_.to_k_ip);
        const auto k_ip = split_heads(ctx, k_ip_flat, heads);
        const auto v_ip = split_heads(ctx, ops::linear(ctx, id_states, params_.to_v_ip), heads);
        auto scores = ops::matmul(ctx, q_heads, k_ip, false, true, scale);

        tensor_type gate;
        if constexpr (has_saa_gate<B, T>) {
            // On the device (no host round trip): sum over heads and tokens of
            // the scores = q . (keys summed over tokens).
            if (c.activate_query && boxes.size() <= static_cast<std::size_t>(saa_gate_desc::max_boxes)) {
                saa_gate_desc d{.batch = batch, .queries = queries, .hidden = hidden_, .grid_height = grid.height, .grid_width = grid.width,
                                .scale = scale, .threshold = c.threshold, .beta = beta, .boxes = static_cast<int>(boxes.size())};
                for (std::size_t i = 0; i < boxes.size(); ++i) {
                    const auto cell = to_cells(boxes[i], grid);
                    d.cells[i] = {cell.y0, cell.x0, cell.y1, cell.x1};
                }
                const auto key_sum = ops::sum(ctx, k_ip_flat, {1});
                gate = tensor_type::empty(ctx, {batch, queries, 1});
                tensor<B, float> normalized;
                if (c.on_activation) normalized = tensor<B, float>::empty(ctx, {batch, queries});
                B::saa_gate(ctx, d, q.data(), key_sum.data(), gate.data(), normalized.defined() ? normalized.data() : pointer_t<B, float>{});
                if (c.on_activation) {
                    const auto weights = gate.to_host(ctx);
                    activation_record r{batch, grid, beta, normalized.to_host(ctx), std::vector<float>(weights.size())};
                    std::transform(weights.begin(), weights.end(), r.weights.begin(), [](T v) { return static_cast<float>(v); });
                    c.on_activation(r);
                }
            }
        }
        if (c.activate_query && !gate.defined()) {
            // w = sum over heads and identity tokens of the unmasked scores.
            const auto sums = ops::sum(ctx, scores.reshape({batch, heads, queries, id_tokens}), {1, 3}).to_host(ctx);
            const std::vector<double> sums_d(sums.begin(), sums.end());
            auto normalized = normalise_activation(sums_d, batch, c.threshold);
            auto weights = normalized;
            apply_layout_boost(weights, batch, grid, boxes, beta);
            if (c.on_activation) {
                activation_record r{batch, grid, beta, std::vector<float>(normalized.begin(), normalized.end()),
                                    std::vector<float>(weights.begin(), weights.end())};
                c.on_activation(r);
            }
            const std::vector<T> gate_host(weights.begin(), weights.end());
            gate = tensor_type::from_host(ctx, {batch, queries, 1}, gate_host);
        }
        if (c.activate_query) {
            if (mixing) {
                std::vector<T> factors(static_cast<std::size_t>(id_tokens), static_cast<T>(1.0 - *c.mix_scale));
                std::fill_n(factors.begin(), config_.tokens_per_id, static_cast<T>(*c.mix_scale));
                scores = ops::mul(ctx, scores, tensor_type::from_host(ctx, {1, 1, id_tokens}, factors));
            } else if (boxes.size() > 1) {
                scores = ops::add(ctx, scores, identity_mask(ctx, boxes, grid, id_tokens));
            }
        }
        auto id_out = merge_heads(ctx, ops::matmul(ctx, ops::softmax(ctx, scores), v_ip), heads);
        if (gate.defined()) id_out = ops::mul(ctx, id_out, gate);
        const auto merged = ops::add_scaled(ctx, 1.0, text_out, c.id_scale, id_out);
        return detail::with_lora(ctx, a.to_out, a.to_out_lora, cfg, merged);
    }

    /// What backward needs; the gate's derivative is kept on the host.
    struct saved {
        detail::lora_saved<B, T> q, k, v, out;
        ops::attention_saved<B, T> text_attention;
        ops::linear_saved<B, T> k_ip, v_ip;
        ops::matmul_saved<B, T> scores, id_values;
        ops::softmax_saved<B, T> probabilities;
        tensor_type mix_factors;                       ///< (1, 1, K) when mixing
        ops::binary_saved<B, T> gating;                ///< id_out * gate, when gated
        bool gated = false;
        double id_scale = 1.0;
        index_t batch = 0, queries = 0, text = 0, id_tokens = 0;
        /// d w' / d w_norm per query: the boost slope where the threshold passed, else 0.
        std::vector<double> gate_slope;
        /// Min-max normalised sums (before the threshold), their range and arg-min / arg-max per batch element.
        std::vector<double> normalised;
        std::vector<double> range;
        std::vector<index_t> arg_min, arg_max;
    };
    struct grads {
        tensor_type hidden_states, encoder_hidden_states;  ///< the latter covers text and identity tokens
        lora_layer<B, T> to_q_lora, to_k_lora, to_v_lora, to_out_lora;
        tensor_type to_k_ip, to_v_ip;
    };

    /// forward() keeping what backward() needs (on_activation is called as in forward()).
    std::pair<tensor_type, saved> forward_train(context_t<B>& ctx, const tensor_type& hidden_states, const tensor_type& encoder_hidden_states,
                                                const saa_controls& c = {}) const {
        using modules::detail::merge_heads;
        using modules::detail::split_heads;
        detail::check_states(hidden_states, hidden_, &encoder_hidden_states, context_);
        check<value_error>(c.id_num >= 1, "saa", "id_num must be at least 1, got ", c.id_num);
        const index_t batch = hidden_states.dim(0), queries = hidden_states.dim(1), heads = config_.heads;
        const index_t id_tokens = config_.tokens_per_id * c.id_num, total = encoder_hidden_states.dim(1);
        const index_t text = total - id_tokens;
        check<shape_error>(text >= 1, "saa", "encoder_hidden_states has ", total, " tokens: too few for ", c.id_num, " identities of ",
                           config_.tokens_per_id, " tokens plus text");
        check<shape_error>(!c.text_tokens || *c.text_tokens == text, "saa", "encoder_hidden_states has ", total, " tokens, expected ",
                           c.text_tokens.value_or(0), " text + ", id_tokens, " identity tokens (id_num ", c.id_num, ")");
        check<value_error>(std::isfinite(c.id_scale), "saa", "id_scale must be finite");
        std::vector<box> boxes;
        grid_shape grid;
        double beta = 0.0;
        bool mixing = false;
        if (c.activate_query) {
            check<value_error>(std::isfinite(c.infer_scale) && c.infer_scale >= 0.0, "saa", "infer_scale must be >= 0, got ",
                               c.infer_scale);
            check<value_error>(std::isfinite(c.threshold), "saa", "threshold must be finite");
            boxes = resolve_boxes(c.boxes, c.id_num);
            grid = query_grid(queries, c.root_width, c.root_height);
            beta = c.step < c.infer_end ? c.infer_scale : 0.0;
            mixing = boxes.size() == 1 && c.id_num > 1;
            check<value_error>(!mixing || (c.mix_scale && std::isfinite(*c.mix_scale)), "saa", "one box with ", c.id_num,
                               " identities mixes them: set mix_scale");
        }

        saved s;
        s.batch = batch;
        s.queries = queries;
        s.text = text;
        s.id_tokens = id_tokens;
        s.id_scale = c.id_scale;
        const auto& a = params_.attention;
        const auto cfg = base_config();
        const auto text_states = ops::slice(ctx, encoder_hidden_states, 1, 0, text);
        const auto id_states = ops::slice(ctx, encoder_hidden_states, 1, text, id_tokens);
        auto [q, sq] = detail::with_lora_forward(ctx, a.to_q, a.to_q_lora, cfg, hidden_states);
        auto [k, sk] = detail::with_lora_forward(ctx, a.to_k, a.to_k_lora, cfg, text_states);
        auto [v, sv] = detail::with_lora_forward(ctx, a.to_v, a.to_v_lora, cfg, text_states);
        const double scale = 1.0 / std::sqrt(static_cast<double>(hidden_ / heads));
        const auto q_heads = split_heads(ctx, q, heads);
        auto [text_o, st] = ops::attention_forward(ctx, q_heads, split_heads(ctx, k, heads), split_heads(ctx, v, heads), scale);
        const auto text_out = merge_heads(ctx, text_o, heads);
        auto [k_ip, skip] = ops::linear_forward(ctx, id_states, params_.to_k_ip);
        auto [v_ip, svip] = ops::linear_forward(ctx, id_states, params_.to_v_ip);
        auto [scores, ss] = ops::matmul_forward(ctx, q_heads, split_heads(ctx, k_ip, heads), false, true, scale);
        s.q = std::move(sq);
        s.k = std::move(sk);
        s.v = std::move(sv);
        s.text_attention = std::move(st);
        s.k_ip = std::move(skip);
        s.v_ip = std::move(svip);
        s.scores = std::move(ss);

        tensor_type gate;
        if (c.activate_query) {
            s.gated = true;
            const auto sums_t = ops::sum(ctx, scores.reshape({batch, heads, queries, id_tokens}), {1, 3}).to_host(ctx);
            const std::vector<double> sums(sums_t.begin(), sums_t.end());
            auto normalized = normalise_activation(sums, batch, c.threshold);
            auto weights = normalized;
            apply_layout_boost(weights, batch, grid, boxes, beta);
            // The boost is affine per query; its slope is what apply_layout_boost does to (1 - 0).
            std::vector<double> ones(weights.size(), 1.0), zeros(weights.size(), 0.0);
            apply_layout_boost(ones, batch, grid, boxes, beta);
            apply_layout_boost(zeros, batch, grid, boxes, beta);
            const auto n = static_cast<std::size_t>(queries);
            s.gate_slope.assign(weights.size(), 0.0);
            s.normalised.assign(weights.size(), 0.0);
            for (std::size_t b = 0; b < static_cast<std::size_t>(batch); ++b) {
                const auto first = sums.begin() + static_cast<std::ptrdiff_t>(b * n);
                const auto [lo, hi] = std::minmax_element(first, first + static_cast<std::ptrdiff_t>(n));
                const double range = *hi - *lo;
                s.range.push_back(range);
                s.arg_min.push_back(static_cast<index_t>(lo - first));
                s.arg_max.push_back(static_cast<index_t>(hi - first));
                if (!(range > 0.0)) continue;
                for (std::size_t i = 0; i < n; ++i) {
                    const double w = (sums[b * n + i] - *lo) / range;
                    s.normalised[b * n + i] = w;
                    if (!(w < c.threshold)) s.gate_slope[b * n + i] = ones[b * n + i] - zeros[b * n + i];
                }
            }
            if (c.on_activation) {
                activation_record r{batch, grid, beta, std::vector<float>(normalized.begin(), normalized.end()),
                                    std::vector<float>(weights.begin(), weights.end())};
                c.on_activation(r);
            }
            const std::vector<T> gate_host(weights.begin(), weights.end());
            gate = tensor_type::from_host(ctx, {batch, queries, 1}, gate_host);
            if (mixing) {
                std::vector<T> factors(static_cast<std::size_t>(id_tokens), static_cast<T>(1.0 - *c.mix_scale));
                std::fill_n(factors.begin(), config_.tokens_per_id, static_cast<T>(*c.mix_scale));
                s.mix_factors = tensor_type::from_host(ctx, {1, 1, id_tokens}, factors);
                scores = ops::mul(ctx, scores, s.mix_factors);
            } else if (boxes.size() > 1) {
                scores = ops::add(ctx, scores, identity_mask(ctx, boxes, grid, id_tokens));
            }
        }
        auto [probs, sp] = ops::softmax_forward(ctx, scores);
        auto [id_heads, sv2] = ops::matmul_forward(ctx, probs, split_heads(ctx, v_ip, heads));
        s.probabilities = std::move(sp);
        s.id_values = std::move(sv2);
        auto id_out = merge_heads(ctx, id_heads, heads);
        if (gate.defined()) {
            auto [gated, sg] = ops::binary_forward(ctx, binary_op::mul, id_out, gate);
            id_out = gated;
            s.gating = std::move(sg);
        }
        const auto merged = ops::add_scaled(ctx, 1.0, text_out, c.id_scale, id_out);
        auto [y, so] = detail::with_lora_forward(ctx, a.to_out, a.to_out_lora, cfg, merged);
        s.out = std::move(so);
        return {y, std::move(s)};
    }

    grads backward(context_t<B>& ctx, const saved& s, const tensor_type& grad_output) const {
        using modules::detail::merge_heads;
        using modules::detail::split_heads;
        const index_t heads = config_.heads;
        check<shape_error>(grad_output.shape() == shape{s.batch, s.queries, hidden_}, "saa", "gradient ", grad_output.shape().str(),
                           " is not (", s.batch, ", ", s.queries, ", ", hidden_, ")");
        grads g;
        const auto d_merged = detail::with_lora_backward(ctx, s.out, grad_output, g.to_out_lora);
        auto d_id = ops::scale(ctx, d_merged, s.id_scale);
        tensor_type d_scores_gate;
        if (s.gated) {
            auto [d_out, d_gate] = ops::binary_backward(ctx, s.gating, d_id);
            d_id = d_out;
            // d w' -> d (summed scores) through the boost slope, the threshold mask and the min-max normalisation.
            const auto dg = d_gate.to_host(ctx);
            const auto n = static_cast<std::size_t>(s.queries);
            std::vector<T> d_sums(dg.size(), static_cast<T>(0));
            for (std::size_t b = 0; b < static_cast<std::size_t>(s.batch); ++b) {
                const double r = s.range[b];
                if (!(r > 0.0)) continue;
                std::vector<double> ds(n, 0.0);
                double d_min = 0.0, d_max = 0.0;
                for (std::size_t i = 0; i < n; ++i) {
                    const double dw = static_cast<double>(dg[b * n + i]) * s.gate_slope[b * n + i];
                    const double w = s.normalised[b * n + i];
                    ds[i] += dw / r;
                    d_min += dw * (w - 1.0) / r;
                    d_max -= dw * w / r;
                }
                ds[static_cast<std::size_t>(s.arg_min[b])] += d_min;
                ds[static_cast<std::size_t>(s.arg_max[b])] += d_max;
                for (std::size_t i = 0; i < n; ++i) d_sums[b * n + i] = static_cast<T>(ds[i]);
            }
            d_scores_gate = tensor_type::from_host(ctx, {s.batch, 1, s.queries, 1}, d_sums);
        }
        auto [d_probs, d_v_heads] = ops::matmul_backward(ctx, s.id_values, split_heads(ctx, d_id, heads));
        auto d_scores = ops::softmax_backward(ctx, s.probabilities, d_probs);
        if (s.mix_factors.defined()) d_scores = ops::mul(ctx, d_scores, s.mix_factors);
        if (d_scores_gate.defined())
            d_scores = ops::add(ctx, d_scores.reshape({s.batch, heads, s.queries, s.id_tokens}), d_scores_gate)
                           .reshape({s.batch * heads, s.queries, s.id_tokens});
        auto [d_q_ip, d_k_ip_heads] = ops::matmul_backward(ctx, s.scores, d_scores);
        const auto gk = ops::linear_backward(ctx, s.k_ip, merge_heads(ctx, d_k_ip_heads, heads));
        const auto gv = ops::linear_backward(ctx, s.v_ip, merge_heads(ctx, d_v_heads, heads));
        g.to_k_ip = gk.weight;
        g.to_v_ip = gv.weight;

        const auto d_text = ops::attention_backward(ctx, s.text_attention, split_heads(ctx, d_merged, heads));
        g.hidden_states = detail::with_lora_backward(ctx, s.q, merge_heads(ctx, ops::add(ctx, d_text.q, d_q_ip), heads), g.to_q_lora);
        const auto d_text_states = ops::add(ctx, detail::with_lora_backward(ctx, s.k, merge_heads(ctx, d_text.k, heads), g.to_k_lora),
                                            detail::with_lora_backward(ctx, s.v, merge_heads(ctx, d_text.v, heads), g.to_v_lora));
        g.encoder_hidden_states = ops::concat(ctx, std::vector<tensor_type>{d_text_states, ops::add(ctx, gk.input, gv.input)}, 1);
        return g;
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }
    index_t hidden_size() const noexcept { return hidden_; }
    index_t context_size() const noexcept { return context_; }

private:
    lora_attention_config base_config() const { return {config_.heads, config_.lora_scale, config_.network_alpha}; }

    /// (1, N, K): -inf on the tokens of every other boxed identity inside each box.
    tensor_type identity_mask(context_t<B>& ctx, const std::vector<box>& boxes, grid_shape g, index_t id_tokens) const {
        const index_t n = g.height * g.width, per = config_.tokens_per_id;
        std::vector<T> mask(static_cast<std::size_t>(n * id_tokens), static_cast<T>(0));
        for (std::size_t owner = 0; owner < boxes.size(); ++owner) {
            const auto cb = to_cells(boxes[owner], g);
            for (index_t y = cb.y0; y < std::min(cb.y1, g.height); ++y)
                for (index_t x = cb.x0; x < std::min(cb.x1, g.width); ++x)
                    for (std::size_t other = 0; other < boxes.size(); ++other) {
                        if (other == owner) continue;
                        const auto first = static_cast<index_t>(other) * per;
                        for (index_t t = first; t < first + per; ++t)
                            mask[static_cast<std::size_t>((y * g.width + x) * id_tokens + t)] = -std::numeric_limits<T>::infinity();
                    }
        }
        return tensor_type::from_host(ctx, {1, n, id_tokens}, mask);
    }

    config config_;
    params params_;
    index_t hidden_ = 0, context_ = 0;
};

}  // namespace dynamicid::modules::saa
