// dynamicid ops: what every op shares.
//
// An op comes in three forms:
//   y = ops::silu(ctx, x);                          // inference
//   auto [y, saved] = ops::silu_forward(ctx, x);    // training: keeps what backward needs
//   auto dx = ops::silu_backward(ctx, saved, dy);   // vector-Jacobian product
// `saved` is a plain struct of tensors (shared, not copied). Ops with
// parameters take a `needs` telling which gradients backward will be asked
// for, so a frozen layer saves nothing it does not need.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>

#include <optional>

namespace dynamicid {

/// B computes in T: the constraint every op template carries.
template <class B, class T>
concept computes_in = backend<B> && supports_element<B, T>;

namespace ops {

/// Which gradients a backward will be asked for.
struct needs {
    bool input = true;   ///< gradient w.r.t. the activation input(s)
    bool params = true;  ///< gradients w.r.t. weights and biases
};

/// Allocates an output shaped like `like`.
template <class B, class T>
tensor<B, T> empty_like(context_t<B>& ctx, const tensor<B, T>& like) {
    return tensor<B, T>::empty(ctx, like.shape());
}

/// Throws shape_error unless a and b have the same shape.
template <class B, class T>
void check_same_shape(const char* component, const tensor<B, T>& a, const tensor<B, T>& b) {
    check<shape_error>(a.shape() == b.shape(), component, "shape mismatch: ", a.shape().str(), " vs ", b.shape().str());
}

}  // namespace ops
}  // namespace dynamicid
