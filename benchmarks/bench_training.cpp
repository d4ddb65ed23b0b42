// dynamicid benchmarks: one anchoring-stage training step through the frozen
// full Stable Diffusion 1.5 UNet with DynamicID's trainable SA/SAA processors
// (rank-128 LoRA on all 32 attention layers, to_k_ip / to_v_ip), against one
// inference forward of the same UNet and batch measured in the same run.
//
// A step is: the UNet forward recorded on the tape (with the processors'
// gating, one identity of 4 tokens after the 77 text tokens), the epsilon MSE
// and the whole backward (input gradients through every frozen layer, the
// processor weights' gradients), plus an AdamW update of the trainable
// weights. Rows: batch 1 and 2 at 256 x 256, with and without activation
// checkpointing of the down/mid/up blocks. Counters: seconds per step,
// samples/s, x_forward (step time over the inference forward of the same
// batch), and peak_RSS_MiB, the process's peak so far: the rows run from the
// least to the most memory-hungry, so each row's peak is its own.
//
// The weights are the full-size random-weight files of tools/bench/make_random_sd15.py:
//
//   python3 tools/bench/make_random_sd15.py --out /tmp/sd15-random
//   OMP_WAIT_POLICY=PASSIVE DYNAMICID_BENCH_MODELS=/tmp/sd15-random dynamicid_bench_training
#include <benchmark/benchmark.h>

#include <dynamicid/backends/cpu.hpp>
#if defined(DYNAMICID_BENCH_ONEDNN)
#include <dynamicid/backends/onednn.hpp>
#endif
#include <dynamicid/pipelines/dynamicid.hpp>
#include <dynamicid/training/optim.hpp>
#include <dynamicid/training/saa_processors.hpp>
#include <dynamicid/training/tape.hpp>

#include <sys/resource.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace pl = dynamicid::pipelines;
namespace training = dynamicid::training;
using dynamicid::index_t;

double peak_rss_mib() {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

std::map<std::string, double>& forward_seconds() {
    static std::map<std::string, double> m;
    return m;
}

template <class B>
const pl::dynamicid_pipeline<B>& pipeline_for(typename B::context& ctx, const fs::path& dir) {
    static std::optional<pl::dynamicid_pipeline<B>> pipe;
    if (!pipe) pipe = pl::dynamicid_pipeline<B>::load(ctx, {.sd_model = dir / "sd15", .saa_checkpoint = dir / "SAA.safetensors"});
    return *pipe;
}

/// mode 0: inference forward; 1: training step; 2: training step with checkpointing.
template <class B>
void bm_step(benchmark::State& state, const std::string& backend_name, int mode) {
    const char* dir = std::getenv("DYNAMICID_BENCH_MODELS");
    if (!dir || !*dir) {
        state.SkipWithError("set DYNAMICID_BENCH_MODELS (tools/bench/make_random_sd15.py writes the files)");
        return;
    }
    using tensor = dynamicid::tensor<B, float>;
    typename B::context ctx;
    const auto& pipe = pipeline_for<B>(ctx, dir);
    const auto& unet = pipe.sd().models().unet;
    const index_t batch = state.range(0), latent = 32, tokens = 77 + 4;
    const auto sample = dynamicid::ops::randn<B, float>(ctx, {batch, 4, latent, latent}, 7);
    const auto states = dynamicid::ops::scale(ctx, dynamicid::ops::randn<B, float>(ctx, {batch, tokens, 768}, 8), 0.5);
    const auto target = dynamicid::ops::randn<B, float>(ctx, {batch, 4, latent, latent}, 9);
    const std::vector<float> timesteps(static_cast<std::size_t>(batch), 500.0f);

    // Trainable copies of the processor weights (the pipeline's stay untouched).
    training::parameter_gradients<B, float> board;
    std::vector<training::saa_layer_weights<B, float>> layers;
    const auto copy = [&](const tensor& t) {
        if (!t.defined()) return t;
        auto out = tensor::empty(ctx, t.shape());
        B::copy(ctx, dynamicid::const_pointer_t<B, float>(t.data()), out.data(), static_cast<std::size_t>(t.numel()));
        return out;
    };
    const auto lora = [&](const dynamicid::modules::saa::lora_layer<B, float>& l) {
        auto c = l;
        c.down = copy(l.down);
        c.up = copy(l.up);
        return c;
    };
    for (const auto& a : *pipe.models().adapters)
        layers.push_back({a.cross, lora(a.to_q_lora), lora(a.to_k_lora), lora(a.to_v_lora), lora(a.to_out_lora), copy(a.to_k_ip), copy(a.to_v_ip)});
    const training::saa_processors<B, float> procs(std::move(layers), {}, board);
    dynamicid::modules::saa::saa_controls controls;
    controls.id_num = 1;
    const auto hooks = procs.hooks(controls);
    std::vector<tensor> params;
    for (index_t i = 0; i < board.size(); ++i) params.push_back(board.value(i));
    training::adamw<B, float> opt(ctx, {{.params = params, .options = {.lr = 1e-5, .weight_decay = 1e-2}}});

    double seconds = 0.0;
    for (auto _ : state) {
        const auto start = std::chrono::steady_clock::now();
        if (mode == 0) {
            auto eps = unet.forward(ctx, sample, std::span<const float>(timesteps), states, &hooks);
            B::synchronize(ctx);
            benchmark::DoNotOptimize(eps);
        } else {
            board.zero();
            training::tape<B, float> tp(&board);
            const auto x = tp.leaf(sample);
            const auto c = tp.leaf(states);
            const auto eps = unet.forward_train(ctx, tp, x, timesteps, c, &hooks, {.checkpoint_blocks = mode == 2});
            const auto diff = dynamicid::ops::sub(ctx, eps.value, target);
            tp.backward(ctx, eps, dynamicid::ops::scale(ctx, diff, 2.0 / static_cast<double>(diff.numel())));
            std::vector<tensor> grads;
            for (index_t i = 0; i < board.size(); ++i) grads.push_back(board.gradient(i));
            opt.step(ctx, grads);
            B::synchronize(ctx);
        }
        const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
        seconds += elapsed.count();
        state.SetIterationTime(elapsed.count());
    }
    const double per = seconds / static_cast<double>(state.iterations());
    const std::string key = backend_name + "/" + std::to_string(batch);
    if (mode == 0) forward_seconds()[key] = per;
    state.counters["seconds"] = per;
    state.counters["samples_per_s"] = static_cast<double>(batch) / per;
    if (mode != 0 && forward_seconds().count(key)) state.counters["x_forward"] = per / forward_seconds()[key];
    state.counters["trainable_tensors"] = static_cast<double>(board.size());
    state.counters["peak_RSS_MiB"] = peak_rss_mib();
}

void reference_step(benchmark::State& s, int mode) { bm_step<dynamicid::cpu_backend>(s, "reference", mode); }
#if defined(DYNAMICID_BENCH_ONEDNN)
void onednn_step(benchmark::State& s, int mode) { bm_step<dynamicid::onednn_backend>(s, "onednn", mode); }
#endif

}  // namespace

// Forward baselines first; then the least memory-hungry training rows.
#define DYNAMICID_TRAINING_ROWS(fn)                                                                                        \
    BENCHMARK_CAPTURE(fn, forward, 0)->Arg(1)->Arg(2)->Iterations(1)->UseManualTime()->Unit(benchmark::kSecond);           \
    BENCHMARK_CAPTURE(fn, train_step_checkpointed, 2)->Arg(1)->Arg(2)->Iterations(1)->UseManualTime()->Unit(benchmark::kSecond); \
    BENCHMARK_CAPTURE(fn, train_step, 1)->Arg(1)->Arg(2)->Iterations(1)->UseManualTime()->Unit(benchmark::kSecond);

DYNAMICID_TRAINING_ROWS(reference_step)
#if defined(DYNAMICID_BENCH_ONEDNN)
DYNAMICID_TRAINING_ROWS(onednn_step)
#endif

BENCHMARK_MAIN();
