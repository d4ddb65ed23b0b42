// dynamicid CLI: `dynamicid world render|show|sheet` (see world_command.hpp).
#include "world_command.hpp"

#include "default_model.hpp"
#include "png_text.hpp"
#include "world_models.hpp"

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/identity/face_id_net.hpp>

#include <face_world.hpp>

#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dynamicid_cli {
namespace {

namespace fs = std::filesystem;
namespace w = dynamicid::world;

constexpr const char* world_usage =
    "usage: dynamicid world render --out DIR --identities N --per-identity K [--size 64] [--seed S]\n"
    "                              [--two-person M] [--first-id ID] [--id-net FILE]\n"
    "       dynamicid world show --id N [--expression E] [--yaw left|front|right|DEG] [--pitch up|front|down|DEG]\n"
    "                            [--background B] [--accessories none|hat|glasses|both] [--size 256] [--seed S]\n"
    "                            [--sample K] [--landmarks] [--out face.png]\n"
    "                            [--write-embedding FILE.safetensors] [--write-landmarks FILE.txt] [--id-net FILE]\n"
    "       dynamicid world sheet --out sheet.png [--mode identities|expressions|poses|two] [--size 64]\n"
    "                             [--cols 8] [--rows 8] [--first-id ID] [--seed S]\n"
    "\n"
    "  expressions: neutral happy sad surprised angry; backgrounds: plain beach forest city room mountains\n"
    "  Held-out identities: use ids from 1000000 up (--first-id 1000000); training uses 0..N-1.\n"
    "  --id-net FILE: an identity encoder (face_id_net.safetensors); render adds each single-person line's\n"
    "  \"arcface\" (L2-normalised) to the manifest; show writes --write-embedding with it (default: the\n"
    "  default model's encoder). --write-landmarks: the 106 points on a 512x512 frame, for generate --landmarks.\n";

struct usage_problem {
    std::string message;
};

/// --key value pairs (and bare flags listed in `flags`) after the action word.
std::map<std::string, std::string> parse_options(int argc, char** argv, std::initializer_list<std::string_view> keys,
                                                 std::initializer_list<std::string_view> flags = {}) {
    std::map<std::string, std::string> out;
    for (int i = 2; i < argc; ++i) {
        const std::string_view a = argv[i];
        bool known = false;
        for (auto f : flags)
            if (a == f) out[std::string(a)] = "1", known = true;
        if (known) continue;
        for (auto k : keys)
            if (a == k) known = true;
        if (!known) throw usage_problem{"unknown option '" + std::string(a) + "'"};
        if (i + 1 >= argc) throw usage_problem{std::string(a) + " needs a value"};
        out[std::string(a)] = argv[++i];
    }
    return out;
}

std::uint64_t to_u64(const std::map<std::string, std::string>& o, const std::string& key, std::uint64_t fallback) {
    const auto it = o.find(key);
    if (it == o.end()) return fallback;
    std::uint64_t v = 0;
    const auto& s = it->second;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc{} || end != s.data() + s.size()) throw usage_problem{key + " '" + s + "' is not a non-negative integer"};
    return v;
}

int to_int(const std::map<std::string, std::string>& o, const std::string& key, int fallback) {
    const auto v = to_u64(o, key, static_cast<std::uint64_t>(fallback));
    if (v > 1'000'000'000ull) throw dynamicid::value_error(std::string(w::world_component), key + " " + std::to_string(v) + " is too large");
    return static_cast<int>(v);
}

/// A label or a number of degrees.
template <class Label>
double angle_of(const std::string& text, Label (*parse)(std::string_view), double (*nominal)(Label)) {
    char* end = nullptr;
    errno = 0;
    const double d = std::strtod(text.c_str(), &end);
    if (!text.empty() && end == text.c_str() + text.size() && errno == 0) return d;
    return nominal(parse(text));
}

void write_file(const fs::path& path, const std::vector<std::uint8_t>& bytes) {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw dynamicid::io_error(std::string(w::world_component), "cannot write '" + path.string() + "'");
}

void write_png(const fs::path& path, const w::rendering& r) { write_file(path, encode_png_rgb(r.rgb.data(), r.width, r.height)); }

int render_dataset(int argc, char** argv) {
    const auto o = parse_options(argc, argv, {"--out", "--identities", "--per-identity", "--size", "--seed", "--two-person", "--first-id", "--id-net"});
    if (!o.count("--out")) throw usage_problem{"--out DIR is required"};
    const fs::path dir = o.at("--out");
    const std::uint64_t n = to_u64(o, "--identities", 0), k = to_u64(o, "--per-identity", 0), first = to_u64(o, "--first-id", 0);
    const std::uint64_t seed = to_u64(o, "--seed", 0), pairs = to_u64(o, "--two-person", 0);
    const int size = to_int(o, "--size", 64);
    if (n == 0 || k == 0) throw usage_problem{"--identities and --per-identity must be at least 1"};
    if (n > 100'000'000ull || k > 100'000'000ull || n * k > 100'000'000ull || pairs > 100'000'000ull)
        throw dynamicid::value_error(std::string(w::world_component), "more than 100000000 pictures requested");
    if (first > std::numeric_limits<std::uint64_t>::max() - n - 1)
        throw dynamicid::value_error(std::string(w::world_component), "--first-id " + std::to_string(first) + " leaves no room for the identities");
    // Validate the size before touching the disk.
    w::check_image_size(size, size);
    std::optional<id_encoder> encoder;
    if (o.count("--id-net")) encoder.emplace(o.at("--id-net"));
    fs::create_directories(dir / "images");
    std::ofstream manifest(dir / "train.jsonl", std::ios::binary);
    if (!manifest) throw dynamicid::io_error(std::string(w::world_component), "cannot write '" + (dir / "train.jsonl").string() + "'");
    std::size_t written = 0;
    for (std::uint64_t id = first; id < first + n; ++id) {
        for (std::uint64_t j = 0; j < k; ++j) {
            const auto s = w::sample_scene(id, j, seed);
            const auto r = w::render(s, size, size);
            const std::string name = "images/" + std::to_string(id) + "_" + std::to_string(j) + ".png";
            write_png(dir / name, r);
            if (encoder) {
                const auto e = encoder->embed(r, 0);
                manifest << w::manifest_line(s, r, name, e) << '\n';
            } else {
                manifest << w::manifest_line(s, r, name) << '\n';
            }
            ++written;
        }
    }
    if (pairs > 0) {
        fs::create_directories(dir / "two_person");
        std::ofstream two(dir / "two_person.jsonl", std::ios::binary);
        if (!two) throw dynamicid::io_error(std::string(w::world_component), "cannot write '" + (dir / "two_person.jsonl").string() + "'");
        for (std::uint64_t m = 0; m < pairs; ++m) {
            const std::uint64_t a = first + (2 * m) % n, b = n > 1 ? first + (2 * m + 1) % n : first + 1;
            const auto s = w::sample_two_person_scene(a, b, m, seed);
            const auto r = w::render(s, size, size);
            const std::string name = "two_person/" + std::to_string(m) + ".png";
            write_png(dir / name, r);
            two << w::manifest_line(s, r, name) << '\n';
            ++written;
        }
    }
    manifest.close();
    if (!manifest) throw dynamicid::io_error(std::string(w::world_component), "cannot finish '" + (dir / "train.jsonl").string() + "'");
    std::printf("wrote %zu images and %s\n", written, (dir / "train.jsonl").string().c_str());
    return 0;
}

int show(int argc, char** argv) {
    const auto o = parse_options(argc, argv,
                                 {"--id", "--expression", "--yaw", "--pitch", "--background", "--accessories", "--size", "--seed", "--sample", "--out",
                                  "--write-embedding", "--write-landmarks", "--id-net"},
                                 {"--landmarks"});
    if (!o.count("--id")) throw usage_problem{"--id N is required"};
    auto s = w::sample_scene(to_u64(o, "--id", 0), to_u64(o, "--sample", 0), to_u64(o, "--seed", 0));
    auto& f = s.faces[0];
    if (o.count("--expression")) f.motion.expression = w::parse_expression(o.at("--expression"));
    if (o.count("--yaw")) f.motion.yaw_degrees = angle_of<w::yaw_label>(o.at("--yaw"), w::parse_yaw, w::yaw_of);
    if (o.count("--pitch")) f.motion.pitch_degrees = angle_of<w::pitch_label>(o.at("--pitch"), w::parse_pitch, w::pitch_of);
    if (o.count("--background")) s.background = w::parse_background(o.at("--background"));
    if (o.count("--accessories")) f.accessories = w::parse_accessories(o.at("--accessories"));
    const int size = to_int(o, "--size", 256);
    auto r = w::render(s, size, size);
    if (o.count("--write-embedding")) {
        const fs::path net = o.count("--id-net") ? fs::path(o.at("--id-net")) : default_model_dir() / "face_id_net.safetensors";
        const auto e = id_encoder(net).embed(r, 0);
        dynamicid::io::safetensors_writer file;
        file.add("embedding", {static_cast<dynamicid::index_t>(e.size())}, e);
        file.write(o.at("--write-embedding"));
        std::printf("wrote %s\n", o.at("--write-embedding").c_str());
    }
    if (o.count("--write-landmarks")) {
        std::string text;
        char line[64];
        for (const auto& p : r.faces[0].landmarks) {
            std::snprintf(line, sizeof line, "%.3f %.3f\n", p[0] * 512.0 / size, p[1] * 512.0 / size);
            text += line;
        }
        write_file(o.at("--write-landmarks"), std::vector<unsigned char>(text.begin(), text.end()));
        std::printf("wrote %s\n", o.at("--write-landmarks").c_str());
    }
    if (o.count("--landmarks")) w::draw_landmarks(r);
    const fs::path out = o.count("--out") ? fs::path(o.at("--out")) : fs::path("face.png");
    write_png(out, r);
    std::printf("%s\n%s\n%s\n", w::scene_caption(s).c_str(), w::face_prompt_inference(f.motion).c_str(), w::face_prompt_training(f.motion).c_str());
    std::printf("wrote %s\n", out.string().c_str());
    return 0;
}

int sheet(int argc, char** argv) {
    const auto o = parse_options(argc, argv, {"--out", "--mode", "--size", "--cols", "--rows", "--first-id", "--seed"});
    if (!o.count("--out")) throw usage_problem{"--out FILE is required"};
    const std::string mode = o.count("--mode") ? o.at("--mode") : "identities";
    if (mode != "identities" && mode != "expressions" && mode != "poses" && mode != "two")
        throw dynamicid::value_error(std::string(w::world_component), "unknown sheet mode '" + mode + "' (identities, expressions, poses, two)");
    const int size = to_int(o, "--size", 64), cols = to_int(o, "--cols", 8), rows = to_int(o, "--rows", 8);
    const std::uint64_t first = to_u64(o, "--first-id", 0), seed = to_u64(o, "--seed", 0);
    if (cols < 1 || rows < 1 || static_cast<long long>(cols) * size > 16384 || static_cast<long long>(rows) * size > 16384)
        throw dynamicid::value_error(std::string(w::world_component), "a sheet is 1..16384 pixels per side");
    const auto W = static_cast<std::size_t>(cols * size);
    std::vector<std::uint8_t> pixels(W * static_cast<std::size_t>(rows * size) * 3);
    for (int y = 0; y < rows; ++y)
        for (int x = 0; x < cols; ++x) {
            w::scene s;
            const auto cell = static_cast<std::uint64_t>(y * cols + x);
            if (mode == "identities") {
                s = w::sample_scene(first + cell, 0, seed);
            } else if (mode == "two") {
                s = w::sample_two_person_scene(first + 2 * cell, first + 2 * cell + 1, cell, seed);
            } else {
                // One identity per row, front-facing, no accessories; the columns vary the motion.
                s = w::sample_scene(first + static_cast<std::uint64_t>(y), 0, seed);
                auto& m = s.faces[0].motion;
                s.faces[0].accessories = w::accessories::none;
                m = {};
                if (mode == "expressions") {
                    m.expression = static_cast<w::expression>(x % 5);
                    m.yaw_degrees = x < 5 ? 0.0 : (x % 2 ? -35.0 : 35.0);
                } else {
                    constexpr double yaws[8] = {-35, 0, 35, -35, 0, 35, 0, 0};
                    constexpr double pitches[8] = {0, 0, 0, 20, 20, 20, -20, -20};
                    m.yaw_degrees = yaws[x % 8];
                    m.pitch_degrees = pitches[x % 8];
                    if (x % 8 == 7) m.yaw_degrees = -35.0;
                }
            }
            const auto r = w::render(s, size, size);
            for (int j = 0; j < size; ++j)
                std::copy_n(r.rgb.data() + static_cast<std::size_t>(j * size) * 3, static_cast<std::size_t>(size) * 3,
                            pixels.data() + ((static_cast<std::size_t>(y * size + j)) * W + static_cast<std::size_t>(x * size)) * 3);
        }
    write_file(o.at("--out"), encode_png_rgb(pixels.data(), static_cast<int>(W), rows * size));
    std::printf("wrote %s\n", o.at("--out").c_str());
    return 0;
}

}  // namespace

int run_world_command(int argc, char** argv) {
    const std::string_view action = argc >= 2 ? argv[1] : "";
    try {
        if (action == "render") return render_dataset(argc, argv);
        if (action == "show") return show(argc, argv);
        if (action == "sheet") return sheet(argc, argv);
        if (action == "--help" || action == "-h" || action == "help") {
            std::fputs(world_usage, stdout);
            return 0;
        }
        throw usage_problem{action.empty() ? "an action is needed" : "unknown action '" + std::string(action) + "'"};
    } catch (const usage_problem& e) {
        std::fprintf(stderr, "dynamicid world: %s\n\n%s", e.message.c_str(), world_usage);
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dynamicid world: %s\n", e.what());
        return 1;
    }
}

}  // namespace dynamicid_cli
