// dynamicid: the command-line front end.
//
//   dynamicid generate --model PATH --prompt "a lighthouse at dusk" [--negative "blurry"]
//                      [--seed 42] [--steps 50] [--guidance 7.5] [--width 512] [--height 512]
//                      [--images 1] [--eta 0] [--threads 0] [--out out.png]
//
// PATH is a diffusers folder or an original SD1.x .safetensors file. The PNG
// carries the settings in text chunks ("parameters", in the form other Stable
// Diffusion tools write, and "dynamicid" as JSON). Progress goes to stderr: a
// bar on a terminal, otherwise a line about every tenth of the run.
#include "png_text.hpp"

#include <dynamicid/analysis/flops.hpp>
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/pipelines/text_to_image.hpp>
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
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace {

namespace fs = std::filesystem;
using backend = dynamicid::cpu_backend;
using pipeline = dynamicid::pipelines::text_to_image<backend>;
using clock_type = std::chrono::steady_clock;

constexpr const char* usage_text =
    "usage: dynamicid generate --model PATH --prompt TEXT [options]\n"
    "\n"
    "  --model PATH      a diffusers folder or an SD1.x .safetensors file (required)\n"
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
    "  --out FILE        output PNG (default out.png)\n";

struct cli_options {
    std::optional<std::string> model;
    std::optional<std::string> prompt;
    std::string negative;
    std::uint64_t seed = 0;
    std::size_t steps = 50;
    double guidance = 7.5;
    long long width = 512, height = 512, images = 1;
    double eta = 0.0;
    int threads = 0;
    std::string out = "out.png";
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

cli_options parse(int argc, char** argv) {
    cli_options o;
    for (int i = 2; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (flag == "--help" || flag == "-h") throw usage_error{};
        if (i + 1 >= argc) throw usage_error{std::string(flag) + " needs a value"};
        const char* value = argv[++i];
        if (flag == "--model") o.model = value;
        else if (flag == "--prompt") o.prompt = value;
        else if (flag == "--negative") o.negative = value;
        else if (flag == "--seed") o.seed = parse_number<std::uint64_t>(flag, value);
        else if (flag == "--steps") o.steps = parse_number<std::size_t>(flag, value);
        else if (flag == "--guidance") o.guidance = parse_number<double>(flag, value);
        else if (flag == "--width") o.width = parse_number<long long>(flag, value);
        else if (flag == "--height") o.height = parse_number<long long>(flag, value);
        else if (flag == "--images") o.images = parse_number<long long>(flag, value);
        else if (flag == "--eta") o.eta = parse_number<double>(flag, value);
        else if (flag == "--threads") o.threads = parse_number<int>(flag, value);
        else if (flag == "--out") o.out = value;
        else throw usage_error{"unknown option '" + std::string(flag) + "'"};
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

int generate(int argc, char** argv) {
    const cli_options o = parse(argc, argv);
    if (!o.model) {
        std::fprintf(stderr,
                     "dynamicid generate: a model is needed. Pass --model PATH with a Stable Diffusion 1.x checkpoint: a diffusers\n"
                     "folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or an original single\n"
                     ".safetensors file such as v1-5-pruned-emaonly.safetensors. There is no built-in default model yet.\n");
        return 2;
    }
    if (!o.prompt) throw usage_error{"--prompt is required"};

    backend::context ctx{.threads = o.threads};
    const auto load_start = clock_type::now();
    std::fprintf(stderr, "loading %s ...\n", o.model->c_str());
    const auto pipe = pipeline::load(ctx, fs::path(*o.model));
    const double load_seconds = std::chrono::duration<double>(clock_type::now() - load_start).count();

    const pipeline::options opts{.prompts = {*o.prompt},
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
    pipeline::controls controls;
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
        auto png = dynamicid_cli::encode_png_rgb(result.image(i).data(), static_cast<int>(result.width), static_cast<int>(result.height));
        png = dynamicid_cli::with_text_chunks(std::move(png), {{"parameters", parameters + line},
                                                               {"dynamicid", settings.dump()},
                                                               {"Software", std::string("dynamicid ") + dynamicid::version.string}});
        const fs::path path = output_path(o.out, i, result.count);
        if (path.has_parent_path()) fs::create_directories(path.parent_path());
        std::ofstream file(path, std::ios::binary);
        file.write(reinterpret_cast<const char*>(png.data()), static_cast<std::streamsize>(png.size()));
        file.close();
        if (!file) throw std::runtime_error("could not write '" + path.string() + "'");
        std::printf("wrote %s (%lldx%lld)\n", path.c_str(), static_cast<long long>(result.width), static_cast<long long>(result.height));
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
