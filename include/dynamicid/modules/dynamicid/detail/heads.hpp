// dynamicid modules (internal): multi-head layout helpers shared by the
// DynamicID modules (SAA processors, IMR). Not part of the public API.
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/ops.hpp>

#include <memory>
#include <string>
#include <string_view>

namespace dynamicid::modules::detail {

/// (B, n, heads * d) -> (B * heads, n, d)
template <class B, class T>
tensor<B, T> split_heads(context_t<B>& ctx, const tensor<B, T>& t, index_t heads) {
    const index_t batch = t.dim(0), n = t.dim(1), d = t.dim(2) / heads;
    return ops::permute(ctx, t.reshape({batch, n, heads, d}), {0, 2, 1, 3}).reshape({batch * heads, n, d});
}

/// (B * heads, n, d) -> (B, n, heads * d)
template <class B, class T>
tensor<B, T> merge_heads(context_t<B>& ctx, const tensor<B, T>& t, index_t heads) {
    const index_t batch = t.dim(0) / heads, n = t.dim(1), d = t.dim(2);
    return ops::permute(ctx, t.reshape({batch, heads, n, d}), {0, 2, 1, 3}).reshape({batch, n, heads * d});
}

/// Throws shape_error unless `t` is defined with exactly shape `s` (weights built by hand).
template <class B, class T>
void expect_weight(std::string_view component, const tensor<B, T>& t, const shape& s, const std::string& what) {
    check<shape_error>(t.defined(), component, "weight ", what, " is missing");
    check<shape_error>(t.shape() == s, component, "weight ", what, " has shape ", t.shape().str(), ", expected ", s.str());
}

}  // namespace dynamicid::modules::detail
