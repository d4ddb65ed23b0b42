// dynamicid pipelines, internal: turning decoded images into pixels.
#pragma once

#include <dynamicid/core/config.hpp>
#include <dynamicid/core/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace dynamicid::pipelines::detail {

/// NCHW values in [-1, 1] (n images, `channels` of them) -> HWC RGB in
/// [0, 1] as diffusers' VaeImageProcessor does ((x / 2 + 0.5) clamped), and
/// bytes round(255 x) with ties to even (numpy's round). Gray (one channel)
/// is replicated; channels beyond three are dropped.
inline void to_hwc_unit(const std::vector<float>& nchw, index_t n, index_t channels, index_t height, index_t width,
                        std::vector<float>& pixels, std::vector<std::uint8_t>& rgb) {
    check<shape_error>(channels >= 1 && static_cast<index_t>(nchw.size()) == n * channels * height * width, "pipeline",
                       "decoded image has ", nchw.size(), " values, expected ", n, "x", channels, "x", height, "x", width);
    const auto plane = static_cast<std::size_t>(height * width);
    pixels.assign(static_cast<std::size_t>(n) * plane * 3, 0.0f);
    rgb.assign(pixels.size(), 0);
    for (index_t b = 0; b < n; ++b)
        for (index_t ch = 0; ch < 3; ++ch) {
            const index_t src_ch = std::min<index_t>(ch, channels - 1);
            const float* src = nchw.data() + static_cast<std::size_t>(b * channels + src_ch) * plane;
            float* dst = pixels.data() + static_cast<std::size_t>(b) * plane * 3 + static_cast<std::size_t>(ch);
            std::uint8_t* bytes = rgb.data() + static_cast<std::size_t>(b) * plane * 3 + static_cast<std::size_t>(ch);
            for (std::size_t i = 0; i < plane; ++i) {
                const float v = std::clamp(src[i] / 2.0f + 0.5f, 0.0f, 1.0f);
                dst[3 * i] = v;
                bytes[3 * i] = static_cast<std::uint8_t>(std::nearbyint(v * 255.0f));
            }
        }
}

}  // namespace dynamicid::pipelines::detail
