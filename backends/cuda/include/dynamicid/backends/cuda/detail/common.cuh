// dynamicid cuda backend, internal: error translation, element access and launch helpers.
#pragma once

#include <dynamicid/core/config.hpp>
#include <dynamicid/core/descriptors.hpp>
#include <dynamicid/core/dtype.hpp>
#include <dynamicid/core/error.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <type_traits>

namespace dynamicid {

/// A CUDA runtime, cuBLAS or cuDNN call failed; what() starts with "[cuda]".
class cuda_error : public error {
public:
    using error::error;
};

/// The device ran out of memory (after the context's cached blocks were released).
class cuda_out_of_memory : public cuda_error {
public:
    using cuda_error::cuda_error;
};

/// Work that must reach the host (a copy to the host, a wait) was asked for
/// while a step_graph was recording; step_graph::run catches it and runs the
/// call without a graph.
class cuda_capture_refused : public value_error {
public:
    using value_error::value_error;
};

}  // namespace dynamicid

namespace dynamicid::cuda::detail {

/// Throws cuda_error (or cuda_out_of_memory) when `status` is not cudaSuccess.
inline void check_cuda(cudaError_t status, const char* what) {
    if (status == cudaSuccess) return;
    const std::string message = std::string(what) + " failed: " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")";
    if (status == cudaErrorMemoryAllocation) throw cuda_out_of_memory("cuda", message);
    throw cuda_error("cuda", message);
}

/// Checks the launch that was just made (configuration errors); does not wait for it.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// ---- element access: 16-bit storage types are read as __half / __nv_bfloat16 --

template <class T>
__device__ __forceinline__ accum_t<T> load(const T* p, index_t i) {
    if constexpr (std::is_same_v<T, half>) return __half2float(reinterpret_cast<const __half*>(p)[i]);
    else if constexpr (std::is_same_v<T, bfloat16>) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
    else return p[i];
}

template <class T>
__device__ __forceinline__ void store(T* p, index_t i, accum_t<T> v) {
    if constexpr (std::is_same_v<T, half>) reinterpret_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v));
    else if constexpr (std::is_same_v<T, bfloat16>) reinterpret_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v));
    else p[i] = v;
}

// ---- launch geometry ------------------------------------------------------------

inline constexpr int block_threads = 256;

/// Blocks for a grid-stride loop over n items (capped; the loop covers the rest).
inline unsigned grid_for(index_t n, int threads = block_threads) {
    const index_t blocks = (n + threads - 1) / threads;
    return static_cast<unsigned>(std::clamp<index_t>(blocks, 1, index_t{1} << 20));
}

__device__ __forceinline__ index_t global_index() {
    return static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ index_t global_stride() { return static_cast<index_t>(gridDim.x) * blockDim.x; }

// ---- strided index spaces ---------------------------------------------------------

/// A box of up to max_rank axes walked in row-major order, with up to three
/// stride sets (operands) read through it. Passed to kernels by value.
struct strided_box {
    int rank = 0;
    std::array<index_t, max_rank> shape{};
    std::array<std::array<index_t, max_rank>, 3> strides{};
};

/// Drops axes of extent 1 and merges neighbours that are contiguous for every
/// operand, so that most walks end up rank 1 or 2 (fewer divisions per element).
inline strided_box coalesce(strided_box box, int operands) {
    strided_box out;
    for (int a = 0; a < box.rank; ++a) {
        const auto ia = static_cast<std::size_t>(a);
        if (box.shape[ia] == 1) continue;
        if (out.rank > 0) {
            const auto last = static_cast<std::size_t>(out.rank - 1);
            bool merge = true;
            for (int o = 0; o < operands; ++o) {
                const auto io = static_cast<std::size_t>(o);
                merge = merge && out.strides[io][last] == box.strides[io][ia] * box.shape[ia];
            }
            if (merge) {
                out.shape[last] *= box.shape[ia];
                for (int o = 0; o < operands; ++o) out.strides[static_cast<std::size_t>(o)][last] = box.strides[static_cast<std::size_t>(o)][ia];
                continue;
            }
        }
        const auto at = static_cast<std::size_t>(out.rank++);
        out.shape[at] = box.shape[ia];
        for (int o = 0; o < operands; ++o) out.strides[static_cast<std::size_t>(o)][at] = box.strides[static_cast<std::size_t>(o)][ia];
    }
    return out;
}

inline index_t box_numel(const strided_box& box) {
    index_t n = 1;
    for (int a = 0; a < box.rank; ++a) n *= box.shape[static_cast<std::size_t>(a)];
    return n;
}

/// Offsets of row-major position `linear` of the box for each of `Operands`
/// stride sets, computed in index type I: std::uint32_t where box_fits_u32
/// says so (32-bit division is several times cheaper on the device), else
/// index_t. The outermost axis needs no division.
template <int Operands, class I = index_t>
__device__ __forceinline__ void box_offsets(const strided_box& box, std::type_identity_t<I> linear, I (&off)[Operands]) {
    for (int o = 0; o < Operands; ++o) off[o] = 0;
    for (int a = box.rank - 1; a > 0; --a) {
        const I extent = static_cast<I>(box.shape[a]);
        const I q = linear / extent, i = linear - q * extent;
        linear = q;
        for (int o = 0; o < Operands; ++o) off[o] += i * static_cast<I>(box.strides[o][a]);
    }
    if (box.rank > 0)
        for (int o = 0; o < Operands; ++o) off[o] += linear * static_cast<I>(box.strides[o][0]);
}

/// True when a walk over `box` (n positions, `operands` non-negative stride
/// sets) can do its index arithmetic in 32 bits: positions and every offset
/// stay below 2^31, so grid-stride loops cannot wrap either.
inline bool box_fits_u32(const strided_box& box, int operands, index_t n) {
    constexpr index_t limit = index_t{1} << 31;
    if (n >= limit) return false;
    for (int o = 0; o < operands; ++o) {
        index_t last = 0;
        for (int a = 0; a < box.rank; ++a) {
            const auto ia = static_cast<std::size_t>(a);
            const index_t stride = box.strides[static_cast<std::size_t>(o)][ia];
            if (stride < 0) return false;
            last += (box.shape[ia] - 1) * stride;
        }
        if (last >= limit) return false;
    }
    return true;
}

/// Splits a box into the axes flagged `inner` (walked by one thread, in order)
/// and the others (one thread each). Both halves keep all stride sets.
inline void split_box(const strided_box& box, const std::array<bool, max_rank>& inner, strided_box& outer_part,
                      strided_box& inner_part) {
    outer_part = strided_box{};
    inner_part = strided_box{};
    for (int a = 0; a < box.rank; ++a) {
        const auto ia = static_cast<std::size_t>(a);
        strided_box& part = inner[ia] ? inner_part : outer_part;
        const auto at = static_cast<std::size_t>(part.rank++);
        part.shape[at] = box.shape[ia];
        for (std::size_t o = 0; o < 3; ++o) part.strides[o][at] = box.strides[o][ia];
    }
}

/// Row-major contiguous strides of `shape`.
inline std::array<index_t, max_rank> contiguous_strides(int rank, const std::array<index_t, max_rank>& shape) {
    std::array<index_t, max_rank> s{};
    index_t running = 1;
    for (int a = rank - 1; a >= 0; --a) {
        s[static_cast<std::size_t>(a)] = running;
        running *= shape[static_cast<std::size_t>(a)];
    }
    return s;
}

// ---- block-wide reductions ----------------------------------------------------------

template <class A>
__device__ __forceinline__ A cuda_infinity() {
    if constexpr (std::is_same_v<A, double>) return __longlong_as_double(0x7ff0000000000000LL);
    else return __int_as_float(0x7f800000);
}

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
template <class A>
__device__ __forceinline__ A warp_max(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

/// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <class A>
__device__ A block_sum(A v) {
    __shared__ A partial[32];
    __syncthreads();  // partial may still be read by a previous call
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    A total = lane < warps ? partial[lane] : A(0);
    return warp_sum(total);
}

template <class A>
__device__ A block_max(A v) {
    __shared__ A partial[32];
    __syncthreads();
    v = warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    A peak = lane < warps ? partial[lane] : -cuda_infinity<A>();
    return warp_max(peak);
}

}  // namespace dynamicid::cuda::detail
