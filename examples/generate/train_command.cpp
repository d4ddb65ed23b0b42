// dynamicid CLI: `dynamicid train base|anchor|imr --config file.json` and
// `dynamicid train init FOLDER` (see train_command.hpp).
#include "train_command.hpp"

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/training/anchor_trainer.hpp>
#include <dynamicid/training/base_trainer.hpp>
#include <dynamicid/training/imr_trainer.hpp>

#include <nlohmann/json.hpp>

#include <atomic>
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
    "usage: dynamicid train base|anchor|imr --config FILE.json [--threads N]\n"
    "       dynamicid train init MODEL/text_encoder|unet|vae [--seed N]\n"
    "  base     a base-model component from scratch (\"component\": \"vae\" or \"unet\"; writes <component>/ in diffusers' layout)\n"
    "  init     writes random weights (torch's default initialisation) for a component folder that has only its config.json\n"
    "  anchor   the anchoring stage: projection + SA/SAA processors (writes SAA.safetensors)\n"
    "  imr      the reconfiguration stage: IMR + KeyPointEncoder (writes IMR.safetensors, key_point_encoder.safetensors)\n"
    "Config keys: sd_model, image_encoder, manifest, output_dir, steps, batch, lr, lr_schedule, warmup, weight_decay,\n"
    "  clip, seed, checkpoint_every, resume (a checkpoint folder or \"latest\"), threads, activation_checkpointing;\n"
    "  base: component, init (random|pretrained), resolution, caption_drop, kl_weight;\n"
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
        } else if (stage.empty() && (a == "anchor" || a == "imr" || a == "base" || a == "init")) {
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
        return train<tr::imr_trainer<dynamicid::cpu_backend>, tr::imr_trainer_config>(j, threads);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "\ndynamicid train: %s\n", e.what());
        return 1;
    }
}

}  // namespace dynamicid_cli
