// dynamicid training: the face-identity encoder trainer (face_id_net + ArcFace).
//
// Trains a modules::identity::face_id_net and the ArcFace class weights on
// batches of (images, identity labels) from a user-provided source, the way
// insightface's arcface_torch does: embeddings -> ArcFace margin loss over
// every class -> backward into the net and the class weights. features.weight
// (the embedding BatchNorm's scale) stays frozen at its value, as insightface
// freezes it. The optimizer is AdamW (training/optim.hpp) with global-norm
// clipping and an LR schedule.
//
// The source is called with the step index, so a run, and a resumed run, see
// the same batches when the source is a pure function of the step:
//
//     dynamicid::training::id_trainer_config cfg;
//     cfg.net = {.input_size = 64, .widths = {32, 64, 128, 256}, .blocks = {1, 1, 1, 1}, .embedding_size = 128};
//     cfg.num_classes = 1000; cfg.output_dir = "out"; cfg.steps = 20000;
//     auto source = [&](auto& ctx, std::int64_t step) { return world.render_batch(ctx, step); };  // -> id_batch
//     dynamicid::training::id_trainer<dynamicid::cpu_backend> trainer(ctx, cfg, source);
//     trainer.run(ctx, stop_source.get_token(), [](const auto& p) { std::printf("%lld %g\n", (long long)p.step, p.loss); });
//     // out/checkpoint-<step>/face_id_net.safetensors loads with face_id_net::load(ctx, source, cfg.net)
//
// Checkpoint folders (written atomically, every checkpoint_every steps and at
// the end): face_id_net.safetensors (the net's state dict, running statistics
// included) and trainer_state.safetensors (the class weights as
// "margin.weight", the optimizer state, and the step / seed / config in the
// metadata). cfg.resume names such a folder, or "latest" in output_dir.
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/philox.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/identity/face_id_net.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/training/arcface_loss.hpp>
#include <dynamicid/training/detail/trainer_common.hpp>
#include <dynamicid/training/lr_schedule.hpp>
#include <dynamicid/training/optim.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <numbers>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// One training batch: images (N, C, S, S) and a class in [0, num_classes) per image.
template <class B, class T>
struct id_batch {
    tensor<B, T> images;
    std::vector<std::int64_t> labels;
};

/// Where batches come from: called with the step index (0, 1, ...).
template <class B, class T>
using id_batch_source = std::function<id_batch<B, T>(context_t<B>&, std::int64_t step)>;

/// The identity trainer's settings.
///
///     id_trainer_config cfg{.net = {.input_size = 32, .widths = {16, 32}, .blocks = {1, 1}, .embedding_size = 64},
///                           .num_classes = 100, .output_dir = "out"};
struct id_trainer_config {
    modules::identity::face_id_net_config net{};
    index_t num_classes = 0;
    arcface_options margin{};                 ///< scale 64, margin 0.5 (insightface)
    std::filesystem::path output_dir{};       ///< checkpoints and train_log.csv
    std::filesystem::path init_weights{};     ///< a face_id_net safetensors to start from; empty: insightface's initialisation
    std::int64_t steps = 1000;
    double lr = 1e-3;
    std::string lr_schedule = "constant";     ///< constant | constant_with_warmup | linear | cosine
    std::int64_t warmup = 0;
    double weight_decay = 5e-4;
    double clip = 5.0;                        ///< max global gradient norm (insightface's 5); 0: no clipping
    std::uint64_t seed = 0;                   ///< initialisation of the net and the class weights
    std::int64_t checkpoint_every = 0;        ///< 0: only at the end
    std::filesystem::path resume{};           ///< a checkpoint folder, or "latest" (in output_dir)

    void validate() const {
        const auto need = [](bool ok, const char* what) { check<value_error>(ok, detail::trainer_component, what); };
        net.validate();
        need(num_classes >= 2, "config: \"num_classes\" must be >= 2");
        need(!output_dir.empty(), "config: \"output_dir\" is required");
        need(steps >= 1, "config: \"steps\" must be >= 1");
        need(std::isfinite(lr) && lr >= 0, "config: \"lr\" must be finite and >= 0");
        need(warmup >= 0, "config: \"warmup\" must be >= 0");
        need(std::isfinite(weight_decay) && weight_decay >= 0, "config: \"weight_decay\" must be finite and >= 0");
        need(std::isfinite(clip) && clip >= 0, "config: \"clip\" must be finite and >= 0");
        need(checkpoint_every >= 0, "config: \"checkpoint_every\" must be >= 0");
        need(std::isfinite(margin.scale) && margin.scale > 0 && std::isfinite(margin.margin) && margin.margin >= 0 &&
                 margin.margin < std::numbers::pi / 2,
             "config: the ArcFace scale must be > 0 and the margin in [0, pi/2)");
        (void)lr_schedule_kind_from_name(lr_schedule);
    }

    nlohmann::json to_json() const {
        return {{"stage", "face_id"},
                {"net", {{"input_size", net.input_size}, {"in_channels", net.in_channels}, {"widths", net.widths}, {"blocks", net.blocks},
                         {"embedding_size", net.embedding_size}, {"batch_norm_eps", net.batch_norm_eps},
                         {"batch_norm_momentum", net.batch_norm_momentum}}},
                {"num_classes", num_classes}, {"scale", margin.scale}, {"margin", margin.margin}, {"easy_margin", margin.easy_margin},
                {"output_dir", output_dir.string()}, {"init_weights", init_weights.string()}, {"steps", steps}, {"lr", lr},
                {"lr_schedule", lr_schedule}, {"warmup", warmup}, {"weight_decay", weight_decay}, {"clip", clip}, {"seed", seed},
                {"checkpoint_every", checkpoint_every}};
    }
};

/// The identity-encoder trainer (see the file comment).
template <class B, class T = float>
    requires computes_in<B, T>
class id_trainer {
public:
    using tensor_type = tensor<B, T>;
    using net_type = modules::identity::face_id_net<B, T>;
    static constexpr const char* stage = "face_id";
    static constexpr const char* frozen_key = "features.weight";

    /// Builds (or resumes) the net and the class weights; `source` supplies the batches.
    id_trainer(context_t<B>& ctx, id_trainer_config cfg, id_batch_source<B, T> source) : cfg_(std::move(cfg)), source_(std::move(source)) {
        cfg_.validate();
        check<value_error>(static_cast<bool>(source_), detail::trainer_component, "no batch source");
        const auto resume_dir = resolve_resume();
        std::optional<io::safetensors_file> state;
        if (!resume_dir.empty()) {
            net_.emplace(net_type::load(ctx, modules::weight_source::open({resume_dir / "face_id_net.safetensors"}), cfg_.net));
            state.emplace(io::safetensors_file::open(resume_dir / "trainer_state.safetensors"));
            step_ = check_state(*state);
            class_weights_ = state->template load<B, T>(ctx, "margin.weight");
            check<io_error>(class_weights_.shape() == shape({cfg_.num_classes, cfg_.net.embedding_size}), detail::trainer_component,
                            state->source(), ": margin.weight is ", class_weights_.shape().str(), ", expected (", cfg_.num_classes, ", ",
                            cfg_.net.embedding_size, ")");
        } else {
            if (!cfg_.init_weights.empty())
                net_.emplace(net_type::load(ctx, modules::weight_source::open({cfg_.init_weights}), cfg_.net));
            else
                net_.emplace(ctx, cfg_.net, net_type::initial_params(ctx, cfg_.net, cfg_.seed));
            class_weights_ = initial_class_weights(ctx);
        }
        std::vector<tensor_type> params;
        net_type::visit(net_->weights(), [&](const std::string& k, const tensor_type& t) {
            if (k != frozen_key) params.push_back(t);
        });
        params.push_back(class_weights_);
        opt_.emplace(ctx, std::move(params), adamw_options{.lr = cfg_.lr, .weight_decay = cfg_.weight_decay});
        if (state) detail::load_optimizer_state(ctx, *state, *opt_);
    }

    const id_trainer_config& config() const noexcept { return cfg_; }
    /// Optimizer steps done (including those of a resumed checkpoint).
    std::int64_t step() const noexcept { return step_; }
    const net_type& net() const { return *net_; }
    /// The ArcFace class weights (num_classes, embedding_size).
    const tensor_type& class_weights() const noexcept { return class_weights_; }
    /// Fraction of the last step's images whose nearest class (by cosine, before the margin) was their own.
    double last_accuracy() const noexcept { return last_accuracy_; }

    /// One optimizer step on the source's batch for the current step.
    train_progress train_step(context_t<B>& ctx) {
        const detail::run_clock clock;
        const double lr = training::lr_schedule{.kind = lr_schedule_kind_from_name(cfg_.lr_schedule), .base_lr = cfg_.lr,
                                                .warmup_steps = cfg_.warmup, .total_steps = cfg_.steps}
                              .lr(step_);
        opt_->set_lr(lr);
        auto batch = source_(ctx, step_);
        check<shape_error>(batch.images.defined() && batch.images.rank() == 4 && static_cast<index_t>(batch.labels.size()) == batch.images.dim(0),
                           detail::trainer_component, "step ", step_, ": the source gave ", batch.labels.size(), " labels for images ",
                           batch.images.defined() ? batch.images.shape().str() : std::string("(undefined)"));
        net_->train();
        auto [embedding, net_saved] = net_->forward_train(ctx, batch.images);
        auto [loss, loss_saved] = arcface_loss_forward(ctx, embedding, class_weights_, std::span<const std::int64_t>(batch.labels), cfg_.margin);
        const auto loss_grads = arcface_loss_backward(ctx, loss_saved);
        const auto net_grads = net_->backward(ctx, net_saved, loss_grads.embeddings);
        std::vector<tensor_type> grads;
        net_type::visit(net_grads.weights, [&](const std::string& k, const tensor_type& t) {
            if (k != frozen_key) grads.push_back(t);
        });
        grads.push_back(loss_grads.class_weights);
        check<value_error>(grads.size() == opt_->param_count(), detail::trainer_component, "the gradients (", grads.size(),
                           ") do not mirror the parameters (", opt_->param_count(), ")");
        const double norm = clip_grad_norm(ctx, grads, cfg_.clip > 0 ? cfg_.clip : 1e30);
        check<value_error>(std::isfinite(norm), detail::trainer_component, "step ", step_, ": the gradient norm is ", norm);
        opt_->step(ctx, grads);
        net_->eval();
        ++step_;
        const auto n = static_cast<double>(batch.labels.size());
        last_accuracy_ = static_cast<double>(loss_saved.correct) / n;
        train_progress p;
        p.step = step_;
        p.total = cfg_.steps;
        p.loss = element_cast<double>(loss.to_host(ctx)[0]);
        p.lr = lr;
        p.grad_norm = norm;
        p.seconds = clock.seconds();
        p.samples_per_second = p.seconds > 0 ? n / p.seconds : 0.0;
        return p;
    }

    /// Trains until config().steps or a stop request; checkpoints every
    /// checkpoint_every steps and at the end (also when stopped). Appends to
    /// <output_dir>/train_log.csv. Returns the steps done by this call.
    std::int64_t run(context_t<B>& ctx, std::stop_token stop = {}, std::function<void(const train_progress&)> on_progress = {}) {
        trainer_common_config loop;  // the fields the shared loop reads
        loop.output_dir = cfg_.output_dir;
        loop.steps = cfg_.steps;
        loop.checkpoint_every = cfg_.checkpoint_every;
        return detail::run_steps(ctx, *this, loop, true, stop, on_progress);
    }

    /// The net's state dict (running statistics included), loadable by face_id_net::load.
    io::safetensors_writer weights_file(context_t<B>& ctx) const { return net_->state_dict(ctx); }

    /// Writes <output_dir>/checkpoint-<step>/{face_id_net.safetensors, trainer_state.safetensors}.
    std::filesystem::path save_checkpoint(context_t<B>& ctx) const {
        const auto weights = weights_file(ctx);
        io::safetensors_writer state;
        state.add(ctx, "margin.weight", class_weights_);
        detail::add_optimizer_state(ctx, state, *opt_);
        state.set_metadata("stage", stage);
        state.set_metadata("step", std::to_string(step_));
        state.set_metadata("seed", std::to_string(cfg_.seed));
        state.set_metadata("config", cfg_.to_json().dump());
        return detail::write_checkpoint_folder(cfg_.output_dir, step_,
                                               {{"face_id_net.safetensors", &weights}, {"trainer_state.safetensors", &state}});
    }

private:
    std::filesystem::path resolve_resume() const {
        if (cfg_.resume.empty()) return {};
        if (cfg_.resume == "latest") return detail::latest_checkpoint(cfg_.output_dir);
        check<io_error>(std::filesystem::is_directory(cfg_.resume), detail::trainer_component, "resume: '", cfg_.resume.string(),
                        "' is not a checkpoint folder");
        return cfg_.resume;
    }

    std::int64_t check_state(const io::safetensors_file& f) const {
        const auto& m = f.metadata();
        const auto get = [&](const char* k) {
            const auto it = m.find(k);
            check<io_error>(it != m.end(), detail::trainer_component, f.source(), ": no \"", k, "\" in the metadata (not a trainer checkpoint?)");
            return it->second;
        };
        check<io_error>(get("stage") == stage, detail::trainer_component, f.source(), ": a '", get("stage"), "' checkpoint, this is the '", stage,
                        "' trainer");
        check<value_error>(get("seed") == std::to_string(cfg_.seed), detail::trainer_component, f.source(), ": written with seed ", get("seed"),
                           "; this run has seed ", cfg_.seed);
        std::int64_t step = -1;
        try {
            step = std::stoll(get("step"));
        } catch (const std::exception&) {
            throw io_error(detail::trainer_component, f.source() + ": bad step in the metadata");
        }
        check<io_error>(step >= 0, detail::trainer_component, f.source(), ": negative step");
        return step;
    }

    // partial_fc's initialisation: N(0, 0.01^2).
    tensor_type initial_class_weights(context_t<B>& ctx) const {
        const auto stream = detail::stream_of(cfg_.seed, -1, 0xfacef00dull);
        std::vector<T> v(static_cast<std::size_t>(cfg_.num_classes * cfg_.net.embedding_size));
        for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<T>(0.01 * philox::normal(stream, i));
        return tensor_type::from_host(ctx, {cfg_.num_classes, cfg_.net.embedding_size}, v);
    }

    id_trainer_config cfg_;
    id_batch_source<B, T> source_;
    std::optional<net_type> net_;
    tensor_type class_weights_;
    std::optional<adamw<B, T>> opt_;
    std::int64_t step_ = 0;
    double last_accuracy_ = 0.0;
};

}  // namespace dynamicid::training
