// dynamicid: xtensor interop for the CPU backend. Including this header (not
// the core io/xtensor.hpp alone) is what makes host_view available for
// cpu_backend tensors, so the core never depends on a backend.
//
//     #include <dynamicid/backends/cpu/xtensor.hpp>
//     auto x = dynamicid::tensor<dynamicid::cpu_backend, float>::zeros(ctx, {2, 3});
//     auto v = dynamicid::host_view(x);   // aliases x's storage
#pragma once

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/xtensor.hpp>

namespace dynamicid {

/// cpu_backend buffers are plain aligned_alloc memory.
template <>
inline constexpr bool is_host_memory<cpu_backend> = true;

static_assert(host_addressable<cpu_backend, float>);

}  // namespace dynamicid
