// The official DynamicID modules: SAA / SA processors, IMR and KeyPointEncoder
// against the golden cases computed by the released PyTorch modules, plus the
// behaviour the library defines where the released code does not (ties,
// invalid boxes, inconsistent token counts).
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/conform/conform.hpp>
#include <dynamicid/modules/dynamicid/imr.hpp>
#include <dynamicid/modules/dynamicid/keypoint_encoder.hpp>
#include <dynamicid/modules/dynamicid/saa.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace conform = dynamicid::conform;
namespace saa = dynamicid::modules::saa;
namespace imr = dynamicid::modules::imr;
using dynamicid::cpu_backend;
using tensor_f = dynamicid::tensor<cpu_backend, float>;

const fs::path official_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "official";

fs::path official(const std::string& name) { return official_dir / (name + ".safetensors"); }

dynamicid::modules::weight_source weights_of(const std::string& name) {
    return dynamicid::modules::weight_source::open({official(name)});
}

struct saa_case {
    cpu_backend::context ctx;
    conform::golden_case g;
    saa::saa_processor<cpu_backend> proc;
    tensor_f hidden, encoder;

    explicit saa_case(const std::string& name)
        : g(conform::golden_case::open(official(name))),
          proc(saa::saa_processor<cpu_backend>::load(ctx, weights_of(name), config_of(g), "param.attn.", "param.proc.")),
          hidden(g.load<cpu_backend, float>(ctx, "input.hidden_states")),
          encoder(g.load<cpu_backend, float>(ctx, "input.encoder_hidden_states")) {}

    static saa::saa_config config_of(const conform::golden_case& g) {
        return {.heads = g.setting<dynamicid::index_t>("heads"), .tokens_per_id = g.setting<dynamicid::index_t>("tokens_per_id")};
    }
    saa::saa_controls controls() const { return conform::detail::saa_controls_of(g); }
    std::vector<float> run(const saa::saa_controls& c) { return proc.forward(ctx, hidden, encoder, c).to_host(ctx); }
};

bool all_finite(const std::vector<float>& v) {
    return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

}  // namespace

TEST_CASE("official DynamicID modules match the released modules on every golden case", "[official][saa][imr][conform]") {
    cpu_backend::context ctx;
    const auto registry = conform::registry<cpu_backend>::builtin();
    for (const char* name : {"sa_lora", "saa_no_gating", "saa_single_boost", "saa_single_after_boost", "saa_two_ids_halves",
                             "saa_two_ids_boxes", "saa_id_mix", "saa_nonsquare_two_ids", "saa_sd15_width320", "imr_depth2",
                             "keypoint_encoder"}) {
        const auto g = conform::golden_case::open(official(name));
        const auto results = conform::run_case(ctx, registry, g, {.atol = 1e-4, .rtol = 1e-4});
        REQUIRE_FALSE(results.empty());
        for (const auto& r : results) {
            INFO(name << ' ' << r.name << " max_abs=" << r.max_abs << " max_rel=" << r.max_rel << ' ' << r.note);
            CHECK(r.pass);
        }
    }
}

TEST_CASE("saa tie rule: when every query ties the normalised weights are all zero", "[official][saa]") {
    const std::vector<double> sums = {2.5, 2.5, 2.5, 2.5, /* second batch element varies */ 0.0, 1.0, 0.2, 0.5};
    const auto w = saa::normalise_activation(sums, 2, 0.3);
    CHECK(std::vector<double>(w.begin(), w.begin() + 4) == std::vector<double>{0, 0, 0, 0});
    CHECK(std::vector<double>(w.begin() + 4, w.end()) == std::vector<double>{0.0, 1.0, 0.0, 0.5});

    // Through the processor: zero identity keys make every score 0, so every query ties.
    saa_case c("saa_single_boost");
    auto p = c.proc.weights();
    p.to_k_ip = tensor_f::zeros(c.ctx, p.to_k_ip.shape());
    const saa::saa_processor<cpu_backend> tied(c.proc.settings(), p);
    auto controls = c.controls();
    std::vector<saa::activation_record> seen;
    controls.on_activation = [&](const saa::activation_record& r) { seen.push_back(r); };
    const auto out = tied.forward(c.ctx, c.hidden, c.encoder, controls).to_host(c.ctx);
    CHECK(all_finite(out));
    REQUIRE(seen.size() == 1);
    CHECK(std::all_of(seen[0].normalized.begin(), seen[0].normalized.end(), [](float x) { return x == 0.0f; }));
    // The boost still applies: the one box covers the image, so w' = 0 + beta everywhere.
    CHECK(std::all_of(seen[0].weights.begin(), seen[0].weights.end(), [](float x) { return x == 4.0f; }));
}

TEST_CASE("saa activation hook reports normalised and boosted weights", "[official][saa]") {
    saa_case c("saa_single_boost");
    auto controls = c.controls();
    std::vector<saa::activation_record> seen;
    controls.on_activation = [&](const saa::activation_record& r) { seen.push_back(r); };
    c.run(controls);
    REQUIRE(seen.size() == 1);
    const auto r = seen[0];
    CHECK(r.batch == 2);
    CHECK(r.grid.height == 8);
    CHECK(r.grid.width == 8);
    CHECK(r.beta == 4.0);
    REQUIRE(r.normalized.size() == 128);
    REQUIRE(r.weights.size() == 128);
    for (std::size_t b = 0; b < 2; ++b) {
        const auto first = r.normalized.begin() + static_cast<std::ptrdiff_t>(b * 64), last = first + 64;
        CHECK(*std::max_element(first, last) == Approx(1.0f));
        CHECK(*std::min_element(first, last) == 0.0f);
    }
    for (std::size_t i = 0; i < r.normalized.size(); ++i) {
        CHECK((r.normalized[i] == 0.0f || r.normalized[i] >= 0.3f));
        CHECK(r.weights[i] == Approx(r.normalized[i] + 4.0f));  // inside the whole-image box
    }

    // After the boost (step >= infer_end) the weights are the normalised ones.
    seen.clear();
    controls.step = 3;
    c.run(controls);
    REQUIRE(seen.size() == 1);
    CHECK(seen[0].beta == 0.0);
    CHECK(seen[0].weights == seen[0].normalized);

    // A lower threshold keeps more queries; without gating there is nothing to report.
    seen.clear();
    controls.threshold = 0.0;
    c.run(controls);
    REQUIRE(seen.size() == 1);
    CHECK(std::count(seen[0].normalized.begin(), seen[0].normalized.end(), 0.0f) <
          std::count(r.normalized.begin(), r.normalized.end(), 0.0f));
    seen.clear();
    controls.activate_query = false;
    c.run(controls);
    CHECK(seen.empty());
}

TEST_CASE("saa outside boxes the boost divides by beta + 1", "[official][saa]") {
    std::vector<double> w = {0.0, 0.5, 1.0, 0.6};  // one batch element, 2 x 2 grid
    saa::apply_layout_boost(w, 1, {2, 2}, {{0.0, 0.0, 0.5, 0.5}}, 2.0);
    CHECK(w[0] == Approx(2.0));        // inside: 0 + 2
    CHECK(w[1] == Approx(0.5 / 3.0));  // outside: w / 3
    CHECK(w[2] == Approx(1.0 / 3.0));
    CHECK(w[3] == Approx(0.6 / 3.0));
}

TEST_CASE("saa rejects boxes outside the unit square, inverted or empty", "[official][saa][errors]") {
    saa_case c("saa_two_ids_boxes");
    const auto expect_box_error = [&](saa::box b) {
        auto controls = c.controls();
        controls.boxes[1] = b;
        try {
            c.run(controls);
            FAIL("no error for box [" << b.y_min << ", " << b.x_min << ", " << b.y_max << ", " << b.x_max << "]");
        } catch (const dynamicid::value_error& e) {
            CHECK(std::string(e.what()).rfind("[saa] box 1", 0) == 0);
        }
    };
    expect_box_error({-0.1, 0.5, 0.9, 0.9});  // below 0
    expect_box_error({0.1, 0.5, 1.2, 0.9});   // above 1
    expect_box_error({0.1, 0.5, 0.9, std::nan("")});
    expect_box_error({0.8, 0.5, 0.2, 0.9});   // inverted rows
    expect_box_error({0.1, 0.9, 0.8, 0.5});   // inverted columns
    expect_box_error({0.1, 0.5, 0.1, 0.9});   // empty rows
    expect_box_error({0.1, 0.5, 0.8, 0.5});   // empty columns
    CHECK_THROWS_AS(saa::validate_box({0, 0, 1, 1.5}, 0), dynamicid::value_error);
    CHECK_NOTHROW(saa::validate_box({0, 0, 1, 1}, 0));

    // More boxes than identities, and one box for several identities without mix_scale.
    auto controls = c.controls();
    controls.boxes.push_back({0, 0, 1, 1});
    CHECK_THROWS_AS(c.run(controls), dynamicid::value_error);
    controls = c.controls();
    controls.boxes.resize(1);
    CHECK_THROWS_WITH(c.run(controls), Catch::Contains("[saa]") && Catch::Contains("mix_scale"));
    controls.mix_scale = 0.5;
    CHECK(all_finite(c.run(controls)));
}

TEST_CASE("saa id_num must fit the encoder token count", "[official][saa][errors]") {
    saa_case c("saa_single_boost");  // 7 text + 4 identity tokens
    auto controls = c.controls();
    controls.id_num = 2;  // 7 text tokens expected, 3 found
    CHECK_THROWS_AS(c.run(controls), dynamicid::shape_error);
    controls.id_num = 3;  // 12 identity tokens > 11
    CHECK_THROWS_WITH(c.run(controls), Catch::StartsWith("[saa]"));
    controls.text_tokens.reset();
    controls.id_num = 3;
    CHECK_THROWS_AS(c.run(controls), dynamicid::shape_error);
    controls.id_num = 0;
    CHECK_THROWS_AS(c.run(controls), dynamicid::value_error);
    controls = c.controls();
    controls.infer_scale = -1.0;
    CHECK_THROWS_AS(c.run(controls), dynamicid::value_error);
}

TEST_CASE("saa grids: square, non-square and invalid", "[official][saa][errors]") {
    CHECK(saa::query_grid(1024).height == 32);
    const auto g = saa::query_grid(96, 96, 64);  // 96 x 64 image -> 12 x 8 latents (width x height)
    CHECK(g.height == 8);
    CHECK(g.width == 12);
    CHECK(saa::query_grid(96 * 64 / 4, 96 * 8, 64 * 8).width == 48);
    CHECK_THROWS_AS(saa::query_grid(96), dynamicid::shape_error);
    CHECK_THROWS_AS(saa::query_grid(96, 90, 64), dynamicid::shape_error);
    CHECK_THROWS_AS(saa::query_grid(96, 96, std::nullopt), dynamicid::value_error);

    saa_case c("saa_nonsquare_two_ids");
    auto controls = c.controls();
    controls.root_width.reset();
    controls.root_height.reset();
    CHECK_THROWS_AS(c.run(controls), dynamicid::shape_error);
    controls.activate_query = false;  // no layout needed without gating
    CHECK(all_finite(c.run(controls)));
}

TEST_CASE("saa overlapping boxes of different identities give a finite output", "[official][saa]") {
    saa_case c("saa_two_ids_halves");
    auto controls = c.controls();
    controls.boxes = {{0, 0, 1, 0.75}, {0, 0.25, 1, 1}};
    CHECK(all_finite(c.run(controls)));
}

TEST_CASE("sa and saa processors check their inputs", "[official][saa][errors]") {
    cpu_backend::context ctx;
    const auto sa = saa::sa_processor<cpu_backend>::load(ctx, weights_of("sa_lora"), {.heads = 2}, "param.attn.", "param.proc.");
    CHECK(sa.hidden_size() == 64);
    CHECK(sa.weights().to_q_lora.rank() == 4);
    CHECK_THROWS_AS(sa.forward(ctx, tensor_f::zeros(ctx, {2, 16, 32})), dynamicid::shape_error);
    CHECK_THROWS_AS(saa::sa_processor<cpu_backend>::load(ctx, weights_of("sa_lora"), {.heads = 3}, "param.attn.", "param.proc."),
                    dynamicid::shape_error);
    // The SA file has no identity projections: binding an SAA processor lists them.
    CHECK_THROWS_WITH(saa::saa_processor<cpu_backend>::load(ctx, weights_of("sa_lora"), {.heads = 2}, "param.attn.", "param.proc."),
                      Catch::Contains("to_k_ip") && Catch::Contains("to_v_ip"));

    saa_case c("saa_single_boost");
    CHECK_THROWS_AS(c.proc.forward(c.ctx, c.hidden, tensor_f::zeros(c.ctx, {2, 11, 32})), dynamicid::shape_error);
    CHECK_THROWS_AS(c.proc.forward(c.ctx, c.hidden, tensor_f::zeros(c.ctx, {1, 11, 48})), dynamicid::shape_error);
}

TEST_CASE("imr reads its depths from the weights and checks its inputs", "[official][imr][errors]") {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(official("imr_depth2"));
    imr::imr_config cfg{.dim = 64, .dim_head = 16, .heads = 4, .num_queries = 4, .embedding_dim = 48, .txt_dim = 40};
    const auto model = imr::imr_model<cpu_backend>::load(ctx, weights_of("imr_depth2"), cfg, "param.");
    CHECK(model.weights().disentangle.size() == 2);
    CHECK(model.weights().entangle.size() == 2);
    const auto in = [&](const char* n) { return g.load<cpu_backend, float>(ctx, std::string("input.") + n); };
    const auto out = model.forward(ctx, in("x"), in("src_landmark"), in("tgt_landmark"), in("src_text"), in("tgt_text"));
    CHECK(out.shape() == dynamicid::shape{3, 4, 48});
    CHECK_THROWS_AS(model.forward(ctx, tensor_f::zeros(ctx, {2, 4, 48}), in("src_landmark"), in("tgt_landmark"), in("src_text"),
                                  in("tgt_text")),
                    dynamicid::shape_error);
    CHECK_THROWS_AS(model.forward(ctx, in("x"), in("src_landmark"), in("tgt_landmark"), in("src_text"), tensor_f::zeros(ctx, {2, 40})),
                    dynamicid::shape_error);
    // A depth the checkpoint does not have is a weight problem.
    cfg.entangle_depth = 3;
    CHECK_THROWS_WITH(imr::imr_model<cpu_backend>::load(ctx, weights_of("imr_depth2"), cfg, "param."),
                      Catch::Contains("entangleNet.2"));
    cfg.entangle_depth.reset();
    cfg.heads = 8;  // inner width 128 does not match the stored to_q
    CHECK_THROWS_AS(imr::imr_model<cpu_backend>::load(ctx, weights_of("imr_depth2"), cfg, "param."), dynamicid::io_error);
}

TEST_CASE("keypoint encoder checks its input and weights", "[official][imr][errors]") {
    cpu_backend::context ctx;
    const auto enc = imr::keypoint_encoder<cpu_backend>::load(ctx, weights_of("keypoint_encoder"), {}, "param.");
    CHECK(enc.embedding_dim() == 768);
    CHECK_THROWS_AS(enc.forward(ctx, tensor_f::zeros(ctx, {1, 3, 96, 96})), dynamicid::shape_error);
    imr::keypoint_encoder_config wrong;
    wrong.blocks[1].push_back({3, 1, 1, true});  // a unit the checkpoint does not have
    CHECK_THROWS_WITH(imr::keypoint_encoder<cpu_backend>::load(ctx, weights_of("keypoint_encoder"), wrong, "param."),
                      Catch::Contains("blocks.1.3.conv_block.0.weight"));
}
