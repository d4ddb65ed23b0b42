// dynamicid face: the whole front end over insightface's buffalo_l models.
//
// From a models folder holding det_10g.onnx (SCRFD), w600k_r50.onnx (ArcFace),
// 2d106det.onnx and 1k3d68.onnx (landmarks) and a photo, it finds faces and,
// for the chosen one, computes the ArcFace embedding (raw and L2-normalised),
// the aligned 112 x 112 crop and the 224 x 224 crop (the doubled ArcFace
// template, the face reference for CLIP), 106 2-D landmarks, 68 3-D landmarks
// and the head pose. Needs the dynamicid::onnx target.
//
//     B::context ctx;
//     dynamicid::face::face_analyzer<B> fa(ctx, {.models = "models/buffalo_l"});
//     auto face = fa.analyze(ctx, dynamicid::face::load_photo("me.jpg"), "me.jpg");
//     // face.normed_embedding (512), face.crop224, face.landmarks_2d_106, face.pose.yaw ...
#pragma once

#include <dynamicid/face/detection.hpp>
#include <dynamicid/face/landmarks.hpp>
#include <dynamicid/face/onnx/executor.hpp>
#include <dynamicid/face/onnx/reader.hpp>

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace dynamicid::face {

/// Where the models are and how faces are found.
struct analyzer_config {
    std::filesystem::path models;  ///< the buffalo_l folder
    std::string detector = "det_10g.onnx";
    std::string recognizer = "w600k_r50.onnx";
    std::string landmarks_2d = "2d106det.onnx";
    std::string landmarks_3d = "1k3d68.onnx";
    /// 68 x 3 mean shape for the pose; empty: DYNAMICID_DATA_DIR/face/meanshape_68.txt.
    std::filesystem::path mean_shape{};
    detector_config detection{};
    face_selection selection = face_selection::highest_score;  ///< the released choice (FaceAnalysis returns faces by score)
};

/// Everything the generator needs about one face.
struct face_result {
    detection det;
    std::vector<float> embedding;          ///< ArcFace output as is
    std::vector<float> normed_embedding;   ///< embedding / ||embedding||
    image_u8 crop112, crop224;             ///< aligned to the ArcFace template
    std::vector<std::array<double, 3>> landmarks_2d_106;  ///< z = 0
    std::vector<std::array<double, 3>> landmarks_3d_68;
    face::pose pose;
};

namespace detail {
// insightface's rule: a graph that starts with Sub and Mul nodes normalises
// itself (mean 0, std 1); otherwise the caller uses 127.5 / 128.
inline std::pair<double, double> landmark_normalisation(const onnx::model& m) {
    bool sub = false, mul = false;
    for (std::size_t i = 0; i < m.graph.nodes.size() && i < 8; ++i) {
        const auto& name = m.graph.nodes[i].name;
        if (name.starts_with("Sub") || name.starts_with("_minus")) sub = true;
        if (name.starts_with("Mul") || name.starts_with("_mul")) mul = true;
        if (i < 3 && name == "bn_data") sub = mul = true;
    }
    return sub && mul ? std::pair{0.0, 1.0} : std::pair{127.5, 128.0};
}
}  // namespace detail

/// The four networks, loaded once and shared by analyze calls on one thread.
template <class B>
class face_analyzer {
public:
    using ftensor = tensor<B, float>;

    face_analyzer(context_t<B>& ctx, analyzer_config cfg) : cfg_(std::move(cfg)) {
        namespace fs = std::filesystem;
        check<io_error>(fs::is_directory(cfg_.models), "face", "models folder '", cfg_.models.string(),
                        "' does not exist (get insightface's buffalo_l, see docs/face.md)");
        auto load = [&](const std::string& file) {
            const auto path = cfg_.models / file;
            check<io_error>(fs::is_regular_file(path), "face", "model '", path.string(), "' is missing");
            return onnx::read_model(path);
        };
        const auto det = load(cfg_.detector), rec = load(cfg_.recognizer), l2 = load(cfg_.landmarks_2d), l3 = load(cfg_.landmarks_3d);
        lmk2_norm_ = detail::landmark_normalisation(l2);
        lmk3_norm_ = detail::landmark_normalisation(l3);
        det_ = std::make_unique<onnx::executor<B>>(ctx, det);
        rec_ = std::make_unique<onnx::executor<B>>(ctx, rec);
        lmk2_ = std::make_unique<onnx::executor<B>>(ctx, l2);
        lmk3_ = std::make_unique<onnx::executor<B>>(ctx, l3);
        auto mean = cfg_.mean_shape;
#ifdef DYNAMICID_DATA_DIR
        if (mean.empty()) mean = fs::path(DYNAMICID_DATA_DIR) / "face" / "meanshape_68.txt";
#endif
        mean_shape_ = read_mean_shape(mean);
    }

    /// Every face in the photo, sorted by score (empty when there is none).
    std::vector<detection> detect(context_t<B>& ctx, const image_u8& photo) {
        const auto lb = letterbox(photo, cfg_.detection);
        auto x = ftensor::from_host(ctx, {1, 3, cfg_.detection.height, cfg_.detection.width},
                                    std::span<const float>(to_blob(lb.canvas, 127.5, 128.0)));
        auto outs = det_->run(ctx, {x});
        std::vector<std::vector<float>> host;
        for (auto& o : outs) host.push_back(o.to_host(ctx));
        return decode_scrfd(host, cfg_.detection, lb.scale);
    }

    /// The chosen face's embedding, crops, landmarks and pose; value_error
    /// naming `label` (the file) when the photo has no face.
    face_result analyze(context_t<B>& ctx, const image_u8& photo, const std::string& label = "the photo") {
        const auto faces = detect(ctx, photo);
        check<value_error>(!faces.empty(), "face", "no face found in ", label);
        return describe(ctx, photo, faces[select_face(faces, cfg_.selection)]);
    }

    /// Embedding, crops, landmarks and pose of a given detection.
    face_result describe(context_t<B>& ctx, const image_u8& photo, const detection& d) {
        face_result r;
        r.det = d;
        const auto kps = keypoints(d);
        const auto t112 = arcface_template(112), t224 = arcface_template(224);
        r.crop112 = warp_affine(photo, estimate_similarity(kps, t112), 112, 112);
        r.crop224 = warp_affine(photo, estimate_similarity(kps, t224), 224, 224);
        r.embedding = run_image(ctx, *rec_, r.crop112, 127.5, 127.5);
        double n2 = 0;
        for (float v : r.embedding) n2 += static_cast<double>(v) * v;
        const double n = std::sqrt(n2);
        check<value_error>(n > 0 && std::isfinite(n), "face", "the recognition network gave a zero or non-finite embedding");
        for (float v : r.embedding) r.normed_embedding.push_back(static_cast<float>(v / n));
        const auto m = landmark_transform(d.box, 192);
        const auto crop = warp_affine(photo, m, 192, 192);
        r.landmarks_2d_106 = decode_landmarks(run_image(ctx, *lmk2_, crop, lmk2_norm_.first, lmk2_norm_.second), m, 106, 192);
        r.landmarks_3d_68 = decode_landmarks(run_image(ctx, *lmk3_, crop, lmk3_norm_.first, lmk3_norm_.second), m, 68, 192);
        r.pose = estimate_pose(mean_shape_, r.landmarks_3d_68);
        return r;
    }

private:
    static std::vector<float> run_image(context_t<B>& ctx, onnx::executor<B>& net, const image_u8& img, double mean, double std) {
        auto x = ftensor::from_host(ctx, {1, 3, img.height, img.width}, std::span<const float>(to_blob(img, mean, std)));
        return net.run(ctx, {x}).at(0).to_host(ctx);
    }

    analyzer_config cfg_;
    std::unique_ptr<onnx::executor<B>> det_, rec_, lmk2_, lmk3_;
    std::pair<double, double> lmk2_norm_{127.5, 128.0}, lmk3_norm_{127.5, 128.0};
    std::vector<std::array<double, 3>> mean_shape_;
};

}  // namespace dynamicid::face
