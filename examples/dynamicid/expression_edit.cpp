// Expression / pose editing through the IMR: the identity tokens are
// re-targeted to a face prompt and (optionally) target landmarks before generation.
//
//   dynamicid_expression_edit --sd models/sd15 --saa SAA.bin --clip models/clip-vit-h-14 --imr IMR.bin
//       --id alice.safetensors:alice.png --landmarks alice_106.txt
//       --source-prompt "in a neutral expression, in front view" --target-prompt "in a happy expression, in side view"
//       --prompt "a woman laughing at the beach" --output happy.png
//
// --landmarks: 106 "x y" lines (insightface 2d106det on the reference resized to
// 512x512); --target-landmarks the same for the wanted pose (default: the source's).
#include "common.hpp"

#include <dynamicid/modules/dynamicid/face_prompt.hpp>
#include <dynamicid/modules/dynamicid/landmark_raster.hpp>

#include <fstream>

namespace {

std::vector<float> raster_from_file(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot read " + path);
    std::vector<dynamicid::modules::imr::landmark_point> pts;
    float x = 0, y = 0;
    while (in >> x >> y) pts.push_back({x, y});
    return dynamicid::modules::imr::rasterize_landmarks(pts);
}

}  // namespace

int main(int argc, char** argv) {
    return example::run([&] {
        const example::args a(argc, argv);
        example::backend::context ctx{.threads = std::stoi(a.get("threads", "0"))};
        const auto pipe = example::load_pipeline(ctx, a);
        auto who = example::parse_identity(a.need("id"));
        dynamicid::pipelines::dynamicid_edit edit;
        edit.source_prompt = a.get("source-prompt", dynamicid::modules::imr::inference_prompt(dynamicid::modules::imr::expression::neutral,
                                                                                               dynamicid::modules::imr::face_pose{}));
        edit.target_prompt = a.need("target-prompt");
        edit.source_landmarks = raster_from_file(a.need("landmarks"));
        if (auto t = a.get("target-landmarks")) edit.target_landmarks = raster_from_file(*t);
        who.edit = edit;
        const auto out = pipe.generate(ctx, example::options(a), {who}, {.on_progress = example::progress});
        example::write_png(a.get("output", "edited.png"), out.rgb.data(), static_cast<int>(out.width), static_cast<int>(out.height));
    });
}
