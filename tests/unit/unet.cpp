// The UNet modules: diffusers goldens (UNet2DConditionModel, ResnetBlock2D,
// Transformer2DModel), the attention-processor order and hooks, the config
// reader, and weight binding errors.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/conform/conform.hpp>
#include <dynamicid/modules/blocks/attention.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>

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
namespace unet = dynamicid::modules::unet;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using tensor_f = dynamicid::tensor<cpu_backend, float>;

const fs::path unet_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "unet";

conform::golden_case open_case(const std::string& name) { return conform::golden_case::open(unet_dir / (name + ".safetensors")); }

struct loaded_unet {
    conform::golden_case golden;
    unet::unet_2d_condition<cpu_backend> model;
    tensor_f sample, text;
    std::vector<float> timesteps;
};

loaded_unet load_unet(cpu_backend::context& ctx, const std::string& name) {
    auto g = open_case(name);
    auto bind = conform::detail::param_binder<cpu_backend, float>(ctx, g);
    auto model = unet::unet_2d_condition<cpu_backend>::bind(bind, unet::unet_config::from_json(g.config()));
    bind.finish();
    auto sample = g.load<cpu_backend, float>(ctx, "input.sample");
    auto text = g.load<cpu_backend, float>(ctx, "input.encoder_hidden_states");
    const auto t = g.values("input.timestep");
    return {std::move(g), std::move(model), sample, text, std::vector<float>(t.begin(), t.end())};
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double m = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
    return m;
}

}  // namespace

TEST_CASE("unet: every diffusers golden passes at atol = rtol = 1e-4", "[unet][conform]") {
    cpu_backend::context ctx{.threads = 2};
    const auto registry = conform::registry<cpu_backend>::builtin();
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(unet_dir))
        if (e.path().extension() == ".safetensors") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    REQUIRE(files.size() >= 6);
    for (const auto& f : files) {
        const auto g = conform::golden_case::open(f);
        for (const auto& r : conform::run_case(ctx, registry, g)) {
            INFO(r.file << ' ' << r.name << " max_abs=" << r.max_abs << " max_rel=" << r.max_rel << ' ' << r.note);
            CHECK(r.atol == 1e-4);
            CHECK(r.pass);
        }
    }
}

TEST_CASE("unet: attention layers follow diffusers' attn_processors order (down, up, mid)", "[unet]") {
    cpu_backend::context ctx{.threads = 2};
    for (const char* name : {"unet_tiny_2level", "unet_tiny_3level"}) {
        const auto u = load_unet(ctx, name);
        const auto expected = u.golden.config()["attn_processors"].get<std::vector<std::string>>();
        INFO(name);
        CHECK(u.model.attention_layer_names() == expected);
    }
    // Pinned for the two-level case: the mid block comes last.
    const auto u = load_unet(ctx, "unet_tiny_2level");
    CHECK(u.model.attention_layer_names() ==
          std::vector<std::string>{"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
                                   "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
                                   "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor",
                                   "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
                                   "up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor",
                                   "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
                                   "mid_block.attentions.0.transformer_blocks.0.attn1.processor",
                                   "mid_block.attentions.0.transformer_blocks.0.attn2.processor"});
}

TEST_CASE("unet: attention processors see every layer once, with its index, name, grid and step", "[unet]") {
    cpu_backend::context ctx{.threads = 2};
    const auto u = load_unet(ctx, "unet_tiny_2level");
    const auto& names = u.model.attention_layer_names();
    const auto plain = u.model.forward(ctx, u.sample, u.timesteps, u.text).to_host(ctx);

    struct seen {
        index_t layer, height, width;
        std::string name;
        std::int64_t step;
        bool cross;
    };
    auto log = std::make_shared<std::vector<seen>>();
    unet::attention_hooks<cpu_backend, float> hooks;
    hooks.step = 7;
    for (std::size_t i = 0; i < names.size(); ++i)
        hooks.processors.push_back([log](cpu_backend::context& c, const dynamicid::modules::blocks::attention_call<cpu_backend, float>& call) {
            log->push_back({call.layer, call.height, call.width, std::string(call.name), call.step, call.context != nullptr});
            return call.attn.forward(c, call.hidden_states, call.context);
        });
    const auto hooked = u.model.forward(ctx, u.sample, u.timesteps, u.text, &hooks).to_host(ctx);
    CHECK(max_abs_diff(plain, hooked) == 0.0);

    REQUIRE(log->size() == names.size());
    std::vector<index_t> layers;
    for (const auto& s : *log) {
        layers.push_back(s.layer);
        CHECK(s.name == names[static_cast<std::size_t>(s.layer)]);
        CHECK(s.step == 7);
        CHECK(s.cross == (s.name.find("attn2") != std::string::npos));
        // 16x16 latents: level 0 runs at 16x16, the mid block at 8x8.
        const index_t side = s.name.rfind("mid_block", 0) == 0 ? 8 : 16;
        CHECK(s.height == side);
        CHECK(s.width == side);
    }
    // Forward order: down, mid, up; indices are in processor order (down, up, mid).
    CHECK(layers == std::vector<index_t>{0, 1, 6, 7, 2, 3, 4, 5});

    // A processor that changes one layer changes the output; a missing entry keeps the default.
    unet::attention_hooks<cpu_backend, float> one;
    one.processors.resize(3);
    one.processors[2] = [](cpu_backend::context& c, const dynamicid::modules::blocks::attention_call<cpu_backend, float>& call) {
        return tensor_f::zeros(c, call.hidden_states.shape());
    };
    const auto changed = u.model.forward(ctx, u.sample, u.timesteps, u.text, &one).to_host(ctx);
    CHECK(max_abs_diff(plain, changed) > 1e-3);

    // A processor must return the layer's shape.
    one.processors[2] = [](cpu_backend::context& c, const dynamicid::modules::blocks::attention_call<cpu_backend, float>&) {
        return tensor_f::zeros(c, {1, 2, 3});
    };
    CHECK_THROWS_AS(u.model.forward(ctx, u.sample, u.timesteps, u.text, &one), dynamicid::shape_error);
}

TEST_CASE("unet: a (B,) timestep tensor gives the same result as host timesteps", "[unet]") {
    cpu_backend::context ctx{.threads = 2};
    const auto u = load_unet(ctx, "unet_tiny_2level");
    const auto t = tensor_f::from_host(ctx, {2}, std::span<const float>(u.timesteps));
    CHECK(max_abs_diff(u.model.forward(ctx, u.sample, u.timesteps, u.text).to_host(ctx),
                       u.model.forward(ctx, u.sample, t, u.text).to_host(ctx)) == 0.0);
    CHECK_THROWS_AS(u.model.forward(ctx, u.sample, std::vector<float>{1.0f}, u.text), dynamicid::shape_error);
    const auto odd = tensor_f::zeros(ctx, {2, 4, 15, 16});
    CHECK_THROWS_AS(u.model.forward(ctx, odd, u.timesteps, u.text), dynamicid::shape_error);
}

TEST_CASE("unet: config.json of SD1.5 reads as the defaults", "[unet]") {
    const auto j = nlohmann::json::parse(R"({
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]})");
    const auto c = unet::unet_config::from_json(j);
    const unet::unet_config d;
    CHECK(c.block_out_channels == d.block_out_channels);
    CHECK(c.attention_head_dim == std::vector<index_t>{8, 8, 8, 8});
    CHECK(c.layers_per_block == std::vector<index_t>{2, 2, 2, 2});
    CHECK(c.cross_attention_dim == 768);
    CHECK(c.flip_sin_to_cos);
    CHECK(c.freq_shift == 0.0);
    CHECK(c.down_block_types == d.down_block_types);
    CHECK(c.up_block_types == d.up_block_types);
    CHECK_FALSE(c.use_linear_projection);
}

TEST_CASE("unet: unsupported config settings are all named in one error", "[unet]") {
    auto j = nlohmann::json::parse(R"({"block_out_channels": [32, 64], "act_fn": "gelu", "class_embed_type": "timestep",
        "attention_head_dim": [1, 2, 3], "cross_attention_dim": [32, 32]})");
    try {
        (void)unet::unet_config::from_json(j);
        FAIL("no error");
    } catch (const dynamicid::value_error& e) {
        const std::string m = e.what();
        CHECK(m.rfind("[unet]", 0) == 0);
        CHECK(m.find("4 unsupported") != std::string::npos);
        CHECK(m.find("act_fn") != std::string::npos);
        CHECK(m.find("class_embed_type") != std::string::npos);
        CHECK(m.find("attention_head_dim") != std::string::npos);
        CHECK(m.find("cross_attention_dim") != std::string::npos);
    }
    CHECK_THROWS_AS(unet::unet_config::from_json(nlohmann::json::parse(R"({"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]})")),
                    dynamicid::value_error);
}

TEST_CASE("unet: every missing or misshapen weight is reported at once", "[unet]") {
    cpu_backend::context ctx{.threads = 2};
    const auto g = open_case("unet_tiny_2level");
    auto cfg = unet::unet_config::from_json(g.config());
    cfg.cross_attention_dim = 48;  // every attn2.to_k / to_v now has the wrong shape
    auto bind = conform::detail::param_binder<cpu_backend, float>(ctx, g);
    (void)unet::unet_2d_condition<cpu_backend>::bind(bind, cfg);
    CHECK(bind.problems().size() == 8);  // 4 cross-attention layers x (to_k, to_v)
    CHECK_THROWS_AS(bind.finish(), dynamicid::io_error);

}

TEST_CASE("attention: forward_spatial equals token attention with group norm and residual", "[unet][attention]") {
    cpu_backend::context ctx{.threads = 2};
    using attention = dynamicid::modules::blocks::attention<cpu_backend>;
    constexpr index_t c = 16;
    dynamicid::io::safetensors_writer w;
    const auto random = [&](const std::string& name, const dynamicid::shape& s, std::uint64_t seed) {
        w.add(ctx, name, dynamicid::ops::randn<cpu_backend, float>(ctx, s, seed));
    };
    random("group_norm.weight", {c}, 1);
    random("group_norm.bias", {c}, 2);
    std::uint64_t seed = 3;
    for (const char* p : {"to_q", "to_k", "to_v", "to_out.0"}) {
        random(std::string(p) + ".weight", {c, c}, seed++);
        random(std::string(p) + ".bias", {c}, seed++);
    }
    const auto bytes = w.to_bytes();
    auto file = std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(bytes));
    dynamicid::modules::weight_binder<cpu_backend, float> bind(ctx, dynamicid::modules::weight_source({file}));
    // The VAE's mid-block attention: one head over every channel, GroupNorm, residual.
    const auto attn = attention::bind(bind, {.query_dim = c, .heads = 1, .dim_head = c, .bias = true, .norm_num_groups = 4,
                                             .norm_eps = 1e-6, .residual_connection = true, .rescale_output_factor = 2.0});
    REQUIRE_NOTHROW(bind.finish());
    const auto x = dynamicid::ops::randn<cpu_backend, float>(ctx, {2, c, 3, 5}, 11);
    const auto spatial = attn.forward_spatial(ctx, x);
    const auto tokens = dynamicid::ops::permute(ctx, x.reshape({2, c, 15}), {0, 2, 1});
    const auto back = dynamicid::ops::permute(ctx, attn.forward(ctx, tokens), {0, 2, 1}).reshape({2, c, 3, 5});
    CHECK(max_abs_diff(spatial.to_host(ctx), back.to_host(ctx)) < 1e-5);
    // Residual and rescale: with to_out zeroed the output would be x / 2; check it is not the plain input.
    CHECK(max_abs_diff(spatial.to_host(ctx), x.to_host(ctx)) > 1e-3);
}

TEST_CASE("unet: forward_features of time_features is forward, and checks the features' shape", "[unet]") {
    cpu_backend::context ctx{.threads = 2};
    const auto u = load_unet(ctx, "unet_tiny_2level");
    const auto plain = u.model.forward(ctx, u.sample, u.timesteps, u.text).to_host(ctx);
    const auto features = u.model.time_features(ctx, u.timesteps);
    CHECK(features.shape() == dynamicid::shape({u.sample.dim(0), u.model.settings().block_out_channels[0]}));
    CHECK(u.model.forward_features(ctx, u.sample, features, u.text).to_host(ctx) == plain);
    const auto one = u.model.time_features(ctx, std::vector<float>{10.f});
    if (u.sample.dim(0) != 1) CHECK_THROWS_AS(u.model.forward_features(ctx, u.sample, one, u.text), dynamicid::shape_error);
    CHECK_THROWS_AS(u.model.forward_features(ctx, u.sample, features.reshape({-1}), u.text), dynamicid::shape_error);
}
