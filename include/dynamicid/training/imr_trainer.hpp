// dynamicid training: the reconfiguration stage (IMR + KeyPointEncoder).
//
// Per person and step: a source image and T targets of the same person.
//   tok_i   = frozen projection(ArcFace_i, CLIP_i)            cached per image
//   lmk     = KeyPointEncoder([raster(src) ; raster(tgt_1..T)])  BatchNorm in training mode
//   txt     = pooled frozen text encoder of each face prompt    cached per image
//   pred    = IMR(tok_src, lmk_src, lmk_tgt, txt_src, txt_tgt)   (T, n, d)
//   x_t     = add_noise(VAE latents of the targets, eps, t)      one t per target
//   eps_p   = UNet(x_t, t, [text ; pred])   eps_t = UNet(x_t, t, [text ; tok_tgt])
//   loss    = MSE(pred, tok_tgt) + lambda * MSE(eps_p, eps_t)
// with the fixed text "portrait, cinematic photo, film, professional, 4k,
// highly detailed". The UNet and its SA/SAA processors are frozen; the LDC
// gradient flows through them into `pred`, then the IMR, then the
// KeyPointEncoder. eps_t gets no gradient (as in the released script).
//
// `batch` persons per step are run one at a time with accumulated gradients
// (each scaled by 1 / batch); with N ranks each rank runs persons j = rank,
// rank + N, ... Randomness: Philox streams keyed by (seed, step, purpose, j).
//
// The IMR and the KeyPointEncoder start from weight files, or with "random"
// from torch's default initialisation (modules::torch_default_init, seeded by
// `seed`) at the sizes of "imr" and "keypoint_encoder_widths"; the IMR's token
// and face-prompt widths follow the projection and the text encoder.
//
//     dynamicid::training::imr_trainer_config cfg = ...;   // saa_checkpoint, imr_init, keypoint_encoder_init, targets, ...
//     dynamicid::training::imr_trainer<dynamicid::cpu_backend> trainer(ctx, cfg);
//     trainer.run(ctx);   // out/checkpoint-<step>/{IMR,key_point_encoder}.safetensors load into the pipeline
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/io/checkpoint.hpp>
#include <dynamicid/io/dynamicid_checkpoint.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/io/torch_checkpoint.hpp>
#include <dynamicid/modules/dynamicid/imr.hpp>
#include <dynamicid/modules/dynamicid/keypoint_encoder.hpp>
#include <dynamicid/modules/dynamicid/landmark_raster.hpp>
#include <dynamicid/pipelines/detail/dynamicid_processors.hpp>
#include <dynamicid/pipelines/text_to_image.hpp>
#include <dynamicid/schedulers/ddpm.hpp>
#include <dynamicid/training/communicator.hpp>
#include <dynamicid/training/dataset.hpp>
#include <dynamicid/training/detail/trainer_common.hpp>
#include <dynamicid/training/losses.hpp>
#include <dynamicid/training/optim.hpp>
#include <dynamicid/training/saa_processors.hpp>
#include <dynamicid/training/tape.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// The text of the consistency term, as released.
inline constexpr const char* reconfiguration_text = "portrait, cinematic photo, film, professional, 4k, highly detailed";

/// The reconfiguration stage's settings.
///
///     auto cfg = imr_trainer_config::from_json(nlohmann::json::parse(text));
struct imr_trainer_config : trainer_common_config {
    std::filesystem::path saa_checkpoint{};         ///< ["saa_checkpoint"] the anchoring stage's result (frozen)
    std::filesystem::path imr_init{};               ///< ["imr_init"] IMR weights to start from (.safetensors or .bin)
    std::filesystem::path keypoint_encoder_init{};  ///< ["keypoint_encoder_init"] KeyPointEncoder weights to start from
    /// ["imr"] {"dim", "dim_head", "heads", "num_queries", "ff_mult", "depth"} of a "random" IMR (released sizes by default)
    modules::imr::imr_config imr{.disentangle_depth = 1, .entangle_depth = 1};
    /// ["keypoint_encoder_widths"] channels of each block of a "random" KeyPointEncoder (the released
    /// layout; every unit of block i has width i, the last block goes from the previous width to the last)
    std::vector<index_t> keypoint_encoder_widths{16, 32, 64, 128, 256, 512, 768};
    index_t targets = 32;                           ///< ["targets"] T target images per person
    index_t resolution = 512;                       ///< ["resolution"]
    double lambda = 1.0;                            ///< ["lambda"] weight of LDC
    double landmark_frame = 512.0;                  ///< ["landmark_frame"] side of the frame the landmarks are given on
    bool gate = true;                               ///< ["gate"] SAA gating in the UNet

    static imr_trainer_config from_json(const nlohmann::json& j) {
        imr_trainer_config c;
        detail::read_common(j, c, {"saa_checkpoint", "imr_init", "keypoint_encoder_init", "targets", "resolution", "lambda", "landmark_frame",
                                   "gate", "imr", "keypoint_encoder_widths"});
        try {
            if (j.contains("saa_checkpoint")) c.saa_checkpoint = j.at("saa_checkpoint").get<std::string>();
            if (j.contains("imr_init")) c.imr_init = j.at("imr_init").get<std::string>();
            if (j.contains("keypoint_encoder_init")) c.keypoint_encoder_init = j.at("keypoint_encoder_init").get<std::string>();
            if (j.contains("targets")) c.targets = j.at("targets").get<index_t>();
            if (j.contains("resolution")) c.resolution = j.at("resolution").get<index_t>();
            if (j.contains("lambda")) c.lambda = j.at("lambda").get<double>();
            if (j.contains("landmark_frame")) c.landmark_frame = j.at("landmark_frame").get<double>();
            if (j.contains("gate")) c.gate = j.at("gate").get<bool>();
            if (j.contains("imr")) {
                const auto& m = j.at("imr");
                check<value_error>(m.is_object(), detail::trainer_component, "config: \"imr\" must be an object");
                for (const auto& [k, v] : m.items())
                    check<value_error>(k == "dim" || k == "dim_head" || k == "heads" || k == "num_queries" || k == "ff_mult" || k == "depth",
                                       detail::trainer_component, "config: unknown key \"imr.", k, "\"");
                if (m.contains("dim")) c.imr.dim = m.at("dim").get<index_t>();
                if (m.contains("dim_head")) c.imr.dim_head = m.at("dim_head").get<index_t>();
                if (m.contains("heads")) c.imr.heads = m.at("heads").get<index_t>();
                if (m.contains("num_queries")) c.imr.num_queries = m.at("num_queries").get<index_t>();
                if (m.contains("ff_mult")) c.imr.ff_mult = m.at("ff_mult").get<index_t>();
                if (m.contains("depth")) c.imr.disentangle_depth = c.imr.entangle_depth = m.at("depth").get<index_t>();
            }
            if (j.contains("keypoint_encoder_widths")) c.keypoint_encoder_widths = j.at("keypoint_encoder_widths").get<std::vector<index_t>>();
        } catch (const nlohmann::json::exception& e) {
            throw value_error(detail::trainer_component, std::string("config: ") + e.what());
        }
        return c;
    }
    nlohmann::json to_json() const {
        auto j = detail::common_to_json(*this);
        j["stage"] = "imr";
        j["saa_checkpoint"] = saa_checkpoint.string();
        j["imr_init"] = imr_init.string();
        j["keypoint_encoder_init"] = keypoint_encoder_init.string();
        j["targets"] = targets;
        j["resolution"] = resolution;
        j["lambda"] = lambda;
        j["landmark_frame"] = landmark_frame;
        j["gate"] = gate;
        j["imr"] = {{"dim", imr.dim}, {"dim_head", imr.dim_head}, {"heads", imr.heads}, {"num_queries", imr.num_queries},
                    {"ff_mult", imr.ff_mult}, {"depth", imr.disentangle_depth.value_or(1)}};
        j["keypoint_encoder_widths"] = keypoint_encoder_widths;
        return j;
    }
    void validate() const {
        detail::validate_common(*this);
        const auto need = [](bool ok, const char* what) { check<value_error>(ok, detail::trainer_component, what); };
        need(!saa_checkpoint.empty(), "config: \"saa_checkpoint\" is required");
        need(!imr_init.empty() && !keypoint_encoder_init.empty(),
             "config: \"imr_init\" and \"keypoint_encoder_init\" are required (weight files, or \"random\")");
        if (imr_init == "random")
            need(imr.dim > 0 && imr.dim_head > 0 && imr.heads > 0 && imr.num_queries > 0 && imr.ff_mult > 0 && imr.disentangle_depth.value_or(0) >= 1 &&
                     imr.entangle_depth.value_or(0) >= 1,
                 "config: every size of \"imr\" must be >= 1");
        if (keypoint_encoder_init == "random") {
            need(keypoint_encoder_widths.size() == modules::imr::released_keypoint_layout().size(),
                 "config: \"keypoint_encoder_widths\" needs one width per block of the released layout (7)");
            for (const auto w : keypoint_encoder_widths) need(w >= 1, "config: every keypoint encoder width must be >= 1");
        }
        need(targets >= 1, "config: \"targets\" must be >= 1");
        need(resolution >= 8 && resolution % 8 == 0, "config: \"resolution\" must be a positive multiple of 8");
        need(std::isfinite(lambda) && lambda >= 0, "config: \"lambda\" must be finite and >= 0");
        need(std::isfinite(landmark_frame) && landmark_frame > 0, "config: \"landmark_frame\" must be > 0");
    }
};

/// The reconfiguration-stage trainer (see the file comment).
template <class B, class T = float, communicator C = single_process_communicator>
    requires computes_in<B, T>
class imr_trainer {
public:
    using tensor_type = tensor<B, T>;
    using imr_type = modules::imr::imr_model<B, T>;
    using kpe_type = modules::imr::keypoint_encoder<B, T>;
    static constexpr const char* stage = "imr";
    static constexpr std::uint64_t purpose_pick = 11, purpose_timestep = 12, purpose_noise = 13, purpose_vae = 14;

    imr_trainer(context_t<B>& ctx, imr_trainer_config cfg, C* comm = nullptr)
        : cfg_(std::move(cfg)), comm_(detail::pick_communicator(comm, own_comm_)) {
        board_ = std::make_unique<parameter_gradients<B, T>>();
        cfg_.validate();
        data_ = read_manifest(cfg_.manifest, {.arcface_width = 0});
        for (auto& g : group_by_person(data_))
            if (g.size() >= 2) persons_.push_back(std::move(g));
        check<value_error>(!persons_.empty(), detail::trainer_component, "manifest '", cfg_.manifest.string(),
                           "': no person has two images (a source and a target)");
        for (const auto& g : persons_)
            for (auto i : g)
                check<value_error>(data_[i].landmarks.size() == 212, detail::trainer_component, "manifest sample ", i, " (",
                                   data_[i].image.string(), ") has no 106 landmarks");
        order_.emplace(persons_.size(), cfg_.seed);

        const auto ckpt = io::sd_checkpoint::open(cfg_.sd_model);
        sd_.emplace(pipelines::sd_components<B, T>::load(ctx, ckpt, modules::vae::vae_parts::both));
        schedule_ = schedulers::ddpm_schedule::from_json(ckpt.scheduler_config);
        clip_ = detail::clip_tower<B, T>::load(ctx, cfg_.image_encoder);
        const auto& unet = sd_->unet;
        const auto saa = io::identity_checkpoint::open(cfg_.saa_checkpoint);
        projection_.emplace(saa.load_projection<B, T>(ctx, saa.projection_config()));
        std::vector<saa_layer_weights<B, T>> layers;
        for (auto& a : pipelines::detail::bind_adapters<B, T>(ctx, saa.processors, unet.settings(), unet.attention_layer_names(),
                                                               saa.processor_indices))
            layers.push_back({a.cross, a.to_q_lora, a.to_k_lora, a.to_v_lora, a.to_out_lora, a.to_k_ip, a.to_v_ip});
        procs_ = std::make_unique<saa_processors<B, T>>(std::move(layers),
                                                        saa_processors_config{.tokens_per_id = projection_->settings().num_tokens}, *board_);
        modules::saa::saa_controls controls;
        controls.id_num = 1;
        controls.activate_query = cfg_.gate;
        controls.infer_end = 0;
        hooks_ = procs_->hooks(controls);

        const auto resume_dir = detail::resolve_resume(cfg_);
        const auto open = [](const std::filesystem::path& p) {
            return p.extension() == ".safetensors" ? modules::weight_source::open({p}) : io::open_torch_weights(p);
        };
        if (resume_dir.empty() && cfg_.imr_init == "random") {
            auto ic = cfg_.imr;
            ic.embedding_dim = projection_->settings().cross_attention_dim;
            ic.txt_dim = sd_->text_encoder.settings().hidden_size;
            modules::weight_binder<B, T> fresh(ctx, {}, "", modules::torch_default_init(detail::splitmix(cfg_.seed ^ 0x1a2bull)));
            auto p = imr_type::bind(fresh, ic);
            fresh.finish();
            imr_.emplace(ic, std::move(p));
        } else {
            const auto imr_src = open(resume_dir.empty() ? cfg_.imr_init : resume_dir / "IMR.safetensors");
            imr_.emplace(imr_type::load(ctx, imr_src, modules::imr::imr_config::from_weights(imr_src)));
        }
        if (resume_dir.empty() && cfg_.keypoint_encoder_init == "random") {
            kpe_.emplace(kpe_type::load(ctx, random_keypoint_encoder(cfg_.keypoint_encoder_widths, detail::splitmix(cfg_.seed ^ 0x3c4dull)), {}));
        } else {
            kpe_.emplace(kpe_type::load(ctx, open(resume_dir.empty() ? cfg_.keypoint_encoder_init : resume_dir / "key_point_encoder.safetensors"), {}));
        }
        kpe_->train();
        check<value_error>(kpe_->embedding_dim() == imr_->settings().embedding_dim, detail::trainer_component, "the KeyPointEncoder gives ",
                           kpe_->embedding_dim(), " features, the IMR takes ", imr_->settings().embedding_dim);
        check<value_error>(imr_->settings().embedding_dim == projection_->settings().cross_attention_dim, detail::trainer_component,
                           "the IMR's token width ", imr_->settings().embedding_dim, " differs from the projection's ",
                           projection_->settings().cross_attention_dim);
        check<value_error>(imr_->settings().txt_dim == sd_->text_encoder.settings().hidden_size, detail::trainer_component,
                           "the IMR's face-prompt width ", imr_->settings().txt_dim, " differs from the text encoder's ",
                           sd_->text_encoder.settings().hidden_size);

        std::vector<tensor_type> params;
        detail::visit_imr(imr_->weights(), [&](const std::string&, const tensor_type& t) { params.push_back(t); });
        imr_count_ = params.size();
        detail::visit_keypoint_encoder(kpe_->weights(), [&](const std::string&, const tensor_type& t) { params.push_back(t); }, false);
        for (const auto& p : params) broadcast(ctx, *comm_, p);
        std::vector<std::size_t> arrival(params.size());
        for (std::size_t i = 0; i < arrival.size(); ++i) arrival[i] = i;  // the IMR's, then the KeyPointEncoder's
        reduction_.emplace(*comm_, params, arrival, detail::bucket_options_of(cfg_));
        opt_.emplace(ctx, std::move(params), adamw_options{.lr = cfg_.lr, .weight_decay = cfg_.weight_decay});
        text_states_ = encode(ctx, reconfiguration_text).last_hidden_state;
        step_ = detail::resume_optimizer(ctx, resume_dir, stage, cfg_, *opt_);
    }

    const imr_trainer_config& config() const noexcept { return cfg_; }
    std::int64_t step() const noexcept { return step_; }
    /// Every trainable tensor: the IMR's, then the KeyPointEncoder's.
    std::vector<tensor_type> parameters() const {
        std::vector<tensor_type> out;
        for (std::size_t i = 0; i < opt_->param_count(); ++i) out.push_back(opt_->param(i));
        return out;
    }
    const imr_type& imr() const { return *imr_; }
    const kpe_type& keypoint_encoder() const { return *kpe_; }

    /// One optimizer step over `batch` persons.
    train_progress train_step(context_t<B>& ctx) {
        const detail::run_clock clock;
        const double lr = detail::make_schedule(cfg_).lr(step_);
        opt_->set_lr(lr);
        std::vector<tensor_type> grads(opt_->param_count());
        double loss = 0.0;
        std::int64_t last = -1;
        for (std::int64_t j = comm_->rank(); j < cfg_.batch; j += comm_->size()) last = j;
        try {
            for (std::int64_t j = comm_->rank(); j < cfg_.batch; j += comm_->size())
                loss += person_step(ctx, static_cast<std::uint64_t>(step_ * cfg_.batch + j), static_cast<std::uint64_t>(j), grads, j == last);
            grads = reduction_->finish(ctx, grads);
        } catch (...) {
            reduction_->abandon();
            throw;
        }
        loss = detail::sum_over_ranks(*comm_, loss);
        const auto n = static_cast<double>(cfg_.batch);
        auto p = detail::apply_gradients(ctx, *opt_, grads, cfg_, step_ + 1, lr, loss / n, n * static_cast<double>(1 + cfg_.targets), clock);
        ++step_;
        return p;
    }

    /// As anchor_trainer::run.
    std::int64_t run(context_t<B>& ctx, std::stop_token stop = {}, std::function<void(const train_progress&)> on_progress = {}) {
        return detail::run_steps(ctx, *this, cfg_, comm_->rank() == 0, stop, on_progress);
    }

    /// The IMR state dict (the released IMR keys).
    io::safetensors_writer imr_file(context_t<B>& ctx) const {
        io::safetensors_writer w;
        detail::visit_imr(imr_->weights(), [&](const std::string& k, const tensor_type& t) { w.add(ctx, k, t); });
        w.set_metadata("format", "pt");
        return w;
    }
    /// The KeyPointEncoder state dict with its current running statistics.
    io::safetensors_writer keypoint_encoder_file(context_t<B>& ctx) const {
        io::safetensors_writer w;
        detail::visit_keypoint_encoder(kpe_->weights(), [&](const std::string& k, const tensor_type& t) { w.add(ctx, k, t); }, true);
        w.set_metadata("format", "pt");
        return w;
    }

    /// Writes <output_dir>/checkpoint-<step>/{IMR,key_point_encoder,trainer_state}.safetensors (rank 0).
    std::filesystem::path save_checkpoint(context_t<B>& ctx) const {
        if (comm_->rank() != 0) return {};
        const auto imr = imr_file(ctx);
        const auto kpe = keypoint_encoder_file(ctx);
        const auto state = detail::trainer_state(ctx, *opt_, stage, step_, cfg_, cfg_.to_json());
        return detail::write_checkpoint_folder(
            cfg_.output_dir, step_,
            {{"IMR.safetensors", &imr}, {"key_point_encoder.safetensors", &kpe}, {"trainer_state.safetensors", &state}});
    }

private:
    // A KeyPointEncoder state dict of the released layout at `widths`, torch's default initialisation.
    static modules::weight_source random_keypoint_encoder(const std::vector<index_t>& widths, std::uint64_t seed) {
        const auto layout = modules::imr::released_keypoint_layout();
        const auto init = modules::torch_default_init(seed);
        io::safetensors_writer w;
        index_t in = 1;
        for (std::size_t i = 0; i < layout.size(); ++i)
            for (std::size_t j = 0; j < layout[i].size(); ++j) {
                const bool last = i + 1 == layout.size();
                const index_t out = !last ? widths[i] : (j + 1 == layout[i].size() ? widths[i] : widths[i - 1]);
                const std::string k = "blocks." + std::to_string(i) + "." + std::to_string(j) + ".conv_block.";
                const index_t kernel = layout[i][j].kernel;
                const auto add = [&](const std::string& key, const shape& dims) { w.add(key, dims, init(key, dims)); };
                add(k + "0.weight", shape{out, in, kernel, kernel});
                add(k + "0.bias", shape{out});
                add(k + "1.weight", shape{out});
                add(k + "1.bias", shape{out});
                add(k + "1.running_mean", shape{out});
                add(k + "1.running_var", shape{out});
                in = out;
            }
        const auto bytes = w.to_bytes();
        return modules::weight_source({std::make_shared<const io::safetensors_file>(io::safetensors_file::from_memory(bytes))});
    }

    typename modules::clip::text_model<B, T>::output encode(context_t<B>& ctx, const std::string& text) const {
        const auto len = static_cast<std::size_t>(sd_->text_encoder.settings().max_position_embeddings);
        const auto ids = sd_->tokenizer.encode_batch({text}, std::min<std::size_t>(len, text::clip_tokenizer::default_context_length));
        return sd_->text_encoder.forward(ctx, ids, 1);
    }

    struct image_cache {
        tensor_type tokens;       // (1, n, d) frozen projection output
        tensor_type face_prompt;  // (1, txt) pooled
        tensor_type mean, logvar; // VAE posterior of the image
        tensor_type raster;       // (1, 1, 96, 96)
    };
    const image_cache& cached(context_t<B>& ctx, std::size_t i) {
        auto it = cache_.find(i);
        if (it != cache_.end()) return it->second;
        const auto& s = data_[i];
        image_cache c;
        const auto& pc = projection_->settings();
        check<shape_error>(static_cast<index_t>(s.arcface.size()) == pc.id_embeddings_dim, detail::trainer_component, "sample ", i,
                           ": ArcFace has ", s.arcface.size(), " values, the projection takes ", pc.id_embeddings_dim);
        std::vector<T> id(s.arcface.begin(), s.arcface.end());
        c.tokens = projection_->forward(ctx, tensor_type::from_host(ctx, {1, pc.id_embeddings_dim}, id), clip_.features(ctx, s.reference));
        c.face_prompt = encode(ctx, s.face_prompt).pooler_output;
        const auto dist = sd_->vae.encode(ctx, detail::load_training_image<B, T>(ctx, s.image, cfg_.resolution));
        c.mean = dist.mean;
        c.logvar = dist.logvar;
        std::vector<modules::imr::landmark_point> pts;
        for (std::size_t k = 0; k < 106; ++k) pts.push_back({s.landmarks[2 * k], s.landmarks[2 * k + 1]});
        modules::imr::landmark_raster_config rc;
        rc.source_width = rc.source_height = cfg_.landmark_frame;
        c.raster = modules::imr::landmark_raster<B, T>(ctx, {pts}, rc);
        return cache_.emplace(i, std::move(c)).first->second;
    }

    // One person's forward and backward; gradients accumulate into `acc`. Returns its loss.
    // `final`: this rank's last person of the step, whose gradients go to the all-reduce as they are made.
    double person_step(context_t<B>& ctx, std::uint64_t position, std::uint64_t j, std::vector<tensor_type>& acc, bool final) {
        const auto& group = persons_[order_->at(position)];
        const auto stream = [&](std::uint64_t purpose) { return detail::stream_of(cfg_.seed, step_, purpose, j); };
        const auto pick = stream(purpose_pick);
        const auto n = static_cast<std::int64_t>(group.size());
        const std::size_t src = group[static_cast<std::size_t>(detail::uniform_int(pick, 0, n))];
        std::vector<std::size_t> others;
        for (auto i : group)
            if (i != src) others.push_back(i);
        std::vector<std::size_t> tgt;
        const auto tn = static_cast<std::size_t>(cfg_.targets);
        if (others.size() >= tn) {  // without replacement (a partial shuffle)
            for (std::size_t k = 0; k < tn; ++k) {
                const auto r = static_cast<std::size_t>(detail::uniform_int(pick, 1 + k, static_cast<std::int64_t>(others.size() - k)));
                std::swap(others[k], others[k + r]);
                tgt.push_back(others[k]);
            }
        } else {
            for (std::size_t k = 0; k < tn; ++k)
                tgt.push_back(others[static_cast<std::size_t>(detail::uniform_int(pick, 1 + k, static_cast<std::int64_t>(others.size())))]);
        }
        const index_t targets = cfg_.targets;

        std::vector<tensor_type> rasters{cached(ctx, src).raster}, prompts{cached(ctx, src).face_prompt}, target_tokens, x0;
        std::vector<std::int64_t> ts;
        std::vector<float> tf;
        for (std::size_t k = 0; k < tn; ++k) {
            const auto& c = cached(ctx, tgt[k]);
            rasters.push_back(c.raster);
            prompts.push_back(c.face_prompt);
            target_tokens.push_back(c.tokens);
            x0.push_back(ops::scale(ctx, sd_->vae.sample(ctx, c.mean, c.logvar, stream(purpose_vae), k * 0x100000000ull),
                                    sd_->vae.settings().scaling_factor));
            ts.push_back(detail::uniform_int(stream(purpose_timestep), k, schedule_.num_train_timesteps()));
            tf.push_back(static_cast<float>(ts.back()));
        }
        const auto latents = ops::concat(ctx, x0, 0);
        const auto noise = detail::normal_tensor<B, T>(ctx, latents.shape(), stream(purpose_noise));
        const auto noisy = schedule_.add_noise(ctx, latents, noise, std::span<const std::int64_t>(ts));
        const auto tokens_tgt = ops::concat(ctx, target_tokens, 0);
        const auto text = ops::concat(ctx, std::vector<tensor_type>(tn, text_states_), 0);
        const index_t text_len = text.dim(1);

        // KeyPointEncoder (training-mode BatchNorm over source + targets), then the IMR.
        auto [feat, kpe_saved] = kpe_->forward_train(ctx, ops::concat(ctx, rasters, 0));
        const auto flat = feat.reshape({1 + targets, -1});
        const auto txt = ops::concat(ctx, prompts, 0);
        auto [pred, imr_saved] = imr_->forward_train(ctx, cached(ctx, src).tokens, ops::slice(ctx, flat, 0, 0, 1),
                                                     ops::slice(ctx, flat, 0, 1, targets), ops::slice(ctx, txt, 0, 0, 1),
                                                     ops::slice(ctx, txt, 0, 1, targets));

        // LDC: the frozen UNet with the target tokens (no gradient) and with the predicted ones.
        const auto eps_target =
            sd_->unet.forward(ctx, noisy, std::span<const float>(tf), ops::concat(ctx, std::vector<tensor_type>{text, tokens_tgt}, 1), &hooks_);
        tape<B, T> tp(board_.get());
        const auto x = tp.leaf(noisy);
        const auto c = tp.leaf(ops::concat(ctx, std::vector<tensor_type>{text, pred}, 1));
        const auto eps = sd_->unet.forward_train(ctx, tp, x, std::span<const float>(tf), c, &hooks_,
                                                 {.checkpoint_blocks = cfg_.activation_checkpointing});
        auto [losses, loss_saved] = reconfiguration_loss_forward(ctx, pred, tokens_tgt, eps.value, eps_target, cfg_.lambda);
        const double value = static_cast<double>(losses.total.to_host(ctx)[0]);
        const double scale = 1.0 / static_cast<double>(cfg_.batch);
        const auto g = reconfiguration_loss_backward(ctx, loss_saved, tensor_type::full(ctx, {1}, static_cast<T>(scale)));
        tp.backward(ctx, eps, g.noise_prediction);
        board_->zero();  // the processors are frozen: their weight gradients are dropped
        auto d_pred = g.predicted_tokens;
        if (const auto& d_states = tp.gradient(c); d_states.defined())
            d_pred = ops::add(ctx, d_pred, ops::slice(ctx, d_states, 1, text_len, pred.dim(1)));

        const auto gi = imr_->backward(ctx, imr_saved, d_pred);
        std::vector<tensor_type> flat_grads;
        detail::visit_imr(gi.weights, [&](const std::string&, const tensor_type& t) { flat_grads.push_back(t); });
        check<value_error>(flat_grads.size() == imr_count_, detail::trainer_component, "the IMR's gradients do not mirror its weights");
        flat_grads.resize(acc.size());
        detail::accumulate_into(ctx, acc, flat_grads);
        if (final)  // the IMR's gradients travel while the KeyPointEncoder's backward runs
            for (std::size_t i = 0; i < imr_count_; ++i)
                if (acc[i].defined()) reduction_->ready(ctx, i, acc[i]);
        const auto d_feat = ops::concat(ctx, std::vector<tensor_type>{gi.src_landmark, gi.tgt_landmark}, 0);
        const auto gk = kpe_->backward(ctx, kpe_saved, d_feat.reshape(feat.shape().to_vector()));
        std::vector<tensor_type> kpe_grads(imr_count_);
        detail::visit_keypoint_encoder(gk.weights, [&](const std::string&, const tensor_type& t) { kpe_grads.push_back(t); }, false);
        detail::accumulate_into(ctx, acc, kpe_grads);
        return value;
    }

    imr_trainer_config cfg_;
    single_process_communicator own_comm_{};
    C* comm_;
    std::vector<manifest_sample> data_;
    std::vector<std::vector<std::size_t>> persons_;
    std::optional<sample_order> order_;
    std::optional<pipelines::sd_components<B, T>> sd_;
    schedulers::ddpm_schedule schedule_{};
    detail::clip_tower<B, T> clip_{};
    std::optional<modules::identity::proj_plus_model<B, T>> projection_;
    std::unique_ptr<parameter_gradients<B, T>> board_;
    std::unique_ptr<saa_processors<B, T>> procs_;
    modules::unet::attention_hooks<B, T> hooks_{};
    std::optional<imr_type> imr_;
    std::optional<kpe_type> kpe_;
    std::optional<adamw<B, T>> opt_;
    std::optional<detail::overlapped_reduction<B, T, C>> reduction_;
    std::size_t imr_count_ = 0;
    tensor_type text_states_{};
    std::map<std::size_t, image_cache> cache_;
    std::int64_t step_ = 0;
};

}  // namespace dynamicid::training
