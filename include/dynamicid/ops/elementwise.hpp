// dynamicid ops: broadcasting binary ops, scaled sums and reductions, each with its backward.
#pragma once

#include <dynamicid/ops/common.hpp>

#include <algorithm>
#include <vector>

namespace dynamicid::ops {

namespace detail {
template <class B, class T>
binary_desc make_binary_desc(const tensor<B, T>& a, const tensor<B, T>& b, shape& out) {
    out = broadcast_shapes(a.shape(), b.shape());
    binary_desc d;
    d.rank = out.rank();
    for (int i = 0; i < out.rank(); ++i) d.shape[static_cast<std::size_t>(i)] = out[i];
    d.a_strides = broadcast_strides(a.shape(), out);
    d.b_strides = broadcast_strides(b.shape(), out);
    return d;
}
}  // namespace detail

template <class B, class T>
struct binary_saved {
    binary_op op{};
    tensor<B, T> a, b;
};

/// y = a op b with numpy broadcasting.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> binary(context_t<B>& ctx, binary_op op, const tensor<B, T>& a, const tensor<B, T>& b) {
    shape out;
    const auto d = detail::make_binary_desc(a, b, out);
    auto y = tensor<B, T>::empty(ctx, out);
    B::binary_forward(ctx, op, d, a.data(), b.data(), y.data());
    return y;
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, binary_saved<B, T>> binary_forward(context_t<B>& ctx, binary_op op, const tensor<B, T>& a,
                                                           const tensor<B, T>& b) {
    return {binary(ctx, op, a, b), binary_saved<B, T>{op, a, b}};
}

/// Gradients for a and b, each in its own (un-broadcast) shape.
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, tensor<B, T>> binary_backward(context_t<B>& ctx, const binary_saved<B, T>& saved,
                                                      const tensor<B, T>& grad_output, needs need = {}) {
    shape out;
    const auto d = detail::make_binary_desc(saved.a, saved.b, out);
    check<shape_error>(out == grad_output.shape(), "binary", "gradient shape ", grad_output.shape().str(), " is not ", out.str());
    tensor<B, T> da, db;
    if (need.input) da = empty_like(ctx, saved.a);
    if (need.params) db = empty_like(ctx, saved.b);
    B::binary_backward(ctx, saved.op, d, saved.a.data(), saved.b.data(), grad_output.data(),
                       need.input ? da.data() : pointer_t<B, T>{}, need.params ? db.data() : pointer_t<B, T>{});
    return {da, db};
}

template <class B, class T>
tensor<B, T> add(context_t<B>& ctx, const tensor<B, T>& a, const tensor<B, T>& b) { return binary(ctx, binary_op::add, a, b); }
template <class B, class T>
tensor<B, T> sub(context_t<B>& ctx, const tensor<B, T>& a, const tensor<B, T>& b) { return binary(ctx, binary_op::sub, a, b); }
template <class B, class T>
tensor<B, T> mul(context_t<B>& ctx, const tensor<B, T>& a, const tensor<B, T>& b) { return binary(ctx, binary_op::mul, a, b); }
template <class B, class T>
tensor<B, T> div(context_t<B>& ctx, const tensor<B, T>& a, const tensor<B, T>& b) { return binary(ctx, binary_op::div, a, b); }

/// alpha * x + beta * y, a new tensor (the linear map's backward is itself scaled).
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> add_scaled(context_t<B>& ctx, double alpha, const tensor<B, T>& x, double beta, const tensor<B, T>& y) {
    check_same_shape("add_scaled", x, y);
    auto out = empty_like(ctx, y);
    B::copy(ctx, const_pointer_t<B, T>(y.data()), out.data(), static_cast<std::size_t>(y.numel()));
    B::axpby(ctx, static_cast<std::size_t>(x.numel()), alpha, x.data(), beta, out.data());
    return out;
}

/// alpha * x.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> scale(context_t<B>& ctx, const tensor<B, T>& x, double alpha) {
    auto out = empty_like(ctx, x);
    B::axpby(ctx, static_cast<std::size_t>(x.numel()), alpha, x.data(), 0.0, out.data());
    return out;
}

/// accumulator += x, in place (gradient accumulation).
template <class B, class T>
    requires computes_in<B, T>
void accumulate(context_t<B>& ctx, tensor<B, T>& accumulator, const tensor<B, T>& x) {
    check_same_shape("accumulate", accumulator, x);
    B::axpby(ctx, static_cast<std::size_t>(x.numel()), 1.0, x.data(), 1.0, accumulator.data());
}

template <class B, class T>
struct reduce_saved {
    reduce_desc desc{};
    shape input_shape;
};

namespace detail {
inline reduce_desc make_reduce_desc(const shape& in, const std::vector<int>& axes, bool mean, shape& out) {
    reduce_desc d;
    d.rank = in.rank();
    d.mean = mean;
    auto dims = in.to_vector();
    for (int i = 0; i < in.rank(); ++i) d.shape[static_cast<std::size_t>(i)] = in[i];
    for (int axis : axes) {
        const int a = in.normalise(axis);
        d.reduce[static_cast<std::size_t>(a)] = true;
        dims[static_cast<std::size_t>(a)] = 1;
    }
    out = shape(dims);
    return d;
}
}  // namespace detail

/// Sum (or mean) over `axes`, keeping them as size-1 axes; reshape to drop them.
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, reduce_saved<B, T>> reduce_forward(context_t<B>& ctx, const tensor<B, T>& x, const std::vector<int>& axes,
                                                           bool mean) {
    shape out;
    const auto d = detail::make_reduce_desc(x.shape(), axes, mean, out);
    auto y = tensor<B, T>::empty(ctx, out);
    B::reduce_forward(ctx, d, x.data(), y.data());
    return {y, reduce_saved<B, T>{d, x.shape()}};
}

template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> reduce_backward(context_t<B>& ctx, const reduce_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    shape out;
    std::vector<int> axes;
    for (int i = 0; i < saved.desc.rank; ++i)
        if (saved.desc.reduce[static_cast<std::size_t>(i)]) axes.push_back(i);
    detail::make_reduce_desc(saved.input_shape, axes, saved.desc.mean, out);
    check<shape_error>(grad_output.numel() == out.numel(), "reduce", "gradient shape ", grad_output.shape().str(), " is not ",
                       out.str());
    auto dx = tensor<B, T>::empty(ctx, saved.input_shape);
    B::reduce_backward(ctx, saved.desc, grad_output.data(), dx.data());
    return dx;
}

template <class B, class T>
tensor<B, T> sum(context_t<B>& ctx, const tensor<B, T>& x, const std::vector<int>& axes) {
    return reduce_forward(ctx, x, axes, false).first;
}
template <class B, class T>
tensor<B, T> mean(context_t<B>& ctx, const tensor<B, T>& x, const std::vector<int>& axes) {
    return reduce_forward(ctx, x, axes, true).first;
}

}  // namespace dynamicid::ops
