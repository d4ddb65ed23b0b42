// dynamicid: plain descriptions of the primitive operations.
//
// A backend primitive receives one of these plus device pointers. Layouts are
// row-major; image tensors are NCHW. Descriptors carry sizes only, never data,
// so a backend may use them as cache keys (the oneDNN and CUDA backends do).
#pragma once

#include <dynamicid/core/config.hpp>

#include <array>
#include <cstdint>

namespace dynamicid {

/// C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b] for b < batch, row-major.
/// op(A) is m x k: A is stored m x k (row stride lda), or k x m when trans_a.
/// A batch stride of 0 reuses one matrix for every batch entry.
struct gemm_desc {
    index_t batch = 1, m = 0, n = 0, k = 0;
    bool trans_a = false, trans_b = false;
    index_t lda = 0, ldb = 0, ldc = 0;
    index_t stride_a = 0, stride_b = 0, stride_c = 0;
    double alpha = 1.0, beta = 0.0;
};

/// 2-D convolution (cross-correlation) on NCHW input and (C_out, C_in/groups, kh, kw) weights.
struct conv2d_desc {
    index_t n = 1, c_in = 0, h = 0, w = 0, c_out = 0, kh = 1, kw = 1;
    index_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dilation_h = 1, dilation_w = 1, groups = 1;
    constexpr index_t out_h() const { return (h + 2 * pad_h - dilation_h * (kh - 1) - 1) / stride_h + 1; }
    constexpr index_t out_w() const { return (w + 2 * pad_w - dilation_w * (kw - 1) - 1) / stride_w + 1; }
};

/// Group normalisation of (n, c, spatial) with per-channel affine; statistics (n, groups).
struct group_norm_desc {
    index_t n = 1, c = 0, spatial = 1, groups = 1;
    double eps = 1e-5;
};

/// Layer normalisation over the last `cols` of a (rows, cols) matrix; statistics (rows).
struct layer_norm_desc {
    index_t rows = 0, cols = 0;
    double eps = 1e-5;
};

/// Softmax over the last axis of a (rows, cols) matrix.
struct softmax_desc {
    index_t rows = 0, cols = 0;
};

/// GEGLU: input (rows, 2*cols) split as [hidden | gate]; output hidden * gelu_erf(gate).
struct geglu_desc {
    index_t rows = 0, cols = 0;
};

/// Pointwise functions of one argument.
enum class unary_op : std::uint8_t {
    relu,
    silu,        ///< x * sigmoid(x)
    gelu_erf,    ///< 0.5 x (1 + erf(x / sqrt 2))
    gelu_tanh,   ///< tanh approximation
    quick_gelu,  ///< x * sigmoid(1.702 x), as CLIP uses
    sigmoid,
    tanh,
    exp,
    square,
    sqrt,
};

/// Pointwise functions of two arguments.
enum class binary_op : std::uint8_t { add, sub, mul, div, maximum, minimum };

/// A binary op on broadcast operands: out (contiguous, `shape`) = a op b where
/// a and b are read through strides (0 along broadcast axes).
struct binary_desc {
    int rank = 0;
    std::array<index_t, max_rank> shape{};
    std::array<index_t, max_rank> a_strides{}, b_strides{};
};

/// A strided copy of a `shape`-sized box from src to dst; the core's permute,
/// contiguous, slice, concat and expand all lower to this one primitive.
struct strided_copy_desc {
    int rank = 0;
    std::array<index_t, max_rank> shape{};
    std::array<index_t, max_rank> src_strides{}, dst_strides{};
};

/// Sum or mean of a contiguous `shape` tensor over the flagged axes; the output
/// is contiguous with those axes of size 1 (keepdims).
struct reduce_desc {
    int rank = 0;
    std::array<index_t, max_rank> shape{};
    std::array<bool, max_rank> reduce{};
    bool mean = false;
};

/// Nearest-neighbour upsampling of NCHW by an integer factor.
struct upsample_desc {
    index_t n = 1, c = 0, h = 0, w = 0, factor = 2;
};

/// The gate of Semantic-Activated Attention's identity branch
/// (modules/dynamicid/saa.hpp, eq. 2-3) for one call: per batch element, the
/// activation of query n is scale * q[n] . key_sum (q (batch, queries,
/// hidden), key_sum (batch, hidden): the identity keys summed over tokens);
/// it is min-max normalised over the queries (all tied: 0), zeroed below
/// `threshold`, divided by beta + 1, and then each box in turn maps the cells
/// it covers (rows y0..y1, columns x0..x1 of the grid_height x grid_width
/// grid, half-open) to w (beta + 1) + beta.
struct saa_gate_desc {
    static constexpr int max_boxes = 16;
    index_t batch = 0, queries = 0, hidden = 0, grid_height = 0, grid_width = 0;
    double scale = 1.0, threshold = 0.3, beta = 0.0;
    int boxes = 0;
    std::array<std::array<index_t, 4>, max_boxes> cells{};  ///< y0, x0, y1, x1 per box
};

}  // namespace dynamicid
