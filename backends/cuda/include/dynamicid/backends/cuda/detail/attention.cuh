// dynamicid cuda backend, internal: fused scaled-dot-product attention.
//
// Both kernels stream keys in tiles with an online softmax (running max m and
// running sum l per query row; a new tile rescales what was accumulated by
// exp(m_old - m_new)), so no lq x lk score matrix is ever stored.
//
// * flash_attention_kernel: f16/bf16 with d == dv in {40, 64, 80, 160}. A block
//   of four warps owns 64 query rows (16 per warp); Q, then each K/V tile, sit
//   in shared memory, S = Q K^T and O += P V run on tensor cores (wmma 16x16x16,
//   f32 accumulation); the head dimension is zero-padded to a multiple of 16.
// * rowwise_attention_kernel: any element type and size (dv <= 256): one warp
//   per query row, lane j scores key j of each 32-key tile, lanes own output
//   columns. Exact in f32/f64; the path the tests' small shapes take.
#pragma once

#include <dynamicid/backends/cuda/detail/common.cuh>
#include <dynamicid/backends/cuda/detail/pointwise.cuh>

#include <mma.h>

#include <cstdint>

namespace dynamicid::cuda::detail {

// ---- generic: one warp per query row ---------------------------------------------------

inline constexpr int rowwise_warps = 4;

/// C = ceil(dv / 32) output columns per lane. Dynamic shared memory: one
/// (pre-scaled) query row of d values per warp.
template <class T, int C>
__global__ void __launch_bounds__(rowwise_warps * 32)
    rowwise_attention_kernel(index_t rows, index_t lq, index_t lk, index_t d, index_t dv, double scale, const T* q, const T* k,
                             const T* v, T* out) {
    using A = accum_t<T>;
    extern __shared__ __align__(16) unsigned char rowwise_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    A* qs = reinterpret_cast<A*>(rowwise_smem) + static_cast<index_t>(warp) * d;
    const index_t row = static_cast<index_t>(blockIdx.x) * rowwise_warps + warp;
    if (row >= rows) return;  // whole warp leaves together; no block-wide barrier follows
    const index_t b = row / lq;
    for (index_t t = lane; t < d; t += 32) qs[t] = load(q, row * d + t) * static_cast<A>(scale);
    __syncwarp();

    const T* kb = k + b * lk * d;
    const T* vb = v + b * lk * dv;
    A m = -cuda_infinity<A>(), l = 0, acc[C];
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] = 0;
    for (index_t j0 = 0; j0 < lk; j0 += 32) {
        const index_t j = j0 + lane;
        A s = -cuda_infinity<A>();
        if (j < lk) {
            s = 0;
            for (index_t t = 0; t < d; ++t) s += qs[t] * load(kb, j * d + t);
        }
        const A m_new = fmax(m, warp_max(s));  // finite: key j0 is always valid
        const A p = j < lk ? dev_exp(s - m_new) : A(0);
        const A alpha = dev_exp(m - m_new);
        l = l * alpha + warp_sum(p);
        m = m_new;
#pragma unroll
        for (int c = 0; c < C; ++c) acc[c] *= alpha;
        const index_t tile = lk - j0 < 32 ? lk - j0 : 32;
        for (index_t jj = 0; jj < tile; ++jj) {
            const A pj = __shfl_sync(0xffffffffu, p, static_cast<int>(jj));
            const T* vr = vb + (j0 + jj) * dv;
#pragma unroll
            for (int c = 0; c < C; ++c) {
                const index_t col = lane + 32 * c;
                if (col < dv) acc[c] += pj * load(vr, col);
            }
        }
    }
    const A inv = l > A(0) ? A(1) / l : A(0);
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const index_t col = lane + 32 * c;
        if (col < dv) store(out, row * dv + col, acc[c] * inv);
    }
}

// ---- tensor cores: f16/bf16, fixed head dimension ---------------------------------------

template <class T> struct wmma_type;
template <> struct wmma_type<half> {
    using type = __half;
    __device__ static std::uint16_t bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <> struct wmma_type<bfloat16> {
    using type = __nv_bfloat16;
    __device__ static std::uint16_t bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

/// Tile geometry for head dimension D.
template <int D>
struct flash_geometry {
    static constexpr int warps = 4;
    static constexpr int block_m = 16 * warps;            // query rows per block
    static constexpr int block_n = D > 80 ? 32 : 64;      // keys per tile
    static constexpr int dp = (D + 15) / 16 * 16;         // padded head dimension
    static constexpr std::size_t align(std::size_t bytes) { return (bytes + 127) / 128 * 128; }
    static constexpr std::size_t q_off = 0;
    static constexpr std::size_t k_off = q_off + align(std::size_t{block_m} * dp * 2);
    static constexpr std::size_t v_off = k_off + align(std::size_t{block_n} * dp * 2);
    static constexpr std::size_t s_off = v_off + align(std::size_t{block_n} * dp * 2);
    static constexpr std::size_t p_off = s_off + align(std::size_t{warps} * 16 * block_n * 4);
    static constexpr std::size_t o_off = p_off + align(std::size_t{warps} * 16 * block_n * 2);
    static constexpr std::size_t shared_bytes = o_off + align(std::size_t{warps} * 16 * dp * 4);
};

/// rows x D 16-bit values from `src` (row stride D, `valid` rows exist) into
/// `dst` (row stride DP), zero-filling missing rows and the padding columns.
template <int D, int DP>
__device__ __forceinline__ void load_tile(std::uint16_t* dst, const std::uint16_t* src, int rows, index_t valid, bool vectorised) {
    if (vectorised) {  // D % 8 == 0 and 16-byte aligned rows: 8 values per load
        constexpr int chunks = D / 8;
        for (int idx = threadIdx.x; idx < rows * chunks; idx += blockDim.x) {
            const int r = idx / chunks, c = (idx - r * chunks) * 8;
            uint4 value = make_uint4(0, 0, 0, 0);
            if (r < valid) value = *reinterpret_cast<const uint4*>(src + static_cast<index_t>(r) * D + c);
            *reinterpret_cast<uint4*>(dst + r * DP + c) = value;
        }
    } else {
        for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
            const int r = idx / D, c = idx - r * D;
            dst[r * DP + c] = r < valid ? src[static_cast<index_t>(r) * D + c] : std::uint16_t{0};
        }
    }
    if constexpr (DP > D) {
        constexpr int pad = DP - D;
        for (int idx = threadIdx.x; idx < rows * pad; idx += blockDim.x) {
            const int r = idx / pad, c = D + (idx - r * pad);
            dst[r * DP + c] = 0;
        }
    }
}

/// Grid (ceil(lq / block_m), batch); 128 threads; geometry::shared_bytes of dynamic shared memory.
template <class T, int D>
__global__ void __launch_bounds__(128)
    flash_attention_kernel(index_t lq, index_t lk, float scale_log2, const T* q_all, const T* k_all, const T* v_all, T* out_all,
                           bool vectorised) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    namespace wmma = nvcuda::wmma;
    using G = flash_geometry<D>;
    using E = typename wmma_type<T>::type;
    constexpr int BN = G::block_n, DP = G::dp;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    std::uint16_t* qs = reinterpret_cast<std::uint16_t*>(flash_smem + G::q_off);
    std::uint16_t* ks = reinterpret_cast<std::uint16_t*>(flash_smem + G::k_off);
    std::uint16_t* vs = reinterpret_cast<std::uint16_t*>(flash_smem + G::v_off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* sw = reinterpret_cast<float*>(flash_smem + G::s_off) + warp * 16 * BN;
    std::uint16_t* pw = reinterpret_cast<std::uint16_t*>(flash_smem + G::p_off) + warp * 16 * BN;
    float* ow = reinterpret_cast<float*>(flash_smem + G::o_off) + warp * 16 * DP;

    const index_t batch = blockIdx.y, q0 = static_cast<index_t>(blockIdx.x) * G::block_m;
    const auto* q = reinterpret_cast<const std::uint16_t*>(q_all) + (batch * lq + q0) * D;
    const auto* k = reinterpret_cast<const std::uint16_t*>(k_all) + batch * lk * D;
    const auto* v = reinterpret_cast<const std::uint16_t*>(v_all) + batch * lk * D;
    auto* out = reinterpret_cast<std::uint16_t*>(out_all) + (batch * lq + q0) * D;

    load_tile<D, DP>(qs, q, G::block_m, lq - q0, vectorised);
    for (int idx = lane; idx < 16 * DP; idx += 32) ow[idx] = 0.0f;

    // Lane pair (2r, 2r + 1) owns row r of this warp's 16: half the columns each.
    const int r = lane >> 1, half_lane = lane & 1;
    float m = -cuda_infinity<float>(), l = 0.0f;

    for (index_t k0 = 0; k0 < lk; k0 += BN) {
        __syncthreads();  // the previous tile's K and V are no longer read
        load_tile<D, DP>(ks, k + k0 * D, BN, lk - k0, vectorised);
        load_tile<D, DP>(vs, v + k0 * D, BN, lk - k0, vectorised);
        __syncthreads();

        // S (16 x BN) = Q_warp (16 x DP) K_tile^T (DP x BN).
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
            wmma::fill_fragment(s_frag, 0.0f);
#pragma unroll
            for (int t = 0; t < DP / 16; ++t) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a_frag;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b_frag;
                wmma::load_matrix_sync(a_frag, reinterpret_cast<const E*>(qs + warp * 16 * DP + t * 16), DP);
                wmma::load_matrix_sync(b_frag, reinterpret_cast<const E*>(ks + j * 16 * DP + t * 16), DP);
                wmma::mma_sync(s_frag, a_frag, b_frag, s_frag);
            }
            wmma::store_matrix_sync(sw + j * 16, s_frag, BN, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax on row r (base-2 exponentials, scale folded in).
        float* srow = sw + r * BN;
        const int c0 = half_lane * (BN / 2);
        float tile_max = -cuda_infinity<float>();
        for (int c = c0; c < c0 + BN / 2; ++c) {
            const float s = k0 + c < lk ? srow[c] * scale_log2 : -cuda_infinity<float>();
            srow[c] = s;
            tile_max = fmaxf(tile_max, s);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float m_new = fmaxf(m, tile_max);  // finite: key k0 is always valid
        const float alpha = exp2f(m - m_new);
        float sum = 0.0f;
        for (int c = c0; c < c0 + BN / 2; ++c) {
            const float p = exp2f(srow[c] - m_new);
            pw[r * BN + c] = wmma_type<T>::bits(p);
            sum += p;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = m_new;
        float* orow = ow + r * DP;
        for (int c = half_lane * (DP / 2); c < (half_lane + 1) * (DP / 2); ++c) orow[c] *= alpha;
        __syncwarp();

        // O (16 x DP) += P (16 x BN) V_tile (BN x DP).
#pragma unroll
        for (int j = 0; j < DP / 16; ++j) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
            wmma::load_matrix_sync(o_frag, ow + j * 16, DP, wmma::mem_row_major);
#pragma unroll
            for (int t = 0; t < BN / 16; ++t) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a_frag;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> b_frag;
                wmma::load_matrix_sync(a_frag, reinterpret_cast<const E*>(pw + t * 16), BN);
                wmma::load_matrix_sync(b_frag, reinterpret_cast<const E*>(vs + t * 16 * DP + j * 16), DP);
                wmma::mma_sync(o_frag, a_frag, b_frag, o_frag);
            }
            wmma::store_matrix_sync(ow + j * 16, o_frag, DP, wmma::mem_row_major);
        }
        __syncwarp();
    }

    const index_t row = static_cast<index_t>(warp) * 16 + r;
    if (q0 + row < lq) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        const float* orow = ow + r * DP;
        for (int c = half_lane * (DP / 2); c < (half_lane + 1) * (DP / 2) && c < D; ++c)
            out[row * D + c] = wmma_type<T>::bits(orow[c] * inv);
    }
#endif
}

/// True when the tensor-core kernel handles (T, d, dv).
template <class T>
constexpr bool flash_supported_type() {
    return std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;
}
inline bool flash_supported_dims(index_t d, index_t dv) { return d == dv && (d == 40 || d == 64 || d == 80 || d == 160); }

template <class T, int D>
void launch_flash(cudaStream_t stream, index_t batch, index_t lq, index_t lk, double scale, const T* q, const T* k, const T* v, T* out) {
    using G = flash_geometry<D>;
    auto kernel = flash_attention_kernel<T, D>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(G::shared_bytes)),
               "cudaFuncSetAttribute(flash_attention_kernel)");
    const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
    const bool vectorised = D % 8 == 0 && aligned(q) && aligned(k) && aligned(v);
    const auto scale_log2 = static_cast<float>(scale * 1.4426950408889634074);
    const unsigned tiles = static_cast<unsigned>((lq + G::block_m - 1) / G::block_m);
    // gridDim.y is limited to 65535: launch the batch in slices.
    for (index_t b0 = 0; b0 < batch; b0 += 65535) {
        const index_t count = std::min<index_t>(65535, batch - b0);
        const index_t qo = b0 * lq * D, ko = b0 * lk * D;
        kernel<<<dim3(tiles, static_cast<unsigned>(count)), 128, G::shared_bytes, stream>>>(lq, lk, scale_log2, q + qo, k + ko, v + ko,
                                                                                           out + qo, vectorised);
        check_launch("flash_attention_kernel");
    }
}

/// Runs the fused kernel that fits; false when none does (the caller composes).
template <class T>
bool fused_attention(cudaStream_t stream, bool tensor_cores, index_t batch, index_t lq, index_t lk, index_t d, index_t dv, double scale, const T* q,
                     const T* k, const T* v, T* out) {
    if constexpr (flash_supported_type<T>()) {
        if (tensor_cores && flash_supported_dims(d, dv) && lk > 0) {
            switch (d) {
                case 40: launch_flash<T, 40>(stream, batch, lq, lk, scale, q, k, v, out); return true;
                case 64: launch_flash<T, 64>(stream, batch, lq, lk, scale, q, k, v, out); return true;
                case 80: launch_flash<T, 80>(stream, batch, lq, lk, scale, q, k, v, out); return true;
                case 160: launch_flash<T, 160>(stream, batch, lq, lk, scale, q, k, v, out); return true;
                default: break;
            }
        }
    }
    using A = accum_t<T>;
    const std::size_t shared = static_cast<std::size_t>(rowwise_warps) * static_cast<std::size_t>(d) * sizeof(A);
    if (dv > 256 || shared > 48 * 1024) return false;
    const index_t rows = batch * lq;
    const index_t blocks = (rows + rowwise_warps - 1) / rowwise_warps;
    if (blocks > 0x7fffffff) return false;
    const auto launch = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(blocks), rowwise_warps * 32, shared, stream>>>(rows, lq, lk, d, dv, scale, q, k, v, out);
        check_launch("rowwise_attention_kernel");
    };
    if (dv <= 32) launch(rowwise_attention_kernel<T, 1>);
    else if (dv <= 64) launch(rowwise_attention_kernel<T, 2>);
    else if (dv <= 128) launch(rowwise_attention_kernel<T, 4>);
    else launch(rowwise_attention_kernel<T, 8>);
    return true;
}

}  // namespace dynamicid::cuda::detail
