// ID mixing: one face that blends two identities, the first weighted by
// --mix (0..1), the second by 1 - mix, inside one box (the whole image by default).
//
//   dynamicid_id_mixing --sd models/sd15 --saa SAA.bin --clip models/clip-vit-h-14
//       --id alice.safetensors:alice.png --id bob.safetensors:bob.png --mix 0.6
//       --prompt "a portrait photo of a person" --output mix.png
#include "common.hpp"

int main(int argc, char** argv) {
    return example::run([&] {
        const example::args a(argc, argv);
        example::backend::context ctx{.threads = std::stoi(a.get("threads", "0"))};
        const auto pipe = example::load_pipeline(ctx, a);
        std::vector<dynamicid::pipelines::dynamicid_identity> ids;
        for (const auto& spec : a.all("id")) ids.push_back(example::parse_identity(spec));
        if (ids.size() < 2) throw std::invalid_argument("ID mixing needs two --id");
        auto o = example::options(a);
        o.mix_scale = std::stod(a.get("mix", "0.5"));
        if (auto b = a.get("box")) o.mix_box = example::parse_box(*b);
        const auto out = pipe.generate(ctx, o, ids, {.on_progress = example::progress});
        example::write_png(a.get("output", "mix.png"), out.rgb.data(), static_cast<int>(out.width), static_cast<int>(out.height));
    });
}
