// dynamicid training: a Stable Diffusion base model from scratch, one
// component at a time, in diffusers' folder layout.
//
//   vae:   x in [-1, 1] -> encoder -> (mean, logvar) -> z = mean + std * eps
//          -> decoder -> loss = MSE(decoder(z), x) + kl_weight * mean_i KL_i
//          (KL_i: diffusers' DiagonalGaussianDistribution.kl(), summed over a
//          sample's latent elements)
//   unet:  z0 = scaling_factor * sample of the frozen VAE's posterior;
//          t ~ U[0, num_train_timesteps); x_t = DDPM add_noise(z0, eps, t);
//          loss = MSE(unet(x_t, t, text), eps), the caption dropped to "" with
//          probability caption_drop (for classifier-free guidance); the text
//          encoder is frozen
//
// `sd_model` is a diffusers folder holding at least each component's
// config.json. The trained component starts from torch's default
// initialisation (init "random", seeded by `seed`) or from the folder's
// weights (init "pretrained"); the unet stage needs the folder's VAE and
// text-encoder weights (initialize_component writes random ones for a text
// encoder that stays frozen). A step runs this rank's share of `batch` images
// as one batch. Checkpoints hold the component as diffusers saves it
// (<component>/config.json + the weights) and the AdamW state, written
// atomically; resuming is bit-identical, as in the DynamicID stages.
//
//     auto cfg = dynamicid::training::base_trainer_config::from_json(nlohmann::json::parse(text));   // "component": "vae"
//     dynamicid::training::base_trainer<dynamicid::cpu_backend> trainer(ctx, cfg);
//     trainer.run(ctx);   // out/checkpoint-<step>/vae/{config.json, diffusion_pytorch_model.safetensors}
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/clip/text_model.hpp>
#include <dynamicid/modules/clip/vision_model.hpp>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/modules/vae/autoencoder_kl.hpp>
#include <dynamicid/modules/weights.hpp>
#include <dynamicid/ops.hpp>
#include <dynamicid/schedulers/ddpm.hpp>
#include <dynamicid/text/clip_tokenizer.hpp>
#include <dynamicid/training/communicator.hpp>
#include <dynamicid/training/dataset.hpp>
#include <dynamicid/training/detail/trainer_common.hpp>
#include <dynamicid/training/losses.hpp>
#include <dynamicid/training/optim.hpp>
#include <dynamicid/training/tape.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <stop_token>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// The base-model stage's settings (JSON keys in brackets; the common keys as
/// in trainer_common_config, `image_encoder` unused).
struct base_trainer_config : trainer_common_config {
    std::string component = "unet";  ///< ["component"] "vae" or "unet"
    std::string init = "random";      ///< ["init"] "random" or "pretrained" (the folder's weights)
    index_t resolution = 64;          ///< ["resolution"] training images are resized and centre-cropped to this
    double caption_drop = 0.1;        ///< ["caption_drop"] unet: probability of training on ""
    double kl_weight = 1e-6;          ///< ["kl_weight"] vae: weight of the KL term

    static base_trainer_config from_json(const nlohmann::json& j) {
        base_trainer_config c;
        detail::read_common(j, c, {"component", "init", "resolution", "caption_drop", "kl_weight"});
        try {
            if (j.contains("component")) c.component = j.at("component").get<std::string>();
            if (j.contains("init")) c.init = j.at("init").get<std::string>();
            if (j.contains("resolution")) c.resolution = j.at("resolution").get<index_t>();
            if (j.contains("caption_drop")) c.caption_drop = j.at("caption_drop").get<double>();
            if (j.contains("kl_weight")) c.kl_weight = j.at("kl_weight").get<double>();
        } catch (const nlohmann::json::exception& e) {
            throw value_error(detail::trainer_component, std::string("config: ") + e.what());
        }
        return c;
    }
    nlohmann::json to_json() const {
        auto j = detail::common_to_json(*this);
        j["stage"] = "base";
        j["component"] = component;
        j["init"] = init;
        j["resolution"] = resolution;
        j["caption_drop"] = caption_drop;
        j["kl_weight"] = kl_weight;
        return j;
    }
    void validate() const {
        detail::validate_common(*this);
        const auto need = [](bool ok, const char* what) { check<value_error>(ok, detail::trainer_component, what); };
        need(component == "vae" || component == "unet", "config: \"component\" must be \"vae\" or \"unet\"");
        need(init == "random" || init == "pretrained", "config: \"init\" must be \"random\" or \"pretrained\"");
        need(resolution >= 8 && resolution % 8 == 0, "config: \"resolution\" must be a positive multiple of 8");
        need(std::isfinite(caption_drop) && caption_drop >= 0 && caption_drop <= 1, "config: \"caption_drop\" must be in [0, 1]");
        need(std::isfinite(kl_weight) && kl_weight >= 0, "config: \"kl_weight\" must be finite and >= 0");
    }
};

namespace detail {

inline nlohmann::json read_json_file(const std::filesystem::path& p) {
    std::ifstream in(p);
    check<io_error>(static_cast<bool>(in), trainer_component, "cannot read '", p.string(), "'");
    try {
        return nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        throw io_error(trainer_component, p.string() + ": " + e.what());
    }
}

/// The weights file diffusers writes for a component folder.
inline std::filesystem::path component_weights(const std::filesystem::path& folder) {
    return folder / (folder.filename() == "text_encoder" || folder.filename() == "image_encoder" ? "model.safetensors"
                                                                                                : "diffusion_pytorch_model.safetensors");
}

/// A binder over `weights`, or, when absent, creating every tensor with
/// torch's default initialisation and recording it into `record`.
template <class B, class T>
modules::weight_binder<B, T> fresh_binder(context_t<B>& ctx, std::uint64_t seed, io::safetensors_writer* record) {
    auto init = modules::torch_default_init(seed);
    return modules::weight_binder<B, T>(ctx, {}, "", [init, record](const std::string& key, const shape& dims) {
        auto v = init(key, dims);
        if (record) record->add(key, dims, v);
        return v;
    });
}

}  // namespace detail

/// Writes random weights (torch's default initialisation, `seed`) for the
/// component folder `folder` (its name says which: text_encoder, unet, vae,
/// image_encoder) from its config.json, unless weights are there already;
/// returns whether it wrote. The recipe of a model trained from scratch uses it
/// for the frozen text encoder and image-feature encoder.
template <class B, class T = float>
bool initialize_component(context_t<B>& ctx, const std::filesystem::path& folder, std::uint64_t seed) {
    const auto weights = detail::component_weights(folder);
    if (std::filesystem::exists(weights)) return false;
    const auto cfg = detail::read_json_file(folder / "config.json");
    io::safetensors_writer w;
    auto b = detail::fresh_binder<B, T>(ctx, seed, &w);
    const auto name = folder.filename().string();
    if (name == "text_encoder") {
        (void)modules::clip::text_model<B, T>::bind(b.scope("text_model"), modules::clip::text_config::from_json(cfg));  // transformers' keys
    } else if (name == "unet") {
        (void)modules::unet::unet_2d_condition<B, T>::bind(b, modules::unet::unet_config::from_json(cfg));
    } else if (name == "vae") {
        (void)modules::vae::autoencoder_kl<B, T>::bind(b, modules::vae::autoencoder_kl_config::from_json(cfg));
    } else if (name == "image_encoder") {
        (void)modules::clip::vision_model<B, T>::bind(b.scope("vision_model"), modules::clip::vision_config::from_json(cfg));
    } else {
        throw value_error(detail::trainer_component,
                          "initialize_component: '" + folder.string() + "' is not a text_encoder, unet, vae or image_encoder folder");
    }
    b.finish();
    w.set_metadata("format", "pt");
    w.write(weights);
    return true;
}

/// The base-model trainer (see the file comment).
template <class B, class T = float, communicator C = single_process_communicator>
    requires computes_in<B, T>
class base_trainer {
public:
    using tensor_type = tensor<B, T>;
    using unet_type = modules::unet::unet_2d_condition<B, T>;
    using vae_type = modules::vae::autoencoder_kl<B, T>;
    static constexpr const char* stage = "base";
    static constexpr std::uint64_t purpose_drop = 21, purpose_timestep = 22, purpose_noise = 23, purpose_vae = 24, purpose_init = 25;

    base_trainer(context_t<B>& ctx, base_trainer_config cfg, C* comm = nullptr)
        : cfg_(std::move(cfg)), comm_(detail::pick_communicator(comm, own_comm_)) {
        cfg_.validate();
        data_ = read_manifest(cfg_.manifest, {.arcface_width = 0, .require_arcface = false});
        check<value_error>(!data_.empty(), detail::trainer_component, "manifest '", cfg_.manifest.string(), "' has no samples");
        order_.emplace(data_.size(), cfg_.seed);
        const auto& root = cfg_.sd_model;
        const auto resume_dir = detail::resolve_resume(cfg_);
        const bool vae_stage = cfg_.component == "vae";
        const auto start = [&](const std::filesystem::path& folder) -> std::optional<modules::weight_source> {
            if (!resume_dir.empty()) return modules::weight_source::open({detail::component_weights(resume_dir / cfg_.component)});
            if (cfg_.init == "pretrained") return modules::weight_source::open({detail::component_weights(folder)});
            return std::nullopt;
        };
        const auto seed = detail::stream_of(cfg_.seed, -1, purpose_init);

        vae_config_ = modules::vae::autoencoder_kl_config::from_json(detail::read_json_file(root / "vae" / "config.json"));
        if (vae_stage) {
            if (auto src = start(root / "vae")) {
                vae_.emplace(vae_type::load(ctx, *src, vae_config_));
            } else {
                auto b = detail::fresh_binder<B, T>(ctx, seed, nullptr);
                vae_.emplace(vae_type::bind(b, vae_config_));
                b.finish();
            }
            component_config_ = detail::read_json_file(root / "vae" / "config.json");
        } else {
            vae_.emplace(vae_type::load(ctx, modules::weight_source::open({detail::component_weights(root / "vae")}), vae_config_,
                                        modules::vae::vae_parts::encoder));
            const auto tc = modules::clip::text_config::from_json(detail::read_json_file(root / "text_encoder" / "config.json"));
            text_.emplace(modules::clip::text_model<B, T>::load(ctx, modules::weight_source::open({detail::component_weights(root / "text_encoder")}), tc));
            tokenizer_.emplace(std::filesystem::is_directory(root / "tokenizer") ? text::clip_tokenizer::from_folder(root / "tokenizer")
                                                                                  : text::clip_tokenizer::load_default());
            component_config_ = detail::read_json_file(root / "unet" / "config.json");
            const auto uc = modules::unet::unet_config::from_json(component_config_);
            if (auto src = start(root / "unet")) {
                unet_.emplace(unet_type::load(ctx, *src, uc));
            } else {
                unet_.emplace(unet_type::bind(detail::fresh_binder<B, T>(ctx, seed, nullptr), uc));
            }
            check<value_error>(uc.cross_attention_dim == text_->settings().hidden_size, detail::trainer_component, "the UNet attends to width ",
                               uc.cross_attention_dim, ", the text encoder gives ", text_->settings().hidden_size);
            const auto sched = root / "scheduler" / "scheduler_config.json";
            schedule_ = std::filesystem::exists(sched) ? schedulers::ddpm_schedule::from_json(detail::read_json_file(sched))
                                                       : schedulers::ddpm_schedule{};
        }

        std::vector<tensor_type> params;
        const auto add = [&](const std::string& key, const tensor_type& w, const tensor_type&) {
            names_.push_back(key);
            params.push_back(w);
        };
        if (vae_stage) vae_->for_each_parameter(nullptr, add);
        else unet_->for_each_parameter(nullptr, add);
        check<value_error>(!params.empty(), detail::trainer_component, "the ", cfg_.component, " has no weights to train");
        for (const auto& p : params) broadcast(ctx, *comm_, p);
        std::vector<std::size_t> arrival(params.size());
        for (std::size_t i = 0; i < arrival.size(); ++i) arrival[i] = arrival.size() - 1 - i;
        reduction_.emplace(*comm_, params, arrival, detail::bucket_options_of(cfg_));
        opt_.emplace(ctx, std::move(params), adamw_options{.lr = cfg_.lr, .weight_decay = cfg_.weight_decay});
        step_ = detail::resume_optimizer(ctx, resume_dir, stage, cfg_, *opt_);
    }

    const base_trainer_config& config() const noexcept { return cfg_; }
    std::int64_t step() const noexcept { return step_; }
    /// The trained weights in state-dict order.
    std::vector<tensor_type> parameters() const {
        std::vector<tensor_type> out;
        for (std::size_t i = 0; i < opt_->param_count(); ++i) out.push_back(opt_->param(i));
        return out;
    }
    /// Their diffusers keys.
    const std::vector<std::string>& parameter_names() const noexcept { return names_; }
    const vae_type& vae() const { return *vae_; }
    const unet_type& unet() const { return *unet_; }

    /// One optimizer step over `batch` images; returns its report.
    train_progress train_step(context_t<B>& ctx) {
        const detail::run_clock clock;
        const double lr = detail::make_schedule(cfg_).lr(step_);
        opt_->set_lr(lr);
        std::vector<std::int64_t> mine;
        for (std::int64_t j = comm_->rank(); j < cfg_.batch; j += comm_->size()) mine.push_back(j);
        std::vector<tensor_type> grads(opt_->param_count());
        double loss = 0.0;
        try {
            if (!mine.empty()) loss = cfg_.component == "vae" ? vae_step(ctx, mine, grads) : unet_step(ctx, mine, grads);
            grads = reduction_->finish(ctx, grads);
        } catch (...) {
            reduction_->abandon();
            throw;
        }
        loss = detail::sum_over_ranks(*comm_, loss);
        auto p = detail::apply_gradients(ctx, *opt_, grads, cfg_, step_ + 1, lr, loss, static_cast<double>(cfg_.batch), clock);
        ++step_;
        return p;
    }

    /// As anchor_trainer::run.
    std::int64_t run(context_t<B>& ctx, std::stop_token stop = {}, std::function<void(const train_progress&)> on_progress = {}) {
        return detail::run_steps(ctx, *this, cfg_, comm_->rank() == 0, stop, on_progress);
    }

    /// The component's state dict (diffusers' keys).
    io::safetensors_writer weights_file(context_t<B>& ctx) const {
        io::safetensors_writer w;
        for (std::size_t i = 0; i < names_.size(); ++i) w.add(ctx, names_[i], opt_->param(i));
        w.set_metadata("format", "pt");
        return w;
    }

    /// Writes <output_dir>/checkpoint-<step>/{<component>/{config.json, weights}, trainer_state.safetensors} (rank 0).
    std::filesystem::path save_checkpoint(context_t<B>& ctx) const {
        if (comm_->rank() != 0) return {};
        const auto weights = weights_file(ctx);
        const auto state = detail::trainer_state(ctx, *opt_, stage, step_, cfg_, cfg_.to_json());
        const std::string file = detail::component_weights(std::filesystem::path(cfg_.component)).string();
        return detail::write_checkpoint_folder(cfg_.output_dir, step_, {{file, &weights}, {"trainer_state.safetensors", &state}},
                                               {{cfg_.component + "/config.json", component_config_.dump(2) + "\n"}});
    }

private:
    tensor_type images_of(context_t<B>& ctx, const std::vector<std::int64_t>& mine, std::vector<std::size_t>& items) const {
        std::vector<tensor_type> imgs;
        for (const auto j : mine) {
            items.push_back(order_->at(static_cast<std::uint64_t>(step_ * cfg_.batch + j)));
            imgs.push_back(detail::load_training_image<B, T>(ctx, data_[items.back()].image, cfg_.resolution));
        }
        return ops::concat(ctx, imgs, 0);
    }

    // Noise of one sample per row, each from its own stream (so the split over ranks does not change it).
    tensor_type per_sample_normal(context_t<B>& ctx, const shape& one, const std::vector<std::int64_t>& mine, std::uint64_t purpose) const {
        std::vector<tensor_type> rows;
        for (const auto j : mine)
            rows.push_back(detail::normal_tensor<B, T>(ctx, one, detail::stream_of(cfg_.seed, step_, purpose, static_cast<std::uint64_t>(j))));
        return ops::concat(ctx, rows, 0);
    }

    // The gradients of `pg` in the order of the optimizer's parameters (the model's visiting order).
    template <class Model, class Grads>
    static void collect(const Model& model, const Grads& pg, std::vector<tensor_type>& grads) {
        std::size_t i = 0;
        model.for_each_parameter(&pg, [&](const std::string&, const tensor_type&, const tensor_type& g) { grads[i++] = g; });
    }

    double vae_step(context_t<B>& ctx, const std::vector<std::int64_t>& mine, std::vector<tensor_type>& grads) {
        std::vector<std::size_t> items;
        const auto x = images_of(ctx, mine, items);
        const auto n = static_cast<double>(mine.size()), share = n / static_cast<double>(cfg_.batch);
        typename vae_type::param_grads pg;
        auto [dist, s_enc] = vae_->encode_train(ctx, x, true);
        const auto eps = per_sample_normal(ctx, shape{1, dist.mean.dim(1), dist.mean.dim(2), dist.mean.dim(3)}, mine, purpose_vae);
        auto [z, s_z] = vae_->sample_forward(ctx, dist, eps);
        auto [recon, s_dec] = vae_->decode_train(ctx, z, true);
        auto [rec_loss, rec_saved] = mse_loss_forward(ctx, recon, x);
        const auto kl = vae_->kl(ctx, dist);  // (n,)
        const auto kl_host = kl.to_host(ctx);
        double kl_mean = 0;
        for (const auto v : kl_host) kl_mean += static_cast<double>(v) / n;
        const double value = static_cast<double>(rec_loss.to_host(ctx)[0]) + cfg_.kl_weight * kl_mean;
        // d(share * loss): the step's loss is the mean over all `batch` images.
        const auto d_recon = ops::scale(ctx, mse_loss_backward(ctx, rec_saved).prediction, share);
        const auto dz = vae_->decode_backward(ctx, s_dec, d_recon, &pg);
        const auto dd = vae_->sample_backward(ctx, s_z, dz);
        const auto dk = vae_->kl_backward(ctx, dist, tensor_type::full(ctx, {static_cast<index_t>(mine.size())},
                                                                      static_cast<T>(cfg_.kl_weight * share / n)));
        (void)vae_->encode_backward(ctx, s_enc, ops::add(ctx, dd.mean, dk.mean), ops::add(ctx, dd.logvar, dk.logvar), &pg);
        collect(*vae_, pg, grads);
        return value * share;
    }

    const tensor_type& text_states(context_t<B>& ctx, const std::string& caption) {
        auto it = text_cache_.find(caption);
        if (it != text_cache_.end()) return it->second;
        const auto len = static_cast<std::size_t>(text_->settings().max_position_embeddings);
        const auto ids = tokenizer_->encode_batch({caption}, std::min<std::size_t>(len, text::clip_tokenizer::default_context_length));
        return text_cache_.emplace(caption, text_->forward(ctx, ids, 1).last_hidden_state).first->second;
    }

    double unet_step(context_t<B>& ctx, const std::vector<std::int64_t>& mine, std::vector<tensor_type>& grads) {
        std::vector<tensor_type> latents, texts, noise_rows;
        std::vector<std::int64_t> ts;
        std::vector<float> tf;
        for (const auto j : mine) {
            const auto item = order_->at(static_cast<std::uint64_t>(step_ * cfg_.batch + j));
            const auto stream = [&](std::uint64_t purpose) { return detail::stream_of(cfg_.seed, step_, purpose, static_cast<std::uint64_t>(j)); };
            auto pit = posterior_.find(item);
            if (pit == posterior_.end()) {
                const auto d = vae_->encode(ctx, detail::load_training_image<B, T>(ctx, data_[item].image, cfg_.resolution));
                pit = posterior_.emplace(item, std::make_pair(d.mean, d.logvar)).first;
            }
            latents.push_back(ops::scale(ctx, vae_->sample(ctx, pit->second.first, pit->second.second, stream(purpose_vae)),
                                         vae_config_.scaling_factor));
            const bool drop = detail::uniform01(stream(purpose_drop), 0) < cfg_.caption_drop;
            texts.push_back(text_states(ctx, drop ? std::string() : data_[item].text));
            ts.push_back(detail::uniform_int(stream(purpose_timestep), 0, schedule_.num_train_timesteps()));
            tf.push_back(static_cast<float>(ts.back()));
            noise_rows.push_back(detail::normal_tensor<B, T>(ctx, latents.back().shape(), stream(purpose_noise)));
        }
        const auto x0 = ops::concat(ctx, latents, 0);
        const auto noise = ops::concat(ctx, noise_rows, 0);
        const auto noisy = schedule_.add_noise(ctx, x0, noise, std::span<const std::int64_t>(ts));
        const double share = static_cast<double>(mine.size()) / static_cast<double>(cfg_.batch);

        typename unet_type::param_grads pg;
        tape<B, T> tp;
        const auto x = tp.leaf(noisy);
        const auto c = tp.leaf(ops::concat(ctx, texts, 0));
        const auto eps = unet_->forward_train(ctx, tp, x, std::span<const float>(tf), c, nullptr,
                                              {.checkpoint_blocks = cfg_.activation_checkpointing}, &pg);
        auto [loss, saved] = mse_loss_forward(ctx, eps.value, noise);
        const double value = static_cast<double>(loss.to_host(ctx)[0]);
        tp.backward(ctx, eps, ops::scale(ctx, mse_loss_backward(ctx, saved).prediction, share));
        collect(*unet_, pg, grads);
        return value * share;
    }

    base_trainer_config cfg_;
    single_process_communicator own_comm_{};
    C* comm_;
    std::vector<manifest_sample> data_;
    std::optional<sample_order> order_;
    modules::vae::autoencoder_kl_config vae_config_{};
    nlohmann::json component_config_;
    std::optional<vae_type> vae_;
    std::optional<unet_type> unet_;
    std::optional<modules::clip::text_model<B, T>> text_;
    std::optional<text::clip_tokenizer> tokenizer_;
    schedulers::ddpm_schedule schedule_{};
    std::vector<std::string> names_;
    std::optional<adamw<B, T>> opt_;
    std::optional<detail::overlapped_reduction<B, T, C>> reduction_;
    std::map<std::string, tensor_type> text_cache_;
    std::map<std::size_t, std::pair<tensor_type, tensor_type>> posterior_;
    std::int64_t step_ = 0;
};

}  // namespace dynamicid::training
