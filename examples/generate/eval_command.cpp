// dynamicid CLI: `dynamicid eval` (see eval_command.hpp).
//
// Every number comes from models trained on the world's ground truth by
// `dynamicid train id` (tools/default_model/train.sh): the identity encoder
// (FaceSim: cosine of the generated face's embedding and the reference's) and
// classifiers of expression, yaw, pitch, accessories and background. A
// generated picture has no ground truth of its own; its faces are cropped at
// the boxes of the world's rendering of the asked scene (the composition the
// model was trained on), and the classifiers read those crops.
//
// Single identity, per held-out person: the reference is a neutral, frontal
// picture; the asked scene is a new sample of the same person (expression,
// pose, accessories, background), its caption in the paper's wording is the
// prompt, and its face prompt is the edit. Rows: the full method, without SAA
// gating, without the IMR (no edit: the reference's tokens), and the world's
// own rendering of the asked scene (what the classifiers score on truth).
// Two identities: pairs of held-out persons side by side in a picture twice as
// wide (each half composed like a training picture), with their boxes and
// with the whole picture for both; leakage is the cosine of each face with
// the other person's reference.
#include "eval_command.hpp"

#include "default_model.hpp"
#include "png_text.hpp"
#include "world_models.hpp"

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/modules/dynamicid/landmark_raster.hpp>
#include <dynamicid/pipelines/dynamicid.hpp>

#include <face_world.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dynamicid_cli {
namespace {

namespace fs = std::filesystem;
namespace w = dynamicid::world;
using backend = dynamicid::cpu_backend;
using pipeline = dynamicid::pipelines::dynamicid_pipeline<backend>;

constexpr const char* eval_usage =
    "usage: dynamicid eval [--model DIR] [--identities N] [--first-id ID] [--steps N] [--seed S] [--threads N]\n"
    "                     [--id-scale X] [--guidance X] [--out DIR]\n"
    "  --model DIR      a default-model folder (default: the built-in one): SD folder, SAA.safetensors, IMR.safetensors,\n"
    "                   image_encoder/, face_id_net.safetensors and eval/<attribute>/ classifiers\n"
    "  --identities N   held-out persons (default 16; two-identity rows use N/2 pairs)\n"
    "  --first-id ID    the first held-out identity (default 1000000; training uses 0..399)\n"
    "  --steps N        DDIM steps (default 25)\n"
    "  --id-scale X     identity strength (default 1, as generate's --id-scale)\n"
    "  --guidance X     classifier-free guidance scale (default 5, as generate's with --id)\n"
    "  --out DIR        eval.md, eval.json and sample sheets (default eval-out)\n";

struct usage_problem {
    std::string message;
};

double cosine(const std::vector<float>& a, const std::vector<float>& b) {
    double s = 0;
    for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) s += static_cast<double>(a[i]) * b[i];
    return s;  // both L2-normalised
}

/// A generated picture wrapped as a rendering whose faces are the boxes of the asked scene.
w::rendering as_rendering(std::span<const std::uint8_t> rgb, int width, int height, const w::rendering& asked) {
    w::rendering r;
    r.width = width;
    r.height = height;
    r.rgb.assign(rgb.begin(), rgb.end());
    r.faces = asked.faces;
    return r;
}

/// A face's box as the SAA's fractions, grown by `grow` around its centre (hair and hats), clamped.
dynamicid::modules::saa::box saa_box(const w::face_truth& f, int width, int height, double grow) {
    const double cx = (f.box[0] + f.box[2]) / 2, cy = (f.box[1] + f.box[3]) / 2;
    const double hw = (f.box[2] - f.box[0]) * grow / 2, hh = (f.box[3] - f.box[1]) * grow / 2;
    return {.y_min = std::clamp((cy - hh) / height, 0.0, 1.0), .x_min = std::clamp((cx - hw) / width, 0.0, 1.0),
            .y_max = std::clamp((cy + hh) / height, 0.0, 1.0), .x_max = std::clamp((cx + hw) / width, 0.0, 1.0)};
}

std::vector<float> landmark_raster_of(const w::face_truth& f, int width, int height) {
    std::vector<dynamicid::modules::imr::landmark_point> pts;
    for (const auto& p : f.landmarks) pts.push_back({static_cast<float>(p[0] * 512.0 / width), static_cast<float>(p[1] * 512.0 / height)});
    return dynamicid::modules::imr::rasterize_landmarks(pts);
}

/// Means of named metrics over samples.
struct accumulator {
    std::map<std::string, std::pair<double, int>> sums;
    void add(const std::string& k, double v) {
        auto& s = sums[k];
        s.first += v;
        s.second += 1;
    }
    double mean(const std::string& k) const {
        const auto it = sums.find(k);
        return it == sums.end() || it->second.second == 0 ? std::nan("") : it->second.first / it->second.second;
    }
};

/// A sheet of pictures in rows (each row the same count), written as PNG.
void write_sheet(const fs::path& path, const std::vector<std::vector<std::vector<std::uint8_t>>>& rows, int side) {
    if (rows.empty() || rows.front().empty()) return;
    const int cols = static_cast<int>(rows.front().size()), n = static_cast<int>(rows.size());
    std::vector<std::uint8_t> px(static_cast<std::size_t>(cols * side * n * side * 3), 255);
    for (int r = 0; r < n; ++r)
        for (int c = 0; c < cols && c < static_cast<int>(rows[static_cast<std::size_t>(r)].size()); ++c) {
            const auto& img = rows[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)];
            for (int y = 0; y < side; ++y)
                std::copy_n(img.data() + static_cast<std::size_t>(y * side * 3), static_cast<std::size_t>(side * 3),
                            px.data() + (static_cast<std::size_t>((r * side + y) * cols * side + c * side)) * 3);
        }
    const auto png = encode_png_rgb(px.data(), cols * side, n * side);
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(png.data()), static_cast<std::streamsize>(png.size()));
    if (!out) throw dynamicid::io_error("eval", "cannot write '" + path.string() + "'");
}

int evaluate(int argc, char** argv) {
    fs::path model = default_model_dir(), out = "eval-out";
    long long identities = 16, steps = 25, threads = 0;
    std::uint64_t first = 1'000'000, seed = 0;
    double id_scale = 1.0, guidance = 5.0;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        if (a == "--help" || a == "-h") {
            std::fputs(eval_usage, stdout);
            return 0;
        }
        if (i + 1 >= argc) throw usage_problem{std::string(a) + " needs a value"};
        const std::string v = argv[++i];
        char* end = nullptr;
        const auto number = [&] {
            errno = 0;
            const auto n = std::strtoull(v.c_str(), &end, 10);
            if (errno != 0 || end == v.c_str() || *end != '\0' || v.front() == '-') throw usage_problem{std::string(a) + " '" + v + "' is not a number"};
            return n;
        };
        if (a == "--model") model = v;
        else if (a == "--out") out = v;
        else if (a == "--identities") identities = static_cast<long long>(number());
        else if (a == "--first-id") first = number();
        else if (a == "--steps") steps = static_cast<long long>(number());
        else if (a == "--seed") seed = number();
        else if (a == "--threads") threads = static_cast<long long>(number());
        else if (a == "--id-scale" || a == "--guidance") {
            errno = 0;
            const double x = std::strtod(v.c_str(), &end);
            if (errno != 0 || end == v.c_str() || *end != '\0' || !std::isfinite(x) || x < 0 || x > 100)
                throw usage_problem{std::string(a) + " '" + v + "' is not a number in [0, 100]"};
            (a == "--id-scale" ? id_scale : guidance) = x;
        }
        else throw usage_problem{"unknown option '" + std::string(a) + "'"};
    }
    if (identities < 2 || identities > 10000) throw usage_problem{"--identities must be in [2, 10000]"};
    if (steps < 1 || steps > 1000) throw usage_problem{"--steps must be in [1, 1000]"};

    backend::context ctx{.threads = static_cast<int>(threads)};
    const auto t0 = std::chrono::steady_clock::now();
    dynamicid::pipelines::dynamicid_paths paths{.sd_model = model, .saa_checkpoint = model / "SAA.safetensors", .image_encoder = model / "image_encoder"};
    paths.imr = model / "IMR.safetensors";
    const auto pipe = pipeline::load(ctx, paths);
    id_encoder ids(model / "face_id_net.safetensors");
    std::map<w::attribute, attribute_classifier> cls;
    for (const auto a : {w::attribute::expression, w::attribute::yaw, w::attribute::pitch, w::attribute::accessories, w::attribute::background})
        cls.try_emplace(a, model / "eval" / std::string(w::name(a)), a);
    const int size = static_cast<int>(pipe.sd().models().vae.settings().sample_size);
    fs::create_directories(out);

    // What a picture scores for an asked scene: FaceSim against `reference`, the
    // classifiers' probability of the asked expression, pose accuracy, context.
    const auto score = [&](accumulator& acc, const std::string& row, const w::rendering& pic, const w::scene& asked,
                           const std::vector<float>& reference, const std::vector<float>& impostor) {
        const auto& f = asked.faces[0];
        const auto e = ids.embed(pic, 0);
        acc.add(row + "/facesim", cosine(e, reference));
        acc.add(row + "/impostor", cosine(e, impostor));
        acc.add(row + "/expr", cls.at(w::attribute::expression).probabilities(pic, 0)[static_cast<std::size_t>(f.motion.expression)]);
        const bool yaw_ok = cls.at(w::attribute::yaw).predict(pic, 0) == w::label_of(asked, 0, w::attribute::yaw);
        const bool pitch_ok = cls.at(w::attribute::pitch).predict(pic, 0) == w::label_of(asked, 0, w::attribute::pitch);
        acc.add(row + "/pose", yaw_ok && pitch_ok ? 1.0 : 0.0);
        const double p_acc = cls.at(w::attribute::accessories).probabilities(pic, 0)[static_cast<std::size_t>(f.accessories)];
        const double p_bg = cls.at(w::attribute::background).probabilities(pic, 0)[static_cast<std::size_t>(asked.background)];
        acc.add(row + "/context", (p_acc + p_bg) / 2);
    };

    struct person {
        w::scene reference_scene;
        w::rendering reference;
        std::vector<float> embedding;
    };
    const auto reference_of = [&](std::uint64_t id) {
        person p;
        p.reference_scene = w::sample_scene(id, 0, seed);
        auto& f = p.reference_scene.faces[0];
        f.motion = {};  // neutral, frontal: the edit's source prompt is then exact
        f.accessories = w::accessories::none;
        p.reference = w::render(p.reference_scene, size, size);
        p.embedding = ids.embed(p.reference, 0);
        return p;
    };
    std::vector<person> people;
    for (long long i = 0; i < identities; ++i) people.push_back(reference_of(first + static_cast<std::uint64_t>(i)));

    accumulator acc;
    std::vector<std::vector<std::vector<std::uint8_t>>> sheet;
    const auto base_options = [&](const std::string& prompt, std::uint64_t s) {
        dynamicid::pipelines::dynamicid_options o;
        o.prompt = prompt;
        o.steps = static_cast<std::size_t>(steps);
        o.seed = s;
        o.width = o.height = size;
        o.id_scale = id_scale;
        o.guidance_scale = guidance;
        return o;
    };
    std::fprintf(stderr, "single identity: %lld persons x 3 variants\n", identities);
    for (long long i = 0; i < identities; ++i) {
        const auto& p = people[static_cast<std::size_t>(i)];
        const auto& impostor = people[static_cast<std::size_t>((i + 1) % identities)].embedding;
        const auto asked = w::sample_scene(first + static_cast<std::uint64_t>(i), 1000 + static_cast<std::uint64_t>(i), seed ^ 0xe7a1ull);
        const auto truth = w::render(asked, size, size);
        dynamicid::pipelines::dynamicid_identity who;
        who.arcface = p.embedding;
        who.reference = dynamicid::modules::clip::image_u8{.height = size, .width = size, .pixels = p.reference.rgb};
        dynamicid::pipelines::dynamicid_edit edit;
        edit.source_prompt = w::face_prompt_inference(p.reference_scene.faces[0].motion);
        edit.target_prompt = w::face_prompt_inference(asked.faces[0].motion);
        edit.source_landmarks = landmark_raster_of(p.reference.faces[0], size, size);
        auto edited = who;
        edited.edit = edit;
        const auto prompt = w::scene_caption(asked);
        std::vector<std::vector<std::uint8_t>> row{p.reference.rgb};
        for (const auto& [name, gate, use_imr] : {std::tuple{"full", true, true}, std::tuple{"no_gating", false, true}, std::tuple{"no_imr", true, false}}) {
            auto o = base_options(prompt, seed + static_cast<std::uint64_t>(i));
            o.activate_query = gate;
            const auto result = pipe.generate(ctx, o, {use_imr ? edited : who});
            const auto pic = as_rendering(result.image(0), size, size, truth);
            score(acc, name, pic, asked, p.embedding, impostor);
            row.push_back(pic.rgb);
        }
        score(acc, "world", truth, asked, p.embedding, impostor);
        row.push_back(truth.rgb);
        if (i < 8) sheet.push_back(std::move(row));
        std::fprintf(stderr, "\r  %lld/%lld", i + 1, identities);
    }
    std::fprintf(stderr, "\n");
    write_sheet(out / "single.png", sheet, size);

    // Two identities in the world's two-person layout.
    const long long pairs = identities / 2;
    std::vector<std::vector<std::vector<std::uint8_t>>> sheet2;
    std::fprintf(stderr, "two identities: %lld pairs, with and without boxes\n", pairs);
    for (long long k = 0; k < pairs; ++k) {
        const auto& a = people[static_cast<std::size_t>(2 * k)];
        const auto& b = people[static_cast<std::size_t>(2 * k + 1)];
        auto scene = w::sample_two_person_scene(first + static_cast<std::uint64_t>(2 * k), first + static_cast<std::uint64_t>(2 * k + 1),
                                                static_cast<std::uint64_t>(k), seed);
        // A picture twice as wide, each half composed like the single-person training pictures.
        for (std::size_t j = 0; j < 2; ++j) {
            scene.faces[j].center_x = j == 0 ? 0.25 : 0.75;
            scene.faces[j].center_y = 0.44;
            scene.faces[j].scale = 0.42;
        }
        const auto truth = w::render(scene, 2 * size, size);
        std::vector<std::vector<std::uint8_t>> row{a.reference.rgb, b.reference.rgb};
        // Wide pictures go into the sheet as their left and right halves.
        const auto halves = [&](const std::vector<std::uint8_t>& rgb) {
            std::array<std::vector<std::uint8_t>, 2> h;
            for (int part = 0; part < 2; ++part)
                for (int y = 0; y < size; ++y)
                    h[static_cast<std::size_t>(part)].insert(h[static_cast<std::size_t>(part)].end(),
                                                             rgb.begin() + (y * 2 * size + part * size) * 3,
                                                             rgb.begin() + (y * 2 * size + part * size + size) * 3);
            return h;
        };
        for (const bool boxes : {true, false}) {
            std::vector<dynamicid::pipelines::dynamicid_identity> who(2);
            for (int j = 0; j < 2; ++j) {
                const auto& p = j == 0 ? a : b;
                who[static_cast<std::size_t>(j)].arcface = p.embedding;
                who[static_cast<std::size_t>(j)].reference = dynamicid::modules::clip::image_u8{.height = size, .width = size, .pixels = p.reference.rgb};
                who[static_cast<std::size_t>(j)].box = boxes ? saa_box(truth.faces[static_cast<std::size_t>(j)], 2 * size, size, 1.6)
                                                             : dynamicid::modules::saa::box{};
            }
            auto o = base_options(w::scene_caption(scene), seed + 7919 + static_cast<std::uint64_t>(k));
            o.width = 2 * size;
            o.infer_scale = 2.0;  // the paper's beta for several identities
            const auto result = pipe.generate(ctx, o, who);
            const auto pic = as_rendering(result.image(0), 2 * size, size, truth);
            const std::string name = boxes ? "two_boxes" : "two_no_boxes";
            for (std::size_t j = 0; j < 2; ++j) {
                const auto e = ids.embed(pic, j);
                acc.add(name + "/facesim", cosine(e, (j == 0 ? a : b).embedding));
                acc.add(name + "/leak", cosine(e, (j == 0 ? b : a).embedding));
            }
            for (auto& h : halves(pic.rgb)) row.push_back(std::move(h));
        }
        for (std::size_t j = 0; j < 2; ++j) {
            const auto e = ids.embed(truth, j);
            acc.add("two_world/facesim", cosine(e, (j == 0 ? a : b).embedding));
            acc.add("two_world/leak", cosine(e, (j == 0 ? b : a).embedding));
        }
        for (auto& h : halves(truth.rgb)) row.push_back(std::move(h));
        if (k < 8) sheet2.push_back(std::move(row));
    }
    write_sheet(out / "two.png", sheet2, size);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    // The tables.
    nlohmann::json j;
    for (const auto& [k, v] : acc.sums) j[k] = v.first / v.second;
    j["identities"] = identities;
    j["first_id"] = first;
    j["steps"] = steps;
    j["id_scale"] = id_scale;
    j["guidance"] = guidance;
    j["seconds"] = seconds;
    std::string md;
    char line[256];
    md += "| single identity | FaceSim | FaceSim, other person | Expr | Pose | Context |\n|---|---|---|---|---|---|\n";
    for (const auto& [row, label] : {std::pair{"full", "full method"}, std::pair{"no_gating", "without SAA gating"},
                                     std::pair{"no_imr", "without IMR"}, std::pair{"world", "world rendering of the asked scene"}}) {
        const std::string r = row;
        std::snprintf(line, sizeof line, "| %s | %.3f | %.3f | %.3f | %.3f | %.3f |\n", label, acc.mean(r + "/facesim"), acc.mean(r + "/impostor"),
                      acc.mean(r + "/expr"), acc.mean(r + "/pose"), acc.mean(r + "/context"));
        md += line;
    }
    md += "\n| two identities | FaceSim (own) | leakage (other's) |\n|---|---|---|\n";
    for (const auto& [row, label] : {std::pair{"two_boxes", "with boxes"}, std::pair{"two_no_boxes", "without boxes"},
                                     std::pair{"two_world", "world rendering"}}) {
        const std::string r = row;
        std::snprintf(line, sizeof line, "| %s | %.3f | %.3f |\n", label, acc.mean(r + "/facesim"), acc.mean(r + "/leak"));
        md += line;
    }
    std::snprintf(line, sizeof line, "\n%lld held-out identities from %llu, %lld DDIM steps, id scale %g, guidance %g, %.0f s.\n", identities,
                  static_cast<unsigned long long>(first), steps, id_scale, guidance, seconds);
    md += line;
    {
        std::ofstream f(out / "eval.md");
        f << md;
        std::ofstream g(out / "eval.json");
        g << j.dump(2) << '\n';
        if (!f || !g) throw dynamicid::io_error("eval", "cannot write into '" + out.string() + "'");
    }
    std::printf("%s\nwrote %s, %s, %s and %s\n", md.c_str(), (out / "eval.md").string().c_str(), (out / "eval.json").string().c_str(),
                (out / "single.png").string().c_str(), (out / "two.png").string().c_str());
    return 0;
}

}  // namespace

int run_eval_command(int argc, char** argv) {
    try {
        return evaluate(argc, argv);
    } catch (const usage_problem& e) {
        std::fprintf(stderr, "dynamicid eval: %s\n\n%s", e.message.c_str(), eval_usage);
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dynamicid eval: %s\n", e.what());
        return 1;
    }
}

}  // namespace dynamicid_cli
