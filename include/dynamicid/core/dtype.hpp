// dynamicid: element types.
//
// f32 is what every backend must compute in; f64 is offered by the reference
// backend for gradient checks; f16 and bf16 are storage types whose arithmetic
// accumulates in f32 (see accum_t).
#pragma once

#include <dynamicid/core/config.hpp>

#include <bit>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

namespace dynamicid {

namespace detail {

DYNAMICID_HOST_DEVICE inline std::uint32_t float_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
DYNAMICID_HOST_DEVICE inline float bits_float(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// IEEE binary32 -> binary16, round to nearest even, with subnormals, inf, NaN.
DYNAMICID_HOST_DEVICE inline std::uint16_t float_to_half_bits(float value) {
    const std::uint32_t f = float_bits(value);
    const std::uint32_t sign = (f >> 16) & 0x8000u;
    const std::uint32_t abs = f & 0x7fffffffu;
    if (abs >= 0x7f800000u) {  // inf or NaN; keep NaN quiet and non-zero
        return static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x0200u | ((abs >> 13) & 0x3ffu) : 0u));
    }
    if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to inf
    if (abs < 0x38800000u) {  // result is subnormal or zero
        if (abs < 0x33000000u) return static_cast<std::uint16_t>(sign);  // below half the smallest subnormal
        const std::uint32_t exponent = abs >> 23;
        const std::uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
        const std::uint32_t shift = 126u - exponent;  // 14..24
        std::uint32_t half = mantissa >> shift;
        const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
        const std::uint32_t halfway = 1u << (shift - 1u);
        if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
        return static_cast<std::uint16_t>(sign | half);
    }
    std::uint32_t half = ((abs - 0x38000000u) >> 13);
    const std::uint32_t rest = abs & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
    return static_cast<std::uint16_t>(sign | half);
}

DYNAMICID_HOST_DEVICE inline float half_bits_to_float(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    std::uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        if (mantissa == 0) return bits_float(sign);
        // Subnormal: value = mantissa * 2^-24.
        float v = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

DYNAMICID_HOST_DEVICE inline std::uint16_t float_to_bfloat16_bits(float value) {
    const std::uint32_t f = float_bits(value);
    if ((f & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((f >> 16) | 0x40u);  // quiet NaN
    const std::uint32_t rounding = 0x7fffu + ((f >> 16) & 1u);
    return static_cast<std::uint16_t>((f + rounding) >> 16);
}

DYNAMICID_HOST_DEVICE inline float bfloat16_bits_to_float(std::uint16_t b) {
    return bits_float(static_cast<std::uint32_t>(b) << 16);
}

}  // namespace detail

/// IEEE binary16 storage type. Arithmetic happens in float.
struct half {
    std::uint16_t bits = 0;
    half() = default;
    DYNAMICID_HOST_DEVICE explicit half(float v) : bits(detail::float_to_half_bits(v)) {}
    DYNAMICID_HOST_DEVICE explicit half(double v) : half(static_cast<float>(v)) {}
    DYNAMICID_HOST_DEVICE explicit operator float() const { return detail::half_bits_to_float(bits); }
    DYNAMICID_HOST_DEVICE explicit operator double() const { return static_cast<float>(*this); }
    DYNAMICID_HOST_DEVICE static half from_bits(std::uint16_t b) { half h; h.bits = b; return h; }
    friend bool operator==(half a, half b) { return a.bits == b.bits; }
};

/// bfloat16 storage type (the top 16 bits of a float). Arithmetic happens in float.
struct bfloat16 {
    std::uint16_t bits = 0;
    bfloat16() = default;
    DYNAMICID_HOST_DEVICE explicit bfloat16(float v) : bits(detail::float_to_bfloat16_bits(v)) {}
    DYNAMICID_HOST_DEVICE explicit bfloat16(double v) : bfloat16(static_cast<float>(v)) {}
    DYNAMICID_HOST_DEVICE explicit operator float() const { return detail::bfloat16_bits_to_float(bits); }
    DYNAMICID_HOST_DEVICE explicit operator double() const { return static_cast<float>(*this); }
    DYNAMICID_HOST_DEVICE static bfloat16 from_bits(std::uint16_t b) { bfloat16 h; h.bits = b; return h; }
    friend bool operator==(bfloat16 a, bfloat16 b) { return a.bits == b.bits; }
};

/// Run-time tag of an element type, as stored in files.
enum class dtype : std::uint8_t { f64, f32, f16, bf16, i64, i32, u8, boolean };

/// Bytes per element of `t`.
constexpr std::size_t size_of(dtype t) {
    switch (t) {
        case dtype::f64: case dtype::i64: return 8;
        case dtype::f32: case dtype::i32: return 4;
        case dtype::f16: case dtype::bf16: return 2;
        case dtype::u8: case dtype::boolean: return 1;
    }
    return 0;
}

/// The safetensors spelling of `t` ("F32", "BF16", ...).
constexpr std::string_view name_of(dtype t) {
    switch (t) {
        case dtype::f64: return "F64";
        case dtype::f32: return "F32";
        case dtype::f16: return "F16";
        case dtype::bf16: return "BF16";
        case dtype::i64: return "I64";
        case dtype::i32: return "I32";
        case dtype::u8: return "U8";
        case dtype::boolean: return "BOOL";
    }
    return "?";
}

template <class T> struct dtype_of_impl;
template <> struct dtype_of_impl<double> { static constexpr dtype value = dtype::f64; };
template <> struct dtype_of_impl<float> { static constexpr dtype value = dtype::f32; };
template <> struct dtype_of_impl<half> { static constexpr dtype value = dtype::f16; };
template <> struct dtype_of_impl<bfloat16> { static constexpr dtype value = dtype::bf16; };
template <> struct dtype_of_impl<std::int64_t> { static constexpr dtype value = dtype::i64; };
template <> struct dtype_of_impl<std::int32_t> { static constexpr dtype value = dtype::i32; };
template <> struct dtype_of_impl<std::uint8_t> { static constexpr dtype value = dtype::u8; };

/// The run-time tag of the static element type T.
template <class T> inline constexpr dtype dtype_of = dtype_of_impl<T>::value;

/// True for the floating element types the backends compute with.
template <class T>
concept floating_element =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;

/// The type arithmetic on T accumulates in: float for f16/bf16/f32, double for f64.
template <class T> struct accum_type { using type = float; };
template <> struct accum_type<double> { using type = double; };
template <class T> using accum_t = typename accum_type<T>::type;

/// Converts between any two element types through the accumulation type.
template <class To, class From>
DYNAMICID_HOST_DEVICE inline To element_cast(From v) {
    if constexpr (std::is_same_v<To, From>) {
        return v;
    } else if constexpr (std::is_same_v<From, half> || std::is_same_v<From, bfloat16>) {
        return element_cast<To>(static_cast<float>(v));
    } else {
        return static_cast<To>(v);
    }
}

}  // namespace dynamicid
