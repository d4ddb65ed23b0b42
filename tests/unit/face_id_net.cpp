// The face-identity encoder (IResNet face_id_net), the PReLU op, the ArcFace
// loss and the identity trainer: torch autograd goldens
// (tools/golden/make_face_id_goldens.py) in f32 and f64, central differences in
// f64 on tiny configs, bad inputs, and training on a synthetic 8-class task.
#include "support/gradcheck.hpp"

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/conform/conform.hpp>
#include <dynamicid/modules/identity/face_id_net.hpp>
#include <dynamicid/training/arcface_loss.hpp>
#include <dynamicid/training/id_trainer.hpp>

#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <stop_token>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace conform = dynamicid::conform;
namespace identity = dynamicid::modules::identity;
namespace training = dynamicid::training;
namespace ops = dynamicid::ops;
namespace dt = dynamicid::testing;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using dynamicid::shape;
template <class T>
using tensor_t = dynamicid::tensor<cpu_backend, T>;
template <class T>
using net_t = identity::face_id_net<cpu_backend, T>;
using D = double;
using tensor_d = tensor_t<D>;

const fs::path golden_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "face_id";
fs::path golden(const std::string& name) { return golden_dir / (name + ".safetensors"); }

/// Gradient checks run thousands of tiny forwards: one thread avoids OpenMP overheads.
cpu_backend::context serial{.threads = 1};

// ---- golden comparison: max|got - ref| <= rtol * max(max|ref|, 1e-3 x the largest parameter gradient) ----

struct golden_check {
    const conform::golden_case& g;
    double rtol;
    std::vector<std::pair<std::string, std::vector<double>>> items;
    double worst = 0;

    template <class T>
    void add(cpu_backend::context& ctx, const std::string& name, const tensor_t<T>& got) {
        INFO(name);
        REQUIRE(got.defined());
        REQUIRE(got.numel() == g.dims(name).numel());
        items.emplace_back(name, dt::download(ctx, got));
    }

    void run() {
        REQUIRE_FALSE(items.empty());
        double global = 0;
        for (const auto& [name, got] : items)
            if (name.rfind("grad.", 0) == 0)
                for (double v : g.values(name)) global = std::max(global, std::abs(v));
        for (const auto& [name, got] : items) {
            const auto ref = g.values(name);
            double max_ref = 0, max_err = 0;
            for (std::size_t i = 0; i < ref.size(); ++i) {
                max_ref = std::max(max_ref, std::abs(ref[i]));
                max_err = std::max(max_err, std::isfinite(got[i]) ? std::abs(got[i] - ref[i]) : std::numeric_limits<double>::infinity());
            }
            const double scale = std::max(max_ref, 1e-3 * global);
            worst = std::max(worst, max_err / scale);
            INFO(g.file_name() << ' ' << name << ": max_err " << max_err << ", max|ref| " << max_ref << ", rel " << max_err / scale);
            CHECK(max_err <= rtol * scale);
        }
    }
};

template <class T>
double tolerance_for() {
    return std::is_same_v<T, double> ? 1e-6 : 1e-4;
}

identity::face_id_net_config net_config_of(const nlohmann::json& j) {
    return {.input_size = j["input_size"].get<index_t>(),
            .in_channels = j["in_channels"].get<index_t>(),
            .widths = j["widths"].get<std::vector<index_t>>(),
            .blocks = j["blocks"].get<std::vector<index_t>>(),
            .embedding_size = j["embedding_size"].get<index_t>(),
            .batch_norm_eps = j["eps"].get<double>()};
}

std::vector<std::int64_t> labels_of(const conform::golden_case& g) {
    std::vector<std::int64_t> out;
    for (double v : g.values("input.labels")) out.push_back(static_cast<std::int64_t>(v));
    return out;
}

template <class T>
void check_train_golden() {
    cpu_backend::context ctx{.threads = 1};
    const auto g = conform::golden_case::open(golden("face_id_train"));
    REQUIRE(g.module() == "IResNet.train_arcface");
    auto net = net_t<T>::load(ctx, dynamicid::modules::weight_source::open({golden("face_id_train")}), net_config_of(g.config()), "param.");
    net.train();
    const auto images = g.load<cpu_backend, T>(ctx, "input.images");
    const auto class_weights = g.load<cpu_backend, T>(ctx, "param.margin.weight");
    const auto labels = labels_of(g);
    const training::arcface_options opt{.scale = g.setting<double>("scale"), .margin = g.setting<double>("margin")};
    auto [embedding, saved] = net.forward_train(ctx, images, {.input = true, .params = true});
    auto [loss, loss_saved] = training::arcface_loss_forward(ctx, embedding, class_weights, std::span<const std::int64_t>(labels), opt);
    const auto lg = training::arcface_loss_backward(ctx, loss_saved);
    auto grads = net.backward(ctx, saved, lg.embeddings);
    golden_check c{g, tolerance_for<T>(), {}};
    c.add(ctx, "output.embedding", embedding);
    c.add(ctx, "output.loss", loss);
    c.add(ctx, "grad.input.images", grads.images);
    c.add(ctx, "grad.param.margin.weight", lg.class_weights);
    std::size_t n_params = 0;
    net_t<T>::visit(grads.weights, [&](const std::string& k, const tensor_t<T>& t) {
        c.add(ctx, "grad.param." + k, t);
        ++n_params;
    });
    CHECK(n_params == 43);  // every parameter of the tiny IResNet, features.weight included
    std::size_t n_running = 0;
    net_t<T>::visit(net.weights(), [&](const std::string& k, const tensor_t<T>& t) {
        c.add(ctx, "updated." + k, t);
        ++n_running;
    }, false, true);
    CHECK(n_running == 2 * 14);
    c.run();
    UNSCOPED_INFO("face_id_train golden, worst error relative to max|ref|: " << c.worst);
}

template <class T>
void check_eval_golden() {
    cpu_backend::context ctx{.threads = 1};
    const auto g = conform::golden_case::open(golden("face_id_eval"));
    REQUIRE(g.module() == "IResNet.eval");
    auto net = net_t<T>::load(ctx, dynamicid::modules::weight_source::open({golden("face_id_eval")}), net_config_of(g.config()), "param.");
    REQUIRE_FALSE(net.training());
    const auto images = g.load<cpu_backend, T>(ctx, "input.images");
    const auto dy = g.load<cpu_backend, T>(ctx, "input.grad_output");
    const auto inference = net.forward(ctx, images);
    auto [embedding, saved] = net.forward_train(ctx, images, {.input = true, .params = true});
    auto grads = net.backward(ctx, saved, dy);
    golden_check c{g, tolerance_for<T>(), {}};
    c.add(ctx, "output.embedding", inference);
    c.add(ctx, "output.embedding", embedding);
    c.add(ctx, "output.loss", ops::sum(ctx, ops::mul(ctx, embedding, dy), {0, 1}));
    c.add(ctx, "grad.input.images", grads.images);
    net_t<T>::visit(grads.weights, [&](const std::string& k, const tensor_t<T>& t) { c.add(ctx, "grad.param." + k, t); });
    // Frozen: the same input gradient, no weight gradients.
    auto [frozen_y, frozen_saved] = net.forward_train(ctx, images, {.input = true, .params = false});
    auto frozen = net.backward(ctx, frozen_saved, dy);
    c.add(ctx, "grad.input.images", frozen.images);
    std::size_t weight_grads = 0;
    net_t<T>::visit(frozen.weights, [&](const std::string&, const tensor_t<T>&) { ++weight_grads; });
    CHECK(weight_grads == 0);
    c.run();
    UNSCOPED_INFO("face_id_eval golden, worst error relative to max|ref|: " << c.worst);
}

template <class T>
void check_arcface_golden(const std::string& name) {
    cpu_backend::context ctx{.threads = 1};
    const auto g = conform::golden_case::open(golden(name));
    REQUIRE(g.module() == "ArcFace");
    const auto x = g.load<cpu_backend, T>(ctx, "input.embeddings");
    const auto w = g.load<cpu_backend, T>(ctx, "input.class_weights");
    const auto labels = labels_of(g);
    const training::arcface_options opt{.scale = g.setting<double>("scale"), .margin = g.setting<double>("margin"),
                                        .easy_margin = g.setting<bool>("easy_margin")};
    auto [loss, saved] = training::arcface_loss_forward(ctx, x, w, std::span<const std::int64_t>(labels), opt);
    const auto grads = training::arcface_loss_backward(ctx, saved);
    golden_check c{g, tolerance_for<T>(), {}};
    c.add(ctx, "output.loss", loss);
    c.add(ctx, "grad.input.embeddings", grads.embeddings);
    c.add(ctx, "grad.input.class_weights", grads.class_weights);
    c.run();
    UNSCOPED_INFO(name << " golden, worst error relative to max|ref|: " << c.worst);
}

// ---- central differences ------------------------------------------------------

identity::face_id_net_config tiny_config() {
    return {.input_size = 6, .in_channels = 2, .widths = {2, 3}, .blocks = {2, 1}, .embedding_size = 3};
}

/// skeleton with its tensors replaced, in visit order (buffers included), by inputs[first...].
net_t<D>::params fill(net_t<D>::params p, const std::vector<tensor_d>& inputs, std::size_t first) {
    net_t<D>::visit(p, [&](const std::string&, tensor_d& t) { t = inputs.at(first++); }, true, true);
    return p;
}

void gradcheck_net(bool train) {
    cpu_backend::context ctx{.threads = 1};
    const auto cfg = tiny_config();
    const auto skeleton = net_t<D>::initial_params(ctx, cfg, 1);
    const index_t batch = 3;
    std::vector<dt::operand> operands{{{batch, cfg.in_channels, cfg.input_size, cfg.input_size}}};
    auto copy = skeleton;
    net_t<D>::visit(copy, [&](const std::string& k, tensor_d& t) {
        const auto ends = [&](const std::string& s) { return k.size() >= s.size() && k.compare(k.size() - s.size(), s.size(), s) == 0; };
        if (ends("running_mean")) operands.push_back({t.shape(), [](double x) { return 0.3 * x; }, false});
        else if (ends("running_var")) operands.push_back({t.shape(), dt::positive(0.5), false});
        else if (ends("prelu.weight")) operands.push_back({t.shape(), [](double x) { return 0.25 + 0.1 * x; }});
        else if (t.rank() == 1) operands.push_back({t.shape(), [](double x) { return 1.0 + 0.2 * x; }});
        else operands.push_back({t.shape(), [](double x) { return 0.5 * x; }});
    }, true, true);
    const auto model = [&](const std::vector<tensor_d>& in) {
        net_t<D> net(serial, cfg, fill(skeleton, in, 1));
        net.train(train);
        return net;
    };
    dt::check_gradients<cpu_backend>(
        train ? "face_id_net training mode" : "face_id_net eval mode", operands,
        [&](cpu_backend::context&, const std::vector<tensor_d>& in) { return model(in).forward_train(serial, in[0]).first; },
        [&](cpu_backend::context&, const std::vector<tensor_d>& in, const tensor_d& dy) {
            auto net = model(in);
            auto [y, saved] = net.forward_train(serial, in[0], {.input = true, .params = true});
            auto g = net.backward(serial, saved, dy);
            std::vector<tensor_d> out{g.images};
            // Gradients in the operands' order; running statistics have none.
            std::map<std::string, tensor_d> by_key;
            net_t<D>::visit(g.weights, [&](const std::string& k, tensor_d& t) { by_key[k] = t; });
            auto order = skeleton;
            net_t<D>::visit(order, [&](const std::string& k, tensor_d&) {
                const auto it = by_key.find(k);
                out.push_back(it == by_key.end() ? tensor_d{} : it->second);
            }, true, true);
            return out;
        },
        train ? 41 : 42);
}

}  // namespace

// ---- PReLU --------------------------------------------------------------------

TEST_CASE("face id: prelu matches its definition and torch's choice at zero", "[identity][ops]") {
    cpu_backend::context ctx{.threads = 1};
    const auto x = tensor_t<float>::from_host(ctx, {1, 2, 1, 3}, std::vector<float>{-2.0f, 0.0f, 3.0f, -1.0f, 0.5f, 0.0f});
    const auto w = tensor_t<float>::from_host(ctx, {2}, std::vector<float>{0.25f, -0.5f});
    CHECK(ops::prelu(ctx, x, w).to_host(ctx) == std::vector<float>{-0.5f, 0.0f, 3.0f, 0.5f, 0.5f, 0.0f});
    auto [y, saved] = ops::prelu_forward(ctx, x, w);
    const auto g = ops::prelu_backward(ctx, saved, tensor_t<float>::full(ctx, x.shape(), 1.0f));
    // torch: x > 0 ? dy : w dy, so x = 0 takes the slope.
    CHECK(g.input.to_host(ctx) == std::vector<float>{0.25f, 0.25f, 1.0f, -0.5f, 1.0f, -0.5f});
    CHECK(g.weight.to_host(ctx) == std::vector<float>{-2.0f, -1.0f});
    CHECK_THROWS_AS(ops::prelu(ctx, x, tensor_t<float>::zeros(ctx, {3})), dynamicid::shape_error);
    CHECK_THROWS_AS(ops::prelu(ctx, x, tensor_t<float>::zeros(ctx, {2, 1})), dynamicid::shape_error);
}

TEST_CASE("face id: prelu gradients match central differences", "[identity][ops][gradcheck]") {
    const auto off_kink = dt::away_from_zero(0.05);
    for (const index_t slopes : {index_t{3}, index_t{1}}) {
        dt::check_gradients<cpu_backend>(
            "prelu with " + std::to_string(slopes) + " slope(s)", {{{2, 3, 2, 2}, off_kink}, {{slopes}}},
            [](cpu_backend::context& ctx, const std::vector<tensor_d>& in) { return ops::prelu(ctx, in[0], in[1]); },
            [](cpu_backend::context& ctx, const std::vector<tensor_d>& in, const tensor_d& dy) {
                auto [y, s] = ops::prelu_forward(ctx, in[0], in[1]);
                auto g = ops::prelu_backward(ctx, s, dy);
                return std::vector<tensor_d>{g.input, g.weight};
            },
            51 + static_cast<std::uint64_t>(slopes));
    }
    // Rank 2 (a Linear's output), as torch applies PReLU to (N, C).
    dt::check_gradients<cpu_backend>(
        "prelu on (N, C)", {{{4, 3}, off_kink}, {{3}}},
        [](cpu_backend::context& ctx, const std::vector<tensor_d>& in) { return ops::prelu(ctx, in[0], in[1]); },
        [](cpu_backend::context& ctx, const std::vector<tensor_d>& in, const tensor_d& dy) {
            auto [y, s] = ops::prelu_forward(ctx, in[0], in[1]);
            auto g = ops::prelu_backward(ctx, s, dy);
            return std::vector<tensor_d>{g.input, g.weight};
        },
        55);
}

// ---- goldens ------------------------------------------------------------------

TEST_CASE("face id: IResNet training-mode forward, ArcFace loss, gradients and running statistics match torch", "[identity][training][golden]") {
    check_train_golden<float>();
    check_train_golden<double>();
}

TEST_CASE("face id: IResNet eval-mode forward and gradients match torch", "[identity][training][golden]") {
    check_eval_golden<float>();
    check_eval_golden<double>();
}

TEST_CASE("face id: ArcFace loss matches insightface's margin in torch on both sides of the threshold", "[identity][training][losses][golden]") {
    check_arcface_golden<float>("arcface");
    check_arcface_golden<double>("arcface");
    check_arcface_golden<float>("arcface_easy");
    check_arcface_golden<double>("arcface_easy");
}

// ---- central differences --------------------------------------------------------

TEST_CASE("face id: IResNet training-mode gradients match central differences", "[identity][training][gradcheck]") { gradcheck_net(true); }

TEST_CASE("face id: IResNet eval-mode gradients match central differences", "[identity][training][gradcheck]") { gradcheck_net(false); }

TEST_CASE("face id: ArcFace loss gradients match central differences", "[identity][training][losses][gradcheck]") {
    const std::vector<std::int64_t> labels{0, 2, 1, 2};
    for (const bool easy : {false, true}) {
        const training::arcface_options opt{.scale = 64.0, .margin = 0.5, .easy_margin = easy};
        dt::check_gradients<cpu_backend>(
            easy ? "arcface easy margin" : "arcface", {{{4, 5}}, {{3, 5}}},
            [&](cpu_backend::context& ctx, const std::vector<tensor_d>& in) {
                return training::arcface_loss_forward(ctx, in[0], in[1], std::span<const std::int64_t>(labels), opt).first;
            },
            [&](cpu_backend::context& ctx, const std::vector<tensor_d>& in, const tensor_d& dy) {
                auto [loss, saved] = training::arcface_loss_forward(ctx, in[0], in[1], std::span<const std::int64_t>(labels), opt);
                auto g = training::arcface_loss_backward(ctx, saved);
                const double r = dy.to_host(ctx)[0];
                return std::vector<tensor_d>{ops::scale(ctx, g.embeddings, r), ops::scale(ctx, g.class_weights, r)};
            },
            easy ? 61 : 62);
    }
}

// ---- bad inputs ---------------------------------------------------------------

TEST_CASE("face id: bad shapes, configs, labels and NaNs are clear errors", "[identity][training]") {
    cpu_backend::context ctx{.threads = 1};
    const auto cfg = tiny_config();
    net_t<float> net(ctx, cfg, net_t<float>::initial_params(ctx, cfg, 3));
    const auto images = ops::randn<cpu_backend, float>(ctx, {2, 2, 6, 6}, 1);
    CHECK(net.forward(ctx, images).shape() == shape({2, 3}));
    CHECK_THROWS_AS(net.forward(ctx, ops::randn<cpu_backend, float>(ctx, {2, 3, 6, 6}, 1)), dynamicid::shape_error);
    CHECK_THROWS_AS(net.forward(ctx, ops::randn<cpu_backend, float>(ctx, {2, 2, 8, 8}, 1)), dynamicid::shape_error);
    net.train();
    CHECK_THROWS_AS(net.forward_train(ctx, ops::randn<cpu_backend, float>(ctx, {1, 2, 6, 6}, 1)), dynamicid::value_error);
    auto [y, saved] = net.forward_train(ctx, images);
    CHECK_THROWS_AS(net.backward(ctx, saved, tensor_t<float>::zeros(ctx, {3, 3})), dynamicid::shape_error);

    auto bad = cfg;
    bad.blocks = {1};
    CHECK_THROWS_AS(net_t<float>::initial_params(ctx, bad, 1), dynamicid::value_error);
    auto p = net_t<float>::initial_params(ctx, cfg, 1);
    p.layers[1][0].conv2 = tensor_t<float>::zeros(ctx, {3, 3, 1, 1});
    CHECK_THROWS_AS(net_t<float>(ctx, cfg, p), dynamicid::shape_error);
    // A state dict of another size names the offending keys.
    auto other = cfg;
    other.embedding_size = 4;
    const auto missing = dynamicid::modules::weight_source::open({golden("face_id_eval")});
    CHECK_THROWS_AS(net_t<float>::load(ctx, missing, other, "param."), dynamicid::io_error);

    const auto w = ops::randn<cpu_backend, float>(ctx, {4, 3}, 2);
    const auto e = ops::randn<cpu_backend, float>(ctx, {2, 3}, 3);
    const std::vector<std::int64_t> ok{0, 3}, out_of_range{0, 4}, short_labels{1};
    const auto loss = [&](const tensor_t<float>& x, const tensor_t<float>& cw, const std::vector<std::int64_t>& l) {
        return training::arcface_loss_forward(ctx, x, cw, std::span<const std::int64_t>(l));
    };
    CHECK_NOTHROW(loss(e, w, ok));
    CHECK_THROWS_AS(loss(e, w, out_of_range), dynamicid::value_error);
    CHECK_THROWS_AS(loss(e, w, short_labels), dynamicid::shape_error);
    CHECK_THROWS_AS(loss(e, ops::randn<cpu_backend, float>(ctx, {4, 5}, 2), ok), dynamicid::shape_error);
    const auto nan = tensor_t<float>::full(ctx, {2, 3}, std::numeric_limits<float>::quiet_NaN());
    CHECK_THROWS_AS(loss(nan, w, ok), dynamicid::value_error);
    CHECK_THROWS_AS(training::arcface_loss_forward(ctx, e, w, std::span<const std::int64_t>(ok), {.scale = 64, .margin = 2.0}),
                    dynamicid::value_error);
    // A zero embedding is F.normalize's eps case: finite loss and gradients.
    auto [z_loss, z_saved] = loss(tensor_t<float>::zeros(ctx, {2, 3}), w, ok);
    const auto zg = training::arcface_loss_backward(ctx, z_saved);
    for (float v : zg.embeddings.to_host(ctx)) CHECK(std::isfinite(v));
    CHECK(std::isfinite(z_loss.to_host(ctx)[0]));
}

// ---- the trainer on a synthetic task -----------------------------------------------

namespace {

struct scratch_dir {
    fs::path path;
    explicit scratch_dir(const std::string& name) {
        path = fs::temp_directory_path() / ("dynamicid_face_id_" + name + "_" + std::to_string(::getpid()));
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~scratch_dir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

constexpr index_t classes = 8, side = 16;

/// Class k: a soft blob of colour k at position k on a random grey background,
/// its centre jittered by up to 2 pixels, its brightness by 30 %, plus noise.
/// A pure function of (step, item): resumed runs see the same images.
training::id_batch<cpu_backend, float> blobs(cpu_backend::context& ctx, std::int64_t step, index_t n) {
    static const float palette[classes][3] = {{1, -1, -1}, {-1, 1, -1}, {-1, -1, 1}, {1, 1, -1},
                                              {1, -1, 1},  {-1, 1, 1},  {1, 1, 1},   {-1, -1, -1}};
    const std::uint64_t seed = 0xb10b5ull + static_cast<std::uint64_t>(step) * 7919u;
    std::vector<float> px(static_cast<std::size_t>(n * 3 * side * side));
    std::vector<std::int64_t> labels(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) {
        const auto k = static_cast<std::int64_t>(i % classes);
        labels[static_cast<std::size_t>(i)] = k;
        const std::uint64_t r = seed * 131u + static_cast<std::uint64_t>(i);
        const double cx = 4.0 + 8.0 * static_cast<double>(k % 2) + 4.0 * (dynamicid::philox::uniform(r, 0) - 0.5);
        const double cy = 2.5 + 3.5 * static_cast<double>(k / 2) + 4.0 * (dynamicid::philox::uniform(r, 1) - 0.5);
        const double gain = 0.7 + 0.6 * dynamicid::philox::uniform(r, 2);
        const double grey = dynamicid::philox::uniform(r, 3) - 0.5;
        for (index_t c = 0; c < 3; ++c)
            for (index_t y = 0; y < side; ++y)
                for (index_t x = 0; x < side; ++x) {
                    const double d2 = (x - cx) * (x - cx) + (y - cy) * (y - cy);
                    const double blob = std::exp(-d2 / 6.0);
                    const auto idx = static_cast<std::size_t>(((i * 3 + c) * side + y) * side + x);
                    const double noise = 0.1 * dynamicid::philox::normal(r, 16 + idx);
                    px[idx] = static_cast<float>(grey * (1 - blob) + gain * palette[k][c] * blob + noise);
                }
    }
    return {tensor_t<float>::from_host(ctx, {n, 3, side, side}, px), labels};
}

training::id_trainer_config blob_config(const fs::path& out, std::int64_t steps) {
    training::id_trainer_config cfg;
    cfg.net = {.input_size = side, .in_channels = 3, .widths = {8, 16}, .blocks = {1, 1}, .embedding_size = 16};
    cfg.num_classes = classes;
    cfg.output_dir = out;
    cfg.steps = steps;
    cfg.lr = 3e-3;
    cfg.seed = 5;
    return cfg;
}

/// Best-threshold balanced verification accuracy over every pair of held-out images (cosine similarity).
double verification_accuracy(cpu_backend::context& ctx, const net_t<float>& net, double* gap) {
    const auto held_out = blobs(ctx, 1'000'000, 48);
    const auto e = net.forward(ctx, held_out.images).to_host(ctx);
    const auto n = held_out.labels.size();
    const auto dim = static_cast<std::size_t>(net.embedding_size());
    std::vector<std::pair<double, bool>> pairs;
    for (std::size_t a = 0; a < n; ++a)
        for (std::size_t b = a + 1; b < n; ++b) {
            double dot = 0, na = 0, nb = 0;
            for (std::size_t k = 0; k < dim; ++k) {
                dot += e[a * dim + k] * e[b * dim + k];
                na += e[a * dim + k] * e[a * dim + k];
                nb += e[b * dim + k] * e[b * dim + k];
            }
            pairs.emplace_back(dot / std::sqrt(na * nb), held_out.labels[a] == held_out.labels[b]);
        }
    double same = 0, diff = 0, n_same = 0, n_diff = 0;
    for (const auto& [s, positive] : pairs) (positive ? same : diff) += s, (positive ? n_same : n_diff) += 1;
    *gap = same / n_same - diff / n_diff;
    std::sort(pairs.begin(), pairs.end());
    // Threshold between sorted[i-1] and sorted[i]: everything from i up is called "same". Balanced
    // (mean of the true-positive and true-negative rates): only 1 pair in 8 is a same-identity pair.
    double positives_above = n_same, best = 0;
    for (std::size_t i = 0; i <= pairs.size(); ++i) {
        const double negatives_below = static_cast<double>(i) - (n_same - positives_above);
        best = std::max(best, 0.5 * (positives_above / n_same + negatives_below / n_diff));
        if (i < pairs.size() && pairs[i].second) positives_above -= 1;
    }
    return best;
}

std::vector<double> run_losses(cpu_backend::context& ctx, training::id_trainer<cpu_backend>& t) {
    std::vector<double> out;
    t.run(ctx, {}, [&](const training::train_progress& p) { out.push_back(p.loss); });
    return out;
}

double mean_of(const std::vector<double>& v, std::size_t from, std::size_t to) {
    double s = 0;
    for (std::size_t i = from; i < to; ++i) s += v[i];
    return s / static_cast<double>(to - from);
}

}  // namespace

TEST_CASE("face id: the identity trainer learns 8 synthetic identities, deterministically", "[identity][training][trainer]") {
    cpu_backend::context ctx{.threads = 1};
    scratch_dir dir("learn");
    const std::int64_t steps = 60;
    const auto source = [](cpu_backend::context& c, std::int64_t step) { return blobs(c, step, 32); };
    training::id_trainer<cpu_backend> a(ctx, blob_config(dir.path / "a", steps), source);
    double gap0 = 0;
    const double before = verification_accuracy(ctx, a.net(), &gap0);
    const auto la = run_losses(ctx, a);
    REQUIRE(la.size() == static_cast<std::size_t>(steps));
    const double first = mean_of(la, 0, 5), last = mean_of(la, la.size() - 5, la.size());
    double gap = 0;
    const double after = verification_accuracy(ctx, a.net(), &gap);
    UNSCOPED_INFO("arcface loss, mean of the first 5 steps " << first << ", of the last 5 " << last << "; verification accuracy " << before
                                                             << " -> " << after << ", same-minus-different cosine " << gap0 << " -> " << gap
                                                             << ", last batch classification accuracy " << a.last_accuracy());
    CHECK(last < 0.4 * first);  // the loss falls by more than 60 % in 60 steps
    CHECK(after > 0.98);
    CHECK(gap > 0.5);

    // The same configuration gives the same run, bit for bit.
    training::id_trainer<cpu_backend> b(ctx, blob_config(dir.path / "b", steps), source);
    CHECK(run_losses(ctx, b) == la);

    // The checkpoint's net loads into face_id_net and gives the trainer's embeddings.
    const auto folder = dir.path / "a" / "checkpoint-000060";
    REQUIRE(fs::exists(folder / "face_id_net.safetensors"));
    const auto loaded =
        net_t<float>::load(ctx, dynamicid::modules::weight_source::open({folder / "face_id_net.safetensors"}), a.config().net);
    const auto probe = blobs(ctx, 7, 8).images;
    CHECK(loaded.forward(ctx, probe).to_host(ctx) == a.net().forward(ctx, probe).to_host(ctx));
}

TEST_CASE("face id: a resumed identity training run continues bit for bit", "[identity][training][trainer]") {
    cpu_backend::context ctx{.threads = 1};
    scratch_dir dir("resume");
    const auto source = [](cpu_backend::context& c, std::int64_t step) { return blobs(c, step, 16); };
    auto full_cfg = blob_config(dir.path / "full", 6);
    training::id_trainer<cpu_backend> full(ctx, full_cfg, source);
    const auto l_full = run_losses(ctx, full);

    auto part_cfg = blob_config(dir.path / "part", 6);
    part_cfg.checkpoint_every = 3;
    std::stop_source stop;
    training::id_trainer<cpu_backend> first(ctx, part_cfg, source);
    std::vector<double> l_part;
    first.run(ctx, stop.get_token(), [&](const training::train_progress& p) {
        l_part.push_back(p.loss);
        if (p.step == 3) stop.request_stop();
    });
    REQUIRE(first.step() == 3);
    part_cfg.resume = "latest";
    training::id_trainer<cpu_backend> second(ctx, part_cfg, source);
    CHECK(second.step() == 3);
    for (double l : run_losses(ctx, second)) l_part.push_back(l);
    CHECK(l_part == l_full);
    CHECK(second.class_weights().to_host(ctx) == full.class_weights().to_host(ctx));
    const auto probe = blobs(ctx, 9, 8).images;
    CHECK(second.net().forward(ctx, probe).to_host(ctx) == full.net().forward(ctx, probe).to_host(ctx));

    // A checkpoint written with another seed is refused.
    auto other = part_cfg;
    other.seed = 6;
    CHECK_THROWS_AS(training::id_trainer<cpu_backend>(ctx, other, source), dynamicid::value_error);
    // A source that breaks its contract is a clear error.
    auto fresh = blob_config(dir.path / "bad", 2);
    training::id_trainer<cpu_backend> bad(ctx, fresh, [](cpu_backend::context& c, std::int64_t step) {
        auto b = blobs(c, step, 4);
        b.labels.pop_back();
        return b;
    });
    CHECK_THROWS_AS(bad.train_step(ctx), dynamicid::shape_error);
    CHECK_THROWS_AS(training::id_trainer<cpu_backend>(ctx, blob_config(dir.path / "x", 1), {}), dynamicid::value_error);
}

TEST_CASE("face id: a state dict records its sizes and loads without them, and bad records are clear errors", "[identity]") {
    cpu_backend::context ctx{.threads = 1};
    const auto cfg = tiny_config();
    const net_t<float> net(ctx, cfg, net_t<float>::initial_params(ctx, cfg, 5));
    const auto dir = fs::temp_directory_path() / ("dynamicid_face_id_file_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    const auto file = dir / "net.safetensors";
    net.state_dict(ctx).write(file);
    const auto loaded = net_t<float>::load_file(ctx, file);
    CHECK(loaded.settings().widths == cfg.widths);
    CHECK(loaded.settings().blocks == cfg.blocks);
    CHECK(loaded.settings().embedding_size == cfg.embedding_size);
    const auto images = ops::randn<cpu_backend, float>(ctx, {2, cfg.in_channels, cfg.input_size, cfg.input_size}, 9);
    CHECK(loaded.forward(ctx, images).to_host(ctx) == net.forward(ctx, images).to_host(ctx));

    // No record, a broken record, a record of other sizes.
    const auto rewrite = [&](const char* name, const char* value) {
        dynamicid::io::safetensors_writer w;
        const auto f = dynamicid::io::safetensors_file::open(file);
        for (const auto& n : f.names()) w.add(n, f.info(n).dims, f.to_vector<float>(n));
        if (value) w.set_metadata(name, value);
        const auto out = dir / "rewritten.safetensors";
        w.write(out);
        return out;
    };
    CHECK_THROWS_AS(net_t<float>::load_file(ctx, rewrite("face_id_net_config", nullptr)), dynamicid::io_error);
    CHECK_THROWS_AS(net_t<float>::load_file(ctx, rewrite("face_id_net_config", "{not json")), dynamicid::value_error);
    CHECK_THROWS_AS(net_t<float>::load_file(ctx, rewrite("face_id_net_config", R"({"widths": [4], "blocks": [1, 1]})")), dynamicid::value_error);
    CHECK_THROWS_AS(net_t<float>::load_file(ctx, rewrite("face_id_net_config", R"({"widths": [-4, 8]})")), dynamicid::value_error);
    CHECK_THROWS_AS(net_t<float>::load_file(ctx, rewrite("face_id_net_config", R"({"embedding_size": 7})")), dynamicid::io_error);
    CHECK_THROWS_AS(net_t<float>::load_file(ctx, dir / "absent.safetensors"), dynamicid::io_error);
    fs::remove_all(dir);
}
