// dynamicid CLI, internal: runs one of the library's trainers (base, anchor,
// imr) on a backend, with the progress bar and Ctrl-C handling of
// `dynamicid train`. train_command.cpp instantiates it for the reference CPU
// backend, train_onednn.cpp for oneDNN.
#pragma once

#include <dynamicid/training/anchor_trainer.hpp>
#include <dynamicid/training/base_trainer.hpp>
#include <dynamicid/training/detail/trainer_common.hpp>
#include <dynamicid/training/imr_trainer.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <stop_token>
#include <string>

namespace dynamicid_cli::detail {

/// Draws the progress bar (stderr).
void draw_progress(const dynamicid::training::train_progress& p);
/// Installs (true) or removes (false) the Ctrl-C handler; true once Ctrl-C was pressed.
void handle_interrupts(bool on);
bool interrupt_requested();

/// Trains `Trainer` (configured by Config::from_json(j)) on backend B until
/// its steps are done or Ctrl-C; returns the exit code (130 when stopped).
template <class B, class Trainer, class Config>
int run_trainer(const nlohmann::json& j, int threads_override) {
    auto cfg = Config::from_json(j);
    if (threads_override > 0) cfg.threads = threads_override;
    typename B::context ctx{};
    if (cfg.threads > 0) ctx.threads = cfg.threads;
    Trainer trainer(ctx, cfg);
    std::fprintf(stderr, "training on the %s backend from step %lld to %lld\n", B::name(), static_cast<long long>(trainer.step()),
                 static_cast<long long>(cfg.steps));
    std::stop_source stop;
    handle_interrupts(true);
    trainer.run(ctx, stop.get_token(), [&](const dynamicid::training::train_progress& p) {
        draw_progress(p);
        if (interrupt_requested()) stop.request_stop();
    });
    handle_interrupts(false);
    std::fprintf(stderr, "\n%s at step %lld; checkpoints in %s\n", interrupt_requested() ? "stopped" : "done",
                 static_cast<long long>(trainer.step()), cfg.output_dir.string().c_str());
    return interrupt_requested() ? 130 : 0;
}

/// `stage` (base, anchor or imr) on backend B.
template <class B>
int run_stage(const std::string& stage, const nlohmann::json& j, int threads_override) {
    namespace tr = dynamicid::training;
    if (stage == "anchor") return run_trainer<B, tr::anchor_trainer<B>, tr::anchor_trainer_config>(j, threads_override);
    if (stage == "base") return run_trainer<B, tr::base_trainer<B>, tr::base_trainer_config>(j, threads_override);
    return run_trainer<B, tr::imr_trainer<B>, tr::imr_trainer_config>(j, threads_override);
}

/// run_stage on the oneDNN backend (train_onednn.cpp); throws when the CLI
/// was built without it.
int train_on_onednn(const std::string& stage, const nlohmann::json& j, int threads_override);

}  // namespace dynamicid_cli::detail
