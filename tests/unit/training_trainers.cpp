// The anchoring and reconfiguration trainers on the tiny random SD and
// DynamicID models: determinism, loss decrease, resume bit-identity, the
// checkpoint loading into the inference pipeline, and bad inputs.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/pipelines/dynamicid.hpp>
#include <dynamicid/training/anchor_trainer.hpp>
#include <dynamicid/training/imr_trainer.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stop_token>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace training = dynamicid::training;
using dynamicid::cpu_backend;
using tensor_f = dynamicid::tensor<cpu_backend, float>;

const fs::path data = fs::path(DYNAMICID_TEST_DATA_DIR);
const fs::path tiny_sd = data / "tiny_sd" / "diffusers";
const fs::path tiny_id = data / "tiny_dynamicid";

/// A fresh folder under the system temp dir, removed on destruction.
struct temp_dir {
    fs::path path;
    explicit temp_dir(const std::string& name) {
        path = fs::temp_directory_path() / ("dynamicid_trainers_" + name + "_" + std::to_string(::getpid()));
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~temp_dir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

/// A 32 x 32 binary PPM: a disc of the person's colour on a gradient background, shifted by `variant`.
void write_picture(const fs::path& file, int person, int variant) {
    std::ofstream out(file, std::ios::binary);
    out << "P6\n32 32\n255\n";
    const int cx = 12 + 3 * variant, cy = 16 - 2 * variant;
    for (int y = 0; y < 32; ++y)
        for (int x = 0; x < 32; ++x) {
            const bool disc = (x - cx) * (x - cx) + (y - cy) * (y - cy) < 64;
            const unsigned char px[3] = {static_cast<unsigned char>(disc ? 60 + 150 * (person % 2) : 8 * x),
                                         static_cast<unsigned char>(disc ? 200 - 70 * person : 8 * y),
                                         static_cast<unsigned char>(disc ? 40 + 90 * variant : 128)};
            out.write(reinterpret_cast<const char*>(px), 3);
        }
}

std::string arcface_json(int person) {
    std::ostringstream s;
    s << "[";
    double norm = 0;
    std::vector<double> v(8);
    for (int k = 0; k < 8; ++k) norm += (v[k] = std::sin(1.3 * k + 2.1 * person) + 0.1 * person);
    (void)norm;
    for (int k = 0; k < 8; ++k) s << (k ? ", " : "") << v[k];
    s << "]";
    return s.str();
}

std::vector<float> alice_landmarks() {
    std::ifstream in(tiny_id / "alice_106.txt");
    std::vector<float> v;
    float x = 0;
    while (in >> x) v.push_back(x);
    return v;
}

/// Two persons x three pictures, with captions, landmarks (alice's, shifted) and face prompts.
fs::path write_dataset(const fs::path& dir) {
    const auto lmk = alice_landmarks();
    REQUIRE(lmk.size() == 212u);
    std::ofstream m(dir / "train.jsonl");
    const char* prompts[] = {"the expression is happy, the face is front view", "the expression is neutral, the face is side view",
                             "the expression is surprised, the face is front view"};
    for (int p = 0; p < 2; ++p)
        for (int v = 0; v < 3; ++v) {
            const std::string name = "p" + std::to_string(p) + "_" + std::to_string(v);
            write_picture(dir / (name + ".ppm"), p, v);
            std::ostringstream l;
            l << "[";
            for (std::size_t k = 0; k < lmk.size(); ++k) l << (k ? "," : "") << lmk[k] + (k % 2 ? 9.0f * v : -7.0f * v + 5.0f * p);
            l << "]";
            m << R"({"person": "p)" << p << R"(", "image": ")" << name << R"(.ppm", "text": "a photo of person )" << p
              << R"(", "arcface": )" << arcface_json(p) << R"(, "landmarks": )" << l.str() << R"(, "face_prompt": ")" << prompts[v]
              << "\"}\n";
        }
    return dir / "train.jsonl";
}

training::anchor_trainer_config anchor_config(const fs::path& manifest, const fs::path& out, std::int64_t steps) {
    training::anchor_trainer_config c;
    c.sd_model = tiny_sd;
    c.image_encoder = tiny_id / "image_encoder";
    c.manifest = manifest;
    c.output_dir = out;
    c.steps = steps;
    c.batch = 2;
    c.lr = 3e-3;
    c.lr_schedule = "linear";
    c.warmup = 1;
    c.seed = 1234;
    c.resolution = 32;
    c.lora_rank = 4;
    c.projection_depth = 1;
    c.id_drop = c.text_drop = c.both_drop = 0.1;  // a few drops in a short run
    return c;
}

training::imr_trainer_config imr_config(const fs::path& manifest, const fs::path& out, std::int64_t steps) {
    training::imr_trainer_config c;
    c.sd_model = tiny_sd;
    c.image_encoder = tiny_id / "image_encoder";
    c.manifest = manifest;
    c.output_dir = out;
    c.steps = steps;
    c.lr = 3e-3;
    c.seed = 99;
    c.resolution = 32;
    c.targets = 2;
    c.saa_checkpoint = tiny_id / "SAA.safetensors";
    c.imr_init = tiny_id / "IMR.safetensors";
    c.keypoint_encoder_init = tiny_id / "key_point_encoder.safetensors";
    return c;
}

std::vector<std::vector<float>> host(cpu_backend::context& ctx, const std::vector<tensor_f>& ts) {
    std::vector<std::vector<float>> out;
    for (const auto& t : ts) out.push_back(t.to_host(ctx));
    return out;
}

template <class Trainer>
std::vector<double> losses_of(cpu_backend::context& ctx, Trainer& t) {
    std::vector<double> out;
    t.run(ctx, {}, [&](const training::train_progress& p) { out.push_back(p.loss); });
    return out;
}

double mean(const std::vector<double>& v, std::size_t from, std::size_t to) {
    double s = 0;
    for (std::size_t i = from; i < to; ++i) s += v[i];
    return s / static_cast<double>(to - from);
}

}  // namespace

TEST_CASE("trainers: the anchoring stage is deterministic and its loss falls", "[training][trainer]") {
    cpu_backend::context ctx{.threads = 1};  // one thread: OpenMP barriers on a shared machine cost more than they give
    temp_dir dir("anchor");
    const auto manifest = write_dataset(dir.path);
    const std::int64_t steps = 30;
    auto ca = anchor_config(manifest, dir.path / "a", steps), cb = anchor_config(manifest, dir.path / "b", steps);
    ca.lr = cb.lr = 1e-2;
    training::anchor_trainer<cpu_backend> a(ctx, ca);
    training::anchor_trainer<cpu_backend> b(ctx, cb);
    const auto la = losses_of(ctx, a);
    const auto lb = losses_of(ctx, b);
    REQUIRE(la.size() == static_cast<std::size_t>(steps));
    CHECK(la == lb);  // exact
    CHECK(host(ctx, a.parameters()) == host(ctx, b.parameters()));
    const double first = mean(la, 0, 5), last = mean(la, steps - 5, steps);
    INFO("anchor loss: first 5 steps " << first << ", last 5 " << last);
    CHECK(last < 0.92 * first);
    // The CSV log has a header and one line per step.
    std::ifstream csv(dir.path / "a" / "train_log.csv");
    std::string line;
    std::getline(csv, line);
    CHECK(line == "step,loss,lr,grad_norm,samples_per_s,seconds");
    int lines = 0;
    while (std::getline(csv, line)) ++lines;
    CHECK(lines == steps);
}

TEST_CASE("trainers: an anchoring run resumed from a checkpoint is bit-identical", "[training][trainer]") {
    cpu_backend::context ctx{.threads = 1};  // one thread: OpenMP barriers on a shared machine cost more than they give
    temp_dir dir("anchor_resume");
    const auto manifest = write_dataset(dir.path);
    training::anchor_trainer<cpu_backend> full(ctx, anchor_config(manifest, dir.path / "full", 4));
    full.run(ctx);

    auto cfg = anchor_config(manifest, dir.path / "split", 4);
    {
        training::anchor_trainer<cpu_backend> first(ctx, cfg);
        std::stop_source stop;
        first.run(ctx, stop.get_token(), [&](const training::train_progress& p) {
            if (p.step == 2) stop.request_stop();
        });
        CHECK(first.step() == 2);
    }
    REQUIRE(fs::exists(dir.path / "split" / "checkpoint-000002" / "SAA.safetensors"));
    cfg.resume = "latest";
    training::anchor_trainer<cpu_backend> second(ctx, cfg);
    CHECK(second.step() == 2);
    CHECK(second.run(ctx) == 2);
    CHECK(host(ctx, second.parameters()) == host(ctx, full.parameters()));

    // A checkpoint of another seed does not resume this run.
    auto other = cfg;
    other.seed = 5;
    CHECK_THROWS_AS(training::anchor_trainer<cpu_backend>(ctx, other), dynamicid::value_error);
}

TEST_CASE("trainers: the anchoring checkpoint loads into the inference pipeline", "[training][trainer]") {
    cpu_backend::context ctx{.threads = 1};  // one thread: OpenMP barriers on a shared machine cost more than they give
    temp_dir dir("anchor_pipe");
    const auto manifest = write_dataset(dir.path);
    training::anchor_trainer<cpu_backend> t(ctx, anchor_config(manifest, dir.path / "out", 2));
    t.run(ctx);
    const auto ckpt = dir.path / "out" / "checkpoint-000002";
    REQUIRE(fs::exists(ckpt / "SAA.safetensors"));
    REQUIRE(fs::exists(ckpt / "trainer_state.safetensors"));
    CHECK_FALSE(fs::exists(dir.path / "out" / "checkpoint-000002.tmp"));
    namespace pl = dynamicid::pipelines;
    const auto pipe = pl::dynamicid_pipeline<cpu_backend>::load(
        ctx, {.sd_model = tiny_sd, .saa_checkpoint = ckpt / "SAA.safetensors", .image_encoder = tiny_id / "image_encoder"});
    // The pipeline's projection holds the trained weights.
    std::vector<tensor_f> loaded;
    training::detail::visit_projection(pipe.models().projection.weights(), [&](const std::string&, const tensor_f& w) { loaded.push_back(w); });
    std::vector<tensor_f> trained;
    training::detail::visit_projection(t.projection().weights(), [&](const std::string&, const tensor_f& w) { trained.push_back(w); });
    CHECK(host(ctx, loaded) == host(ctx, trained));
    pl::dynamicid_identity who;
    who.arcface = std::vector<float>(8, 0.25f);
    who.reference = dynamicid::modules::clip::load_image(dir.path / "p0_0.ppm");
    pl::dynamicid_options o{.prompt = "a photo", .steps = 2, .seed = 3, .width = 32, .height = 32};
    const auto r = pipe.generate(ctx, o, {who});
    CHECK(r.rgb.size() == 32u * 32u * 3u);
}

TEST_CASE("trainers: the reconfiguration stage is deterministic and its loss falls", "[training][trainer]") {
    cpu_backend::context ctx{.threads = 1};  // one thread: OpenMP barriers on a shared machine cost more than they give
    temp_dir dir("imr");
    const auto manifest = write_dataset(dir.path);
    const std::int64_t steps = 12;
    training::imr_trainer<cpu_backend> a(ctx, imr_config(manifest, dir.path / "a", steps));
    training::imr_trainer<cpu_backend> b(ctx, imr_config(manifest, dir.path / "b", steps));
    const auto la = losses_of(ctx, a);
    const auto lb = losses_of(ctx, b);
    REQUIRE(la.size() == static_cast<std::size_t>(steps));
    CHECK(la == lb);
    CHECK(host(ctx, a.parameters()) == host(ctx, b.parameters()));
    const double first = mean(la, 0, 4), last = mean(la, steps - 4, steps);
    INFO("imr loss: first 4 steps " << first << ", last 4 " << last);
    CHECK(last < 0.7 * first);
}

TEST_CASE("trainers: a reconfiguration run resumed is bit-identical and loads into the pipeline", "[training][trainer]") {
    cpu_backend::context ctx{.threads = 1};  // one thread: OpenMP barriers on a shared machine cost more than they give
    temp_dir dir("imr_resume");
    const auto manifest = write_dataset(dir.path);
    training::imr_trainer<cpu_backend> full(ctx, imr_config(manifest, dir.path / "full", 4));
    full.run(ctx);
    auto cfg = imr_config(manifest, dir.path / "split", 4);
    {
        training::imr_trainer<cpu_backend> first(ctx, cfg);
        std::stop_source stop;
        first.run(ctx, stop.get_token(), [&](const training::train_progress& p) {
            if (p.step == 1) stop.request_stop();
        });
    }
    cfg.resume = dir.path / "split" / "checkpoint-000001";
    training::imr_trainer<cpu_backend> second(ctx, cfg);
    CHECK(second.step() == 1);
    second.run(ctx);
    CHECK(host(ctx, second.parameters()) == host(ctx, full.parameters()));
    // The running statistics travel with the checkpoint too.
    std::vector<tensor_f> sa, sb;
    training::detail::visit_keypoint_encoder(second.keypoint_encoder().weights(), [&](const std::string&, const tensor_f& w) { sa.push_back(w); }, true);
    training::detail::visit_keypoint_encoder(full.keypoint_encoder().weights(), [&](const std::string&, const tensor_f& w) { sb.push_back(w); }, true);
    CHECK(host(ctx, sa) == host(ctx, sb));

    const auto ckpt = dir.path / "full" / "checkpoint-000004";
    namespace pl = dynamicid::pipelines;
    const auto pipe = pl::dynamicid_pipeline<cpu_backend>::load(ctx, {.sd_model = tiny_sd,
                                                                      .saa_checkpoint = tiny_id / "SAA.safetensors",
                                                                      .image_encoder = tiny_id / "image_encoder",
                                                                      .imr = ckpt / "IMR.safetensors"});
    REQUIRE(pipe.models().imr.has_value());
    std::vector<tensor_f> loaded, trained;
    training::detail::visit_imr(pipe.models().imr->weights(), [&](const std::string&, const tensor_f& w) { loaded.push_back(w); });
    training::detail::visit_imr(full.imr().weights(), [&](const std::string&, const tensor_f& w) { trained.push_back(w); });
    CHECK(host(ctx, loaded) == host(ctx, trained));
}

TEST_CASE("trainers: bad manifests and configs are clear errors", "[training][trainer]") {
    cpu_backend::context ctx{.threads = 1};  // one thread: OpenMP barriers on a shared machine cost more than they give
    temp_dir dir("bad");
    const auto manifest = write_dataset(dir.path);
    using training::anchor_trainer_config;
    CHECK_THROWS_AS(anchor_trainer_config::from_json(nlohmann::json::parse(R"({"stepz": 3})")), dynamicid::value_error);
    CHECK_THROWS_AS(anchor_trainer_config::from_json(nlohmann::json::parse(R"({"steps": "many"})")), dynamicid::value_error);
    CHECK_THROWS_AS(anchor_trainer_config::from_json(nlohmann::json::parse("[1, 2]")), dynamicid::value_error);
    const auto parsed = anchor_trainer_config::from_json(nlohmann::json::parse(R"({"steps": 7, "rank": 8, "lr": 0.5, "seed": 3})"));
    CHECK(parsed.steps == 7);
    CHECK(parsed.lora_rank == 8);

    auto c = anchor_config(manifest, dir.path / "out", 2);
    c.batch = 0;
    CHECK_THROWS_AS(training::anchor_trainer<cpu_backend>(ctx, c), dynamicid::value_error);
    c = anchor_config(manifest, dir.path / "out", 2);
    c.lr_schedule = "sometimes";
    CHECK_THROWS_AS(training::anchor_trainer<cpu_backend>(ctx, c), dynamicid::value_error);
    c = anchor_config(dir.path / "missing.jsonl", dir.path / "out", 2);
    CHECK_THROWS_AS(training::anchor_trainer<cpu_backend>(ctx, c), dynamicid::io_error);
    {
        std::ofstream bad(dir.path / "bad.jsonl");
        bad << R"({"image": "p0_0.ppm", "text": "x"})" << "\n";  // no arcface
    }
    c = anchor_config(dir.path / "bad.jsonl", dir.path / "out", 2);
    CHECK_THROWS_AS(training::anchor_trainer<cpu_backend>(ctx, c), dynamicid::io_error);
    {
        std::ofstream wide(dir.path / "wide.jsonl");
        wide << R"({"image": "p0_0.ppm", "text": "x", "arcface": [1, 2, 3]})" << "\n";  // not the projection's width
    }
    c = anchor_config(dir.path / "wide.jsonl", dir.path / "out", 2);
    c.projection_init = tiny_id / "SAA.safetensors";
    CHECK_THROWS_AS(training::anchor_trainer<cpu_backend>(ctx, c), dynamicid::value_error);
    c = anchor_config(manifest, dir.path / "out", 2);
    c.resume = dir.path / "nowhere";
    CHECK_THROWS_AS(training::anchor_trainer<cpu_backend>(ctx, c), dynamicid::io_error);

    // Reconfiguration: persons need two images and landmarks.
    {
        std::ofstream single(dir.path / "single.jsonl");
        single << R"({"person": "a", "image": "p0_0.ppm", "arcface": [1,2,3,4,5,6,7,8]})" << "\n";
    }
    auto r = imr_config(dir.path / "single.jsonl", dir.path / "out", 2);
    CHECK_THROWS_AS(training::imr_trainer<cpu_backend>(ctx, r), dynamicid::value_error);
    r = imr_config(manifest, dir.path / "out", 2);
    r.imr_init.clear();
    CHECK_THROWS_AS(training::imr_trainer<cpu_backend>(ctx, r), dynamicid::value_error);
    r = imr_config(manifest, dir.path / "out", 2);
    r.targets = 0;
    CHECK_THROWS_AS(training::imr_trainer<cpu_backend>(ctx, r), dynamicid::value_error);
}
