// Gradients of the UNet's own weights (training a base model): central
// differences in f64 for a sample of elements of every parameter, a torch
// autograd golden for all of them (tools/golden/make_unet_param_grad_goldens.py),
// and the frozen path's saved state, checkpointing and accumulation.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/blocks/attention.hpp>
#include <dynamicid/modules/blocks/resnet_block.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/training/tape.hpp>

#include <support/gradcheck.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace mods = dynamicid::modules;
namespace unet = dynamicid::modules::unet;
namespace training = dynamicid::training;
using dynamicid::cpu_backend;
using dynamicid::index_t;
template <class T>
using tensor = dynamicid::tensor<cpu_backend, T>;

const fs::path golden_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden";

struct golden_file {
    std::shared_ptr<const dynamicid::io::safetensors_file> file;
    mods::weight_source source;
    nlohmann::json config;
    static golden_file open(const fs::path& path) {
        auto f = std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::open(path));
        return {f, mods::weight_source({f}), nlohmann::json::parse(f->metadata().at("config"))};
    }
    template <class T>
    tensor<T> load(cpu_backend::context& ctx, const std::string& key) const {
        return file->template load<cpu_backend, T>(ctx, key);
    }
};

template <class T>
std::vector<double> host(cpu_backend::context& ctx, const tensor<T>& t) {
    return dynamicid::testing::download(ctx, t);
}

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
double dot(cpu_backend::context& ctx, const tensor<T>& a, const std::vector<double>& r) {
    const auto v = host(ctx, a);
    REQUIRE(v.size() == r.size());
    double s = 0;
    for (std::size_t i = 0; i < v.size(); ++i) s += v[i] * r[i];
    return s;
}

template <class T>
unet::unet_2d_condition<cpu_backend, T> load_unet(cpu_backend::context& ctx, const golden_file& g) {
    mods::weight_binder<cpu_backend, T> b(ctx, g.source, "unet.");
    auto u = unet::unet_2d_condition<cpu_backend, T>::bind(b, unet::unet_config::from_json(g.config["unet"]));
    b.finish();
    return u;
}

/// Central differences (f64) for every (name, weight, grad) triple that
/// `visit` yields, at element 0 and at the element with the largest analytic
/// gradient: each weight is perturbed in place (the model shares its storage)
/// and `loss` re-evaluated. Every weight must have a gradient of its shape,
/// and every kind in `kinds_required` (a layer name's last part) must occur.
/// Returns the number of tensors.
template <class Loss, class Visit>
int check_parameter_gradients(cpu_backend::context& ctx, const std::string& label, Loss&& loss, Visit&& visit,
                              const std::set<std::string>& kinds_required = {}) {
    const double eps = 1e-6, atol = 1e-5, rtol = 1e-3;
    int tensors = 0;
    std::set<std::string> kinds;
    visit([&](const std::string& name, const tensor<double>& w, const tensor<double>& g) {
        INFO(label << ": " << name);
        REQUIRE(g.defined());
        REQUIRE(g.shape() == w.shape());
        const auto stem = name.substr(0, name.rfind('.'));  // without ".weight" / ".bias"
        const auto kind = stem.substr(stem.rfind('.') + 1);
        kinds.insert(kind);
        ++tensors;
        const auto analytic = host(ctx, g);
        std::size_t top = 0;
        for (std::size_t j = 1; j < analytic.size(); ++j)
            if (std::abs(analytic[j]) > std::abs(analytic[top])) top = j;
        std::vector<std::size_t> picks{0};
        if (top != 0) picks.push_back(top);
        std::vector<double> numeric, expected;
        for (auto j : picks) {
            double* p = w.data() + j;
            const double x = *p;
            *p = x + eps;
            const double up = loss();
            *p = x - eps;
            const double down = loss();
            *p = x;
            numeric.push_back((up - down) / (2 * eps));
            expected.push_back(analytic[j]);
        }
        dynamicid::testing::check_close(label + " " + name + " (analytic vs central difference)", expected, numeric, atol, rtol);
    });
    for (const auto& k : kinds_required) {
        INFO(label << ": no parameter of kind " << k);
        CHECK(kinds.count(k) == 1);
    }
    return tensors;
}

}  // namespace

TEST_CASE("unet param grads: ResnetBlock2D and Attention weight gradients match central differences", "[training][unet][gradcheck]") {
    cpu_backend::context ctx{.threads = 1};
    const auto g = golden_file::open(golden_dir / "base_grad" / "unet_param_grad.safetensors");
    mods::weight_binder<cpu_backend, double> b(ctx, g.source, "unet.");
    // up_blocks.0.resnets.0: 32 -> 16 channels, so it has a conv_shortcut.
    const auto block = mods::blocks::resnet_block<cpu_backend, double>::bind(
        b.scope("up_blocks.0.resnets.0"), {.in_channels = 32, .out_channels = 16, .temb_channels = 32, .groups = 4, .eps = 1e-5});
    const auto attn = mods::blocks::attention<cpu_backend, double>::bind(
        b.scope("down_blocks.0.attentions.0.transformer_blocks.0.attn2"),
        {.query_dim = 8, .cross_attention_dim = 16, .heads = 2, .dim_head = 4});
    b.finish();
    const auto x = dynamicid::ops::randn<cpu_backend, double>(ctx, {2, 32, 3, 3}, 1);
    const auto temb = dynamicid::ops::randn<cpu_backend, double>(ctx, {2, 32}, 2);
    const auto r = host(ctx, dynamicid::ops::randn<cpu_backend, double>(ctx, {2, 16, 3, 3}, 3));

    SECTION("resnet block") {
        auto [y, s] = block.forward_train(ctx, x, &temb, true);
        CHECK(s.conv1.input.defined());
        std::remove_cvref_t<decltype(block)>::param_grads pg;
        const auto d = block.backward(ctx, s, tensor<double>::from_host(ctx, y.shape(), r), &pg);
        CHECK(d.input.defined());
        const int n = check_parameter_gradients(
            ctx, "resnet_block", [&] { return dot(ctx, block.forward(ctx, x, &temb), r); },
            [&](auto&& f) { block.for_each_parameter(&pg, "", f); }, {"norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"});
        CHECK(n == 12);
    }
    SECTION("cross attention") {
        const auto q = dynamicid::ops::randn<cpu_backend, double>(ctx, {2, 5, 8}, 4);
        const auto c = dynamicid::ops::randn<cpu_backend, double>(ctx, {2, 3, 16}, 5);
        const auto rq = host(ctx, dynamicid::ops::randn<cpu_backend, double>(ctx, {2, 5, 8}, 6));
        auto [y, s] = attn.forward_train(ctx, q, &c, true);
        std::remove_cvref_t<decltype(attn)>::param_grads pg;
        attn.backward(ctx, s, tensor<double>::from_host(ctx, y.shape(), rq), &pg);
        const int n = check_parameter_gradients(
            ctx, "attention", [&] { return dot(ctx, attn.forward(ctx, q, &c), rq); }, [&](auto&& f) { attn.for_each_parameter(&pg, "", f); },
            {"to_q", "to_k", "to_v", "0"});
        CHECK(n == 5);  // to_q, to_k, to_v (no bias), to_out.0 weight and bias
    }
}

TEST_CASE("unet param grads: the frozen path keeps nothing for the weights", "[training][unet]") {
    cpu_backend::context ctx{.threads = 1};
    const auto g = golden_file::open(golden_dir / "base_grad" / "unet_param_grad.safetensors");
    mods::weight_binder<cpu_backend, float> b(ctx, g.source, "unet.");
    const auto block = mods::blocks::resnet_block<cpu_backend, float>::bind(
        b.scope("up_blocks.0.resnets.0"), {.in_channels = 32, .out_channels = 16, .temb_channels = 32, .groups = 4, .eps = 1e-5});
    const auto t2d = unet::transformer_2d<cpu_backend, float>::bind(
        b.scope("down_blocks.0.attentions.0"),
        {.num_attention_heads = 2, .attention_head_dim = 4, .in_channels = 8, .cross_attention_dim = 16, .norm_num_groups = 4});
    b.finish();
    const auto x = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 32, 2, 2}, 1);
    const auto temb = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 32}, 2);
    auto [y, s] = block.forward_train(ctx, x, &temb);
    CHECK_FALSE(s.conv1.input.defined());
    CHECK_FALSE(s.conv2.input.defined());
    CHECK_FALSE(s.conv_shortcut.input.defined());
    CHECK_FALSE(s.time_emb_proj.input.defined());
    // A param_grads passed to a frozen forward's backward stays empty.
    std::remove_cvref_t<decltype(block)>::param_grads pg;
    block.backward(ctx, s, y, &pg);
    CHECK_FALSE(pg.conv1.weight.defined());
    CHECK_FALSE(pg.norm1.weight.defined());

    const auto h = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 8, 2, 2}, 3);
    const auto text = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 3, 16}, 4);
    auto [z, st] = t2d.forward_train(ctx, h, text);
    CHECK_FALSE(st.proj_in_conv.input.defined());
    CHECK_FALSE(st.blocks[0].attn1.default_saved.to_q.input.defined());
    CHECK_FALSE(st.blocks[0].ff.proj.input.defined());
    auto [z2, st2] = t2d.forward_train(ctx, h, text, nullptr, true);
    CHECK(st2.proj_in_conv.input.defined());
    CHECK(st2.blocks[0].attn2.default_saved.to_k.input.defined());
    CHECK(st2.blocks[0].ff.out.input.defined());
}

TEST_CASE("unet param grads: Transformer2DModel with linear projections matches central differences", "[training][unet][gradcheck]") {
    cpu_backend::context ctx{.threads = 1};
    const auto g = golden_file::open(golden_dir / "training" / "transformer_2d.safetensors");
    mods::weight_binder<cpu_backend, double> b(ctx, g.source, "param.");
    const auto& c = g.config;
    const auto t = unet::transformer_2d<cpu_backend, double>::bind(
        b, {.num_attention_heads = c["num_attention_heads"], .attention_head_dim = c["attention_head_dim"], .in_channels = c["in_channels"],
            .num_layers = c["num_layers"], .cross_attention_dim = c["cross_attention_dim"], .norm_num_groups = c["norm_num_groups"],
            .use_linear_projection = c["use_linear_projection"]});
    b.finish();
    const auto x = dynamicid::ops::randn<cpu_backend, double>(ctx, {1, 8, 3, 3}, 7);
    const auto text = dynamicid::ops::randn<cpu_backend, double>(ctx, {1, 3, 6}, 8);
    const auto r = host(ctx, dynamicid::ops::randn<cpu_backend, double>(ctx, {1, 8, 3, 3}, 9));
    auto [y, s] = t.forward_train(ctx, x, text, nullptr, true);
    std::remove_cvref_t<decltype(t)>::param_grads pg;
    t.backward(ctx, s, tensor<double>::from_host(ctx, y.shape(), r), &pg);
    const int n = check_parameter_gradients(
        ctx, "transformer_2d", [&] { return dot(ctx, t.forward(ctx, x, text), r); }, [&](auto&& f) { t.for_each_parameter(&pg, "", f); },
        {"norm", "proj_in", "proj_out", "norm1", "norm2", "norm3", "to_q", "to_k", "to_v", "0", "proj", "2"});
    std::size_t keys = 0;
    t.for_each_parameter(nullptr, "param.", [&](const std::string& name, const auto&, const auto&) {
        INFO(name);
        CHECK(g.file->contains(name));
        ++keys;
    });
    CHECK(static_cast<std::size_t>(n) == keys);
}

TEST_CASE("unet param grads: every UNet weight gradient matches central differences", "[training][unet][gradcheck]") {
    cpu_backend::context ctx{.threads = 1};
    const auto g = golden_file::open(golden_dir / "base_grad" / "unet_param_grad.safetensors");
    const auto u = load_unet<double>(ctx, g);
    const std::vector<float> ts{401.f};
    const auto x = dynamicid::ops::randn<cpu_backend, double>(ctx, {1, 4, 4, 4}, 11);
    const auto text = dynamicid::ops::randn<cpu_backend, double>(ctx, {1, 2, 16}, 12);
    const auto r = host(ctx, dynamicid::ops::randn<cpu_backend, double>(ctx, {1, 4, 4, 4}, 13));

    typename unet::unet_2d_condition<cpu_backend, double>::param_grads grads;
    training::tape<cpu_backend, double> tp;
    const auto xv = tp.leaf(x), cv = tp.leaf(text);
    const auto y = u.forward_train(ctx, tp, xv, ts, cv, nullptr, {}, &grads);
    tp.backward(ctx, y, tensor<double>::from_host(ctx, y.value.shape(), r));
    const int n = check_parameter_gradients(
        ctx, "unet_2d_condition", [&] { return dot(ctx, u.forward(ctx, x, ts, text), r); },
        [&](auto&& f) { u.for_each_parameter(&grads, f); },
        {"conv_in", "linear_1", "linear_2", "norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut", "norm", "proj_in",
         "proj_out", "norm3", "to_q", "to_k", "to_v", "0", "proj", "2", "conv", "conv_norm_out", "conv_out"});
    CHECK(n == 208);
}

TEST_CASE("unet param grads: UNet loss, input and all weight gradients match torch autograd", "[training][unet][golden]") {
    cpu_backend::context ctx{.threads = 1};
    const auto g = golden_file::open(golden_dir / "base_grad" / "unet_param_grad.safetensors");
    const auto u = load_unet<float>(ctx, g);
    const auto sample = g.load<float>(ctx, "input.sample"), states = g.load<float>(ctx, "input.encoder_hidden_states");
    const auto r = g.load<float>(ctx, "input.r");
    const auto ts_host = host(ctx, g.load<float>(ctx, "input.timestep"));
    const std::vector<float> ts(ts_host.begin(), ts_host.end());

    typename unet::unet_2d_condition<cpu_backend, float>::param_grads grads;
    training::tape<cpu_backend, float> tp;
    const auto xv = tp.leaf(sample), cv = tp.leaf(states);
    const auto y = u.forward_train(ctx, tp, xv, ts, cv, nullptr, {}, &grads);
    const double loss = dot(ctx, y.value, host(ctx, r));
    const double want_loss = host(ctx, g.load<float>(ctx, "output.loss"))[0];
    CHECK(std::abs(loss - want_loss) <= 1e-4 * std::max(1.0, std::abs(want_loss)));
    tp.backward(ctx, y, r);

    double worst = 0;
    std::string worst_key;
    const auto compare = [&](const std::string& key, const tensor<float>& got) {
        INFO(key);
        REQUIRE(got.defined());
        const auto want = g.load<float>(ctx, key);
        REQUIRE(got.shape() == want.shape());
        const double err = rel_to_max(host(ctx, got), host(ctx, want));
        INFO("relative-to-max error " << err);
        CHECK(err <= 1e-4);
        if (err > worst) {
            worst = err;
            worst_key = key;
        }
    };
    compare("grad.sample", tp.gradient(xv));
    compare("grad.encoder_hidden_states", tp.gradient(cv));
    std::set<std::string> seen;
    u.for_each_parameter(&grads, [&](const std::string& key, const tensor<float>& weight, const tensor<float>& grad) {
        CHECK(weight.shape() == g.load<float>(ctx, "unet." + key).shape());
        compare("grad.unet." + key, grad);
        seen.insert(key);
    });
    // Every parameter torch differentiated was paired with a gradient.
    std::size_t in_file = 0;
    for (const auto& key : g.file->names())
        if (key.starts_with("grad.unet.")) {
            ++in_file;
            INFO(key);
            CHECK(seen.count(key.substr(10)) == 1);
        }
    CHECK(in_file == seen.size());
    INFO("worst relative-to-max error " << worst << " (" << worst_key << ")");
    CHECK(worst <= 1e-4);
}

TEST_CASE("unet param grads: checkpointed blocks and repeated backwards accumulate the same gradients", "[training][unet][checkpoint]") {
    cpu_backend::context ctx{.threads = 1};
    const auto g = golden_file::open(golden_dir / "base_grad" / "unet_param_grad.safetensors");
    const auto u = load_unet<double>(ctx, g);
    const std::vector<float> ts{401.f, 17.f};
    const auto x = dynamicid::ops::randn<cpu_backend, double>(ctx, {2, 4, 4, 4}, 21);
    const auto text = dynamicid::ops::randn<cpu_backend, double>(ctx, {2, 3, 16}, 22);
    const auto seed = dynamicid::ops::randn<cpu_backend, double>(ctx, {2, 4, 4, 4}, 23);
    using grads_type = typename unet::unet_2d_condition<cpu_backend, double>::param_grads;
    const auto run = [&](grads_type& grads, bool ckpt) {
        training::tape<cpu_backend, double> tp;
        const auto xv = tp.leaf(x), cv = tp.leaf(text);
        const auto y = u.forward_train(ctx, tp, xv, ts, cv, nullptr, {.checkpoint_blocks = ckpt}, &grads);
        tp.backward(ctx, y, seed);
    };
    grads_type plain, ckpt, twice;
    run(plain, false);
    run(ckpt, true);
    run(twice, false);
    run(twice, true);
    std::map<std::string, std::vector<double>> a, b;
    u.for_each_parameter(&plain, [&](const std::string& k, const auto&, const auto& gr) { a[k] = host(ctx, gr); });
    u.for_each_parameter(&ckpt, [&](const std::string& k, const auto&, const auto& gr) {
        INFO(k);
        REQUIRE(gr.defined());
        auto v = host(ctx, gr);
        for (std::size_t i = 0; i < v.size(); ++i) CHECK(std::abs(v[i] - a[k][i]) <= 1e-12 * (1 + std::abs(v[i])));
    });
    u.for_each_parameter(&twice, [&](const std::string& k, const auto&, const auto& gr) {
        INFO(k);
        REQUIRE(gr.defined());
        auto v = host(ctx, gr);
        for (std::size_t i = 0; i < v.size(); ++i) CHECK(std::abs(v[i] - 2 * a[k][i]) <= 1e-12 * (1 + std::abs(v[i])));
    });
    CHECK(a.size() == 208);
}
