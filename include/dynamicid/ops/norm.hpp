// dynamicid ops: group and layer normalisation with backward.
#pragma once

#include <dynamicid/ops/common.hpp>

#include <type_traits>

namespace dynamicid::ops {

template <class B, class T>
struct norm_saved {
    tensor<B, T> input, gamma;
    tensor<B, accum_t<T>> mean, rstd;
};

template <class B, class T>
struct norm_grads {
    tensor<B, T> input, gamma, beta;
};

namespace detail {
template <class B, class T>
group_norm_desc make_group_norm_desc(const tensor<B, T>& x, index_t groups, double eps) {
    check<shape_error>(x.rank() >= 2, "group_norm", "expects (N, C, ...), got ", x.shape().str());
    check<shape_error>(groups >= 1 && x.dim(1) % groups == 0, "group_norm", x.dim(1), " channels not divisible into ", groups,
                       " groups");
    return {.n = x.dim(0), .c = x.dim(1), .spatial = x.dim(1) ? x.numel() / (x.dim(0) * x.dim(1)) : 0, .groups = groups, .eps = eps};
}
template <class B, class T>
void check_affine(const char* who, const tensor<B, T>* p, index_t features) {
    if (p && p->defined())
        check<shape_error>(p->rank() == 1 && p->dim(0) == features, who, "affine parameter ", p->shape().str(), " for ", features,
                           " features");
}
template <class B, class T>
const_pointer_t<B, T> ptr_or_null(const tensor<B, T>* p) {
    return p && p->defined() ? const_pointer_t<B, T>(p->data()) : const_pointer_t<B, T>{};
}
}  // namespace detail

/// torch.nn.GroupNorm on (N, C, ...); gamma/beta (C) may be null.
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, norm_saved<B, T>> group_norm_forward(context_t<B>& ctx, const tensor<B, T>& x, index_t groups,
                                                             const std::type_identity_t<tensor<B, T>>* gamma, const std::type_identity_t<tensor<B, T>>* beta,
                                                             double eps = 1e-5) {
    const auto d = detail::make_group_norm_desc(x, groups, eps);
    detail::check_affine("group_norm", gamma, d.c);
    detail::check_affine("group_norm", beta, d.c);
    auto y = empty_like(ctx, x);
    auto mean = tensor<B, accum_t<T>>::empty(ctx, {d.n, groups});
    auto rstd = tensor<B, accum_t<T>>::empty(ctx, {d.n, groups});
    B::group_norm_forward(ctx, d, x.data(), detail::ptr_or_null(gamma), detail::ptr_or_null(beta), y.data(), mean.data(),
                          rstd.data());
    return {y, norm_saved<B, T>{x, gamma ? *gamma : tensor<B, T>{}, mean, rstd}};
}

template <class B, class T>
tensor<B, T> group_norm(context_t<B>& ctx, const tensor<B, T>& x, index_t groups, const std::type_identity_t<tensor<B, T>>* gamma,
                        const std::type_identity_t<tensor<B, T>>* beta, double eps = 1e-5) {
    return group_norm_forward(ctx, x, groups, gamma, beta, eps).first;
}

template <class B, class T>
    requires computes_in<B, T>
norm_grads<B, T> group_norm_backward(context_t<B>& ctx, const norm_saved<B, T>& saved, const tensor<B, T>& grad_output,
                                     needs need = {}) {
    check_same_shape("group_norm", saved.input, grad_output);
    const auto d = detail::make_group_norm_desc(saved.input, saved.mean.dim(1), 0.0);
    norm_grads<B, T> g;
    if (need.input) g.input = empty_like(ctx, saved.input);
    if (need.params) {
        g.gamma = tensor<B, T>::empty(ctx, {d.c});
        g.beta = tensor<B, T>::empty(ctx, {d.c});
    }
    B::group_norm_backward(ctx, d, saved.input.data(), detail::ptr_or_null(&saved.gamma), saved.mean.data(), saved.rstd.data(),
                           grad_output.data(), need.input ? g.input.data() : pointer_t<B, T>{},
                           need.params ? g.gamma.data() : pointer_t<B, T>{}, need.params ? g.beta.data() : pointer_t<B, T>{});
    return g;
}

/// torch.nn.LayerNorm over the last axis; gamma/beta (C) may be null.
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, norm_saved<B, T>> layer_norm_forward(context_t<B>& ctx, const tensor<B, T>& x, const std::type_identity_t<tensor<B, T>>* gamma,
                                                             const std::type_identity_t<tensor<B, T>>* beta, double eps = 1e-5) {
    check<shape_error>(x.rank() >= 1, "layer_norm", "needs rank >= 1");
    const layer_norm_desc d{.rows = x.dim(-1) ? x.numel() / x.dim(-1) : 0, .cols = x.dim(-1), .eps = eps};
    detail::check_affine("layer_norm", gamma, d.cols);
    detail::check_affine("layer_norm", beta, d.cols);
    auto y = empty_like(ctx, x);
    auto mean = tensor<B, accum_t<T>>::empty(ctx, {d.rows});
    auto rstd = tensor<B, accum_t<T>>::empty(ctx, {d.rows});
    B::layer_norm_forward(ctx, d, x.data(), detail::ptr_or_null(gamma), detail::ptr_or_null(beta), y.data(), mean.data(),
                          rstd.data());
    return {y, norm_saved<B, T>{x, gamma ? *gamma : tensor<B, T>{}, mean, rstd}};
}

template <class B, class T>
tensor<B, T> layer_norm(context_t<B>& ctx, const tensor<B, T>& x, const std::type_identity_t<tensor<B, T>>* gamma, const std::type_identity_t<tensor<B, T>>* beta,
                        double eps = 1e-5) {
    return layer_norm_forward(ctx, x, gamma, beta, eps).first;
}

template <class B, class T>
    requires computes_in<B, T>
norm_grads<B, T> layer_norm_backward(context_t<B>& ctx, const norm_saved<B, T>& saved, const tensor<B, T>& grad_output,
                                     needs need = {}) {
    check_same_shape("layer_norm", saved.input, grad_output);
    const auto& x = saved.input;
    const layer_norm_desc d{.rows = x.dim(-1) ? x.numel() / x.dim(-1) : 0, .cols = x.dim(-1)};
    norm_grads<B, T> g;
    if (need.input) g.input = empty_like(ctx, x);
    if (need.params) {
        g.gamma = tensor<B, T>::empty(ctx, {d.cols});
        g.beta = tensor<B, T>::empty(ctx, {d.cols});
    }
    B::layer_norm_backward(ctx, d, x.data(), detail::ptr_or_null(&saved.gamma), saved.mean.data(), saved.rstd.data(),
                           grad_output.data(), need.input ? g.input.data() : pointer_t<B, T>{},
                           need.params ? g.gamma.data() : pointer_t<B, T>{}, need.params ? g.beta.data() : pointer_t<B, T>{});
    return g;
}

}  // namespace dynamicid::ops
