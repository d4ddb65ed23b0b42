// dynamicid face: image geometry for the face front end.
//
// The 2-D similarity estimate is the least-squares fit skimage's
// SimilarityTransform.estimate (Umeyama) computes; warps and resizes sample
// bilinearly with the pixel-centre conventions of OpenCV's warpAffine and
// resize(INTER_LINEAR), out-of-image samples read as 0. OpenCV quantises
// sub-pixel positions and weights; these functions compute in double, so
// results differ from OpenCV's by at most about one grey level.
//
//     auto m = dynamicid::face::estimate_similarity(five_points, dynamicid::face::arcface_template(112));
//     auto crop = dynamicid::face::warp_affine(photo, m, 112, 112);
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/modules/clip/image_processor.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace dynamicid::face {

using image_u8 = modules::clip::image_u8;
using point2 = std::array<double, 2>;

/// A 2x3 affine map [a b c; d e f]: (x, y) -> (a x + b y + c, d x + e y + f).
struct affine2d {
    std::array<double, 6> m{1, 0, 0, 0, 1, 0};
    point2 apply(point2 p) const { return {m[0] * p[0] + m[1] * p[1] + m[2], m[3] * p[0] + m[4] * p[1] + m[5]}; }
    /// The inverse map; value_error when singular.
    affine2d inverse() const {
        const double det = m[0] * m[4] - m[1] * m[3];
        check<value_error>(std::abs(det) > 1e-12 && std::isfinite(det), "face", "singular affine transform");
        const double a = m[4] / det, b = -m[1] / det, d = -m[3] / det, e = m[0] / det;
        return {{a, b, -(a * m[2] + b * m[5]), d, e, -(d * m[2] + e * m[5])}};
    }
};

/// ArcFace's five-point template (eyes, nose, mouth corners) for a size x size
/// crop (112 or a multiple: 224 doubles it), as insightface's estimate_norm uses it.
inline std::array<point2, 5> arcface_template(int size = 112) {
    check<value_error>(size > 0 && size % 112 == 0, "face", "the ArcFace template needs a multiple of 112, got ", size);
    static constexpr double base[5][2] = {{38.2946, 51.6963}, {73.5318, 51.5014}, {56.0252, 71.7366}, {41.5493, 92.3655}, {70.7299, 92.2041}};
    const double r = size / 112.0;
    std::array<point2, 5> out{};
    for (int i = 0; i < 5; ++i) out[static_cast<std::size_t>(i)] = {static_cast<float>(base[i][0]) * r, static_cast<float>(base[i][1]) * r};
    return out;
}

/// Least-squares similarity (rotation, uniform scale, translation) taking
/// `src` onto `dst` (Umeyama without reflection, as skimage estimates it).
inline affine2d estimate_similarity(std::span<const point2> src, std::span<const point2> dst) {
    check<value_error>(src.size() == dst.size() && src.size() >= 2, "face", "similarity needs matching point lists of >= 2 points");
    const double n = static_cast<double>(src.size());
    point2 ms{0, 0}, md{0, 0};
    for (std::size_t i = 0; i < src.size(); ++i)
        for (int k = 0; k < 2; ++k) {
            check<value_error>(std::isfinite(src[i][static_cast<std::size_t>(k)]) && std::isfinite(dst[i][static_cast<std::size_t>(k)]),
                               "face", "non-finite landmark");
            ms[static_cast<std::size_t>(k)] += src[i][static_cast<std::size_t>(k)] / n;
            md[static_cast<std::size_t>(k)] += dst[i][static_cast<std::size_t>(k)] / n;
        }
    // With A = sum dst_c src_c^T, the best rotation's trace is sqrt(p^2 + q^2)
    // (s1 + s2 or s1 - s2 of A's singular values, Umeyama's sign rule).
    double p = 0, q = 0, var = 0;
    for (std::size_t i = 0; i < src.size(); ++i) {
        const double x = src[i][0] - ms[0], y = src[i][1] - ms[1], u = dst[i][0] - md[0], v = dst[i][1] - md[1];
        p += x * u + y * v;
        q += x * v - y * u;
        var += x * x + y * y;
    }
    check<value_error>(var > 1e-12, "face", "degenerate landmarks (all points coincide)");
    const double a = p / var, b = q / var;
    return {{a, -b, md[0] - (a * ms[0] - b * ms[1]), b, a, md[1] - (b * ms[0] + a * ms[1])}};
}

namespace detail {
inline std::uint8_t to_u8(double v) { return static_cast<std::uint8_t>(std::clamp(std::lround(v), 0L, 255L)); }
}  // namespace detail

/// dst(x, y) = src(m^-1 (x, y)), bilinear, zero outside (OpenCV warpAffine, borderValue 0).
inline image_u8 warp_affine(const image_u8& src, const affine2d& m, index_t out_w, index_t out_h) {
    check<value_error>(out_w > 0 && out_h > 0 && out_w <= 16384 && out_h <= 16384, "face", "bad warp size ", out_w, "x", out_h);
    check<value_error>(src.width > 0 && src.height > 0 &&
                           src.pixels.size() == static_cast<std::size_t>(src.width * src.height * 3), "face", "bad source image");
    const auto inv = m.inverse();
    image_u8 out{out_h, out_w, std::vector<std::uint8_t>(static_cast<std::size_t>(out_w * out_h * 3), 0)};
    auto px = [&](index_t x, index_t y, int c) -> double {
        if (x < 0 || y < 0 || x >= src.width || y >= src.height) return 0.0;
        return src.pixels[static_cast<std::size_t>((y * src.width + x) * 3 + c)];
    };
    for (index_t y = 0; y < out_h; ++y)
        for (index_t x = 0; x < out_w; ++x) {
            const auto s = inv.apply({static_cast<double>(x), static_cast<double>(y)});
            // OpenCV samples on a 1/32-pixel grid.
            const double sx = std::round(s[0] * 32.0) / 32.0, sy = std::round(s[1] * 32.0) / 32.0;
            const double fx0 = std::floor(sx), fy0 = std::floor(sy);
            if (fx0 < -2 || fy0 < -2 || fx0 > static_cast<double>(src.width) + 1 || fy0 > static_cast<double>(src.height) + 1) continue;
            const auto x0 = static_cast<index_t>(fx0), y0 = static_cast<index_t>(fy0);
            const double fx = sx - fx0, fy = sy - fy0;
            for (int c = 0; c < 3; ++c) {
                const double v = (1 - fy) * ((1 - fx) * px(x0, y0, c) + fx * px(x0 + 1, y0, c)) +
                                 fy * ((1 - fx) * px(x0, y0 + 1, c) + fx * px(x0 + 1, y0 + 1, c));
                out.pixels[static_cast<std::size_t>((y * out_w + x) * 3 + c)] = detail::to_u8(v);
            }
        }
    return out;
}

/// Bilinear resize with half-pixel centres and edge clamping (OpenCV INTER_LINEAR).
inline image_u8 resize_bilinear(const image_u8& src, index_t out_w, index_t out_h) {
    check<value_error>(out_w > 0 && out_h > 0 && out_w <= 16384 && out_h <= 16384, "face", "bad resize size ", out_w, "x", out_h);
    image_u8 out{out_h, out_w, std::vector<std::uint8_t>(static_cast<std::size_t>(out_w * out_h * 3))};
    auto coord = [](index_t i, index_t in, index_t outn, index_t& i0, index_t& i1, double& f) {
        double s = (static_cast<double>(i) + 0.5) * static_cast<double>(in) / static_cast<double>(outn) - 0.5;
        if (s < 0) s = 0;
        i0 = static_cast<index_t>(std::floor(s));
        f = s - static_cast<double>(i0);
        if (i0 >= in - 1) {
            i0 = in - 1;
            f = 0;
        }
        i1 = std::min(i0 + 1, in - 1);
    };
    for (index_t y = 0; y < out_h; ++y) {
        index_t y0, y1;
        double fy;
        coord(y, src.height, out_h, y0, y1, fy);
        for (index_t x = 0; x < out_w; ++x) {
            index_t x0, x1;
            double fx;
            coord(x, src.width, out_w, x0, x1, fx);
            for (int c = 0; c < 3; ++c) {
                auto p = [&](index_t xx, index_t yy) { return static_cast<double>(src.pixels[static_cast<std::size_t>((yy * src.width + xx) * 3 + c)]); };
                const double v = (1 - fy) * ((1 - fx) * p(x0, y0) + fx * p(x1, y0)) + fy * ((1 - fx) * p(x0, y1) + fx * p(x1, y1));
                out.pixels[static_cast<std::size_t>((y * out_w + x) * 3 + c)] = detail::to_u8(v);
            }
        }
    }
    return out;
}

/// NCHW float values (1, 3, H, W) of an RGB image: (pixel - mean) / std.
inline std::vector<float> to_blob(const image_u8& img, double mean, double std) {
    std::vector<float> out(static_cast<std::size_t>(3 * img.height * img.width));
    const auto plane = static_cast<std::size_t>(img.height * img.width);
    for (std::size_t i = 0; i < plane; ++i)
        for (std::size_t c = 0; c < 3; ++c)
            out[c * plane + i] = static_cast<float>((static_cast<float>(img.pixels[i * 3 + c]) - static_cast<float>(mean)) / static_cast<float>(std));
    return out;
}

}  // namespace dynamicid::face
