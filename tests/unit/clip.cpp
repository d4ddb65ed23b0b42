// CLIP text and vision towers and CLIPImageProcessor: transformers 5.24
// goldens (tests/data/golden/clip, tools/golden/make_clip_goldens.py), the
// pooling and clip-skip semantics, config parsing, PIL-exact resizing, the
// image file loader and the error paths.

// stb_image's implementation for this program, file-local (the library's
// loader header only declares it).
#include <support/stb_image_impl.hpp>

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/conform/conform.hpp>
#include <dynamicid/modules/clip/encoder.hpp>
#include <dynamicid/modules/clip/image_file.hpp>
#include <dynamicid/modules/clip/image_processor.hpp>
#include <dynamicid/modules/clip/text_model.hpp>
#include <dynamicid/modules/clip/vision_model.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <xtensor/xtensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace conform = dynamicid::conform;
namespace clip = dynamicid::modules::clip;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using tensor_f = dynamicid::tensor<cpu_backend, float>;

const fs::path golden_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "clip";

fs::path golden(const std::string& name) { return golden_dir / (name + ".safetensors"); }

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
    REQUIRE(a.size() == b.size());
    double m = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
    return m;
}

std::vector<std::int64_t> ids_of(const conform::golden_case& g) {
    return g.file().to_vector<std::int64_t>("input.input_ids");
}

clip::text_model<cpu_backend> text_model_of(cpu_backend::context& ctx, const conform::golden_case& g) {
    return clip::text_model<cpu_backend>::load(ctx, dynamicid::modules::weight_source::open({g.file_name()}),
                                               clip::text_config::from_json(g.config()), "param.");
}

clip::vision_model<cpu_backend> vision_model_of(cpu_backend::context& ctx, const conform::golden_case& g) {
    return clip::vision_model<cpu_backend>::load(ctx, dynamicid::modules::weight_source::open({g.file_name()}),
                                                 clip::vision_config::from_json(g.config()), "param.");
}

clip::image_u8 image_of(const conform::golden_case& g) {
    const auto dims = g.dims("input.image");
    const auto bytes = g.file().to_vector<std::uint8_t>("input.image");
    return clip::image_u8::from_rgb(bytes.data(), dims[0], dims[1], dims[2]);
}

}  // namespace

TEST_CASE("CLIP goldens pass through the conformance registry", "[clip][golden]") {
    cpu_backend::context ctx;
    const auto registry = conform::registry<cpu_backend>::builtin();
    for (const char* name : {"clip_text_tiny", "clip_text_legacy_eos2", "clip_vision_tiny", "clip_vision_gelu3", "clip_image_300x200",
                             "clip_image_97x131", "clip_image_250x150"}) {
        const auto g = conform::golden_case::open(golden(name));
        for (const auto& r : conform::run_case(ctx, registry, g)) {
            INFO(name << " " << r.name << ": max_abs " << r.max_abs << " (atol " << r.atol << ", rtol " << r.rtol << ") " << r.note);
            CHECK(r.pass);
        }
    }
}

TEST_CASE("CLIPTextModel pools where transformers 5.24 does", "[clip][text]") {
    using ids = std::vector<std::int64_t>;
    // Legacy configs (eos_token_id == 2): argmax of the ids, the first on ties.
    CHECK(clip::pooled_position(ids{49406, 320, 49407, 49407, 49407}, 2) == 2);
    CHECK(clip::pooled_position(ids{5, 9, 3, 9}, 2) == 1);
    // Otherwise the first EOS, even when larger ids precede it or EOS pads the row.
    CHECK(clip::pooled_position(ids{406, 900, 407, 407}, 407) == 2);
    CHECK(clip::pooled_position(ids{406, 900, 1, 1}, 407) == 0);  // no EOS: position 0, as argmax of all-false
}

TEST_CASE("CLIPTextModel binds prefixed and bare keys and matches the golden pooling", "[clip][text]") {
    cpu_backend::context ctx;
    for (const char* name : {"clip_text_tiny", "clip_text_legacy_eos2"}) {
        INFO(name);
        const auto g = conform::golden_case::open(golden(name));
        const auto model = text_model_of(ctx, g);
        const auto input = ids_of(g);
        const index_t batch = g.dims("input.input_ids")[0];
        const auto out = model.forward(ctx, input, batch);
        CHECK_FALSE(out.penultimate_hidden_state.defined());
        CHECK(max_abs_diff(out.pooler_output.to_host(ctx), g.values("output.pooler_output")) < 1e-4);
        // The clip-skip shortcut stops before the last layer and gives hidden_states[-2].
        const auto skip = model.penultimate_hidden_state(ctx, input, batch);
        CHECK(max_abs_diff(skip.to_host(ctx), g.values("output.penultimate_hidden_state")) < 1e-4);
        CHECK(model.final_layer_norm(ctx, skip).shape() == skip.shape());
    }
}

TEST_CASE("CLIPTextModel rejects bad ids, lengths and weights", "[clip][text]") {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(golden("clip_text_legacy_eos2"));
    const auto model = text_model_of(ctx, g);
    CHECK_THROWS_AS(model.forward(ctx, std::vector<std::int64_t>{0, 300}, 1), dynamicid::value_error);
    CHECK_THROWS_AS(model.forward(ctx, std::vector<std::int64_t>{0, -1}, 1), dynamicid::value_error);
    CHECK_THROWS_AS(model.forward(ctx, std::vector<std::int64_t>(21, 5), 1), dynamicid::shape_error);  // > 20 positions
    CHECK_THROWS_AS(model.forward(ctx, std::vector<std::int64_t>(5, 5), 2), dynamicid::shape_error);   // rows do not split
    // Shorter sequences use the first positions.
    CHECK(model.forward(ctx, std::vector<std::int64_t>{0, 7, 2}, 1).last_hidden_state.shape() == dynamicid::shape{1, 3, 24});
    // A config that does not fit the weights: one io_error naming every problem.
    auto cfg = clip::text_config::from_json(g.config());
    cfg.hidden_size = 32;
    cfg.num_attention_heads = 4;
    try {
        clip::text_model<cpu_backend>::load(ctx, dynamicid::modules::weight_source::open({g.file_name()}), cfg, "param.");
        FAIL("expected an io_error");
    } catch (const dynamicid::io_error& e) {
        const std::string what = e.what();
        CHECK(what.rfind("[weights]", 0) == 0);
        CHECK(what.find("token_embedding") != std::string::npos);
        CHECK(what.find("final_layer_norm.weight") != std::string::npos);
    }
}

TEST_CASE("CLIP configs read transformers config.json files", "[clip][config]") {
    // A CLIPConfig with both towers (SD1.5's CLIP ViT-L/14 text tower, legacy eos).
    const auto j = nlohmann::json::parse(R"({
        "projection_dim": 768,
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                        "eos_token_id": 2, "hidden_act": "quick_gelu", "max_position_embeddings": 77, "vocab_size": 49408},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "image_size": 224, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
    })");
    const auto t = clip::text_config::from_json(j);
    CHECK(t.hidden_size == 768);
    CHECK(t.eos_token_id == 2);
    CHECK(t.num_hidden_layers == 12);
    const auto v = clip::vision_config::from_json(j);
    CHECK(v.hidden_size == 1024);
    CHECK(v.projection_dim == 768);  // the CLIPConfig's
    CHECK(v.num_positions() == 257);
    CHECK(v.hidden_act == "gelu");
    // A bare CLIPVisionConfig keeps transformers' defaults for absent keys.
    const auto bare = clip::vision_config::from_json(nlohmann::json::parse(R"({"hidden_size": 1280, "num_attention_heads": 16})"));
    CHECK(bare.patch_size == 32);
    CHECK(bare.projection_dim == 512);
    CHECK_THROWS_AS(clip::text_config::from_json(nlohmann::json::parse(R"({"hidden_act": "mish"})")), dynamicid::value_error);
    CHECK_THROWS_AS(clip::text_config::from_json(nlohmann::json::parse(R"({"hidden_size": 30, "num_attention_heads": 4})")),
                    dynamicid::value_error);
    CHECK_THROWS_AS(clip::vision_config::from_json(nlohmann::json::parse(R"({"patch_size": "14"})")), dynamicid::value_error);
    CHECK(clip::activation_of("gelu_pytorch_tanh") == dynamicid::unary_op::gelu_tanh);
}

TEST_CASE("CLIPVisionModelWithProjection: penultimate state, shapes and errors", "[clip][vision]") {
    cpu_backend::context ctx;
    const auto g = conform::golden_case::open(golden("clip_vision_tiny"));
    const auto model = vision_model_of(ctx, g);
    REQUIRE(model.has_projection());
    const auto pixels = g.load<cpu_backend, float>(ctx, "input.pixel_values");
    const auto out = model.forward(ctx, pixels);
    CHECK(out.penultimate_hidden_state.shape() == dynamicid::shape{2, 17, 32});
    CHECK(out.image_embeds.shape() == dynamicid::shape{2, 24});
    CHECK(max_abs_diff(model.penultimate_hidden_state(ctx, pixels).to_host(ctx), g.values("output.penultimate_hidden_state")) < 1e-4);
    CHECK_THROWS_AS(model.forward(ctx, tensor_f::zeros(ctx, {1, 3, 33, 32})), dynamicid::shape_error);
    CHECK_THROWS_AS(model.forward(ctx, tensor_f::zeros(ctx, {1, 1, 32, 32})), dynamicid::shape_error);
}

TEST_CASE("Image resizing equals PIL's, the processor follows CLIPImageProcessor", "[clip][image]") {
    cpu_backend::context ctx;
    for (const char* name : {"clip_image_97x131", "clip_image_250x150"}) {
        INFO(name);
        const auto g = conform::golden_case::open(golden(name));
        const clip::image_processor proc(clip::image_processor_config::from_json(g.config()));
        const auto pixels = proc.preprocess<cpu_backend>(ctx, image_of(g)).to_host(ctx);
        // PIL's fixed-point resampling, reproduced: only float rounding remains.
        CHECK(max_abs_diff(pixels, g.values("output.pixel_values_pil")) < 1e-5);
        // transformers' default (torchvision) backend: at most one 8-bit step
        // away, in under 1% of the values.
        const auto ref = g.values("output.pixel_values");
        CHECK(max_abs_diff(pixels, ref) < 2e-2);
        std::size_t off = 0;
        for (std::size_t i = 0; i < ref.size(); ++i) off += std::abs(pixels[i] - ref[i]) > 1e-5 ? 1 : 0;
        CHECK(static_cast<double>(off) < 0.01 * static_cast<double>(ref.size()));
    }
    const clip::image_processor proc;
    CHECK(proc.resized_size(200, 300) == std::array<index_t, 2>{224, 336});
    CHECK(proc.resized_size(131, 97) == std::array<index_t, 2>{302, 224});  // int(224 * 131 / 97) = 302
    CHECK(proc.resized_size(224, 224) == std::array<index_t, 2>{224, 224});
}

TEST_CASE("Image helpers: identity resize, crop padding, channels, xtensor", "[clip][image]") {
    cpu_backend::context ctx;
    std::vector<std::uint8_t> rgb(5 * 7 * 3);
    for (std::size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<std::uint8_t>((i * 37) % 256);
    const auto img = clip::image_u8::from_rgb(rgb.data(), 5, 7);
    CHECK(clip::resize(img, 5, 7).pixels == img.pixels);
    // A constant image stays constant through bicubic up- and downscaling.
    const auto flat = clip::image_u8::from_rgb(std::vector<std::uint8_t>(40 * 30 * 3, 77).data(), 40, 30);
    for (auto [h, w] : {std::pair<index_t, index_t>{13, 9}, {97, 61}}) {
        const auto r = clip::resize(flat, h, w);
        CHECK(std::all_of(r.pixels.begin(), r.pixels.end(), [](std::uint8_t v) { return v == 77; }));
    }
    // Crop larger than the image: zero padding, the extra pixel after (torchvision).
    clip::image_processor_config cfg;
    cfg.do_resize = false;
    cfg.do_normalize = false;
    cfg.do_rescale = false;
    cfg.crop_height = 8;
    cfg.crop_width = 9;
    const auto cropped = clip::image_processor(cfg).resize_and_crop(img);
    CHECK(cropped.height == 8);
    CHECK(cropped.width == 9);
    CHECK(cropped.at(0, 0, 0) == 0);
    CHECK(cropped.at(1, 1, 0) == img.at(0, 0, 0));  // top pad (8 - 5) / 2 = 1, left pad (9 - 7) / 2 = 1
    CHECK(cropped.at(5, 7, 2) == img.at(4, 6, 2));
    CHECK(cropped.at(7, 8, 1) == 0);
    // Grey and RGBA buffers become RGB.
    const std::uint8_t grey[] = {10, 20};
    CHECK(clip::image_u8::from_rgb(grey, 1, 2, 1).pixels == std::vector<std::uint8_t>{10, 10, 10, 20, 20, 20});
    const std::uint8_t rgba[] = {1, 2, 3, 4, 5, 6, 7, 8};
    CHECK(clip::image_u8::from_rgb(rgba, 1, 2, 4).pixels == std::vector<std::uint8_t>{1, 2, 3, 5, 6, 7});
    CHECK_THROWS_AS(clip::image_u8::from_rgb(rgba, 1, 2, 2), dynamicid::value_error);
    // xtensor arrays, (H, W, 3) and (H, W).
    xt::xtensor<std::uint8_t, 3> xs = xt::zeros<std::uint8_t>({5, 7, 3});
    std::copy(rgb.begin(), rgb.end(), xs.begin());
    CHECK(clip::image_u8::from_xtensor(xs).pixels == img.pixels);
    xt::xtensor<std::uint8_t, 2> xg = xt::zeros<std::uint8_t>({1, 2});
    xg(0, 1) = 20;
    CHECK(clip::image_u8::from_xtensor(xg).pixels == std::vector<std::uint8_t>{0, 0, 0, 20, 20, 20});
    // Batches stack; the default processor gives (N, 3, 224, 224).
    const auto batch = clip::image_processor{}.preprocess<cpu_backend>(ctx, std::vector<clip::image_u8>{img, flat});
    CHECK(batch.shape() == dynamicid::shape{2, 3, 224, 224});
    CHECK_THROWS_AS(clip::image_processor_config::from_json(nlohmann::json::parse(R"({"resample": 1})")), dynamicid::value_error);
    CHECK_THROWS_AS(clip::image_processor_config::from_json(nlohmann::json::parse(R"({"image_mean": [0.5]})")), dynamicid::value_error);
}

TEST_CASE("Image files load through stb_image, bad files throw image errors", "[clip][image]") {
    const fs::path dir = fs::temp_directory_path() / "dynamicid_clip_image_test";
    fs::create_directories(dir);
    // A 3x2 binary PPM.
    const fs::path ppm = dir / "tiny.ppm";
    {
        std::ofstream out(ppm, std::ios::binary);
        out << "P6\n3 2\n255\n";
        for (int i = 0; i < 18; ++i) out.put(static_cast<char>(i * 13));
    }
    const auto img = clip::load_image(ppm);
    CHECK(img.height == 2);
    CHECK(img.width == 3);
    CHECK(img.at(1, 2, 2) == static_cast<std::uint8_t>(17 * 13));
    const fs::path bad = dir / "bad.png";
    {
        std::ofstream out(bad, std::ios::binary);
        out << "not an image at all";
    }
    const auto expect_image_error = [](const fs::path& p) {
        try {
            clip::load_image(p);
            FAIL("expected an io_error");
        } catch (const dynamicid::io_error& e) {
            CHECK(std::string(e.what()).rfind("[image]", 0) == 0);
        }
    };
    expect_image_error(bad);
    expect_image_error(dir / "missing.png");
    fs::remove_all(dir);
}
