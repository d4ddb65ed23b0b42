// dynamicid cuda backend, internal: pointwise, broadcast, reduction, layout,
// resampling and random-number kernels.
#pragma once

#include <cstdint>

#include <dynamicid/backends/cuda/detail/common.cuh>
#include <dynamicid/core/philox.hpp>

namespace dynamicid::cuda::detail {

// ---- scalar functions (the CPU backend's formulas, on the device) ----------------

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_erf(float x) { return erff(x); }
__device__ __forceinline__ double dev_erf(double x) { return erf(x); }
__device__ __forceinline__ float dev_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dev_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float dev_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float dev_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double dev_rsqrt(double x) { return rsqrt(x); }

template <class A>
__device__ __forceinline__ A dev_sigmoid(A x) {
    return x >= A(0) ? A(1) / (A(1) + dev_exp(-x)) : dev_exp(x) / (A(1) + dev_exp(x));
}

template <class A>
__device__ A unary_value(unary_op op, A x) {
    const A inv_sqrt2 = A(0.70710678118654752440);
    const A tanh_c = A(0.79788456080286535588);  // sqrt(2/pi)
    switch (op) {
        case unary_op::relu: return x > A(0) ? x : A(0);
        case unary_op::silu: return x * dev_sigmoid(x);
        case unary_op::gelu_erf: return A(0.5) * x * (A(1) + dev_erf(x * inv_sqrt2));
        case unary_op::gelu_tanh: return A(0.5) * x * (A(1) + dev_tanh(tanh_c * (x + A(0.044715) * x * x * x)));
        case unary_op::quick_gelu: return x * dev_sigmoid(A(1.702) * x);
        case unary_op::sigmoid: return dev_sigmoid(x);
        case unary_op::tanh: return dev_tanh(x);
        case unary_op::exp: return dev_exp(x);
        case unary_op::square: return x * x;
        case unary_op::sqrt: return dev_sqrt(x);
    }
    return x;
}

template <class A>
__device__ A unary_derivative(unary_op op, A x) {
    const A inv_sqrt2 = A(0.70710678118654752440);
    const A inv_sqrt_2pi = A(0.39894228040143267794);
    const A tanh_c = A(0.79788456080286535588);
    switch (op) {
        case unary_op::relu: return x > A(0) ? A(1) : A(0);
        case unary_op::silu: {
            const A s = dev_sigmoid(x);
            return s * (A(1) + x * (A(1) - s));
        }
        case unary_op::gelu_erf: return A(0.5) * (A(1) + dev_erf(x * inv_sqrt2)) + x * inv_sqrt_2pi * dev_exp(A(-0.5) * x * x);
        case unary_op::gelu_tanh: {
            const A t = dev_tanh(tanh_c * (x + A(0.044715) * x * x * x));
            return A(0.5) * (A(1) + t) + A(0.5) * x * (A(1) - t * t) * tanh_c * (A(1) + A(3 * 0.044715) * x * x);
        }
        case unary_op::quick_gelu: {
            const A s = dev_sigmoid(A(1.702) * x);
            return s + A(1.702) * x * s * (A(1) - s);
        }
        case unary_op::sigmoid: {
            const A s = dev_sigmoid(x);
            return s * (A(1) - s);
        }
        case unary_op::tanh: {
            const A t = dev_tanh(x);
            return A(1) - t * t;
        }
        case unary_op::exp: return dev_exp(x);
        case unary_op::square: return A(2) * x;
        case unary_op::sqrt: return A(0.5) / dev_sqrt(x);
    }
    return A(0);
}

template <class A>
__device__ __forceinline__ A binary_value(binary_op op, A a, A b) {
    switch (op) {
        case binary_op::add: return a + b;
        case binary_op::sub: return a - b;
        case binary_op::mul: return a * b;
        case binary_op::div: return a / b;
        case binary_op::maximum: return a >= b ? a : b;
        case binary_op::minimum: return a <= b ? a : b;
    }
    return a;
}

// Partial derivatives (d/da, d/db); ties of maximum/minimum go to a.
template <class A>
__device__ __forceinline__ void binary_partials(binary_op op, A a, A b, A& da, A& db) {
    switch (op) {
        case binary_op::add: da = A(1); db = A(1); return;
        case binary_op::sub: da = A(1); db = A(-1); return;
        case binary_op::mul: da = b; db = a; return;
        case binary_op::div: da = A(1) / b; db = -a / (b * b); return;
        case binary_op::maximum: da = a >= b ? A(1) : A(0); db = A(1) - da; return;
        case binary_op::minimum: da = a <= b ? A(1) : A(0); db = A(1) - da; return;
    }
}

// ---- memory ---------------------------------------------------------------------

template <class T>
__global__ void fill_kernel(T* y, index_t n, T value) {
    for (index_t i = global_index(); i < n; i += global_stride()) y[i] = value;
}

template <class From, class To>
__global__ void convert_kernel(const From* x, To* y, index_t n) {
    for (index_t i = global_index(); i < n; i += global_stride()) {
        // Through float as element_cast does (f64 -> f16 rounds twice there too).
        if constexpr (std::is_same_v<To, double>) store(y, i, static_cast<double>(load(x, i)));
        else store(y, i, static_cast<accum_t<To>>(static_cast<float>(load(x, i))));
    }
}

// ---- pointwise ------------------------------------------------------------------

template <class T, class I>
__global__ void unary_forward_kernel(unary_op op, I n, const T* x, T* y) {
    for (I i = static_cast<I>(global_index()); i < n; i += static_cast<I>(global_stride())) store(y, i, unary_value(op, load(x, i)));
}

template <class T>
__global__ void unary_backward_kernel(unary_op op, index_t n, const T* x, const T* dy, T* dx) {
    for (index_t i = global_index(); i < n; i += global_stride())
        store(dx, i, load(dy, i) * unary_derivative(op, load(x, i)));
}

template <class T, class I>
__global__ void geglu_forward_kernel(I rows, I cols, const T* x, T* y) {
    const I n = rows * cols;
    for (I i = static_cast<I>(global_index()); i < n; i += static_cast<I>(global_stride())) {
        const I r = i / cols, c = i - r * cols;
        const auto h = load(x, r * 2 * cols + c), g = load(x, r * 2 * cols + cols + c);
        store(y, i, h * unary_value(unary_op::gelu_erf, g));
    }
}

template <class T>
__global__ void geglu_backward_kernel(index_t rows, index_t cols, const T* x, const T* dy, T* dx) {
    const index_t n = rows * cols;
    for (index_t i = global_index(); i < n; i += global_stride()) {
        const index_t r = i / cols, c = i - r * cols;
        const index_t hi = r * 2 * cols + c, gi = hi + cols;
        const auto h = load(x, hi), g = load(x, gi), up = load(dy, i);
        store(dx, hi, up * unary_value(unary_op::gelu_erf, g));
        store(dx, gi, up * h * unary_derivative(unary_op::gelu_erf, g));
    }
}

/// box strides: [0] output (contiguous), [1] a, [2] b; I as box_offsets.
template <class T, class I>
__global__ void binary_forward_kernel(binary_op op, strided_box box, I n, const T* a, const T* b, T* y) {
    for (I i = static_cast<I>(global_index()); i < n; i += static_cast<I>(global_stride())) {
        I off[3];
        box_offsets<3, I>(box, i, off);
        store(y, off[0], binary_value(op, load(a, off[1]), load(b, off[2])));
    }
}

// ---- vectorised walks: 16 bytes per operand and thread ---------------------------------

/// Values of T in 16 bytes.
template <class T>
inline constexpr int vector_width = static_cast<int>(16 / sizeof(T));

/// True when a walk over `box` may move vector_width<T> values at a time:
/// the innermost axis has stride 1 for the operands flagged in `vector_ops`
/// (the others must have stride 0 there: one value serves the whole vector),
/// its extent is a multiple of the width, every other stride of a vector
/// operand keeps 16-byte alignment, and so do the base pointers.
template <class T, int Operands>
bool vectorisable(const strided_box& box, const void* const (&ptrs)[Operands], bool (&vector_ops)[Operands]) {
    constexpr index_t w = vector_width<T>;
    if (box.rank < 1) return false;
    const auto last = static_cast<std::size_t>(box.rank - 1);
    if (box.shape[last] % w != 0) return false;
    for (int o = 0; o < Operands; ++o) {
        const auto& st = box.strides[static_cast<std::size_t>(o)];
        if (st[last] != 0 && st[last] != 1) return false;
        vector_ops[o] = st[last] == 1;
        if (!vector_ops[o]) continue;
        if (reinterpret_cast<std::uintptr_t>(ptrs[o]) % 16 != 0) return false;
        for (std::size_t a = 0; a < last; ++a)
            if (st[a] % w != 0) return false;
    }
    return true;
}

/// binary_forward_kernel, vector_width<T> outputs per step; stride sets as
/// there (the output's innermost stride is 1; a and b have 1 or 0).
template <class T, class I>
__global__ void binary_vector_kernel(binary_op op, strided_box box, I n_vectors, const T* a, const T* b, T* y) {
    constexpr int W = vector_width<T>;
    const int last = box.rank - 1;
    const bool a_vector = box.strides[1][last] != 0, b_vector = box.strides[2][last] != 0;
    for (I v = static_cast<I>(global_index()); v < n_vectors; v += static_cast<I>(global_stride())) {
        I off[3];
        box_offsets<3, I>(box, v * static_cast<I>(W), off);
        uint4 va{}, vb{}, vy;
        if (a_vector) va = *reinterpret_cast<const uint4*>(a + off[1]);
        if (b_vector) vb = *reinterpret_cast<const uint4*>(b + off[2]);
        const auto sa = a_vector ? accum_t<T>(0) : load(a, off[1]), sb = b_vector ? accum_t<T>(0) : load(b, off[2]);
        const T* ea = reinterpret_cast<const T*>(&va);
        const T* eb = reinterpret_cast<const T*>(&vb);
        T* ey = reinterpret_cast<T*>(&vy);
#pragma unroll
        for (int k = 0; k < W; ++k) store(ey, k, binary_value(op, a_vector ? load(ea, k) : sa, b_vector ? load(eb, k) : sb));
        *reinterpret_cast<uint4*>(y + off[0]) = vy;
    }
}

/// Gradient of one operand (`which` 0: a, 1: b). `outer` holds the operand's
/// own axes (one thread per element), `inner` the axes it is broadcast along,
/// which each thread sums over in a fixed order (deterministic, no atomics).
/// Stride sets: [0] grad output (contiguous), [1] a, [2] b.
template <class T>
__global__ void binary_backward_kernel(binary_op op, int which, strided_box outer, strided_box inner, index_t n_outer,
                                       index_t n_inner, const T* a, const T* b, const T* dy, T* grad) {
    using A = accum_t<T>;
    for (index_t o = global_index(); o < n_outer; o += global_stride()) {
        index_t base[3];
        box_offsets<3>(outer, o, base);
        A sum = 0;
        for (index_t r = 0; r < n_inner; ++r) {
            index_t off[3];
            box_offsets<3>(inner, r, off);
            A pa = 0, pb = 0;
            binary_partials(op, load(a, base[1] + off[1]), load(b, base[2] + off[2]), pa, pb);
            sum += load(dy, base[0] + off[0]) * (which == 0 ? pa : pb);
        }
        store(grad, base[which + 1], sum);
    }
}

template <class T>
__global__ void axpby_kernel(index_t n, accum_t<T> alpha, const T* x, accum_t<T> beta, T* y) {
    using A = accum_t<T>;
    for (index_t i = global_index(); i < n; i += global_stride()) {
        const A base = beta == A(0) ? A(0) : beta * load(y, i);
        store(y, i, alpha * load(x, i) + base);
    }
}

// ---- reductions -------------------------------------------------------------------

/// One thread per output element; stride sets [0] input, [1] output.
template <class T>
__global__ void reduce_thread_kernel(strided_box outer, strided_box inner, index_t n_outer, index_t n_inner, accum_t<T> scale,
                                     const T* x, T* y) {
    using A = accum_t<T>;
    for (index_t o = global_index(); o < n_outer; o += global_stride()) {
        index_t base[2];
        box_offsets<2>(outer, o, base);
        A sum = 0;
        for (index_t r = 0; r < n_inner; ++r) {
            index_t off[2];
            box_offsets<2>(inner, r, off);
            sum += load(x, base[0] + off[0]);
        }
        store(y, base[1], sum * scale);
    }
}

/// One block per output element, for long reductions.
template <class T>
__global__ void reduce_block_kernel(strided_box outer, strided_box inner, index_t n_inner, accum_t<T> scale, const T* x, T* y) {
    using A = accum_t<T>;
    index_t base[2];
    box_offsets<2>(outer, blockIdx.x, base);
    A sum = 0;
    for (index_t r = threadIdx.x; r < n_inner; r += blockDim.x) {
        index_t off[2];
        box_offsets<2>(inner, r, off);
        sum += load(x, base[0] + off[0]);
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) store(y, base[1], sum * scale);
}

/// dx (contiguous) = dy read through `box` strides [1] (0 along reduced axes) * scale.
template <class T, class I>
__global__ void broadcast_scaled_kernel(strided_box box, I n, accum_t<T> scale, const T* dy, T* dx) {
    for (I i = static_cast<I>(global_index()); i < n; i += static_cast<I>(global_stride())) {
        I off[2];
        box_offsets<2, I>(box, i, off);
        store(dx, off[0], load(dy, off[1]) * scale);
    }
}

// ---- layout ---------------------------------------------------------------------

/// Stride sets [0] src, [1] dst; I as box_offsets.
template <class T, class I>
__global__ void strided_copy_kernel(strided_box box, I n, const T* src, T* dst, bool accumulate) {
    for (I i = static_cast<I>(global_index()); i < n; i += static_cast<I>(global_stride())) {
        I off[2];
        box_offsets<2, I>(box, i, off);
        if (accumulate) store(dst, off[1], load(dst, off[1]) + load(src, off[0]));
        else dst[off[1]] = src[off[0]];
    }
}

/// strided_copy_kernel (no accumulation), 16 bytes per step: both innermost strides are 1.
template <class T, class I>
__global__ void strided_copy_vector_kernel(strided_box box, I n_vectors, const T* src, T* dst) {
    constexpr int W = vector_width<T>;
    for (I v = static_cast<I>(global_index()); v < n_vectors; v += static_cast<I>(global_stride())) {
        I off[2];
        box_offsets<2, I>(box, v * static_cast<I>(W), off);
        *reinterpret_cast<uint4*>(dst + off[1]) = *reinterpret_cast<const uint4*>(src + off[0]);
    }
}

inline constexpr int transpose_tile = 32;

/// dst[b, r, c] = src[b, r, c] for dst rows of `cols` contiguous values and
/// src contiguous along r (src offset b * src_batch + r + c * src_col): a
/// batch of matrix transposes through a shared 32 x 32 tile, so that both the
/// reads and the writes are coalesced. Grid (ceil(cols / 32), ceil(rows / 32),
/// batch), 32 x 8 threads.
template <class T, class I>
__global__ void transpose_copy_kernel(I rows, I cols, I src_batch, I src_col, I dst_batch, I dst_row, const T* src, T* dst) {
    __shared__ T tile[transpose_tile][transpose_tile + 1];
    const I b = blockIdx.z, r0 = static_cast<I>(blockIdx.y) * transpose_tile, c0 = static_cast<I>(blockIdx.x) * transpose_tile;
    const T* s = src + b * src_batch;
    T* d = dst + b * dst_batch;
    for (int j = threadIdx.y; j < transpose_tile; j += blockDim.y) {
        const I r = r0 + threadIdx.x, c = c0 + j;
        if (r < rows && c < cols) tile[j][threadIdx.x] = s[r + c * src_col];
    }
    __syncthreads();
    for (int j = threadIdx.y; j < transpose_tile; j += blockDim.y) {
        const I r = r0 + j, c = c0 + threadIdx.x;
        if (r < rows && c < cols) d[r * dst_row + c] = tile[threadIdx.x][j];
    }
}

/// Accumulating copy whose destination repeats along `inner` axes: each
/// destination element is owned by one thread, which sums in order.
template <class T>
__global__ void strided_accumulate_kernel(strided_box outer, strided_box inner, index_t n_outer, index_t n_inner, const T* src,
                                          T* dst) {
    using A = accum_t<T>;
    for (index_t o = global_index(); o < n_outer; o += global_stride()) {
        index_t base[2];
        box_offsets<2>(outer, o, base);
        A sum = load(dst, base[1]);
        for (index_t r = 0; r < n_inner; ++r) {
            index_t off[2];
            box_offsets<2>(inner, r, off);
            sum += load(src, base[0] + off[0]);
        }
        store(dst, base[1], sum);
    }
}

template <class T, class I>
__global__ void upsample_forward_kernel(I planes, I h, I w, I factor, const T* x, T* y) {
    const I oh = h * factor, ow = w * factor, n = planes * oh * ow;
    for (I i = static_cast<I>(global_index()); i < n; i += static_cast<I>(global_stride())) {
        const I rest = i / ow, j = i - rest * ow, p = rest / oh, r = rest - p * oh;
        y[i] = x[(p * h + r / factor) * w + j / factor];
    }
}

template <class T>
__global__ void upsample_backward_kernel(index_t planes, index_t h, index_t w, index_t factor, const T* dy, T* dx) {
    using A = accum_t<T>;
    const index_t oh = h * factor, ow = w * factor, n = planes * h * w;
    for (index_t i = global_index(); i < n; i += global_stride()) {
        const index_t j = i % w, rest = i / w, r = rest % h, p = rest / h;
        A sum = 0;
        for (index_t u = 0; u < factor; ++u)
            for (index_t v = 0; v < factor; ++v) sum += load(dy, (p * oh + r * factor + u) * ow + j * factor + v);
        store(dx, i, sum);
    }
}

// ---- random numbers: the shared Philox streams, element for element -------------------

template <class T>
__global__ void random_uniform_kernel(std::uint64_t seed, std::uint64_t offset, index_t n, T* y) {
    for (index_t i = global_index(); i < n; i += global_stride())
        y[i] = element_cast<T>(philox::uniform(seed, offset + static_cast<std::uint64_t>(i)));
}

template <class T>
__global__ void random_normal_kernel(std::uint64_t seed, std::uint64_t offset, index_t n, T* y) {
    for (index_t i = global_index(); i < n; i += global_stride())
        y[i] = element_cast<T>(philox::normal(seed, offset + static_cast<std::uint64_t>(i)));
}

// ---- softmax (one block per row) -------------------------------------------------------

template <class T>
__global__ void softmax_forward_kernel(index_t rows, index_t cols, const T* x, T* y) {
    using A = accum_t<T>;
    for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * cols;
        T* yr = y + r * cols;
        A peak = -cuda_infinity<A>();
        for (index_t i = threadIdx.x; i < cols; i += blockDim.x) peak = fmax(peak, load(xr, i));
        peak = block_max(peak);
        if (peak == -cuda_infinity<A>()) peak = 0;  // every entry masked
        A total = 0;
        for (index_t i = threadIdx.x; i < cols; i += blockDim.x) total += dev_exp(load(xr, i) - peak);
        total = block_sum(total);
        const A inv = total > A(0) ? A(1) / total : A(0);
        for (index_t i = threadIdx.x; i < cols; i += blockDim.x) store(yr, i, dev_exp(load(xr, i) - peak) * inv);
    }
}

template <class T>
__global__ void softmax_backward_kernel(index_t rows, index_t cols, const T* y, const T* dy, T* dx) {
    using A = accum_t<T>;
    for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const index_t base = r * cols;
        A dot = 0;
        for (index_t i = threadIdx.x; i < cols; i += blockDim.x) dot += load(y, base + i) * load(dy, base + i);
        dot = block_sum(dot);
        for (index_t i = threadIdx.x; i < cols; i += blockDim.x)
            store(dx, base + i, load(y, base + i) * (load(dy, base + i) - dot));
    }
}

// ---- convolution bias ---------------------------------------------------------------------

/// y[n, c, s] += bias[c]; I as box_offsets (n * c * spatial < 2^31 for 32 bits).
template <class T, class I>
__global__ void add_channel_bias_kernel(I n, I c, I spatial, const T* bias, T* y) {
    const I total = n * c * spatial;
    for (I i = static_cast<I>(global_index()); i < total; i += static_cast<I>(global_stride())) {
        const I ch = (i / spatial) % c;
        store(y, i, load(y, i) + load(bias, ch));
    }
}

/// dbias[c] = sum over n and spatial of dy[n, c, s]; one block per channel.
template <class T>
__global__ void channel_sum_kernel(index_t n, index_t c, index_t spatial, const T* dy, T* dbias) {
    using A = accum_t<T>;
    const index_t ch = blockIdx.x;
    A sum = 0;
    for (index_t i = threadIdx.x; i < n * spatial; i += blockDim.x) {
        const index_t b = i / spatial, s = i - b * spatial;
        sum += load(dy, (b * c + ch) * spatial + s);
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) store(dbias, ch, sum);
}

}  // namespace dynamicid::cuda::detail
