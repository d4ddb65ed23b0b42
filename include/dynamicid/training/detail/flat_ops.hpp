// dynamicid training (internal): element-wise kernels over flat buffers, built
// from the backend's primitives so that optimizer state stays on the device.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/tensor.hpp>

#include <cstddef>
#include <type_traits>

namespace dynamicid::training::detail {

// Same-shape operands, or a one-element `b` broadcast over all n (scalar_b).
inline binary_desc flat_binary_desc(index_t n, bool scalar_b = false) {
    binary_desc d;
    d.rank = 1;
    d.shape[0] = n;
    d.a_strides[0] = 1;
    d.b_strides[0] = scalar_b ? 0 : 1;
    return d;
}

template <class B, class T>
tensor<B, T> flat_empty(context_t<B>& ctx, index_t n) {
    return tensor<B, T>::empty(ctx, shape({n}));
}

// A copy of `t` converted to U (a copy even when U == T).
template <class U, class B, class T>
tensor<B, U> converted_copy(context_t<B>& ctx, const tensor<B, T>& t) {
    auto out = tensor<B, U>::empty(ctx, t.shape());
    const auto n = static_cast<std::size_t>(t.numel());
    if (n == 0) return out;
    if constexpr (std::is_same_v<U, T>) B::copy(ctx, const_pointer_t<B, T>(t.data()), out.data(), n);
    else B::convert(ctx, const_pointer_t<B, T>(t.data()), out.data(), n);
    return out;
}

// t itself when it is already U (shared storage), else a converted copy.
template <class U, class B, class T>
tensor<B, U> as_element(context_t<B>& ctx, const tensor<B, T>& t) {
    if constexpr (std::is_same_v<U, T>) return t;
    else return converted_copy<U>(ctx, t);
}

// Sum of all elements, read back to the host in U.
template <class B, class U>
U sum_to_host(context_t<B>& ctx, const tensor<B, U>& t) {
    reduce_desc d;
    d.rank = 1;
    d.shape[0] = t.numel();
    d.reduce[0] = true;
    auto out = tensor<B, U>::empty(ctx, shape({1}));
    B::reduce_forward(ctx, d, const_pointer_t<B, U>(t.data()), out.data());
    return out.to_host(ctx)[0];
}

// Sum of squares in U (the accumulation type), read back to the host.
template <class U, class B, class T>
double sum_of_squares(context_t<B>& ctx, const tensor<B, T>& g) {
    const index_t n = g.numel();
    if (n == 0) return 0.0;
    const auto ga = as_element<U>(ctx, g);
    auto sq = flat_empty<B, U>(ctx, n);
    B::binary_forward(ctx, binary_op::mul, flat_binary_desc(n), const_pointer_t<B, U>(ga.data()),
                      const_pointer_t<B, U>(ga.data()), sq.data());
    return static_cast<double>(sum_to_host(ctx, sq));
}

// True when every element is finite: sum(x * 0) is NaN exactly when some x is inf or NaN,
// and unlike sum(x) it cannot overflow.
template <class B, class T>
bool all_finite(context_t<B>& ctx, const tensor<B, T>& g) {
    const index_t n = g.numel();
    if (n == 0) return true;
    const auto zero = tensor<B, T>::full(ctx, shape({1}), element_cast<T>(0.0f));
    auto prod = flat_empty<B, T>(ctx, n);
    B::binary_forward(ctx, binary_op::mul, flat_binary_desc(n, true), const_pointer_t<B, T>(g.data()),
                      const_pointer_t<B, T>(zero.data()), prod.data());
    const double s = static_cast<double>(element_cast<accum_t<T>>(sum_to_host(ctx, prod)));
    return s == 0.0;
}

// x *= alpha in place (element-wise, so reading and writing the same element is safe).
template <class B, class T>
void scale_in_place(context_t<B>& ctx, const tensor<B, T>& x, double alpha) {
    const auto n = static_cast<std::size_t>(x.numel());
    if (n) B::axpby(ctx, n, alpha, const_pointer_t<B, T>(x.data()), 0.0, x.data());
}

}  // namespace dynamicid::training::detail
