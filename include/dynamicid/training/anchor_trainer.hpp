// dynamicid training: the anchoring stage (projection + SA/SAA processors).
//
// Per sample (single-person image + caption from the manifest):
//   x0  = VAE.sample(VAE.encode(image resized / centre-cropped, in [-1, 1])) * scaling_factor
//   t   ~ U{0, ..., 999},  eps ~ N(0, I),  x_t = DDPM add_noise(x0, eps, t)
//   tok = projection(ArcFace, CLIP penultimate hidden state of the reference)
//   eps_pred = UNet(x_t, t, [text states ; tok]) with the trainable processors
//   loss = MSE(eps_pred, eps)
//        or, with face_loss_weight w > 1 and landmarks in the manifest,
//          mean(m * (eps_pred - eps)^2), m = w on the latent cells of the
//          face's box (the landmarks' bounding box grown face_box_grow times),
//          1 elsewhere (face_loss_map)
// Classifier-free-guidance dropout: 5% identity dropped (zero ArcFace and the
// CLIP features of the all-zero normalised image), 5% text dropped (""), 5%
// both. Trainable: every LoRA (down ~ N(0, 1/rank^2) as diffusers'
// LoRALinearLayer, up = 0), to_k_ip / to_v_ip (initialised from the layer's
// to_k / to_v) and the projection. AdamW, global-norm clipping, an LR schedule.
//
// A step of `batch` samples runs them one at a time and accumulates the
// gradients (each scaled by 1 / batch), so memory is that of one sample. With a
// communicator of N ranks each rank runs samples j = rank, rank + N, ... of the
// batch and the gradients are summed over the ranks.
//
// Every random draw comes from a Philox stream keyed by (seed, step, purpose,
// sample), so a resumed run reproduces the uninterrupted one bit for bit.
//
//     dynamicid::training::anchor_trainer_config cfg;
//     cfg.sd_model = "sd15"; cfg.image_encoder = "clip-h"; cfg.manifest = "train.jsonl"; cfg.output_dir = "out";
//     dynamicid::training::anchor_trainer<dynamicid::cpu_backend> trainer(ctx, cfg);
//     trainer.run(ctx, stop_source.get_token(), [](const auto& p) { std::printf("%lld %g\n", (long long)p.step, p.loss); });
//     // out/checkpoint-<step>/SAA.safetensors loads into pipelines::dynamicid_pipeline
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/io/checkpoint.hpp>
#include <dynamicid/io/dynamicid_checkpoint.hpp>
#include <dynamicid/io/safetensors.hpp>
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// The anchoring stage's settings (JSON keys as the member names unless noted).
///
///     auto cfg = anchor_trainer_config::from_json(nlohmann::json::parse(R"({"sd_model": "sd15", ...})"));
struct anchor_trainer_config : trainer_common_config {
    index_t resolution = 512;                ///< ["resolution"] training image side
    std::filesystem::path init_checkpoint{}; ///< ["init_checkpoint"] SAA file to start from (projection + processors); empty: fresh
    std::filesystem::path projection_init{}; ///< ["projection_init"] SAA-layout file whose proj_module starts the projection
    index_t lora_rank = 128;                 ///< ["rank"]
    index_t num_tokens = 4;                  ///< ["num_tokens"] identity tokens (fresh projection)
    index_t projection_depth = 4;            ///< ["projection_depth"] resampler layers (fresh projection)
    double id_drop = 0.05, text_drop = 0.05, both_drop = 0.05;  ///< ["id_drop"], ["text_drop"], ["both_drop"]
    bool gate = true;                        ///< ["gate"] SAA gating (activate_query) in the training forward
    /// ["face_loss_weight"] the denoising loss's weight on the face (1: plain MSE, the paper's loss). Above 1, the
    /// identity, which only the face shows, gets more of the loss; samples without landmarks keep plain MSE. The
    /// loss is mean(m (eps_pred - eps)^2), not divided by mean(m): its scale, and the gradients', grow with the
    /// face's share of the picture (by 1 + (w - 1) x that share). Below 1 the face counts less.
    double face_loss_weight = 1.0;
    double face_box_grow = 1.5;              ///< ["face_box_grow"] the face box: the landmarks' box grown this many times
    /// ["landmark_frame"] side of the square the manifest's landmarks are given on, which stands for the whole image file
    double landmark_frame = 512.0;

    static anchor_trainer_config from_json(const nlohmann::json& j) {
        anchor_trainer_config c;
        detail::read_common(j, c, {"resolution", "init_checkpoint", "projection_init", "rank", "num_tokens", "projection_depth", "id_drop",
                                   "text_drop", "both_drop", "gate", "face_loss_weight", "face_box_grow", "landmark_frame"});
        try {
            if (j.contains("resolution")) c.resolution = j.at("resolution").get<index_t>();
            if (j.contains("init_checkpoint")) c.init_checkpoint = j.at("init_checkpoint").get<std::string>();
            if (j.contains("projection_init")) c.projection_init = j.at("projection_init").get<std::string>();
            if (j.contains("rank")) c.lora_rank = j.at("rank").get<index_t>();
            if (j.contains("num_tokens")) c.num_tokens = j.at("num_tokens").get<index_t>();
            if (j.contains("projection_depth")) c.projection_depth = j.at("projection_depth").get<index_t>();
            if (j.contains("id_drop")) c.id_drop = j.at("id_drop").get<double>();
            if (j.contains("text_drop")) c.text_drop = j.at("text_drop").get<double>();
            if (j.contains("both_drop")) c.both_drop = j.at("both_drop").get<double>();
            if (j.contains("gate")) c.gate = j.at("gate").get<bool>();
            if (j.contains("face_loss_weight")) c.face_loss_weight = j.at("face_loss_weight").get<double>();
            if (j.contains("face_box_grow")) c.face_box_grow = j.at("face_box_grow").get<double>();
            if (j.contains("landmark_frame")) c.landmark_frame = j.at("landmark_frame").get<double>();
        } catch (const nlohmann::json::exception& e) {
            throw value_error(detail::trainer_component, std::string("config: ") + e.what());
        }
        return c;
    }
    nlohmann::json to_json() const {
        auto j = detail::common_to_json(*this);
        j["stage"] = "anchor";
        j["resolution"] = resolution;
        j["init_checkpoint"] = init_checkpoint.string();
        j["projection_init"] = projection_init.string();
        j["rank"] = lora_rank;
        j["num_tokens"] = num_tokens;
        j["projection_depth"] = projection_depth;
        j["id_drop"] = id_drop;
        j["text_drop"] = text_drop;
        j["both_drop"] = both_drop;
        j["gate"] = gate;
        j["face_loss_weight"] = face_loss_weight;
        j["face_box_grow"] = face_box_grow;
        j["landmark_frame"] = landmark_frame;
        return j;
    }
    void validate() const {
        detail::validate_common(*this);
        const auto need = [](bool ok, const char* what) { check<value_error>(ok, detail::trainer_component, what); };
        need(resolution >= 8 && resolution % 8 == 0, "config: \"resolution\" must be a positive multiple of 8");
        need(lora_rank >= 1, "config: \"rank\" must be >= 1");
        need(num_tokens >= 1 && projection_depth >= 0, "config: \"num_tokens\" must be >= 1 and \"projection_depth\" >= 0");
        need(id_drop >= 0 && text_drop >= 0 && both_drop >= 0 && id_drop + text_drop + both_drop <= 1,
             "config: the drop rates must be >= 0 and sum to at most 1");
        need(std::isfinite(face_loss_weight) && face_loss_weight > 0, "config: \"face_loss_weight\" must be finite and > 0");
        need(std::isfinite(face_box_grow) && face_box_grow > 0, "config: \"face_box_grow\" must be > 0");
        need(std::isfinite(landmark_frame) && landmark_frame > 0, "config: \"landmark_frame\" must be > 0");
    }
};

/// The loss weights of an h x w latent grid for one face: `weight` on every
/// cell whose centre lies in the box of the landmarks, grown `grow` times
/// about its centre; 1 elsewhere. The landmarks are (x, y) pairs on a
/// frame x frame square that stands for the whole image file of
/// image_height x image_width pixels (x scaled by frame / width, y by
/// frame / height), as the manifest gives them; the grid covers the
/// training picture, the file's centred square crop (load_training_image).
/// A box partly outside the crop is clipped; a box too small to hold a cell
/// centre weighs the cell under its centre; a box wholly outside the crop
/// weighs nothing extra.
///
///     auto m = face_loss_map(sample.landmarks, 512.0, 64, 64, 16, 16, 4.0, 1.5);   // 256 values, 1 or 4
inline std::vector<float> face_loss_map(std::span<const float> landmarks, double frame, index_t image_height, index_t image_width,
                                        index_t h, index_t w, double weight, double grow) {
    const auto need = [](bool ok, const auto&... what) { check<value_error>(ok, detail::trainer_component, "face_loss_map: ", what...); };
    need(h > 0 && w > 0 && image_height > 0 && image_width > 0, "grid ", h, " x ", w, " or image ", image_height, " x ", image_width,
         " is empty");
    need(std::isfinite(frame) && frame > 0, "frame ", frame, " must be finite and > 0");
    need(std::isfinite(weight) && weight >= 0, "weight ", weight, " must be finite and >= 0");
    need(std::isfinite(grow) && grow > 0, "grow ", grow, " must be finite and > 0");
    need(!landmarks.empty() && landmarks.size() % 2 == 0, landmarks.size(), " landmark values are not (x, y) pairs");
    // Landmarks to pixels of the file, then to the crop's unit square.
    const double side = static_cast<double>(std::min(image_height, image_width));
    const double top = (static_cast<double>(image_height) - side) / 2, left = (static_cast<double>(image_width) - side) / 2;
    const auto to_u = [&](float x) { return (static_cast<double>(x) / frame * static_cast<double>(image_width) - left) / side; };
    const auto to_v = [&](float y) { return (static_cast<double>(y) / frame * static_cast<double>(image_height) - top) / side; };
    double x0 = to_u(landmarks[0]), x1 = x0, y0 = to_v(landmarks[1]), y1 = y0;
    for (std::size_t i = 0; i < landmarks.size(); i += 2) {
        need(std::isfinite(landmarks[i]) && std::isfinite(landmarks[i + 1]), "landmark ", i / 2, " is not finite");
        x0 = std::min(x0, to_u(landmarks[i])), x1 = std::max(x1, to_u(landmarks[i]));
        y0 = std::min(y0, to_v(landmarks[i + 1])), y1 = std::max(y1, to_v(landmarks[i + 1]));
    }
    const double cx = (x0 + x1) / 2, cy = (y0 + y1) / 2, hx = (x1 - x0) * grow / 2, hy = (y1 - y0) * grow / 2;
    std::vector<float> m(static_cast<std::size_t>(h * w), 1.0f);
    bool any = false;
    for (index_t r = 0; r < h; ++r) {
        const double y = (static_cast<double>(r) + 0.5) / static_cast<double>(h);
        if (std::abs(y - cy) > hy) continue;
        for (index_t c = 0; c < w; ++c) {
            const double x = (static_cast<double>(c) + 0.5) / static_cast<double>(w);
            if (std::abs(x - cx) <= hx) m[static_cast<std::size_t>(r * w + c)] = static_cast<float>(weight), any = true;
        }
    }
    if (!any && cx >= 0 && cx < 1 && cy >= 0 && cy < 1) {
        const auto r = std::min<index_t>(h - 1, static_cast<index_t>(cy * static_cast<double>(h)));
        const auto c = std::min<index_t>(w - 1, static_cast<index_t>(cx * static_cast<double>(w)));
        m[static_cast<std::size_t>(r * w + c)] = static_cast<float>(weight);
    }
    return m;
}

/// The anchoring-stage trainer (see the file comment).
template <class B, class T = float, communicator C = single_process_communicator>
    requires computes_in<B, T>
class anchor_trainer {
public:
    using tensor_type = tensor<B, T>;
    using projection_type = modules::identity::proj_plus_model<B, T>;
    static constexpr const char* stage = "anchor";
    static constexpr std::uint64_t purpose_dropout = 1, purpose_timestep = 2, purpose_noise = 3, purpose_vae = 4, purpose_init = 5;

    /// Loads the models and the manifest; resumes when cfg.resume names a checkpoint.
    /// `comm` (null: one process) must outlive the trainer.
    anchor_trainer(context_t<B>& ctx, anchor_trainer_config cfg, C* comm = nullptr)
        : cfg_(std::move(cfg)), comm_(detail::pick_communicator(comm, own_comm_)) {
        board_ = std::make_unique<parameter_gradients<B, T>>();
        cfg_.validate();
        data_ = read_manifest(cfg_.manifest, {.arcface_width = 0});
        order_.emplace(data_.size(), cfg_.seed);
        const auto ckpt = io::sd_checkpoint::open(cfg_.sd_model);
        sd_.emplace(pipelines::sd_components<B, T>::load(ctx, ckpt, modules::vae::vae_parts::both));
        schedule_ = schedulers::ddpm_schedule::from_json(ckpt.scheduler_config);
        clip_ = detail::clip_tower<B, T>::load(ctx, cfg_.image_encoder);

        const auto resume_dir = detail::resolve_resume(cfg_);
        const auto& unet = sd_->unet;
        std::vector<saa_layer_weights<B, T>> layers;
        if (!resume_dir.empty() || !cfg_.init_checkpoint.empty()) {
            const auto file = resume_dir.empty() ? cfg_.init_checkpoint : resume_dir / "SAA.safetensors";
            const auto saa = io::identity_checkpoint::open(file);
            projection_.emplace(saa.load_projection<B, T>(ctx, saa.projection_config()));
            for (auto& a : pipelines::detail::bind_adapters<B, T>(ctx, saa.processors, unet.settings(), unet.attention_layer_names(),
                                                                   saa.processor_indices))
                layers.push_back({a.cross, a.to_q_lora, a.to_k_lora, a.to_v_lora, a.to_out_lora, a.to_k_ip, a.to_v_ip});
        } else {
            layers = fresh_layers(ctx, ckpt);
            if (!cfg_.projection_init.empty()) {
                const auto saa = io::identity_checkpoint::open(cfg_.projection_init);
                projection_.emplace(saa.load_projection<B, T>(ctx, saa.projection_config()));
            } else {
                projection_.emplace(fresh_projection(ctx));
            }
        }
        const auto& pc = projection_->settings();
        check<value_error>(pc.cross_attention_dim == unet.settings().cross_attention_dim, detail::trainer_component,
                           "the projection's width ", pc.cross_attention_dim, " differs from the UNet's ", unet.settings().cross_attention_dim);
        check<value_error>(pc.clip_embeddings_dim == clip_.width(), detail::trainer_component, "the projection takes CLIP width ",
                           pc.clip_embeddings_dim, ", the image encoder gives ", clip_.width());
        check<value_error>(static_cast<index_t>(data_.front().arcface.size()) == pc.id_embeddings_dim, detail::trainer_component,
                           "the manifest's ArcFace embeddings have ", data_.front().arcface.size(), " values, the projection takes ",
                           pc.id_embeddings_dim);

        procs_ = std::make_unique<saa_processors<B, T>>(std::move(layers), saa_processors_config{.tokens_per_id = pc.num_tokens}, *board_);
        modules::saa::saa_controls controls;
        controls.id_num = 1;
        controls.activate_query = cfg_.gate;
        controls.infer_end = 0;  // no layout boost: training has no denoising step index
        hooks_ = procs_->hooks(controls);

        std::vector<tensor_type> params;
        for (index_t i = 0; i < board_->size(); ++i) params.push_back(board_->value(i));
        detail::visit_projection(projection_->weights(), [&](const std::string&, const tensor_type& t) { params.push_back(t); });
        for (const auto& p : params) broadcast(ctx, *comm_, p);
        // The backward finishes the processors from the last UNet layer back, then the projection.
        std::vector<std::size_t> arrival;
        for (std::size_t i = static_cast<std::size_t>(board_->size()); i-- > 0;) arrival.push_back(i);
        for (std::size_t i = params.size(); i-- > static_cast<std::size_t>(board_->size());) arrival.push_back(i);
        reduction_.emplace(*comm_, params, arrival, detail::bucket_options_of(cfg_));
        opt_.emplace(ctx, std::move(params), adamw_options{.lr = cfg_.lr, .weight_decay = cfg_.weight_decay});
        text_states_empty_ = encode_text(ctx, "");
        step_ = detail::resume_optimizer(ctx, resume_dir, stage, cfg_, *opt_);
    }

    const anchor_trainer_config& config() const noexcept { return cfg_; }
    /// Optimizer steps done (including those of a resumed checkpoint).
    std::int64_t step() const noexcept { return step_; }
    /// Every trainable tensor, processors first (SAA_module order), then the projection.
    std::vector<tensor_type> parameters() const {
        std::vector<tensor_type> out;
        for (std::size_t i = 0; i < opt_->param_count(); ++i) out.push_back(opt_->param(i));
        return out;
    }
    const projection_type& projection() const { return *projection_; }

    /// One optimizer step over `batch` samples; returns its report.
    train_progress train_step(context_t<B>& ctx) {
        const detail::run_clock clock;
        const double lr = detail::make_schedule(cfg_).lr(step_);
        opt_->set_lr(lr);
        board_->zero();
        const auto n_board = static_cast<std::size_t>(board_->size());
        std::vector<tensor_type> proj_acc(opt_->param_count() - n_board);
        double loss = 0.0;
        // This rank's samples are j = rank, rank + size, ...; during the last one's
        // backward every final gradient goes straight to the all-reduce.
        std::int64_t last = -1;
        for (std::int64_t j = comm_->rank(); j < cfg_.batch; j += comm_->size()) last = j;
        std::vector<tensor_type> grads;
        try {
            for (std::int64_t j = comm_->rank(); j < cfg_.batch; j += comm_->size()) {
                const bool final = j == last;
                if (final) board_->on_ready = [&](index_t id, const tensor_type& g) { reduction_->ready(ctx, static_cast<std::size_t>(id), g); };
                loss += sample_step(ctx, static_cast<std::uint64_t>(step_ * cfg_.batch + j), static_cast<std::uint64_t>(j), proj_acc);
                board_->on_ready = {};
                if (final)
                    for (std::size_t i = 0; i < proj_acc.size(); ++i)
                        if (proj_acc[i].defined()) reduction_->ready(ctx, n_board + i, proj_acc[i]);
            }
            std::vector<tensor_type> rest;
            for (index_t i = 0; i < board_->size(); ++i) rest.push_back(board_->gradient(i));
            rest.insert(rest.end(), proj_acc.begin(), proj_acc.end());
            grads = reduction_->finish(ctx, rest);
        } catch (...) {
            board_->on_ready = {};
            reduction_->abandon();
            throw;
        }
        loss = detail::sum_over_ranks(*comm_, loss);
        const auto n = static_cast<double>(cfg_.batch);
        auto p = detail::apply_gradients(ctx, *opt_, grads, cfg_, step_ + 1, lr, loss / n, n, clock);
        board_->zero();
        ++step_;
        return p;
    }

    /// Trains until config().steps or a stop request; checkpoints every
    /// checkpoint_every steps and at the end (also when stopped). Appends to
    /// <output_dir>/train_log.csv. Returns the steps done by this call.
    std::int64_t run(context_t<B>& ctx, std::stop_token stop = {}, std::function<void(const train_progress&)> on_progress = {}) {
        return detail::run_steps(ctx, *this, cfg_, comm_->rank() == 0, stop, on_progress);
    }

    /// The trainable weights in the released SAA.bin layout (proj_module.*, SAA_module.<i>.*).
    io::safetensors_writer weights_file(context_t<B>& ctx) const {
        io::safetensors_writer w;
        detail::visit_projection(projection_->weights(),
                                 [&](const std::string& k, const tensor_type& t) { w.add(ctx, "proj_module." + k, t); });
        for (index_t i = 0; i < board_->size(); ++i) w.add(ctx, "SAA_module." + board_->name(i), board_->value(i));
        w.set_metadata("format", "pt");
        return w;
    }

    /// Writes <output_dir>/checkpoint-<step>/{SAA.safetensors, trainer_state.safetensors}
    /// (rank 0 only; the others return an empty path).
    std::filesystem::path save_checkpoint(context_t<B>& ctx) const {
        if (comm_->rank() != 0) return {};
        const auto weights = weights_file(ctx);
        const auto state = detail::trainer_state(ctx, *opt_, stage, step_, cfg_, cfg_.to_json());
        return detail::write_checkpoint_folder(cfg_.output_dir, step_, {{"SAA.safetensors", &weights}, {"trainer_state.safetensors", &state}});
    }

private:
    tensor_type encode_text(context_t<B>& ctx, const std::string& text) const {
        const auto len = static_cast<std::size_t>(sd_->text_encoder.settings().max_position_embeddings);
        const auto ids = sd_->tokenizer.encode_batch({text}, std::min<std::size_t>(len, text::clip_tokenizer::default_context_length));
        return sd_->text_encoder.forward(ctx, ids, 1).last_hidden_state;
    }

    // One sample's forward and backward; gradients accumulate (board, proj_acc). Returns its loss.
    double sample_step(context_t<B>& ctx, std::uint64_t position, std::uint64_t j, std::vector<tensor_type>& proj_acc) {
        const auto& s = data_[order_->at(position)];
        const auto stream = [&](std::uint64_t purpose) { return detail::stream_of(cfg_.seed, step_, purpose, j); };
        const double u = detail::uniform01(stream(purpose_dropout), 0);
        const bool drop_id = u < cfg_.id_drop || (u >= cfg_.id_drop + cfg_.text_drop && u < cfg_.id_drop + cfg_.text_drop + cfg_.both_drop);
        const bool drop_text = u >= cfg_.id_drop && u < cfg_.id_drop + cfg_.text_drop + cfg_.both_drop;
        const std::int64_t t = detail::uniform_int(stream(purpose_timestep), 0, schedule_.num_train_timesteps());

        std::pair<index_t, index_t> file_size{};
        const auto image = detail::load_training_image<B, T>(ctx, s.image, cfg_.resolution, &file_size);
        const auto dist = sd_->vae.encode(ctx, image);
        const auto x0 = ops::scale(ctx, sd_->vae.sample(ctx, dist, stream(purpose_vae)), sd_->vae.settings().scaling_factor);
        const auto noise = detail::normal_tensor<B, T>(ctx, x0.shape(), stream(purpose_noise));
        const std::vector<std::int64_t> ts{t};
        const auto noisy = schedule_.add_noise(ctx, x0, noise, std::span<const std::int64_t>(ts));

        const auto& pc = projection_->settings();
        std::vector<T> id(static_cast<std::size_t>(pc.id_embeddings_dim), T(0));
        if (!drop_id) std::transform(s.arcface.begin(), s.arcface.end(), id.begin(), [](float v) { return static_cast<T>(v); });
        const auto clip = drop_id ? clip_.unconditional : clip_.features(ctx, s.reference);
        auto [tokens, proj_saved] = projection_->forward_train(ctx, tensor_type::from_host(ctx, {1, pc.id_embeddings_dim}, id), clip);
        const auto text = drop_text ? text_states_empty_ : encode_text(ctx, s.text);
        const index_t text_len = text.dim(1);

        tape<B, T> tp(board_.get());
        const auto x = tp.leaf(noisy);
        const auto c = tp.leaf(ops::concat(ctx, std::vector<tensor_type>{text, tokens}, 1));
        const std::vector<float> tf{static_cast<float>(t)};
        const auto eps = sd_->unet.forward_train(ctx, tp, x, std::span<const float>(tf), c, &hooks_,
                                                 {.checkpoint_blocks = cfg_.activation_checkpointing});
        // mse_loss, or weighted_mse_loss with the face's map (an undefined weight is plain MSE).
        tensor_type weight;
        if (cfg_.face_loss_weight != 1.0 && !s.landmarks.empty()) {
            const index_t h = eps.value.dim(2), w = eps.value.dim(3);
            const auto map = face_loss_map(s.landmarks, cfg_.landmark_frame, file_size.first, file_size.second, h, w, cfg_.face_loss_weight,
                                           cfg_.face_box_grow);
            std::vector<T> mt(map.size());
            std::transform(map.begin(), map.end(), mt.begin(), [](float v) { return static_cast<T>(v); });
            weight = tensor_type::from_host(ctx, {1, 1, h, w}, mt);
        }
        const std::string_view loss_name = weight.defined() ? "weighted_mse_loss" : "mse_loss";
        auto [loss, diff] = detail::weighted_mean_square(ctx, loss_name, eps.value, noise, weight);
        const double value = static_cast<double>(loss.to_host(ctx)[0]);
        const auto one = tensor_type::full(ctx, {1}, element_cast<T>(1.0));
        const auto d_eps = ops::scale(ctx, detail::weighted_mean_square_backward(ctx, loss_name, diff, weight, one, {}).prediction,
                                      1.0 / static_cast<double>(cfg_.batch));
        tp.backward(ctx, eps, d_eps);
        const auto& d_states = tp.gradient(c);
        if (d_states.defined()) {
            const auto d_tokens = ops::slice(ctx, d_states, 1, text_len, pc.num_tokens);
            const auto g = projection_->backward(ctx, proj_saved, d_tokens);
            std::vector<tensor_type> flat;
            detail::visit_projection(g.weights, [&](const std::string&, const tensor_type& t) { flat.push_back(t); });
            if (flat.size() == proj_acc.size()) detail::accumulate_into(ctx, proj_acc, flat);
            else throw value_error(detail::trainer_component, "the projection's gradients do not mirror its weights");
        }
        return value;
    }

    // LoRA down ~ N(0, 1/rank^2) (diffusers' LoRALinearLayer), up = 0; to_k_ip / to_v_ip copy the layer's to_k / to_v.
    std::vector<saa_layer_weights<B, T>> fresh_layers(context_t<B>& ctx, const io::sd_checkpoint& ckpt) const {
        const auto& unet = sd_->unet;
        const auto& uc = unet.settings();
        const auto& names = unet.attention_layer_names();
        modules::weight_binder<B, T> base(ctx, ckpt.unet_weights());
        const index_t r = cfg_.lora_rank;
        std::vector<saa_layer_weights<B, T>> out;
        for (std::size_t i = 0; i < names.size(); ++i) {
            saa_layer_weights<B, T> l;
            const auto& name = names[i];
            l.cross = name.size() >= 15 && name.compare(name.size() - 15, 15, "attn2.processor") == 0;
            const index_t hidden = pipelines::detail::layer_hidden_width(name, uc);
            const index_t context = l.cross ? uc.cross_attention_dim : hidden;
            std::uint64_t k = 0;
            const auto lora = [&](index_t in, index_t outw) {
                const auto st = detail::stream_of(cfg_.seed, -1, purpose_init, i * 8 + k++);
                auto down = ops::scale(ctx, detail::normal_tensor<B, T>(ctx, {r, in}, st), 1.0 / static_cast<double>(r));
                return modules::saa::lora_layer<B, T>{down, tensor_type::zeros(ctx, {outw, r})};
            };
            l.to_q_lora = lora(hidden, hidden);
            l.to_k_lora = lora(context, hidden);
            l.to_v_lora = lora(context, hidden);
            l.to_out_lora = lora(hidden, hidden);
            if (l.cross) {
                const std::string stem = name.substr(0, name.size() - std::string_view(".processor").size());
                l.to_k_ip = detail::clone(ctx, base.tensor(stem + ".to_k.weight", {hidden, context}));
                l.to_v_ip = detail::clone(ctx, base.tensor(stem + ".to_v.weight", {hidden, context}));
            }
            out.push_back(std::move(l));
        }
        return out;
    }

    // torch's defaults: Linear U(-1/sqrt(in), 1/sqrt(in)) for weight and bias, LayerNorm (1, 0).
    projection_type fresh_projection(context_t<B>& ctx) const {
        modules::identity::proj_plus_config pc;
        pc.cross_attention_dim = sd_->unet.settings().cross_attention_dim;
        pc.id_embeddings_dim = static_cast<index_t>(data_.front().arcface.size());
        pc.clip_embeddings_dim = clip_.width();
        pc.num_tokens = cfg_.num_tokens;
        pc.depth = cfg_.projection_depth;
        pc.dim_head = 64;
        pc.heads = std::max<index_t>(1, pc.cross_attention_dim / 64);  // what io::identity_checkpoint reads back
        std::uint64_t k = 0;
        const auto uniform = [&](const shape& s, index_t fan_in) {
            const auto st = detail::stream_of(cfg_.seed, -2, purpose_init, k++);
            const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
            std::vector<T> v(static_cast<std::size_t>(s.numel()));
            for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<T>((2.0 * detail::uniform01(st, i) - 1.0) * bound);
            return tensor_type::from_host(ctx, s, v);
        };
        using P = projection_type;
        const auto linear = [&](index_t in, index_t out) { return typename P::linear_params{uniform({out, in}, in), uniform({out}, in)}; };
        const auto norm = [&](index_t n) { return typename P::norm_params{tensor_type::full(ctx, {n}, T(1)), tensor_type::zeros(ctx, {n})}; };
        const index_t d = pc.cross_attention_dim, id = pc.id_embeddings_dim, inner = pc.heads * pc.dim_head;
        typename P::params w;
        w.proj_0 = linear(id, 2 * id);
        w.proj_2 = linear(2 * id, d * pc.num_tokens);
        w.norm = norm(d);
        w.proj_in = linear(pc.clip_embeddings_dim, d);
        w.proj_out = linear(d, d);
        w.norm_out = norm(d);
        for (index_t i = 0; i < pc.depth; ++i) {
            typename P::layer_params l;
            l.attention = {norm(d), norm(d), uniform({inner, d}, d), uniform({2 * inner, d}, d), uniform({d, inner}, inner)};
            l.feed_forward = {norm(d), uniform({pc.ff_mult * d, d}, d), uniform({d, pc.ff_mult * d}, pc.ff_mult * d)};
            w.layers.push_back(std::move(l));
        }
        return projection_type(pc, std::move(w));
    }

    anchor_trainer_config cfg_;
    single_process_communicator own_comm_{};
    C* comm_;
    std::vector<manifest_sample> data_;
    std::optional<sample_order> order_;
    std::optional<pipelines::sd_components<B, T>> sd_;
    schedulers::ddpm_schedule schedule_{};
    detail::clip_tower<B, T> clip_{};
    std::optional<projection_type> projection_;
    std::unique_ptr<parameter_gradients<B, T>> board_;
    std::unique_ptr<saa_processors<B, T>> procs_;
    modules::unet::attention_hooks<B, T> hooks_{};
    std::optional<adamw<B, T>> opt_;
    std::optional<detail::overlapped_reduction<B, T, C>> reduction_;
    tensor_type text_states_empty_{};
    std::int64_t step_ = 0;
};

}  // namespace dynamicid::training
