// dynamicid benchmarks: the face front end (include/dynamicid/face/) on one
// 512 x 512 photo, on the reference CPU backend and, when built with it, the
// oneDNN backend, with full-size buffalo_l stand-ins.
//
// The four models are loaded once per backend, outside the timed loops (the
// load time is the `load_s` counter). Random weights find no faces, so the
// stages are timed separately as well as together:
//
//   recognition_forward   w600k_r50 on one 112 x 112 crop (the baseline of each backend)
//   detection_forward     det_10g on the 512 x 512 canvas, outputs copied to the host
//   detect                letterbox + detection forward + SCRFD decoding and NMS
//   landmarks_2d106       2d106det on the 192 x 192 crop
//   landmarks_3d68        1k3d68 on the 192 x 192 crop
//   describe              alignment, recognition, both landmark nets and the pose for a given box
//   analyze               detect + describe of the best face, or of a fixed central box
//                         when the detector finds none (the whole per-photo cost)
//
// Every row reports milliseconds per call (wall clock, after one untimed
// call), `x_recognition` (its time over the same backend's recognition
// forward, measured earlier in the same run), and on oneDNN rows
// `speedup_vs_reference` (the reference backend's time for the same row
// over this one) and `rel_diff_vs_reference` (relative L2 distance of the
// network output to the reference backend's).
//
//   python3 tools/bench/make_random_buffalo.py --out /work/buffalo-random
//   OMP_WAIT_POLICY=PASSIVE DYNAMICID_BENCH_FACE_MODELS=/work/buffalo-random build/benchmarks/dynamicid_bench_face
//
// DYNAMICID_BENCH_THREADS sets the backends' thread count (default: all cores).
#include <benchmark/benchmark.h>

#include <dynamicid/backends/cpu.hpp>
#if defined(DYNAMICID_BENCH_ONEDNN)
#include <dynamicid/backends/onednn.hpp>
#endif
#include <dynamicid/face/analyzer.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace face = dynamicid::face;
using dynamicid::index_t;
using clock_type = std::chrono::steady_clock;

int thread_count() {
    const char* t = std::getenv("DYNAMICID_BENCH_THREADS");
    return t && *t ? std::atoi(t) : 0;
}

/// A 512 x 512 photo: smooth colour gradients with a textured square where a face would be.
face::image_u8 synthetic_photo() {
    const index_t n = 512;
    face::image_u8 img{n, n, std::vector<std::uint8_t>(static_cast<std::size_t>(n * n * 3))};
    std::uint32_t seed = 12345;
    for (index_t y = 0; y < n; ++y)
        for (index_t x = 0; x < n; ++x) {
            auto* p = img.pixels.data() + (y * n + x) * 3;
            const bool square = x >= 156 && x < 356 && y >= 136 && y < 376;
            for (int c = 0; c < 3; ++c) {
                seed = seed * 1664525u + 1013904223u;
                const double smooth = c == 0 ? 128 + 100 * std::sin(x / 17.0) : c == 1 ? 128 + 100 * std::cos(y / 13.0) : 128 + 60 * std::sin((x + y) / 23.0);
                p[c] = static_cast<std::uint8_t>(square ? (seed >> 24) : std::lround(smooth));
            }
        }
    return img;
}

/// The box around the textured square, keypoints where the ArcFace template puts them.
face::detection forced_face() {
    face::detection d;
    d.box = {156, 136, 356, 376};
    d.score = 1.0f;
    const auto t = face::arcface_template(112);
    const double sx = 200.0 / 112.0, sy = 240.0 / 112.0;
    for (std::size_t i = 0; i < 5; ++i) {
        d.kps[2 * i] = static_cast<float>(156 + t[i][0] * sx);
        d.kps[2 * i + 1] = static_cast<float>(136 + t[i][1] * sy);
    }
    return d;
}

/// Everything one backend needs, built once.
template <class B>
struct fixture {
    using ftensor = dynamicid::tensor<B, float>;
    typename B::context ctx;
    std::unique_ptr<face::face_analyzer<B>> analyzer;
    std::unique_ptr<face::onnx::executor<B>> det, rec, lmk2, lmk3;
    face::image_u8 photo = synthetic_photo();
    face::detection box = forced_face();
    std::vector<float> canvas, crop112, crop192;
    double load_seconds = 0;

    explicit fixture(const fs::path& dir) : ctx{.threads = thread_count()} {
        const auto t0 = clock_type::now();
        analyzer = std::make_unique<face::face_analyzer<B>>(ctx, face::analyzer_config{.models = dir});
        load_seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
        // The same networks again, to time their forwards alone.
        det = std::make_unique<face::onnx::executor<B>>(ctx, face::onnx::read_model(dir / "det_10g.onnx"));
        rec = std::make_unique<face::onnx::executor<B>>(ctx, face::onnx::read_model(dir / "w600k_r50.onnx"));
        lmk2 = std::make_unique<face::onnx::executor<B>>(ctx, face::onnx::read_model(dir / "2d106det.onnx"));
        lmk3 = std::make_unique<face::onnx::executor<B>>(ctx, face::onnx::read_model(dir / "1k3d68.onnx"));
        // The inputs exactly as the analyzer prepares them.
        canvas = face::to_blob(face::letterbox(photo, {}).canvas, 127.5, 128.0);
        const auto kps = face::keypoints(box);
        crop112 = face::to_blob(face::warp_affine(photo, face::estimate_similarity(kps, face::arcface_template(112)), 112, 112), 127.5, 127.5);
        crop192 = face::to_blob(face::warp_affine(photo, face::landmark_transform(box.box, 192), 192, 192), 127.5, 128.0);
    }

    /// Runs `net` on a (1, 3, size, size) input; returns every output, concatenated, on the host.
    std::vector<float> forward(face::onnx::executor<B>& net, const std::vector<float>& x, index_t size) {
        auto in = ftensor::from_host(ctx, {1, 3, size, size}, std::span<const float>(x));
        std::vector<float> all;
        for (auto& o : net.run(ctx, {in})) {
            const auto h = o.to_host(ctx);
            all.insert(all.end(), h.begin(), h.end());
        }
        return all;
    }
};

template <class B>
fixture<B>* fixture_for(const char* dir) {
    static std::unique_ptr<fixture<B>> f;
    if (!f) f = std::make_unique<fixture<B>>(fs::path(dir));
    return f.get();
}

// Seconds per call and network outputs by "backend/row", for the ratios.
std::map<std::string, double>& seconds_of() {
    static std::map<std::string, double> m;
    return m;
}
std::map<std::string, std::vector<float>>& output_of() {
    static std::map<std::string, std::vector<float>> m;
    return m;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size()) return INFINITY;
    double d = 0, n = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        d += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
        n += static_cast<double>(b[i]) * b[i];
    }
    return std::sqrt(d / std::max(n, 1e-300));
}

enum class stage { recognition_forward, detection_forward, detect, landmarks_2d106, landmarks_3d68, describe, analyze };

template <class B>
void bm_face(benchmark::State& state, const std::string& backend, const std::string& row, stage what) {
    const char* dir = std::getenv("DYNAMICID_BENCH_FACE_MODELS");
    if (!dir || !*dir) {
        state.SkipWithError("set DYNAMICID_BENCH_FACE_MODELS to a buffalo_l folder (tools/bench/make_random_buffalo.py writes random-weight ones)");
        return;
    }
    fixture<B>* f = nullptr;
    try {
        f = fixture_for<B>(dir);
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    std::size_t faces = 0;
    std::vector<float> out;
    const std::function<void()> call = [&] {
        switch (what) {
        case stage::recognition_forward: out = f->forward(*f->rec, f->crop112, 112); break;
        case stage::detection_forward: out = f->forward(*f->det, f->canvas, 512); break;
        case stage::detect: faces = f->analyzer->detect(f->ctx, f->photo).size(); break;
        case stage::landmarks_2d106: out = f->forward(*f->lmk2, f->crop192, 192); break;
        case stage::landmarks_3d68: out = f->forward(*f->lmk3, f->crop192, 192); break;
        case stage::describe: out = f->analyzer->describe(f->ctx, f->photo, f->box).embedding; break;
        case stage::analyze: {
            const auto found = f->analyzer->detect(f->ctx, f->photo);
            faces = found.size();
            out = f->analyzer->describe(f->ctx, f->photo, found.empty() ? f->box : found.front()).embedding;
            break;
        }
        }
    };
    double total = 0;
    try {
        call();  // warm-up: first-touch allocations, oneDNN primitive creation
        for (auto _ : state) {
            const auto t0 = clock_type::now();
            call();
            const double s = std::chrono::duration<double>(clock_type::now() - t0).count();
            state.SetIterationTime(s);
            total += s;
        }
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    const double per = total / static_cast<double>(state.iterations());
    const auto key = backend + "/" + row;
    seconds_of()[key] = per;
    output_of()[key] = out;
    state.counters["load_s"] = f->load_seconds;
    if (const auto base = seconds_of().find(backend + "/recognition_forward"); base != seconds_of().end())
        state.counters["x_recognition"] = per / base->second;
    if (what == stage::detect || what == stage::analyze) state.counters["faces_found"] = static_cast<double>(faces);
    if (backend != "reference") {
        if (const auto ref = seconds_of().find("reference/" + row); ref != seconds_of().end())
            state.counters["speedup_vs_reference"] = ref->second / per;
        if (const auto ref = output_of().find("reference/" + row); ref != output_of().end() && !out.empty())
            state.counters["rel_diff_vs_reference"] = rel_diff(out, ref->second);
    }
}

template <class B>
void register_backend(const std::string& backend) {
    const std::pair<const char*, stage> rows[] = {
        {"recognition_forward", stage::recognition_forward}, {"detection_forward", stage::detection_forward},
        {"detect", stage::detect},                           {"landmarks_2d106", stage::landmarks_2d106},
        {"landmarks_3d68", stage::landmarks_3d68},           {"describe", stage::describe},
        {"analyze", stage::analyze}};
    for (const auto& [row, what] : rows) {
        const std::string name = "face/" + backend + "/" + row;
        benchmark::RegisterBenchmark(name.c_str(), [backend, row = std::string(row), what = what](benchmark::State& s) {
            bm_face<B>(s, backend, row, what);
        })->Iterations(3)->UseManualTime()->Unit(benchmark::kMillisecond);
    }
}

}  // namespace

int main(int argc, char** argv) {
    register_backend<dynamicid::cpu_backend>("reference");
#if defined(DYNAMICID_BENCH_ONEDNN)
    register_backend<dynamicid::onednn_backend>("onednn");
#endif
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
