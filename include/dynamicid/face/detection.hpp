// dynamicid face: SCRFD detection pre- and post-processing.
//
// The photo is letterboxed into the top-left of a fixed canvas (aspect kept,
// zero padding), normalised as (x - 127.5) / 128, and the network's nine
// outputs (scores, distances and keypoint offsets for strides 8, 16, 32 with
// two anchors per cell) are decoded as insightface's SCRFD does: anchor
// centres on the stride grid, boxes from distances, score threshold, then
// greedy NMS with the "+1" pixel areas insightface uses.
//
//     auto lb = dynamicid::face::letterbox(photo, {.width = 512, .height = 512});
//     auto faces = dynamicid::face::decode_scrfd(outputs, {}, lb.scale);
#pragma once

#include <dynamicid/face/geometry.hpp>

#include <algorithm>
#include <array>
#include <numeric>
#include <vector>

namespace dynamicid::face {

/// One detected face in photo pixels.
struct detection {
    std::array<float, 4> box{};   ///< x1, y1, x2, y2
    float score = 0.0f;
    std::array<float, 10> kps{};  ///< left eye, right eye, nose, left and right mouth corner: x, y each
    float area() const { return (box[2] - box[0]) * (box[3] - box[1]); }
};

/// Detector settings (insightface's defaults except the 512 x 512 canvas).
struct detector_config {
    index_t width = 512, height = 512;  ///< canvas the photo is letterboxed into
    float score_threshold = 0.5f;
    float nms_threshold = 0.4f;
    std::vector<index_t> strides{8, 16, 32};
    index_t anchors = 2;
};

struct letterboxed {
    image_u8 canvas;
    double scale = 1.0;  ///< canvas pixels per photo pixel
};

/// Resizes `photo` to fit the canvas (aspect kept) into its top-left corner.
inline letterboxed letterbox(const image_u8& photo, const detector_config& cfg) {
    check<value_error>(photo.width > 0 && photo.height > 0, "face", "empty photo");
    check<value_error>(cfg.width > 0 && cfg.height > 0 && cfg.width % 32 == 0 && cfg.height % 32 == 0, "face",
                       "detector canvas must be a positive multiple of 32, got ", cfg.width, "x", cfg.height);
    const double im_ratio = static_cast<double>(photo.height) / static_cast<double>(photo.width);
    const double model_ratio = static_cast<double>(cfg.height) / static_cast<double>(cfg.width);
    index_t w, h;
    if (im_ratio > model_ratio) {
        h = cfg.height;
        w = static_cast<index_t>(static_cast<double>(h) / im_ratio);
    } else {
        w = cfg.width;
        h = static_cast<index_t>(static_cast<double>(w) * im_ratio);
    }
    w = std::max<index_t>(w, 1);
    h = std::max<index_t>(h, 1);
    const auto resized = resize_bilinear(photo, w, h);
    letterboxed out{image_u8{cfg.height, cfg.width, std::vector<std::uint8_t>(static_cast<std::size_t>(cfg.width * cfg.height * 3), 0)},
                    static_cast<double>(h) / static_cast<double>(photo.height)};
    for (index_t y = 0; y < h; ++y)
        std::copy_n(resized.pixels.begin() + y * w * 3, w * 3, out.canvas.pixels.begin() + y * cfg.width * 3);
    return out;
}

/// Greedy non-maximum suppression over detections sorted by descending score.
inline std::vector<detection> nms(const std::vector<detection>& sorted, float threshold) {
    std::vector<detection> keep;
    std::vector<bool> gone(sorted.size(), false);
    for (std::size_t i = 0; i < sorted.size(); ++i) {
        if (gone[i]) continue;
        keep.push_back(sorted[i]);
        const auto& a = sorted[i].box;
        const float area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1);
        for (std::size_t j = i + 1; j < sorted.size(); ++j) {
            if (gone[j]) continue;
            const auto& b = sorted[j].box;
            const float w = std::max(0.0f, std::min(a[2], b[2]) - std::max(a[0], b[0]) + 1);
            const float h = std::max(0.0f, std::min(a[3], b[3]) - std::max(a[1], b[1]) + 1);
            const float inter = w * h;
            const float area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1);
            if (inter / (area_a + area_b - inter) > threshold) gone[j] = true;
        }
    }
    return keep;
}

/// Decodes SCRFD outputs: for each stride, scores (N, 1), distances (N, 4) and
/// keypoints (N, 10) with N = (H/s)(W/s)·anchors, in that order over strides
/// (scores of every stride first, then boxes, then keypoints). `scale` is the
/// letterbox scale; results are in photo pixels, sorted by score.
inline std::vector<detection> decode_scrfd(const std::vector<std::vector<float>>& outputs, const detector_config& cfg, double scale) {
    const auto levels = cfg.strides.size();
    check<shape_error>(outputs.size() == 3 * levels, "face", "SCRFD needs ", 3 * levels, " outputs (scores, boxes, keypoints per stride), got ",
                       outputs.size());
    check<value_error>(scale > 0 && std::isfinite(scale), "face", "bad letterbox scale ", scale);
    std::vector<detection> found;
    for (std::size_t l = 0; l < levels; ++l) {
        const auto s = cfg.strides[l];
        const index_t gh = cfg.height / s, gw = cfg.width / s, n = gh * gw * cfg.anchors;
        const auto &sc = outputs[l], &bb = outputs[l + levels], &kp = outputs[l + 2 * levels];
        check<shape_error>(static_cast<index_t>(sc.size()) == n && static_cast<index_t>(bb.size()) == 4 * n &&
                               static_cast<index_t>(kp.size()) == 10 * n,
                           "face", "stride ", s, ": expected ", n, " anchors for a ", cfg.width, "x", cfg.height,
                           " canvas, got outputs of ", sc.size(), ", ", bb.size(), " and ", kp.size(), " values");
        const auto fs = static_cast<float>(s);
        for (index_t i = 0; i < n; ++i) {
            const float score = sc[static_cast<std::size_t>(i)];
            if (!(score >= cfg.score_threshold)) continue;
            const index_t cell = i / cfg.anchors;
            const float cx = static_cast<float>((cell % gw) * s), cy = static_cast<float>((cell / gw) * s);
            detection d;
            d.score = score;
            const float* b = bb.data() + 4 * i;
            d.box = {cx - b[0] * fs, cy - b[1] * fs, cx + b[2] * fs, cy + b[3] * fs};
            const float* k = kp.data() + 10 * i;
            for (int j = 0; j < 10; ++j) d.kps[static_cast<std::size_t>(j)] = (j % 2 ? cy : cx) + k[j] * fs;
            for (auto& v : d.box) v = static_cast<float>(v / scale);
            for (auto& v : d.kps) v = static_cast<float>(v / scale);
            found.push_back(d);
        }
    }
    std::stable_sort(found.begin(), found.end(), [](const detection& a, const detection& b) { return a.score > b.score; });
    return nms(found, cfg.nms_threshold);
}

/// Which face a single-face caller gets.
enum class face_selection { highest_score, largest };

/// Index of the chosen face; value_error when there is none.
inline std::size_t select_face(const std::vector<detection>& faces, face_selection policy) {
    check<value_error>(!faces.empty(), "face", "no face detected");
    std::size_t best = 0;
    for (std::size_t i = 1; i < faces.size(); ++i) {
        if (policy == face_selection::largest ? faces[i].area() > faces[best].area() : faces[i].score > faces[best].score) best = i;
    }
    return best;
}

/// The detection's five keypoints as points.
inline std::array<point2, 5> keypoints(const detection& d) {
    std::array<point2, 5> p{};
    for (std::size_t i = 0; i < 5; ++i) p[i] = {d.kps[2 * i], d.kps[2 * i + 1]};
    return p;
}

}  // namespace dynamicid::face
