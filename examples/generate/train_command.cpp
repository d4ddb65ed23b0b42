// dynamicid CLI: `dynamicid train base|anchor|imr --config file.json` and
// `dynamicid train init FOLDER` (see train_command.hpp).
#include "train_command.hpp"
#include "train_runner.hpp"

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/training/id_trainer.hpp>

#include <nlohmann/json.hpp>

#include "face_world.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <exception>
#include <fstream>
#include <stop_token>
#include <string>

namespace dynamicid_cli {
namespace {

std::atomic<bool> interrupted{false};
extern "C" void on_interrupt(int) { interrupted.store(true); }

}  // namespace

namespace detail {

void handle_interrupts(bool on) { std::signal(SIGINT, on ? on_interrupt : SIG_DFL); }
bool interrupt_requested() { return interrupted.load(); }

void draw_progress(const dynamicid::training::train_progress& p) {
    constexpr int width = 30;
    const int filled = p.total > 0 ? static_cast<int>(width * p.step / p.total) : 0;
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(width, '.');
    const double eta = p.step > 0 ? p.seconds / static_cast<double>(p.step) * static_cast<double>(p.total - p.step) : 0.0;
    std::fprintf(stderr, "\r[%s] %lld/%lld loss %.5f lr %.3g %.2f samples/s eta %.0fs ", bar.c_str(), static_cast<long long>(p.step),
                 static_cast<long long>(p.total), p.loss, p.lr, p.samples_per_second, eta);
    std::fflush(stderr);
}

#if !defined(DYNAMICID_CLI_ONEDNN)
int train_on_onednn(const std::string&, const nlohmann::json&, int) {
    throw dynamicid::value_error("train", "--backend onednn: this dynamicid was built without the oneDNN backend (libdnnl-dev)");
}
#endif

}  // namespace detail

namespace {

constexpr const char* usage =
    "usage: dynamicid train base|id|anchor|imr --config FILE.json [--threads N] [--backend cpu|onednn]\n"
    "       dynamicid train init MODEL/text_encoder|unet|vae|image_encoder [--seed N]\n"
    "       dynamicid train scale MODEL --manifest FILE.jsonl [--images N] [--resolution R]\n"
    "       dynamicid train export MODEL OUT_DIR\n"
    "  base     a base-model component from scratch (\"component\": \"vae\" or \"unet\"; writes <component>/ in diffusers' layout)\n"
    "  id       the identity encoder (IResNet + ArcFace margin) on the face world's identities (writes face_id_net.safetensors);\n"
    "           with \"target\" expression|yaw|pitch|accessories|background, a classifier of that attribute (dynamicid eval)\n"
    "  init     writes random weights (torch's default initialisation) for a component folder that has only its config.json\n"
    "  scale    sets MODEL/vae/config.json's scaling_factor to 1 / std of the VAE latents of the manifest's first N images\n"
    "  export   copies a trained model folder, storing large float tensors (>= 16384 values) in f16\n"
    "  anchor   the anchoring stage: projection + SA/SAA processors (writes SAA.safetensors)\n"
    "  imr      the reconfiguration stage: IMR + KeyPointEncoder (writes IMR.safetensors, key_point_encoder.safetensors)\n"
    "Config keys: sd_model, image_encoder, manifest, output_dir, steps, batch, lr, lr_schedule, warmup, weight_decay,\n"
    "  clip, seed, checkpoint_every, resume (a checkpoint folder or \"latest\"), threads, activation_checkpointing;\n"
    "  base: component, init (random|pretrained), resolution, caption_drop, kl_weight;\n"
    "  id: output_dir, steps, batch, identities, first_id, render_size, seed, lr, lr_schedule, warmup, weight_decay,\n"
    "  clip, checkpoint_every, resume, scale, margin, net {input_size, widths, blocks, embedding_size}, target, crop (face|full);\n"
    "  anchor: resolution, rank, init_checkpoint, projection_init, num_tokens, projection_depth, id_drop, text_drop,\n"
    "  both_drop, gate; imr: saa_checkpoint, imr_init, keypoint_encoder_init, targets, resolution, lambda,\n"
    "  landmark_frame, gate. Checkpoints: OUTPUT_DIR/checkpoint-<step>/, log: OUTPUT_DIR/train_log.csv.\n"
    "--backend: base, anchor and imr run on the reference CPU backend (cpu, the default) or on oneDNN (onednn,\n"
    "  when built with it; faster, not bit-identical); checkpoints of either resume on the other.\n";

/// The identity encoder on the face world: each step draws `batch` pictures
/// of identities first_id .. first_id + identities - 1 (random expression,
/// pose, accessories, background) and feeds each face's world::face_crop.
int train_identity(const nlohmann::json& j, int threads_override) {
    namespace tr = dynamicid::training;
    namespace world = dynamicid::world;
    using B = dynamicid::cpu_backend;
    tr::id_trainer_config cfg;
    std::int64_t batch = 32, identities = 0;
    std::uint64_t first_id = 0;
    int render_size = 64, threads = threads_override;
    std::string target = "identity", crop;
    static const std::vector<std::string> keys{"stage", "output_dir", "steps", "batch", "identities", "first_id", "render_size", "seed",
                                               "lr", "lr_schedule", "warmup", "weight_decay", "clip", "checkpoint_every", "resume",
                                               "scale", "margin", "net", "threads", "init_weights", "target", "crop"};
    if (!j.is_object()) throw dynamicid::value_error("train", "config: the top level is not a JSON object");
    for (const auto& [k, v] : j.items())
        if (std::find(keys.begin(), keys.end(), k) == keys.end()) throw dynamicid::value_error("train", "config: unknown key \"" + k + "\"");
    try {
        cfg.output_dir = j.at("output_dir").get<std::string>();
        cfg.steps = j.value("steps", cfg.steps);
        batch = j.value("batch", batch);
        identities = j.at("identities").get<std::int64_t>();
        first_id = j.value("first_id", first_id);
        render_size = j.value("render_size", render_size);
        cfg.seed = j.value("seed", cfg.seed);
        cfg.lr = j.value("lr", cfg.lr);
        cfg.lr_schedule = j.value("lr_schedule", cfg.lr_schedule);
        cfg.warmup = j.value("warmup", cfg.warmup);
        cfg.weight_decay = j.value("weight_decay", cfg.weight_decay);
        cfg.clip = j.value("clip", cfg.clip);
        cfg.checkpoint_every = j.value("checkpoint_every", cfg.checkpoint_every);
        cfg.resume = j.value("resume", std::string());
        cfg.init_weights = j.value("init_weights", std::string());
        target = j.value("target", target);
        crop = j.value("crop", std::string(target == "background" ? "full" : "face"));
        cfg.margin.scale = j.value("scale", cfg.margin.scale);
        cfg.margin.margin = j.value("margin", cfg.margin.margin);
        if (threads <= 0) threads = j.value("threads", 0);
        if (j.contains("net")) cfg.net = dynamicid::modules::identity::face_id_net_config::from_json(j.at("net").dump());
    } catch (const nlohmann::json::exception& e) {
        throw dynamicid::value_error("train", std::string("config: ") + e.what());
    }
    if (batch < 2) throw dynamicid::value_error("train", "config: \"batch\" must be >= 2 (BatchNorm in training mode)");
    if (identities < 2) throw dynamicid::value_error("train", "config: \"identities\" must be >= 2");
    if (render_size < 32 || render_size > 1024) throw dynamicid::value_error("train", "config: \"render_size\" must be in [32, 1024]");
    if (crop != "face" && crop != "full") throw dynamicid::value_error("train", "config: \"crop\" must be \"face\" or \"full\"");
    const bool by_identity = target == "identity";
    const auto attribute = by_identity ? world::attribute::expression : world::parse_attribute(target);
    cfg.num_classes = by_identity ? identities : world::classes_of(attribute);
    const bool whole = crop == "full";
    const auto side = cfg.net.input_size;
    const auto seed = cfg.seed;
    tr::id_batch_source<B, float> source = [=](B::context& ctx, std::int64_t step) {
        std::vector<float> pixels;
        std::vector<std::int64_t> labels;
        for (std::int64_t i = 0; i < batch; ++i) {
            const auto pick = tr::detail::stream_of(seed, step, 31, static_cast<std::uint64_t>(i));
            const auto person = tr::detail::uniform_int(pick, 0, identities);
            const auto sample = static_cast<std::uint64_t>(tr::detail::uniform_int(pick, 1, std::int64_t{1} << 40));
            const auto scene = world::sample_scene(first_id + static_cast<std::uint64_t>(person), sample, seed);
            const auto r = world::render(scene, render_size, render_size);
            const auto input = whole ? world::image_input(r, static_cast<int>(side)) : world::face_crop(r, 0, static_cast<int>(side));
            pixels.insert(pixels.end(), input.begin(), input.end());
            const std::int64_t label = by_identity ? person : world::label_of(scene, 0, attribute);
            labels.push_back(label);
        }
        // (batch, 3, side, side): the loop above wrote each picture's planes in turn.
        return tr::id_batch<B, float>{dynamicid::tensor<B, float>::from_host(ctx, {batch, 3, side, side}, pixels), labels};
    };
    B::context ctx{};
    if (threads > 0) ctx.threads = threads;
    tr::id_trainer<B> trainer(ctx, cfg, source);
    if (by_identity)
        std::fprintf(stderr, "training the identity encoder on %lld identities from step %lld to %lld\n", static_cast<long long>(identities),
                     static_cast<long long>(trainer.step()), static_cast<long long>(cfg.steps));
    else
        std::fprintf(stderr, "training the %s classifier (%lld classes, %s input) from step %lld to %lld\n", target.c_str(),
                     static_cast<long long>(cfg.num_classes), crop.c_str(), static_cast<long long>(trainer.step()), static_cast<long long>(cfg.steps));
    std::stop_source stop;
    detail::handle_interrupts(true);
    trainer.run(ctx, stop.get_token(), [&](const tr::train_progress& p) {
        detail::draw_progress(p);
        if (detail::interrupt_requested()) stop.request_stop();
    });
    detail::handle_interrupts(false);
    std::fprintf(stderr, "\n%s at step %lld (batch accuracy %.3f); checkpoints in %s\n", detail::interrupt_requested() ? "stopped" : "done",
                 static_cast<long long>(trainer.step()), trainer.last_accuracy(), cfg.output_dir.string().c_str());
    return detail::interrupt_requested() ? 130 : 0;
}

/// `train scale`: the VAE latents' standard deviation over the first `images`
/// pictures of a manifest (samples of the posterior, as the UNet stage sees
/// them), written as scaling_factor = 1 / std into MODEL/vae/config.json.
int measure_scaling_factor(const std::filesystem::path& model, const std::filesystem::path& manifest, std::int64_t images,
                           dynamicid::index_t resolution, int threads) {
    namespace tr = dynamicid::training;
    using B = dynamicid::cpu_backend;
    B::context ctx{};
    if (threads > 0) ctx.threads = threads;
    const auto config_path = model / "vae" / "config.json";
    auto config = tr::detail::read_json_file(config_path);
    const auto vc = dynamicid::modules::vae::autoencoder_kl_config::from_json(config);
    const auto vae = dynamicid::modules::vae::autoencoder_kl<B>::load(
        ctx, dynamicid::modules::weight_source::open({tr::detail::component_weights(model / "vae")}), vc);
    const auto data = tr::read_manifest(manifest, {.arcface_width = 0, .require_arcface = false});
    double sum = 0, sum_sq = 0, count = 0;
    const auto n = std::min<std::size_t>(data.size(), static_cast<std::size_t>(std::max<std::int64_t>(images, 1)));
    for (std::size_t i = 0; i < n; ++i) {
        const auto image = tr::detail::load_training_image<B, float>(ctx, data[i].image, resolution);
        const auto z = vae.sample(ctx, vae.encode(ctx, image), 1000 + i).to_host(ctx);
        for (float v : z) sum += v, sum_sq += static_cast<double>(v) * v, count += 1;
    }
    const double mean = sum / count, var = sum_sq / count - mean * mean;
    if (!(var > 0) || !std::isfinite(var)) throw dynamicid::value_error("train", "the VAE latents have no spread (variance " + std::to_string(var) + ")");
    const double factor = 1.0 / std::sqrt(var);
    config["scaling_factor"] = factor;
    std::ofstream out(config_path);
    out << config.dump(2) << '\n';
    if (!out) throw dynamicid::io_error("train", "cannot write '" + config_path.string() + "'");
    std::printf("latents over %zu images: mean %.4f std %.4f; scaling_factor %.5f written to %s\n", n, mean, std::sqrt(var), factor,
                config_path.string().c_str());
    return 0;
}

/// `train export`: MODEL copied to OUT with every floating tensor of at least
/// 16384 values stored in f16 (the loaders convert back; small tensors, such
/// as norms and biases, stay f32). A value beyond f16's range is an error. Of a
/// trainer_state.safetensors (an attribute classifier's) only "margin.weight"
/// and the metadata are kept.
int export_model(const std::filesystem::path& model, const std::filesystem::path& out) {
    namespace fs = std::filesystem;
    if (!fs::is_directory(model)) throw dynamicid::io_error("train", "export: '" + model.string() + "' is not a folder");
    if (fs::exists(out) && !fs::is_empty(out))
        for (const auto& e : fs::directory_iterator(out))
            if (e.path().filename() != ".gitattributes") fs::remove_all(e.path());
    std::size_t bytes = 0;
    for (const auto& e : fs::recursive_directory_iterator(model)) {
        const auto rel = fs::relative(e.path(), model);
        const auto dst = out / rel;
        if (e.is_directory()) {
            fs::create_directories(dst);
            continue;
        }
        fs::create_directories(dst.parent_path());
        if (e.path().extension() != ".safetensors") {
            fs::copy_file(e.path(), dst, fs::copy_options::overwrite_existing);
            bytes += fs::file_size(dst);
            continue;
        }
        const auto file = dynamicid::io::safetensors_file::open(e.path());
        dynamicid::io::safetensors_writer w;
        for (const auto& [k, v] : file.metadata()) w.set_metadata(k, v);
        // A classifier's trainer state: only its class weights are kept (dynamicid eval reads them).
        const bool classifier_state = e.path().filename() == "trainer_state.safetensors";
        for (const auto& name : file.names()) {
            if (classifier_state && name != "margin.weight") continue;
            const auto& info = file.info(name);
            const bool floating = info.type == dynamicid::dtype::f32 || info.type == dynamicid::dtype::f64;
            if (floating && info.dims.numel() >= 16384) {
                const auto v = file.to_vector<float>(name);
                std::vector<dynamicid::half> h(v.size());
                for (std::size_t i = 0; i < v.size(); ++i) {
                    if (std::fabs(v[i]) > 65504.0f)
                        throw dynamicid::value_error("train", "export: '" + name + "' in " + e.path().string() + " exceeds f16's range");
                    h[i] = dynamicid::half(v[i]);
                }
                w.add(name, info.dims, h);
            } else if (info.type == dynamicid::dtype::f32) {
                w.add(name, info.dims, file.to_vector<float>(name));
            } else {
                w.add_bytes(name, info.type, info.dims, file.bytes(name));
            }
        }
        w.write(dst);
        bytes += fs::file_size(dst);
    }
    std::printf("exported %s to %s (%.1f MB)\n", model.string().c_str(), out.string().c_str(), static_cast<double>(bytes) / 1e6);
    return 0;
}

}  // namespace

int run_train_command(int argc, char** argv) {
    std::string stage, config, folder, second, manifest;
    int threads = 0;
    std::string backend = "cpu";
    unsigned long long seed = 0;
    long long images = 256, resolution = 64;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if ((a == "--config" || a == "--threads" || a == "--seed" || a == "--manifest" || a == "--images" || a == "--resolution" ||
             a == "--backend") &&
            i + 1 < argc) {
            if (a == "--config") config = argv[++i];
            else if (a == "--backend") backend = argv[++i];
            else if (a == "--seed") seed = std::strtoull(argv[++i], nullptr, 10);
            else if (a == "--manifest") manifest = argv[++i];
            else if (a == "--images") images = std::atoll(argv[++i]);
            else if (a == "--resolution") resolution = std::atoll(argv[++i]);
            else threads = std::atoi(argv[++i]);
        } else if (a == "-h" || a == "--help") {
            std::fputs(usage, stdout);
            return 0;
        } else if (stage.empty() && (a == "anchor" || a == "imr" || a == "base" || a == "id" || a == "init" || a == "scale" || a == "export")) {
            stage = a;
        } else if ((stage == "init" || stage == "scale" || stage == "export") && folder.empty()) {
            folder = a;
        } else if (stage == "export" && second.empty()) {
            second = a;
        } else {
            std::fprintf(stderr, "dynamicid train: unexpected argument '%s'\n%s", a.c_str(), usage);
            return 2;
        }
    }
    if (stage == "init") {
        if (folder.empty()) {
            std::fputs(usage, stderr);
            return 2;
        }
        try {
            dynamicid::cpu_backend::context ctx{};
            const bool wrote = dynamicid::training::initialize_component<dynamicid::cpu_backend>(ctx, folder, seed);
            std::printf("%s %s\n", wrote ? "wrote random weights into" : "weights already present in", folder.c_str());
            return 0;
        } catch (const std::exception& e) {
            std::fprintf(stderr, "dynamicid train init: %s\n", e.what());
            return 1;
        }
    }
    if (stage == "scale" || stage == "export") {
        if (folder.empty() || (stage == "scale" && manifest.empty()) || (stage == "export" && second.empty())) {
            std::fputs(usage, stderr);
            return 2;
        }
        try {
            if (stage == "export") return export_model(folder, second);
            if (resolution < 8 || resolution > 4096 || resolution % 8 != 0) throw dynamicid::value_error("train", "--resolution must be a multiple of 8 in [8, 4096]");
            return measure_scaling_factor(folder, manifest, images, resolution, threads);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "dynamicid train %s: %s\n", stage.c_str(), e.what());
            return 1;
        }
    }
    if (stage.empty() || config.empty()) {
        std::fputs(usage, stderr);
        return 2;
    }
    try {
        std::ifstream in(config);
        if (!in) throw dynamicid::io_error("train", "cannot open config '" + config + "'");
        nlohmann::json j;
        try {
            j = nlohmann::json::parse(in);
        } catch (const nlohmann::json::exception& e) {
            throw dynamicid::value_error("train", "config '" + config + "' is not JSON: " + e.what());
        }
        if (j.is_object() && j.contains("stage") && j["stage"] != stage)
            throw dynamicid::value_error("train", "config '" + config + "' is for the '" + j["stage"].dump() + "' stage");
        if (backend != "cpu" && backend != "onednn") throw dynamicid::value_error("train", "--backend must be cpu or onednn, got '" + backend + "'");
        if (stage == "id") {
            if (backend != "cpu") throw dynamicid::value_error("train", "the id stage runs on the cpu backend only");
            return train_identity(j, threads);
        }
        if (backend == "onednn") return detail::train_on_onednn(stage, j, threads);
        return detail::run_stage<dynamicid::cpu_backend>(stage, j, threads);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "\ndynamicid train: %s\n", e.what());
        return 1;
    }
}

}  // namespace dynamicid_cli
