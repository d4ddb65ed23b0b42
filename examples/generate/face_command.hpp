// dynamicid CLI: the `face` subcommand and the photo-to-identity step of `generate`.
//
//   dynamicid face analyze photo.jpg [--models DIR] [--out emb.safetensors] [--threads N]
//
// DIR is insightface's buffalo_l folder (default: $DYNAMICID_FACE_MODELS, else
// ./models/buffalo_l). Needs the dynamicid::onnx target and stb.
#pragma once

#include <dynamicid/face/detection.hpp>
#include <dynamicid/face/landmarks.hpp>

#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace dynamicid_cli {

/// What `generate` needs about the identity in a reference photo.
struct face_identity {
    std::vector<float> embedding;         ///< ArcFace, L2-normalised
    std::vector<float> raw_embedding;     ///< ArcFace as the network gives it
    dynamicid::face::image_u8 aligned112;
    dynamicid::face::image_u8 clip_reference;  ///< 224 x 224 crop on the doubled ArcFace template
    std::vector<std::array<double, 2>> landmarks_106;
    dynamicid::face::pose pose;
    dynamicid::face::detection detection;
};

/// Detects the highest-scoring face of `photo` (as released) and describes it; throws dynamicid::error
/// ("[face] no face found in 'photo.jpg'", "[onnx] ...", "[image] ...").
face_identity analyze_face_photo(const std::filesystem::path& photo, const std::filesystem::path& models, int threads = 0);

/// $DYNAMICID_FACE_MODELS, else ./models/buffalo_l.
std::filesystem::path default_face_models();

/// `dynamicid face ...` with argv[0] == "face"; returns the exit code.
int run_face_command(int argc, char** argv);

}  // namespace dynamicid_cli
