// Schedulers: DDIM and the DDPM schedule against diffusers goldens, the
// sampler / noise_schedule concepts, and the example Euler sampler.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/conform/conform.hpp>
#include <dynamicid/schedulers/concepts.hpp>
#include <dynamicid/schedulers/ddim.hpp>
#include <dynamicid/schedulers/ddpm.hpp>

#include "../../examples/samplers/euler_sampler.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace conform = dynamicid::conform;
namespace sch = dynamicid::schedulers;
using dynamicid::cpu_backend;
using tensor_f = dynamicid::tensor<cpu_backend, float>;
using euler = sch::examples::euler_sampler<cpu_backend, float, sch::ddpm_schedule>;

const fs::path golden_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "schedulers";

static_assert(sch::sampler<sch::ddim_scheduler, cpu_backend>);
static_assert(sch::sampler<sch::ddim_scheduler, cpu_backend, double>);
static_assert(sch::noise_schedule<sch::ddim_scheduler, cpu_backend>);
static_assert(sch::noise_schedule<sch::ddpm_schedule, cpu_backend>);
static_assert(sch::sampler<euler, cpu_backend>);
static_assert(!sch::sampler<sch::ddpm_schedule, cpu_backend>);  // a schedule is not a sampler
static_assert(!sch::noise_schedule<euler, cpu_backend>);

std::vector<fs::path> cases(const std::string& prefix) {
    std::vector<fs::path> out;
    for (const auto& e : fs::directory_iterator(golden_dir))
        if (e.path().extension() == ".safetensors" && e.path().filename().string().rfind(prefix, 0) == 0) out.push_back(e.path());
    std::sort(out.begin(), out.end());
    return out;
}

void require_pass(const std::vector<conform::result>& results) {
    REQUIRE_FALSE(results.empty());
    for (const auto& r : results) {
        INFO(r.file << ' ' << r.name << " max_abs=" << r.max_abs << " max_rel=" << r.max_rel << ' ' << r.note);
        CHECK(r.pass);
    }
}

std::vector<float> host(cpu_backend::context& ctx, const tensor_f& t) { return t.to_host(ctx); }

// The Euler example's outputs for an EulerDiscreteScheduler golden.
conform::output_map<cpu_backend> euler_case(cpu_backend::context& ctx, const conform::golden_case& g) {
    sch::examples::euler_config c;
    const auto spacing = g.setting<std::string>("timestep_spacing", "linspace");
    c.spacing = spacing == "leading" ? sch::examples::euler_spacing::leading
                : spacing == "trailing" ? sch::examples::euler_spacing::trailing
                                        : sch::examples::euler_spacing::linspace;
    c.steps_offset = g.setting<std::int64_t>("steps_offset", 0);
    c.v_prediction = g.setting<std::string>("prediction_type", "epsilon") == "v_prediction";
    euler e(sch::ddpm_schedule::from_json(g.config()), c);
    e.set_timesteps(g.setting<std::size_t>("num_inference_steps"));
    auto x = g.load<cpu_backend, float>(ctx, "input.sample");
    const auto outputs = g.load<cpu_backend, float>(ctx, "input.model_outputs");
    std::vector<tensor_f> scaled, samples;
    for (std::size_t i = 0; i < e.timesteps().size(); ++i) {
        const float t = e.timesteps()[i];
        scaled.push_back(e.scale_model_input(ctx, x, t));
        x = e.step(ctx, conform::detail::row(outputs, static_cast<dynamicid::index_t>(i)), t, x);
        samples.push_back(x);
    }
    conform::output_map<cpu_backend> out;
    out.insert_or_assign("timesteps", conform::detail::host_vector<cpu_backend>(ctx, e.timesteps()));
    out.insert_or_assign("sigmas", conform::detail::host_vector<cpu_backend>(ctx, e.sigmas()));
    out.insert_or_assign("init_noise_sigma",
                         conform::detail::host_vector<cpu_backend>(ctx, {static_cast<float>(e.init_noise_sigma())}));
    out.insert_or_assign("scaled_inputs", conform::detail::stack(ctx, scaled));
    out.insert_or_assign("samples", conform::detail::stack(ctx, samples));
    return out;
}

}  // namespace

TEST_CASE("ddim: diffusers goldens", "[schedulers][ddim][golden]") {
    cpu_backend::context ctx;
    const auto registry = conform::registry<cpu_backend>::builtin();
    const auto files = cases("ddim_");
    REQUIRE(files.size() >= 8);
    for (const auto& f : files) {
        INFO(f.filename().string());
        require_pass(conform::run_case(ctx, registry, conform::golden_case::open(f)));
    }
}

TEST_CASE("ddpm: add_noise and velocity goldens", "[schedulers][ddpm][golden]") {
    cpu_backend::context ctx;
    const auto registry = conform::registry<cpu_backend>::builtin();
    const auto files = cases("ddpm_");
    REQUIRE(files.size() >= 2);
    for (const auto& f : files) require_pass(conform::run_case(ctx, registry, conform::golden_case::open(f)));
}

TEST_CASE("euler example sampler: diffusers EulerDiscreteScheduler goldens", "[schedulers][euler][golden]") {
    cpu_backend::context ctx;
    conform::registry<cpu_backend> registry;
    registry.add("EulerDiscreteScheduler", euler_case);
    const auto files = cases("euler_");
    REQUIRE(files.size() >= 3);
    for (const auto& f : files) require_pass(conform::run_case(ctx, registry, conform::golden_case::open(f)));
}

TEST_CASE("ddim: SD1.5 scheduler_config.json and timesteps", "[schedulers][ddim]") {
    // SD1.5 ships a PNDMScheduler config; DDIM takes the keys it knows.
    const auto j = nlohmann::json::parse(R"({"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null})");
    auto ddim = sch::ddim_scheduler::from_json(j);
    ddim.set_timesteps(50);
    REQUIRE(ddim.timesteps().size() == 50);
    CHECK(ddim.timesteps().front() == 981);
    CHECK(ddim.timesteps().back() == 1);
    CHECK(ddim.settings().clip_sample == false);
    CHECK(ddim.alphas_cumprod().size() == 1000);
    CHECK(ddim.alphas_cumprod()[999] == Approx(0.0047).epsilon(0.01));

    auto cfg = sch::ddim_config::stable_diffusion_v1();
    cfg.timestep_spacing = sch::timestep_spacing::trailing;
    sch::ddim_scheduler trailing(cfg);
    trailing.set_timesteps(4);
    CHECK(trailing.timesteps() == std::vector<std::int64_t>{999, 749, 499, 249});

    CHECK_THROWS_AS(ddim.set_timesteps(0), dynamicid::value_error);
    CHECK_THROWS_AS(ddim.set_timesteps(1001), dynamicid::value_error);
    auto thr = sch::ddim_config{};
    thr.thresholding = true;
    CHECK_THROWS_AS(sch::ddim_scheduler(thr), dynamicid::unsupported_error);
    CHECK_THROWS_AS(sch::ddim_scheduler::from_json(nlohmann::json::parse(R"({"beta_schedule": "karras"})")),
                    dynamicid::unsupported_error);
}

TEST_CASE("ddim: eta > 0 noise from a tensor or a Philox seed", "[schedulers][ddim]") {
    cpu_backend::context ctx;
    auto cfg = sch::ddim_config::stable_diffusion_v1();
    cfg.eta = 0.5;
    sch::ddim_scheduler ddim(cfg);
    ddim.set_timesteps(10);
    const auto x = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 4, 4, 4}, 1);
    const auto eps = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 4, 4, 4}, 2);
    const auto t = ddim.timesteps()[0];
    CHECK_THROWS_AS(ddim.step(ctx, eps, t, x), dynamicid::value_error);  // noise needed, none given
    const auto z = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 4, 4, 4}, 9, 64);
    const auto a = host(ctx, ddim.step(ctx, eps, t, x, sch::step_noise<cpu_backend>::from(z)));
    const auto b = host(ctx, ddim.step(ctx, eps, t, x, sch::step_noise<cpu_backend>::from_seed(9, 64)));
    CHECK(a == b);
    const auto wrong = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 4, 4, 3}, 9);
    CHECK_THROWS_AS(ddim.step(ctx, eps, t, x, sch::step_noise<cpu_backend>::from(wrong)), dynamicid::shape_error);
}

TEST_CASE("schedulers: denoise() drives any sampler", "[schedulers]") {
    cpu_backend::context ctx;
    const auto noise = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 2, 3, 3}, 5);
    // A model that predicts zero noise: DDIM then shrinks x by sqrt(abar) ratios only.
    const auto zero_model = [&](const tensor_f& x, auto) { return tensor_f::zeros(ctx, x.shape()); };
    sch::ddim_scheduler ddim(sch::ddim_config::stable_diffusion_v1());
    const auto out = sch::denoise(ctx, ddim, noise, 5, zero_model);
    CHECK(out.shape() == noise.shape());

    sch::ddpm_schedule train({.beta_schedule = sch::beta_schedule::scaled_linear, .beta_start = 0.00085, .beta_end = 0.012});
    euler e(train, {});
    const auto out2 = sch::denoise(ctx, e, noise, 5, zero_model);
    // Zero predicted noise: every Euler step leaves x unchanged, after the initial sigma scaling.
    const auto h = host(ctx, out2), n = host(ctx, noise);
    for (std::size_t i = 0; i < h.size(); ++i) CHECK(h[i] == Approx(n[i] * e.init_noise_sigma()).epsilon(1e-5));
}

TEST_CASE("ddpm: training timesteps and shape checks", "[schedulers][ddpm]") {
    cpu_backend::context ctx;
    const sch::ddpm_schedule s;
    const auto t = s.sample_training_timesteps(256, 3);
    CHECK(std::all_of(t.begin(), t.end(), [](std::int64_t v) { return v >= 0 && v < 1000; }));
    CHECK(std::adjacent_find(t.begin(), t.end(), std::not_equal_to<>()) != t.end());
    CHECK(s.sample_training_timesteps(4, 3) == s.sample_training_timesteps(4, 3));
    const auto x = tensor_f::zeros(ctx, {2, 3});
    const std::vector<std::int64_t> one{5};
    CHECK_THROWS_AS(s.add_noise(ctx, x, x, std::span<const std::int64_t>(one)), dynamicid::shape_error);
    const std::vector<std::int64_t> bad{5, 1000};
    CHECK_THROWS_AS(s.add_noise(ctx, x, x, std::span<const std::int64_t>(bad)), dynamicid::value_error);
}
