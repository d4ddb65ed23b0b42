// dynamicid: xtensor interop for the oneDNN backend, whose buffers are plain
// host memory like the reference backend's.
//
//     #include <dynamicid/backends/onednn/xtensor.hpp>
//     auto x = dynamicid::tensor<dynamicid::onednn_backend, float>::zeros(ctx, {2, 3});
//     auto v = dynamicid::host_view(x);   // aliases x's storage
#pragma once

#include <dynamicid/backends/onednn.hpp>
#include <dynamicid/io/xtensor.hpp>

namespace dynamicid {

/// onednn_backend buffers are aligned host allocations.
template <>
inline constexpr bool is_host_memory<onednn_backend> = true;

static_assert(host_addressable<onednn_backend, float>);

}  // namespace dynamicid
