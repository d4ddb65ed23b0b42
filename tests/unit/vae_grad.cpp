// The VAE's training backward (encoder, reparameterised sample, KL, decoder;
// input and weight gradients): central differences in f64 on a tiny model and
// a torch autograd golden (tools/golden/make_vae_grad_goldens.py) for the loss
// mse(decode(mean + std * noise), image) + beta * kl.mean().
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/vae/autoencoder_kl.hpp>

#include <support/gradcheck.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace mods = dynamicid::modules;
namespace vae = dynamicid::modules::vae;
namespace ops = dynamicid::ops;
using dynamicid::cpu_backend;
template <class T>
using tensor = dynamicid::tensor<cpu_backend, T>;

struct golden_file {
    std::shared_ptr<const dynamicid::io::safetensors_file> file;
    mods::weight_source source;
    nlohmann::json config;
    static golden_file open() {
        const auto path = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "base_grad" / "vae_grad.safetensors";
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
vae::autoencoder_kl<cpu_backend, T> load_vae(cpu_backend::context& ctx, const golden_file& g) {
    mods::weight_binder<cpu_backend, T> b(ctx, g.source, "vae.");
    auto v = vae::autoencoder_kl<cpu_backend, T>::bind(b, vae::autoencoder_kl_config::from_json(g.config["vae"]));
    b.finish();
    return v;
}

/// The golden's loss on the host, from the inference forward.
template <class T>
double vae_loss(cpu_backend::context& ctx, const vae::autoencoder_kl<cpu_backend, T>& v, const tensor<T>& image, const tensor<T>& noise,
                double beta) {
    const auto dist = v.encode(ctx, image);
    const auto stddev = ops::unary(ctx, dynamicid::unary_op::exp, ops::scale(ctx, dist.logvar, 0.5));
    const auto recon = host(ctx, v.decode(ctx, ops::add(ctx, dist.mean, ops::mul(ctx, stddev, noise))));
    const auto x = host(ctx, image);
    double mse = 0;
    for (std::size_t i = 0; i < x.size(); ++i) mse += (recon[i] - x[i]) * (recon[i] - x[i]);
    const auto kl = host(ctx, v.kl(ctx, dist));
    double kl_mean = 0;
    for (double k : kl) kl_mean += k;
    return mse / static_cast<double>(x.size()) + beta * kl_mean / static_cast<double>(kl.size());
}

template <class T>
struct train_result {
    double loss = 0;
    tensor<T> grad_image, mean, logvar, recon, kl;
    typename vae::autoencoder_kl<cpu_backend, T>::param_grads grads;
};

/// The training path: forward with saved state, then every backward by hand.
template <class T>
train_result<T> vae_train(cpu_backend::context& ctx, const vae::autoencoder_kl<cpu_backend, T>& v, const tensor<T>& image,
                          const tensor<T>& noise, double beta) {
    train_result<T> r;
    auto [dist, s_enc] = v.encode_train(ctx, image, true);
    auto [z, s_z] = v.sample_forward(ctx, dist, noise);
    auto [recon, s_dec] = v.decode_train(ctx, z, true);
    r.kl = v.kl(ctx, dist);
    r.mean = dist.mean;
    r.logvar = dist.logvar;
    r.recon = recon;
    const auto diff = ops::sub(ctx, recon, image);
    const double n = static_cast<double>(image.numel());
    const auto d = host(ctx, diff);
    double mse = 0;
    for (double e : d) mse += e * e;
    double kl_sum = 0;
    for (double k : host(ctx, r.kl)) kl_sum += k;
    const double batch = static_cast<double>(image.dim(0));
    r.loss = mse / n + beta * kl_sum / batch;

    const auto grad_recon = ops::scale(ctx, diff, 2.0 / n);
    const auto dz = v.decode_backward(ctx, s_dec, grad_recon, &r.grads);
    const auto ds = v.sample_backward(ctx, s_z, dz);
    const auto dk = v.kl_backward(ctx, dist, tensor<T>::full(ctx, {image.dim(0)}, static_cast<T>(beta / batch)));
    const auto gi = v.encode_backward(ctx, s_enc, ops::add(ctx, ds.mean, dk.mean), ops::add(ctx, ds.logvar, dk.logvar), &r.grads);
    // The reconstruction term also reaches the image directly.
    r.grad_image = ops::sub(ctx, gi, grad_recon);
    return r;
}

}  // namespace

TEST_CASE("vae grads: every weight and the image gradient match central differences", "[training][vae][gradcheck]") {
    cpu_backend::context ctx{.threads = 1};
    const auto g = golden_file::open();
    const auto v = load_vae<double>(ctx, g);
    const double beta = g.config["beta"];
    // Smaller than the golden's input (4x4 image, 2x2 latents) to keep the loop short.
    const auto image = ops::randn<cpu_backend, double>(ctx, {1, 3, 4, 4}, 61);
    const auto noise = ops::randn<cpu_backend, double>(ctx, {1, 4, 2, 2}, 62);
    auto r = vae_train(ctx, v, image, noise, beta);
    CHECK(std::abs(r.loss - vae_loss(ctx, v, image, noise, beta)) <= 1e-12 * std::abs(r.loss));

    // Every weight tensor, at element 0 and at its largest gradient.
    const double eps = 1e-6, atol = 1e-6, rtol = 1e-4;
    std::set<std::string> kinds;
    int tensors = 0;
    const auto check_tensor = [&](const std::string& name, const tensor<double>& w, const tensor<double>& grad) {
        INFO(name);
        REQUIRE(grad.defined());
        REQUIRE(grad.shape() == w.shape());
        const auto stem = name.substr(0, name.rfind('.'));
        const auto kind = stem.substr(stem.rfind('.') + 1);
        kinds.insert(kind);
        ++tensors;
        const auto analytic = host(ctx, grad);
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
            const double up = vae_loss(ctx, v, image, noise, beta);
            *p = x - eps;
            const double down = vae_loss(ctx, v, image, noise, beta);
            *p = x;
            numeric.push_back((up - down) / (2 * eps));
            expected.push_back(analytic[j]);
        }
        dynamicid::testing::check_close(name + " (analytic vs central difference)", expected, numeric, atol, rtol);
    };
    v.for_each_parameter(&r.grads, check_tensor);
    CHECK(tensors == 124);
    for (const char* k : {"conv_in", "norm1", "conv1", "norm2", "conv2", "conv_shortcut", "group_norm", "to_q", "to_k", "to_v", "0", "conv",
                          "conv_norm_out", "conv_out", "quant_conv", "post_quant_conv"}) {
        INFO("no parameter of kind " << k);
        CHECK(kinds.count(k) == 1);
    }
    check_tensor("input.image", image, r.grad_image);
}

TEST_CASE("vae grads: the sample and KL backward match central differences", "[training][vae][gradcheck]") {
    using model = vae::autoencoder_kl<cpu_backend, double>;
    dynamicid::testing::check_gradients<cpu_backend>(
        "vae sample", {dynamicid::testing::operand{{2, 3, 2, 2}}, dynamicid::testing::operand{{2, 3, 2, 2}}},
        [](auto& ctx, const auto& in) { return model::sample_forward(ctx, {in[0], in[1]}, std::uint64_t{5}).first; },
        [](auto& ctx, const auto& in, const auto& dy) {
            auto [z, s] = model::sample_forward(ctx, {in[0], in[1]}, std::uint64_t{5});
            auto d = model::sample_backward(ctx, s, dy);
            return std::vector{d.mean, d.logvar};
        });
    dynamicid::testing::check_gradients<cpu_backend>(
        "vae kl", {dynamicid::testing::operand{{2, 3, 2, 2}}, dynamicid::testing::operand{{2, 3, 2, 2}}},
        [](auto& ctx, const auto& in) { return model::kl(ctx, {in[0], in[1]}); },
        [](auto& ctx, const auto& in, const auto& dy) {
            auto d = model::kl_backward(ctx, {in[0], in[1]}, dy);
            return std::vector{d.mean, d.logvar};
        });
    // sample_forward with a seed draws what sample() draws.
    cpu_backend::context ctx{.threads = 1};
    const auto mean = ops::randn<cpu_backend, double>(ctx, {1, 2, 2, 2}, 1), logvar = ops::randn<cpu_backend, double>(ctx, {1, 2, 2, 2}, 2);
    CHECK(host(ctx, model::sample_forward(ctx, {mean, logvar}, std::uint64_t{9}, 3).first) ==
          host(ctx, model::sample(ctx, mean, logvar, 9, 3)));
}

TEST_CASE("vae grads: loss, distribution, image and all weight gradients match torch autograd", "[training][vae][golden]") {
    cpu_backend::context ctx{.threads = 1};
    const auto g = golden_file::open();
    const auto v = load_vae<float>(ctx, g);
    const double beta = g.config["beta"];
    const auto image = g.load<float>(ctx, "input.image"), noise = g.load<float>(ctx, "input.noise");
    auto r = vae_train(ctx, v, image, noise, beta);
    const double want_loss = host(ctx, g.load<float>(ctx, "output.loss"))[0];
    CHECK(std::abs(r.loss - want_loss) <= 1e-5 * std::abs(want_loss));

    double worst = 0;
    std::string worst_key;
    const auto compare = [&](const std::string& key, const tensor<float>& got) {
        INFO(key);
        REQUIRE(got.defined());
        const auto want = g.load<float>(ctx, key);
        REQUIRE(got.numel() == want.numel());
        const auto w = host(ctx, want), v_got = host(ctx, got);
        double scale = 0, largest = 0;
        for (double x : w) scale = std::max(scale, std::abs(x));
        for (double x : v_got) largest = std::max(largest, std::abs(x));
        // A gradient that is zero in exact arithmetic (to_k's bias: softmax ignores a shift
        // shared by all keys) is rounding noise in both: then its absolute size is the error.
        const double err = scale < 1e-9 ? largest : rel_to_max(v_got, w);
        INFO("relative-to-max error " << err);
        CHECK(err <= 1e-4);
        if (err > worst) {
            worst = err;
            worst_key = key;
        }
    };
    compare("output.mean", r.mean);
    compare("output.logvar", r.logvar);
    compare("output.recon", r.recon);
    compare("output.kl", r.kl);
    compare("grad.image", r.grad_image);
    std::set<std::string> seen;
    v.for_each_parameter(&r.grads, [&](const std::string& key, const tensor<float>& weight, const tensor<float>& grad) {
        CHECK(weight.shape() == g.load<float>(ctx, "vae." + key).shape());
        compare("grad.vae." + key, grad);
        seen.insert(key);
    });
    std::size_t in_file = 0;
    for (const auto& key : g.file->names())
        if (key.starts_with("grad.vae.")) {
            ++in_file;
            INFO(key);
            CHECK(seen.count(key.substr(9)) == 1);
        }
    CHECK(in_file == seen.size());
    INFO("worst relative-to-max error " << worst << " (" << worst_key << ")");
    CHECK(worst <= 1e-4);
}

TEST_CASE("vae grads: frozen training keeps nothing for the weights and bad gradients are rejected", "[training][vae]") {
    cpu_backend::context ctx{.threads = 1};
    const auto g = golden_file::open();
    const auto v = load_vae<float>(ctx, g);
    const auto image = ops::randn<cpu_backend, float>(ctx, {1, 3, 4, 4}, 1);
    auto [dist, s] = v.encode_train(ctx, image);
    CHECK_FALSE(s.encoder.conv_in.input.defined());
    CHECK_FALSE(s.quant_conv.input.defined());
    CHECK_FALSE(s.encoder.mid.attention.attention.to_q.input.defined());
    typename vae::autoencoder_kl<cpu_backend, float>::param_grads pg;
    const auto d = v.encode_backward(ctx, s, dist.mean, tensor<float>{}, &pg);
    CHECK(d.shape() == image.shape());
    CHECK_FALSE(pg.encoder.conv_in.weight.defined());
    CHECK_FALSE(pg.quant_conv.weight.defined());
    CHECK_THROWS_AS(v.encode_backward(ctx, s, image, tensor<float>{}), dynamicid::shape_error);
    auto [recon, sd] = v.decode_train(ctx, dist.mean);
    CHECK_THROWS_AS(v.decode_backward(ctx, sd, dist.mean), dynamicid::shape_error);
    CHECK_THROWS_AS(v.kl_backward(ctx, dist, tensor<float>::zeros(ctx, {3})), dynamicid::shape_error);
    // A half that was not bound cannot be trained.
    mods::weight_binder<cpu_backend, float> b(ctx, g.source, "vae.");
    const auto dec_only = vae::autoencoder_kl<cpu_backend, float>::bind(b, vae::autoencoder_kl_config::from_json(g.config["vae"]),
                                                                        vae::vae_parts::decoder);
    CHECK_THROWS_AS(dec_only.encode_train(ctx, image), dynamicid::value_error);
}
