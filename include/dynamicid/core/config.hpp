// dynamicid: compiler and platform switches shared by every header.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DYNAMICID_HOST_DEVICE __host__ __device__
#else
#define DYNAMICID_HOST_DEVICE
#endif

#include <cstdint>

namespace dynamicid {
/// Index type used for sizes, strides and offsets everywhere.
using index_t = std::int64_t;
/// Largest tensor rank the strided primitives handle.
inline constexpr int max_rank = 8;
}  // namespace dynamicid
