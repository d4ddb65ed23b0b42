// The base-model trainer on the tiny SD configuration: a VAE and a UNet from
// torch's default initialisation, a random frozen text encoder written by
// initialize_component, determinism, loss decrease, resume bit-identity, the
// trained UNet loading into the text-to-image pipeline, and bad configs.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/checkpoint.hpp>
#include <dynamicid/pipelines/text_to_image.hpp>
#include <dynamicid/training/base_trainer.hpp>

#include <catch2/catch.hpp>
#include <support/trainer_fixture.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stop_token>
#include <string>
#include <vector>

namespace {

using namespace dynamicid_test::trainers;
using dynamicid::cpu_backend;
using tensor_f = dynamicid::tensor<cpu_backend, float>;

/// The tiny SD folder with only its configs (and, where asked, some weights).
fs::path model_folder(const fs::path& dir, bool vae_weights) {
    const auto root = dir / "model";
    for (const char* c : {"unet", "vae", "text_encoder", "scheduler"}) fs::create_directories(root / c);
    for (const char* c : {"unet", "vae", "text_encoder"}) fs::copy_file(tiny_sd / c / "config.json", root / c / "config.json");
    fs::copy_file(tiny_sd / "scheduler" / "scheduler_config.json", root / "scheduler" / "scheduler_config.json");
    fs::copy_file(tiny_sd / "model_index.json", root / "model_index.json");
    fs::copy(tiny_sd / "tokenizer", root / "tokenizer");
    if (vae_weights)
        fs::copy_file(tiny_sd / "vae" / "diffusion_pytorch_model.safetensors", root / "vae" / "diffusion_pytorch_model.safetensors");
    return root;
}

training::base_trainer_config base_config(const fs::path& model, const fs::path& manifest, const fs::path& out, const std::string& component,
                                          std::int64_t steps) {
    training::base_trainer_config c;
    c.sd_model = model;
    c.manifest = manifest;
    c.output_dir = out;
    c.component = component;
    c.steps = steps;
    c.batch = 3;
    c.lr = 3e-3;
    c.seed = 5;
    c.resolution = 32;
    return c;
}


}  // namespace

TEST_CASE("base trainer: a VAE from scratch is deterministic, its loss falls and it resumes bit-identically", "[training][base]") {
    cpu_backend::context ctx{.threads = 1};
    temp_dir dir("base_vae");
    const auto manifest = write_dataset(dir.path);
    const auto model = model_folder(dir.path, false);
    const std::int64_t steps = 16;
    training::base_trainer<cpu_backend> a(ctx, base_config(model, manifest, dir.path / "a", "vae", steps));
    training::base_trainer<cpu_backend> b(ctx, base_config(model, manifest, dir.path / "b", "vae", steps));
    const auto la = losses_of(ctx, a);
    CHECK(la == losses_of(ctx, b));
    const double first = mean(la, 0, 4), last = mean(la, steps - 4, steps);
    INFO("vae loss: first 4 steps " << first << ", last 4 " << last);
    CHECK(last < 0.5 * first);

    // Stopped after 2 of 4 steps and resumed: the same weights as 4 steps in one go.
    training::base_trainer<cpu_backend> full(ctx, base_config(model, manifest, dir.path / "full", "vae", 4));
    full.run(ctx);
    auto cfg = base_config(model, manifest, dir.path / "split", "vae", 4);
    {
        training::base_trainer<cpu_backend> first_half(ctx, cfg);
        std::stop_source stop;
        first_half.run(ctx, stop.get_token(), [&](const training::train_progress& p) {
            if (p.step == 2) stop.request_stop();
        });
    }
    cfg.resume = "latest";
    training::base_trainer<cpu_backend> second(ctx, cfg);
    CHECK(second.step() == 2);
    second.run(ctx);
    CHECK(host(ctx, second.parameters()) == host(ctx, full.parameters()));

    // The checkpoint is a diffusers vae folder.
    const auto ckpt = dir.path / "full" / "checkpoint-000004" / "vae";
    REQUIRE(fs::exists(ckpt / "config.json"));
    const auto vc = dynamicid::modules::vae::autoencoder_kl_config::from_json(training::detail::read_json_file(ckpt / "config.json"));
    const auto loaded = dynamicid::modules::vae::autoencoder_kl<cpu_backend>::load(
        ctx, dynamicid::modules::weight_source::open({ckpt / "diffusion_pytorch_model.safetensors"}), vc);
    std::vector<tensor_f> lw;
    loaded.for_each_parameter(nullptr, [&](const std::string&, const tensor_f& w, const tensor_f&) { lw.push_back(w); });
    CHECK(host(ctx, lw) == host(ctx, full.parameters()));
}

TEST_CASE("base trainer: a UNet from scratch on a frozen VAE and a random text encoder", "[training][base]") {
    cpu_backend::context ctx{.threads = 1};
    temp_dir dir("base_unet");
    const auto manifest = write_dataset(dir.path);
    const auto model = model_folder(dir.path, true);

    // The frozen text encoder: random weights written once, the same for the same seed.
    CHECK(training::initialize_component<cpu_backend>(ctx, model / "text_encoder", 17));
    CHECK_FALSE(training::initialize_component<cpu_backend>(ctx, model / "text_encoder", 17));  // already there
    const auto other = dir.path / "other" / "text_encoder";
    fs::create_directories(other);
    fs::copy_file(model / "text_encoder" / "config.json", other / "config.json");
    CHECK(training::initialize_component<cpu_backend>(ctx, other, 17));
    CHECK(dynamicid::io::safetensors_file::open(other / "model.safetensors").names() ==
          dynamicid::io::safetensors_file::open(model / "text_encoder" / "model.safetensors").names());
    {
        std::ifstream x(other / "model.safetensors", std::ios::binary), y(model / "text_encoder" / "model.safetensors", std::ios::binary);
        CHECK(std::string(std::istreambuf_iterator<char>(x), {}) == std::string(std::istreambuf_iterator<char>(y), {}));
    }
    CHECK_THROWS_AS(training::initialize_component<cpu_backend>(ctx, dir.path / "missing" / "unet", 1), dynamicid::io_error);

    const std::int64_t steps = 20;
    auto cfg = base_config(model, manifest, dir.path / "out", "unet", steps);
    cfg.lr = 2e-3;
    training::base_trainer<cpu_backend> t(ctx, cfg);
    const auto l = losses_of(ctx, t);
    const double first = mean(l, 0, 6), last = mean(l, steps - 6, steps);
    INFO("unet loss: first 6 steps " << first << ", last 6 " << last);
    CHECK(last < 0.8 * first);

    // The trained UNet, with the folder's VAE and text encoder, is a model the pipeline runs.
    const auto ckpt = dir.path / "out" / "checkpoint-000020";
    fs::copy(ckpt / "unet", model / "unet", fs::copy_options::overwrite_existing | fs::copy_options::recursive);
    namespace pl = dynamicid::pipelines;
    const auto pipe = pl::text_to_image<cpu_backend>::load(ctx, model);
    const auto img = pipe.generate(ctx, {.prompts = {"a photo of person 1"}, .steps = 2, .seed = 1, .width = 32, .height = 32});
    for (const float v : img.pixels) REQUIRE(std::isfinite(v));
    CHECK(img.width == 32);
}

TEST_CASE("base trainer: bad configs are clear errors", "[training][base]") {
    cpu_backend::context ctx{.threads = 1};
    temp_dir dir("base_bad");
    const auto manifest = write_dataset(dir.path);
    const auto model = model_folder(dir.path, false);
    CHECK_THROWS_AS(training::base_trainer_config::from_json(nlohmann::json::parse(R"({"componnet": "vae"})")), dynamicid::value_error);
    auto c = base_config(model, manifest, dir.path / "o", "text_encoder", 1);
    CHECK_THROWS_AS(training::base_trainer<cpu_backend>(ctx, c), dynamicid::value_error);
    c = base_config(model, manifest, dir.path / "o", "vae", 1);
    c.init = "pretrained";  // the folder has no VAE weights
    CHECK_THROWS_AS(training::base_trainer<cpu_backend>(ctx, c), dynamicid::io_error);
    c = base_config(model, manifest, dir.path / "o", "unet", 1);  // the UNet stage needs a trained VAE
    CHECK_THROWS_AS(training::base_trainer<cpu_backend>(ctx, c), dynamicid::io_error);
    c = base_config(model, manifest, dir.path / "o", "vae", 1);
    c.kl_weight = -1;
    CHECK_THROWS_AS(training::base_trainer<cpu_backend>(ctx, c), dynamicid::value_error);
}

TEST_CASE("base trainer: initialize_component writes encoders the loaders read", "[training][base]") {
    cpu_backend::context ctx{.threads = 1};
    temp_dir dir("base_init");
    for (const char* c : {"text_encoder", "image_encoder"}) fs::create_directories(dir.path / c);
    fs::copy_file(tiny_sd / "text_encoder" / "config.json", dir.path / "text_encoder" / "config.json");
    fs::copy_file(tiny_id / "image_encoder" / "config.json", dir.path / "image_encoder" / "config.json");
    REQUIRE(training::initialize_component<cpu_backend>(ctx, dir.path / "text_encoder", 3));
    REQUIRE(training::initialize_component<cpu_backend>(ctx, dir.path / "image_encoder", 3));
    // transformers' key layout, so transformers reads the files too
    CHECK(dynamicid::io::safetensors_file::open(dir.path / "text_encoder" / "model.safetensors").contains("text_model.embeddings.token_embedding.weight"));
    CHECK(dynamicid::io::safetensors_file::open(dir.path / "image_encoder" / "model.safetensors").contains("vision_model.embeddings.class_embedding"));
    const auto tc = dynamicid::modules::clip::text_config::from_json(training::detail::read_json_file(dir.path / "text_encoder" / "config.json"));
    const auto text = dynamicid::modules::clip::text_model<cpu_backend>::load(
        ctx, dynamicid::modules::weight_source::open({dir.path / "text_encoder" / "model.safetensors"}), tc);
    const auto out = text.forward(ctx, dynamicid::text::clip_tokenizer::load_default().encode_batch({"a person"}, 77), 1);
    for (const float v : out.last_hidden_state.to_host(ctx)) REQUIRE(std::isfinite(v));
    const auto vc = dynamicid::modules::clip::vision_config::from_json(training::detail::read_json_file(dir.path / "image_encoder" / "config.json"));
    const auto vision = dynamicid::modules::clip::vision_model<cpu_backend>::load(
        ctx, dynamicid::modules::weight_source::open({dir.path / "image_encoder" / "model.safetensors"}), vc);
    const auto feats = vision.penultimate_hidden_state(ctx, tensor_f::zeros(ctx, {1, vc.num_channels, vc.image_size, vc.image_size}));
    for (const float v : feats.to_host(ctx)) REQUIRE(std::isfinite(v));
}
