// dynamicid training (internal): what the anchoring and reconfiguration
// trainers share: named parameter walks in the released state-dict keys,
// Philox streams per (seed, step, purpose), image loading, the CSV log and
// checkpoint folders written atomically.
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/philox.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/clip/image_file.hpp>
#include <dynamicid/modules/clip/image_processor.hpp>
#include <dynamicid/modules/clip/vision_model.hpp>
#include <dynamicid/modules/dynamicid/imr.hpp>
#include <dynamicid/modules/dynamicid/keypoint_encoder.hpp>
#include <dynamicid/modules/identity/proj_plus.hpp>
#include <dynamicid/ops.hpp>
#include <dynamicid/training/communicator.hpp>
#include <dynamicid/training/lr_schedule.hpp>
#include <dynamicid/training/optim.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <stop_token>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// What a trainer reports after every optimizer step.
struct train_progress {
    std::int64_t step = 0;   ///< steps done (1 after the first)
    std::int64_t total = 0;  ///< steps of the run
    double loss = 0.0;       ///< mean loss of the step's samples
    double lr = 0.0;
    double grad_norm = 0.0;  ///< before clipping
    double samples_per_second = 0.0;
    double seconds = 0.0;    ///< since run() started
};

/// Settings both stages share (JSON keys in brackets).
struct trainer_common_config {
    std::filesystem::path sd_model{};        ///< ["sd_model"] diffusers folder or single file
    std::filesystem::path image_encoder{};   ///< ["image_encoder"] CLIP vision folder (config.json + model.safetensors)
    std::filesystem::path manifest{};        ///< ["manifest"] JSON-lines manifest (training/dataset.hpp)
    std::filesystem::path output_dir{};      ///< ["output_dir"] checkpoints and train_log.csv
    std::int64_t steps = 1000;               ///< ["steps"] optimizer steps of the whole run
    std::int64_t batch = 1;                  ///< ["batch"] samples (anchor) per step
    double lr = 1e-4;                        ///< ["lr"]
    std::string lr_schedule = "constant";    ///< ["lr_schedule"] constant | constant_with_warmup | linear | cosine
    std::int64_t warmup = 0;                 ///< ["warmup"]
    double weight_decay = 1e-2;              ///< ["weight_decay"]
    double clip = 1.0;                       ///< ["clip"] max global gradient norm; 0: no clipping
    std::uint64_t seed = 0;                  ///< ["seed"]
    std::int64_t checkpoint_every = 0;       ///< ["checkpoint_every"] 0: only at the end
    std::filesystem::path resume{};          ///< ["resume"] a checkpoint folder, or "latest" (in output_dir)
    int threads = 0;                         ///< ["threads"] 0: the backend's default (used by the CLI)
    bool activation_checkpointing = false;   ///< ["activation_checkpointing"] recompute UNet blocks in backward
    double bucket_mb = 25.0;                 ///< ["bucket_mb"] gradient bucket size of the overlapped all-reduce (MiB)
};

namespace detail {

inline constexpr const char* trainer_component = "trainer";

inline std::uint64_t splitmix(std::uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/// A Philox stream that depends only on (seed, step, purpose, item): a resumed
/// run draws what the uninterrupted one drew.
inline std::uint64_t stream_of(std::uint64_t seed, std::int64_t step, std::uint64_t purpose, std::uint64_t item = 0) {
    return splitmix(splitmix(splitmix(seed ^ 0x5eedull) ^ static_cast<std::uint64_t>(step)) ^ (purpose * 0x100000001b3ull)) ^
           splitmix(item + 0x1234567ull);
}
inline double uniform01(std::uint64_t stream, std::uint64_t index) {
    return static_cast<double>(philox::bits(stream, index)) / 4294967296.0;  // [0, 1)
}
inline std::int64_t uniform_int(std::uint64_t stream, std::uint64_t index, std::int64_t n) {
    const std::uint64_t r = (static_cast<std::uint64_t>(philox::bits(stream, 2 * index)) << 32) | philox::bits(stream, 2 * index + 1);
    return static_cast<std::int64_t>(r % static_cast<std::uint64_t>(n));
}
template <class B, class T>
tensor<B, T> normal_tensor(context_t<B>& ctx, const shape& s, std::uint64_t stream) {
    std::vector<T> v(static_cast<std::size_t>(s.numel()));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<T>(philox::normal(stream, i));
    return tensor<B, T>::from_host(ctx, s, v);
}
template <class B, class T>
tensor<B, T> clone(context_t<B>& ctx, const tensor<B, T>& t) {
    auto out = tensor<B, T>::empty(ctx, t.shape());
    if (t.numel() > 0) B::copy(ctx, const_pointer_t<B, T>(t.data()), out.data(), static_cast<std::size_t>(t.numel()));
    return out;
}

/// An image file resized (shortest edge, bicubic) and centre-cropped to
/// size x size, as (1, 3, size, size) in [-1, 1] (diffusers' training transforms).
/// `original` (when given) receives the file's height and width, which
/// place the crop (face_loss_map).
template <class B, class T>
tensor<B, T> load_training_image(context_t<B>& ctx, const std::filesystem::path& path, index_t size,
                                 std::pair<index_t, index_t>* original = nullptr) {
    const auto img = modules::clip::load_image(path);
    if (original) *original = {img.height, img.width};
    const double s = static_cast<double>(size) / static_cast<double>(std::min(img.height, img.width));
    const index_t h = std::max<index_t>(size, static_cast<index_t>(std::lround(img.height * s)));
    const index_t w = std::max<index_t>(size, static_cast<index_t>(std::lround(img.width * s)));
    const auto r = (h == img.height && w == img.width) ? img : modules::clip::resize(img, h, w);
    const index_t top = (h - size) / 2, left = (w - size) / 2;
    std::vector<T> v(static_cast<std::size_t>(3 * size * size));
    for (index_t c = 0; c < 3; ++c)
        for (index_t y = 0; y < size; ++y)
            for (index_t x = 0; x < size; ++x)
                v[static_cast<std::size_t>((c * size + y) * size + x)] =
                    static_cast<T>(r.pixels[static_cast<std::size_t>(((top + y) * w + left + x) * 3 + c)] / 127.5 - 1.0);
    return tensor<B, T>::from_host(ctx, {1, 3, size, size}, v);
}

// ---- named parameter walks (the released state-dict keys) ----------------------

/// Every defined tensor of a ProjPlusModel params (or its gradients) with its key.
template <class P, class F>
void visit_projection(P& p, F&& f) {
    const auto opt = [&](const std::string& k, auto& t) {
        if (t.defined()) f(k, t);
    };
    const auto lin = [&](const std::string& k, auto& l) {
        f(k + ".weight", l.weight);
        opt(k + ".bias", l.bias);
    };
    lin("proj.0", p.proj_0);
    lin("proj.2", p.proj_2);
    lin("norm", p.norm);
    lin("perceiver_resampler.proj_in", p.proj_in);
    lin("perceiver_resampler.proj_out", p.proj_out);
    lin("perceiver_resampler.norm_out", p.norm_out);
    for (std::size_t i = 0; i < p.layers.size(); ++i) {
        const std::string l = "perceiver_resampler.layers." + std::to_string(i) + ".";
        auto& a = p.layers[i].attention;
        auto& ff = p.layers[i].feed_forward;
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

/// Every defined tensor of an IMR params (or its gradients) with its key.
template <class P, class F>
void visit_imr(P& p, F&& f) {
    const auto lin = [&](const std::string& k, auto& l) {
        if (l.weight.defined()) f(k + ".weight", l.weight);
        if (l.bias.defined()) f(k + ".bias", l.bias);
    };
    lin("feature_fusion.0", p.fusion_norm0);
    lin("feature_fusion.1", p.fusion_linear1);
    lin("feature_fusion.3", p.fusion_norm3);
    lin("feature_fusion.4", p.fusion_linear4);
    lin("norm_in", p.norm_in);
    lin("proj_in", p.proj_in);
    lin("norm_out", p.norm_out);
    lin("proj_out", p.proj_out);
    const auto net = [&](const std::string& name, auto& layers) {
        for (std::size_t i = 0; i < layers.size(); ++i) {
            const std::string l = name + "." + std::to_string(i) + ".";
            auto& x = layers[i];
            lin(l + "0.norm1", x.cross.norm1);
            lin(l + "0.norm2", x.cross.norm2);
            lin(l + "0.to_q", x.cross.to_q);
            lin(l + "0.to_kv", x.cross.to_kv);
            lin(l + "0.to_out", x.cross.to_out);
            lin(l + "1.norm1", x.self.norm1);
            lin(l + "1.to_q", x.self.to_q);
            lin(l + "1.to_kv", x.self.to_kv);
            lin(l + "1.to_out", x.self.to_out);
            lin(l + "2.0", x.ff.norm0);
            lin(l + "2.1", x.ff.up);
            lin(l + "2.3", x.ff.down);
        }
    };
    net("disentangleNet", p.disentangle);
    net("entangleNet", p.entangle);
}

/// The KeyPointEncoder's trainable tensors (conv weight/bias, BatchNorm
/// weight/bias) and, with `buffers`, its running statistics.
template <class P, class F>
void visit_keypoint_encoder(P& p, F&& f, bool buffers) {
    for (std::size_t i = 0; i < p.blocks.size(); ++i)
        for (std::size_t j = 0; j < p.blocks[i].size(); ++j) {
            auto& u = p.blocks[i][j];
            const std::string k = "blocks." + std::to_string(i) + "." + std::to_string(j) + ".conv_block.";
            f(k + "0.weight", u.conv_weight);
            f(k + "0.bias", u.conv_bias);
            f(k + "1.weight", u.bn_weight);
            f(k + "1.bias", u.bn_bias);
            if (buffers) {
                f(k + "1.running_mean", u.running_mean);
                f(k + "1.running_var", u.running_var);
            }
        }
}

/// Sums gradients into `acc` (an undefined entry is a zero).
template <class B, class T>
void accumulate_into(context_t<B>& ctx, std::vector<tensor<B, T>>& acc, const std::vector<tensor<B, T>>& g) {
    check<shape_error>(acc.size() == g.size(), trainer_component, "gradient count ", g.size(), " != ", acc.size());
    for (std::size_t i = 0; i < g.size(); ++i) {
        if (!g[i].defined()) continue;
        if (!acc[i].defined()) acc[i] = clone(ctx, g[i]);
        else ops::accumulate(ctx, acc[i], g[i]);
    }
}

/// The frozen CLIP vision tower of a folder (config.json + model.safetensors),
/// its image processor, and its features of the all-zero normalised image.
template <class B, class T>
struct clip_tower {
    std::optional<modules::clip::vision_model<B, T>> model;
    modules::clip::image_processor processor;
    tensor<B, T> unconditional;

    static clip_tower load(context_t<B>& ctx, const std::filesystem::path& folder) {
        check<value_error>(!folder.empty(), trainer_component, "config: \"image_encoder\" is required");
        std::ifstream in(folder / "config.json");
        check<io_error>(static_cast<bool>(in), trainer_component, "cannot read ", (folder / "config.json").string());
        const auto cfg = modules::clip::vision_config::from_json(nlohmann::json::parse(in));
        clip_tower t;
        t.model.emplace(modules::clip::vision_model<B, T>::load(ctx, modules::weight_source::open({folder / "model.safetensors"}), cfg));
        if (std::ifstream pre(folder / "preprocessor_config.json"); pre) {
            t.processor = modules::clip::image_processor(modules::clip::image_processor_config::from_json(nlohmann::json::parse(pre)));
        } else {
            modules::clip::image_processor_config pc;
            pc.shortest_edge = pc.crop_height = pc.crop_width = cfg.image_size;
            t.processor = modules::clip::image_processor(pc);
        }
        const index_t s = cfg.image_size, c = cfg.num_channels;
        t.unconditional = t.model->penultimate_hidden_state(ctx, tensor<B, T>::zeros(ctx, {1, c, s, s}));
        return t;
    }
    /// Penultimate hidden state (1, tokens, width) of an image file.
    tensor<B, T> features(context_t<B>& ctx, const std::filesystem::path& image) const {
        return model->penultimate_hidden_state(ctx, processor.template preprocess<B, T>(ctx, modules::clip::load_image(image)));
    }
    index_t width() const { return model->settings().hidden_size; }
};

// ---- runs: schedule, log, checkpoint folders -----------------------------------

inline bucket_options bucket_options_of(const trainer_common_config& c) {
    return {.bucket_bytes = std::max<std::size_t>(1, static_cast<std::size_t>(c.bucket_mb * 1048576.0))};
}

inline lr_schedule make_schedule(const trainer_common_config& c) {
    return lr_schedule{.kind = lr_schedule_kind_from_name(c.lr_schedule), .base_lr = c.lr, .warmup_steps = c.warmup, .total_steps = c.steps};
}

inline void validate_common(const trainer_common_config& c) {
    const auto need = [](bool ok, const char* what) { check<value_error>(ok, trainer_component, what); };
    need(!c.sd_model.empty(), "config: \"sd_model\" is required");
    need(!c.manifest.empty(), "config: \"manifest\" is required");
    need(!c.output_dir.empty(), "config: \"output_dir\" is required");
    need(c.steps >= 1, "config: \"steps\" must be >= 1");
    need(c.batch >= 1, "config: \"batch\" must be >= 1");
    need(std::isfinite(c.lr) && c.lr >= 0, "config: \"lr\" must be finite and >= 0");
    need(c.warmup >= 0, "config: \"warmup\" must be >= 0");
    need(std::isfinite(c.weight_decay) && c.weight_decay >= 0, "config: \"weight_decay\" must be finite and >= 0");
    need(std::isfinite(c.clip) && c.clip >= 0, "config: \"clip\" must be finite and >= 0");
    need(c.checkpoint_every >= 0, "config: \"checkpoint_every\" must be >= 0");
    need(c.threads >= 0, "config: \"threads\" must be >= 0");
    need(std::isfinite(c.bucket_mb) && c.bucket_mb > 0 && c.bucket_mb < 1e6, "config: \"bucket_mb\" must be > 0");
    (void)lr_schedule_kind_from_name(c.lr_schedule);
}

/// Reads the shared keys; unknown keys are errors (a typo must not train silently).
inline void read_common(const nlohmann::json& j, trainer_common_config& c, const std::vector<std::string>& stage_keys) {
    check<value_error>(j.is_object(), trainer_component, "config: the top level is not a JSON object");
    static const std::vector<std::string> common{"stage", "sd_model", "image_encoder", "manifest", "output_dir", "steps", "batch", "lr",
                                                 "lr_schedule", "warmup", "weight_decay", "clip", "seed", "checkpoint_every", "resume",
                                                 "threads", "activation_checkpointing", "bucket_mb"};
    for (const auto& [k, v] : j.items()) {
        const bool known = std::find(common.begin(), common.end(), k) != common.end() ||
                           std::find(stage_keys.begin(), stage_keys.end(), k) != stage_keys.end();
        check<value_error>(known, trainer_component, "config: unknown key \"", k, "\"");
    }
    try {
        const auto path = [&](const char* k, std::filesystem::path& out) {
            if (j.contains(k)) out = j.at(k).get<std::string>();
        };
        path("sd_model", c.sd_model);
        path("image_encoder", c.image_encoder);
        path("manifest", c.manifest);
        path("output_dir", c.output_dir);
        path("resume", c.resume);
        if (j.contains("steps")) c.steps = j.at("steps").get<std::int64_t>();
        if (j.contains("batch")) c.batch = j.at("batch").get<std::int64_t>();
        if (j.contains("lr")) c.lr = j.at("lr").get<double>();
        if (j.contains("lr_schedule")) c.lr_schedule = j.at("lr_schedule").get<std::string>();
        if (j.contains("warmup")) c.warmup = j.at("warmup").get<std::int64_t>();
        if (j.contains("weight_decay")) c.weight_decay = j.at("weight_decay").get<double>();
        if (j.contains("clip")) c.clip = j.at("clip").get<double>();
        if (j.contains("seed")) c.seed = j.at("seed").get<std::uint64_t>();
        if (j.contains("checkpoint_every")) c.checkpoint_every = j.at("checkpoint_every").get<std::int64_t>();
        if (j.contains("threads")) c.threads = j.at("threads").get<int>();
        if (j.contains("activation_checkpointing")) c.activation_checkpointing = j.at("activation_checkpointing").get<bool>();
        if (j.contains("bucket_mb")) c.bucket_mb = j.at("bucket_mb").get<double>();
    } catch (const nlohmann::json::exception& e) {
        throw value_error(trainer_component, std::string("config: ") + e.what());
    }
}

inline nlohmann::json common_to_json(const trainer_common_config& c) {
    return {{"sd_model", c.sd_model.string()}, {"image_encoder", c.image_encoder.string()}, {"manifest", c.manifest.string()},
            {"output_dir", c.output_dir.string()}, {"steps", c.steps}, {"batch", c.batch}, {"lr", c.lr}, {"lr_schedule", c.lr_schedule},
            {"warmup", c.warmup}, {"weight_decay", c.weight_decay}, {"clip", c.clip}, {"seed", c.seed},
            {"checkpoint_every", c.checkpoint_every}, {"threads", c.threads}, {"activation_checkpointing", c.activation_checkpointing},
            {"bucket_mb", c.bucket_mb}};
}

/// "checkpoint-<step>" folders: the newest one in `dir` (none: empty path).
inline std::filesystem::path latest_checkpoint(const std::filesystem::path& dir) {
    std::filesystem::path best;
    std::int64_t best_step = -1;
    std::error_code ec;
    if (!std::filesystem::is_directory(dir, ec)) return best;
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
        const auto name = e.path().filename().string();
        if (name.rfind("checkpoint-", 0) != 0 || !e.is_directory()) continue;
        const auto digits = name.substr(11);
        if (digits.empty() || !std::all_of(digits.begin(), digits.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) continue;
        const auto step = std::stoll(digits);
        if (step > best_step) best_step = step, best = e.path();
    }
    return best;
}

inline std::filesystem::path resolve_resume(const trainer_common_config& c) {
    if (c.resume.empty()) return {};
    if (c.resume == "latest") return latest_checkpoint(c.output_dir);  // none yet: a fresh start
    check<io_error>(std::filesystem::is_directory(c.resume), trainer_component, "resume: '", c.resume.string(), "' is not a checkpoint folder");
    return c.resume;
}

/// Writes a checkpoint folder: every file into "<name>.tmp", then one rename,
/// so a reader sees either the whole checkpoint or none.
/// `texts`: further (relative name, contents) files, e.g. a component's config.json.
inline std::filesystem::path write_checkpoint_folder(const std::filesystem::path& out_dir, std::int64_t step,
                                                     const std::vector<std::pair<std::string, const io::safetensors_writer*>>& files,
                                                     const std::vector<std::pair<std::string, std::string>>& texts = {}) {
    namespace fs = std::filesystem;
    fs::create_directories(out_dir);
    char name[32];
    std::snprintf(name, sizeof name, "checkpoint-%06lld", static_cast<long long>(step));
    const fs::path final_dir = out_dir / name;
    const fs::path tmp = out_dir / (std::string(name) + ".tmp");
    std::error_code ec;
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp);
    for (const auto& [file, w] : files) {
        fs::create_directories((tmp / file).parent_path());
        w->write(tmp / file);
    }
    for (const auto& [file, text] : texts) {
        fs::create_directories((tmp / file).parent_path());
        std::ofstream out(tmp / file, std::ios::binary);
        out << text;
        check<io_error>(static_cast<bool>(out.flush()), trainer_component, "cannot write '", (tmp / file).string(), "'");
    }
    fs::remove_all(final_dir, ec);
    fs::rename(tmp, final_dir, ec);
    check<io_error>(!ec, trainer_component, "cannot rename '", tmp.string(), "' to '", final_dir.string(), "': ", ec.message());
    return final_dir;
}

/// Appends one line per step to <output_dir>/train_log.csv.
class csv_log {
public:
    explicit csv_log(const std::filesystem::path& path) {
        std::filesystem::create_directories(path.parent_path());
        const bool fresh = !std::filesystem::exists(path) || std::filesystem::file_size(path) == 0;
        out_.open(path, std::ios::app);
        check<io_error>(static_cast<bool>(out_), trainer_component, "cannot write '", path.string(), "'");
        if (fresh) out_ << "step,loss,lr,grad_norm,samples_per_s,seconds\n";
    }
    void write(const train_progress& p) {
        char line[256];
        std::snprintf(line, sizeof line, "%lld,%.9g,%.9g,%.9g,%.6g,%.6g\n", static_cast<long long>(p.step), p.loss, p.lr, p.grad_norm,
                      p.samples_per_second, p.seconds);
        out_ << line;
        out_.flush();
    }

private:
    std::ofstream out_;
};

/// Optimizer state into a writer under "optimizer.", and back.
template <class B, class T>
void add_optimizer_state(context_t<B>& ctx, io::safetensors_writer& w, const adamw<B, T>& opt) {
    for (const auto& [name, t] : opt.state_dict(ctx)) w.add(ctx, "optimizer." + name, t);
}
template <class B, class T>
void load_optimizer_state(context_t<B>& ctx, const io::safetensors_file& f, adamw<B, T>& opt) {
    typename adamw<B, T>::state_map state;
    for (const auto& n : f.names())
        if (n.rfind("optimizer.", 0) == 0) state.emplace(n.substr(10), f.template load<B, accum_t<T>>(ctx, n));
    opt.load_state_dict(ctx, state);
}

/// The step and seed a checkpoint's trainer_state.safetensors was written at;
/// io_error when they do not fit this run.
inline std::int64_t check_resume_metadata(const io::safetensors_file& f, const std::string& stage, const trainer_common_config& c) {
    const auto& m = f.metadata();
    const auto get = [&](const char* k) {
        const auto it = m.find(k);
        check<io_error>(it != m.end(), trainer_component, f.source(), ": no \"", k, "\" in the metadata (not a trainer checkpoint?)");
        return it->second;
    };
    check<io_error>(get("stage") == stage, trainer_component, f.source(), ": a '", get("stage"), "' checkpoint, this is the '", stage,
                    "' stage");
    check<value_error>(get("seed") == std::to_string(c.seed) && get("batch") == std::to_string(c.batch), trainer_component, f.source(),
                       ": written with seed ", get("seed"), " and batch ", get("batch"), "; this run has seed ", c.seed, " and batch ", c.batch,
                       " (a resumed run must draw the same samples)");
    std::int64_t step = 0;
    try {
        step = std::stoll(get("step"));
    } catch (const std::exception&) {
        throw io_error(trainer_component, f.source() + ": bad step in the metadata");
    }
    check<io_error>(step >= 0, trainer_component, f.source(), ": negative step");
    return step;
}

/// Timing for samples/s.
struct run_clock {
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); }
};

/// The trainer_state.safetensors of a checkpoint: the AdamW state and, in the
/// metadata, what a resume checks and restores.
template <class B, class T>
io::safetensors_writer trainer_state(context_t<B>& ctx, const adamw<B, T>& opt, const std::string& stage, std::int64_t step,
                                     const trainer_common_config& c, const nlohmann::json& config) {
    io::safetensors_writer state;
    add_optimizer_state(ctx, state, opt);
    state.set_metadata("stage", stage);
    state.set_metadata("step", std::to_string(step));
    state.set_metadata("seed", std::to_string(c.seed));
    state.set_metadata("batch", std::to_string(c.batch));
    state.set_metadata("data_position", std::to_string(step * c.batch));
    state.set_metadata("rng", "philox, streams keyed by (seed, step, purpose, sample); nothing else to restore");
    state.set_metadata("config", config.dump());
    return state;
}

/// Restores the AdamW state of the checkpoint folder `resume_dir` (none when
/// empty) and returns its step (0 for a fresh run).
template <class B, class T>
std::int64_t resume_optimizer(context_t<B>& ctx, const std::filesystem::path& resume_dir, const std::string& stage,
                              const trainer_common_config& c, adamw<B, T>& opt) {
    if (resume_dir.empty()) return 0;
    const auto state = io::safetensors_file::open(resume_dir / "trainer_state.safetensors");
    const auto step = check_resume_metadata(state, stage, c);
    load_optimizer_state(ctx, state, opt);
    return step;
}

/// The sum of every rank's `value`.
template <class C>
double sum_over_ranks(C& comm, double value) {
    if (comm.size() == 1) return value;
    std::vector<double> v{value};
    comm.allreduce_sum(std::span<double>(v));
    return v[0];
}

/// Clips `grads` to cfg.clip, refuses a non-finite norm, takes the AdamW step
/// and reports step `done` (counted after it): `loss` as given, `samples` per step.
template <class B, class T>
train_progress apply_gradients(context_t<B>& ctx, adamw<B, T>& opt, std::vector<tensor<B, T>>& grads, const trainer_common_config& cfg,
                               std::int64_t done, double lr, double loss, double samples, const run_clock& clock) {
    const double norm = clip_grad_norm(ctx, grads, cfg.clip > 0 ? cfg.clip : 1e30);
    check<value_error>(std::isfinite(norm), trainer_component, "step ", done - 1, ": the gradient norm is ", norm);
    opt.step(ctx, grads);
    train_progress p;
    p.step = done;
    p.total = cfg.steps;
    p.loss = loss;
    p.lr = lr;
    p.grad_norm = norm;
    p.seconds = clock.seconds();
    p.samples_per_second = p.seconds > 0 ? samples / p.seconds : 0.0;
    return p;
}

/// The given communicator, or the trainer's own single-process one when none is given.
template <class C>
C* pick_communicator(C* given, single_process_communicator& own) {
    if constexpr (std::is_same_v<C, single_process_communicator>) {
        return given ? given : &own;
    } else {
        (void)own;
        check<value_error>(given != nullptr, trainer_component, "a data-parallel trainer needs its communicator");
        return given;
    }
}

/// The step's gradients summed over ranks while the backward still runs: a
/// gradient_bucketer packed in the order the backward produces gradients
/// (`arrival`: optimizer indices, first produced first), so each bucket's
/// all-reduce starts as soon as its gradients are final. ready() takes a final
/// gradient by optimizer index; finish() hands in what never became ready
/// (zeros for what got no gradient), waits, and returns every gradient in
/// optimizer order. Every rank must construct it with the same order.
template <class B, class T, class C>
class overlapped_reduction {
public:
    overlapped_reduction(C& comm, const std::vector<tensor<B, T>>& params, const std::vector<std::size_t>& arrival, bucket_options options)
        : shapes_(params.size()), bucket_index_(params.size(), params.size()), grads_(params.size()), delivered_(params.size(), false),
          buckets_(comm, numels(params, arrival), with_sum(options)) {
        for (std::size_t i = 0; i < params.size(); ++i) shapes_[i] = params[i].shape();
        check<value_error>(arrival.size() == params.size(), trainer_component, "reduction order lists ", arrival.size(), " of ",
                           params.size(), " parameters");
        // The bucketer packs its highest index first: the first to arrive gets the highest.
        for (std::size_t k = 0; k < arrival.size(); ++k) {
            check<value_error>(arrival[k] < params.size() && bucket_index_[arrival[k]] == params.size(), trainer_component,
                               "reduction order is not a permutation");
            bucket_index_[arrival[k]] = params.size() - 1 - k;
        }
    }

    /// Gradient of optimizer parameter `i` is final on this rank; its storage receives the sum.
    void ready(context_t<B>& ctx, std::size_t i, const tensor<B, T>& grad) {
        check<value_error>(i < grads_.size() && !delivered_[i], trainer_component, "gradient ", i, " handed in twice");
        delivered_[i] = true;
        grads_[i] = grad;
        buckets_.grad_ready(ctx, bucket_index_[i], grads_[i]);
    }
    bool delivered(std::size_t i) const { return delivered_.at(i); }

    /// Hands in the rest (`rest[i]`, or zeros when undefined), waits for every
    /// bucket and returns the summed gradients; ready for the next step.
    std::vector<tensor<B, T>> finish(context_t<B>& ctx, const std::vector<tensor<B, T>>& rest) {
        check<value_error>(rest.size() == grads_.size(), trainer_component, "finish: ", rest.size(), " gradients for ", grads_.size(),
                           " parameters");
        for (std::size_t i = 0; i < grads_.size(); ++i)
            if (!delivered_[i]) ready(ctx, i, rest[i].defined() ? rest[i] : tensor<B, T>::zeros(ctx, shapes_[i]));
        buckets_.finish(ctx);
        auto out = std::move(grads_);
        grads_.assign(out.size(), {});
        std::fill(delivered_.begin(), delivered_.end(), false);
        return out;
    }
    /// Drops the step (after an error), waiting for started reductions.
    void abandon() noexcept {
        buckets_.abandon();
        grads_.assign(grads_.size(), {});
        std::fill(delivered_.begin(), delivered_.end(), false);
    }
    std::size_t bucket_count() const noexcept { return buckets_.bucket_count(); }

private:
    static std::vector<index_t> numels(const std::vector<tensor<B, T>>& params, const std::vector<std::size_t>& arrival) {
        std::vector<index_t> n(params.size(), 0);
        for (std::size_t k = 0; k < arrival.size() && k < params.size(); ++k)
            if (arrival[k] < params.size()) n[params.size() - 1 - k] = params[arrival[k]].numel();
        return n;
    }
    static bucket_options with_sum(bucket_options o) {
        o.average = false;
        return o;
    }
    std::vector<shape> shapes_;
    std::vector<std::size_t> bucket_index_;
    std::vector<tensor<B, T>> grads_;
    std::vector<bool> delivered_;
    gradient_bucketer<B, T, C> buckets_;
};

/// The loop both trainers' run() share: train_step() until cfg.steps or a stop
/// request, a CSV row and a progress report per step (the row only where
/// `writes_log`: rank 0), a checkpoint every checkpoint_every steps and at the
/// end (also when stopped, or when nothing was left to do on a fresh run).
/// Returns the steps done by this call.
template <class Trainer, class Ctx>
std::int64_t run_steps(Ctx& ctx, Trainer& trainer, const trainer_common_config& cfg, bool writes_log, std::stop_token stop,
                       const std::function<void(const train_progress&)>& on_progress) {
    const run_clock clock;
    std::optional<csv_log> log;
    if (writes_log) log.emplace(cfg.output_dir / "train_log.csv");
    std::int64_t done = 0;
    while (trainer.step() < cfg.steps && !stop.stop_requested()) {
        auto p = trainer.train_step(ctx);
        ++done;
        p.seconds = clock.seconds();
        if (log) log->write(p);
        if (on_progress) on_progress(p);
        if (cfg.checkpoint_every > 0 && trainer.step() % cfg.checkpoint_every == 0 && trainer.step() < cfg.steps) trainer.save_checkpoint(ctx);
    }
    if (done > 0 || trainer.step() == 0) trainer.save_checkpoint(ctx);
    return done;
}

}  // namespace detail
}  // namespace dynamicid::training
