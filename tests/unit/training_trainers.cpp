// The anchoring and reconfiguration trainers on the tiny random SD and
// DynamicID models: determinism, loss decrease, resume bit-identity, the
// checkpoint loading into the inference pipeline, and bad inputs.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/pipelines/dynamicid.hpp>
#include <dynamicid/training/anchor_trainer.hpp>
#include <dynamicid/training/imr_trainer.hpp>

#include <catch2/catch.hpp>
#include <support/trainer_fixture.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <stop_token>
#include <string>
#include <vector>

namespace {

using namespace dynamicid_test::trainers;
using dynamicid::cpu_backend;
using tensor_f = dynamicid::tensor<cpu_backend, float>;


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

TEST_CASE("trainers: the face weighting of the anchoring loss covers the landmarks' grown box", "[training][trainer]") {
    // A square face from (16, 16) to (48, 48) on a 64 x 64 frame over a 64 x 64 file, on an 8 x 8 grid
    // (cell centres at 4, 12, ..., 60).
    const std::vector<float> square{16, 16, 48, 16, 48, 48, 16, 48, 32, 32};
    const auto map = [](const std::vector<float>& l, dynamicid::index_t fh, dynamicid::index_t fw, double weight, double grow) {
        return training::face_loss_map(l, 64.0, fh, fw, 8, 8, weight, grow);
    };
    const auto weighted = [](const std::vector<float>& m) {
        std::vector<int> cells;
        for (std::size_t i = 0; i < m.size(); ++i)
            if (m[i] != 1.0f) cells.push_back(static_cast<int>(i));
        return cells;
    };
    const auto m = map(square, 64, 64, 3.0, 1.0);
    REQUIRE(m.size() == 64);
    for (int r = 0; r < 8; ++r)
        for (int c = 0; c < 8; ++c) {
            const bool inside = r >= 2 && r <= 5 && c >= 2 && c <= 5;
            CHECK(m[static_cast<std::size_t>(r * 8 + c)] == (inside ? 3.0f : 1.0f));
        }
    // Grown 1.5 times: half-width 24 about 32, so centres 12 ... 52 (cells 1 ... 6).
    const auto grown = map(square, 64, 64, 3.0, 1.5);
    CHECK(grown[1 * 8 + 1] == 3.0f);
    CHECK(grown[6 * 8 + 6] == 3.0f);
    CHECK(grown[0] == 1.0f);
    CHECK(grown[7 * 8 + 7] == 1.0f);
    // A file twice as wide as high: the frame's x spans 128 pixels, the crop keeps x 32 ... 96. The face at frame
    // x 16 ... 48 is file x 32 ... 96, the whole crop's width; y stays 16 ... 48.
    const auto wide = map(square, 64, 128, 3.0, 1.0);
    for (int r = 0; r < 8; ++r)
        for (int c = 0; c < 8; ++c) CHECK(wide[static_cast<std::size_t>(r * 8 + c)] == (r >= 2 && r <= 5 ? 3.0f : 1.0f));
    // A face at the frame's left edge of that wide file falls wholly left of the crop.
    const std::vector<float> left_edge{0, 16, 12, 48};
    CHECK(weighted(map(left_edge, 64, 128, 3.0, 1.0)).empty());
    // A face across the picture's edge is clipped: frame x 48 ... 80 over a square file keeps cells 6 and 7.
    const std::vector<float> edge{48, 16, 80, 48};
    const auto clipped = map(edge, 64, 64, 3.0, 1.0);
    CHECK(clipped[2 * 8 + 6] == 3.0f);
    CHECK(clipped[2 * 8 + 7] == 3.0f);
    CHECK(clipped[2 * 8 + 5] == 1.0f);
    // A face smaller than a cell weighs the cell under its centre.
    const std::vector<float> tiny{33, 17, 34, 18};
    CHECK(weighted(map(tiny, 64, 64, 3.0, 1.0)) == std::vector<int>{2 * 8 + 4});
    // Off the picture: no extra weight anywhere.
    const std::vector<float> away{200, 200, 220, 220};
    CHECK(weighted(map(away, 64, 64, 3.0, 1.5)).empty());
    // Bad input is a clear error.
    const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
    const auto bad = [](std::vector<float> l, double frame, dynamicid::index_t h, dynamicid::index_t w, double weight, double grow) {
        try {
            training::face_loss_map(l, frame, 64, 64, h, w, weight, grow);
        } catch (const dynamicid::value_error& e) {
            return std::string(e.what()).find("[trainer] face_loss_map: ") == 0;
        }
        return false;
    };
    CHECK(bad({}, 64.0, 8, 8, 3.0, 1.5));
    CHECK(bad({1, 2, 3}, 64.0, 8, 8, 3.0, 1.5));
    CHECK(bad({1, std::numeric_limits<float>::quiet_NaN()}, 64.0, 8, 8, 3.0, 1.5));
    CHECK(bad({1, std::numeric_limits<float>::infinity()}, 64.0, 8, 8, 3.0, 1.5));
    CHECK(bad(square, 0.0, 8, 8, 3.0, 1.5));
    CHECK(bad(square, inf, 8, 8, 3.0, 1.5));
    CHECK(bad(square, 64.0, 0, 8, 3.0, 1.5));
    CHECK(bad(square, 64.0, 8, 0, 3.0, 1.5));
    CHECK(bad(square, 64.0, 8, 8, -1.0, 1.5));
    CHECK(bad(square, 64.0, 8, 8, nan, 1.5));
    CHECK(bad(square, 64.0, 8, 8, 3.0, 0.0));
    CHECK(bad(square, 64.0, 8, 8, 3.0, nan));
    CHECK(bad(square, 64.0, 8, 8, 3.0, inf));
    CHECK_THROWS_AS(training::face_loss_map(square, 64.0, 0, 64, 8, 8, 3.0, 1.5), dynamicid::value_error);
}

TEST_CASE("trainers: a face-weighted anchoring run is deterministic and differs from plain MSE", "[training][trainer]") {
    cpu_backend::context ctx{.threads = 1};
    temp_dir dir("anchor_face");
    const auto manifest = write_dataset(dir.path);
    const std::int64_t steps = 3;
    auto plain = anchor_config(manifest, dir.path / "plain", steps), fa = anchor_config(manifest, dir.path / "a", steps),
         fb = anchor_config(manifest, dir.path / "b", steps);
    fa.face_loss_weight = fb.face_loss_weight = 4.0;
    training::anchor_trainer<cpu_backend> p(ctx, plain), a(ctx, fa), b(ctx, fb);
    const auto lp = losses_of(ctx, p), la = losses_of(ctx, a), lb = losses_of(ctx, b);
    CHECK(la == lb);
    REQUIRE(la.size() == lp.size());
    INFO("first step: face-weighted " << la[0] << ", plain " << lp[0]);
    CHECK(la[0] > lp[0]);  // same weights and draws; every face cell weighs 4 instead of 1
    for (const double l : la) CHECK(std::isfinite(l));

    // Without landmarks the weight changes nothing: the run is plain MSE's, bit for bit.
    {
        std::ifstream in(manifest);
        std::ofstream out(dir.path / "no_landmarks.jsonl");
        std::string line;
        while (std::getline(in, line)) {
            auto j = nlohmann::json::parse(line);
            j.erase("landmarks");
            out << j.dump() << "\n";
        }
    }
    auto np = anchor_config(dir.path / "no_landmarks.jsonl", dir.path / "np", steps), nw = anchor_config(dir.path / "no_landmarks.jsonl",
                                                                                                          dir.path / "nw", steps);
    nw.face_loss_weight = 4.0;
    training::anchor_trainer<cpu_backend> tp(ctx, np), tw(ctx, nw);
    CHECK(losses_of(ctx, tp) == losses_of(ctx, tw));

    // The keys round-trip through JSON and are validated.
    const auto parsed = training::anchor_trainer_config::from_json(
        nlohmann::json::parse(R"({"face_loss_weight": 3, "face_box_grow": 1.25, "landmark_frame": 256})"));
    CHECK(parsed.face_loss_weight == 3.0);
    CHECK(parsed.face_box_grow == 1.25);
    CHECK(parsed.landmark_frame == 256.0);
    CHECK(training::anchor_trainer_config::from_json(parsed.to_json()).face_box_grow == 1.25);
    CHECK_THROWS_AS(training::anchor_trainer_config::from_json(nlohmann::json::parse(R"({"face_loss_weight": "x"})")),
                    dynamicid::value_error);
    for (const auto& [key, value] : {std::pair{"face_loss_weight", 0.0}, {"face_loss_weight", std::nan("")}, {"face_box_grow", 0.0},
                                     {"landmark_frame", -1.0}, {"landmark_frame", std::nan("")}}) {
        auto c = fa;
        if (std::string(key) == "face_loss_weight") c.face_loss_weight = value;
        if (std::string(key) == "face_box_grow") c.face_box_grow = value;
        if (std::string(key) == "landmark_frame") c.landmark_frame = value;
        INFO(key << " = " << value);
        try {
            training::anchor_trainer<cpu_backend> t(ctx, c);
            FAIL("no error");
        } catch (const dynamicid::value_error& e) {
            CHECK(std::string(e.what()).find(key) != std::string::npos);
        }
    }
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

TEST_CASE("trainers: the reconfiguration stage starts from a random IMR and KeyPointEncoder", "[training][trainer]") {
    cpu_backend::context ctx{.threads = 1};
    temp_dir dir("imr_random");
    const auto manifest = write_dataset(dir.path);
    const std::int64_t steps = 12;
    auto cfg = imr_config(manifest, dir.path / "a", steps);
    cfg.imr_init = cfg.keypoint_encoder_init = "random";
    cfg.imr = {.dim = 32, .dim_head = 16, .heads = 2, .num_queries = 2, .ff_mult = 2, .disentangle_depth = 2, .entangle_depth = 1};
    cfg.keypoint_encoder_widths = {4, 4, 8, 8, 8, 8, 16};  // the tiny projection's token width is 16
    training::imr_trainer<cpu_backend> a(ctx, cfg);
    const auto& ic = a.imr().settings();
    CHECK(ic.dim == 32);
    CHECK(ic.heads == 2);
    CHECK(a.imr().weights().disentangle.size() == 2u);
    CHECK(a.imr().weights().entangle.size() == 1u);
    CHECK(a.keypoint_encoder().embedding_dim() == 16);
    // torch's defaults: Linear weights and biases in +-1/sqrt(fan_in), LayerNorm 1 and 0, BatchNorm 1, 0, 0, 1.
    const auto w = a.imr().weights().proj_in.weight.to_host(ctx);
    const double bound = 1.0 / std::sqrt(static_cast<double>(a.imr().weights().proj_in.weight.dim(1)));
    double max_abs = 0, mean_abs = 0;
    for (const float v : w) max_abs = std::max(max_abs, static_cast<double>(std::fabs(v))), mean_abs += std::fabs(v) / w.size();
    CHECK(max_abs <= bound);
    CHECK(mean_abs == Approx(bound / 2).epsilon(0.15));
    for (const float v : a.imr().weights().norm_in.weight.to_host(ctx)) CHECK(v == 1.0f);
    for (const float v : a.imr().weights().norm_in.bias.to_host(ctx)) CHECK(v == 0.0f);
    for (const float v : a.keypoint_encoder().weights().blocks[0][0].running_var.to_host(ctx)) CHECK(v == 1.0f);

    training::imr_trainer<cpu_backend> b(ctx, [&] {
        auto c = cfg;
        c.output_dir = dir.path / "b";
        return c;
    }());
    const auto la = losses_of(ctx, a);
    const auto lb = losses_of(ctx, b);
    CHECK(la == lb);  // the initialisation depends only on the seed
    const double first = mean(la, 0, 4), last = mean(la, steps - 4, steps);
    INFO("random-init imr loss: first 4 steps " << first << ", last 4 " << last);
    CHECK(last < 0.7 * first);

    // The checkpoint holds the trained modules at the configured sizes and resumes.
    auto again = cfg;
    again.resume = "latest";
    training::imr_trainer<cpu_backend> resumed(ctx, again);
    CHECK(resumed.step() == steps);
    CHECK(host(ctx, resumed.parameters()) == host(ctx, a.parameters()));

    auto bad = cfg;
    bad.keypoint_encoder_widths = {4, 4};
    CHECK_THROWS_AS(training::imr_trainer<cpu_backend>(ctx, bad), dynamicid::value_error);
    bad = cfg;
    bad.imr.heads = 0;
    CHECK_THROWS_AS(training::imr_trainer<cpu_backend>(ctx, bad), dynamicid::value_error);
    CHECK_THROWS_AS(training::imr_trainer_config::from_json(nlohmann::json::parse(R"({"imr": {"dims": 4}})")), dynamicid::value_error);
    CHECK_THROWS_AS(training::anchor_trainer_config::from_json(nlohmann::json::parse(R"({"bucket_mb": "big"})")), dynamicid::value_error);
    const auto parsed = training::imr_trainer_config::from_json(
        nlohmann::json::parse(R"({"imr": {"dim": 64, "depth": 3}, "keypoint_encoder_widths": [1, 2, 3, 4, 5, 6, 7], "bucket_mb": 0.5})"));
    CHECK(parsed.imr.dim == 64);
    CHECK(parsed.imr.entangle_depth == 3);
    CHECK(parsed.keypoint_encoder_widths.back() == 7);
    CHECK(parsed.bucket_mb == 0.5);
}
