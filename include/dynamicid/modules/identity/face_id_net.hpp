// dynamicid modules: a small IResNet face-identity encoder (an ArcFace stand-in).
//
// The layout of insightface's IResNet (arcface_torch/backbones/iresnet.py):
//
//   stem      conv1 (3x3, stride 1, no bias) -> bn1 -> prelu
//   stage i   layer<i+1>: IBasicBlocks, the first with stride 2
//             IBasicBlock(x) = bn3(conv2(prelu(bn2(conv1(bn1(x)))))) + shortcut(x)
//             conv1 3x3 stride 1, conv2 3x3 with the block's stride (no biases);
//             shortcut = downsample (1x1 conv with the stride -> BatchNorm2d)
//             when the stride or the width changes, else x
//   head      bn2 (BatchNorm2d) -> flatten -> fc (Linear) -> features (BatchNorm1d)
//
// The stem is as wide as the first stage. The parameters carry the reference
// state-dict keys (conv1.weight, layer1.0.bn1.running_mean,
// layer2.0.downsample.0.weight, fc.bias, features.weight, ...), so an
// insightface checkpoint of the same sizes converted to safetensors binds as is
// (num_batches_tracked is ignored). insightface's dropout before fc is the
// identity at its default p = 0 and is not modelled. Inputs are (N, C, S, S)
// images, insightface normalises them to [-1, 1].
//
//     dynamicid::modules::identity::face_id_net_config cfg{.input_size = 64, .widths = {32, 64, 128, 256},
//                                                          .blocks = {1, 1, 1, 1}, .embedding_size = 128};
//     using net_t = dynamicid::modules::identity::face_id_net<dynamicid::cpu_backend>;
//     auto net = net_t::load(ctx, dynamicid::modules::weight_source::open({"face_id_net.safetensors"}), cfg);
//     auto embedding = net.forward(ctx, images);          // (N, 3, 64, 64) -> (N, 128)
//
// state_dict() records the sizes in the file's metadata ("face_id_net_config",
// JSON), so a file written by the library loads without them:
//
//     auto net = net_t::load_file(ctx, "face_id_net.safetensors");
//
// Training: like torch, the module has a mode. In training mode (train())
// forward_train normalises with the batch's statistics (biased variance) and
// moves the running statistics towards them (momentum 0.1, unbiased variance);
// in eval mode (the default) it uses the running statistics, as forward()
// always does. backward returns a `params` of gradients (running statistics
// undefined) and, when asked for, the images' gradient.
//
//     auto net = net_t(ctx, cfg, net_t::initial_params(ctx, cfg, /*seed=*/1));
//     net.train();
//     auto [embedding, saved] = net.forward_train(ctx, images);
//     auto g = net.backward(ctx, saved, grad_embedding);   // g.weights.conv1, g.weights.layers[0][0].conv2, ...
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/philox.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/detail/backprop.hpp>
#include <dynamicid/modules/dynamicid/detail/heads.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace dynamicid::modules::identity {

/// Sizes of a face_id_net. The defaults are insightface's iresnet18 at 112x112
/// with a 512-wide embedding.
///
///     face_id_net_config tiny{.input_size = 16, .widths = {4, 8}, .blocks = {1, 1}, .embedding_size = 8};
struct face_id_net_config {
    index_t input_size = 112;                    ///< square input side
    index_t in_channels = 3;
    std::vector<index_t> widths{64, 128, 256, 512};  ///< channels per stage (the stem has widths[0])
    std::vector<index_t> blocks{2, 2, 2, 2};         ///< IBasicBlocks per stage
    index_t embedding_size = 512;
    double batch_norm_eps = 1e-5;
    double batch_norm_momentum = 0.1;  ///< torch's default: the weight of the batch statistics in the running update

    /// Side of the last stage's feature map (each stage halves, rounding up as a padded stride-2 conv does).
    index_t feature_side() const {
        index_t s = input_size;
        for (std::size_t i = 0; i < widths.size(); ++i) s = (s - 1) / 2 + 1;
        return s;
    }
    /// fc's input width: last width x feature_side^2 (insightface's 512 * 7 * 7 at 112).
    index_t fc_inputs() const { return widths.empty() ? 0 : widths.back() * feature_side() * feature_side(); }

    void validate() const {
        const auto need = [](bool ok, auto&&... what) { check<value_error>(ok, "face_id_net", what...); };
        need(input_size >= 1 && in_channels >= 1 && embedding_size >= 1, "config: input_size, in_channels and embedding_size must be >= 1");
        need(!widths.empty() && widths.size() == blocks.size(), "config: widths (", widths.size(), ") and blocks (", blocks.size(),
             ") must be non-empty and of the same length");
        for (std::size_t i = 0; i < widths.size(); ++i) need(widths[i] >= 1 && blocks[i] >= 1, "config: stage ", i, " needs width and blocks >= 1");
        need(std::isfinite(batch_norm_eps) && batch_norm_eps >= 0.0, "config: batch_norm_eps must be >= 0");
        need(batch_norm_momentum >= 0.0 && batch_norm_momentum <= 1.0, "config: batch_norm_momentum must be in [0, 1]");
    }

    /// The sizes as JSON (the "face_id_net_config" metadata value).
    std::string to_json() const {
        nlohmann::json j{{"input_size", input_size},        {"in_channels", in_channels},       {"widths", widths},
                         {"blocks", blocks},                {"embedding_size", embedding_size}, {"batch_norm_eps", batch_norm_eps},
                         {"batch_norm_momentum", batch_norm_momentum}};
        return j.dump();
    }
    /// Parses to_json()'s text (absent keys keep their defaults); a value_error names what is wrong.
    static face_id_net_config from_json(std::string_view text) {
        face_id_net_config c;
        try {
            const auto j = nlohmann::json::parse(text);
            check<value_error>(j.is_object(), "face_id_net", "config: not a JSON object");
            c.input_size = j.value("input_size", c.input_size);
            c.in_channels = j.value("in_channels", c.in_channels);
            c.widths = j.value("widths", c.widths);
            c.blocks = j.value("blocks", c.blocks);
            c.embedding_size = j.value("embedding_size", c.embedding_size);
            c.batch_norm_eps = j.value("batch_norm_eps", c.batch_norm_eps);
            c.batch_norm_momentum = j.value("batch_norm_momentum", c.batch_norm_momentum);
        } catch (const nlohmann::json::exception& e) {
            throw value_error("face_id_net", std::string("config: ") + e.what());
        }
        for (const auto v : c.widths) check<value_error>(v >= 1 && v <= 65536, "face_id_net", "config: a width of ", v);
        check<value_error>(c.input_size <= 4096 && c.embedding_size <= 65536, "face_id_net", "config: sizes out of range");
        c.validate();
        return c;
    }
};

/// The IResNet encoder (see the file comment).
template <class B, class T = float>
    requires computes_in<B, T>
class face_id_net {
public:
    using config = face_id_net_config;
    using tensor_type = tensor<B, T>;

    /// A BatchNorm's affine parameters and running statistics, each (C).
    struct batch_norm_params {
        tensor_type weight, bias, running_mean, running_var;
    };
    /// layer<i>.<j>: IBasicBlock. downsample_* are undefined when the block keeps its shape.
    struct block_params {
        batch_norm_params bn1;
        tensor_type conv1;  ///< (planes, inplanes, 3, 3)
        batch_norm_params bn2;
        tensor_type prelu;  ///< (planes)
        tensor_type conv2;  ///< (planes, planes, 3, 3)
        batch_norm_params bn3;
        tensor_type downsample_conv;  ///< downsample.0.weight (planes, inplanes, 1, 1)
        batch_norm_params downsample_bn;  ///< downsample.1
    };
    struct params {
        tensor_type conv1;  ///< (widths[0], in_channels, 3, 3)
        batch_norm_params bn1;
        tensor_type prelu;
        std::vector<std::vector<block_params>> layers;  ///< layers[i][j] is layer<i+1>.<j>
        batch_norm_params bn2;
        tensor_type fc_weight, fc_bias;  ///< fc.weight (E, fc_inputs), fc.bias (E)
        batch_norm_params features;      ///< BatchNorm1d (E)
    };

    /// Every tensor of `p` (a params, or the weights of a grads) with its
    /// state-dict key, in a fixed order. `parameters`: trainable tensors;
    /// `buffers`: running statistics (interleaved at their BatchNorm).
    /// Undefined tensors (absent downsamples, gradients of buffers) are skipped.
    template <class P, class F>
    static void visit(P& p, F&& f, bool parameters = true, bool buffers = false) {
        const auto t = [&](const std::string& k, auto& x) {
            if (x.defined()) f(k, x);
        };
        const auto bn = [&](const std::string& k, auto& n) {
            if (parameters) {
                t(k + ".weight", n.weight);
                t(k + ".bias", n.bias);
            }
            if (buffers) {
                t(k + ".running_mean", n.running_mean);
                t(k + ".running_var", n.running_var);
            }
        };
        const auto w = [&](const std::string& k, auto& x) {
            if (parameters) t(k, x);
        };
        w("conv1.weight", p.conv1);
        bn("bn1", p.bn1);
        w("prelu.weight", p.prelu);
        for (std::size_t i = 0; i < p.layers.size(); ++i)
            for (std::size_t j = 0; j < p.layers[i].size(); ++j) {
                auto& b = p.layers[i][j];
                const std::string k = "layer" + std::to_string(i + 1) + "." + std::to_string(j) + ".";
                bn(k + "bn1", b.bn1);
                w(k + "conv1.weight", b.conv1);
                bn(k + "bn2", b.bn2);
                w(k + "prelu.weight", b.prelu);
                w(k + "conv2.weight", b.conv2);
                bn(k + "bn3", b.bn3);
                w(k + "downsample.0.weight", b.downsample_conv);
                bn(k + "downsample.1", b.downsample_bn);
            }
        bn("bn2", p.bn2);
        w("fc.weight", p.fc_weight);
        w("fc.bias", p.fc_bias);
        bn("features", p.features);
    }

    /// Validates every weight against `cfg`.
    face_id_net(context_t<B>& ctx, config cfg, params weights) : config_(std::move(cfg)), params_(std::move(weights)) {
        (void)ctx;
        config_.validate();
        using modules::detail::expect_weight;
        const auto conv = [&](const tensor_type& t, index_t out, index_t in, index_t k, const std::string& name) {
            expect_weight("face_id_net", t, {out, in, k, k}, name);
        };
        const auto bn = [&](const batch_norm_params& n, index_t c, const std::string& name) {
            expect_weight("face_id_net", n.weight, {c}, name + ".weight");
            expect_weight("face_id_net", n.bias, {c}, name + ".bias");
            expect_weight("face_id_net", n.running_mean, {c}, name + ".running_mean");
            expect_weight("face_id_net", n.running_var, {c}, name + ".running_var");
        };
        const auto& w = config_.widths;
        conv(params_.conv1, w[0], config_.in_channels, 3, "conv1.weight");
        bn(params_.bn1, w[0], "bn1");
        expect_weight("face_id_net", params_.prelu, {w[0]}, "prelu.weight");
        check<shape_error>(params_.layers.size() == w.size(), "face_id_net", params_.layers.size(), " weight stages for a config of ", w.size());
        index_t inplanes = w[0];
        for (std::size_t i = 0; i < w.size(); ++i) {
            check<shape_error>(static_cast<index_t>(params_.layers[i].size()) == config_.blocks[i], "face_id_net", "layer", i + 1, " has ",
                               params_.layers[i].size(), " blocks, the config ", config_.blocks[i]);
            for (std::size_t j = 0; j < params_.layers[i].size(); ++j) {
                const auto& b = params_.layers[i][j];
                const std::string k = "layer" + std::to_string(i + 1) + "." + std::to_string(j) + ".";
                const index_t planes = w[i];
                bn(b.bn1, inplanes, k + "bn1");
                conv(b.conv1, planes, inplanes, 3, k + "conv1.weight");
                bn(b.bn2, planes, k + "bn2");
                expect_weight("face_id_net", b.prelu, {planes}, k + "prelu.weight");
                conv(b.conv2, planes, planes, 3, k + "conv2.weight");
                bn(b.bn3, planes, k + "bn3");
                if (j == 0) {  // every stage's first block strides by 2, so it has a downsample
                    conv(b.downsample_conv, planes, inplanes, 1, k + "downsample.0.weight");
                    bn(b.downsample_bn, planes, k + "downsample.1");
                } else {
                    check<shape_error>(!b.downsample_conv.defined(), "face_id_net", k, "downsample is given but the block keeps its shape");
                }
                inplanes = planes;
            }
        }
        bn(params_.bn2, w.back(), "bn2");
        expect_weight("face_id_net", params_.fc_weight, {config_.embedding_size, config_.fc_inputs()}, "fc.weight");
        expect_weight("face_id_net", params_.fc_bias, {config_.embedding_size}, "fc.bias");
        bn(params_.features, config_.embedding_size, "features");
    }

    /// Binds the reference keys for cfg's sizes.
    static params bind(weight_binder<B, T>& b, const config& cfg) {
        cfg.validate();
        params p;
        const auto bn = [&](weight_binder<B, T> s, index_t c) {
            return batch_norm_params{s.tensor("weight", {c}), s.tensor("bias", {c}), s.tensor("running_mean", {c}), s.tensor("running_var", {c})};
        };
        const auto& w = cfg.widths;
        p.conv1 = b.tensor("conv1.weight", {w[0], cfg.in_channels, 3, 3});
        p.bn1 = bn(b.scope("bn1"), w[0]);
        p.prelu = b.tensor("prelu.weight", {w[0]});
        index_t inplanes = w[0];
        for (std::size_t i = 0; i < w.size(); ++i) {
            std::vector<block_params> blocks;
            for (index_t j = 0; j < cfg.blocks[i]; ++j) {
                auto s = b.scope("layer" + std::to_string(i + 1), j);
                const index_t planes = w[i];
                block_params k;
                k.bn1 = bn(s.scope("bn1"), inplanes);
                k.conv1 = s.tensor("conv1.weight", {planes, inplanes, 3, 3});
                k.bn2 = bn(s.scope("bn2"), planes);
                k.prelu = s.tensor("prelu.weight", {planes});
                k.conv2 = s.tensor("conv2.weight", {planes, planes, 3, 3});
                k.bn3 = bn(s.scope("bn3"), planes);
                if (j == 0) {
                    k.downsample_conv = s.tensor("downsample.0.weight", {planes, inplanes, 1, 1});
                    k.downsample_bn = bn(s.scope("downsample.1"), planes);
                }
                blocks.push_back(std::move(k));
                inplanes = planes;
            }
            p.layers.push_back(std::move(blocks));
        }
        p.bn2 = bn(b.scope("bn2"), w.back());
        p.fc_weight = b.tensor("fc.weight", {cfg.embedding_size, cfg.fc_inputs()});
        p.fc_bias = b.tensor("fc.bias", {cfg.embedding_size});
        p.features = bn(b.scope("features"), cfg.embedding_size);
        return p;
    }

    /// Binds under `prefix` ("" for a bare state dict).
    static face_id_net load(context_t<B>& ctx, const weight_source& source, const config& cfg, std::string_view prefix = "") {
        weight_binder<B, T> b(ctx, source, std::string(prefix));
        auto p = bind(b, cfg);
        b.finish();
        return face_id_net(ctx, cfg, std::move(p));
    }

    /// Loads a file written by state_dict(): the sizes come from its
    /// "face_id_net_config" metadata (an io_error when it has none).
    static face_id_net load_file(context_t<B>& ctx, const std::filesystem::path& path) {
        const auto file = io::safetensors_file::open(path);
        const auto it = file.metadata().find("face_id_net_config");
        check<io_error>(it != file.metadata().end(), "face_id_net", "'", path.string(),
                        "' records no face_id_net_config; load it with face_id_net::load and the sizes it was trained with");
        return load(ctx, weight_source::open({path}), config::from_json(it->second));
    }

    /// insightface's initialisation, drawn from Philox streams keyed by (seed,
    /// key): convolutions N(0, 0.1^2), BatchNorm weight 1 / bias 0 / running
    /// statistics (0, 1), PReLU slopes 0.25 (torch's default), fc torch's
    /// Linear default U(-b, b) with b = 1/sqrt(fan_in) for weight and bias.
    static params initial_params(context_t<B>& ctx, const config& cfg, std::uint64_t seed) {
        cfg.validate();
        auto p = skeleton(ctx, cfg);
        const double fc_bound = 1.0 / std::sqrt(static_cast<double>(cfg.fc_inputs()));
        visit(p, [&](const std::string& key, tensor_type& t) {
            std::uint64_t h = 0xcbf29ce484222325ull ^ (seed * 0x9e3779b97f4a7c15ull);  // FNV-1a of the key, salted
            for (const unsigned char ch : key) h = (h ^ ch) * 0x100000001b3ull;
            const auto ends_with = [&](std::string_view s) { return key.size() >= s.size() && key.compare(key.size() - s.size(), s.size(), s) == 0; };
            std::vector<T> v(static_cast<std::size_t>(t.numel()), T(0));
            for (std::size_t i = 0; i < v.size(); ++i) {
                double x = 0.0;
                if (t.rank() == 4) x = 0.1 * philox::normal(h, i);
                else if (key == "fc.weight" || key == "fc.bias") x = (2.0 * philox::uniform(h, i) - 1.0) * fc_bound;
                else if (ends_with("prelu.weight")) x = 0.25;
                else if (ends_with(".weight") || ends_with(".running_var")) x = 1.0;
                v[i] = static_cast<T>(x);
            }
            t = tensor_type::from_host(ctx, t.shape(), v);
        }, true, true);
        return p;
    }

    /// images (N, in_channels, S, S) -> embeddings (N, embedding_size), BatchNorm with running statistics.
    tensor_type forward(context_t<B>& ctx, const tensor_type& images) const {
        check_input(images);
        auto x = ops::conv2d(ctx, images, params_.conv1, nullptr, {.stride = 1, .padding = 1});
        x = ops::prelu(ctx, eval_norm(ctx, x, params_.bn1), params_.prelu);
        for (std::size_t i = 0; i < params_.layers.size(); ++i)
            for (std::size_t j = 0; j < params_.layers[i].size(); ++j) {
                const auto& b = params_.layers[i][j];
                auto y = eval_norm(ctx, x, b.bn1);
                y = ops::conv2d(ctx, y, b.conv1, nullptr, {.stride = 1, .padding = 1});
                y = ops::prelu(ctx, eval_norm(ctx, y, b.bn2), b.prelu);
                y = ops::conv2d(ctx, y, b.conv2, nullptr, {.stride = stride_of(j), .padding = 1});
                y = eval_norm(ctx, y, b.bn3);
                const auto shortcut = b.downsample_conv.defined()
                                          ? eval_norm(ctx, ops::conv2d(ctx, x, b.downsample_conv, nullptr, {.stride = stride_of(j), .padding = 0}),
                                                      b.downsample_bn)
                                          : x;
                x = ops::add(ctx, y, shortcut);
            }
        x = eval_norm(ctx, x, params_.bn2);
        const index_t n = x.dim(0);
        x = ops::linear(ctx, x.reshape({n, config_.fc_inputs()}), params_.fc_weight, &params_.fc_bias);
        return eval_norm(ctx, x.reshape({n, config_.embedding_size, 1, 1}), params_.features).reshape({n, config_.embedding_size});
    }

    const config& settings() const noexcept { return config_; }
    const params& weights() const noexcept { return params_; }
    index_t embedding_size() const noexcept { return config_.embedding_size; }

    /// Training mode: forward_train uses and updates batch statistics.
    void train(bool on = true) noexcept { training_ = on; }
    /// Eval mode (the default): forward_train uses the running statistics.
    void eval() noexcept { training_ = false; }
    bool training() const noexcept { return training_; }

    struct block_saved {
        modules::detail::batch_norm_saved<B, T> bn1, bn2, bn3, downsample_bn;
        ops::conv2d_saved<B, T> conv1, conv2, downsample_conv;
        ops::prelu_saved<B, T> prelu;
        bool downsample = false;
    };
    /// What backward needs from forward_train.
    struct saved_state {
        ops::conv2d_saved<B, T> conv1;
        modules::detail::batch_norm_saved<B, T> bn1, bn2, features;
        ops::prelu_saved<B, T> prelu;
        std::vector<std::vector<block_saved>> layers;
        ops::linear_saved<B, T> fc;
        shape head_input;  ///< bn2's output shape, fc's input before flattening
        ops::needs need;
    };
    /// Gradients: `weights` mirrors params (running statistics undefined);
    /// `images` is defined when the input gradient was asked for.
    struct grads {
        params weights;
        tensor_type images;
    };

    /// forward() keeping what backward needs, with BatchNorm in the current
    /// mode. In training mode the running statistics are replaced by updated
    /// tensors (the old ones, possibly shared, are left alone). `need.input`:
    /// the images' gradient (off by default); `need.params`: the weights'.
    std::pair<tensor_type, saved_state> forward_train(context_t<B>& ctx, const tensor_type& images,
                                                      ops::needs need = {.input = false, .params = true}) {
        check_input(images);
        saved_state s;
        s.need = need;
        const ops::needs inner{.input = true, .params = need.params};
        tensor_type x;
        std::tie(x, s.conv1) = ops::conv2d_forward(ctx, images, params_.conv1, nullptr, {.stride = 1, .padding = 1},
                                                   {.input = need.input, .params = need.params});
        std::tie(x, s.bn1) = train_norm(ctx, x, params_.bn1, "bn1");
        std::tie(x, s.prelu) = ops::prelu_forward(ctx, x, params_.prelu, inner);
        for (std::size_t i = 0; i < params_.layers.size(); ++i) {
            std::vector<block_saved> stage;
            for (std::size_t j = 0; j < params_.layers[i].size(); ++j) {
                auto& b = params_.layers[i][j];
                const std::string k = "layer" + std::to_string(i + 1) + "." + std::to_string(j) + ".";
                block_saved bs;
                tensor_type y;
                std::tie(y, bs.bn1) = train_norm(ctx, x, b.bn1, k + "bn1");
                std::tie(y, bs.conv1) = ops::conv2d_forward(ctx, y, b.conv1, nullptr, {.stride = 1, .padding = 1}, inner);
                std::tie(y, bs.bn2) = train_norm(ctx, y, b.bn2, k + "bn2");
                std::tie(y, bs.prelu) = ops::prelu_forward(ctx, y, b.prelu, inner);
                std::tie(y, bs.conv2) = ops::conv2d_forward(ctx, y, b.conv2, nullptr, {.stride = stride_of(j), .padding = 1}, inner);
                std::tie(y, bs.bn3) = train_norm(ctx, y, b.bn3, k + "bn3");
                tensor_type shortcut = x;
                if (b.downsample_conv.defined()) {
                    bs.downsample = true;
                    std::tie(shortcut, bs.downsample_conv) =
                        ops::conv2d_forward(ctx, x, b.downsample_conv, nullptr, {.stride = stride_of(j), .padding = 0}, inner);
                    std::tie(shortcut, bs.downsample_bn) = train_norm(ctx, shortcut, b.downsample_bn, k + "downsample.1");
                }
                x = ops::add(ctx, y, shortcut);
                stage.push_back(std::move(bs));
            }
            s.layers.push_back(std::move(stage));
        }
        std::tie(x, s.bn2) = train_norm(ctx, x, params_.bn2, "bn2");
        s.head_input = x.shape();
        const index_t n = x.dim(0);
        std::tie(x, s.fc) = ops::linear_forward(ctx, x.reshape({n, config_.fc_inputs()}), params_.fc_weight, &params_.fc_bias, inner);
        std::tie(x, s.features) = train_norm(ctx, x.reshape({n, config_.embedding_size, 1, 1}), params_.features, "features");
        return {x.reshape({n, config_.embedding_size}), std::move(s)};
    }

    /// Gradients of sum(embedding * grad_output) for the state of one forward_train.
    grads backward(context_t<B>& ctx, const saved_state& s, const tensor_type& grad_output) const {
        const index_t n = s.head_input.rank() == 4 ? s.head_input[0] : 0;
        check<shape_error>(s.layers.size() == params_.layers.size() && grad_output.rank() == 2 && grad_output.dim(0) == n &&
                               grad_output.dim(1) == config_.embedding_size,
                           "face_id_net", "grad_output ", grad_output.shape().str(), " does not fit the saved forward (", n, ", ",
                           config_.embedding_size, ")");
        const ops::needs bn_need{.input = true, .params = s.need.params};
        grads g;
        auto& gw = g.weights;
        const auto take = [](batch_norm_params& dst, const modules::detail::batch_norm_grads<B, T>& src) {
            dst.weight = src.weight;
            dst.bias = src.bias;
        };
        auto f = modules::detail::batch_norm_backward(ctx, s.features, grad_output.reshape({n, config_.embedding_size, 1, 1}), bn_need);
        take(gw.features, f);
        auto fc = ops::linear_backward(ctx, s.fc, f.input.reshape({n, config_.embedding_size}));
        gw.fc_weight = fc.weight;
        gw.fc_bias = fc.bias;
        auto head = modules::detail::batch_norm_backward(ctx, s.bn2, fc.input.reshape(s.head_input.to_vector()), bn_need);
        take(gw.bn2, head);
        auto d = head.input;
        gw.layers.resize(params_.layers.size());
        for (std::size_t i = params_.layers.size(); i-- > 0;) {
            gw.layers[i].resize(params_.layers[i].size());
            for (std::size_t j = params_.layers[i].size(); j-- > 0;) {
                const auto& bs = s.layers[i][j];
                auto& gb = gw.layers[i][j];
                tensor_type d_shortcut = d;
                if (bs.downsample) {
                    auto dn = modules::detail::batch_norm_backward(ctx, bs.downsample_bn, d, bn_need);
                    take(gb.downsample_bn, dn);
                    auto dc = ops::conv2d_backward(ctx, bs.downsample_conv, dn.input);
                    gb.downsample_conv = dc.weight;
                    d_shortcut = dc.input;
                }
                auto b3 = modules::detail::batch_norm_backward(ctx, bs.bn3, d, bn_need);
                take(gb.bn3, b3);
                auto c2 = ops::conv2d_backward(ctx, bs.conv2, b3.input);
                gb.conv2 = c2.weight;
                auto pr = ops::prelu_backward(ctx, bs.prelu, c2.input);
                gb.prelu = pr.weight;
                auto b2 = modules::detail::batch_norm_backward(ctx, bs.bn2, pr.input, bn_need);
                take(gb.bn2, b2);
                auto c1 = ops::conv2d_backward(ctx, bs.conv1, b2.input);
                gb.conv1 = c1.weight;
                auto b1 = modules::detail::batch_norm_backward(ctx, bs.bn1, c1.input, bn_need);
                take(gb.bn1, b1);
                d = ops::add(ctx, b1.input, d_shortcut);
            }
        }
        auto pr = ops::prelu_backward(ctx, s.prelu, d);
        gw.prelu = pr.weight;
        auto b1 = modules::detail::batch_norm_backward(ctx, s.bn1, pr.input, bn_need);
        take(gw.bn1, b1);
        auto c1 = ops::conv2d_backward(ctx, s.conv1, b1.input);
        gw.conv1 = c1.weight;
        if (s.need.input) g.images = c1.input;
        return g;
    }

    /// Every tensor (running statistics included) under its state-dict key, ready to write.
    io::safetensors_writer state_dict(context_t<B>& ctx) const {
        io::safetensors_writer w;
        visit(params_, [&](const std::string& k, const tensor_type& t) { w.add(ctx, k, t); }, true, true);
        w.set_metadata("format", "pt");
        w.set_metadata("face_id_net_config", config_.to_json());
        return w;
    }

private:
    static index_t stride_of(std::size_t block) { return block == 0 ? 2 : 1; }

    /// A params of zero-filled tensors with cfg's shapes (initial_params fills them).
    static params skeleton(context_t<B>& ctx, const config& cfg) {
        const auto z = [&](shape s) { return tensor_type::zeros(ctx, s); };
        const auto bn = [&](index_t c) { return batch_norm_params{z({c}), z({c}), z({c}), z({c})}; };
        const auto& w = cfg.widths;
        params p;
        p.conv1 = z({w[0], cfg.in_channels, 3, 3});
        p.bn1 = bn(w[0]);
        p.prelu = z({w[0]});
        index_t inplanes = w[0];
        for (std::size_t i = 0; i < w.size(); ++i) {
            std::vector<block_params> blocks;
            for (index_t j = 0; j < cfg.blocks[i]; ++j) {
                const index_t planes = w[i];
                block_params b{bn(inplanes), z({planes, inplanes, 3, 3}), bn(planes), z({planes}), z({planes, planes, 3, 3}), bn(planes), {}, {}};
                if (j == 0) {
                    b.downsample_conv = z({planes, inplanes, 1, 1});
                    b.downsample_bn = bn(planes);
                }
                blocks.push_back(std::move(b));
                inplanes = planes;
            }
            p.layers.push_back(std::move(blocks));
        }
        p.bn2 = bn(w.back());
        p.fc_weight = z({cfg.embedding_size, cfg.fc_inputs()});
        p.fc_bias = z({cfg.embedding_size});
        p.features = bn(cfg.embedding_size);
        return p;
    }

    void check_input(const tensor_type& images) const {
        const index_t s = config_.input_size;
        check<shape_error>(images.defined() && images.rank() == 4 && images.dim(1) == config_.in_channels && images.dim(2) == s &&
                               images.dim(3) == s && images.dim(0) >= 1,
                           "face_id_net", "images ", images.defined() ? images.shape().str() : std::string("(undefined)"), " are not (N, ",
                           config_.in_channels, ", ", s, ", ", s, ")");
    }

    /// y = x scale + shift with scale = gamma / sqrt(running_var + eps), shift = beta - running_mean scale,
    /// computed per call: an optimizer updates the parameters in place.
    tensor_type eval_norm(context_t<B>& ctx, const tensor_type& x, const batch_norm_params& p) const {
        const index_t c = x.dim(1);
        const auto eps = tensor_type::full(ctx, {1}, element_cast<T>(config_.batch_norm_eps));
        const auto scale = ops::div(ctx, p.weight, ops::unary(ctx, unary_op::sqrt, ops::add(ctx, p.running_var, eps)));
        const auto shift = ops::sub(ctx, p.bias, ops::mul(ctx, p.running_mean, scale));
        return ops::add(ctx, ops::mul(ctx, x, scale.reshape({1, c, 1, 1})), shift.reshape({1, c, 1, 1}));
    }

    std::pair<tensor_type, modules::detail::batch_norm_saved<B, T>> train_norm(context_t<B>& ctx, const tensor_type& x, batch_norm_params& p,
                                                                             const std::string& where) {
        const index_t c = x.dim(1);
        if (!training_)
            return modules::detail::batch_norm_apply(ctx, x, p.running_mean.reshape({1, c, 1, 1}), p.running_var.reshape({1, c, 1, 1}), p.weight,
                                                     p.bias, config_.batch_norm_eps, false);
        const index_t count = x.numel() / c;
        check<value_error>(count > 1, "face_id_net", "training-mode BatchNorm needs more than one value per channel, got ", x.shape().str(),
                           " at ", where);
        const auto [mean, var] = modules::detail::batch_moments(ctx, x);
        auto out = modules::detail::batch_norm_apply(ctx, x, mean, var, p.weight, p.bias, config_.batch_norm_eps, true);
        const double m = config_.batch_norm_momentum;
        const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
        p.running_mean = ops::add_scaled(ctx, m, mean.reshape({c}), 1.0 - m, p.running_mean);
        p.running_var = ops::add_scaled(ctx, m * unbias, var.reshape({c}), 1.0 - m, p.running_var);
        return out;
    }

    config config_;
    params params_;
    bool training_ = false;
};

}  // namespace dynamicid::modules::identity
