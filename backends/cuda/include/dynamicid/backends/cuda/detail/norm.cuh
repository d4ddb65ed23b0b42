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

// ---- long segments (group norm at high resolution): split over several blocks ----------

/// Grid (parts, segments): block (p, s) writes the mean and the sum of squared
/// deviations of values [p * chunk, min(len, (p + 1) * chunk)) of segment s.
template <class T>
__global__ void segment_partial_kernel(index_t len, index_t chunk, const T* x, accum_t<T>* part_mean, accum_t<T>* part_m2) {
    using A = accum_t<T>;
    const index_t s = blockIdx.y, p = blockIdx.x, parts = gridDim.x;
    const index_t begin = p * chunk, end = begin + chunk < len ? begin + chunk : len;
    const T* xs = x + s * len;
    A sum = 0;
    for (index_t i = begin + threadIdx.x; i < end; i += blockDim.x) sum += load(xs, i);
    const A mu = block_sum(sum) / static_cast<A>(end - begin);
    A sq = 0;
    for (index_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const A c = load(xs, i) - mu;
        sq += c * c;
    }
    sq = block_sum(sq);
    if (threadIdx.x == 0) {
        part_mean[s * parts + p] = mu;
        part_m2[s * parts + p] = sq;
    }
}

/// One thread per segment: merges the parts in order (Chan et al.'s pairwise
/// update), then mean and 1 / sqrt(var + eps).
template <class A>
__global__ void segment_combine_kernel(index_t segments, index_t parts, index_t len, index_t chunk, double eps, const A* part_mean,
                                       const A* part_m2, A* mean, A* rstd) {
    for (index_t s = global_index(); s < segments; s += global_stride()) {
        A n = 0, mu = 0, m2 = 0;
        for (index_t p = 0; p < parts; ++p) {
            const index_t begin = p * chunk;
            const A nb = static_cast<A>((begin + chunk < len ? begin + chunk : len) - begin);
            const A mb = part_mean[s * parts + p], delta = mb - mu, total = n + nb;
            mu += delta * nb / total;
            m2 += part_m2[s * parts + p] + delta * delta * n * nb / total;
            n = total;
        }
        mean[s] = mu;
        rstd[s] = static_cast<A>(1.0 / sqrt(static_cast<double>(m2 / static_cast<A>(len)) + eps));
    }
}

/// y = (x - mean) * rstd * gamma + beta over all segments, one thread per
/// value (I as box_offsets: 32 bits when segments * len < 2^31).
template <class T, class I>
__global__ void normalise_apply_kernel(norm_layout layout, I total, I len, const T* x, const T* gamma, const T* beta,
                                       const accum_t<T>* mean, const accum_t<T>* rstd, T* y) {
    using A = accum_t<T>;
    const I groups = static_cast<I>(layout.groups), cg = static_cast<I>(layout.cg), spatial = static_cast<I>(layout.spatial);
    for (I i = static_cast<I>(global_index()); i < total; i += static_cast<I>(global_stride())) {
        const I s = i / len, e = i - s * len;
        const I f = groups == 0 ? e : (s % groups) * cg + e / spatial;
        const A g = gamma ? load(gamma, f) : A(1), b = beta ? load(beta, f) : A(0);
        store(y, i, (load(x, i) - mean[s]) * rstd[s] * g + b);
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
