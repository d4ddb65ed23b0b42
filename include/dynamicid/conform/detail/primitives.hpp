// dynamicid conformance: handlers for the torch primitive cases.
//
// Every handler computes the forward output "y" and, when the case carries
// `input.grad_output`, the gradients "grad_<name>" of
// loss = sum(y * grad_output) for each input and parameter, through the ops'
// backward functions.
#pragma once

#include <dynamicid/conform/detail/golden_case.hpp>
#include <dynamicid/ops.hpp>

#include <numeric>
#include <string>
#include <vector>

namespace dynamicid::conform::detail {

/// An integer hyper-parameter torch may spell as `n` or `[n, n]`.
inline index_t square_setting(const golden_case& g, const std::string& key, index_t fallback) {
    if (!g.has_setting(key)) return fallback;
    const auto& v = g.config()[key];
    if (v.is_number_integer()) return v.get<index_t>();
    if (v.is_array() && v.size() == 2 && v[0].is_number_integer() && v[0] == v[1]) return v[0].get<index_t>();
    throw unsupported_error("conform", g.file_name() + ": \"" + key + "\" must be an integer or an equal pair");
}

/// The gradient tensor for the backward pass, or an undefined tensor when the case has none.
template <class B, class T>
tensor<B, T> grad_output_of(context_t<B>& ctx, const golden_case& g) {
    return g.has("input.grad_output") ? g.template load<B, T>(ctx, "input.grad_output") : tensor<B, T>{};
}

template <class B, class T>
tensor<B, T> optional_param(context_t<B>& ctx, const golden_case& g, const std::string& name) {
    return g.has(name) ? g.template load<B, T>(ctx, name) : tensor<B, T>{};
}

template <class B, class T>
void put(output_map<B>& out, const std::string& name, const tensor<B, T>& t) {
    if (t.defined()) out.insert_or_assign(name, any_tensor<B>(t));
}

// ---- linear algebra ----------------------------------------------------------------

template <class B, class T>
output_map<B> linear_case(context_t<B>& ctx, const golden_case& g) {
    const auto x = g.template load<B, T>(ctx, "input.x");
    const auto w = g.template load<B, T>(ctx, "param.weight");
    const auto b = optional_param<B, T>(ctx, g, "param.bias");
    auto [y, saved] = ops::linear_forward(ctx, x, w, b.defined() ? &b : nullptr);
    output_map<B> out;
    put(out, "y", y);
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) {
        const auto grads = ops::linear_backward(ctx, saved, go);
        put(out, "grad_x", grads.input);
        put(out, "grad_weight", grads.weight);
        put(out, "grad_bias", grads.bias);
    }
    return out;
}

template <class B, class T>
output_map<B> matmul_case(context_t<B>& ctx, const golden_case& g) {
    const auto a = g.template load<B, T>(ctx, "input.a");
    const auto b = g.template load<B, T>(ctx, "input.b");
    auto [y, saved] = ops::matmul_forward(ctx, a, b, g.setting<bool>("transpose_a", false), g.setting<bool>("transpose_b", false));
    output_map<B> out;
    put(out, "y", y);
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) {
        const auto [da, db] = ops::matmul_backward(ctx, saved, go);
        put(out, "grad_a", da);
        put(out, "grad_b", db);
    }
    return out;
}

template <class B, class T>
output_map<B> conv2d_case(context_t<B>& ctx, const golden_case& g) {
    const auto x = g.template load<B, T>(ctx, "input.x");
    const auto w = g.template load<B, T>(ctx, "param.weight");
    const auto b = optional_param<B, T>(ctx, g, "param.bias");
    const ops::conv2d_options options{.stride = square_setting(g, "stride", 1), .padding = square_setting(g, "padding", 0),
                                      .dilation = square_setting(g, "dilation", 1), .groups = g.setting<index_t>("groups", 1)};
    auto [y, saved] = ops::conv2d_forward(ctx, x, w, b.defined() ? &b : nullptr, options);
    output_map<B> out;
    put(out, "y", y);
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) {
        const auto grads = ops::conv2d_backward(ctx, saved, go);
        put(out, "grad_x", grads.input);
        put(out, "grad_weight", grads.weight);
        put(out, "grad_bias", grads.bias);
    }
    return out;
}

// ---- normalisation and softmax --------------------------------------------------------

template <class B, class T>
output_map<B> group_norm_case(context_t<B>& ctx, const golden_case& g) {
    const auto x = g.template load<B, T>(ctx, "input.x");
    const auto w = optional_param<B, T>(ctx, g, "param.weight");
    const auto b = optional_param<B, T>(ctx, g, "param.bias");
    auto [y, saved] = ops::group_norm_forward(ctx, x, g.setting<index_t>("num_groups"), w.defined() ? &w : nullptr,
                                              b.defined() ? &b : nullptr, g.setting<double>("eps", 1e-5));
    output_map<B> out;
    put(out, "y", y);
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) {
        const auto grads = ops::group_norm_backward(ctx, saved, go);
        put(out, "grad_x", grads.input);
        if (w.defined()) put(out, "grad_weight", grads.gamma);
        if (b.defined()) put(out, "grad_bias", grads.beta);
    }
    return out;
}

/// torch layer_norm over the trailing `normalized_shape` axes, lowered to the
/// op's last-axis form by flattening those axes.
template <class B, class T>
output_map<B> layer_norm_case(context_t<B>& ctx, const golden_case& g) {
    const auto x = g.template load<B, T>(ctx, "input.x");
    const auto normalized = g.setting<std::vector<index_t>>("normalized_shape");
    check<shape_error>(!normalized.empty() && static_cast<int>(normalized.size()) <= x.rank(), "conform",
                       g.file_name(), ": normalized_shape does not fit input ", x.shape().str());
    const index_t cols = std::accumulate(normalized.begin(), normalized.end(), index_t{1}, std::multiplies<>{});
    auto w = optional_param<B, T>(ctx, g, "param.weight");
    auto b = optional_param<B, T>(ctx, g, "param.bias");
    if (w.defined()) w = w.reshape({cols});
    if (b.defined()) b = b.reshape({cols});
    auto [y, saved] = ops::layer_norm_forward(ctx, x.reshape({-1, cols}), w.defined() ? &w : nullptr, b.defined() ? &b : nullptr,
                                              g.setting<double>("eps", 1e-5));
    output_map<B> out;
    put(out, "y", y.reshape(x.shape().to_vector()));
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) {
        const auto grads = ops::layer_norm_backward(ctx, saved, go.reshape({-1, cols}));
        put(out, "grad_x", grads.input.reshape(x.shape().to_vector()));
        if (w.defined()) put(out, "grad_weight", grads.gamma.reshape(normalized));
        if (b.defined()) put(out, "grad_bias", grads.beta.reshape(normalized));
    }
    return out;
}

/// Softmax along any axis: the axis is swapped to the end and back.
template <class B, class T>
output_map<B> softmax_case(context_t<B>& ctx, const golden_case& g) {
    const auto x = g.template load<B, T>(ctx, "input.x");
    const int axis = x.shape().normalise(g.setting<int>("dim", -1));
    std::vector<int> perm(static_cast<std::size_t>(x.rank()));
    std::iota(perm.begin(), perm.end(), 0);
    std::swap(perm[static_cast<std::size_t>(axis)], perm.back());
    const bool last = axis == x.rank() - 1;
    auto [yp, saved] = ops::softmax_forward(ctx, last ? x : ops::permute(ctx, x, perm));
    output_map<B> out;
    put(out, "y", last ? yp : ops::permute(ctx, yp, perm));
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) {
        const auto dxp = ops::softmax_backward(ctx, saved, last ? go : ops::permute(ctx, go, perm));
        put(out, "grad_x", last ? dxp : ops::permute(ctx, dxp, perm));
    }
    return out;
}

// ---- pointwise -------------------------------------------------------------------------

template <class B, class T>
output_map<B> unary_case(context_t<B>& ctx, const golden_case& g, unary_op op) {
    const auto x = g.template load<B, T>(ctx, "input.x");
    auto [y, saved] = ops::unary_forward(ctx, op, x);
    output_map<B> out;
    put(out, "y", y);
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) put(out, "grad_x", ops::unary_backward(ctx, saved, go));
    return out;
}

/// torch.nn.functional.gelu: "approximate" is "none" (erf) or "tanh".
inline unary_op gelu_kind(const golden_case& g) {
    const auto approximate = g.setting<std::string>("approximate", "none");
    if (approximate == "none") return unary_op::gelu_erf;
    if (approximate == "tanh") return unary_op::gelu_tanh;
    throw unsupported_error("conform", g.file_name() + ": gelu approximate=\"" + approximate + "\"");
}

template <class B, class T>
output_map<B> geglu_case(context_t<B>& ctx, const golden_case& g) {
    const auto x = g.template load<B, T>(ctx, "input.x");
    auto [y, saved] = ops::geglu_forward(ctx, x);
    output_map<B> out;
    put(out, "y", y);
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) put(out, "grad_x", ops::geglu_backward(ctx, saved, go));
    return out;
}

template <class B, class T>
output_map<B> binary_case(context_t<B>& ctx, const golden_case& g, binary_op op) {
    const auto a = g.template load<B, T>(ctx, "input.a");
    const auto b = g.template load<B, T>(ctx, "input.b");
    auto [y, saved] = ops::binary_forward(ctx, op, a, b);
    output_map<B> out;
    put(out, "y", y);
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) {
        const auto [da, db] = ops::binary_backward(ctx, saved, go);
        put(out, "grad_a", da);
        put(out, "grad_b", db);
    }
    return out;
}

/// torch.sum / torch.mean over "dim" (an axis, a list, or absent for all) with "keepdim".
template <class B, class T>
output_map<B> reduce_case(context_t<B>& ctx, const golden_case& g, bool mean) {
    const auto x = g.template load<B, T>(ctx, "input.x");
    std::vector<int> axes;
    if (!g.has_setting("dim")) {
        axes.resize(static_cast<std::size_t>(x.rank()));
        std::iota(axes.begin(), axes.end(), 0);
    } else if (g.config()["dim"].is_array()) {
        axes = g.setting<std::vector<int>>("dim");
    } else {
        axes = {g.setting<int>("dim")};
    }
    auto [y, saved] = ops::reduce_forward(ctx, x, axes, mean);
    const auto kept = y.shape().to_vector();
    std::vector<index_t> dropped;
    std::vector<bool> reduced(static_cast<std::size_t>(x.rank()), false);
    for (int a : axes) reduced[static_cast<std::size_t>(x.shape().normalise(a))] = true;
    for (int i = 0; i < x.rank(); ++i)
        if (!reduced[static_cast<std::size_t>(i)]) dropped.push_back(x.dim(i));
    const bool keepdim = g.setting<bool>("keepdim", false);
    output_map<B> out;
    put(out, "y", keepdim ? y : y.reshape(dropped));
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined())
        put(out, "grad_x", ops::reduce_backward(ctx, saved, go.reshape(kept)));
    return out;
}

// ---- layout ----------------------------------------------------------------------------

template <class B, class T>
output_map<B> permute_case(context_t<B>& ctx, const golden_case& g) {
    const auto x = g.template load<B, T>(ctx, "input.x");
    auto [y, saved] = ops::permute_forward(ctx, x, g.setting<std::vector<int>>("dims"));
    output_map<B> out;
    put(out, "y", y);
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) put(out, "grad_x", ops::permute_backward(ctx, saved, go));
    return out;
}

/// torch.cat of the inputs named in "inputs" (default: input.x0, input.x1, ... in order).
template <class B, class T>
output_map<B> cat_case(context_t<B>& ctx, const golden_case& g) {
    std::vector<std::string> names;
    if (g.has_setting("inputs")) {
        names = g.setting<std::vector<std::string>>("inputs");
    } else {
        for (int i = 0; g.has("input.x" + std::to_string(i)); ++i) names.push_back("x" + std::to_string(i));
    }
    check<value_error>(!names.empty(), "conform", g.file_name(), ": torch.cat case without inputs");
    std::vector<tensor<B, T>> parts;
    for (const auto& n : names) parts.push_back(g.template load<B, T>(ctx, "input." + n));
    auto [y, saved] = ops::concat_forward(ctx, parts, g.setting<int>("dim", 0));
    output_map<B> out;
    put(out, "y", y);
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) {
        const auto grads = ops::concat_backward(ctx, saved, go);
        for (std::size_t i = 0; i < names.size(); ++i) put(out, "grad_" + names[i], grads[i]);
    }
    return out;
}

/// torch.nn.functional.interpolate, mode "nearest" with an integer scale factor.
template <class B, class T>
output_map<B> interpolate_case(context_t<B>& ctx, const golden_case& g) {
    const auto mode = g.setting<std::string>("mode", "nearest");
    if (mode != "nearest") throw unsupported_error("conform", g.file_name() + ": interpolate mode \"" + mode + "\"");
    const double factor = g.setting<double>("scale_factor");
    const auto whole = static_cast<index_t>(factor);
    if (static_cast<double>(whole) != factor || whole < 1)
        throw unsupported_error("conform", g.file_name() + ": interpolate needs an integer scale_factor");
    const auto x = g.template load<B, T>(ctx, "input.x");
    auto [y, saved] = ops::upsample_nearest_forward(ctx, x, whole);
    output_map<B> out;
    put(out, "y", y);
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined())
        put(out, "grad_x", ops::upsample_nearest_backward(ctx, saved, go));
    return out;
}

// ---- attention -------------------------------------------------------------------------

/// torch.nn.functional.scaled_dot_product_attention without mask or dropout;
/// leading axes (batch, heads, ...) fold into one batch axis.
template <class B, class T>
output_map<B> sdpa_case(context_t<B>& ctx, const golden_case& g) {
    check<unsupported_error>(!g.has_setting("attn_mask") && !g.setting<bool>("is_causal", false) &&
                                 g.setting<double>("dropout_p", 0.0) == 0.0,
                             "conform", g.file_name(), ": masks, causal attention and dropout are not supported");
    const auto q = g.template load<B, T>(ctx, "input.q");
    const auto k = g.template load<B, T>(ctx, "input.k");
    const auto v = g.template load<B, T>(ctx, "input.v");
    check<shape_error>(q.rank() >= 3 && k.rank() == q.rank() && v.rank() == q.rank(), "conform", g.file_name(),
                       ": q, k, v need the same rank >= 3");
    const auto flat = [](const tensor<B, T>& t) { return t.reshape({-1, t.dim(-2), t.dim(-1)}); };
    const double scale = g.setting<double>("scale", 0.0);
    auto [y, saved] = ops::attention_forward(ctx, flat(q), flat(k), flat(v), scale);
    auto out_dims = q.shape().to_vector();
    out_dims.back() = v.dim(-1);
    output_map<B> out;
    put(out, "y", y.reshape(out_dims));
    if (const auto go = grad_output_of<B, T>(ctx, g); go.defined()) {
        const auto grads = ops::attention_backward(ctx, saved, flat(go));
        put(out, "grad_q", grads.q.reshape(q.shape().to_vector()));
        put(out, "grad_k", grads.k.reshape(k.shape().to_vector()));
        put(out, "grad_v", grads.v.reshape(v.shape().to_vector()));
    }
    return out;
}

}  // namespace dynamicid::conform::detail
