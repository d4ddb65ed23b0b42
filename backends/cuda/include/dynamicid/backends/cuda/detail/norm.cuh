// dynamicid cuda backend, internal: group and layer normalisation.
//
// Both normalise `segments` runs of `len` contiguous values and then apply a
// per-feature affine. Group norm's segment s covers channels
// [(s % groups) * cg, +cg) of image s / groups, its feature index is the
// channel; layer norm's segment is a row, its feature index the column.
#pragma once

#include <dynamicid/backends/cuda/detail/common.cuh>
#include <dynamicid/backends/cuda/detail/pointwise.cuh>

namespace dynamicid::cuda::detail {

/// Feature of element i of segment s: groups == 0 marks layer norm.
struct norm_layout {
    index_t groups = 0, cg = 1, spatial = 1;
    __device__ __forceinline__ index_t feature(index_t s, index_t i) const {
        return groups == 0 ? i : (s % groups) * cg + i / spatial;
    }
};

/// One block per segment: mean, then the variance of the deviations (two
/// passes, as the CPU backend does), then the normalised, affine output.
template <class T>
__global__ void normalise_forward_kernel(norm_layout layout, index_t segments, index_t len, double eps, const T* x, const T* gamma,
                                         const T* beta, T* y, accum_t<T>* mean, accum_t<T>* rstd) {
    using A = accum_t<T>;
    for (index_t s = blockIdx.x; s < segments; s += gridDim.x) {
        const T* xs = x + s * len;
        A sum = 0;
        for (index_t i = threadIdx.x; i < len; i += blockDim.x) sum += load(xs, i);
        sum = block_sum(sum);
        const A mu = len ? sum / static_cast<A>(len) : A(0);
        A sq = 0;
        for (index_t i = threadIdx.x; i < len; i += blockDim.x) {
            const A c = load(xs, i) - mu;
            sq += c * c;
        }
        sq = block_sum(sq);
        const A var = len ? sq / static_cast<A>(len) : A(0);
        const A r = static_cast<A>(1.0 / sqrt(static_cast<double>(var) + eps));
        if (threadIdx.x == 0) {
            if (mean) mean[s] = mu;
            if (rstd) rstd[s] = r;
        }
        for (index_t i = threadIdx.x; i < len; i += blockDim.x) {
            const index_t f = layout.feature(s, i);
            const A g = gamma ? load(gamma, f) : A(1), b = beta ? load(beta, f) : A(0);
            store(y, s * len + i, (load(xs, i) - mu) * r * g + b);
        }
    }
}

/// dx for each segment (one block each).
template <class T>
__global__ void normalise_backward_data_kernel(norm_layout layout, index_t segments, index_t len, const T* x, const T* gamma,
                                               const accum_t<T>* mean, const accum_t<T>* rstd, const T* dy, T* dx) {
    using A = accum_t<T>;
    for (index_t s = blockIdx.x; s < segments; s += gridDim.x) {
        const A m = mean[s], r = rstd[s];
        A sum_g = 0, sum_gx = 0;
        for (index_t i = threadIdx.x; i < len; i += blockDim.x) {
            const A xhat = (load(x, s * len + i) - m) * r;
            const A g = load(dy, s * len + i) * (gamma ? load(gamma, layout.feature(s, i)) : A(1));
            sum_g += g;
            sum_gx += g * xhat;
        }
        const A mean_g = block_sum(sum_g) / static_cast<A>(len);
        const A mean_gx = block_sum(sum_gx) / static_cast<A>(len);
        for (index_t i = threadIdx.x; i < len; i += blockDim.x) {
            const A xhat = (load(x, s * len + i) - m) * r;
            const A g = load(dy, s * len + i) * (gamma ? load(gamma, layout.feature(s, i)) : A(1));
            store(dx, s * len + i, r * (g - mean_g - xhat * mean_gx));
        }
    }
}

/// Layer norm dgamma/dbeta: one thread per column, summing rows in order.
template <class T>
__global__ void layer_norm_affine_grad_kernel(index_t rows, index_t cols, const T* x, const accum_t<T>* mean, const accum_t<T>* rstd,
                                              const T* dy, T* dgamma, T* dbeta) {
    using A = accum_t<T>;
    for (index_t f = global_index(); f < cols; f += global_stride()) {
        A sg = 0, sb = 0;
        for (index_t r = 0; r < rows; ++r) {
            const A g = load(dy, r * cols + f);
            sg += g * (load(x, r * cols + f) - mean[r]) * rstd[r];
            sb += g;
        }
        if (dgamma) store(dgamma, f, sg);
        if (dbeta) store(dbeta, f, sb);
    }
}

/// Group norm dgamma/dbeta: one block per channel over images and positions.
template <class T>
__global__ void group_norm_affine_grad_kernel(index_t n, index_t c, index_t spatial, index_t groups, const T* x,
                                              const accum_t<T>* mean, const accum_t<T>* rstd, const T* dy, T* dgamma, T* dbeta) {
    using A = accum_t<T>;
    const index_t ch = blockIdx.x, cg = c / groups;
    A sg = 0, sb = 0;
    for (index_t i = threadIdx.x; i < n * spatial; i += blockDim.x) {
        const index_t b = i / spatial, p = i - b * spatial;
        const index_t seg = b * groups + ch / cg, at = (b * c + ch) * spatial + p;
        const A g = load(dy, at);
        sg += g * (load(x, at) - mean[seg]) * rstd[seg];
        sb += g;
    }
    sg = block_sum(sg);
    sb = block_sum(sb);
    if (threadIdx.x == 0) {
        if (dgamma) store(dgamma, ch, sg);
        if (dbeta) store(dbeta, ch, sb);
    }
}

}  // namespace dynamicid::cuda::detail
