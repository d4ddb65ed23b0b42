// Two identities placed by boxes ([y_min,x_min,y_max,x_max] as fractions), with
// the paper's multi-ID layout boost beta = 2; --maps DIR also writes the
// gating heat maps of every attn2 layer and step.
//
//   dynamicid_two_ids --sd models/sd15 --saa SAA.bin --clip models/clip-vit-h-14
//       --id alice.safetensors:alice.png:0,0,1,0.5 --id bob.safetensors:bob.png:0,0.5,1,1
//       --prompt "two friends hiking" --output pair.png --maps maps
#include "common.hpp"

#include <dynamicid/visual/activation_maps.hpp>

int main(int argc, char** argv) {
    return example::run([&] {
        const example::args a(argc, argv);
        example::backend::context ctx{.threads = std::stoi(a.get("threads", "0"))};
        const auto pipe = example::load_pipeline(ctx, a);
        std::vector<dynamicid::pipelines::dynamicid_identity> ids;
        for (const auto& spec : a.all("id")) ids.push_back(example::parse_identity(spec));
        if (ids.size() < 2) throw std::invalid_argument("give two --id (or more)");
        auto o = example::options(a);
        o.infer_scale = std::stod(a.get("beta", "2"));  // the paper's value for several identities
        dynamicid::visual::activation_recorder rec;
        dynamicid::pipelines::dynamicid_controls<example::backend> c{.on_progress = example::progress};
        const auto maps = a.get("maps");
        if (maps) c.on_activation = rec.callback();
        const auto out = pipe.generate(ctx, o, ids, c);
        example::write_png(a.get("output", "two_ids.png"), out.rgb.data(), static_cast<int>(out.width), static_cast<int>(out.height));
        if (maps) {
            std::vector<dynamicid::modules::saa::box> boxes;
            for (const auto& who : ids)
                if (who.box) boxes.push_back(*who.box);
            const auto files = dynamicid::visual::write_heat_maps(*maps, rec, boxes, static_cast<dynamicid::index_t>(ids.size()));
            std::cout << "wrote " << files.size() << " heat maps to " << *maps << '\n';
        }
    });
}
