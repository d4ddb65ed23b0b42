// One identity: ArcFace embedding + reference image -> a new image of that person.
//
//   dynamicid_single_id --sd models/sd15 --saa SAA.bin --clip models/clip-vit-h-14
//       --id alice_arcface.safetensors:alice.png --prompt "a woman reading in a cafe" --seed 42 --output alice.png
#include "common.hpp"

int main(int argc, char** argv) {
    return example::run([&] {
        const example::args a(argc, argv);
        example::backend::context ctx{.threads = std::stoi(a.get("threads", "0"))};
        const auto pipe = example::load_pipeline(ctx, a);
        const auto who = example::parse_identity(a.need("id"));
        auto o = example::options(a);
        const auto out = pipe.generate(ctx, o, {who}, {.on_progress = example::progress});
        example::write_png(a.get("output", "single_id.png"), out.rgb.data(), static_cast<int>(out.width), static_cast<int>(out.height));
    });
}
