// dynamicid benchmarks: one two-identity DynamicID generation on the full
// Stable Diffusion 1.5 configuration against a plain text-to-image generation
// of the same size, steps and guidance (the baseline, measured in the same
// run), on the CPU backends, with peak memory.
//
// The models are full-size random-weight files in the real formats (a diffusers
// folder, a CLIP-ViT-H/14 folder, an SAA file), written by
// tools/bench/make_random_sd15.py, so loading goes through the same readers as
// a real checkpoint:
//
//   python3 tools/bench/make_random_sd15.py --out /tmp/sd15-random
//   DYNAMICID_BENCH_MODELS=/tmp/sd15-random dynamicid_bench_dynamicid
//   DYNAMICID_BENCH_STEPS=50 DYNAMICID_BENCH_MODELS=... dynamicid_bench_dynamicid --benchmark_filter=onednn
//
// Each row: seconds for the whole generation (text encoding, identity tokens
// through the CLIP-H tower and the projection, the denoising loop with
// guidance, VAE decoding), seconds per step, the ratio to the text-to-image
// baseline of the same backend, the resident memory after loading
// (weights_RSS_MiB) and the process's peak so far (peak_RSS_MiB). 256 x 256,
// 10 steps by default (DYNAMICID_BENCH_STEPS). Run with OMP_WAIT_POLICY=PASSIVE
// on a shared machine.
#include <benchmark/benchmark.h>

#include <dynamicid/backends/cpu.hpp>
#if __has_include(<dynamicid/backends/onednn.hpp>) && defined(DYNAMICID_BENCH_ONEDNN)
#include <dynamicid/backends/onednn.hpp>
#endif
#include <dynamicid/modules/clip/image_file.hpp>
#include <dynamicid/pipelines/dynamicid.hpp>

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace pl = dynamicid::pipelines;

double peak_rss_mib() {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<double>(usage.ru_maxrss) / 1024.0;  // KiB on Linux
}

double current_rss_mib() {
    std::ifstream statm("/proc/self/statm");
    long pages = 0, resident = 0;
    statm >> pages >> resident;
    return static_cast<double>(resident) * static_cast<double>(::sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

std::optional<fs::path> models_dir() {
    const char* dir = std::getenv("DYNAMICID_BENCH_MODELS");
    if (!dir || !*dir) return std::nullopt;
    return fs::path(dir);
}

std::size_t steps() {
    const char* s = std::getenv("DYNAMICID_BENCH_STEPS");
    return s && *s ? static_cast<std::size_t>(std::strtoul(s, nullptr, 10)) : 10;
}

/// Seconds of the baseline per (backend, size), for the ratios.
std::map<std::string, double>& baselines() {
    static std::map<std::string, double> b;
    return b;
}

template <class B>
struct loaded {
    std::optional<pl::dynamicid_pipeline<B>> pipe;
    double weights_rss = 0.0;
};

template <class B>
loaded<B>& pipeline_for(typename B::context& ctx, const fs::path& dir) {
    static loaded<B> l;
    if (!l.pipe) {
        l.pipe = pl::dynamicid_pipeline<B>::load(
            ctx, {.sd_model = dir / "sd15", .saa_checkpoint = dir / "SAA.safetensors", .image_encoder = dir / "image_encoder"});
        l.weights_rss = current_rss_mib();
    }
    return l;
}

template <class B>
void bm_generate(benchmark::State& state, std::string backend_name, bool with_ids) {
    const auto dir = models_dir();
    if (!dir) {
        state.SkipWithError("set DYNAMICID_BENCH_MODELS (tools/bench/make_random_sd15.py writes the files)");
        return;
    }
    const auto size = static_cast<dynamicid::index_t>(state.range(0));
    typename B::context ctx;
    auto& l = pipeline_for<B>(ctx, *dir);
    const auto& pipe = *l.pipe;
    const std::size_t n = steps();
    const std::string prompt = "two people talking in a park, photo";

    std::vector<pl::dynamicid_identity> ids(2);
    for (int i = 0; i < 2; ++i) {
        ids[static_cast<std::size_t>(i)].arcface = pl::load_arcface(*dir / ("id" + std::to_string(i) + ".safetensors"));
        ids[static_cast<std::size_t>(i)].reference = dynamicid::modules::clip::load_image(*dir / ("id" + std::to_string(i) + ".png"));
    }
    ids[0].box = dynamicid::modules::saa::box{0.0, 0.0, 1.0, 0.5};
    ids[1].box = dynamicid::modules::saa::box{0.0, 0.5, 1.0, 1.0};

    double seconds = 0.0;
    for (auto _ : state) {
        const auto start = std::chrono::steady_clock::now();
        if (with_ids) {
            auto out = pipe.generate(ctx, {.prompt = prompt, .steps = n, .seed = 1, .width = size, .height = size, .infer_scale = 2.0}, ids);
            benchmark::DoNotOptimize(out.rgb.data());
        } else {
            auto out = pipe.sd().generate(
                ctx, {.prompts = {prompt}, .guidance_scale = 5.0, .steps = n, .seed = 1, .width = size, .height = size});
            benchmark::DoNotOptimize(out.rgb.data());
        }
        const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
        seconds += elapsed.count();
        state.SetIterationTime(elapsed.count());
    }
    const double per = seconds / static_cast<double>(state.iterations());
    const std::string key = backend_name + "/" + std::to_string(size);
    if (!with_ids) baselines()[key] = per;
    state.counters["seconds"] = per;
    state.counters["seconds_per_step"] = per / static_cast<double>(n);
    state.counters["steps"] = static_cast<double>(n);
    if (with_ids && baselines().count(key)) state.counters["x_text_to_image"] = per / baselines()[key];
    state.counters["weights_RSS_MiB"] = l.weights_rss;
    state.counters["peak_RSS_MiB"] = peak_rss_mib();
}

void bm_reference(benchmark::State& state, bool with_ids) { bm_generate<dynamicid::cpu_backend>(state, "reference", with_ids); }
#if defined(DYNAMICID_BENCH_ONEDNN)
void bm_onednn(benchmark::State& state, bool with_ids) { bm_generate<dynamicid::onednn_backend>(state, "onednn", with_ids); }
#endif

}  // namespace

// The baseline of each backend runs right before its DynamicID row.
BENCHMARK_CAPTURE(bm_reference, text_to_image, false)->Arg(256)->Iterations(1)->UseManualTime()->Unit(benchmark::kSecond);
BENCHMARK_CAPTURE(bm_reference, dynamicid_two_ids, true)->Arg(256)->Iterations(1)->UseManualTime()->Unit(benchmark::kSecond);
#if defined(DYNAMICID_BENCH_ONEDNN)
BENCHMARK_CAPTURE(bm_onednn, text_to_image, false)->Arg(256)->Iterations(1)->UseManualTime()->Unit(benchmark::kSecond);
BENCHMARK_CAPTURE(bm_onednn, dynamicid_two_ids, true)->Arg(256)->Iterations(1)->UseManualTime()->Unit(benchmark::kSecond);
#endif

BENCHMARK_MAIN();
