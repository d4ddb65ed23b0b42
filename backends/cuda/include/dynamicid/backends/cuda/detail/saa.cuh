// dynamicid cuda backend, internal: the gate of SAA's identity branch
// (saa_gate_desc). Two launches, no host round trip:
//
// * saa_activation_kernel: one warp per query, w = scale * q . key_sum. The
//   sum over heads and identity tokens of the scores q_h k_h,t^T equals this
//   one dot product with the keys summed over tokens, so the scores
//   themselves are never needed.
// * saa_gate_kernel: one block per batch element: min and max over the
//   queries, then per query the normalised, thresholded weight and the layout
//   boost of the boxes, in the order the reference applies them.
#pragma once

#include <dynamicid/backends/cuda/detail/common.cuh>
#include <dynamicid/core/descriptors.hpp>

namespace dynamicid::cuda::detail {

inline constexpr int saa_warps = 8;

/// Grid ceil(rows / saa_warps) blocks of saa_warps warps; rows = batch * queries.
template <class T>
__global__ void __launch_bounds__(saa_warps * 32)
    saa_activation_kernel(index_t rows, index_t queries, index_t hidden, float scale, const T* q, const T* key_sum, float* w) {
    const int lane = threadIdx.x & 31;
    const index_t row = static_cast<index_t>(blockIdx.x) * saa_warps + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps leave; no barrier follows
    const T* qr = q + row * hidden;
    const T* kr = key_sum + (row / queries) * hidden;
    float acc = 0.0f;
    for (index_t i = lane; i < hidden; i += 32) acc += static_cast<float>(load(qr, i)) * static_cast<float>(load(kr, i));
    acc = warp_sum(acc);
    if (lane == 0) w[row] = acc * scale;
}

/// One block (1024 threads) per batch element.
template <class T>
__global__ void __launch_bounds__(1024) saa_gate_kernel(saa_gate_desc d, const float* w, T* gate, float* normalized) {
    const index_t b = blockIdx.x, n = d.queries;
    const float* row = w + b * n;
    float lo = cuda_infinity<float>(), hi = -cuda_infinity<float>();
    for (index_t i = threadIdx.x; i < n; i += blockDim.x) {
        lo = fminf(lo, row[i]);
        hi = fmaxf(hi, row[i]);
    }
    lo = -block_max(-lo);
    hi = block_max(hi);
    const float range = hi - lo;
    const float threshold = static_cast<float>(d.threshold), beta = static_cast<float>(d.beta);
    for (index_t i = threadIdx.x; i < n; i += blockDim.x) {
        float v = range > 0.0f ? (row[i] - lo) / range : 0.0f;  // all tied: no query is activated
        if (v < threshold) v = 0.0f;
        if (normalized) normalized[b * n + i] = v;
        float g = v / (beta + 1.0f);
        const index_t y = i / d.grid_width, x = i - y * d.grid_width;
        for (int k = 0; k < d.boxes; ++k) {
            const auto& c = d.cells[static_cast<std::size_t>(k)];
            if (y >= c[0] && y < c[2] && x >= c[1] && x < c[3]) g = g * (beta + 1.0f) + beta;
        }
        store(gate, b * n + i, g);
    }
}

}  // namespace dynamicid::cuda::detail
