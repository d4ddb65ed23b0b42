// dynamicid CLI: `dynamicid face analyze` (see face_command.hpp).
#include "face_command.hpp"

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/face/analyzer.hpp>
#include <dynamicid/face/photo.hpp>
#include <dynamicid/io/safetensors.hpp>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <string_view>

namespace dynamicid_cli {

namespace {
using backend = dynamicid::cpu_backend;

constexpr const char* face_usage =
    "usage: dynamicid face analyze PHOTO [--models DIR] [--out emb.safetensors] [--threads N]\n"
    "\n"
    "  --models DIR   insightface's buffalo_l folder (default $DYNAMICID_FACE_MODELS or models/buffalo_l)\n"
    "  --out FILE     write embedding, landmarks, pose and the 224x224 crop as safetensors\n"
    "  --threads N    CPU threads (default 0: all)\n";

}  // namespace

std::filesystem::path default_face_models() {
    if (const char* env = std::getenv("DYNAMICID_FACE_MODELS"); env && *env) return env;
    return "models/buffalo_l";
}

face_identity analyze_face_photo(const std::filesystem::path& photo, const std::filesystem::path& models, int threads) {
    backend::context ctx{.threads = threads};
    dynamicid::face::face_analyzer<backend> fa(ctx, {.models = models});
    const auto image = dynamicid::face::load_photo(photo);
    auto r = fa.analyze(ctx, image, dynamicid::face::quoted(photo));
    face_identity id{r.normed_embedding, r.embedding, r.crop112, r.crop224, {}, r.pose, r.det};
    for (const auto& p : r.landmarks_2d_106) id.landmarks_106.push_back({p[0], p[1]});
    return id;
}

int run_face_command(int argc, char** argv) {
    if (argc < 3 || std::string_view(argv[1]) != "analyze") {
        std::fputs(face_usage, stderr);
        return 2;
    }
    std::filesystem::path photo = argv[2], models = default_face_models(), out;
    int threads = 0;
    for (int i = 3; i < argc; ++i) {
        const std::string_view a = argv[i];
        if (i + 1 >= argc) {
            std::fprintf(stderr, "dynamicid face: %s needs a value\n%s", argv[i], face_usage);
            return 2;
        }
        if (a == "--models") models = argv[++i];
        else if (a == "--out") out = argv[++i];
        else if (a == "--threads") threads = std::atoi(argv[++i]);
        else {
            std::fprintf(stderr, "dynamicid face: unknown option %s\n%s", argv[i], face_usage);
            return 2;
        }
    }
    try {
        const auto id = analyze_face_photo(photo, models, threads);
        const auto& b = id.detection.box;
        std::printf("face: box (%.1f, %.1f, %.1f, %.1f) score %.3f\n", b[0], b[1], b[2], b[3], id.detection.score);
        std::printf("pose: pitch %.2f yaw %.2f roll %.2f\n", id.pose.pitch, id.pose.yaw, id.pose.roll);
        std::printf("embedding: %zu values, L2-normalised\n", id.embedding.size());
        if (!out.empty()) {
            std::vector<float> lmk;
            for (const auto& p : id.landmarks_106) lmk.insert(lmk.end(), {static_cast<float>(p[0]), static_cast<float>(p[1])});
            const std::vector<float> pose{static_cast<float>(id.pose.pitch), static_cast<float>(id.pose.yaw), static_cast<float>(id.pose.roll)};
            dynamicid::io::safetensors_writer w;
            const auto n = static_cast<dynamicid::index_t>(id.embedding.size());
            w.add("embedding", {1, n}, id.embedding)
                .add("embedding_raw", {1, n}, id.raw_embedding)
                .add("landmarks_2d_106", {106, 2}, lmk)
                .add("pose", {3}, pose)
                .add("kps", {5, 2}, id.detection.kps)
                .add("bbox", {4}, id.detection.box)
                .add("clip_reference", {224, 224, 3}, id.clip_reference.pixels);
            w.write(out);
            std::printf("wrote %s\n", out.string().c_str());
        }
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dynamicid face: %s\n", e.what());
        return 1;
    }
}

}  // namespace dynamicid_cli
