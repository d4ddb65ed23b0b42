// Fixtures for the trainer tests (unit and MPI): a generated two-person
// dataset for the tiny random SD and DynamicID models, and small configs of
// both stages. Needs DYNAMICID_TEST_DATA_DIR.
#pragma once

#include <dynamicid/training/anchor_trainer.hpp>
#include <dynamicid/training/imr_trainer.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace dynamicid_test::trainers {

namespace fs = std::filesystem;
namespace training = dynamicid::training;

inline const fs::path data = fs::path(DYNAMICID_TEST_DATA_DIR);
inline const fs::path tiny_sd = data / "tiny_sd" / "diffusers";
inline const fs::path tiny_id = data / "tiny_dynamicid";

/// A fresh folder under the system temp dir, removed on destruction.
struct temp_dir {
    fs::path path;
    explicit temp_dir(const std::string& name) {
        path = fs::temp_directory_path() / ("dynamicid_trainers_" + name + "_" + std::to_string(::getpid()));
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~temp_dir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

/// A 32 x 32 binary PPM: a disc of the person's colour on a gradient background, shifted by `variant`.
inline void write_picture(const fs::path& file, int person, int variant) {
    std::ofstream out(file, std::ios::binary);
    out << "P6\n32 32\n255\n";
    const int cx = 12 + 3 * variant, cy = 16 - 2 * variant;
    for (int y = 0; y < 32; ++y)
        for (int x = 0; x < 32; ++x) {
            const bool disc = (x - cx) * (x - cx) + (y - cy) * (y - cy) < 64;
            const unsigned char px[3] = {static_cast<unsigned char>(disc ? 60 + 150 * (person % 2) : 8 * x),
                                         static_cast<unsigned char>(disc ? 200 - 70 * person : 8 * y),
                                         static_cast<unsigned char>(disc ? 40 + 90 * variant : 128)};
            out.write(reinterpret_cast<const char*>(px), 3);
        }
}

inline std::string arcface_json(int person) {
    std::ostringstream s;
    s << "[";
    double norm = 0;
    std::vector<double> v(8);
    for (int k = 0; k < 8; ++k) norm += (v[k] = std::sin(1.3 * k + 2.1 * person) + 0.1 * person);
    (void)norm;
    for (int k = 0; k < 8; ++k) s << (k ? ", " : "") << v[k];
    s << "]";
    return s.str();
}

inline std::vector<float> alice_landmarks() {
    std::ifstream in(tiny_id / "alice_106.txt");
    std::vector<float> v;
    float x = 0;
    while (in >> x) v.push_back(x);
    return v;
}

/// Two persons x three pictures, with captions, landmarks (alice's, shifted) and face prompts.
inline fs::path write_dataset(const fs::path& dir) {
    const auto lmk = alice_landmarks();
    if (lmk.size() != 212u) throw std::runtime_error("alice_106.txt does not hold 106 points");
    std::ofstream m(dir / "train.jsonl");
    const char* prompts[] = {"the expression is happy, the face is front view", "the expression is neutral, the face is side view",
                             "the expression is surprised, the face is front view"};
    for (int p = 0; p < 2; ++p)
        for (int v = 0; v < 3; ++v) {
            const std::string name = "p" + std::to_string(p) + "_" + std::to_string(v);
            write_picture(dir / (name + ".ppm"), p, v);
            std::ostringstream l;
            l << "[";
            for (std::size_t k = 0; k < lmk.size(); ++k) l << (k ? "," : "") << lmk[k] + (k % 2 ? 9.0f * v : -7.0f * v + 5.0f * p);
            l << "]";
            m << R"({"person": "p)" << p << R"(", "image": ")" << name << R"(.ppm", "text": "a photo of person )" << p
              << R"(", "arcface": )" << arcface_json(p) << R"(, "landmarks": )" << l.str() << R"(, "face_prompt": ")" << prompts[v]
              << "\"}\n";
        }
    return dir / "train.jsonl";
}

inline training::anchor_trainer_config anchor_config(const fs::path& manifest, const fs::path& out, std::int64_t steps) {
    training::anchor_trainer_config c;
    c.sd_model = tiny_sd;
    c.image_encoder = tiny_id / "image_encoder";
    c.manifest = manifest;
    c.output_dir = out;
    c.steps = steps;
    c.batch = 2;
    c.lr = 3e-3;
    c.lr_schedule = "linear";
    c.warmup = 1;
    c.seed = 1234;
    c.resolution = 32;
    c.lora_rank = 4;
    c.projection_depth = 1;
    c.id_drop = c.text_drop = c.both_drop = 0.1;  // a few drops in a short run
    return c;
}

inline training::imr_trainer_config imr_config(const fs::path& manifest, const fs::path& out, std::int64_t steps) {
    training::imr_trainer_config c;
    c.sd_model = tiny_sd;
    c.image_encoder = tiny_id / "image_encoder";
    c.manifest = manifest;
    c.output_dir = out;
    c.steps = steps;
    c.lr = 3e-3;
    c.seed = 99;
    c.resolution = 32;
    c.targets = 2;
    c.saa_checkpoint = tiny_id / "SAA.safetensors";
    c.imr_init = tiny_id / "IMR.safetensors";
    c.keypoint_encoder_init = tiny_id / "key_point_encoder.safetensors";
    return c;
}

/// Every tensor's values on the host.
template <class Ctx, class Tensor>
std::vector<std::vector<float>> host(Ctx& ctx, const std::vector<Tensor>& ts) {
    std::vector<std::vector<float>> out;
    for (const auto& t : ts) out.push_back(t.to_host(ctx));
    return out;
}

/// run()s a trainer, returning the loss of every step.
template <class Ctx, class Trainer>
std::vector<double> losses_of(Ctx& ctx, Trainer& t) {
    std::vector<double> out;
    t.run(ctx, {}, [&](const training::train_progress& p) { out.push_back(p.loss); });
    return out;
}

/// The mean of v[from, to).
inline double mean(const std::vector<double>& v, std::size_t from, std::size_t to) {
    double s = 0;
    for (std::size_t i = from; i < to; ++i) s += v[i];
    return s / static_cast<double>(to - from);
}

}  // namespace dynamicid_test::trainers
