// dynamicid ops: permute, slice, concat and nearest upsampling. Permute, slice
// and concat all lower to the backend's one strided-copy primitive, so a new
// backend gets them, forward and backward, by implementing that primitive.
#pragma once

#include <dynamicid/ops/common.hpp>

#include <numeric>
#include <vector>

namespace dynamicid::ops {

namespace detail {
inline strided_copy_desc box(const shape& extent, const std::array<index_t, max_rank>& src, const std::array<index_t, max_rank>& dst) {
    strided_copy_desc d;
    d.rank = extent.rank();
    for (int i = 0; i < extent.rank(); ++i) d.shape[static_cast<std::size_t>(i)] = extent[i];
    d.src_strides = src;
    d.dst_strides = dst;
    return d;
}
}  // namespace detail

template <class B, class T>
struct permute_saved {
    std::vector<int> perm;
};

/// out.shape[i] = x.shape[perm[i]], materialised contiguously.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> permute(context_t<B>& ctx, const tensor<B, T>& x, const std::vector<int>& perm) {
    check<shape_error>(static_cast<int>(perm.size()) == x.rank(), "permute", "permutation of ", perm.size(), " axes for rank ",
                       x.rank());
    std::vector<bool> seen(perm.size(), false);
    std::vector<index_t> dims(perm.size());
    const auto in_strides = x.shape().strides();
    std::array<index_t, max_rank> src{};
    for (std::size_t i = 0; i < perm.size(); ++i) {
        const int p = x.shape().normalise(perm[i]);
        check<shape_error>(!seen[static_cast<std::size_t>(p)], "permute", "axis ", p, " repeated");
        seen[static_cast<std::size_t>(p)] = true;
        dims[i] = x.dim(p);
        src[i] = in_strides[static_cast<std::size_t>(p)];
    }
    const shape out(dims);
    auto y = tensor<B, T>::empty(ctx, out);
    B::strided_copy(ctx, detail::box(out, src, out.strides()), x.data(), y.data(), false);
    return y;
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, permute_saved<B, T>> permute_forward(context_t<B>& ctx, const tensor<B, T>& x, const std::vector<int>& perm) {
    return {permute(ctx, x, perm), permute_saved<B, T>{perm}};
}

/// The backward of a permutation is the inverse permutation.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> permute_backward(context_t<B>& ctx, const permute_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    std::vector<int> inverse(saved.perm.size());
    for (std::size_t i = 0; i < saved.perm.size(); ++i) {
        const int p = saved.perm[i] < 0 ? saved.perm[i] + static_cast<int>(saved.perm.size()) : saved.perm[i];
        inverse[static_cast<std::size_t>(p)] = static_cast<int>(i);
    }
    return permute(ctx, grad_output, inverse);
}

template <class B, class T>
struct slice_saved {
    shape input_shape;
    int axis = 0;
    index_t start = 0;
};

/// x[..., start:start+length, ...] along `axis`.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> slice(context_t<B>& ctx, const tensor<B, T>& x, int axis, index_t start, index_t length) {
    const int a = x.shape().normalise(axis);
    check<shape_error>(start >= 0 && length >= 0 && start + length <= x.dim(a), "slice", "[", start, ", ", start + length,
                       ") out of range for axis ", a, " of ", x.shape().str());
    auto dims = x.shape().to_vector();
    dims[static_cast<std::size_t>(a)] = length;
    const shape out(dims);
    auto y = tensor<B, T>::empty(ctx, out);
    const auto strides = x.shape().strides();
    B::strided_copy(ctx, detail::box(out, strides, out.strides()), x.data() + static_cast<std::ptrdiff_t>(start * strides[static_cast<std::size_t>(a)]),
                    y.data(), false);
    return y;
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, slice_saved<B, T>> slice_forward(context_t<B>& ctx, const tensor<B, T>& x, int axis, index_t start,
                                                         index_t length) {
    return {slice(ctx, x, axis, start, length), slice_saved<B, T>{x.shape(), x.shape().normalise(axis), start}};
}

/// Zeros with the gradient written into the sliced window.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> slice_backward(context_t<B>& ctx, const slice_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    auto dx = tensor<B, T>::zeros(ctx, saved.input_shape);
    const auto strides = saved.input_shape.strides();
    B::strided_copy(ctx, detail::box(grad_output.shape(), grad_output.shape().strides(), strides), grad_output.data(),
                    dx.data() + static_cast<std::ptrdiff_t>(saved.start * strides[static_cast<std::size_t>(saved.axis)]), false);
    return dx;
}

template <class B, class T>
struct concat_saved {
    int axis = 0;
    std::vector<index_t> sizes;
};

/// Concatenation along `axis`; every other axis must agree.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> concat(context_t<B>& ctx, const std::vector<tensor<B, T>>& parts, int axis) {
    check<shape_error>(!parts.empty(), "concat", "nothing to concatenate");
    const int a = parts.front().shape().normalise(axis);
    auto dims = parts.front().shape().to_vector();
    index_t total = 0;
    for (const auto& p : parts) {
        check<shape_error>(p.rank() == parts.front().rank(), "concat", "rank mismatch ", p.shape().str());
        for (int i = 0; i < p.rank(); ++i)
            check<shape_error>(i == a || p.dim(i) == parts.front().dim(i), "concat", "shape ", p.shape().str(), " does not match ",
                               parts.front().shape().str(), " outside axis ", a);
        total += p.dim(a);
    }
    dims[static_cast<std::size_t>(a)] = total;
    const shape out(dims);
    auto y = tensor<B, T>::empty(ctx, out);
    const auto strides = out.strides();
    index_t at = 0;
    for (const auto& p : parts) {
        B::strided_copy(ctx, detail::box(p.shape(), p.shape().strides(), strides), p.data(),
                        y.data() + static_cast<std::ptrdiff_t>(at * strides[static_cast<std::size_t>(a)]), false);
        at += p.dim(a);
    }
    return y;
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, concat_saved<B, T>> concat_forward(context_t<B>& ctx, const std::vector<tensor<B, T>>& parts, int axis) {
    concat_saved<B, T> saved{parts.front().shape().normalise(axis), {}};
    for (const auto& p : parts) saved.sizes.push_back(p.dim(saved.axis));
    return {concat(ctx, parts, axis), saved};
}

/// One gradient per concatenated part.
template <class B, class T>
    requires computes_in<B, T>
std::vector<tensor<B, T>> concat_backward(context_t<B>& ctx, const concat_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    std::vector<tensor<B, T>> grads;
    index_t at = 0;
    for (index_t size : saved.sizes) {
        grads.push_back(slice(ctx, grad_output, saved.axis, at, size));
        at += size;
    }
    return grads;
}

template <class B, class T>
struct upsample_saved {
    upsample_desc desc{};
};

/// Nearest-neighbour upsampling of NCHW by an integer factor (2 in SD).
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, upsample_saved<B, T>> upsample_nearest_forward(context_t<B>& ctx, const tensor<B, T>& x, index_t factor = 2) {
    check<shape_error>(x.rank() == 4, "upsample", "expects NCHW, got ", x.shape().str());
    check<value_error>(factor >= 1, "upsample", "factor must be >= 1, got ", factor);
    const upsample_desc d{.n = x.dim(0), .c = x.dim(1), .h = x.dim(2), .w = x.dim(3), .factor = factor};
    auto y = tensor<B, T>::empty(ctx, {d.n, d.c, d.h * factor, d.w * factor});
    B::upsample_nearest_forward(ctx, d, x.data(), y.data());
    return {y, upsample_saved<B, T>{d}};
}

template <class B, class T>
tensor<B, T> upsample_nearest(context_t<B>& ctx, const tensor<B, T>& x, index_t factor = 2) {
    return upsample_nearest_forward(ctx, x, factor).first;
}

template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> upsample_nearest_backward(context_t<B>& ctx, const upsample_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    const auto& d = saved.desc;
    check<shape_error>(grad_output.shape() == shape{d.n, d.c, d.h * d.factor, d.w * d.factor}, "upsample", "gradient shape ",
                       grad_output.shape().str());
    auto dx = tensor<B, T>::empty(ctx, {d.n, d.c, d.h, d.w});
    B::upsample_nearest_backward(ctx, d, grad_output.data(), dx.data());
    return dx;
}

}  // namespace dynamicid::ops
