// The golden conformance cases on the CUDA backend: torch primitives, the
// official DynamicID modules, the diffusers UNet and VAE modules, CLIP and the
// schedulers, each against the reference outputs. The backend computes in f32
// (no f64), so the f64 torch goldens are held to 1e-4 instead of 1e-9.
#include <dynamicid/backends/cuda.cuh>
#include <dynamicid/conform/conform.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace conform = dynamicid::conform;
using dynamicid::cuda_backend;

const fs::path golden_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden";

const conform::registry<cuda_backend>& shared_registry() {
    static const auto r = conform::registry<cuda_backend>::builtin();
    return r;
}

/// Runs every golden of `area` whose module has a handler; returns how many ran.
std::size_t run_area(const std::string& area, const conform::run_options& options = {}) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(golden_dir / area))
        if (e.path().extension() == ".safetensors") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    cuda_backend::context ctx;
    std::size_t ran = 0;
    for (const auto& f : files) {
        const auto g = conform::golden_case::open(f);
        if (!shared_registry().contains(g.module())) continue;
        ++ran;
        const auto results = conform::run_case(ctx, shared_registry(), g, options);
        CHECK_FALSE(results.empty());
        for (const auto& r : results) {
            INFO(f.filename().string() << " (" << g.module() << ") " << r.name << " max_abs=" << r.max_abs << " max_rel=" << r.max_rel
                                       << ' ' << r.note);
            CHECK(r.pass);
        }
    }
    return ran;
}

}  // namespace

TEST_CASE("cuda conform: torch primitive goldens (forward and gradients)", "[conform][cuda]") {
    CHECK(run_area("torch", {.atol = 1e-4, .rtol = 1e-4}) >= 30);
}

TEST_CASE("cuda conform: official DynamicID module goldens", "[conform][cuda]") {
    CHECK(run_area("official", {.atol = 1e-4, .rtol = 1e-4}) >= 10);
}

TEST_CASE("cuda conform: diffusers UNet goldens", "[conform][cuda]") { CHECK(run_area("unet") >= 6); }

TEST_CASE("cuda conform: diffusers VAE goldens", "[conform][cuda]") { CHECK(run_area("vae") >= 4); }

TEST_CASE("cuda conform: CLIP goldens", "[conform][cuda]") { CHECK(run_area("clip") >= 1); }

TEST_CASE("cuda conform: scheduler goldens", "[conform][cuda]") { CHECK(run_area("schedulers") >= 1); }
