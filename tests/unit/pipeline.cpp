// The SD1.x text-to-image pipeline: an end-to-end check against diffusers'
// StableDiffusionPipeline on the tiny random checkpoint of
// tests/data/tiny_sd (tools/golden/make_tiny_pipeline.py), from both the
// diffusers folder and the original single file; guidance batching, options
// checks, callbacks, cancellation, custom samplers and concurrent calls on
// shared weights.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/pipelines/text_to_image.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <functional>
#include <filesystem>
#include <memory>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace pipelines = dynamicid::pipelines;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using tensor_f = dynamicid::tensor<cpu_backend, float>;
using pipeline = pipelines::text_to_image<cpu_backend>;

const fs::path tiny_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "tiny_sd";
const fs::path folder_path = tiny_dir / "diffusers";
const fs::path single_path = tiny_dir / "single_file.safetensors";
const fs::path reference_path = tiny_dir / "e2e_reference.safetensors";

// One backend thread: the tiny model's ops are too small to split, and
// OpenMP teams only add waiting on a busy machine.
cpu_backend::context test_context() { return cpu_backend::context{.threads = 1}; }

bool tiny_sd_present() { return fs::is_directory(folder_path) && fs::exists(single_path) && fs::exists(reference_path); }

// The reference tensors are small (latents 1x4x16x16, image 32x32).
struct reference {
    dynamicid::io::safetensors_file file;
    nlohmann::json config;

    reference() : file(dynamicid::io::safetensors_file::open(reference_path)) {
        config = nlohmann::json::parse(file.metadata().at("config"));
    }
    std::vector<float> get(const std::string& name) const { return file.to_vector<float>(name); }
    dynamicid::shape dims(const std::string& name) const { return file.info(name).dims; }

    pipeline::options options() const {
        return {.prompts = {config.at("prompt").get<std::string>()},
                .negative_prompts = {config.at("negative_prompt").get<std::string>()},
                .guidance_scale = config.at("guidance_scale").get<double>(),
                .steps = config.at("steps").get<std::size_t>(),
                .seed = 0,
                .width = config.at("width").get<index_t>(),
                .height = config.at("height").get<index_t>(),
                .eta = config.at("eta").get<double>()};
    }
    tensor_f latents(cpu_backend::context& ctx) const {
        return tensor_f::from_host(ctx, dims("input.latents"), std::span<const float>(get("input.latents")));
    }
};

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double m = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    return m;
}

/// Runs the reference's generation and compares each step's latents, the
/// decoded image and the pixels with diffusers' (atol 1e-3).
void check_against_reference(const pipeline& pipe) {
    const reference ref;
    cpu_backend::context ctx = test_context();
    std::vector<std::vector<float>> steps;
    std::vector<double> timesteps;
    pipeline::controls c;
    c.latents = ref.latents(ctx);
    c.on_step = [&](std::size_t i, double t, const tensor_f& x) {
        CHECK(i == steps.size());
        timesteps.push_back(t);
        steps.push_back(x.to_host(ctx));
    };
    const auto out = pipe.generate(ctx, ref.options(), c);

    const auto expected_t = ref.file.to_vector<std::int64_t>("output.timesteps");
    REQUIRE(steps.size() == expected_t.size());
    for (std::size_t i = 0; i < steps.size(); ++i) {
        CHECK(timesteps[i] == static_cast<double>(expected_t[i]));
        const double d = max_abs_diff(steps[i], ref.get("output.latents_step" + std::to_string(i)));
        INFO("step " << i << " max |diff| " << d);
        CHECK(d <= 1e-3);
    }
    // The conditioning (negative row first).
    const auto text = pipe.encode_text(ctx, ref.options(), true).to_host(ctx);
    auto expected_text = ref.get("output.negative_embeds");
    const auto cond = ref.get("output.prompt_embeds");
    expected_text.insert(expected_text.end(), cond.begin(), cond.end());
    CHECK(max_abs_diff(text, expected_text) <= 1e-3);

    const auto decoded = pipe.models().vae.decode(ctx, dynamicid::ops::scale(ctx, out.latents, 1.0 / 0.18215)).to_host(ctx);
    const double d_decoded = max_abs_diff(decoded, ref.get("output.decoded"));
    const double d_image = max_abs_diff(out.pixels, ref.get("output.image"));
    INFO("decoded max |diff| " << d_decoded << ", image max |diff| " << d_image);
    CHECK(d_decoded <= 1e-3);
    CHECK(d_image <= 1e-3);
    REQUIRE(out.count == 1);
    REQUIRE(out.rgb.size() == 32u * 32u * 3u);
    // Bytes are round(255 x) of the pixels, so at most one level from the reference's.
    const auto expected_image = ref.get("output.image");
    int worst = 0;
    for (std::size_t i = 0; i < out.rgb.size(); ++i)
        worst = std::max(worst, std::abs(int(out.rgb[i]) - int(std::nearbyint(expected_image[i] * 255.0f))));
    CHECK(worst <= 1);
}

const pipeline& tiny_pipeline() {
    static const pipeline p = [] {
        cpu_backend::context ctx = test_context();
        return pipeline::load(ctx, folder_path);
    }();
    return p;
}

/// A sampler that is not DDIM to the pipeline: DDIM without set_eta, counting steps.
struct counting_sampler {
    using timestep_type = std::int64_t;
    dynamicid::schedulers::ddim_scheduler inner{dynamicid::schedulers::ddim_config::stable_diffusion_v1()};
    std::shared_ptr<std::atomic<int>> count = std::make_shared<std::atomic<int>>(0);

    void set_timesteps(std::size_t n) { inner.set_timesteps(n); }
    const std::vector<std::int64_t>& timesteps() const { return inner.timesteps(); }
    double init_noise_sigma() const { return inner.init_noise_sigma(); }
    tensor_f scale_model_input(cpu_backend::context& ctx, const tensor_f& x, timestep_type t) const {
        return inner.scale_model_input(ctx, x, t);
    }
    tensor_f step(cpu_backend::context& ctx, const tensor_f& eps, timestep_type t, const tensor_f& x,
                  const dynamicid::schedulers::step_noise<cpu_backend, float>& noise) {
        ++*count;
        return inner.step(ctx, eps, t, x, noise);
    }
};
static_assert(dynamicid::schedulers::sampler<counting_sampler, cpu_backend>);

}  // namespace

TEST_CASE("pipeline: 3 DDIM steps with guidance match diffusers (diffusers folder)", "[pipeline][e2e]") {
    if (!tiny_sd_present()) {
        WARN("tests/data/tiny_sd is missing (tools/golden/make_tiny_pipeline.py writes it); skipped");
        return;
    }
    check_against_reference(tiny_pipeline());
}

TEST_CASE("pipeline: 3 DDIM steps with guidance match diffusers (original single file)", "[pipeline][e2e]") {
    if (!tiny_sd_present()) {
        WARN("tests/data/tiny_sd is missing; skipped");
        return;
    }
    // Head counts and norm groups do not show in tensor shapes: take the
    // configs from the folder, as diffusers' from_single_file(config=...) does.
    cpu_backend::context ctx = test_context();
    const auto pipe = pipeline::load(ctx, single_path, {.config_folder = folder_path});
    check_against_reference(pipe);
}

TEST_CASE("pipeline: batched prompts and images per prompt split guidance correctly", "[pipeline]") {
    if (!tiny_sd_present()) return;
    const reference ref;
    const auto& pipe = tiny_pipeline();
    cpu_backend::context ctx = test_context();
    // Two prompts x two images, every latent the reference's: all four images
    // must equal the reference image (each row's uncond/cond pair is its own).
    auto o = ref.options();
    o.prompts = {o.prompts[0], o.prompts[0]};
    o.images_per_prompt = 2;
    const auto one = ref.get("input.latents");
    std::vector<float> four;
    for (int i = 0; i < 4; ++i) four.insert(four.end(), one.begin(), one.end());
    REQUIRE(pipe.latent_shape(o) == dynamicid::shape({4, 4, 16, 16}));
    pipeline::controls c;
    c.latents = tensor_f::from_host(ctx, pipe.latent_shape(o), std::span<const float>(four));
    const auto out = pipe.generate(ctx, o, c);
    REQUIRE(out.count == 4);
    const auto expected = ref.get("output.image");
    for (index_t i = 0; i < 4; ++i) {
        const std::vector<float> image(out.pixels.begin() + i * 32 * 32 * 3, out.pixels.begin() + (i + 1) * 32 * 32 * 3);
        CHECK(max_abs_diff(image, expected) <= 1e-3);
        CHECK(out.image(i).size() == 32u * 32u * 3u);
    }

    // Seeded noise: different images per row, reproducible per seed.
    auto seeded = ref.options();
    seeded.images_per_prompt = 2;
    seeded.steps = 2;
    seeded.seed = 11;
    const auto a = pipe.generate(ctx, seeded);
    const auto b = pipe.generate(ctx, seeded);
    CHECK(a.rgb == b.rgb);
    CHECK(!std::equal(a.image(0).begin(), a.image(0).end(), a.image(1).begin()));
    seeded.seed = 12;
    CHECK(pipe.generate(ctx, seeded).rgb != a.rgb);
}

TEST_CASE("pipeline: options are checked with pipeline-prefixed messages", "[pipeline]") {
    if (!tiny_sd_present()) return;
    const auto& pipe = tiny_pipeline();
    cpu_backend::context ctx = test_context();
    const auto bad = [&](pipeline::options o, const char* what) {
        try {
            (void)pipe.generate(ctx, o);
            FAIL("no exception for " << what);
        } catch (const dynamicid::value_error& e) {
            INFO(e.what());
            CHECK(std::string(e.what()).rfind("[pipeline] ", 0) == 0);
        }
    };
    const pipeline::options good{.prompts = {"a cat"}, .steps = 1, .width = 32, .height = 32};
    auto o = good;
    o.width = 36;
    bad(o, "width not a multiple of 8");
    o = good;
    o.height = 0;
    bad(o, "height 0");
    o = good;
    o.prompts.clear();
    bad(o, "no prompt");
    o = good;
    o.negative_prompts = {"a", "b"};
    bad(o, "two negatives for one prompt");
    o = good;
    o.images_per_prompt = 0;
    bad(o, "no images");
    o = good;
    o.steps = 0;
    bad(o, "no steps");

    pipeline::controls c;
    c.latents = tensor_f::zeros(ctx, {1, 4, 8, 8});
    CHECK_THROWS_AS(pipe.generate(ctx, good, c), dynamicid::shape_error);
}

TEST_CASE("pipeline: progress, per-step latents and guidance off", "[pipeline]") {
    if (!tiny_sd_present()) return;
    const auto& pipe = tiny_pipeline();
    cpu_backend::context ctx = test_context();
    std::vector<std::pair<std::size_t, std::size_t>> progress;
    std::vector<dynamicid::shape> shapes;
    pipeline::controls c;
    c.on_progress = [&](std::size_t step, std::size_t total) { progress.emplace_back(step, total); };
    c.on_step = [&](std::size_t, double, const tensor_f& x) { shapes.push_back(x.shape()); };
    pipeline::options o{.prompts = {"a red house"}, .guidance_scale = 1.0, .steps = 3, .seed = 5, .width = 32, .height = 32};
    const auto unguided = pipe.generate(ctx, o, c);
    CHECK(progress == std::vector<std::pair<std::size_t, std::size_t>>{{1, 3}, {2, 3}, {3, 3}});
    REQUIRE(shapes.size() == 3);
    CHECK(shapes[0] == dynamicid::shape({1, 4, 16, 16}));
    // guidance_scale <= 1 encodes no negative rows.
    CHECK(pipe.encode_text(ctx, o, false).dim(0) == 1);
    CHECK(pipe.encode_text(ctx, o, true).dim(0) == 2);
    o.guidance_scale = 7.5;
    CHECK(pipe.generate(ctx, o).rgb != unguided.rgb);
}

TEST_CASE("pipeline: caller-given encoder states and attention hooks", "[pipeline]") {
    if (!tiny_sd_present()) return;
    const auto& pipe = tiny_pipeline();
    cpu_backend::context ctx = test_context();
    const pipeline::options o{.prompts = {"a blue car"}, .steps = 2, .seed = 4, .width = 32, .height = 32};
    const auto plain = pipe.generate(ctx, o);
    dynamicid::modules::unet::attention_hooks<cpu_backend, float> hooks;  // no processors: default attention
    pipeline::controls c;
    c.encoder_states = pipe.encode_text(ctx, o, true);
    c.hooks = &hooks;
    const auto given = pipe.generate(ctx, o, c);
    CHECK(given.pixels == plain.pixels);
    CHECK(hooks.step == 1);  // the last step's index
    c.encoder_states = pipe.encode_text(ctx, o, false);  // one row where guidance needs two
    CHECK_THROWS_AS(pipe.generate(ctx, o, c), dynamicid::shape_error);
}

TEST_CASE("pipeline: cancellation stops before the next UNet evaluation", "[pipeline]") {
    if (!tiny_sd_present()) return;
    const auto& pipe = tiny_pipeline();
    cpu_backend::context ctx = test_context();
    const pipeline::options o{.prompts = {"a boat"}, .steps = 5, .width = 32, .height = 32};

    SECTION("an atomic flag raised during a step") {
        std::atomic<bool> cancel{false};
        int steps = 0;
        pipeline::controls c;
        c.cancel = &cancel;
        c.on_step = [&](std::size_t, double, const tensor_f&) {
            ++steps;
            if (steps == 2) cancel = true;
        };
        CHECK_THROWS_AS(pipe.generate(ctx, o, c), dynamicid::cancelled_error);
        CHECK(steps == 2);  // no third UNet evaluation ran
    }
    SECTION("a stop_token requested before the call") {
        std::stop_source source;
        source.request_stop();
        pipeline::controls c;
        c.stop = source.get_token();
        int steps = 0;
        c.on_step = [&](std::size_t, double, const tensor_f&) { ++steps; };
        try {
            (void)pipe.generate(ctx, o, c);
            FAIL("not cancelled");
        } catch (const dynamicid::cancelled_error& e) {
            CHECK(std::string(e.what()).rfind("[pipeline] ", 0) == 0);
        }
        CHECK(steps == 0);
    }
}

TEST_CASE("pipeline: any sampler type runs, eta needs set_eta", "[pipeline]") {
    if (!tiny_sd_present()) return;
    const auto& ddim_pipe = tiny_pipeline();
    cpu_backend::context ctx = test_context();
    counting_sampler sampler;
    const auto counter = sampler.count;
    const pipelines::text_to_image<cpu_backend, float, counting_sampler> pipe(ddim_pipe.models(), sampler);
    pipeline::options o{.prompts = {"a tree"}, .steps = 3, .seed = 9, .width = 32, .height = 32};
    const auto out = pipe.generate(ctx, o);
    CHECK(counter->load() == 3);
    // Same DDIM settings as the checkpoint's, so the same image as the DDIM pipeline.
    CHECK(max_abs_diff(out.pixels, ddim_pipe.generate(ctx, o).pixels) <= 1e-6);
    o.eta = 0.5;
    CHECK_THROWS_AS(pipe.generate(ctx, o), dynamicid::value_error);
    // DDIM with eta > 0 draws its noise from the seed: reproducible, and not the eta = 0 image.
    const auto a = ddim_pipe.generate(ctx, o);
    CHECK(a.rgb == ddim_pipe.generate(ctx, o).rgb);
    CHECK(a.rgb != out.rgb);
}

TEST_CASE("pipeline: two threads generating on shared weights match sequential runs", "[pipeline][threads]") {
    if (!tiny_sd_present()) return;
    const auto& pipe = tiny_pipeline();
    const pipeline::options a{.prompts = {"a mountain lake"}, .steps = 3, .seed = 1, .width = 32, .height = 32};
    const pipeline::options b{.prompts = {"a city street at night"}, .negative_prompts = {"blurry"}, .steps = 3, .seed = 2, .width = 32,
                              .height = 32};
    // One backend thread per context, so both runs reduce in the same order.
    cpu_backend::context seq_ctx{.threads = 1};
    const auto seq_a = pipe.generate(seq_ctx, a);
    const auto seq_b = pipe.generate(seq_ctx, b);

    pipeline::result par_a, par_b;
    std::exception_ptr error_a, error_b;
    {
        const auto run = [&pipe](const pipeline::options& o, pipeline::result& out, std::exception_ptr& error) {
            try {
                cpu_backend::context ctx{.threads = 1};
                out = pipe.generate(ctx, o);
            } catch (...) {
                error = std::current_exception();
            }
        };
        std::jthread ta(run, std::cref(a), std::ref(par_a), std::ref(error_a));
        std::jthread tb(run, std::cref(b), std::ref(par_b), std::ref(error_b));
    }
    if (error_a) std::rethrow_exception(error_a);
    if (error_b) std::rethrow_exception(error_b);
    CHECK(par_a.pixels == seq_a.pixels);
    CHECK(par_b.pixels == seq_b.pixels);
    CHECK(par_a.rgb == seq_a.rgb);
    CHECK(par_b.rgb == seq_b.rgb);
    CHECK(seq_a.rgb != seq_b.rgb);
}

TEST_CASE("step_runner calls the step directly on backends without step graphs", "[pipeline][graph]") {
    STATIC_REQUIRE_FALSE(dynamicid::has_step_graph<cpu_backend>);
    cpu_backend::context ctx;
    dynamicid::step_runner<cpu_backend> runner;
    int calls = 0;
    for (int i = 0; i < 3; ++i) CHECK(runner.run(ctx, 0, [&] { return ++calls; }) == i + 1);
    using tensor_f = dynamicid::tensor<cpu_backend, float>;
    const auto x = tensor_f::full(ctx, {2}, 1.5f);
    const auto twice = runner.run(ctx, 7, [&](const tensor_f& in) { return dynamicid::ops::scale(ctx, in, 2.0); }, x);
    CHECK(twice.to_host(ctx) == std::vector<float>{3.f, 3.f});
    runner.enabled = false;
    CHECK(runner.run(ctx, 0, [&] { return ++calls; }) == 4);
    CHECK_THROWS_AS(runner.run(ctx, 0, []() -> int { throw dynamicid::value_error("test", "from the step"); }), dynamicid::value_error);
}
