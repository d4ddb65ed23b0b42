// Philox4x32-10 against the Random123 known-answer vectors, and the
// statistics and stream layout of the random ops built on it.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/core/philox.hpp>
#include <dynamicid/ops/random.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

namespace philox = dynamicid::philox;
using dynamicid::cpu_backend;

TEST_CASE("philox: Random123 known-answer vectors for Philox4x32-10", "[philox]") {
    struct vector {
        philox::counter ctr;
        philox::key key;
        philox::counter expected;
    };
    const vector kat[] = {
        {{0u, 0u, 0u, 0u}, {0u, 0u}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
        {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
         {0xffffffffu, 0xffffffffu},
         {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
        {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
         {0xa4093822u, 0x299f31d0u},
         {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
    };
    for (const auto& v : kat) CHECK(philox::philox4x32_10(v.ctr, v.key) == v.expected);
}

TEST_CASE("philox: element i of a stream is word i % 4 of block i / 4", "[philox]") {
    const std::uint64_t seed = 0x0123456789abcdefull;
    for (std::uint64_t block : {0ull, 1ull, 0x1'0000'0002ull}) {
        const auto words = philox::philox4x32_10({static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32), 0u, 0u},
                                                 {0x89abcdefu, 0x01234567u});
        for (std::uint64_t w = 0; w < 4; ++w) CHECK(philox::bits(seed, block * 4 + w) == words[w]);
    }
}

TEST_CASE("philox: uniforms are above 0 and at most 1", "[philox]") {
    CHECK(philox::uniform_from_bits(0u) > 0.0f);
    CHECK(philox::uniform_from_bits(0xffffffffu) == 1.0f);
    dynamicid::cpu_backend::context ctx{.threads = 2};
    const auto u = dynamicid::ops::rand<cpu_backend, float>(ctx, {100000}, 7).to_host(ctx);
    double sum = 0;
    bool in_range = true;
    for (float v : u) {
        in_range = in_range && v > 0.0f && v <= 1.0f;
        sum += v;
    }
    CHECK(in_range);
    CHECK(std::abs(sum / static_cast<double>(u.size()) - 0.5) < 0.01);
}

TEST_CASE("philox: randn has mean 0 and variance 1", "[philox]") {
    dynamicid::cpu_backend::context ctx{.threads = 2};
    for (std::uint64_t seed : {1ull, 42ull}) {
        const auto x = dynamicid::ops::randn<cpu_backend, double>(ctx, {100000}, seed).to_host(ctx);
        double sum = 0, sq = 0;
        for (double v : x) {
            sum += v;
            sq += v * v;
        }
        const double n = static_cast<double>(x.size());
        const double mean = sum / n, var = sq / n - mean * mean;
        // Standard errors are ~0.003 (mean) and ~0.0045 (variance); the bounds are ~6 of them.
        CHECK(std::abs(mean) < 0.02);
        CHECK(std::abs(var - 1.0) < 0.03);
    }
}

TEST_CASE("philox: a seed fixes the numbers and an offset shifts the stream", "[philox]") {
    dynamicid::cpu_backend::context ctx{.threads = 2};
    using dynamicid::ops::randn;
    const auto a = randn<cpu_backend, float>(ctx, {64}, 9).to_host(ctx);
    const auto b = randn<cpu_backend, float>(ctx, {64}, 9).to_host(ctx);
    const auto other = randn<cpu_backend, float>(ctx, {64}, 10).to_host(ctx);
    CHECK(a == b);
    CHECK(a != other);
    for (std::uint64_t offset : {1ull, 3ull, 10ull}) {
        const auto shifted = randn<cpu_backend, float>(ctx, {64 - static_cast<dynamicid::index_t>(offset)}, 9, offset).to_host(ctx);
        INFO("offset " << offset);
        CHECK(std::vector<float>(a.begin() + static_cast<std::ptrdiff_t>(offset), a.end()) == shifted);
    }
    // The same numbers whatever the thread count (each element depends only on its index).
    dynamicid::cpu_backend::context single{.threads = 1};
    CHECK(randn<cpu_backend, float>(single, {64}, 9).to_host(single) == a);
}
