// dynamicid: the command-line front end.
//
//   dynamicid generate --model PATH --prompt "a lighthouse at dusk" [--negative "blurry"]
//                      [--seed 42] [--steps 50] [--guidance 7.5] [--width 512] [--height 512]
//                      [--images 1] [--eta 0] [--threads 0] [--out out.png]
//
// With identities (DynamicID):
//
//   dynamicid generate --model PATH --saa SAA.bin --image-encoder DIR --prompt TEXT
//                      --id alice.safetensors:alice.png[:y0,x0,y1,x1] [--expression happy] [--pose "up,side"]
//                      [--landmarks alice_106.txt] [--id bob.safetensors:bob.png[:box]] [--imr IMR.bin]
//                      [--id-scale 1] [--beta 4] [--alpha 0.06 | --boost-steps 3] [--threshold 0.3] [--gating on]
//                      [--mix 0.6] [--maps DIR] ...
//
// Edit flags (--expression, --pose, --edit, --landmarks, --target-landmarks,
// --source-prompt) apply to the --id before them.
//
// PATH is a diffusers folder or an original SD1.x .safetensors file. The PNG
// carries the settings in text chunks ("parameters", in the form other Stable
// Diffusion tools write, and "dynamicid" as JSON). Progress goes to stderr: a
// bar on a terminal, otherwise a line about every tenth of the run.
#include "default_model.hpp"
#include "eval_command.hpp"
#include "png_text.hpp"
#include "train_command.hpp"
#include "world_command.hpp"
#if defined(DYNAMICID_CLI_FACE)
#include "face_command.hpp"

#include <dynamicid/face/photo.hpp>
#endif

#include <dynamicid/analysis/flops.hpp>
#include <dynamicid/backends/cpu.hpp>
#if defined(DYNAMICID_CLI_ONEDNN)
#include <dynamicid/backends/onednn.hpp>
#endif
#include <dynamicid/modules/clip/image_file.hpp>
#include <dynamicid/modules/dynamicid/face_prompt.hpp>
#include <dynamicid/modules/dynamicid/landmark_raster.hpp>
#include <dynamicid/pipelines/dynamicid.hpp>
#include <dynamicid/pipelines/text_to_image.hpp>
#include <dynamicid/visual/activation_maps.hpp>
#include <dynamicid/version.hpp>

#include <nlohmann/json.hpp>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

constexpr const char* usage_text =
    "usage: dynamicid generate --model PATH --prompt TEXT [options]\n"
    "       dynamicid train base|id|anchor|imr --config FILE.json   (docs/training.md; also train init|scale|export)\n"
    "       dynamicid face analyze PHOTO [--models DIR] [--out FILE]   (builds with ONNX; docs/face.md)\n"
    "       dynamicid world render|show|sheet ...            (procedural faces; docs/world.md)\n"
    "       dynamicid eval [--identities N] ...               (the default model's evaluation; docs/default_model.md)\n"
    "\n"
    "  --model PATH      a diffusers folder or an SD1.x .safetensors file (default: the built-in default\n"
    "                    model, data/default_model: a small DynamicID on 64x64 pictures of the face world;\n"
    "                    its --saa, --image-encoder and --imr are used unless given; 64x64, 25 steps by default)\n"
    "  --prompt TEXT     what to draw (required)\n"
    "  --negative TEXT   what to steer away from (default: empty)\n"
    "  --seed N          initial-noise seed (default 0)\n"
    "  --steps N         DDIM steps (default 50)\n"
    "  --guidance X      classifier-free guidance scale; <= 1 disables it (default 7.5)\n"
    "  --width N         image width, a multiple of 8 (default 512)\n"
    "  --height N        image height, a multiple of 8 (default 512)\n"
    "  --images N        images for the prompt (default 1; files get -0, -1, ... suffixes)\n"
    "  --eta X           DDIM eta (default 0, deterministic)\n"
    "  --threads N       CPU threads (default 0: all)\n"
    "  --backend NAME    cpu (the reference backend, default) or onednn (faster; when built with it)\n"
    "  --out FILE        output PNG (default out.png)\n"
    "\n"
    "DynamicID (one --id per person; guidance defaults to 5 then):\n"
    "  --id EMB:REF[:BOX]    ArcFace embedding (.safetensors), reference image, optional box\n"
    "                        y_min,x_min,y_max,x_max as fractions (default: vertical strips)\n"
    "  --id PHOTO[:BOX]      a photo alone: face, embedding, landmarks and pose found by the face\n"
    "                        front end (buffalo_l ONNX models in --face-models DIR)\n"
    "  --face-models DIR     insightface buffalo_l folder (default $DYNAMICID_FACE_MODELS, else models/buffalo_l)\n"
    "  --saa FILE            SAA.bin, its .safetensors conversion or an IP-Adapter-FaceID-Plus file\n"
    "  --image-encoder DIR   CLIP-ViT-H/14 folder (config.json, model.safetensors)\n"
    "  --imr FILE            IMR weights, for edits (key_point_encoder file found by name, or --kpe FILE)\n"
    "  --expression WORD     edit the last --id: neutral, happy, sad, surprised, angry, disgusted, afraid, or free text\n"
    "  --pose WORDS          edit the last --id: up|down|level and/or front|side, e.g. \"up,side\"\n"
    "  --edit TEXT           edit the last --id with a whole face prompt (\"in a happy expression, in side view\")\n"
    "  --source-prompt TEXT  the reference's face prompt (default: neutral, front view)\n"
    "  --landmarks FILE      106 \"x y\" lines of the reference on a 512x512 frame (needed by an edit)\n"
    "  --target-landmarks FILE  the wanted landmarks (default: the reference's)\n"
    "  --id-scale X          identity strength (default 1)\n"
    "  --beta X              layout boost in the first steps (default 4; the paper uses 2 for several people)\n"
    "  --boost-steps N       boost while step < N (default 3) ...\n"
    "  --alpha X             ... or for a fraction X of the steps\n"
    "  --threshold X         activation threshold (default 0.3)\n"
    "  --gating on|off       Semantic-Activated gating (default on; off: plain identity attention)\n"
    "  --mix X               ID mixing: first identity weighted X, the others 1 - X (no boxes)\n"
    "  --maps DIR            write the activation maps as PNGs into DIR\n"
    "  --maps-layers L,L     only these processor layers (default all)\n"
    "  --maps-steps S,S      only these steps (default all)\n";

struct cli_options {
    std::optional<std::string> model;
    std::optional<std::string> prompt;
    std::string negative;
    std::uint64_t seed = 0;
    std::size_t steps = 50;
    double guidance = 7.5;
    long long width = 512, height = 512, images = 1;
    bool size_given = false, steps_given = false;
    double eta = 0.0;
    int threads = 0;
    std::string backend = "cpu";
    std::string out = "out.png";
    std::optional<double> guidance_given;

    struct identity {
        std::string spec;
        std::optional<std::string> expression{}, pose{}, edit{}, source_prompt{}, landmarks{}, target_landmarks{};
    };
    std::vector<identity> ids;
    std::optional<std::string> saa, image_encoder, imr, kpe, maps, face_models;
    double id_scale = 1.0, beta = 4.0, threshold = 0.3;
    std::optional<std::size_t> boost_steps;
    std::optional<double> alpha, mix;
    bool gating = true;
    std::set<long long> maps_layers, maps_steps;
};

struct usage_error {
    std::string message;
};

template <class V>
V parse_number(std::string_view flag, const char* text) {
    char* end = nullptr;
    errno = 0;
    V value{};
    if constexpr (std::is_floating_point_v<V>) {
        value = static_cast<V>(std::strtod(text, &end));
    } else if constexpr (std::is_unsigned_v<V>) {
        if (*text == '-') throw usage_error{std::string(flag) + " needs a non-negative integer, got '" + text + "'"};
        value = static_cast<V>(std::strtoull(text, &end, 10));
    } else {
        value = static_cast<V>(std::strtoll(text, &end, 10));
    }
    if (end == text || *end != '\0' || errno == ERANGE)
        throw usage_error{std::string(flag) + " needs a number, got '" + text + "'"};
    return value;
}

std::set<long long> parse_list(std::string_view flag, const char* text) {
    std::set<long long> out;
    std::stringstream in(text);
    std::string item;
    while (std::getline(in, item, ',')) out.insert(parse_number<long long>(flag, item.c_str()));
    return out;
}

cli_options parse(int argc, char** argv) {
    cli_options o;
    const auto last_id = [&o](std::string_view flag) -> cli_options::identity& {
        if (o.ids.empty()) throw usage_error{std::string(flag) + " edits the --id before it; give --id first"};
        return o.ids.back();
    };
    for (int i = 2; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (flag == "--help" || flag == "-h") throw usage_error{};
        if (i + 1 >= argc) throw usage_error{std::string(flag) + " needs a value"};
        const char* value = argv[++i];
        if (flag == "--model") o.model = value;
        else if (flag == "--prompt") o.prompt = value;
        else if (flag == "--negative") o.negative = value;
        else if (flag == "--seed") o.seed = parse_number<std::uint64_t>(flag, value);
        else if (flag == "--steps") o.steps = parse_number<std::size_t>(flag, value), o.steps_given = true;
        else if (flag == "--guidance") o.guidance_given = o.guidance = parse_number<double>(flag, value);
        else if (flag == "--width") o.width = parse_number<long long>(flag, value), o.size_given = true;
        else if (flag == "--height") o.height = parse_number<long long>(flag, value), o.size_given = true;
        else if (flag == "--images") o.images = parse_number<long long>(flag, value);
        else if (flag == "--eta") o.eta = parse_number<double>(flag, value);
        else if (flag == "--threads") o.threads = parse_number<int>(flag, value);
        else if (flag == "--backend") o.backend = value;
        else if (flag == "--out") o.out = value;
        else if (flag == "--id") o.ids.push_back({.spec = value});
        else if (flag == "--saa") o.saa = value;
        else if (flag == "--image-encoder") o.image_encoder = value;
        else if (flag == "--imr") o.imr = value;
        else if (flag == "--kpe") o.kpe = value;
        else if (flag == "--face-models") o.face_models = value;
        else if (flag == "--expression") last_id(flag).expression = value;
        else if (flag == "--pose") last_id(flag).pose = value;
        else if (flag == "--edit") last_id(flag).edit = value;
        else if (flag == "--source-prompt") last_id(flag).source_prompt = value;
        else if (flag == "--landmarks") last_id(flag).landmarks = value;
        else if (flag == "--target-landmarks") last_id(flag).target_landmarks = value;
        else if (flag == "--id-scale") o.id_scale = parse_number<double>(flag, value);
        else if (flag == "--beta") o.beta = parse_number<double>(flag, value);
        else if (flag == "--boost-steps") o.boost_steps = parse_number<std::size_t>(flag, value);
        else if (flag == "--alpha") o.alpha = parse_number<double>(flag, value);
        else if (flag == "--threshold") o.threshold = parse_number<double>(flag, value);
        else if (flag == "--mix") o.mix = parse_number<double>(flag, value);
        else if (flag == "--maps") o.maps = value;
        else if (flag == "--maps-layers") o.maps_layers = parse_list(flag, value);
        else if (flag == "--maps-steps") o.maps_steps = parse_list(flag, value);
        else if (flag == "--gating") {
            const std::string_view v = value;
            if (v != "on" && v != "off") throw usage_error{"--gating takes on or off, got '" + std::string(v) + "'"};
            o.gating = v == "on";
        } else throw usage_error{"unknown option '" + std::string(flag) + "'"};
    }
    return o;
}

/// Progress on stderr: a redrawn bar on a terminal, else a line per ~10%.
class progress_reporter {
public:
    progress_reporter() : tty_(::isatty(STDERR_FILENO) == 1), start_(clock_type::now()) {}

    void operator()(std::size_t done, std::size_t total) {
        const double elapsed = std::chrono::duration<double>(clock_type::now() - start_).count();
        const double per_step = done ? elapsed / static_cast<double>(done) : 0.0;
        const double eta = per_step * static_cast<double>(total - done);
        if (tty_) {
            constexpr int width = 30;
            const int filled = static_cast<int>(static_cast<double>(width) * static_cast<double>(done) / static_cast<double>(total));
            std::string bar(static_cast<std::size_t>(filled), '#');
            bar.resize(width, '.');
            std::fprintf(stderr, "\r[%s] %zu/%zu  %.2f s/step  %.0f s left ", bar.c_str(), done, total, per_step, eta);
            if (done == total) std::fputc('\n', stderr);
        } else {
            const std::size_t every = total >= 10 ? total / 10 : 1;
            if (done % every == 0 || done == total)
                std::fprintf(stderr, "step %zu/%zu (%3.0f%%)  %.1f s elapsed, %.2f s/step, %.0f s left\n", done, total,
                             100.0 * static_cast<double>(done) / static_cast<double>(total), elapsed, per_step, eta);
        }
        std::fflush(stderr);
    }

private:
    bool tty_;
    clock_type::time_point start_;
};

fs::path output_path(const fs::path& out, long long index, long long count) {
    if (count == 1) return out;
    fs::path p = out;
    p.replace_filename(out.stem().string() + "-" + std::to_string(index) + out.extension().string());
    return p;
}

/// The checkpoint's name for the settings text: the file or folder name.
std::string model_name(const std::string& path) {
    fs::path p = fs::path(path).lexically_normal();
    if (p.filename().empty()) p = p.parent_path();
    return p.filename().string();
}

/// Writes one PNG with its settings in text chunks.
void write_png(const fs::path& path, std::span<const std::uint8_t> rgb, long long width, long long height, const std::string& parameters,
               const nlohmann::json& settings) {
    auto png = dynamicid_cli::encode_png_rgb(rgb.data(), static_cast<int>(width), static_cast<int>(height));
    png = dynamicid_cli::with_text_chunks(std::move(png), {{"parameters", parameters},
                                                           {"dynamicid", settings.dump()},
                                                           {"Software", std::string("dynamicid ") + dynamicid::version.string}});
    if (path.has_parent_path()) fs::create_directories(path.parent_path());
    std::ofstream file(path, std::ios::binary);
    file.write(reinterpret_cast<const char*>(png.data()), static_cast<std::streamsize>(png.size()));
    file.close();
    if (!file) throw std::runtime_error("could not write '" + path.string() + "'");
    std::printf("wrote %s (%lldx%lld)\n", path.c_str(), width, height);
}

/// "y_min,x_min,y_max,x_max" as fractions; the library checks the values.
dynamicid::modules::saa::box parse_box(const std::string& text) {
    double v[4];
    std::stringstream in(text);
    std::string item;
    int n = 0;
    while (std::getline(in, item, ',')) {
        if (n == 4) throw usage_error{"box '" + text + "' has more than 4 numbers"};
        v[n++] = parse_number<double>("box", item.c_str());
    }
    if (n != 4) throw usage_error{"box '" + text + "' is not y_min,x_min,y_max,x_max"};
    return {v[0], v[1], v[2], v[3]};
}

/// 106 "x y" lines on a 512 x 512 frame -> the IMR's 96 x 96 raster.
std::vector<float> landmark_raster(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot read landmarks '" + path + "'");
    std::vector<dynamicid::modules::imr::landmark_point> points;
    float x = 0, y = 0;
    while (in >> x >> y) points.push_back({x, y});
    if (!in.eof()) throw std::runtime_error("landmarks '" + path + "': expected \"x y\" number pairs");
    return dynamicid::modules::imr::rasterize_landmarks(points);
}

/// "up", "down", "level", "front", "side", comma-separated.
dynamicid::modules::imr::face_pose parse_pose(const std::string& text) {
    namespace imr = dynamicid::modules::imr;
    imr::face_pose pose;
    std::stringstream in(text);
    std::string w;
    while (std::getline(in, w, ',')) {
        if (w == "up") pose.vertical = imr::vertical_pose::up;
        else if (w == "down") pose.vertical = imr::vertical_pose::down;
        else if (w == "level") pose.vertical = imr::vertical_pose::level;
        else if (w == "front") pose.facing = imr::view::front;
        else if (w == "side") pose.facing = imr::view::side;
        else throw usage_error{"--pose word '" + w + "' is not up, down, level, front or side"};
    }
    return pose;
}

/// The identity's embedding: the tensor "embedding" (as `dynamicid face analyze --out` writes it) or the file's only tensor.
std::vector<float> load_embedding(const std::string& path, dynamicid::index_t width) {
    const auto f = dynamicid::io::safetensors_file::open(path);
    return dynamicid::pipelines::load_arcface(path, f.contains("embedding") ? "embedding" : "", width);
}

bool is_safetensors(const std::string& path) { return fs::path(path).extension() == ".safetensors"; }

dynamicid::pipelines::dynamicid_identity make_identity(const cli_options::identity& spec, dynamicid::index_t arcface_width,
                                                       const cli_options& o) {
    namespace imr = dynamicid::modules::imr;
    std::vector<std::string> parts;
    std::stringstream in(spec.spec);
    std::string part;
    while (std::getline(in, part, ':')) parts.push_back(part);
    const bool photo = !parts.empty() && !is_safetensors(parts[0]);
    dynamicid::pipelines::dynamicid_identity who;
    std::optional<std::vector<float>> photo_landmarks;
    std::optional<std::string> photo_source_prompt;
    if (photo) {
        if (parts.size() < 1 || parts.size() > 2 || parts[0].empty())
            throw usage_error{"--id '" + spec.spec + "' is not PHOTO[:y_min,x_min,y_max,x_max]"};
#if defined(DYNAMICID_CLI_FACE)
        const fs::path models = o.face_models ? fs::path(*o.face_models) : dynamicid_cli::default_face_models();
        std::fprintf(stderr, "analysing %s with the face models in %s ...\n", parts[0].c_str(), models.c_str());
        const auto face = dynamicid_cli::analyze_face_photo(parts[0], models, o.threads);
        if (static_cast<dynamicid::index_t>(face.embedding.size()) != arcface_width)
            throw std::runtime_error("the recognition model gives " + std::to_string(face.embedding.size()) +
                                     " values; the projection expects " + std::to_string(arcface_width));
        who.arcface = face.embedding;
        who.reference = dynamicid::face::load_photo(parts[0]);  // CLIP sees the whole photo, upright, as released
        // The released landmark raster is drawn on the photo resized to 512 x 512.
        std::vector<float> pts;
        for (const auto& p : face.landmarks_106) {
            pts.push_back(static_cast<float>(p[0] * 512.0 / static_cast<double>(who.reference->width)));
            pts.push_back(static_cast<float>(p[1] * 512.0 / static_cast<double>(who.reference->height)));
        }
        photo_landmarks = std::move(pts);
        photo_source_prompt = imr::inference_prompt(imr::expression::neutral, imr::pose_from_angles(face.pose.pitch, face.pose.yaw));
        if (parts.size() == 2) who.box = parse_box(parts[1]);
#else
        (void)o;
        throw usage_error{"--id '" + spec.spec + "': this build has no face front end (ONNX was not found); give EMBEDDING.safetensors:REFERENCE"};
#endif
    } else {
        if (parts.size() < 2 || parts.size() > 3 || parts[0].empty() || parts[1].empty())
            throw usage_error{"--id '" + spec.spec + "' is not EMBEDDING.safetensors:REFERENCE.png[:y_min,x_min,y_max,x_max]"};
        who.arcface = load_embedding(parts[0], arcface_width);
        who.reference = dynamicid::modules::clip::load_image(parts[1]);
        if (parts.size() == 3) who.box = parse_box(parts[2]);
    }
    if (spec.expression || spec.pose || spec.edit) {
        if (!spec.landmarks && !photo_landmarks)
            throw usage_error{"the edit of --id '" + spec.spec + "' needs --landmarks FILE (106 points of the reference)"};
        dynamicid::pipelines::dynamicid_edit e;
        e.source_prompt = spec.source_prompt.value_or(
            photo_source_prompt.value_or(imr::inference_prompt(imr::expression::neutral, imr::face_pose{})));
        if (spec.edit) {
            e.target_prompt = *spec.edit;
        } else {
            const std::string word = spec.expression.value_or("neutral");
            const auto known = imr::parse_expression(word);
            const std::string expr = known ? std::string(imr::classifier_label(*known)) : word;
            e.target_prompt = imr::inference_prompt(expr, imr::pose_words(spec.pose ? parse_pose(*spec.pose) : imr::face_pose{}));
        }
        if (spec.landmarks) {
            e.source_landmarks = landmark_raster(*spec.landmarks);
        } else {
            std::vector<dynamicid::modules::imr::landmark_point> points;
            for (std::size_t i = 0; i + 1 < photo_landmarks->size(); i += 2) points.push_back({(*photo_landmarks)[i], (*photo_landmarks)[i + 1]});
            e.source_landmarks = dynamicid::modules::imr::rasterize_landmarks(points);
        }
        if (spec.target_landmarks) e.target_landmarks = landmark_raster(*spec.target_landmarks);
        who.edit = std::move(e);
    } else if (spec.landmarks || spec.target_landmarks || spec.source_prompt) {
        throw usage_error{"--landmarks, --target-landmarks and --source-prompt go with an edit (--expression, --pose or --edit)"};
    }
    return who;
}

/// The backend context for a generation. Nothing writes the weights while
/// generating, so the oneDNN backend may keep its convolution weights
/// reordered across calls (1.1-1.2x on SD1.5's UNet at 256x256, docs/onednn.md).
template <class B>
typename B::context generation_context(const cli_options& o) {
    typename B::context ctx{.threads = o.threads};
#if defined(DYNAMICID_CLI_ONEDNN)
    if constexpr (std::is_same_v<B, dynamicid::onednn_backend>) ctx.weight_cache_bytes = std::size_t{4} << 30;
#endif
    return ctx;
}

template <class B>
int generate_with_identities(const cli_options& o) {
    using id_pipeline = dynamicid::pipelines::dynamicid_pipeline<B>;
    if (!o.saa) throw usage_error{"--id needs --saa FILE (the DynamicID or IP-Adapter-FaceID-Plus weights)"};
    if (!o.image_encoder) throw usage_error{"--id needs --image-encoder DIR (CLIP-ViT-H/14: config.json, model.safetensors)"};
    auto ctx = generation_context<B>(o);
    const auto load_start = clock_type::now();
    std::fprintf(stderr, "loading %s + %s ...\n", o.model->c_str(), o.saa->c_str());
    dynamicid::pipelines::dynamicid_paths paths{.sd_model = *o.model, .saa_checkpoint = *o.saa, .image_encoder = *o.image_encoder};
    if (o.imr) paths.imr = *o.imr;
    if (o.kpe) paths.keypoint_encoder = *o.kpe;
    const auto pipe = id_pipeline::load(ctx, paths);
    const double load_seconds = std::chrono::duration<double>(clock_type::now() - load_start).count();

    std::vector<dynamicid::pipelines::dynamicid_identity> ids;
    const auto arcface_width = pipe.models().projection.settings().id_embeddings_dim;
    for (const auto& spec : o.ids) ids.push_back(make_identity(spec, arcface_width, o));

    dynamicid::pipelines::dynamicid_options opts{.prompt = *o.prompt,
                                                 .negative_prompt = o.negative,
                                                 .guidance_scale = o.guidance_given.value_or(5.0),
                                                 .steps = o.steps,
                                                 .seed = o.seed,
                                                 .width = static_cast<dynamicid::index_t>(o.width),
                                                 .height = static_cast<dynamicid::index_t>(o.height),
                                                 .eta = o.eta,
                                                 .id_scale = o.id_scale,
                                                 .infer_scale = o.beta,
                                                 .threshold = o.threshold,
                                                 .activate_query = o.gating,
                                                 .mix_scale = o.mix};
    if (o.boost_steps) opts.infer_end = static_cast<dynamicid::index_t>(*o.boost_steps);
    opts.infer_end_fraction = o.alpha;
    if (o.images != 1) throw usage_error{"--images is 1 with --id (run again with another --seed)"};
    std::fprintf(stderr, "loaded in %.1f s; %zu identit%s, %lldx%lld, %zu steps, guidance %g, seed %llu, %d threads\n", load_seconds,
                 ids.size(), ids.size() == 1 ? "y" : "ies", o.width, o.height, o.steps, opts.guidance_scale,
                 static_cast<unsigned long long>(o.seed), ctx.thread_count());

    progress_reporter progress;
    typename id_pipeline::controls controls;
    controls.on_progress = [&progress](std::size_t done, std::size_t total) { progress(done, total); };
    std::optional<dynamicid::visual::activation_recorder> recorder;
    if (o.maps) {
        dynamicid::visual::activation_filter filter;
        for (auto l : o.maps_layers) filter.layers.insert(static_cast<dynamicid::index_t>(l));
        for (auto st : o.maps_steps) filter.steps.insert(st);
        recorder.emplace(filter);
        controls.on_activation = recorder->callback();
    }
    const auto start = clock_type::now();
    const auto result = pipe.generate(ctx, opts, ids, controls);
    const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();

    std::string parameters = *o.prompt;
    if (!o.negative.empty()) parameters += "\nNegative prompt: " + o.negative;
    char line[512];
    std::snprintf(line, sizeof line, "\nSteps: %zu, Sampler: DDIM, CFG scale: %g, Seed: %llu, Size: %lldx%lld, Model: %s, DynamicID: %s",
                  o.steps, opts.guidance_scale, static_cast<unsigned long long>(o.seed), o.width, o.height, model_name(*o.model).c_str(),
                  model_name(*o.saa).c_str());
    nlohmann::json id_json = nlohmann::json::array();
    for (const auto& spec : o.ids) {
        nlohmann::json j = {{"id", spec.spec}};
        if (spec.expression) j["expression"] = *spec.expression;
        if (spec.pose) j["pose"] = *spec.pose;
        if (spec.edit) j["edit"] = *spec.edit;
        id_json.push_back(std::move(j));
    }
    const nlohmann::json settings = {{"prompt", *o.prompt},      {"negative_prompt", o.negative}, {"seed", o.seed},
                                     {"steps", o.steps},         {"guidance_scale", opts.guidance_scale},
                                     {"width", o.width},         {"height", o.height},           {"eta", o.eta},
                                     {"sampler", "DDIM"},        {"model", *o.model},            {"saa", *o.saa},
                                     {"identities", id_json},    {"id_scale", o.id_scale},       {"beta", o.beta},
                                     {"boost_steps", opts.infer_end_fraction ? nlohmann::json(nullptr) : nlohmann::json(opts.infer_end)},
                                     {"alpha", o.alpha ? nlohmann::json(*o.alpha) : nlohmann::json(nullptr)},
                                     {"threshold", o.threshold}, {"gating", o.gating},
                                     {"mix", o.mix ? nlohmann::json(*o.mix) : nlohmann::json(nullptr)},
                                     {"version", dynamicid::version.string}};
    write_png(o.out, result.image(0), result.width, result.height, parameters + line, settings);
    if (recorder) {
        std::vector<dynamicid::modules::saa::box> boxes;
        if (!o.mix)
            for (const auto& who : ids)
                if (who.box) boxes.push_back(*who.box);
        const auto files = dynamicid::visual::write_heat_maps(*o.maps, *recorder, boxes, static_cast<dynamicid::index_t>(ids.size()));
        std::printf("wrote %zu activation maps to %s\n", files.size(), o.maps->c_str());
    }
    std::printf("generated in %.2f s\n", seconds);
    return 0;
}

/// No --model: the built-in default model, its DynamicID parts, and sizes it was trained at.
void use_default_model(cli_options& o) {
    const auto dir = dynamicid_cli::default_model_dir();
    if (!fs::exists(dir / "model_index.json")) {
        throw usage_error{"a model is needed and the built-in default model is not at '" + dir.string() +
                          "' (set $DYNAMICID_DEFAULT_MODEL, or pass --model PATH: a diffusers folder or an SD1.x .safetensors file)"};
    }
    o.model = dir.string();
    if (!o.size_given) o.width = o.height = 64;
    if (!o.steps_given) o.steps = 25;
    if (o.ids.empty()) return;
    if (!o.saa) o.saa = (dir / "SAA.safetensors").string();
    if (!o.image_encoder) o.image_encoder = (dir / "image_encoder").string();
    if (!o.imr && fs::exists(dir / "IMR.safetensors")) o.imr = (dir / "IMR.safetensors").string();
}

template <class B>
int generate_text_to_image(const cli_options& o);

/// run.template operator()<B>() with B the backend --backend names (checked before).
template <class Run>
int on_backend([[maybe_unused]] const cli_options& o, Run&& run) {
#if defined(DYNAMICID_CLI_ONEDNN)
    if (o.backend == "onednn") return run.template operator()<dynamicid::onednn_backend>();
#endif
    return run.template operator()<dynamicid::cpu_backend>();
}

int generate(int argc, char** argv) {
    cli_options o = parse(argc, argv);
    if (!o.model) use_default_model(o);
    if (!o.prompt) throw usage_error{"--prompt is required"};
    if (o.backend != "cpu" && o.backend != "onednn") throw usage_error{"--backend must be cpu or onednn, got '" + o.backend + "'"};
#if !defined(DYNAMICID_CLI_ONEDNN)
    if (o.backend == "onednn") throw usage_error{"--backend onednn: this dynamicid was built without the oneDNN backend (libdnnl-dev)"};
#endif
    if (!o.ids.empty()) return on_backend(o, [&]<class B>() { return generate_with_identities<B>(o); });
    if (o.saa || o.image_encoder || o.imr || o.kpe || o.maps || o.mix || o.alpha || o.boost_steps)
        throw usage_error{"--saa, --image-encoder, --imr, --kpe, --maps, --mix, --alpha and --boost-steps need at least one --id"};
    return on_backend(o, [&]<class B>() { return generate_text_to_image<B>(o); });
}

template <class B>
int generate_text_to_image(const cli_options& o) {
    using pipeline = dynamicid::pipelines::text_to_image<B>;
    auto ctx = generation_context<B>(o);
    const auto load_start = clock_type::now();
    std::fprintf(stderr, "loading %s ...\n", o.model->c_str());
    const auto pipe = pipeline::load(ctx, fs::path(*o.model));
    const double load_seconds = std::chrono::duration<double>(clock_type::now() - load_start).count();

    const typename pipeline::options opts{.prompts = {*o.prompt},
                                 .negative_prompts = {o.negative},
                                 .guidance_scale = o.guidance,
                                 .steps = o.steps,
                                 .seed = o.seed,
                                 .width = static_cast<dynamicid::index_t>(o.width),
                                 .height = static_cast<dynamicid::index_t>(o.height),
                                 .images_per_prompt = static_cast<dynamicid::index_t>(o.images),
                                 .eta = o.eta};
    pipe.validate(opts);
    std::fprintf(stderr, "loaded in %.1f s; %lldx%lld, %zu steps, guidance %g, seed %llu, %d threads\n", load_seconds, o.width, o.height,
                 o.steps, o.guidance, static_cast<unsigned long long>(o.seed), ctx.thread_count());

    progress_reporter progress;
    typename pipeline::controls controls;
    controls.on_progress = [&progress](std::size_t done, std::size_t total) { progress(done, total); };
    const auto start = clock_type::now();
    const auto result = pipe.generate(ctx, opts, controls);
    const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();

    const auto& m = pipe.models();
    const auto macs = dynamicid::analysis::text_to_image_macs(
        m.text_encoder.settings().encoder(), m.unet.settings(), m.vae.settings(),
        {.images = result.count, .width = result.width, .height = result.height, .steps = static_cast<dynamicid::index_t>(o.steps),
         .tokens = m.text_encoder.settings().max_position_embeddings, .guidance = o.guidance > 1.0, .vae_factor = pipe.vae_scale_factor()});

    std::string parameters = *o.prompt;
    if (!o.negative.empty()) parameters += "\nNegative prompt: " + o.negative;
    char line[512];
    for (long long i = 0; i < result.count; ++i) {
        std::snprintf(line, sizeof line, "\nSteps: %zu, Sampler: DDIM, CFG scale: %g, Seed: %llu, Size: %lldx%lld, Eta: %g, Model: %s", o.steps,
                      o.guidance, static_cast<unsigned long long>(o.seed), o.width, o.height, o.eta,
                      model_name(*o.model).c_str());
        const nlohmann::json settings = {{"prompt", *o.prompt},    {"negative_prompt", o.negative}, {"seed", o.seed},
                                         {"steps", o.steps},       {"guidance_scale", o.guidance}, {"width", o.width},
                                         {"height", o.height},     {"eta", o.eta},                  {"sampler", "DDIM"},
                                         {"image_index", i},       {"images", result.count},        {"model", *o.model},
                                         {"version", dynamicid::version.string}};
        write_png(output_path(o.out, i, result.count), result.image(i), result.width, result.height, parameters + line, settings);
    }
    std::printf("generated in %.2f s (%.1f GMAC, %.1f GFLOP/s)\n", seconds, static_cast<double>(macs.total()) / 1e9,
                2.0 * static_cast<double>(macs.total()) / seconds / 1e9);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string_view command = argc >= 2 ? argv[1] : "";
    try {
        if (command == "generate") return generate(argc, argv);
        if (command == "train") return dynamicid_cli::run_train_command(argc - 1, argv + 1);
        if (command == "world") return dynamicid_cli::run_world_command(argc - 1, argv + 1);
        if (command == "eval") return dynamicid_cli::run_eval_command(argc - 1, argv + 1);
#if defined(DYNAMICID_CLI_FACE)
        if (command == "face") return dynamicid_cli::run_face_command(argc - 1, argv + 1);
#endif
        if (command == "--version") {
            std::printf("dynamicid %s\n", dynamicid::version.string);
            return 0;
        }
        if (command == "--help" || command == "-h" || command == "help") {
            std::printf("%s", usage_text);
            return 0;
        }
        std::fprintf(stderr, "%s%s", command.empty() ? "" : ("unknown command '" + std::string(command) + "'\n\n").c_str(), usage_text);
        return 2;
    } catch (const usage_error& e) {
        if (e.message.empty()) {
            std::printf("%s", usage_text);
            return 0;
        }
        std::fprintf(stderr, "dynamicid generate: %s\n\n%s", e.message.c_str(), usage_text);
        return 2;
    } catch (const dynamicid::error& e) {
        std::fprintf(stderr, "dynamicid: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dynamicid: error: %s\n", e.what());
        return 1;
    }
}
