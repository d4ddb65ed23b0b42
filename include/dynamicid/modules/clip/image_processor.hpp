// dynamicid modules: transformers' CLIPImageProcessor, the preprocessing in
// front of CLIP's vision tower, on 8-bit RGB images held by the host.
//
//   1. resize so the shortest edge is `shortest_edge` (the long edge becomes
//      int(shortest_edge * long / short)), with PIL's resampling filter:
//      bicubic (a = -0.5; support widened by the scale when downscaling, which
//      antialiases), horizontal pass then vertical pass, each rounded to 8
//      bits with PIL's 22-bit fixed-point coefficients: the result equals
//      PIL's Image.resize pixel for pixel;
//   2. centre crop crop_height x crop_width (top = (H - h) / 2 rounded down;
//      an image smaller than the crop is padded with zeros first);
//   3. rescale by 1/255 and normalise with CLIP's mean and std, channels first.
//
// transformers 5's default CLIPImageProcessor resizes with torchvision's
// uint8 antialiased bicubic, which follows PIL but lands one 8-bit step away
// in about 0.5% of pixels: 1/255/std ~ 0.015 in normalised units. The PIL
// backend (CLIPImageProcessorPil) is matched exactly.
//
//     dynamicid::modules::clip::image_processor proc;                       // CLIP defaults, 224
//     auto img = dynamicid::modules::clip::image_u8::from_rgb(rgb.data(), h, w);
//     auto pixels = proc.preprocess<B>(ctx, img);                             // (1, 3, 224, 224)
//     auto batch = proc.preprocess<B>(ctx, std::vector<image_u8>{img, img2}); // (2, 3, 224, 224)
//
// Images come from pixel buffers (from_rgb, (H, W, 3) interleaved), xtensor
// arrays (from_xtensor) or files (<dynamicid/modules/clip/image_file.hpp>).
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>

#include <nlohmann/json.hpp>
#include <xtensor/xexpression.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace dynamicid::modules::clip {

/// An 8-bit image in host memory, rows of interleaved RGB: (height, width, 3).
struct image_u8 {
    index_t height = 0, width = 0;
    std::vector<std::uint8_t> pixels;  ///< height * width * 3 bytes

    /// Copies an interleaved buffer of `channels` channels: 3 (RGB) as is,
    /// 1 (grey) repeated into RGB, 4 (RGBA) without its alpha.
    static image_u8 from_rgb(const std::uint8_t* data, index_t height, index_t width, index_t channels = 3) {
        check<value_error>(height > 0 && width > 0, "image", "empty image ", height, "x", width);
        check<value_error>(data != nullptr, "image", "null pixel buffer");
        check<value_error>(channels == 1 || channels == 3 || channels == 4, "image", "expected 1, 3 or 4 channels, got ", channels);
        image_u8 img{height, width, std::vector<std::uint8_t>(static_cast<std::size_t>(height * width * 3))};
        for (index_t i = 0; i < height * width; ++i)
            for (index_t c = 0; c < 3; ++c)
                img.pixels[static_cast<std::size_t>(i * 3 + c)] = data[i * channels + (channels == 1 ? 0 : c)];
        return img;
    }

    /// From an xtensor expression of uint8: (H, W, C) with C in {1, 3, 4}, or (H, W) grey.
    template <class E>
    static image_u8 from_xtensor(const xt::xexpression<E>& expression) {
        const auto& e = expression.derived_cast();
        static_assert(std::is_same_v<std::remove_cv_t<typename E::value_type>, std::uint8_t>, "from_xtensor needs uint8 pixels");
        const auto& s = e.shape();
        check<shape_error>(s.size() == 2 || s.size() == 3, "image", "expected an (H, W, C) or (H, W) array, got rank ", s.size());
        const auto h = static_cast<index_t>(s[0]), w = static_cast<index_t>(s[1]);
        const index_t c = s.size() == 3 ? static_cast<index_t>(s[2]) : 1;
        std::vector<std::uint8_t> flat;
        flat.reserve(static_cast<std::size_t>(h * w * c));
        // Row-major traversal, whatever the expression's own layout.
        for (auto it = e.template begin<xt::layout_type::row_major>(); it != e.template end<xt::layout_type::row_major>(); ++it)
            flat.push_back(*it);
        return from_rgb(flat.data(), h, w, c);
    }

    std::uint8_t at(index_t y, index_t x, index_t c) const { return pixels[static_cast<std::size_t>((y * width + x) * 3 + c)]; }
};

/// PIL's resampling filters that CLIP processors use (PIL's numbering).
enum class resample_filter : int { bilinear = 2, bicubic = 3 };

namespace detail {

inline constexpr int pil_precision_bits = 32 - 8 - 2;  // PIL's fixed-point precision for 8-bit images

inline double filter_value(resample_filter f, double x) {
    x = std::abs(x);
    if (f == resample_filter::bilinear) return x < 1.0 ? 1.0 - x : 0.0;
    constexpr double a = -0.5;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

inline double filter_support(resample_filter f) { return f == resample_filter::bilinear ? 1.0 : 2.0; }

/// One axis' taps: output i reads inputs [first[i], first[i] + count[i]) with
/// fixed-point weights weights[i * ksize + j], as PIL precomputes them.
struct axis_taps {
    index_t ksize = 0;
    std::vector<index_t> first, count;
    std::vector<std::int32_t> weights;
};

inline axis_taps precompute_taps(index_t in_size, index_t out_size, resample_filter f) {
    const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
    const double filterscale = std::max(scale, 1.0);  // widen the filter when downscaling: antialiasing
    const double support = filter_support(f) * filterscale;
    axis_taps t;
    t.ksize = static_cast<index_t>(std::ceil(support)) * 2 + 1;
    t.first.resize(static_cast<std::size_t>(out_size));
    t.count.resize(static_cast<std::size_t>(out_size));
    t.weights.assign(static_cast<std::size_t>(out_size * t.ksize), 0);
    std::vector<double> k(static_cast<std::size_t>(t.ksize));
    for (index_t o = 0; o < out_size; ++o) {
        const double center = (static_cast<double>(o) + 0.5) * scale;
        // Truncation toward zero, as PIL's (int) casts.
        index_t lo = static_cast<index_t>(center - support + 0.5);
        index_t hi = static_cast<index_t>(center + support + 0.5);
        lo = std::max<index_t>(lo, 0);
        hi = std::min<index_t>(hi, in_size);
        const index_t n = std::max<index_t>(hi - lo, 0);
        const double ss = 1.0 / filterscale;  // multiplied, not divided: PIL's rounding
        double sum = 0.0;
        for (index_t j = 0; j < n; ++j) {
            const double w = filter_value(f, (static_cast<double>(j + lo) - center + 0.5) * ss);
            k[static_cast<std::size_t>(j)] = w;
            sum += w;
        }
        for (index_t j = 0; j < n; ++j) {
            const double w = sum != 0.0 ? k[static_cast<std::size_t>(j)] / sum : k[static_cast<std::size_t>(j)];
            const double fixed = w * static_cast<double>(1 << pil_precision_bits);
            t.weights[static_cast<std::size_t>(o * t.ksize + j)] = static_cast<std::int32_t>(fixed < 0 ? fixed - 0.5 : fixed + 0.5);
        }
        t.first[static_cast<std::size_t>(o)] = lo;
        t.count[static_cast<std::size_t>(o)] = n;
    }
    return t;
}

inline std::uint8_t clip8(std::int64_t acc) {
    const std::int64_t v = acc >> pil_precision_bits;  // arithmetic shift, as PIL's table lookup
    return static_cast<std::uint8_t>(std::clamp<std::int64_t>(v, 0, 255));
}

}  // namespace detail

/// PIL's Image.resize for an 8-bit RGB image (no reducing_gap): the
/// horizontal pass (if the width changes), then the vertical pass (if the
/// height changes), each rounded to 8 bits.
inline image_u8 resize(const image_u8& in, index_t out_height, index_t out_width, resample_filter filter = resample_filter::bicubic) {
    check<value_error>(in.height > 0 && in.width > 0 && static_cast<index_t>(in.pixels.size()) == in.height * in.width * 3, "image",
                       "malformed image ", in.height, "x", in.width, " with ", in.pixels.size(), " bytes");
    check<value_error>(out_height > 0 && out_width > 0, "image", "cannot resize to ", out_height, "x", out_width);
    image_u8 cur = in;
    if (out_width != in.width) {
        const auto t = detail::precompute_taps(in.width, out_width, filter);
        image_u8 next{cur.height, out_width, std::vector<std::uint8_t>(static_cast<std::size_t>(cur.height * out_width * 3))};
        for (index_t y = 0; y < cur.height; ++y)
            for (index_t x = 0; x < out_width; ++x) {
                const auto lo = t.first[static_cast<std::size_t>(x)], n = t.count[static_cast<std::size_t>(x)];
                const std::int32_t* k = t.weights.data() + x * t.ksize;
                for (index_t c = 0; c < 3; ++c) {
                    std::int64_t acc = std::int64_t{1} << (detail::pil_precision_bits - 1);
                    for (index_t j = 0; j < n; ++j) acc += static_cast<std::int64_t>(cur.at(y, lo + j, c)) * k[j];
                    next.pixels[static_cast<std::size_t>((y * out_width + x) * 3 + c)] = detail::clip8(acc);
                }
            }
        cur = std::move(next);
    }
    if (out_height != in.height) {
        const auto t = detail::precompute_taps(in.height, out_height, filter);
        image_u8 next{out_height, cur.width, std::vector<std::uint8_t>(static_cast<std::size_t>(out_height * cur.width * 3))};
        for (index_t y = 0; y < out_height; ++y) {
            const auto lo = t.first[static_cast<std::size_t>(y)], n = t.count[static_cast<std::size_t>(y)];
            const std::int32_t* k = t.weights.data() + y * t.ksize;
            for (index_t x = 0; x < cur.width; ++x)
                for (index_t c = 0; c < 3; ++c) {
                    std::int64_t acc = std::int64_t{1} << (detail::pil_precision_bits - 1);
                    for (index_t j = 0; j < n; ++j) acc += static_cast<std::int64_t>(cur.at(lo + j, x, c)) * k[j];
                    next.pixels[static_cast<std::size_t>((y * cur.width + x) * 3 + c)] = detail::clip8(acc);
                }
        }
        cur = std::move(next);
    }
    return cur;
}

/// CLIPImageProcessor's settings; the defaults are CLIP's (and DynamicID's image encoder's).
struct image_processor_config {
    bool do_resize = true;
    index_t shortest_edge = 224;  ///< > 0: resize the shortest edge to this
    index_t resize_height = 0, resize_width = 0;  ///< used when shortest_edge == 0: resize to exactly this
    resample_filter resample = resample_filter::bicubic;
    bool do_center_crop = true;
    index_t crop_height = 224, crop_width = 224;
    bool do_rescale = true;
    double rescale_factor = 1.0 / 255.0;
    bool do_normalize = true;
    std::array<double, 3> image_mean{0.48145466, 0.4578275, 0.40821073};  ///< OPENAI_CLIP_MEAN
    std::array<double, 3> image_std{0.26862954, 0.26130258, 0.27577711};  ///< OPENAI_CLIP_STD

    /// Reads a transformers preprocessor_config.json ("size": {"shortest_edge"}
    /// or {"height", "width"} or a number, "crop_size": {"height", "width"} or
    /// a number, do_*, rescale_factor, image_mean, image_std, resample 2 or 3).
    static image_processor_config from_json(const nlohmann::json& j) {
        check<value_error>(j.is_object(), "clip", "image processor config is not a JSON object");
        image_processor_config c;
        try {
            const auto flag = [&](const char* key, bool& v) {
                if (j.contains(key) && !j[key].is_null()) v = j[key].get<bool>();
            };
            flag("do_resize", c.do_resize);
            flag("do_center_crop", c.do_center_crop);
            flag("do_rescale", c.do_rescale);
            flag("do_normalize", c.do_normalize);
            if (j.contains("size") && !j["size"].is_null()) {
                const auto& s = j["size"];
                if (s.is_number()) {
                    c.shortest_edge = s.get<index_t>();
                } else if (s.contains("shortest_edge") && !s["shortest_edge"].is_null()) {
                    c.shortest_edge = s["shortest_edge"].get<index_t>();
                } else {
                    c.shortest_edge = 0;
                    c.resize_height = s.at("height").get<index_t>();
                    c.resize_width = s.at("width").get<index_t>();
                }
            }
            if (j.contains("crop_size") && !j["crop_size"].is_null()) {
                const auto& s = j["crop_size"];
                if (s.is_number()) {
                    c.crop_height = c.crop_width = s.get<index_t>();
                } else {
                    c.crop_height = s.at("height").get<index_t>();
                    c.crop_width = s.at("width").get<index_t>();
                }
            }
            if (j.contains("resample") && !j["resample"].is_null()) {
                const int r = j["resample"].get<int>();
                check<value_error>(r == 2 || r == 3, "clip", "resample ", r, " is not supported (2 bilinear, 3 bicubic)");
                c.resample = static_cast<resample_filter>(r);
            }
            if (j.contains("rescale_factor") && !j["rescale_factor"].is_null()) c.rescale_factor = j["rescale_factor"].get<double>();
            const auto triple = [&](const char* key, std::array<double, 3>& v) {
                if (!j.contains(key) || j[key].is_null()) return;
                const auto values = j[key].get<std::vector<double>>();
                check<value_error>(values.size() == 3, "clip", key, " needs 3 values, got ", values.size());
                std::copy(values.begin(), values.end(), v.begin());
            };
            triple("image_mean", c.image_mean);
            triple("image_std", c.image_std);
        } catch (const nlohmann::json::exception& e) {
            throw value_error("clip", std::string("malformed image processor config: ") + e.what());
        }
        c.validate();
        return c;
    }

    void validate() const {
        if (do_resize)
            check<value_error>(shortest_edge > 0 || (resize_height > 0 && resize_width > 0), "clip",
                               "resize needs shortest_edge or height and width");
        if (do_center_crop) check<value_error>(crop_height > 0 && crop_width > 0, "clip", "crop size must be positive");
        if (do_normalize)
            for (double s : image_std) check<value_error>(s != 0.0, "clip", "image_std has a zero");
    }
};

/// CLIPImageProcessor.preprocess for one image at a time.
class image_processor {
public:
    using config = image_processor_config;

    image_processor() = default;
    explicit image_processor(config c) : config_(std::move(c)) { config_.validate(); }

    const config& settings() const noexcept { return config_; }

    /// (height, width) after the resize step, as transformers computes it.
    std::array<index_t, 2> resized_size(index_t height, index_t width) const {
        if (!config_.do_resize) return {height, width};
        if (config_.shortest_edge <= 0) return {config_.resize_height, config_.resize_width};
        const bool portrait = width <= height;
        const index_t short_side = portrait ? width : height, long_side = portrait ? height : width;
        // int(size * long / short): Python's true division, then truncation.
        const auto new_long = static_cast<index_t>(static_cast<double>(config_.shortest_edge * long_side) / static_cast<double>(short_side));
        return portrait ? std::array<index_t, 2>{new_long, config_.shortest_edge} : std::array<index_t, 2>{config_.shortest_edge, new_long};
    }

    /// Steps 1 and 2 only: the resized and cropped 8-bit image.
    image_u8 resize_and_crop(const image_u8& img) const {
        check<value_error>(img.height > 0 && img.width > 0 && static_cast<index_t>(img.pixels.size()) == img.height * img.width * 3,
                           "image", "malformed image ", img.height, "x", img.width, " with ", img.pixels.size(), " bytes");
        image_u8 cur = img;
        if (config_.do_resize) {
            const auto [h, w] = resized_size(img.height, img.width);
            check<value_error>(h > 0 && w > 0, "image", img.width, "x", img.height, " resizes to an empty image");
            if (h != img.height || w != img.width) cur = resize(img, h, w, config_.resample);
        }
        if (!config_.do_center_crop) return cur;
        const index_t ch = config_.crop_height, cw = config_.crop_width;
        // torchvision's centre crop: pad symmetrically (the extra pixel after)
        // when the image is smaller, else start at floor((size - crop) / 2).
        const index_t top = ch > cur.height ? -((ch - cur.height) / 2) : (cur.height - ch) / 2;
        const index_t left = cw > cur.width ? -((cw - cur.width) / 2) : (cur.width - cw) / 2;
        image_u8 out{ch, cw, std::vector<std::uint8_t>(static_cast<std::size_t>(ch * cw * 3), 0)};
        for (index_t y = 0; y < ch; ++y) {
            const index_t sy = y + top;
            if (sy < 0 || sy >= cur.height) continue;
            for (index_t x = 0; x < cw; ++x) {
                const index_t sx = x + left;
                if (sx < 0 || sx >= cur.width) continue;
                for (index_t c = 0; c < 3; ++c) out.pixels[static_cast<std::size_t>((y * cw + x) * 3 + c)] = cur.at(sy, sx, c);
            }
        }
        return out;
    }

    /// The processed image, channels first (3, h, w), on the host.
    std::vector<float> preprocess_host(const image_u8& img, index_t* height = nullptr, index_t* width = nullptr) const {
        const auto r = resize_and_crop(img);
        std::vector<float> out(static_cast<std::size_t>(3 * r.height * r.width));
        for (index_t c = 0; c < 3; ++c) {
            const double mean = config_.do_normalize ? config_.image_mean[static_cast<std::size_t>(c)] : 0.0;
            const double inv_std = config_.do_normalize ? 1.0 / config_.image_std[static_cast<std::size_t>(c)] : 1.0;
            const double scale = config_.do_rescale ? config_.rescale_factor : 1.0;
            for (index_t y = 0; y < r.height; ++y)
                for (index_t x = 0; x < r.width; ++x)
                    out[static_cast<std::size_t>((c * r.height + y) * r.width + x)] =
                        static_cast<float>((static_cast<double>(r.at(y, x, c)) * scale - mean) * inv_std);
        }
        if (height) *height = r.height;
        if (width) *width = r.width;
        return out;
    }

    /// pixel_values (1, 3, h, w) on backend B.
    template <class B, class T = float>
        requires backend<B>
    tensor<B, T> preprocess(context_t<B>& ctx, const image_u8& img) const {
        return preprocess<B, T>(ctx, std::vector<image_u8>{img});
    }

    /// pixel_values (N, 3, h, w) on backend B; every image must come out the
    /// same size (always so with centre cropping).
    template <class B, class T = float>
        requires backend<B>
    tensor<B, T> preprocess(context_t<B>& ctx, const std::vector<image_u8>& images) const {
        check<value_error>(!images.empty(), "image", "no images to preprocess");
        std::vector<T> all;
        index_t h0 = 0, w0 = 0;
        for (std::size_t i = 0; i < images.size(); ++i) {
            index_t h = 0, w = 0;
            const auto one = preprocess_host(images[i], &h, &w);
            if (i == 0) {
                h0 = h;
                w0 = w;
            }
            check<shape_error>(h == h0 && w == w0, "image", "image ", i, " processes to ", h, "x", w, ", the first to ", h0, "x", w0);
            for (float v : one) all.push_back(element_cast<T>(v));
        }
        return tensor<B, T>::from_host(ctx, {static_cast<index_t>(images.size()), 3, h0, w0}, std::span<const T>(all));
    }

private:
    config config_;
};

}  // namespace dynamicid::modules::clip
