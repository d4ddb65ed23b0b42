// dynamicid modules: DynamicID's landmark image (the KeyPointEncoder's input).
//
// The released pipeline resizes the reference image to 512x512, runs
// insightface's 2d106det on it and draws the 106 points into a 96x96
// single-channel image:
//
//   p = landmark / (512 / 96)                      (float32 arithmetic)
//   for each point with 0 < x < 96 and 0 < y < 96: image[int(y)][int(x)] = 255
//   image = image / 127.5 - 1                      (background -1, points +1)
//
// One pixel per point, no anti-aliasing; points on or outside the border are
// dropped, and int() truncates. The scale is computed in double and rounded
// to float once, and each coordinate is divided in float, as numpy does for a
// float32 landmark array divided by a Python float, so boundary cases match
// the reference bit for bit. Coordinates measured on another image size can
// be given through `source_width`/`source_height` (the released value is 512).
//
//     std::vector<dynamicid::modules::imr::landmark_point> pts = /* 106 (x, y) from 2d106det */;
//     auto img = dynamicid::modules::imr::landmark_raster<dynamicid::cpu_backend>(ctx, {pts});   // (1, 1, 96, 96)
//     auto feature = keypoint_encoder.forward(ctx, img);
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace dynamicid::modules::imr {

inline constexpr std::string_view landmark_component = "landmark_raster";

/// One landmark as (x, y) in pixels of the detection image.
using landmark_point = std::array<float, 2>;

/// The raster's geometry; the defaults are the released ones.
struct landmark_raster_config {
    index_t size = 96;              ///< output side in pixels
    double source_width = 512.0;    ///< width of the image the points were detected on
    double source_height = 512.0;   ///< height of that image
    index_t points = 106;           ///< expected points per face (0: any number)
};

/// The raster of one face as size*size floats, row-major, in {-1, +1}.
inline std::vector<float> rasterize_landmarks(std::span<const landmark_point> points, const landmark_raster_config& cfg = {}) {
    check(cfg.size > 0, landmark_component, "raster size must be positive, got ", cfg.size);
    check(cfg.source_width > 0.0 && cfg.source_height > 0.0, landmark_component, "source image size must be positive");
    check(cfg.points == 0 || static_cast<index_t>(points.size()) == cfg.points, landmark_component, "expected ", cfg.points,
          " landmarks, got ", points.size());
    const auto n = static_cast<std::size_t>(cfg.size);
    std::vector<std::uint8_t> canvas(n * n, 0);
    const auto side = static_cast<float>(cfg.size);
    const auto scale_x = static_cast<float>(cfg.source_width / static_cast<double>(cfg.size));
    const auto scale_y = static_cast<float>(cfg.source_height / static_cast<double>(cfg.size));
    for (const auto& p : points) {
        const float x = p[0] / scale_x;
        const float y = p[1] / scale_y;
        // NaN fails every comparison and is dropped like an outside point.
        if (!(x > 0.0f && x < side && y > 0.0f && y < side)) continue;
        canvas[static_cast<std::size_t>(y) * n + static_cast<std::size_t>(x)] = 255;
    }
    std::vector<float> out(canvas.size());
    for (std::size_t i = 0; i < canvas.size(); ++i) out[i] = static_cast<float>(canvas[i]) / 127.5f - 1.0f;
    return out;
}

/// A batch of rasters as a (B, 1, size, size) tensor, one face per entry.
template <class B, class T = float>
    requires backend<B> && backend_memory<B, T>
tensor<B, T> landmark_raster(context_t<B>& ctx, const std::vector<std::vector<landmark_point>>& faces,
                             const landmark_raster_config& cfg = {}) {
    check(!faces.empty(), landmark_component, "no faces to rasterise");
    const auto plane = static_cast<std::size_t>(cfg.size * cfg.size);
    std::vector<T> host(faces.size() * plane);
    for (std::size_t b = 0; b < faces.size(); ++b) {
        const auto one = rasterize_landmarks(faces[b], cfg);
        for (std::size_t i = 0; i < plane; ++i) host[b * plane + i] = element_cast<T>(one[i]);
    }
    return tensor<B, T>::from_host(ctx, shape{static_cast<index_t>(faces.size()), 1, cfg.size, cfg.size}, std::span<const T>(host));
}

/// An 8-bit single-channel landmark image (e.g. a saved target landmark
/// picture, already size x size) normalised the same way: v / 127.5 - 1.
template <class B, class T = float>
    requires backend<B> && backend_memory<B, T>
tensor<B, T> landmark_image(context_t<B>& ctx, std::span<const std::uint8_t> gray, index_t size = 96) {
    check(size > 0 && gray.size() == static_cast<std::size_t>(size * size), landmark_component, "expected a ", size, "x", size,
          " image (", size * size, " bytes), got ", gray.size(), " bytes");
    std::vector<T> host(gray.size());
    for (std::size_t i = 0; i < gray.size(); ++i) host[i] = element_cast<T>(static_cast<float>(gray[i]) / 127.5f - 1.0f);
    return tensor<B, T>::from_host(ctx, shape{1, 1, size, size}, std::span<const T>(host));
}

}  // namespace dynamicid::modules::imr
