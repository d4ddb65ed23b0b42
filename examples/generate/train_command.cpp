// dynamicid CLI: `dynamicid train base|anchor|imr --config file.json` and
// `dynamicid train init FOLDER` (see train_command.hpp).
#include "train_command.hpp"

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/training/anchor_trainer.hpp>
#include <dynamicid/training/base_trainer.hpp>
#include <dynamicid/training/id_trainer.hpp>
#include <dynamicid/training/imr_trainer.hpp>

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

constexpr const char* usage =
    "usage: dynamicid train base|id|anchor|imr --config FILE.json [--threads N]\n"
    "       dynamicid train init MODEL/text_encoder|unet|vae [--seed N]\n"
    "  base     a base-model component from scratch (\"component\": \"vae\" or \"unet\"; writes <component>/ in diffusers' layout)\n"
    "  id       the identity encoder (IResNet + ArcFace margin) on the face world's identities (writes face_id_net.safetensors)\n"
    "  init     writes random weights (torch's default initialisation) for a component folder that has only its config.json\n"
    "  anchor   the anchoring stage: projection + SA/SAA processors (writes SAA.safetensors)\n"
    "  imr      the reconfiguration stage: IMR + KeyPointEncoder (writes IMR.safetensors, key_point_encoder.safetensors)\n"
    "Config keys: sd_model, image_encoder, manifest, output_dir, steps, batch, lr, lr_schedule, warmup, weight_decay,\n"
    "  clip, seed, checkpoint_every, resume (a checkpoint folder or \"latest\"), threads, activation_checkpointing;\n"
    "  base: component, init (random|pretrained), resolution, caption_drop, kl_weight;\n"
    "  id: output_dir, steps, batch, identities, first_id, render_size, seed, lr, lr_schedule, warmup, weight_decay,\n"
    "  clip, checkpoint_every, resume, scale, margin, net {input_size, widths, blocks, embedding_size};\n"
    "  anchor: resolution, rank, init_checkpoint, projection_init, num_tokens, projection_depth, id_drop, text_drop,\n"
    "  both_drop, gate; imr: saa_checkpoint, imr_init, keypoint_encoder_init, targets, resolution, lambda,\n"
    "  landmark_frame, gate. Checkpoints: OUTPUT_DIR/checkpoint-<step>/, log: OUTPUT_DIR/train_log.csv.\n";

void draw(const dynamicid::training::train_progress& p) {
    constexpr int width = 30;
    const int filled = p.total > 0 ? static_cast<int>(width * p.step / p.total) : 0;
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(width, '.');
    const double eta = p.step > 0 ? p.seconds / static_cast<double>(p.step) * static_cast<double>(p.total - p.step) : 0.0;
    std::fprintf(stderr, "\r[%s] %lld/%lld loss %.5f lr %.3g %.2f samples/s eta %.0fs ", bar.c_str(), static_cast<long long>(p.step),
                 static_cast<long long>(p.total), p.loss, p.lr, p.samples_per_second, eta);
    std::fflush(stderr);
}

template <class Trainer, class Config>
int train(const nlohmann::json& j, int threads_override) {
    auto cfg = Config::from_json(j);
    if (threads_override > 0) cfg.threads = threads_override;
    dynamicid::cpu_backend::context ctx{};
    if (cfg.threads > 0) ctx.threads = cfg.threads;
    Trainer trainer(ctx, cfg);
    std::fprintf(stderr, "training from step %lld to %lld\n", static_cast<long long>(trainer.step()), static_cast<long long>(cfg.steps));
    std::stop_source stop;
    std::signal(SIGINT, on_interrupt);
    trainer.run(ctx, stop.get_token(), [&](const dynamicid::training::train_progress& p) {
        draw(p);
        if (interrupted.load()) stop.request_stop();
    });
    std::signal(SIGINT, SIG_DFL);
    std::fprintf(stderr, "\n%s at step %lld; checkpoints in %s\n", interrupted.load() ? "stopped" : "done",
                 static_cast<long long>(trainer.step()), cfg.output_dir.string().c_str());
    return interrupted.load() ? 130 : 0;
}

/// The identity encoder on the face world: each step draws `batch` pictures
/// of identities first_id .. first_id + identities - 1 (random expression,
/// pose, accessories, background), crops each face's box (made square and
/// 20% larger) and resizes it to the net's input, in (x - 127.5) / 127.5.
int train_identity(const nlohmann::json& j, int threads_override) {
    namespace tr = dynamicid::training;
    namespace world = dynamicid::world;
    using B = dynamicid::cpu_backend;
    tr::id_trainer_config cfg;
    std::int64_t batch = 32, identities = 0;
    std::uint64_t first_id = 0;
    int render_size = 64, threads = threads_override;
    static const std::vector<std::string> keys{"stage", "output_dir", "steps", "batch", "identities", "first_id", "render_size", "seed",
                                               "lr", "lr_schedule", "warmup", "weight_decay", "clip", "checkpoint_every", "resume",
                                               "scale", "margin", "net", "threads", "init_weights"};
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
        cfg.margin.scale = j.value("scale", cfg.margin.scale);
        cfg.margin.margin = j.value("margin", cfg.margin.margin);
        if (threads <= 0) threads = j.value("threads", 0);
        if (j.contains("net")) {
            const auto& n = j.at("net");
            cfg.net.input_size = n.value("input_size", cfg.net.input_size);
            cfg.net.widths = n.value("widths", cfg.net.widths);
            cfg.net.blocks = n.value("blocks", cfg.net.blocks);
            cfg.net.embedding_size = n.value("embedding_size", cfg.net.embedding_size);
        }
    } catch (const nlohmann::json::exception& e) {
        throw dynamicid::value_error("train", std::string("config: ") + e.what());
    }
    if (batch < 2) throw dynamicid::value_error("train", "config: \"batch\" must be >= 2 (BatchNorm in training mode)");
    if (identities < 2) throw dynamicid::value_error("train", "config: \"identities\" must be >= 2");
    if (render_size < 32 || render_size > 1024) throw dynamicid::value_error("train", "config: \"render_size\" must be in [32, 1024]");
    cfg.num_classes = identities;
    const auto side = cfg.net.input_size;
    const auto seed = cfg.seed;
    tr::id_batch_source<B, float> source = [=](B::context& ctx, std::int64_t step) {
        std::vector<float> pixels;
        std::vector<std::int64_t> labels;
        for (std::int64_t i = 0; i < batch; ++i) {
            const auto pick = tr::detail::stream_of(seed, step, 31, static_cast<std::uint64_t>(i));
            const auto label = tr::detail::uniform_int(pick, 0, identities);
            const auto sample = static_cast<std::uint64_t>(tr::detail::uniform_int(pick, 1, std::int64_t{1} << 40));
            const auto r = world::render(world::sample_scene(first_id + static_cast<std::uint64_t>(label), sample, seed), render_size, render_size);
            const auto& box = r.faces.front().box;
            const double cx = (box[0] + box[2]) / 2, cy = (box[1] + box[3]) / 2;
            const double half = 0.6 * std::max(box[2] - box[0], box[3] - box[1]);
            const auto x0 = static_cast<dynamicid::index_t>(std::clamp(std::lround(cx - half), 0L, static_cast<long>(render_size - 1)));
            const auto y0 = static_cast<dynamicid::index_t>(std::clamp(std::lround(cy - half), 0L, static_cast<long>(render_size - 1)));
            const auto x1 = static_cast<dynamicid::index_t>(std::clamp(std::lround(cx + half), static_cast<long>(x0) + 1, static_cast<long>(render_size)));
            const auto y1 = static_cast<dynamicid::index_t>(std::clamp(std::lround(cy + half), static_cast<long>(y0) + 1, static_cast<long>(render_size)));
            dynamicid::modules::clip::image_u8 crop;
            crop.height = y1 - y0;
            crop.width = x1 - x0;
            for (auto y = y0; y < y1; ++y)
                for (auto x = x0; x < x1; ++x)
                    for (int c = 0; c < 3; ++c) crop.pixels.push_back(r.rgb[static_cast<std::size_t>((y * render_size + x) * 3 + c)]);
            const auto face = dynamicid::modules::clip::resize(crop, side, side);
            for (int c = 0; c < 3; ++c)
                for (dynamicid::index_t k = 0; k < side * side; ++k)
                    pixels.push_back(static_cast<float>((face.pixels[static_cast<std::size_t>(k * 3 + c)] - 127.5) / 127.5));
            labels.push_back(label);
        }
        // (batch, 3, side, side): the loop above wrote each picture's planes in turn.
        return tr::id_batch<B, float>{dynamicid::tensor<B, float>::from_host(ctx, {batch, 3, side, side}, pixels), labels};
    };
    B::context ctx{};
    if (threads > 0) ctx.threads = threads;
    tr::id_trainer<B> trainer(ctx, cfg, source);
    std::fprintf(stderr, "training the identity encoder on %lld identities from step %lld to %lld\n", static_cast<long long>(identities),
                 static_cast<long long>(trainer.step()), static_cast<long long>(cfg.steps));
    std::stop_source stop;
    std::signal(SIGINT, on_interrupt);
    trainer.run(ctx, stop.get_token(), [&](const tr::train_progress& p) {
        draw(p);
        if (interrupted.load()) stop.request_stop();
    });
    std::signal(SIGINT, SIG_DFL);
    std::fprintf(stderr, "\n%s at step %lld (batch accuracy %.3f); checkpoints in %s\n", interrupted.load() ? "stopped" : "done",
                 static_cast<long long>(trainer.step()), trainer.last_accuracy(), cfg.output_dir.string().c_str());
    return interrupted.load() ? 130 : 0;
}

}  // namespace

int run_train_command(int argc, char** argv) {
    std::string stage, config, folder;
    int threads = 0;
    unsigned long long seed = 0;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if ((a == "--config" || a == "--threads" || a == "--seed") && i + 1 < argc) {
            if (a == "--config") config = argv[++i];
            else if (a == "--seed") seed = std::strtoull(argv[++i], nullptr, 10);
            else threads = std::atoi(argv[++i]);
        } else if (a == "-h" || a == "--help") {
            std::fputs(usage, stdout);
            return 0;
        } else if (stage.empty() && (a == "anchor" || a == "imr" || a == "base" || a == "id" || a == "init")) {
            stage = a;
        } else if (stage == "init" && folder.empty()) {
            folder = a;
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
        namespace tr = dynamicid::training;
        if (stage == "anchor") return train<tr::anchor_trainer<dynamicid::cpu_backend>, tr::anchor_trainer_config>(j, threads);
        if (stage == "base") return train<tr::base_trainer<dynamicid::cpu_backend>, tr::base_trainer_config>(j, threads);
        if (stage == "id") return train_identity(j, threads);
        return train<tr::imr_trainer<dynamicid::cpu_backend>, tr::imr_trainer_config>(j, threads);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "\ndynamicid train: %s\n", e.what());
        return 1;
    }
}

}  // namespace dynamicid_cli
