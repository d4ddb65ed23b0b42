// dynamicid ops: batched matrix products and the linear layer, with backward.
#pragma once

#include <dynamicid/ops/common.hpp>

#include <type_traits>
#include <dynamicid/ops/elementwise.hpp>

#include <vector>

namespace dynamicid::ops {

template <class B, class T>
struct matmul_saved {
    tensor<B, T> a, b;
    bool trans_a = false, trans_b = false;
    double alpha = 1.0;
};

namespace detail {
struct matmul_dims {
    index_t batch, m, n, k;
    bool shared_b;
    std::vector<index_t> out;
};

template <class B, class T>
matmul_dims matmul_shape(const tensor<B, T>& a, const tensor<B, T>& b, bool trans_a, bool trans_b) {
    check<shape_error>(a.rank() >= 2 && b.rank() >= 2, "matmul", "operands need rank >= 2: ", a.shape().str(), ", ",
                       b.shape().str());
    const bool shared_b = b.rank() == 2;
    check<shape_error>(shared_b || b.rank() == a.rank(), "matmul", "batch ranks differ: ", a.shape().str(), " x ", b.shape().str());
    index_t batch = 1;
    std::vector<index_t> out;
    for (int i = 0; i < a.rank() - 2; ++i) {
        check<shape_error>(shared_b || a.dim(i) == b.dim(i), "matmul", "batch dims differ: ", a.shape().str(), " x ",
                           b.shape().str());
        batch *= a.dim(i);
        out.push_back(a.dim(i));
    }
    const index_t m = trans_a ? a.dim(-1) : a.dim(-2), k = trans_a ? a.dim(-2) : a.dim(-1);
    const index_t kb = trans_b ? b.dim(-1) : b.dim(-2), n = trans_b ? b.dim(-2) : b.dim(-1);
    check<shape_error>(k == kb, "matmul", "inner dims differ: ", a.shape().str(), (trans_a ? "^T" : ""), " x ", b.shape().str(),
                       (trans_b ? "^T" : ""));
    out.push_back(m);
    out.push_back(n);
    return {batch, m, n, k, shared_b, out};
}

// c = alpha op(a) op(b) + beta c over `batch` matrices; stride 0 shares an operand.
template <class B, class T>
void run_gemm(context_t<B>& ctx, index_t batch, index_t m, index_t n, index_t k, bool ta, bool tb, double alpha, double beta,
              const_pointer_t<B, T> a, index_t stride_a, const_pointer_t<B, T> b, index_t stride_b, pointer_t<B, T> c) {
    gemm_desc d{.batch = batch, .m = m, .n = n, .k = k, .trans_a = ta, .trans_b = tb,
                .lda = ta ? m : k, .ldb = tb ? k : n, .ldc = n,
                .stride_a = stride_a, .stride_b = stride_b, .stride_c = m * n, .alpha = alpha, .beta = beta};
    B::gemm(ctx, d, a, b, c);
}
}  // namespace detail

/// alpha * op(a) @ op(b) over leading batch axes; a 2-D b is shared by every batch entry.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> matmul(context_t<B>& ctx, const tensor<B, T>& a, const tensor<B, T>& b, bool trans_a = false, bool trans_b = false,
                    double alpha = 1.0) {
    const auto s = detail::matmul_shape(a, b, trans_a, trans_b);
    auto c = tensor<B, T>::empty(ctx, shape(s.out));
    if (s.shared_b && !trans_a) {  // one tall GEMM instead of a batch of small ones
        detail::run_gemm<B, T>(ctx, 1, s.batch * s.m, s.n, s.k, false, trans_b, alpha, 0.0, a.data(), 0, b.data(), 0, c.data());
    } else {
        detail::run_gemm<B, T>(ctx, s.batch, s.m, s.n, s.k, trans_a, trans_b, alpha, 0.0, a.data(), s.m * s.k, b.data(),
                               s.shared_b ? 0 : s.k * s.n, c.data());
    }
    return c;
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, matmul_saved<B, T>> matmul_forward(context_t<B>& ctx, const tensor<B, T>& a, const tensor<B, T>& b,
                                                           bool trans_a = false, bool trans_b = false, double alpha = 1.0) {
    return {matmul(ctx, a, b, trans_a, trans_b, alpha), matmul_saved<B, T>{a, b, trans_a, trans_b, alpha}};
}

/// Gradients (da, db); a shared 2-D b gets the sum over the batch.
template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, tensor<B, T>> matmul_backward(context_t<B>& ctx, const matmul_saved<B, T>& saved,
                                                      const tensor<B, T>& grad_output, needs need = {}) {
    const auto& a = saved.a;
    const auto& b = saved.b;
    const auto s = detail::matmul_shape(a, b, saved.trans_a, saved.trans_b);
    check<shape_error>(grad_output.shape() == shape(s.out), "matmul", "gradient shape ", grad_output.shape().str());
    const index_t m = s.m, n = s.n, k = s.k, batch = s.batch;
    const double alpha = saved.alpha;
    const auto dc = grad_output.data();
    tensor<B, T> da, db;
    if (need.input) {
        da = empty_like(ctx, a);
        const index_t sb = s.shared_b ? 0 : k * n;
        // op(a) = dC op(b)^T; stored a^T = op(b) dC^T when trans_a.
        if (!saved.trans_a)
            detail::run_gemm<B, T>(ctx, batch, m, k, n, false, !saved.trans_b, alpha, 0.0, dc, m * n, b.data(), sb, da.data());
        else
            detail::run_gemm<B, T>(ctx, batch, k, m, n, saved.trans_b, true, alpha, 0.0, b.data(), sb, dc, m * n, da.data());
    }
    if (need.params) {
        db = empty_like(ctx, b);
        if (s.shared_b) {
            // Sum over the batch: with a untransposed, the batch folds into the rows.
            if (!saved.trans_a) {
                const index_t rows = batch * m;
                if (!saved.trans_b) detail::run_gemm<B, T>(ctx, 1, k, n, rows, true, false, alpha, 0.0, a.data(), 0, dc, 0, db.data());
                else detail::run_gemm<B, T>(ctx, 1, n, k, rows, true, false, alpha, 0.0, dc, 0, a.data(), 0, db.data());
            } else {
                for (index_t i = 0; i < batch; ++i) {
                    const double beta = i == 0 ? 0.0 : 1.0;
                    const auto ai = a.data() + static_cast<std::ptrdiff_t>(i * m * k);
                    const auto ci = dc + static_cast<std::ptrdiff_t>(i * m * n);
                    if (!saved.trans_b) detail::run_gemm<B, T>(ctx, 1, k, n, m, false, false, alpha, beta, ai, 0, ci, 0, db.data());
                    else detail::run_gemm<B, T>(ctx, 1, n, k, m, true, true, alpha, beta, ci, 0, ai, 0, db.data());
                }
            }
        } else {
            // op(b) = op(a)^T dC; stored b^T = dC^T op(a) when trans_b.
            if (!saved.trans_b)
                detail::run_gemm<B, T>(ctx, batch, k, n, m, !saved.trans_a, false, alpha, 0.0, a.data(), m * k, dc, m * n, db.data());
            else
                detail::run_gemm<B, T>(ctx, batch, n, k, m, true, saved.trans_a, alpha, 0.0, dc, m * n, a.data(), m * k, db.data());
        }
    }
    return {da, db};
}

template <class B, class T>
struct linear_saved {
    tensor<B, T> input;   ///< kept only when the weight gradient is needed
    tensor<B, T> weight;  ///< kept only when the input gradient is needed
    bool has_bias = false;
    index_t in_features = 0, out_features = 0;
    shape input_shape;
};

/// y = x W^T + b for x (..., in), W (out, in), optional b (out): torch.nn.Linear.
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> linear(context_t<B>& ctx, const tensor<B, T>& x, const tensor<B, T>& weight, const std::type_identity_t<tensor<B, T>>* bias = nullptr) {
    check<shape_error>(weight.rank() == 2 && x.rank() >= 1 && x.dim(-1) == weight.dim(1), "linear", "input ", x.shape().str(),
                       " does not fit weight ", weight.shape().str());
    const index_t in = weight.dim(1), out = weight.dim(0), rows = in ? x.numel() / in : 0;
    auto dims = x.shape().to_vector();
    dims.back() = out;
    auto y = tensor<B, T>::empty(ctx, shape(dims));
    detail::run_gemm<B, T>(ctx, 1, rows, out, in, false, true, 1.0, 0.0, x.data(), 0, weight.data(), 0, y.data());
    if (bias && bias->defined()) {
        check<shape_error>(bias->rank() == 1 && bias->dim(0) == out, "linear", "bias ", bias->shape().str(), " for ", out,
                           " outputs");
        binary_desc d{.rank = 2, .shape = {rows, out}, .a_strides = {out, 1}, .b_strides = {0, 1}};
        B::binary_forward(ctx, binary_op::add, d, y.data(), bias->data(), y.data());
    }
    return y;
}

template <class B, class T>
    requires computes_in<B, T>
std::pair<tensor<B, T>, linear_saved<B, T>> linear_forward(context_t<B>& ctx, const tensor<B, T>& x, const tensor<B, T>& weight,
                                                           const std::type_identity_t<tensor<B, T>>* bias = nullptr, needs need = {}) {
    auto y = linear(ctx, x, weight, bias);
    linear_saved<B, T> saved{need.params ? x : tensor<B, T>{}, need.input ? weight : tensor<B, T>{},
                             bias != nullptr && bias->defined(), weight.dim(1), weight.dim(0), x.shape()};
    return {y, saved};
}

template <class B, class T>
struct linear_grads {
    tensor<B, T> input, weight, bias;
};

template <class B, class T>
    requires computes_in<B, T>
linear_grads<B, T> linear_backward(context_t<B>& ctx, const linear_saved<B, T>& saved, const tensor<B, T>& grad_output) {
    const index_t in = saved.in_features, out = saved.out_features;
    const index_t rows = in ? saved.input_shape.numel() / in : 0;
    check<shape_error>(grad_output.numel() == rows * out, "linear", "gradient shape ", grad_output.shape().str());
    linear_grads<B, T> g;
    if (saved.weight.defined()) {
        g.input = tensor<B, T>::empty(ctx, saved.input_shape);
        detail::run_gemm<B, T>(ctx, 1, rows, in, out, false, false, 1.0, 0.0, grad_output.data(), 0, saved.weight.data(), 0,
                               g.input.data());
    }
    if (saved.input.defined()) {
        g.weight = tensor<B, T>::empty(ctx, {out, in});
        detail::run_gemm<B, T>(ctx, 1, out, in, rows, true, false, 1.0, 0.0, grad_output.data(), 0, saved.input.data(), 0,
                               g.weight.data());
        if (saved.has_bias) {
            g.bias = tensor<B, T>::empty(ctx, {out});
            reduce_desc d{.rank = 2, .shape = {rows, out}, .reduce = {true, false}, .mean = false};
            B::reduce_forward(ctx, d, grad_output.data(), g.bias.data());
        }
    }
    return g;
}

}  // namespace dynamicid::ops
