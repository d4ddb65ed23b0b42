// Shared helpers of the DynamicID examples: argument parsing, identity specs,
// PNG output. Each example is one small program around dynamicid_pipeline.
#pragma once

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/modules/clip/image_file.hpp>
#include <dynamicid/pipelines/dynamicid.hpp>

#include <stb/stb_image_write.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace example {

using backend = dynamicid::cpu_backend;
using pipeline = dynamicid::pipelines::dynamicid_pipeline<backend>;

/// --key value pairs (a key may repeat: all values are kept in order).
struct args {
    std::multimap<std::string, std::string> values;

    args(int argc, char** argv) {
        for (int i = 1; i < argc; ++i) {
            std::string k = argv[i];
            if (k.rfind("--", 0) != 0 || i + 1 >= argc) throw std::invalid_argument("expected --key value, got '" + k + "'");
            values.emplace(k.substr(2), argv[++i]);
        }
    }
    std::optional<std::string> get(const std::string& k) const {
        auto it = values.find(k);
        return it == values.end() ? std::nullopt : std::optional<std::string>(it->second);
    }
    std::string get(const std::string& k, const std::string& fallback) const { return get(k).value_or(fallback); }
    std::string need(const std::string& k) const {
        auto v = get(k);
        if (!v) throw std::invalid_argument("missing --" + k);
        return *v;
    }
    std::vector<std::string> all(const std::string& k) const {
        std::vector<std::string> out;
        auto [a, b] = values.equal_range(k);
        for (auto it = a; it != b; ++it) out.push_back(it->second);
        return out;
    }
};

/// "y_min,x_min,y_max,x_max" as fractions.
inline dynamicid::modules::saa::box parse_box(const std::string& s) {
    double v[4];
    char comma;
    std::istringstream in(s);
    in >> v[0] >> comma >> v[1] >> comma >> v[2] >> comma >> v[3];
    if (!in) throw std::invalid_argument("box '" + s + "' is not y_min,x_min,y_max,x_max");
    return {v[0], v[1], v[2], v[3]};
}

/// "emb.safetensors:ref.png[:y0,x0,y1,x1]": the ArcFace embedding, the reference image, an optional box.
inline dynamicid::pipelines::dynamicid_identity parse_identity(const std::string& spec) {
    std::vector<std::string> parts;
    std::string part;
    std::istringstream in(spec);
    while (std::getline(in, part, ':')) parts.push_back(part);
    if (parts.size() < 2 || parts.size() > 3) throw std::invalid_argument("--id '" + spec + "' is not emb.safetensors:ref.png[:box]");
    dynamicid::pipelines::dynamicid_identity who;
    who.arcface = dynamicid::pipelines::load_arcface(parts[0]);
    who.reference = dynamicid::modules::clip::load_image(parts[1]);
    if (parts.size() == 3) who.box = parse_box(parts[2]);
    return who;
}

/// The pipeline from --sd, --saa, --clip (and --imr when given).
inline pipeline load_pipeline(backend::context& ctx, const args& a) {
    dynamicid::pipelines::dynamicid_paths p;
    p.sd_model = a.need("sd");
    p.saa_checkpoint = a.need("saa");
    p.image_encoder = a.need("clip");
    if (auto imr = a.get("imr")) p.imr = *imr;
    return pipeline::load(ctx, p);
}

/// Common generation flags: --prompt, --negative, --steps, --seed, --guidance, --width, --height, --id-scale.
inline dynamicid::pipelines::dynamicid_options options(const args& a) {
    dynamicid::pipelines::dynamicid_options o;
    o.prompt = a.need("prompt");
    o.negative_prompt = a.get("negative", "");
    o.steps = std::stoul(a.get("steps", "50"));
    o.seed = std::stoull(a.get("seed", "0"));
    o.guidance_scale = std::stod(a.get("guidance", "5"));
    o.width = std::stoll(a.get("width", "512"));
    o.height = std::stoll(a.get("height", "512"));
    o.id_scale = std::stod(a.get("id-scale", "1"));
    return o;
}

inline void write_png(const std::filesystem::path& path, const std::uint8_t* rgb, int width, int height) {
    if (!stbi_write_png(path.string().c_str(), width, height, 3, rgb, width * 3)) throw std::runtime_error("cannot write " + path.string());
    std::cout << "wrote " << path.string() << '\n';
}

inline void progress(std::size_t done, std::size_t total) { std::fprintf(stderr, "\rstep %zu/%zu", done, total); if (done == total) std::fprintf(stderr, "\n"); }

/// Runs `body`, printing errors as the library words them.
template <class F>
int run(F&& body) {
    try {
        body();
        return 0;
    } catch (const std::exception& e) {
        std::cerr << "error: " << e.what() << '\n';
        return 1;
    }
}

}  // namespace example
