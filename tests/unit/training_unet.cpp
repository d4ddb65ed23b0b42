// Backward passes through the frozen UNet and DynamicID's trainable SA / SAA
// processors: central differences in f64 for every module, torch autograd
// goldens (tools/golden/make_training_goldens.py) in f32, the tape's
// parameter-ready notifications and activation checkpointing.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/blocks/attention.hpp>
#include <dynamicid/modules/blocks/resnet_block.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/pipelines/detail/dynamicid_processors.hpp>
#include <dynamicid/training/saa_processors.hpp>
#include <dynamicid/training/tape.hpp>

#include <support/gradcheck.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace mods = dynamicid::modules;
namespace unet = dynamicid::modules::unet;
namespace training = dynamicid::training;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using dynamicid::testing::check_gradients;
using dynamicid::testing::operand;
template <class T>
using tensor = dynamicid::tensor<cpu_backend, T>;

const fs::path data_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "training";

struct golden {
    mods::weight_source source;
    nlohmann::json config;
    std::shared_ptr<const dynamicid::io::safetensors_file> file;
    static golden open(const std::string& name) {
        auto file = std::make_shared<const dynamicid::io::safetensors_file>(
            dynamicid::io::safetensors_file::open(data_dir / (name + ".safetensors")));
        return {mods::weight_source({file}), nlohmann::json::parse(file->metadata().at("config")), file};
    }
    template <class T>
    tensor<T> load(cpu_backend::context& ctx, const std::string& key) const {
        return file->template load<cpu_backend, T>(ctx, key);
    }
    template <class T>
    mods::weight_binder<cpu_backend, T> binder(cpu_backend::context& ctx, const std::string& prefix) const {
        return mods::weight_binder<cpu_backend, T>(ctx, source, prefix);
    }
};

/// max |a - b| / max |b| (the goldens' tolerance measure).
double rel_to_max(const std::vector<double>& a, const std::vector<double>& b) {
    REQUIRE(a.size() == b.size());
    double diff = 0, scale = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        diff = std::max(diff, std::abs(a[i] - b[i]));
        scale = std::max(scale, std::abs(b[i]));
    }
    return scale > 0 ? diff / scale : diff;
}

template <class T>
std::vector<double> host(cpu_backend::context& ctx, const tensor<T>& t) {
    return dynamicid::testing::download(ctx, t);
}

void check_golden(cpu_backend::context& ctx, const golden& g, const std::string& key, const tensor<float>& got, double tol = 1e-4) {
    INFO(key);
    REQUIRE(got.defined());
    const auto want = g.load<float>(ctx, key);
    REQUIRE(got.shape() == want.shape());
    const double err = rel_to_max(host(ctx, got), host(ctx, want));
    INFO("relative-to-max error " << err);
    CHECK(err <= tol);
}

template <class T>
mods::blocks::resnet_block<cpu_backend, T> small_resnet(cpu_backend::context& ctx, const golden& g) {
    auto b = g.binder<T>(ctx, "param.");
    const auto& c = g.config;
    auto r = mods::blocks::resnet_block<cpu_backend, T>::bind(
        b, {.in_channels = c["in_channels"], .out_channels = c["out_channels"], .temb_channels = c["temb_channels"],
            .groups = c["groups"], .eps = c["eps"]});
    b.finish();
    return r;
}

template <class T>
unet::basic_transformer_block<cpu_backend, T> small_block(cpu_backend::context& ctx, const golden& g) {
    auto b = g.binder<T>(ctx, "param.");
    const auto& c = g.config;
    auto r = unet::basic_transformer_block<cpu_backend, T>::bind(
        b, {.dim = c["dim"], .num_attention_heads = c["num_attention_heads"], .attention_head_dim = c["attention_head_dim"],
            .cross_attention_dim = c["cross_attention_dim"]});
    b.finish();
    return r;
}

template <class T>
unet::transformer_2d<cpu_backend, T> small_transformer(cpu_backend::context& ctx, const golden& g) {
    auto b = g.binder<T>(ctx, "param.");
    const auto& c = g.config;
    auto r = unet::transformer_2d<cpu_backend, T>::bind(
        b, {.num_attention_heads = c["num_attention_heads"], .attention_head_dim = c["attention_head_dim"], .in_channels = c["in_channels"],
            .num_layers = c["num_layers"], .cross_attention_dim = c["cross_attention_dim"], .norm_num_groups = c["norm_num_groups"],
            .use_linear_projection = c["use_linear_projection"]});
    b.finish();
    return r;
}

template <class T>
unet::unet_2d_condition<cpu_backend, T> tiny_unet(cpu_backend::context& ctx, const golden& g) {
    auto b = g.binder<T>(ctx, "unet.");
    auto u = unet::unet_2d_condition<cpu_backend, T>::bind(b, unet::unet_config::from_json(g.config["unet"]));
    b.finish();
    return u;
}

/// The golden's processor weights, as the released SAA_module stores them ("<i>.to_q_lora.down.weight", ...).
template <class T>
std::vector<training::saa_layer_weights<cpu_backend, T>> saa_layers(cpu_backend::context& ctx, const golden& g,
                                                                    const unet::unet_2d_condition<cpu_backend, T>& u) {
    const auto source = g.source.with_map([](std::string_view key) { return "proc." + std::string(key); });
    const auto adapters = dynamicid::pipelines::detail::bind_adapters<cpu_backend, T>(ctx, source, u.settings(), u.attention_layer_names(), {});
    std::vector<training::saa_layer_weights<cpu_backend, T>> layers;
    for (const auto& a : adapters) layers.push_back({a.cross, a.to_q_lora, a.to_k_lora, a.to_v_lora, a.to_out_lora, a.to_k_ip, a.to_v_ip});
    return layers;
}

dynamicid::modules::saa::saa_controls golden_controls(const nlohmann::json& c) {
    dynamicid::modules::saa::saa_controls s;
    s.id_num = c["id_num"];
    for (const auto& b : c["bbox"]) s.boxes.push_back({b[0], b[1], b[2], b[3]});
    s.activate_query = c["activate_query"];
    s.infer_scale = c["infer_scale"];
    s.infer_end = c["infer_end"];
    s.id_scale = c["id_scale"];
    return s;
}

const std::vector<float> golden_timesteps{401.f, 401.f};

}  // namespace

// ---- central differences (f64) ---------------------------------------------------

TEST_CASE("unet training: ResnetBlock2D backward matches central differences", "[training][unet][gradcheck]") {
    cpu_backend::context ctx{};
    const auto g = golden::open("resnet");
    const auto block = small_resnet<double>(ctx, g);
    check_gradients<cpu_backend>(
        "resnet_block", {operand{{2, 8, 4, 4}}, operand{{2, 8}}},
        [&](auto&, const auto& in) { return block.forward(ctx, in[0], &in[1]); },
        [&](auto&, const auto& in, const auto& dy) {
            auto [y, s] = block.forward_train(ctx, in[0], &in[1]);
            auto d = block.backward(ctx, s, dy);
            return std::vector{d.input, d.temb};
        });
}

TEST_CASE("unet training: self and cross Attention backward match central differences", "[training][unet][gradcheck]") {
    cpu_backend::context ctx{};
    const auto g = golden::open("transformer_block");
    auto b = g.binder<double>(ctx, "param.");
    const auto self = mods::blocks::attention<cpu_backend, double>::bind(b.scope("attn1"), {.query_dim = 8, .heads = 2, .dim_head = 4});
    const auto cross = mods::blocks::attention<cpu_backend, double>::bind(
        b.scope("attn2"), {.query_dim = 8, .cross_attention_dim = 6, .heads = 2, .dim_head = 4});
    b.finish();
    check_gradients<cpu_backend>(
        "attention (self)", {operand{{2, 5, 8}}}, [&](auto&, const auto& in) { return self.forward(ctx, in[0]); },
        [&](auto&, const auto& in, const auto& dy) {
            auto [y, s] = self.forward_train(ctx, in[0]);
            auto d = self.backward(ctx, s, dy);
            CHECK_FALSE(d.context.defined());
            return std::vector{d.input};
        });
    check_gradients<cpu_backend>(
        "attention (cross)", {operand{{2, 5, 8}}, operand{{2, 3, 6}}},
        [&](auto&, const auto& in) { return cross.forward(ctx, in[0], &in[1]); },
        [&](auto&, const auto& in, const auto& dy) {
            auto [y, s] = cross.forward_train(ctx, in[0], &in[1]);
            auto d = cross.backward(ctx, s, dy);
            return std::vector{d.input, d.context};
        });
}

TEST_CASE("unet training: GEGLU FeedForward and BasicTransformerBlock backward match central differences",
          "[training][unet][gradcheck]") {
    cpu_backend::context ctx{};
    const auto g = golden::open("transformer_block");
    const auto block = small_block<double>(ctx, g);
    const auto& ff = block.weights().ff;
    check_gradients<cpu_backend>(
        "feed_forward", {operand{{2, 3, 8}}}, [&](auto&, const auto& in) { return ff.forward(ctx, in[0]); },
        [&](auto&, const auto& in, const auto& dy) {
            auto [y, s] = ff.forward_train(ctx, in[0]);
            return std::vector{ff.backward(ctx, s, dy)};
        });
    check_gradients<cpu_backend>(
        "basic_transformer_block", {operand{{2, 4, 8}}, operand{{2, 3, 6}}},
        [&](auto&, const auto& in) { return block.forward(ctx, in[0], in[1], 2, 2); },
        [&](auto&, const auto& in, const auto& dy) {
            auto [y, s] = block.forward_train(ctx, in[0], in[1], 2, 2);
            auto d = block.backward(ctx, s, dy);
            return std::vector{d.input, d.text};
        });
}

TEST_CASE("unet training: Transformer2DModel backward matches central differences", "[training][unet][gradcheck]") {
    cpu_backend::context ctx{};
    const auto t = small_transformer<double>(ctx, golden::open("transformer_2d"));
    check_gradients<cpu_backend>(
        "transformer_2d", {operand{{1, 8, 3, 3}}, operand{{1, 3, 6}}},
        [&](auto&, const auto& in) { return t.forward(ctx, in[0], in[1]); },
        [&](auto&, const auto& in, const auto& dy) {
            auto [y, s] = t.forward_train(ctx, in[0], in[1]);
            auto d = t.backward(ctx, s, dy);
            return std::vector{d.input, d.text};
        });
}

TEST_CASE("unet training: resamplers and the timestep embedding backward match central differences", "[training][unet][gradcheck]") {
    cpu_backend::context ctx{};
    const auto g = golden::open("unet_saa");
    auto b = g.binder<double>(ctx, "unet.");
    const auto down = unet::downsample_2d<cpu_backend, double>::bind(b.scope("down_blocks.0.downsamplers.0"), 8);
    const auto up = unet::upsample_2d<cpu_backend, double>::bind(b.scope("up_blocks.0.upsamplers.0"), 16);
    const auto emb = unet::timestep_embedding<cpu_backend, double>::bind(b.scope("time_embedding"), 8, 32);
    b.finish();
    check_gradients<cpu_backend>(
        "downsample_2d", {operand{{1, 8, 4, 4}}}, [&](auto&, const auto& in) { return down.forward(ctx, in[0]); },
        [&](auto&, const auto& in, const auto& dy) { return std::vector{down.backward(ctx, down.forward_train(ctx, in[0]).second, dy)}; });
    check_gradients<cpu_backend>(
        "upsample_2d", {operand{{1, 16, 2, 2}}}, [&](auto&, const auto& in) { return up.forward(ctx, in[0]); },
        [&](auto&, const auto& in, const auto& dy) { return std::vector{up.backward(ctx, up.forward_train(ctx, in[0]).second, dy)}; });
    check_gradients<cpu_backend>(
        "timestep_embedding", {operand{{2, 8}}}, [&](auto&, const auto& in) { return emb.forward(ctx, in[0]); },
        [&](auto&, const auto& in, const auto& dy) { return std::vector{emb.backward(ctx, emb.forward_train(ctx, in[0]).second, dy)}; });
}

TEST_CASE("unet training: UNet2DConditionModel backward through the tape matches central differences",
          "[training][unet][gradcheck]") {
    cpu_backend::context ctx{};
    const auto g = golden::open("unet_saa");
    const auto u = tiny_unet<double>(ctx, g);
    const std::vector<float> ts{401.f};
    check_gradients<cpu_backend>(
        "unet_2d_condition", {operand{{1, 4, 4, 4}}, operand{{1, 2, 16}}},
        [&](auto&, const auto& in) { return u.forward(ctx, in[0], ts, in[1]); },
        [&](auto&, const auto& in, const auto& dy) {
            training::tape<cpu_backend, double> tp;
            const auto x = tp.leaf(in[0]), c = tp.leaf(in[1]);
            const auto y = u.forward_train(ctx, tp, x, ts, c);
            tp.backward(ctx, y, dy);
            return std::vector{tp.gradient(x), tp.gradient(c)};
        });
}

TEST_CASE("unet training: the UNet with trainable SA and SAA processors matches central differences",
          "[training][unet][saa][gradcheck]") {
    cpu_backend::context ctx{};
    const auto g = golden::open("unet_saa");
    const auto u = tiny_unet<double>(ctx, g);
    training::parameter_gradients<cpu_backend, double> board;
    const training::saa_processors<cpu_backend, double> procs(saa_layers<double>(ctx, g, u), {}, board);
    auto controls = golden_controls(g.config);
    controls.id_num = 1;
    controls.boxes = {{0.0, 0.25, 0.75, 1.0}};
    const auto hooks = procs.hooks(controls);
    const std::vector<float> ts{401.f};
    check_gradients<cpu_backend>(
        "unet_2d_condition with SAA", {operand{{1, 4, 4, 4}}, operand{{1, 1 + 4, 16}}},
        [&](auto&, const auto& in) { return u.forward(ctx, in[0], ts, in[1], &hooks); },
        [&](auto&, const auto& in, const auto& dy) {
            board.zero();
            training::tape<cpu_backend, double> tp(&board);
            const auto x = tp.leaf(in[0]), c = tp.leaf(in[1]);
            const auto y = u.forward_train(ctx, tp, x, ts, c, &hooks);
            tp.backward(ctx, y, dy);
            return std::vector{tp.gradient(x), tp.gradient(c)};
        },
        3);
}

TEST_CASE("unet training: SAA processor weight gradients match central differences", "[training][saa][gradcheck]") {
    cpu_backend::context ctx{};
    const auto g = golden::open("unet_saa");
    const auto u = tiny_unet<double>(ctx, g);
    const auto layers = saa_layers<double>(ctx, g, u);
    // Layer 1 is down_blocks.0...attn2 (8 channels, 2 heads), an SAA processor.
    REQUIRE(layers[1].cross);
    auto b = g.binder<double>(ctx, "unet.down_blocks.0.attentions.0.transformer_blocks.0.");
    auto proc_source = g.source.with_map([](std::string_view key) { return "proc.1." + std::string(key); });
    mods::weight_binder<cpu_backend, double> pb(ctx, proc_source);
    auto attn = b.scope("attn2");
    const auto base = mods::saa::lora_attention_params<cpu_backend, double>::bind(attn, pb);
    b.finish();
    pb.finish();
    auto controls = golden_controls(g.config);
    const index_t rank = layers[1].to_q_lora.rank();
    // inputs: hidden (2, 16, 8), states (2, 5 + 8, 16), to_k_ip, to_q_lora.down, to_out_lora.up
    const auto make = [&](const auto& in) {
        auto p = base;
        p.to_q_lora.down = in[3];
        p.to_out_lora.up = in[4];
        return mods::saa::saa_processor<cpu_backend, double>({.heads = 2, .tokens_per_id = 4}, {p, in[2], layers[1].to_v_ip});
    };
    check_gradients<cpu_backend>(
        "saa_processor", {operand{{2, 16, 8}}, operand{{2, 13, 16}}, operand{{8, 16}}, operand{{rank, 8}}, operand{{8, rank}}},
        [&](auto&, const auto& in) { return make(in).forward(ctx, in[0], in[1], controls); },
        [&](auto&, const auto& in, const auto& dy) {
            const auto proc = make(in);
            auto [y, s] = proc.forward_train(ctx, in[0], in[1], controls);
            auto d = proc.backward(ctx, s, dy);
            return std::vector{d.hidden_states, d.encoder_hidden_states, d.to_k_ip, d.to_q_lora.down, d.to_out_lora.up};
        },
        5);
}

// ---- torch autograd goldens (f32) -------------------------------------------------

TEST_CASE("unet training: ResnetBlock2D and BasicTransformerBlock input gradients match torch autograd", "[training][unet][golden]") {
    cpu_backend::context ctx{};
    {
        const auto g = golden::open("resnet");
        const auto block = small_resnet<float>(ctx, g);
        const auto x = g.load<float>(ctx, "input.x"), temb = g.load<float>(ctx, "input.temb");
        auto [y, s] = block.forward_train(ctx, x, &temb);
        check_golden(ctx, g, "output.y", y);
        const auto d = block.backward(ctx, s, g.load<float>(ctx, "input.r"));
        check_golden(ctx, g, "grad.x", d.input);
        check_golden(ctx, g, "grad.temb", d.temb);
    }
    {
        const auto g = golden::open("transformer_block");
        const auto block = small_block<float>(ctx, g);
        const auto tokens = g.load<float>(ctx, "input.tokens"), text = g.load<float>(ctx, "input.text");
        auto [y, s] = block.forward_train(ctx, tokens, text, 3, 3);
        check_golden(ctx, g, "output.y", y);
        const auto d = block.backward(ctx, s, g.load<float>(ctx, "input.r"));
        check_golden(ctx, g, "grad.tokens", d.input);
        check_golden(ctx, g, "grad.text", d.text);
    }
}

TEST_CASE("unet training: UNet with the authors' SAA processors matches torch autograd (loss, latents, states, LoRA and ip weights)",
          "[training][unet][saa][golden]") {
    cpu_backend::context ctx{};
    const auto g = golden::open("unet_saa");
    const auto u = tiny_unet<float>(ctx, g);
    training::parameter_gradients<cpu_backend, float> board;
    std::vector<index_t> ready_order;
    std::vector<tensor<float>> ready_grads(0);
    board.on_ready = [&](index_t id, const tensor<float>& grad) {
        ready_order.push_back(id);
        ready_grads.push_back(grad);
    };
    const training::saa_processors<cpu_backend, float> procs(saa_layers<float>(ctx, g, u), {}, board);
    const auto hooks = procs.hooks(golden_controls(g.config));

    for (const bool checkpoint : {false, true}) {
        INFO("checkpoint_blocks " << checkpoint);
        board.zero();
        ready_order.clear();
        ready_grads.clear();
        training::tape<cpu_backend, float> tp(&board);
        const auto x = tp.leaf(g.load<float>(ctx, "input.sample"));
        const auto c = tp.leaf(g.load<float>(ctx, "input.encoder_hidden_states"));
        const auto eps = u.forward_train(ctx, tp, x, golden_timesteps, c, &hooks, {.checkpoint_blocks = checkpoint});
        CHECK(tp.size() == 2 + 2 + 1 + 2);  // conv_in, down x2, mid, up x2, conv_out
        check_golden(ctx, g, "output.eps", eps.value);
        // loss = mean((eps - target)^2), d loss / d eps = 2 (eps - target) / n
        const auto diff = dynamicid::ops::sub(ctx, eps.value, g.load<float>(ctx, "input.target"));
        const auto dh = host(ctx, diff);
        double loss = 0;
        for (double v : dh) loss += v * v;
        loss /= static_cast<double>(dh.size());
        const double want_loss = host(ctx, g.load<float>(ctx, "output.loss"))[0];
        CHECK(std::abs(loss - want_loss) <= 1e-5 * std::abs(want_loss));
        tp.backward(ctx, eps, dynamicid::ops::scale(ctx, diff, 2.0 / static_cast<double>(dh.size())));
        check_golden(ctx, g, "grad.sample", tp.gradient(x));
        check_golden(ctx, g, "grad.encoder_hidden_states", tp.gradient(c));
        REQUIRE(board.size() == 8 * 4 * 2 + 4 * 2);  // 8 layers x 4 LoRA x (down, up) + 4 SAA layers x (to_k_ip, to_v_ip)
        for (index_t id = 0; id < board.size(); ++id) {
            check_golden(ctx, g, "grad.proc." + board.name(id), board.gradient(id));
            CHECK(board.ready(id));
            CHECK(board.pending(id) == 0);
        }
        // Every parameter announced exactly once, with its final gradient.
        auto sorted = ready_order;
        std::sort(sorted.begin(), sorted.end());
        CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());
        CHECK(static_cast<index_t>(sorted.size()) == board.size());
        for (std::size_t i = 0; i < ready_order.size(); ++i)
            CHECK(host(ctx, ready_grads[i]) == host(ctx, board.gradient(ready_order[i])));
        // Layers finish in reverse forward order: the first announced parameter is not the first layer's.
        CHECK(ready_order.front() != 0);
    }
}

// ---- checkpointing, errors ------------------------------------------------------

TEST_CASE("unet training: gradients with and without activation checkpointing are identical", "[training][unet][checkpoint]") {
    cpu_backend::context ctx{};
    const auto g = golden::open("unet_saa");
    const auto u = tiny_unet<double>(ctx, g);
    training::parameter_gradients<cpu_backend, double> board;
    const training::saa_processors<cpu_backend, double> procs(saa_layers<double>(ctx, g, u), {}, board);
    const auto hooks = procs.hooks(golden_controls(g.config));
    const auto sample = g.load<double>(ctx, "input.sample"), states = g.load<double>(ctx, "input.encoder_hidden_states");
    const auto seed = dynamicid::ops::randn<cpu_backend, double>(ctx, sample.shape(), 9);
    std::vector<std::vector<double>> results[2];
    for (int ckpt = 0; ckpt < 2; ++ckpt) {
        board.zero();
        training::tape<cpu_backend, double> tp(&board);
        const auto x = tp.leaf(sample), c = tp.leaf(states);
        const auto y = u.forward_train(ctx, tp, x, golden_timesteps, c, &hooks, {.checkpoint_blocks = ckpt == 1});
        tp.backward(ctx, y, seed);
        results[ckpt].push_back(host(ctx, y.value));
        results[ckpt].push_back(host(ctx, tp.gradient(x)));
        results[ckpt].push_back(host(ctx, tp.gradient(c)));
        for (index_t id = 0; id < board.size(); ++id) {
            results[ckpt].push_back(host(ctx, board.gradient(id)));
            CHECK(board.ready(id));
        }
    }
    REQUIRE(results[0].size() == results[1].size());
    for (std::size_t i = 0; i < results[0].size(); ++i) CHECK(results[0][i] == results[1][i]);
}

TEST_CASE("unet training: a layer with only an inference processor, bad seeds and foreign variables are rejected",
          "[training][unet][errors]") {
    cpu_backend::context ctx{};
    const auto g = golden::open("unet_saa");
    const auto u = tiny_unet<float>(ctx, g);
    unet::attention_hooks<cpu_backend, float> hooks;
    hooks.processors.resize(u.attention_layer_names().size());
    hooks.processors[3] = [](cpu_backend::context& cx, const mods::blocks::attention_call<cpu_backend, float>& call) {
        return call.attn.forward(cx, call.hidden_states, call.context);
    };
    training::tape<cpu_backend, float> tp;
    const auto x = tp.leaf(g.load<float>(ctx, "input.sample"));
    const auto c = tp.leaf(g.load<float>(ctx, "input.encoder_hidden_states"));
    CHECK_THROWS_AS(u.forward_train(ctx, tp, x, golden_timesteps, c, &hooks), dynamicid::unsupported_error);

    training::tape<cpu_backend, float> tp2;
    const auto x2 = tp2.leaf(x.value), c2 = tp2.leaf(c.value);
    const auto y = u.forward_train(ctx, tp2, x2, golden_timesteps, c2);
    CHECK_THROWS_AS(tp2.backward(ctx, y, tensor<float>::zeros(ctx, {1, 4, 8, 8})), dynamicid::shape_error);
    CHECK_THROWS_AS(tp2.gradient(training::variable<cpu_backend, float>{x.value, 999}), dynamicid::value_error);
    training::parameter_gradients<cpu_backend, float> board;
    const auto id = board.add("w", tensor<float>::zeros(ctx, {2, 2}));
    CHECK_THROWS_AS(board.deliver(ctx, id, tensor<float>::zeros(ctx, {3})), dynamicid::shape_error);
    CHECK_THROWS_AS(board.deliver(ctx, 7, tensor<float>::zeros(ctx, {2, 2})), dynamicid::value_error);
}
