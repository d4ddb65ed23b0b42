// dynamicid CLI: the face world's measuring models, both face_id_net
// IResNets trained by `dynamicid train id`:
//   id_encoder            the identity encoder (an ArcFace stand-in): L2-normalised
//                         embeddings of world::face_crop
//   attribute_classifier  one attribute (expression, yaw, pitch, accessories,
//                         background): the net plus the ArcFace class weights
//                         of its checkpoint; P(class) = softmax(s * cos(e, w_k))
#pragma once

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/identity/face_id_net.hpp>

#include <nlohmann/json.hpp>

#include <face_world.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <string>
#include <vector>

namespace dynamicid_cli {

namespace world_models_detail {
inline void normalise(std::vector<float>& v) {
    double n = 0;
    for (float x : v) n += static_cast<double>(x) * x;
    n = std::sqrt(n);
    if (n > 0)
        for (float& x : v) x = static_cast<float>(x / n);
}
}  // namespace world_models_detail

/// The identity encoder over world::face_crop, L2-normalised as insightface's normed_embedding.
class id_encoder {
public:
    using backend = dynamicid::cpu_backend;
    using net_type = dynamicid::modules::identity::face_id_net<backend>;
    explicit id_encoder(const std::filesystem::path& file) : net_(net_type::load_file(ctx_, file)) {}

    int input_size() const { return static_cast<int>(net_.settings().input_size); }

    /// The embedding of the net's input, (3, side, side) floats.
    std::vector<float> embed_input(const std::vector<float>& input) {
        const auto side = net_.settings().input_size;
        auto e = net_.forward(ctx_, dynamicid::tensor<backend, float>::from_host(ctx_, {1, 3, side, side}, input)).to_host(ctx_);
        world_models_detail::normalise(e);
        return e;
    }
    /// The embedding of face `face` of a rendering (its box is the crop).
    std::vector<float> embed(const dynamicid::world::rendering& r, std::size_t face) { return embed_input(dynamicid::world::face_crop(r, face, input_size())); }

private:
    backend::context ctx_{.threads = 1};
    net_type net_;
};

/// An attribute classifier: DIR/face_id_net.safetensors and the class weights
/// ("margin.weight") and settings of DIR/trainer_state.safetensors.
class attribute_classifier {
public:
    using backend = dynamicid::cpu_backend;
    attribute_classifier(const std::filesystem::path& dir, dynamicid::world::attribute a) : attribute_(a), net_(dir / "face_id_net.safetensors") {
        const auto state = dynamicid::io::safetensors_file::open(dir / "trainer_state.safetensors");
        const auto it = state.metadata().find("config");
        dynamicid::check<dynamicid::io_error>(it != state.metadata().end(), "eval", "'", (dir / "trainer_state.safetensors").string(),
                                              "' records no config");
        nlohmann::json cfg;
        try {
            cfg = nlohmann::json::parse(it->second);
            scale_ = cfg.value("scale", 64.0);
        } catch (const nlohmann::json::exception& e) {
            throw dynamicid::io_error("eval", std::string("the classifier's config: ") + e.what());
        }
        const auto& info = state.info("margin.weight");
        classes_ = static_cast<int>(info.dims[0]);
        width_ = static_cast<int>(info.dims[1]);
        dynamicid::check<dynamicid::value_error>(classes_ == dynamicid::world::classes_of(a), "eval", "the ", dynamicid::world::name(a),
                                                 " classifier in ", dir.string(), " has ", classes_, " classes, expected ",
                                                 dynamicid::world::classes_of(a));
        weights_ = state.to_vector<float>("margin.weight");
        for (int k = 0; k < classes_; ++k) {
            std::vector<float> row(weights_.begin() + k * width_, weights_.begin() + (k + 1) * width_);
            world_models_detail::normalise(row);
            std::copy(row.begin(), row.end(), weights_.begin() + k * width_);
        }
        whole_image_ = cfg.value("crop", std::string(a == dynamicid::world::attribute::background ? "full" : "face")) == "full";
    }

    /// Class probabilities for face `face` of a rendering (background: the whole picture).
    std::vector<double> probabilities(const dynamicid::world::rendering& r, std::size_t face) {
        const bool whole = attribute_ == dynamicid::world::attribute::background || whole_image_;
        const auto e = net_.embed_input(whole ? dynamicid::world::image_input(r, net_.input_size())
                                              : dynamicid::world::face_crop(r, face, net_.input_size()));
        dynamicid::check<dynamicid::value_error>(static_cast<int>(e.size()) == width_, "eval", "the classifier's embedding width differs from its class weights");
        std::vector<double> p(static_cast<std::size_t>(classes_));
        double top = -1e300;
        for (int k = 0; k < classes_; ++k) {
            double c = 0;
            for (int i = 0; i < width_; ++i) c += static_cast<double>(e[static_cast<std::size_t>(i)]) * weights_[static_cast<std::size_t>(k * width_ + i)];
            p[static_cast<std::size_t>(k)] = scale_ * c;
            top = std::max(top, p[static_cast<std::size_t>(k)]);
        }
        double sum = 0;
        for (auto& v : p) sum += (v = std::exp(v - top));
        for (auto& v : p) v /= sum;
        return p;
    }
    /// The most probable class.
    int predict(const dynamicid::world::rendering& r, std::size_t face) {
        const auto p = probabilities(r, face);
        return static_cast<int>(std::max_element(p.begin(), p.end()) - p.begin());
    }

private:
    dynamicid::world::attribute attribute_;
    id_encoder net_;
    std::vector<float> weights_;
    int classes_ = 0, width_ = 0;
    double scale_ = 64.0;
    bool whole_image_ = false;
};

}  // namespace dynamicid_cli
