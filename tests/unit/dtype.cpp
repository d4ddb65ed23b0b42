// f16 and bf16 conversions: exact widening, round-to-nearest-even narrowing,
// overflow, subnormals and NaN.
#include <dynamicid/core/dtype.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

using dynamicid::bfloat16;
using dynamicid::half;

namespace {

bool half_is_nan(std::uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool bf16_is_nan(std::uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

// The value of a binary16 pattern from its definition, independent of the library.
double half_value(std::uint16_t h) {
    const int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    double v;
    if (exponent == 0x1f) v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
    else if (exponent == 0) v = std::ldexp(mantissa, -24);
    else v = std::ldexp(1024 + mantissa, exponent - 25);
    return sign ? -v : v;
}

std::uint16_t to_half(float v) { return half(v).bits; }
std::uint16_t to_bf16(float v) { return bfloat16(v).bits; }

}  // namespace

TEST_CASE("dtype: every f16 pattern widens exactly and narrows back", "[dtype]") {
    for (std::uint32_t i = 0; i < 65536; ++i) {
        const auto h = static_cast<std::uint16_t>(i);
        const float f = static_cast<float>(half::from_bits(h));
        INFO("pattern 0x" << std::hex << i);
        if (half_is_nan(h)) {
            REQUIRE(std::isnan(f));
            REQUIRE(half_is_nan(to_half(f)));
            REQUIRE((to_half(f) & 0x8000u) == (h & 0x8000u));
        } else {
            REQUIRE(static_cast<double>(f) == half_value(h));
            REQUIRE(to_half(f) == h);
        }
    }
}

TEST_CASE("dtype: f16 rounds to nearest, ties to even", "[dtype]") {
    // Halfway between each pair of neighbouring finite halves (subnormals
    // included, and between 0 and the smallest subnormal); the midpoint of two
    // halves always fits a float exactly.
    for (std::uint16_t h = 0; h < 0x7bff; ++h) {
        const auto lo = static_cast<float>(half_value(h)), hi = static_cast<float>(half_value(static_cast<std::uint16_t>(h + 1)));
        const float mid = static_cast<float>((static_cast<double>(lo) + hi) / 2);
        INFO("between 0x" << std::hex << h << " and 0x" << h + 1);
        REQUIRE(to_half(mid) == ((h & 1u) ? h + 1 : h));
        REQUIRE(to_half(std::nextafter(mid, 0.0f)) == h);
        REQUIRE(to_half(std::nextafter(mid, 1e30f)) == h + 1);
        REQUIRE(to_half(-mid) == (((h & 1u) ? h + 1 : h) | 0x8000u));
    }
    CHECK(to_half(1.0f + 0x1p-11f) == 0x3c00u);      // tie, 1.0 is even
    CHECK(to_half(1.0f + 3 * 0x1p-11f) == 0x3c02u);  // tie, rounds up to even
}

TEST_CASE("dtype: f16 overflow goes to infinity, subnormals are kept", "[dtype]") {
    CHECK(to_half(65504.0f) == 0x7bffu);  // largest finite
    CHECK(to_half(std::nextafter(65520.0f, 0.0f)) == 0x7bffu);
    CHECK(to_half(65520.0f) == 0x7c00u);  // halfway to the next binade: ties to even, which is infinity
    CHECK(to_half(1e5f) == 0x7c00u);
    CHECK(to_half(-1e5f) == 0xfc00u);
    CHECK(to_half(std::numeric_limits<float>::max()) == 0x7c00u);
    CHECK(to_half(std::numeric_limits<float>::infinity()) == 0x7c00u);
    CHECK(to_half(-std::numeric_limits<float>::infinity()) == 0xfc00u);

    CHECK(to_half(0x1p-24f) == 0x0001u);        // smallest subnormal
    CHECK(to_half(1023 * 0x1p-24f) == 0x03ffu);  // largest subnormal
    CHECK(to_half(0x1p-14f) == 0x0400u);        // smallest normal
    CHECK(to_half(0x1p-25f) == 0x0000u);        // tie with zero: zero is even
    CHECK(to_half(0x1.000002p-25f) == 0x0001u);
    CHECK(to_half(3 * 0x1p-25f) == 0x0002u);
    CHECK(to_half(1e-30f) == 0x0000u);
    CHECK(to_half(std::numeric_limits<float>::denorm_min()) == 0x0000u);
    CHECK(to_half(-0.0f) == 0x8000u);
    CHECK(to_half(-0x1p-24f) == 0x8001u);
}

TEST_CASE("dtype: f16 NaN stays NaN", "[dtype]") {
    const float quiet = std::numeric_limits<float>::quiet_NaN();
    CHECK(half_is_nan(to_half(quiet)));
    CHECK(half_is_nan(to_half(-quiet)));
    CHECK((to_half(-quiet) & 0x8000u) != 0);
    // A signalling NaN whose payload lies below f16's mantissa must not become infinity.
    float low_payload;
    const std::uint32_t bits = 0x7f800001u;
    std::memcpy(&low_payload, &bits, sizeof bits);
    CHECK(half_is_nan(to_half(low_payload)));
    CHECK(std::isnan(static_cast<float>(half::from_bits(0x7e00u))));
}

TEST_CASE("dtype: every bf16 pattern widens exactly and narrows back", "[dtype]") {
    for (std::uint32_t i = 0; i < 65536; ++i) {
        const auto b = static_cast<std::uint16_t>(i);
        const float f = static_cast<float>(bfloat16::from_bits(b));
        std::uint32_t fbits;
        std::memcpy(&fbits, &f, sizeof f);
        INFO("pattern 0x" << std::hex << i);
        if (bf16_is_nan(b)) {
            REQUIRE(std::isnan(f));
            REQUIRE(bf16_is_nan(to_bf16(f)));
        } else {
            REQUIRE(fbits == i << 16);
            REQUIRE(to_bf16(f) == b);
        }
    }
}

TEST_CASE("dtype: bf16 rounds to nearest, ties to even, and keeps NaN", "[dtype]") {
    CHECK(to_bf16(1.0f + 0x1p-8f) == 0x3f80u);      // tie, 1.0 is even
    CHECK(to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82u);  // tie, rounds up to even
    CHECK(to_bf16(1.0f + 0x1.2p-8f) == 0x3f81u);    // above the tie
    CHECK(to_bf16(1.0f + 0x1.ep-9f) == 0x3f80u);    // below the tie
    CHECK(to_bf16(-(1.0f + 3 * 0x1p-8f)) == 0xbf82u);
    CHECK(to_bf16(std::numeric_limits<float>::max()) == 0x7f80u);  // beyond the last tie: infinity
    CHECK(to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80u);
    CHECK(to_bf16(0x1p-133f) == 0x0001u);  // float subnormals are bf16 subnormals
    CHECK(to_bf16(-0.0f) == 0x8000u);

    const float quiet = std::numeric_limits<float>::quiet_NaN();
    CHECK(bf16_is_nan(to_bf16(quiet)));
    CHECK(bf16_is_nan(to_bf16(-quiet)));
    // A NaN whose payload sits only in the dropped low bits must not become infinity.
    for (std::uint32_t bits : {0x7f800001u, 0xff800001u, 0x7fc00000u, 0x7f80ffffu}) {
        float nan;
        std::memcpy(&nan, &bits, sizeof bits);
        INFO("float pattern 0x" << std::hex << bits);
        CHECK(bf16_is_nan(to_bf16(nan)));
        CHECK((to_bf16(nan) & 0x8000u) == ((bits >> 16) & 0x8000u));
    }
}

TEST_CASE("dtype: element_cast goes through the accumulation type", "[dtype]") {
    using dynamicid::element_cast;
    CHECK(element_cast<float>(half(1.5f)) == 1.5f);
    CHECK(element_cast<double>(bfloat16(-2.0f)) == -2.0);
    CHECK(element_cast<half>(bfloat16(0.5f)).bits == 0x3800u);
    CHECK(element_cast<half>(0.1).bits == to_half(0.1f));
    CHECK(dynamicid::size_of(dynamicid::dtype::bf16) == 2);
    CHECK(dynamicid::name_of(dynamicid::dtype_of<half>) == "F16");
}
