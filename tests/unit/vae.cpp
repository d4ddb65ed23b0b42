// The VAE (diffusers AutoencoderKL): diffusers goldens for encode and decode,
// the config reader (incl. SD1.5's vae/config.json), sampling from the latent
// distribution, partial binding and weight-binding errors.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/conform/conform.hpp>
#include <dynamicid/modules/vae/autoencoder_kl.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace conform = dynamicid::conform;
namespace vae = dynamicid::modules::vae;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using tensor_f = dynamicid::tensor<cpu_backend, float>;

const fs::path vae_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "vae";

conform::golden_case open_case(const std::string& name) { return conform::golden_case::open(vae_dir / (name + ".safetensors")); }

vae::autoencoder_kl<cpu_backend> bind_case(cpu_backend::context& ctx, const conform::golden_case& g, vae::vae_parts parts) {
    auto bind = conform::detail::param_binder<cpu_backend, float>(ctx, g);
    auto model = vae::autoencoder_kl<cpu_backend>::bind(bind, vae::autoencoder_kl_config::from_json(g.config()), parts);
    bind.finish();
    return model;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
    REQUIRE(a.size() == b.size());
    double m = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
    return m;
}

// SD1.5's vae/config.json (runwayml/stable-diffusion-v1-5), as diffusers writes it.
constexpr const char* sd15_vae_config = R"({
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "scaling_factor": 0.18215,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
})";

}  // namespace

TEST_CASE("vae: every diffusers golden passes at atol = rtol = 1e-4", "[vae][conform]") {
    cpu_backend::context ctx{.threads = 2};
    const auto registry = conform::registry<cpu_backend>::builtin();
    REQUIRE(registry.contains("AutoencoderKL.encode"));
    REQUIRE(registry.contains("AutoencoderKL.decode"));
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(vae_dir))
        if (e.path().extension() == ".safetensors") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    REQUIRE(files.size() >= 4);
    for (const auto& f : files) {
        const auto g = conform::golden_case::open(f);
        const auto results = conform::run_case(ctx, registry, g);
        CHECK(results.size() == (g.module() == "AutoencoderKL.encode" ? 2u : 1u));
        for (const auto& r : results) {
            INFO(r.file << ' ' << r.name << " max_abs=" << r.max_abs << " max_rel=" << r.max_rel << ' ' << r.note);
            CHECK(r.atol == 1e-4);
            CHECK(r.pass);
        }
    }
}

TEST_CASE("vae: encode and decode through the module API match diffusers", "[vae]") {
    cpu_backend::context ctx{.threads = 2};
    {
        const auto g = open_case("vae_2level_encode");
        const auto model = bind_case(ctx, g, vae::vae_parts::encoder);
        CHECK(model.has_encoder());
        CHECK_FALSE(model.has_decoder());
        CHECK(model.settings().downscale_factor() == 2);
        const auto dist = model.encode(ctx, g.load<cpu_backend, float>(ctx, "input.image"));
        CHECK(dist.mean.shape() == dynamicid::shape{2, 4, 16, 16});
        CHECK(max_abs_diff(dist.mean.to_host(ctx), g.values("output.mean")) <= 1e-4);
        CHECK(max_abs_diff(dist.logvar.to_host(ctx), g.values("output.logvar")) <= 1e-4);
        CHECK_THROWS_AS(model.decode(ctx, dist.mean), dynamicid::value_error);
    }
    {
        const auto g = open_case("vae_3level_decode");
        const auto model = bind_case(ctx, g, vae::vae_parts::decoder);
        CHECK(model.settings().downscale_factor() == 4);
        const auto latents = g.load<cpu_backend, float>(ctx, "input.latents");
        const auto image = model.decode(ctx, latents);
        CHECK(image.shape() == dynamicid::shape{1, 3, 24, 32});
        CHECK(max_abs_diff(image.to_host(ctx), g.values("output.decoded")) <= 1e-4);
        CHECK_THROWS_AS(model.encode(ctx, image), dynamicid::value_error);
        // Wrong channel count is caught at the module boundary.
        CHECK_THROWS_AS(model.decode(ctx, tensor_f::zeros(ctx, {1, 3, 6, 8})), dynamicid::shape_error);
    }
}

TEST_CASE("vae: the encoder's downsampler pads one side only (odd sizes)", "[vae]") {
    cpu_backend::context ctx{.threads = 2};
    const auto g = open_case("vae_noattn_encode");
    const auto model = bind_case(ctx, g, vae::vae_parts::encoder);
    CHECK_FALSE(model.settings().use_quant_conv);
    CHECK_FALSE(model.settings().mid_block_add_attention);
    // 19 x 26 -> floor((19 - 2) / 2) + 1 = 9 x 13; a symmetric pad of 1 would give 10 x 13.
    const auto dist = model.encode(ctx, g.load<cpu_backend, float>(ctx, "input.image"));
    CHECK(dist.mean.shape() == dynamicid::shape{1, 4, 9, 13});
    CHECK(max_abs_diff(dist.mean.to_host(ctx), g.values("output.mean")) <= 1e-4);
}

TEST_CASE("vae: SD1.5's vae/config.json parses", "[vae][config]") {
    const auto c = vae::autoencoder_kl_config::from_json(nlohmann::json::parse(sd15_vae_config));
    CHECK(c.block_out_channels == std::vector<index_t>{128, 256, 512, 512});
    CHECK(c.layers_per_block == 2);
    CHECK(c.latent_channels == 4);
    CHECK(c.norm_num_groups == 32);
    CHECK(c.sample_size == 512);
    CHECK(c.scaling_factor == 0.18215);
    CHECK(c.in_channels == 3);
    CHECK(c.out_channels == 3);
    CHECK(c.use_quant_conv);
    CHECK(c.use_post_quant_conv);
    CHECK(c.mid_block_add_attention);
    CHECK_FALSE(c.shift_factor);
    CHECK(c.downscale_factor() == 8);
    // The aggregate's defaults are SD1.5's VAE.
    const vae::autoencoder_kl_config defaults{};
    CHECK(defaults.block_out_channels == c.block_out_channels);
    CHECK(defaults.layers_per_block == c.layers_per_block);
    CHECK(defaults.scaling_factor == c.scaling_factor);
}

TEST_CASE("vae: the config reader uses diffusers' defaults and reports every problem at once", "[vae][config]") {
    const auto d = vae::autoencoder_kl_config::from_json(nlohmann::json::object());
    CHECK(d.block_out_channels == std::vector<index_t>{64});
    CHECK(d.layers_per_block == 1);
    CHECK(d.sample_size == 32);

    const auto shifted = vae::autoencoder_kl_config::from_json(
        nlohmann::json{{"shift_factor", 0.0609}, {"scaling_factor", 1.5305}, {"sample_size", {64, 96}}, {"force_upcast", false}});
    REQUIRE(shifted.shift_factor);
    CHECK(*shifted.shift_factor == 0.0609);
    CHECK(shifted.sample_size == 64);

    nlohmann::json bad = nlohmann::json::parse(sd15_vae_config);
    bad["act_fn"] = "gelu";
    bad["down_block_types"] = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"};
    bad["up_block_types"] = {"UpDecoderBlock2D"};
    bad["layers_per_block"] = {2, 2};
    try {
        (void)vae::autoencoder_kl_config::from_json(bad);
        FAIL("expected value_error");
    } catch (const dynamicid::value_error& e) {
        const std::string what = e.what();
        CHECK(what.find("4 unsupported config settings") != std::string::npos);
        CHECK(what.find("act_fn") != std::string::npos);
        CHECK(what.find("down_block_types") != std::string::npos);
        CHECK(what.find("up_block_types") != std::string::npos);
        CHECK(what.find("layers_per_block") != std::string::npos);
    }
    CHECK_THROWS_AS(vae::autoencoder_kl_config::from_json(nlohmann::json{{"_class_name", "AutoencoderTiny"}}), dynamicid::value_error);
    CHECK_THROWS_AS(vae::autoencoder_kl_config::from_json(nlohmann::json{{"norm_num_groups", 48}}), dynamicid::value_error);
}

TEST_CASE("vae: sample is mean + exp(logvar / 2) * Philox noise", "[vae]") {
    cpu_backend::context ctx{.threads = 1};
    const dynamicid::shape s{1, 4, 3, 5};
    std::vector<float> mean_v(static_cast<std::size_t>(s.numel())), logvar_v(mean_v.size());
    for (std::size_t i = 0; i < mean_v.size(); ++i) {
        mean_v[i] = 0.1f * static_cast<float>(i) - 2.0f;
        logvar_v[i] = -3.0f + 0.1f * static_cast<float>(i);
    }
    const auto mean = tensor_f::from_host(ctx, s, mean_v);
    const auto logvar = tensor_f::from_host(ctx, s, logvar_v);
    const auto z = vae::autoencoder_kl<cpu_backend>::sample(ctx, {mean, logvar}, 7, 3).to_host(ctx);
    const auto noise = dynamicid::ops::randn<cpu_backend, float>(ctx, s, 7, 3).to_host(ctx);
    for (std::size_t i = 0; i < z.size(); ++i)
        CHECK(z[i] == Approx(mean_v[i] + std::exp(0.5 * logvar_v[i]) * noise[i]).epsilon(1e-6).margin(1e-6));
    // Deterministic for a seed, different for another.
    CHECK(vae::autoencoder_kl<cpu_backend>::sample(ctx, mean, logvar, 7, 3).to_host(ctx) == z);
    CHECK(vae::autoencoder_kl<cpu_backend>::sample(ctx, mean, logvar, 8, 3).to_host(ctx) != z);
    CHECK_THROWS_AS(vae::autoencoder_kl<cpu_backend>::sample(ctx, mean, tensor_f::zeros(ctx, {1, 4, 3, 4}), 7),
                    dynamicid::shape_error);
}

TEST_CASE("vae: encode clamps logvar to the range -30 to 20", "[vae]") {
    // The golden encoder with quant_conv's logvar biases pushed far out of
    // range: an in-memory file listed first overrides those two tensors.
    cpu_backend::context ctx{.threads = 2};
    const auto g = open_case("vae_2level_encode");
    auto bias = g.file().to_vector<float>("param.quant_conv.bias");
    REQUIRE(bias.size() == 8);
    bias[4] = bias[5] = 1000.f;  // logvar channels 0, 1 -> 20
    bias[6] = bias[7] = -1000.f;  // logvar channels 2, 3 -> -30
    dynamicid::io::safetensors_writer w;
    w.add("param.quant_conv.bias", {8}, bias);
    const auto bytes = w.to_bytes();
    const auto overrides = std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(bytes));
    const std::shared_ptr<const dynamicid::io::safetensors_file> golden(std::shared_ptr<void>{}, &g.file());
    dynamicid::modules::weight_binder<cpu_backend, float> bind(ctx, dynamicid::modules::weight_source({overrides, golden}), "param.");
    const auto model = vae::autoencoder_kl<cpu_backend>::bind(bind, vae::autoencoder_kl_config::from_json(g.config()), vae::vae_parts::encoder);
    bind.finish();
    const auto dist = model.encode(ctx, g.load<cpu_backend, float>(ctx, "input.image"));
    CHECK(max_abs_diff(dist.mean.to_host(ctx), g.values("output.mean")) <= 1e-4);
    const auto logvar = dist.logvar.to_host(ctx);
    const std::size_t plane = 16 * 16;
    for (std::size_t i = 0; i < logvar.size(); ++i) {
        const std::size_t channel = (i / plane) % 4;
        CHECK(logvar[i] == (channel < 2 ? 20.f : -30.f));
    }
}

TEST_CASE("vae: binding reports every missing tensor at once", "[vae][weights]") {
    cpu_backend::context ctx{.threads = 1};
    const auto g = open_case("vae_2level_encode");  // holds encoder.* and quant_conv.* only
    auto bind = conform::detail::param_binder<cpu_backend, float>(ctx, g);
    (void)vae::autoencoder_kl<cpu_backend>::bind(bind, vae::autoencoder_kl_config::from_json(g.config()), vae::vae_parts::both);
    try {
        bind.finish();
        FAIL("expected io_error");
    } catch (const dynamicid::io_error& e) {
        const std::string what = e.what();
        CHECK(what.find("missing 'param.post_quant_conv.weight'") != std::string::npos);
        CHECK(what.find("missing 'param.decoder.conv_in.weight'") != std::string::npos);
        CHECK(what.find("missing 'param.decoder.up_blocks.1.resnets.1.conv2.bias'") != std::string::npos);
        CHECK(what.find("missing 'param.decoder.mid_block.attentions.0.to_q.weight'") != std::string::npos);
        CHECK(what.find("encoder.") == std::string::npos);
    }
    // A config that disagrees with the stored shapes is reported, not crashed on.
    auto c = vae::autoencoder_kl_config::from_json(g.config());
    c.latent_channels = 8;
    auto bind2 = conform::detail::param_binder<cpu_backend, float>(ctx, g);
    (void)vae::autoencoder_kl<cpu_backend>::bind(bind2, c, vae::vae_parts::encoder);
    CHECK(bind2.problems().size() == 4);  // encoder.conv_out and quant_conv, weight and bias each
    CHECK_THROWS_AS(bind2.finish(), dynamicid::io_error);
}
