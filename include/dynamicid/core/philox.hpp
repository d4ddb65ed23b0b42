// dynamicid: the counter-based random number generator every backend shares.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11). A number is a pure function of (seed, index), so a backend can
// produce element i on any thread or device and all backends agree bit for bit
// on the uniforms; normals use Box-Muller on pairs of uniforms.
#pragma once

#include <dynamicid/core/config.hpp>

#include <array>
#include <cmath>
#include <cstdint>

namespace dynamicid::philox {

using counter = std::array<std::uint32_t, 4>;
using key = std::array<std::uint32_t, 2>;

DYNAMICID_HOST_DEVICE inline void mulhilo(std::uint32_t a, std::uint32_t b, std::uint32_t& hi, std::uint32_t& lo) {
    const std::uint64_t product = static_cast<std::uint64_t>(a) * b;
    hi = static_cast<std::uint32_t>(product >> 32);
    lo = static_cast<std::uint32_t>(product);
}

/// Ten rounds of Philox4x32 on `ctr` under `k`.
DYNAMICID_HOST_DEVICE inline counter philox4x32_10(counter ctr, key k) {
    constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
    constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
    for (int round = 0; round < 10; ++round) {
        std::uint32_t hi0, lo0, hi1, lo1;
        mulhilo(m0, ctr[0], hi0, lo0);
        mulhilo(m1, ctr[2], hi1, lo1);
        ctr = counter{hi1 ^ ctr[1] ^ k[0], lo1, hi0 ^ ctr[3] ^ k[1], lo0};
        k[0] += w0;
        k[1] += w1;
    }
    return ctr;
}

/// The four 32-bit words of block `block` of stream `seed`.
DYNAMICID_HOST_DEVICE inline counter block(std::uint64_t seed, std::uint64_t block_index) {
    return philox4x32_10(counter{static_cast<std::uint32_t>(block_index), static_cast<std::uint32_t>(block_index >> 32), 0u, 0u},
                         key{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)});
}

/// 32 random bits for element `index` of stream `seed`.
DYNAMICID_HOST_DEVICE inline std::uint32_t bits(std::uint64_t seed, std::uint64_t index) {
    return block(seed, index >> 2)[index & 3u];
}

/// Uniform in (0, 1], 24 bits of resolution; never 0 so log() is safe.
DYNAMICID_HOST_DEVICE inline float uniform_from_bits(std::uint32_t b) {
    return (static_cast<float>(b >> 8) + 1.0f) * (1.0f / 16777216.0f);
}

/// Uniform in (0, 1] for element `index` of stream `seed`.
DYNAMICID_HOST_DEVICE inline float uniform(std::uint64_t seed, std::uint64_t index) {
    return uniform_from_bits(bits(seed, index));
}

/// Standard normal for element `index` of stream `seed`: Box-Muller on the
/// pair of uniforms (2*(index/2), 2*(index/2)+1); even index takes the cosine.
DYNAMICID_HOST_DEVICE inline double normal(std::uint64_t seed, std::uint64_t index) {
    const std::uint64_t pair = index & ~std::uint64_t{1};
    const double u1 = uniform(seed, pair);
    const double u2 = uniform(seed, pair + 1);
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = 6.283185307179586476925286766559 * u2;
    return (index & 1u) ? radius * std::sin(angle) : radius * std::cos(angle);
}

}  // namespace dynamicid::philox
