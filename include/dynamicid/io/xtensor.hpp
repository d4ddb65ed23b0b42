// dynamicid: copies between dynamicid tensors and xtensor arrays, and a
// zero-copy xtensor view for backends whose memory the host can address.
//
// Copies go through to_host / from_host, so they work for any backend. The
// zero-copy view needs both a raw `T*` pointer type and an explicit promise
// that the memory is host memory: a device pointer is also a raw `T*` on some
// backends, and reading it from the host would fault or return garbage.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/shape.hpp>
#include <dynamicid/core/tensor.hpp>

#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xexpression.hpp>

#include <cstddef>
#include <span>
#include <type_traits>
#include <vector>

namespace dynamicid {

/// Specialise to true for a backend whose buffers live in ordinary host
/// memory, to enable host_view. The CPU backend's specialisation lives in
/// <dynamicid/backends/cpu/xtensor.hpp>.
///
///     template <> inline constexpr bool dynamicid::is_host_memory<my_host_backend> = true;
template <class B>
inline constexpr bool is_host_memory = false;

/// Backends (and element types) for which host_view may alias storage.
template <class B, class T>
concept host_addressable = backend<B> && is_host_memory<B> && std::is_same_v<pointer_t<B, T>, T*>;

namespace detail {

template <class Shape>
dynamicid::shape shape_from_xtensor(const Shape& xshape) {
    check<shape_error>(xshape.size() <= static_cast<std::size_t>(max_rank), "xtensor", "rank ", xshape.size(),
                       " exceeds the maximum of ", max_rank);
    std::vector<index_t> dims;
    dims.reserve(xshape.size());
    for (auto d : xshape) dims.push_back(static_cast<index_t>(d));
    return dynamicid::shape(dims);
}

inline std::vector<std::size_t> xtensor_shape(const dynamicid::shape& s) {
    std::vector<std::size_t> out;
    out.reserve(static_cast<std::size_t>(s.rank()));
    for (index_t d : s) out.push_back(static_cast<std::size_t>(d));
    return out;
}

}  // namespace detail

/// Copies a tensor into a new row-major xt::xarray (waits for the backend).
///
///     xt::xarray<float> a = dynamicid::to_xtensor(ctx, x);   // a.shape() == x.shape()
template <class B, class T>
    requires backend<B>
xt::xarray<T> to_xtensor(context_t<B>& ctx, const tensor<B, T>& t) {
    xt::xarray<T> out = xt::xarray<T>::from_shape(detail::xtensor_shape(t.shape()));
    const std::vector<T> host = t.to_host(ctx);
    std::copy(host.begin(), host.end(), out.begin());
    return out;
}

/// Evaluates an xtensor expression and copies it, row-major, into a new tensor.
/// shape_error when its rank exceeds max_rank.
///
///     xt::xarray<float> a = {{1, 2}, {3, 4}};
///     auto x = dynamicid::from_xtensor<dynamicid::cpu_backend>(ctx, a * 2.0f);   // shape (2, 2)
template <class B, class E>
    requires backend<B>
tensor<B, typename E::value_type> from_xtensor(context_t<B>& ctx, const xt::xexpression<E>& expr) {
    using T = typename E::value_type;
    // Assigning into a row-major container evaluates lazy expressions and
    // reorders column-major or strided sources in one step.
    const xt::xarray<T, xt::layout_type::row_major> values = expr.derived_cast();
    const dynamicid::shape s = detail::shape_from_xtensor(values.shape());
    return tensor<B, T>::from_host(ctx, s, std::span<const T>(values.data(), values.size()));
}

/// As from_xtensor, but shape_error unless the expression has shape `expected`.
///
///     auto w = dynamicid::from_xtensor<dynamicid::cpu_backend>(ctx, a, {320, 4, 3, 3});
template <class B, class E>
    requires backend<B>
tensor<B, typename E::value_type> from_xtensor(context_t<B>& ctx, const xt::xexpression<E>& expr,
                                               const dynamicid::shape& expected) {
    const auto& derived = expr.derived_cast();
    const dynamicid::shape got = detail::shape_from_xtensor(derived.shape());
    check<shape_error>(got == expected, "xtensor", "expected shape ", expected.str(), ", got ", got.str());
    return from_xtensor<B>(ctx, expr);
}

/// A read-only xtensor view over the tensor's own storage: no copy, so it
/// sees later writes to that storage and must not outlive it. Only for
/// backends with is_host_memory (see host_addressable).
///
///     #include <dynamicid/backends/cpu/xtensor.hpp>
///     auto v = dynamicid::host_view(x);   // v(0, 1) reads x's element (0, 1) in place
template <class B, class T>
    requires host_addressable<B, T>
auto host_view(const tensor<B, T>& t) {
    const T* p = t.data();
    return xt::adapt(p, static_cast<std::size_t>(t.numel()), xt::no_ownership(), detail::xtensor_shape(t.shape()));
}

}  // namespace dynamicid
