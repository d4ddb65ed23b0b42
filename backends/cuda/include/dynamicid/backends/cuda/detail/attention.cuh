// dynamicid cuda backend, internal: fused scaled-dot-product attention.
//
// Both kernels stream keys in tiles with an online softmax (running max m and
// running sum l per query row; a new tile rescales what was accumulated by
// exp(m_old - m_new)), so no lq x lk score matrix is ever stored.
//
// * flash_attention_kernel: f16/bf16 with d == dv in {40, 64, 80, 160}. A block
//   of four warps owns 64 query rows (16 per warp) and streams K/V tiles
//   through shared memory; S = Q K^T and O += P V run on tensor cores
//   (mma.sync m16n8k16, f32 accumulation) with S, P and O held in registers;
//   the head dimension of Q K^T is zero-padded to a multiple of 16.
// * rowwise_attention_kernel: any element type and size (dv <= 256): one warp
//   per query row, lane j scores key j of each 32-key tile, lanes own output
//   columns. Exact in f32/f64; the path the tests' small shapes take.
#pragma once

#include <dynamicid/backends/cuda/detail/common.cuh>
#include <dynamicid/backends/cuda/detail/pointwise.cuh>

#include <atomic>
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
//
// One warp owns 16 query rows and keeps everything of them in registers: the
// Q operand, the scores S of the current key tile (mma.sync m16n8k16, f32
// accumulators), the running max and sum, and O. The accumulator layout of S
// is the A-operand layout of the next product, so P goes from S to P V
// without touching shared memory. Only the K and V tiles are shared by the
// block's four warps; V's operand is read with ldmatrix.trans. Thread
// (g = lane / 4, t = lane % 4) holds rows g and g + 8, columns 2t and 2t + 1
// of every 8-wide accumulator tile.

template <class T> struct mma_type;
template <> struct mma_type<half> {
    __device__ static std::uint32_t pack(float lo, float hi) {
        const __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const std::uint32_t*>(&h);
    }
    __device__ static std::uint16_t bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
    __device__ static void mma(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct mma_type<bfloat16> {
    __device__ static std::uint32_t pack(float lo, float hi) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const std::uint32_t*>(&h);
    }
    __device__ static std::uint16_t bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
    __device__ static void mma(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

/// Tile geometry for head dimension D (a multiple of 8).
template <int D>
struct flash_geometry {
    static constexpr int warps = 4;
    static constexpr int block_m = 16 * warps;         // query rows per block
    static constexpr int block_n = D > 80 ? 32 : 64;   // keys per tile
    static constexpr int dp = (D + 15) / 16 * 16;      // head dimension padded to the k step of 16
    // Shared row stride in 16-bit values, = 8 (mod 64): the eight rows one
    // load instruction touches fall in distinct banks, and rows stay 16-byte aligned.
    static constexpr int stride = (dp - 8 + 63) / 64 * 64 + 8;
    static constexpr std::size_t shared_bytes = std::size_t{4} * block_n * stride * 2;  // K and V tiles, two stages
};

/// Keys [k0, k0 + rows) of `src` (row stride D) into `dst` (row stride S),
/// one value at a time (rows not 16-byte aligned; aligned ones go through
/// cp_async16), zero rows past `valid`; columns D.. are left alone.
template <int D, int S>
__device__ __forceinline__ void load_kv_tile(std::uint16_t* dst, const std::uint16_t* src, int rows, index_t valid) {
    for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
        const int r = idx / D, c = idx - r * D;
        dst[r * S + c] = r < valid ? src[static_cast<index_t>(r) * D + c] : std::uint16_t{0};
    }
}

__device__ __forceinline__ std::uint32_t shared_address(const void* p) { return static_cast<std::uint32_t>(__cvta_generic_to_shared(p)); }

/// 16 bytes global -> shared without passing through registers; zero-filled when !valid.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src), "r"(valid ? 16 : 0));
#endif
}

/// 2^x on the special-function unit (2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/// Grid (ceil(lq / block_m), batch); 128 threads; geometry::shared_bytes of dynamic shared memory.
template <class T, int D>
__global__ void __launch_bounds__(128)
    flash_attention_kernel(index_t lq, index_t lk, float scale_log2, const T* q_all, const T* k_all, const T* v_all, T* out_all,
                           bool vectorised) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using G = flash_geometry<D>;
    using M = mma_type<T>;
    constexpr int BN = G::block_n, DP = G::dp, S = G::stride;
    constexpr int KC = DP / 16;  // k steps of Q K^T
    constexpr int NT = BN / 8;   // 8-wide key tiles of S
    constexpr int OT = D / 8;    // 8-wide column tiles of O
    extern __shared__ __align__(128) unsigned char flash_smem[];
    // Two stages of (K tile, V tile): stage i at smem + i * 2 * BN * S values.
    auto* smem = reinterpret_cast<std::uint16_t*>(flash_smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;

    const index_t batch = blockIdx.y, q0 = static_cast<index_t>(blockIdx.x) * G::block_m + warp * 16;
    const auto* q = reinterpret_cast<const std::uint16_t*>(q_all) + batch * lq * D;
    const auto* k = reinterpret_cast<const std::uint16_t*>(k_all) + batch * lk * D;
    const auto* v = reinterpret_cast<const std::uint16_t*>(v_all) + batch * lk * D;
    auto* out = reinterpret_cast<std::uint16_t*>(out_all) + batch * lq * D;

    // K's padding columns D..DP stay zero for the whole kernel (tiles write columns < D).
    if constexpr (DP > D) {
        constexpr int pad = DP - D;
        for (int idx = threadIdx.x; idx < 2 * BN * pad; idx += blockDim.x) {
            const int stage = idx / (BN * pad), rest = idx - stage * BN * pad;
            smem[stage * 2 * BN * S + (rest / pad) * S + D + rest % pad] = 0;
        }
    }

    // Stage `buf` <- keys [k0, k0 + BN): asynchronous 16-byte copies when rows
    // are aligned (the next tile loads while this one is used), else plain loads.
    const auto fetch = [&](index_t k0, int buf) {
        std::uint16_t* kd = smem + buf * 2 * BN * S;
        std::uint16_t* vd = kd + BN * S;
        if (vectorised) {
            constexpr int chunks = D / 8;
            for (int idx = threadIdx.x; idx < BN * chunks; idx += blockDim.x) {
                const int r = idx / chunks, c = (idx - r * chunks) * 8;
                const bool valid = k0 + r < lk;
                const index_t at = valid ? (k0 + r) * D + c : 0;
                cp_async16(kd + r * S + c, k + at, valid);
                cp_async16(vd + r * S + c, v + at, valid);
            }
            asm volatile("cp.async.commit_group;\n" ::);
        } else {
            load_kv_tile<D, S>(kd, k + k0 * D, BN, lk - k0);
            load_kv_tile<D, S>(vd, v + k0 * D, BN, lk - k0);
        }
    };

    // This warp's Q as A operands: a[i] holds row g + 8 (i & 1), columns 16 kc + 2t + 8 (i >> 1), +1.
    std::uint32_t qa[KC][4];
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const index_t row = q0 + g + 8 * (i & 1);
            const int col = kc * 16 + 2 * t + 8 * (i >> 1);
            std::uint32_t bits = 0;
            if (row < lq && col < D) bits = std::uint32_t{q[row * D + col]} | (std::uint32_t{q[row * D + col + 1]} << 16);
            qa[kc][i] = bits;
        }

    float o[OT][4];
#pragma unroll
    for (int j = 0; j < OT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m0 = -cuda_infinity<float>(), m1 = -cuda_infinity<float>(), l0 = 0.0f, l1 = 0.0f;

    fetch(0, 0);
    int buf = 0;
    for (index_t k0 = 0; k0 < lk; k0 += BN, buf ^= 1) {
        if (k0 + BN < lk) {
            fetch(k0 + BN, buf ^ 1);  // that stage was released by the previous iteration's last barrier
            if (vectorised) asm volatile("cp.async.wait_group 1;\n" ::);
        } else if (vectorised) {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncthreads();
        const std::uint16_t* ks = smem + buf * 2 * BN * S;
        const std::uint16_t* vs = ks + BN * S;

        // S (16 x BN) = Q (16 x DP) K_tile^T; B operand: key 8j + g, columns 16 kc + 2t (+8), +1.
        float s[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            const std::uint16_t* krow = ks + (j * 8 + g) * S + 2 * t;
#pragma unroll
            for (int kc = 0; kc < KC; ++kc) {
                const std::uint32_t b0 = *reinterpret_cast<const std::uint32_t*>(krow + kc * 16);
                const std::uint32_t b1 = *reinterpret_cast<const std::uint32_t*>(krow + kc * 16 + 8);
                M::mma(s[j], qa[kc], b0, b1);
            }
        }

        // Online softmax in base 2 (the scale folded in); keys past lk score -inf.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const index_t key = k0 + j * 8 + 2 * t + (i & 1);
                s[j][i] = key < lk ? s[j][i] * scale_log2 : -cuda_infinity<float>();
                if (i < 2) mx0 = fmaxf(mx0, s[j][i]);
                else mx1 = fmaxf(mx1, s[j][i]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float alpha0 = fast_exp2(m0 - mx0), alpha1 = fast_exp2(m1 - mx1);  // maxima finite: key k0 is valid
        m0 = mx0;
        m1 = mx1;
        l0 *= alpha0;
        l1 *= alpha1;
#pragma unroll
        for (int j = 0; j < OT; ++j) {
            o[j][0] *= alpha0;
            o[j][1] *= alpha0;
            o[j][2] *= alpha1;
            o[j][3] *= alpha1;
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            s[j][0] = fast_exp2(s[j][0] - m0);
            s[j][1] = fast_exp2(s[j][1] - m0);
            s[j][2] = fast_exp2(s[j][2] - m1);
            s[j][3] = fast_exp2(s[j][3] - m1);
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }

        // O (16 x D) += P (16 x BN) V_tile; P's A operand comes straight from the accumulators.
#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
            const std::uint32_t pa[4] = {M::pack(s[2 * kc][0], s[2 * kc][1]), M::pack(s[2 * kc][2], s[2 * kc][3]),
                                         M::pack(s[2 * kc + 1][0], s[2 * kc + 1][1]), M::pack(s[2 * kc + 1][2], s[2 * kc + 1][3])};
            const std::uint32_t vrow = shared_address(vs + (kc * 16 + (lane & 15)) * S);
#pragma unroll
            for (int j = 0; j < OT; ++j) {
                std::uint32_t b0, b1;
                asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                             : "=r"(b0), "=r"(b1)
                             : "r"(vrow + j * 16));
                M::mma(o[j], pa, b0, b1);
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const index_t r0 = q0 + g, r1 = q0 + g + 8;
#pragma unroll
    for (int j = 0; j < OT; ++j) {
        const int col = j * 8 + 2 * t;
        if (r0 < lq) {
            out[r0 * D + col] = M::bits(o[j][0] * inv0);
            out[r0 * D + col + 1] = M::bits(o[j][1] * inv0);
        }
        if (r1 < lq) {
            out[r1 * D + col] = M::bits(o[j][2] * inv1);
            out[r1 * D + col + 1] = M::bits(o[j][3] * inv1);
        }
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
    // The shared-memory opt-in is set once per device, not per launch.
    static std::atomic<std::uint64_t> opted_in{0};
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    const std::uint64_t bit = device < 64 ? std::uint64_t{1} << device : 0;
    if (!bit || !(opted_in.load(std::memory_order_acquire) & bit)) {
        check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(G::shared_bytes)),
                   "cudaFuncSetAttribute(flash_attention_kernel)");
        opted_in.fetch_or(bit, std::memory_order_release);
    }
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
