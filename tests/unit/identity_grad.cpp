// Backward passes of the identity modules (ProjPlusModel, IMR, KeyPointEncoder
// with training-mode BatchNorm) and of the training losses: torch autograd
// goldens from the authors' released modules (tools/golden/make_identity_grad_goldens.py)
// in f32 and f64, and central differences in f64 on tiny configs.
#include "support/gradcheck.hpp"

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/conform/conform.hpp>
#include <dynamicid/modules/dynamicid/imr.hpp>
#include <dynamicid/modules/dynamicid/keypoint_encoder.hpp>
#include <dynamicid/modules/identity/proj_plus.hpp>
#include <dynamicid/training/losses.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace conform = dynamicid::conform;
namespace imr = dynamicid::modules::imr;
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
using proj_t = identity::proj_plus_model<cpu_backend, T>;
template <class T>
using imr_t = imr::imr_model<cpu_backend, T>;
template <class T>
using kpe_t = imr::keypoint_encoder<cpu_backend, T>;

const fs::path grad_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "identity_grad";

fs::path golden(const std::string& name) { return grad_dir / (name + ".safetensors"); }

// ---- every weight under its state-dict key, in one fixed order ---------------

template <class P, class F>
void visit_proj(P& w, F&& f) {
    const auto lin = [&](const std::string& k, auto& l) {
        f(k + ".weight", l.weight);
        f(k + ".bias", l.bias);
    };
    lin("proj.0", w.proj_0);
    lin("proj.2", w.proj_2);
    lin("norm", w.norm);
    const std::string r = "perceiver_resampler.";
    lin(r + "proj_in", w.proj_in);
    lin(r + "proj_out", w.proj_out);
    lin(r + "norm_out", w.norm_out);
    for (std::size_t i = 0; i < w.layers.size(); ++i) {
        const std::string l = r + "layers." + std::to_string(i) + ".";
        auto& a = w.layers[i].attention;
        auto& ff = w.layers[i].feed_forward;
        lin(l + "0.norm1", a.norm1);
        lin(l + "0.norm2", a.norm2);
        f(l + "0.to_q.weight", a.to_q);
        f(l + "0.to_kv.weight", a.to_kv);
        f(l + "0.to_out.weight", a.to_out);
        lin(l + "1.0", ff.norm);
        f(l + "1.1.weight", ff.up);
        f(l + "1.3.weight", ff.down);
    }
}

template <class P, class F>
void visit_imr(P& w, F&& f) {
    const auto both = [&](const std::string& k, auto& l) {
        f(k + ".weight", l.weight);
        f(k + ".bias", l.bias);
    };
    both("feature_fusion.0", w.fusion_norm0);
    both("feature_fusion.1", w.fusion_linear1);
    both("feature_fusion.3", w.fusion_norm3);
    both("feature_fusion.4", w.fusion_linear4);
    both("norm_in", w.norm_in);
    both("proj_in", w.proj_in);
    both("norm_out", w.norm_out);
    both("proj_out", w.proj_out);
    const auto net = [&](const std::string& name, auto& layers) {
        for (std::size_t i = 0; i < layers.size(); ++i) {
            const std::string l = name + "." + std::to_string(i) + ".";
            auto& x = layers[i];
            both(l + "0.norm1", x.cross.norm1);
            both(l + "0.norm2", x.cross.norm2);
            f(l + "0.to_q.weight", x.cross.to_q.weight);
            f(l + "0.to_kv.weight", x.cross.to_kv.weight);
            f(l + "0.to_out.weight", x.cross.to_out.weight);
            both(l + "1.norm1", x.self.norm1);
            f(l + "1.to_q.weight", x.self.to_q.weight);
            f(l + "1.to_kv.weight", x.self.to_kv.weight);
            f(l + "1.to_out.weight", x.self.to_out.weight);
            both(l + "2.0", x.ff.norm0);
            f(l + "2.1.weight", x.ff.up.weight);
            f(l + "2.3.weight", x.ff.down.weight);
        }
    };
    net("disentangleNet", w.disentangle);
    net("entangleNet", w.entangle);
}

/// Trainable weights, then (when `running`) the BatchNorm running statistics.
template <class P, class F>
void visit_kpe(P& w, F&& f, bool running = false) {
    for (std::size_t i = 0; i < w.blocks.size(); ++i)
        for (std::size_t j = 0; j < w.blocks[i].size(); ++j) {
            const std::string k = "blocks." + std::to_string(i) + "." + std::to_string(j) + ".conv_block.";
            auto& u = w.blocks[i][j];
            f(k + "0.weight", u.conv_weight);
            f(k + "0.bias", u.conv_bias);
            f(k + "1.weight", u.bn_weight);
            f(k + "1.bias", u.bn_bias);
        }
    if (!running) return;
    for (std::size_t i = 0; i < w.blocks.size(); ++i)
        for (std::size_t j = 0; j < w.blocks[i].size(); ++j) {
            const std::string k = "blocks." + std::to_string(i) + "." + std::to_string(j) + ".conv_block.";
            f(k + "1.running_mean", w.blocks[i][j].running_mean);
            f(k + "1.running_var", w.blocks[i][j].running_var);
        }
}

// ---- golden comparison --------------------------------------------------------

/// Collects (computed, golden name) pairs and checks each against
/// max|got - ref| <= rtol * max(max|ref|, floor), where floor = 1e-3 x the
/// largest reference value among the case's parameter gradients: a gradient
/// that is zero in exact arithmetic (a conv bias before training-mode
/// BatchNorm) holds only rounding noise on the reference side.
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
            if (name.rfind("grad.param.", 0) == 0)
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
    return std::is_same_v<T, double> ? 2e-6 : 1e-4;
}

template <class T>
void check_proj_golden() {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(golden("proj_plus"));
    REQUIRE(g.module() == "ProjPlusModel.backward");
    const identity::proj_plus_config cfg{.cross_attention_dim = g.setting<index_t>("cross_attention_dim"),
                                         .id_embeddings_dim = g.setting<index_t>("id_embeddings_dim"),
                                         .clip_embeddings_dim = g.setting<index_t>("clip_embeddings_dim"),
                                         .num_tokens = g.setting<index_t>("num_tokens"),
                                         .depth = g.setting<index_t>("depth"),
                                         .dim_head = g.setting<index_t>("dim_head"),
                                         .heads = g.setting<index_t>("heads"),
                                         .ff_mult = g.setting<index_t>("ff_mult")};
    const auto model = proj_t<T>::load(ctx, g.file(), cfg, "param.");
    const auto id = g.load<cpu_backend, T>(ctx, "input.id_embeds");
    const auto clip = g.load<cpu_backend, T>(ctx, "input.clip_embeds");
    const auto dy = g.load<cpu_backend, T>(ctx, "input.grad_output");
    auto [tokens, saved] = model.forward_train(ctx, id, clip, {.input = true, .params = true});
    auto grads = model.backward(ctx, saved, dy);
    golden_check c{g, tolerance_for<T>(), {}};
    c.add(ctx, "output.tokens", tokens);
    c.add(ctx, "output.loss", ops::sum(ctx, ops::mul(ctx, tokens, dy), {0, 1, 2}));
    c.add(ctx, "grad.input.id_embeds", grads.id_embeds);
    c.add(ctx, "grad.input.clip_embeds", grads.clip_embeds);
    visit_proj(grads.weights, [&](const std::string& k, const tensor_t<T>& t) { c.add(ctx, "grad.param." + k, t); });
    c.run();
    UNSCOPED_INFO("proj_plus golden, worst error relative to max|ref|: " << c.worst);
}

imr::imr_config imr_config_of(const nlohmann::json& j) {
    return {.dim = j["dim"].get<index_t>(),
            .dim_head = j["dim_head"].get<index_t>(),
            .heads = j["heads"].get<index_t>(),
            .num_queries = j["num_queries"].get<index_t>(),
            .embedding_dim = j["embedding_dim"].get<index_t>(),
            .txt_dim = j["txt_dim"].get<index_t>(),
            .ff_mult = j["ff_mult"].get<index_t>(),
            .disentangle_depth = j["disentangle_depth"].get<index_t>(),
            .entangle_depth = j["entangle_depth"].get<index_t>()};
}

imr::keypoint_encoder_config kpe_config_of(const nlohmann::json& j) {
    imr::keypoint_encoder_config cfg;
    cfg.blocks.clear();
    for (const auto& block : j["blocks"]) {
        std::vector<imr::keypoint_unit> units;
        for (const auto& u : block)
            units.push_back({u["kernel"].get<index_t>(), u["stride"].get<index_t>(), u["padding"].get<index_t>(), u["residual"].get<bool>()});
        cfg.blocks.push_back(std::move(units));
    }
    cfg.batch_norm_eps = j["eps"].get<double>();
    cfg.batch_norm_momentum = j["momentum"].get<double>();
    return cfg;
}

template <class T>
void check_imr_golden() {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(golden("imr"));
    REQUIRE(g.module() == "IMR.backward");
    const auto model = imr_t<T>::load(ctx, dynamicid::modules::weight_source::open({golden("imr")}), imr_config_of(g.config()), "param.");
    REQUIRE(model.weights().disentangle.size() == 2);
    REQUIRE(model.weights().entangle.size() == 1);
    const auto in = [&](const std::string& n) { return g.load<cpu_backend, T>(ctx, "input." + n); };
    const auto dy = in("grad_output");
    auto [tokens, saved] = model.forward_train(ctx, in("x"), in("src_landmark"), in("tgt_landmark"), in("src_text"), in("tgt_text"));
    auto grads = model.backward(ctx, saved, dy);
    golden_check c{g, tolerance_for<T>(), {}};
    c.add(ctx, "output.tokens", tokens);
    c.add(ctx, "output.loss", ops::sum(ctx, ops::mul(ctx, tokens, dy), {0, 1, 2}));
    c.add(ctx, "grad.input.x", grads.tokens);
    c.add(ctx, "grad.input.src_landmark", grads.src_landmark);
    c.add(ctx, "grad.input.tgt_landmark", grads.tgt_landmark);
    c.add(ctx, "grad.input.src_text", grads.src_text);
    c.add(ctx, "grad.input.tgt_text", grads.tgt_text);
    visit_imr(grads.weights, [&](const std::string& k, const tensor_t<T>& t) { c.add(ctx, "grad.param." + k, t); });
    c.run();
    UNSCOPED_INFO("imr golden, worst error relative to max|ref|: " << c.worst);
}

template <class T>
void check_kpe_golden(const std::string& name, bool train) {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(golden(name));
    REQUIRE(g.module() == "KeyPointEncoder.backward");
    REQUIRE(g.setting<bool>("training") == train);
    auto enc = kpe_t<T>::load(ctx, dynamicid::modules::weight_source::open({golden(name)}), kpe_config_of(g.config()), "param.");
    enc.train(train);
    const auto x = g.load<cpu_backend, T>(ctx, "input.landmark_image");
    const auto dy = g.load<cpu_backend, T>(ctx, "input.grad_output");
    auto [y, saved] = enc.forward_train(ctx, x, {.input = true, .params = true});
    auto grads = enc.backward(ctx, saved, dy);
    golden_check c{g, tolerance_for<T>(), {}};
    c.add(ctx, "output.features", y);
    c.add(ctx, "output.loss", ops::sum(ctx, ops::mul(ctx, y, dy), {0, 1, 2, 3}));
    c.add(ctx, "grad.input.landmark_image", grads.landmark_image);
    visit_kpe(grads.weights, [&](const std::string& k, const tensor_t<T>& t) { c.add(ctx, "grad.param." + k, t); });
    if (train) {
        auto w = enc.weights();
        for (auto& block : w.blocks)
            for (auto& u : block) {
                u.conv_weight = u.conv_bias = u.bn_weight = u.bn_bias = tensor_t<T>{};
            }
        visit_kpe(w, [&](const std::string& k, const tensor_t<T>& t) {
            if (t.defined()) c.add(ctx, "updated." + k, t);
        }, true);
    }
    c.run();
    UNSCOPED_INFO(name << " golden, worst error relative to max|ref|: " << c.worst);
}

template <class T>
void check_reconfiguration_golden() {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(golden("reconfiguration_step"));
    const auto source = dynamicid::modules::weight_source::open({golden("reconfiguration_step")});
    auto enc = kpe_t<T>::load(ctx, source, kpe_config_of(g.config()), "param.kpe.");
    const auto model = imr_t<T>::load(ctx, source, imr_config_of(g.config()["imr"]), "param.imr.");
    enc.train();
    const auto in = [&](const std::string& n) { return g.load<cpu_backend, T>(ctx, "input." + n); };
    const auto images = in("landmark_image");
    const index_t n = images.dim(0);

    auto [features, kpe_saved] = enc.forward_train(ctx, images);
    const auto flat = features.reshape({n, -1});
    const auto src = ops::slice(ctx, flat, 0, 0, 1), tgt = ops::slice(ctx, flat, 0, 1, n - 1);
    auto [tokens, imr_saved] = model.forward_train(ctx, in("x"), src, tgt, in("src_text"), in("tgt_text"));
    auto [loss, loss_saved] = training::feature_matching_loss_forward(ctx, tokens, in("target_tokens"));
    const auto d_tokens = training::feature_matching_loss_backward(ctx, loss_saved).prediction;
    const auto imr_grads = model.backward(ctx, imr_saved, d_tokens);
    const auto d_flat = ops::concat(ctx, std::vector<tensor_t<T>>{imr_grads.src_landmark, imr_grads.tgt_landmark}, 0);
    const auto kpe_grads = enc.backward(ctx, kpe_saved, d_flat.reshape(features.shape().to_vector()));

    golden_check c{g, tolerance_for<T>(), {}};
    c.add(ctx, "output.tokens", tokens);
    c.add(ctx, "output.loss", loss);
    visit_imr(imr_grads.weights, [&](const std::string& k, const tensor_t<T>& t) { c.add(ctx, "grad.param.imr." + k, t); });
    visit_kpe(kpe_grads.weights, [&](const std::string& k, const tensor_t<T>& t) { c.add(ctx, "grad.param.kpe." + k, t); });
    auto w = enc.weights();
    visit_kpe(w, [&](const std::string& k, const tensor_t<T>& t) {
        if (k.find("running_") != std::string::npos) c.add(ctx, "updated.kpe." + k, t);
    }, true);
    c.run();
    UNSCOPED_INFO("reconfiguration step golden, worst error relative to max|ref|: " << c.worst);
}

// ---- central differences: weights and inputs as gradcheck operands ------------

using D = double;
using tensor_d = tensor_t<D>;

/// The gradient checks run thousands of tiny forwards: one thread avoids
/// OpenMP start-up and barrier costs that dominate at these sizes (and that
/// explode on a loaded machine).
cpu_backend::context serial{.threads = 1};

/// Weights drawn N(0, 1) / 2 (norm scales too: their sign does not matter here).
dt::operand weight(shape s) { return {s, [](double x) { return 0.5 * x; }}; }

template <class P, class Visit>
std::vector<dt::operand> weight_operands(P skeleton, Visit visit) {
    std::vector<dt::operand> out;
    visit(skeleton, [&](const std::string&, tensor_d& t) { out.push_back(weight(t.shape())); });
    return out;
}

/// skeleton with its tensors replaced, in visit order, by inputs[first...].
template <class P, class Visit>
P fill(P skeleton, Visit visit, const std::vector<tensor_d>& inputs, std::size_t first) {
    visit(skeleton, [&](const std::string&, tensor_d& t) { t = inputs.at(first++); });
    return skeleton;
}

template <class P, class Visit>
void append_grads(std::vector<tensor_d>& out, P grads, Visit visit) {
    visit(grads, [&](const std::string&, tensor_d& t) { out.push_back(t); });
}

proj_t<D>::params proj_skeleton(cpu_backend::context& ctx, const identity::proj_plus_config& c, index_t hidden) {
    const auto z = [&](shape s) { return tensor_d::zeros(ctx, s); };
    const index_t d = c.cross_attention_dim, inner = c.heads * c.dim_head;
    proj_t<D>::params p;
    p.proj_0 = {z({hidden, c.id_embeddings_dim}), z({hidden})};
    p.proj_2 = {z({d * c.num_tokens, hidden}), z({d * c.num_tokens})};
    p.norm = {z({d}), z({d})};
    p.proj_in = {z({d, c.clip_embeddings_dim}), z({d})};
    p.proj_out = {z({d, d}), z({d})};
    p.norm_out = {z({d}), z({d})};
    for (index_t i = 0; i < c.depth; ++i)
        p.layers.push_back({{{z({d}), z({d})}, {z({d}), z({d})}, z({inner, d}), z({2 * inner, d}), z({d, inner})},
                            {{z({d}), z({d})}, z({c.ff_mult * d, d}), z({d, c.ff_mult * d})}});
    return p;
}

void gradcheck_proj(const identity::proj_plus_config& cfg, bool shortcut) {
    cpu_backend::context ctx;
    const index_t hidden = 6, batch = 2, clip_len = 3;
    const auto skeleton = proj_skeleton(ctx, cfg, hidden);
    const auto visit = [](auto& p, auto&& f) { visit_proj(p, f); };
    std::vector<dt::operand> operands{{{batch, cfg.id_embeddings_dim}}, {{batch, clip_len, cfg.clip_embeddings_dim}}};
    for (auto& o : weight_operands(skeleton, visit)) operands.push_back(o);
    const auto model = [&](const std::vector<tensor_d>& in) { return proj_t<D>(cfg, fill(skeleton, visit, in, 2)); };
    dt::check_gradients<cpu_backend>(
        shortcut ? "proj_plus shortcut" : "proj_plus", operands,
        [&](cpu_backend::context&, const std::vector<tensor_d>& in) { return model(in).forward(serial, in[0], in[1], shortcut, 0.6); },
        [&](cpu_backend::context&, const std::vector<tensor_d>& in, const tensor_d& dy) {
            const auto m = model(in);
            auto [y, saved] = m.forward_train(serial, in[0], in[1], {.input = true, .params = true}, shortcut, 0.6);
            auto g = m.backward(serial, saved, dy);
            std::vector<tensor_d> out{g.id_embeds, g.clip_embeds};
            append_grads(out, g.weights, visit);
            return out;
        },
        11);
}

imr_t<D>::params imr_skeleton(cpu_backend::context& ctx, const imr::imr_config& c) {
    const auto z = [&](shape s) { return tensor_d::zeros(ctx, s); };
    const auto norm = [&](index_t n) { return imr_t<D>::norm{z({n}), z({n}), c.layer_norm_eps}; };
    const auto lin = [&](index_t in, index_t out, bool bias) { return imr_t<D>::linear{z({out, in}), bias ? z({out}) : tensor_d{}}; };
    const index_t d = c.dim, inner = c.heads * c.dim_head, motion = c.embedding_dim + c.txt_dim;
    imr_t<D>::params p;
    p.fusion_norm0 = norm(motion);
    p.fusion_linear1 = lin(motion, d, true);
    p.fusion_norm3 = norm(d);
    p.fusion_linear4 = lin(d, c.num_queries * d, true);
    p.norm_in = norm(c.embedding_dim);
    p.proj_in = lin(c.embedding_dim, d, true);
    p.norm_out = norm(d);
    p.proj_out = lin(d, c.embedding_dim, true);
    const auto layer = [&] {
        return imr_t<D>::layer_params{{norm(d), norm(d), lin(d, inner, false), lin(d, 2 * inner, false), lin(inner, d, false)},
                                      {norm(d), lin(d, inner, false), lin(d, 2 * inner, false), lin(inner, d, false)},
                                      {norm(d), lin(d, c.ff_mult * d, false), lin(c.ff_mult * d, d, false)}};
    };
    for (index_t i = 0; i < *c.disentangle_depth; ++i) p.disentangle.push_back(layer());
    for (index_t i = 0; i < *c.entangle_depth; ++i) p.entangle.push_back(layer());
    return p;
}

/// The IMR skips bias tensors that do not exist (bias-free linears).
const auto visit_imr_defined = [](auto& p, auto&& f) {
    visit_imr(p, [&](const std::string& k, auto& t) {
        if (k.size() < 5 || k.substr(k.size() - 5) != ".bias" || t.defined()) f(k, t);
    });
};

void gradcheck_imr(index_t disentangle, index_t entangle, index_t targets) {
    cpu_backend::context ctx;
    const imr::imr_config cfg{.dim = 4, .dim_head = 2, .heads = 2, .num_queries = 2, .embedding_dim = 3, .txt_dim = 2, .ff_mult = 2,
                              .disentangle_depth = disentangle, .entangle_depth = entangle};
    const auto skeleton = imr_skeleton(ctx, cfg);
    const index_t n = 2;
    std::vector<dt::operand> operands{{{1, n, cfg.embedding_dim}}, {{1, cfg.embedding_dim}}, {{targets, cfg.embedding_dim}},
                                      {{1, cfg.txt_dim}},          {{targets, cfg.txt_dim}}};
    for (auto& o : weight_operands(skeleton, visit_imr_defined)) operands.push_back(o);
    const auto model = [&](const std::vector<tensor_d>& in) { return imr_t<D>(cfg, fill(skeleton, visit_imr_defined, in, 5)); };
    dt::check_gradients<cpu_backend>(
        "imr depth " + std::to_string(disentangle) + "/" + std::to_string(entangle) + ", " + std::to_string(targets) + " targets", operands,
        [&](cpu_backend::context&, const std::vector<tensor_d>& in) { return model(in).forward(serial, in[0], in[1], in[2], in[3], in[4]); },
        [&](cpu_backend::context&, const std::vector<tensor_d>& in, const tensor_d& dy) {
            const auto m = model(in);
            auto [y, saved] = m.forward_train(serial, in[0], in[1], in[2], in[3], in[4]);
            auto g = m.backward(serial, saved, dy);
            std::vector<tensor_d> out{g.tokens, g.src_landmark, g.tgt_landmark, g.src_text, g.tgt_text};
            append_grads(out, g.weights, visit_imr_defined);
            return out;
        },
        21 + static_cast<std::uint64_t>(targets));
}

imr::keypoint_encoder_config tiny_kpe_config() {
    imr::keypoint_encoder_config cfg;
    cfg.blocks = {{{3, 1, 1, false}}, {{3, 2, 1, false}, {3, 1, 1, true}}, {{1, 1, 0, false}}};
    return cfg;
}

kpe_t<D>::params kpe_skeleton(cpu_backend::context& ctx) {
    const auto z = [&](shape s) { return tensor_d::zeros(ctx, s); };
    const auto unit = [&](index_t in, index_t out, index_t k) {
        return kpe_t<D>::unit_params{z({out, in, k, k}), z({out}), z({out}), z({out}), z({out}), tensor_d::full(ctx, {out}, 1.0)};
    };
    kpe_t<D>::params p;
    p.blocks = {{unit(1, 3, 3)}, {unit(3, 4, 3), unit(4, 4, 3)}, {unit(4, 2, 1)}};
    return p;
}

void gradcheck_kpe(bool train) {
    cpu_backend::context ctx;
    const auto cfg = tiny_kpe_config();
    auto skeleton = kpe_skeleton(ctx);
    const auto visit_all = [](auto& p, auto&& f) { visit_kpe(p, f, true); };
    std::vector<dt::operand> operands{{{3, 1, 6, 6}}};
    visit_all(skeleton, [&](const std::string& k, const tensor_d& t) {
        if (k.find("running_mean") != std::string::npos) operands.push_back({t.shape(), [](double x) { return 0.3 * x; }, false});
        else if (k.find("running_var") != std::string::npos) operands.push_back({t.shape(), dt::positive(0.5), false});
        else operands.push_back(weight(t.shape()));
    });
    const auto model = [&](cpu_backend::context&, const std::vector<tensor_d>& in) {
        kpe_t<D> enc(serial, cfg, fill(skeleton, visit_all, in, 1));
        enc.train(train);
        return enc;
    };
    dt::check_gradients<cpu_backend>(
        train ? "keypoint_encoder training mode" : "keypoint_encoder eval mode", operands,
        [&](cpu_backend::context&, const std::vector<tensor_d>& in) { return model(serial, in).forward_train(serial, in[0]).first; },
        [&](cpu_backend::context&, const std::vector<tensor_d>& in, const tensor_d& dy) {
            auto enc = model(serial, in);
            auto [y, saved] = enc.forward_train(serial, in[0], {.input = true, .params = true});
            auto g = enc.backward(serial, saved, dy);
            std::vector<tensor_d> out{g.landmark_image};
            append_grads(out, g.weights, visit_all);
            return out;
        },
        train ? 31 : 32);
}

}  // namespace

// ---- goldens from the released modules (torch autograd) -------------------------

TEST_CASE("identity grad: ProjPlusModel gradients match torch autograd through the released module", "[training][identity_grad][official]") {
    check_proj_golden<float>();
    check_proj_golden<double>();
}

TEST_CASE("identity grad: IMR gradients match torch autograd through the released module", "[training][identity_grad][official]") {
    check_imr_golden<float>();
    check_imr_golden<double>();
}

TEST_CASE("identity grad: KeyPointEncoder training-mode gradients and running statistics match torch", "[training][identity_grad][official]") {
    check_kpe_golden<float>("keypoint_train", true);
    check_kpe_golden<double>("keypoint_train", true);
}

TEST_CASE("identity grad: KeyPointEncoder eval-mode gradients match torch", "[training][identity_grad][official]") {
    check_kpe_golden<float>("keypoint_eval", false);
    check_kpe_golden<double>("keypoint_eval", false);
}

TEST_CASE("identity grad: one reconfiguration step (KeyPointEncoder, IMR, feature matching loss) matches torch", "[training][identity_grad][official]") {
    check_reconfiguration_golden<float>();
    check_reconfiguration_golden<double>();
}

TEST_CASE("identity grad: mse_loss matches torch F.mse_loss and its autograd", "[training][losses]") {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(golden("mse"));
    const auto pred = g.load<cpu_backend, float>(ctx, "input.prediction");
    const auto target = g.load<cpu_backend, float>(ctx, "input.target");
    auto [loss, saved] = training::mse_loss_forward(ctx, pred, target);
    auto grads = training::mse_loss_backward(ctx, saved, {.prediction = true, .target = true});
    golden_check c{g, 1e-6, {}};
    c.add(ctx, "output.loss", loss);
    c.add(ctx, "grad.input.prediction", grads.prediction);
    c.add(ctx, "grad.input.target", grads.target);
    c.run();
}

TEST_CASE("identity grad: weighted_mse_loss matches torch (weight * (p - t) ** 2).mean() and its autograd", "[training][losses]") {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "losses" / "weighted_mse.safetensors");
    const auto pred = g.load<cpu_backend, float>(ctx, "input.prediction");
    const auto target = g.load<cpu_backend, float>(ctx, "input.target");
    const auto weight = g.load<cpu_backend, float>(ctx, "input.weight");  // (N, 1, H, W) over (N, C, H, W)
    auto [loss, saved] = training::weighted_mse_loss_forward(ctx, pred, target, weight);
    auto grads = training::weighted_mse_loss_backward(ctx, saved, {.prediction = true, .target = true});
    golden_check c{g, 1e-6, {}};
    c.add(ctx, "output.loss", loss);
    c.add(ctx, "grad.input.prediction", grads.prediction);
    c.add(ctx, "grad.input.target", grads.target);
    c.run();
    // A weight of ones is mse_loss.
    const auto plain = training::mse_loss(ctx, pred, target).to_host(ctx)[0];
    const auto ones = training::weighted_mse_loss(ctx, pred, target, tensor_t<float>::full(ctx, {1}, 1.0f)).to_host(ctx)[0];
    CHECK(ones == Approx(plain).epsilon(1e-6));
}

// ---- central differences in f64 ---------------------------------------------------

TEST_CASE("identity grad: ProjPlusModel backward agrees with central differences", "[training][identity_grad][gradcheck]") {
    const identity::proj_plus_config cfg{.cross_attention_dim = 8, .id_embeddings_dim = 3, .clip_embeddings_dim = 5, .num_tokens = 2,
                                         .depth = 2, .dim_head = 4, .heads = 2, .ff_mult = 2};
    gradcheck_proj(cfg, false);
    gradcheck_proj(cfg, true);
    auto shallow = cfg;
    shallow.depth = 0;
    gradcheck_proj(shallow, false);
}

TEST_CASE("identity grad: IMR backward agrees with central differences, depth 2 and 1, two targets", "[training][identity_grad][gradcheck]") {
    gradcheck_imr(2, 1, 2);
}

TEST_CASE("identity grad: IMR backward agrees with central differences, one target", "[training][identity_grad][gradcheck]") {
    gradcheck_imr(1, 1, 1);
}

TEST_CASE("identity grad: IMR backward agrees with central differences with one half empty", "[training][identity_grad][gradcheck]") {
    gradcheck_imr(0, 1, 2);
    gradcheck_imr(1, 0, 3);
}

TEST_CASE("identity grad: KeyPointEncoder backward agrees with central differences in both modes", "[training][identity_grad][gradcheck]") {
    gradcheck_kpe(true);
    gradcheck_kpe(false);
}

TEST_CASE("identity grad: losses agree with central differences", "[training][losses][gradcheck]") {
    dt::check_gradients<cpu_backend>(
        "mse_loss", {{{2, 3, 4}}, {{2, 3, 4}}},
        [](cpu_backend::context&, const std::vector<tensor_d>& in) { return training::mse_loss(serial, in[0], in[1]); },
        [](cpu_backend::context&, const std::vector<tensor_d>& in, const tensor_d& dy) {
            auto [l, s] = training::mse_loss_forward(serial, in[0], in[1]);
            auto g = training::mse_loss_backward(serial, s, dy, {.prediction = true, .target = true});
            return std::vector<tensor_d>{g.prediction, g.target};
        });
    const std::vector<double> w{1.0, 3.0, 0.0, 2.0, 0.5, 1.0, 4.0, 1.0};
    const auto weight = tensor_d::from_host(serial, {2, 1, 4}, w);
    dt::check_gradients<cpu_backend>(
        "weighted_mse_loss", {{{2, 3, 4}}, {{2, 3, 4}}},
        [&](cpu_backend::context&, const std::vector<tensor_d>& in) { return training::weighted_mse_loss(serial, in[0], in[1], weight); },
        [&](cpu_backend::context&, const std::vector<tensor_d>& in, const tensor_d& dy) {
            auto [l, s] = training::weighted_mse_loss_forward(serial, in[0], in[1], weight);
            auto g = training::weighted_mse_loss_backward(serial, s, dy, {.prediction = true, .target = true});
            return std::vector<tensor_d>{g.prediction, g.target};
        });
    dt::check_gradients<cpu_backend>(
        "reconfiguration_loss", {{{2, 3, 4}}, {{2, 3, 4}, {}, false}, {{2, 4, 2, 2}}, {{2, 4, 2, 2}, {}, false}},
        [](cpu_backend::context&, const std::vector<tensor_d>& in) {
            return training::reconfiguration_loss_forward(serial, in[0], in[1], in[2], in[3], 0.7).first.total;
        },
        [](cpu_backend::context&, const std::vector<tensor_d>& in, const tensor_d& dy) {
            auto [l, s] = training::reconfiguration_loss_forward(serial, in[0], in[1], in[2], in[3], 0.7);
            auto g = training::reconfiguration_loss_backward(serial, s, dy);
            return std::vector<tensor_d>{g.predicted_tokens, tensor_d{}, g.noise_prediction, tensor_d{}};
        });
}

// ---- behaviour ----------------------------------------------------------------------

TEST_CASE("identity grad: a frozen projection keeps no weight gradients but still gives input gradients", "[training][identity_grad]") {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(golden("proj_plus"));
    const identity::proj_plus_config cfg{.cross_attention_dim = 32, .id_embeddings_dim = 12, .clip_embeddings_dim = 20, .num_tokens = 3,
                                         .depth = 2, .dim_head = 16, .heads = 2, .ff_mult = 2};
    const auto model = proj_t<float>::load(ctx, g.file(), cfg, "param.");
    const auto id = g.load<cpu_backend, float>(ctx, "input.id_embeds");
    const auto clip = g.load<cpu_backend, float>(ctx, "input.clip_embeds");
    const auto dy = g.load<cpu_backend, float>(ctx, "input.grad_output");
    auto [y, saved] = model.forward_train(ctx, id, clip, {.input = true, .params = false});
    CHECK_FALSE(saved.proj_0.input.defined());  // nothing kept for a weight gradient
    CHECK_FALSE(saved.layers[0].feed_forward.up.input.defined());
    auto grads = model.backward(ctx, saved, dy);
    bool any = false;
    visit_proj(grads.weights, [&](const std::string&, const tensor_t<float>& t) { any = any || t.defined(); });
    CHECK_FALSE(any);
    REQUIRE(grads.id_embeds.defined());
    dt::check_close("frozen id grad", dt::download(ctx, grads.id_embeds), g.values("grad.input.id_embeds"), 1e-5, 1e-4);

    // The default skips the (frozen-encoder) inputs.
    auto [y2, saved2] = model.forward_train(ctx, id, clip);
    auto grads2 = model.backward(ctx, saved2, dy);
    CHECK_FALSE(grads2.id_embeds.defined());
    CHECK_FALSE(grads2.clip_embeds.defined());
    CHECK(grads2.weights.proj_0.weight.defined());
}

TEST_CASE("identity grad: KeyPointEncoder train and eval modes switch like torch", "[training][identity_grad]") {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(golden("keypoint_train"));
    auto enc = kpe_t<float>::load(ctx, dynamicid::modules::weight_source::open({golden("keypoint_train")}), kpe_config_of(g.config()),
                                  "param.");
    CHECK_FALSE(enc.training());
    const auto x = g.load<cpu_backend, float>(ctx, "input.landmark_image");
    const auto before = dt::download(ctx, enc.weights().blocks[0][0].running_mean);
    const auto shared = enc.weights().blocks[0][0].running_mean;  // a holder of the old statistics
    enc.train();
    CHECK(enc.training());
    enc.forward_train(ctx, x);
    CHECK(dt::download(ctx, shared) == before);  // replaced, not overwritten
    CHECK(dt::download(ctx, enc.weights().blocks[0][0].running_mean) != before);
    // Eval mode after training: forward() and forward_train() both follow the updated statistics.
    enc.eval();
    const auto a = dt::download(ctx, enc.forward(ctx, x));
    const auto b = dt::download(ctx, enc.forward_train(ctx, x).first);
    dt::check_close("eval forward vs eval forward_train", a, b, 1e-5, 1e-4);
    const auto after = dt::download(ctx, enc.weights().blocks[0][0].running_mean);
    CHECK(after == dt::download(ctx, enc.weights().blocks[0][0].running_mean));  // eval leaves them alone
}

TEST_CASE("identity grad: bad shapes and degenerate batches give clear errors", "[training][identity_grad]") {
    cpu_backend::context ctx;
    {
        const auto g = conform::golden_case::open(golden("proj_plus"));
        const identity::proj_plus_config cfg{.cross_attention_dim = 32, .id_embeddings_dim = 12, .clip_embeddings_dim = 20, .num_tokens = 3,
                                             .depth = 2, .dim_head = 16, .heads = 2, .ff_mult = 2};
        const auto model = proj_t<float>::load(ctx, g.file(), cfg, "param.");
        auto [y, saved] = model.forward_train(ctx, g.load<cpu_backend, float>(ctx, "input.id_embeds"),
                                              g.load<cpu_backend, float>(ctx, "input.clip_embeds"));
        CHECK_THROWS_AS(model.backward(ctx, saved, tensor_t<float>::zeros(ctx, {2, 3, 31})), dynamicid::shape_error);
        CHECK_THROWS_AS(model.forward_train(ctx, tensor_t<float>::zeros(ctx, {2, 11}), g.load<cpu_backend, float>(ctx, "input.clip_embeds")),
                        dynamicid::shape_error);
    }
    {
        const auto g = conform::golden_case::open(golden("imr"));
        const auto model = imr_t<float>::load(ctx, dynamicid::modules::weight_source::open({golden("imr")}), imr_config_of(g.config()), "param.");
        const auto in = [&](const std::string& n) { return g.load<cpu_backend, float>(ctx, "input." + n); };
        auto [y, saved] = model.forward_train(ctx, in("x"), in("src_landmark"), in("tgt_landmark"), in("src_text"), in("tgt_text"));
        CHECK_THROWS_AS(model.backward(ctx, saved, tensor_t<float>::zeros(ctx, {2, 3, 12})), dynamicid::shape_error);
    }
    {
        // Training-mode BatchNorm of a single value per channel is undefined (torch raises too).
        imr::keypoint_encoder_config cfg;
        cfg.blocks = {{{1, 1, 0, false}}};
        kpe_t<float>::params p;
        const auto one = [&](shape s) { return tensor_t<float>::full(ctx, s, 1.0f); };
        p.blocks = {{{one({2, 1, 1, 1}), one({2}), one({2}), one({2}), one({2}), one({2})}}};
        kpe_t<float> enc(ctx, cfg, p);
        enc.train();
        try {
            enc.forward_train(ctx, one({1, 1, 1, 1}));
            FAIL("no error");
        } catch (const dynamicid::value_error& e) {
            CHECK(std::string(e.what()).find("[keypoint_encoder]") == 0);
            CHECK(std::string(e.what()).find("more than one value per channel") != std::string::npos);
        }
        enc.eval();
        CHECK_NOTHROW(enc.forward_train(ctx, one({1, 1, 1, 1})));
        cfg.batch_norm_momentum = 1.5;
        CHECK_THROWS_AS(kpe_t<float>(ctx, cfg, p), dynamicid::value_error);
    }
    {
        const auto a = tensor_t<float>::zeros(ctx, {2, 3}), b = tensor_t<float>::zeros(ctx, {3, 2});
        CHECK_THROWS_AS(training::mse_loss(ctx, a, b), dynamicid::shape_error);
        CHECK_THROWS_AS(training::feature_matching_loss_forward(ctx, a, a), dynamicid::shape_error);  // not (T, n, D)
        const auto nan = tensor_t<float>::full(ctx, {2, 3}, std::numeric_limits<float>::quiet_NaN());
        try {
            training::mse_loss(ctx, nan, a);
            FAIL("no error");
        } catch (const dynamicid::value_error& e) {
            CHECK(std::string(e.what()).find("[mse_loss]") == 0);
        }
        auto [l, s] = training::mse_loss_forward(ctx, a, a);
        CHECK_THROWS_AS(training::mse_loss_backward(ctx, s, a), dynamicid::shape_error);
    }
    {
        // weighted_mse_loss: a weight that does not broadcast, a negative or NaN weight, NaN inputs.
        const auto a = tensor_t<float>::zeros(ctx, {2, 3, 4}), ones = tensor_t<float>::full(ctx, {2, 1, 4}, 1.0f);
        const auto expect = [&](const tensor_t<float>& p, const tensor_t<float>& w, const char* what) {
            try {
                training::weighted_mse_loss(ctx, p, a, w);
                FAIL("no error for " << what);
            } catch (const dynamicid::error& e) {
                INFO(e.what());
                CHECK(std::string(e.what()).find("[weighted_mse_loss]") == 0);
                CHECK(std::string(e.what()).find(what) != std::string::npos);
            }
        };
        expect(a, tensor_t<float>::full(ctx, {3, 1, 4}, 1.0f), "does not broadcast");
        expect(a, tensor_t<float>::full(ctx, {1, 2, 3, 4}, 1.0f), "does not broadcast");
        expect(a, tensor_t<float>::full(ctx, {2, 1, 4}, -1.0f), "must be finite and >= 0");
        expect(a, tensor_t<float>::full(ctx, {2, 1, 4}, std::numeric_limits<float>::quiet_NaN()), "must be finite and >= 0");
        expect(a, tensor_t<float>::full(ctx, {2, 1, 4}, std::numeric_limits<float>::infinity()), "must be finite and >= 0");
        expect(a, tensor_t<float>{}, "undefined weight");
        expect(tensor_t<float>::full(ctx, {2, 3, 4}, std::numeric_limits<float>::infinity()), ones, "not finite");
        const auto empty = tensor_t<float>::zeros(ctx, {0, 3, 4});
        CHECK_THROWS_AS(training::weighted_mse_loss(ctx, empty, empty, ones), dynamicid::shape_error);
        CHECK_THROWS_AS(training::weighted_mse_loss(ctx, a, tensor_t<float>::zeros(ctx, {2, 3}), ones), dynamicid::shape_error);
        auto [l, s] = training::weighted_mse_loss_forward(ctx, a, a, ones);
        CHECK_THROWS_AS(training::weighted_mse_loss_backward(ctx, s, a), dynamicid::shape_error);
    }
}
