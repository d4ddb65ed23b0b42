// DynamicID end to end: a tiny UNet with the authors' processors (weights from
// an SAA.bin-layout torch.save file) run through several guided DDIM steps
// must reproduce the released code's latents (tools/golden/make_dynamicid_e2e.py).
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/dynamicid_checkpoint.hpp>
#include <dynamicid/io/torch_checkpoint.hpp>
#include <dynamicid/pipelines/dynamicid.hpp>
#include <dynamicid/visual/activation_maps.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using tensor_f = dynamicid::tensor<cpu_backend, float>;
using pipeline_t = dynamicid::pipelines::dynamicid_pipeline<cpu_backend>;
namespace saa = dynamicid::modules::saa;
namespace unet_ns = dynamicid::modules::unet;

const fs::path data_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "dynamicid_e2e";

struct fixture {
    unet_ns::unet_2d_condition<cpu_backend> unet;
    dynamicid::schedulers::ddim_scheduler sampler;
    dynamicid::io::safetensors_file cases;
    nlohmann::json case_list;
};

fixture load_fixture(cpu_backend::context& ctx) {
    auto unet_file = dynamicid::io::safetensors_file::open(data_dir / "unet.safetensors");
    const auto cfg = unet_ns::unet_config::from_json(nlohmann::json::parse(unet_file.metadata().at("config")));
    auto model = unet_ns::unet_2d_condition<cpu_backend>::load(ctx, dynamicid::modules::weight_source::open({data_dir / "unet.safetensors"}), cfg);
    auto cases = dynamicid::io::safetensors_file::open(data_dir / "cases.safetensors");
    auto sampler = dynamicid::schedulers::ddim_scheduler::from_json(nlohmann::json::parse(cases.metadata().at("scheduler")));
    auto list = nlohmann::json::parse(cases.metadata().at("cases"));
    return {std::move(model), std::move(sampler), std::move(cases), std::move(list)};
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double m = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
    return m;
}

tensor_f load(cpu_backend::context& ctx, const dynamicid::io::safetensors_file& f, const std::string& key) {
    return f.load<cpu_backend, float>(ctx, key);
}

struct case_run {
    std::vector<std::vector<float>> latents;  // per step
    tensor_f id_tokens, uncond_tokens;
};

/// Runs one golden case with `models`; `lc_edit` may adjust the layer controls.
case_run run_case(cpu_backend::context& ctx, const fixture& fx, const pipeline_t::models_type& models, const nlohmann::json& c,
                  dynamicid::pipelines::dynamicid_controls<cpu_backend> controls = {}) {
    const std::string p = c["name"].get<std::string>();
    const auto& f = fx.cases;
    const index_t n = c["id_num"].get<index_t>();
    const auto arcface = load(ctx, f, p + ".input.arcface");
    const auto clip = load(ctx, f, p + ".input.clip");
    const auto clip_uncond = load(ctx, f, p + ".input.clip_uncond");

    // Identity tokens through the checkpoint's projection, one identity at a time as released.
    std::vector<tensor_f> cond, uncond;
    const auto& proj = models.projection;
    const std::vector<float> zeros(static_cast<std::size_t>(arcface.dim(1)), 0.f);
    const auto u = proj.forward(ctx, tensor_f::from_host(ctx, {1, arcface.dim(1)}, zeros), clip_uncond);
    for (index_t i = 0; i < n; ++i) {
        cond.push_back(proj.forward(ctx, arcface.narrow_leading(i, 1), clip.narrow_leading(i, 1)));
        uncond.push_back(u);
    }
    case_run out;
    out.id_tokens = dynamicid::ops::concat(ctx, cond, 1);
    out.uncond_tokens = dynamicid::ops::concat(ctx, uncond, 1);

    dynamicid::pipelines::dynamicid_options o;
    o.guidance_scale = c["guidance"].get<double>();
    o.steps = c["steps"].get<std::size_t>();
    dynamicid::pipelines::dynamicid_layer_controls lc;
    lc.id_num = n;
    if (!c["bbox"].is_null())
        for (const auto& b : c["bbox"]) lc.boxes.push_back({b[0].get<double>(), b[1].get<double>(), b[2].get<double>(), b[3].get<double>()});
    lc.activate_query = c["activate_query"].get<bool>();
    lc.infer_scale = c["infer_scale"].get<double>();
    lc.infer_end = c["infer_end"].get<index_t>();
    if (!c["mix_scale"].is_null()) lc.mix_scale = c["mix_scale"].get<double>();
    lc.id_scale = c["id_scale"].get<double>();

    const auto text = dynamicid::ops::concat(ctx, std::vector<tensor_f>{load(ctx, f, p + ".input.text_uncond"), load(ctx, f, p + ".input.text_cond")}, 0);
    controls.latents = load(ctx, f, p + ".input.latents");
    auto user_step = controls.on_step;
    controls.on_step = [&](std::size_t i, double t, const tensor_f& x) {
        out.latents.push_back(x.to_host(ctx));
        if (user_step) user_step(i, t, x);
    };
    pipeline_t::run_denoiser(ctx, fx.unet, fx.sampler, models, o, controls.latents.shape(), text, out.id_tokens, out.uncond_tokens, lc, controls);
    return out;
}

void check_case(cpu_backend::context& ctx, const fixture& fx, const nlohmann::json& c, const case_run& r, double atol) {
    const std::string p = c["name"].get<std::string>();
    INFO("case " << p);
    CHECK(max_abs_diff(r.id_tokens.to_host(ctx), fx.cases.to_vector<float>(p + ".output.id_tokens")) < 1e-4);
    CHECK(max_abs_diff(r.uncond_tokens.to_host(ctx), fx.cases.to_vector<float>(p + ".output.uncond_tokens")) < 1e-4);
    REQUIRE(r.latents.size() == c["steps"].get<std::size_t>());
    for (std::size_t k = 0; k < r.latents.size(); ++k) {
        INFO("step " << k);
        CHECK(max_abs_diff(r.latents[k], fx.cases.to_vector<float>(p + ".output.latents_step" + std::to_string(k))) < atol);
    }
}

/// Deterministic small values for hand-made weights.
std::vector<float> noise(std::size_t n, std::uint32_t seed, float scale = 0.3f, float offset = 0.f) {
    std::vector<float> v(n);
    std::uint32_t x = seed * 2654435761u + 12345u;
    for (auto& e : v) {
        x = x * 1664525u + 1013904223u;
        e = offset + scale * (static_cast<float>(x >> 8) / static_cast<float>(1u << 24) * 2.f - 1.f);
    }
    return v;
}

/// An SAA.bin-layout safetensors image for `unet` with a one-layer projection
/// (id width `id_dim`, CLIP width `clip_dim`), random values.
std::vector<std::byte> random_saa_checkpoint(const unet_ns::unet_2d_condition<cpu_backend>& unet, index_t id_dim, index_t clip_dim) {
    dynamicid::io::safetensors_writer w;
    std::uint32_t seed = 1;
    const auto put = [&](const std::string& k, std::vector<index_t> dims, float scale = 0.3f, float offset = 0.f) {
        dynamicid::shape s(dims);
        w.add(k, s, noise(static_cast<std::size_t>(s.numel()), seed++, scale, offset));
    };
    const index_t c = unet.settings().cross_attention_dim, inner = 64;
    const std::string p = "proj_module.";
    put(p + "proj.0.weight", {2 * id_dim, id_dim});
    put(p + "proj.0.bias", {2 * id_dim});
    put(p + "proj.2.weight", {4 * c, 2 * id_dim});
    put(p + "proj.2.bias", {4 * c});
    put(p + "norm.weight", {c}, 0.1f, 1.f);
    put(p + "norm.bias", {c}, 0.1f);
    const std::string r = p + "perceiver_resampler.";
    put(r + "proj_in.weight", {c, clip_dim});
    put(r + "proj_in.bias", {c});
    put(r + "proj_out.weight", {c, c});
    put(r + "proj_out.bias", {c});
    put(r + "norm_out.weight", {c}, 0.1f, 1.f);
    put(r + "norm_out.bias", {c}, 0.1f);
    const std::string l = r + "layers.0.";
    for (const char* n : {"0.norm1", "0.norm2", "1.0"}) {
        put(l + n + ".weight", {c}, 0.1f, 1.f);
        put(l + n + ".bias", {c}, 0.1f);
    }
    put(l + "0.to_q.weight", {inner, c});
    put(l + "0.to_kv.weight", {2 * inner, c});
    put(l + "0.to_out.weight", {c, inner});
    put(l + "1.1.weight", {4 * c, c});
    put(l + "1.3.weight", {c, 4 * c});
    const auto& names = unet.attention_layer_names();
    for (std::size_t i = 0; i < names.size(); ++i) {
        const bool cross = names[i].find("attn2") != std::string::npos;
        const index_t hidden = dynamicid::pipelines::detail::layer_hidden_width(names[i], unet.settings());
        const index_t ctx_w = cross ? c : hidden, rank = 2;
        const std::string q = "SAA_module." + std::to_string(i) + ".";
        for (const char* n : {"to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"}) {
            const bool kv = std::string(n) == "to_k_lora" || std::string(n) == "to_v_lora";
            put(q + n + ".down.weight", {rank, kv ? ctx_w : hidden});
            put(q + n + ".up.weight", {hidden, rank});
        }
        if (cross) {
            put(q + "to_k_ip.weight", {hidden, c});
            put(q + "to_v_ip.weight", {hidden, c});
        }
    }
    return w.to_bytes();
}

}  // namespace

TEST_CASE("dynamicid: SAA.bin binds and the pipeline reproduces the released code's latents", "[dynamicid][pipeline][e2e]") {
    cpu_backend::context ctx{.threads = 2};
    const auto fx = load_fixture(ctx);
    const auto ckpt = dynamicid::io::identity_checkpoint::open(data_dir / "SAA.bin");
    CHECK(ckpt.layout == dynamicid::io::identity_checkpoint_layout::dynamicid);
    CHECK(ckpt.processor_count() == static_cast<index_t>(fx.unet.attention_layer_names().size()));
    const auto pc = ckpt.projection_config();
    CHECK(pc.cross_attention_dim == 64);
    CHECK(pc.id_embeddings_dim == 16);
    CHECK(pc.clip_embeddings_dim == 24);
    CHECK(pc.num_tokens == 4);
    CHECK(pc.depth == 4);
    const auto models = pipeline_t::models_type::bind(ctx, ckpt, fx.unet);
    CHECK(models.adapters->size() == fx.unet.attention_layer_names().size());

    for (const auto& c : fx.case_list) {
        const auto r = run_case(ctx, fx, models, c);
        check_case(ctx, fx, c, r, 1e-3);
    }
}

TEST_CASE("dynamicid: a converted safetensors SAA file and the IP-Adapter-FaceID layout bind to the same processors",
          "[dynamicid][pipeline][checkpoint]") {
    cpu_backend::context ctx{.threads = 2};
    const auto fx = load_fixture(ctx);
    const auto bin = dynamicid::io::torch_checkpoint::open(data_dir / "SAA.bin");

    // The same tree flattened into safetensors, and renamed to image_proj / ip_adapter.
    auto flat = dynamicid::io::to_safetensors_writer(bin.root()).to_bytes();
    auto st = dynamicid::io::identity_checkpoint::from_safetensors(
        std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(flat)));
    CHECK(st.layout == dynamicid::io::identity_checkpoint_layout::dynamicid);

    dynamicid::io::safetensors_writer renamed;
    for (const auto& [name, t] : bin.flatten()) {
        std::string k = name;
        if (k.rfind("proj_module.", 0) == 0) k = "image_proj." + k.substr(12);
        if (k.rfind("SAA_module.", 0) == 0) k = "ip_adapter." + k.substr(11);
        const auto bytes = t.contiguous_bytes();
        renamed.add_bytes(k, t.type(), t.dims(), bytes);
    }
    const auto ip_bytes = renamed.to_bytes();
    auto ip = dynamicid::io::identity_checkpoint::from_safetensors(
        std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(ip_bytes)));
    CHECK(ip.layout == dynamicid::io::identity_checkpoint_layout::ip_adapter_faceid_plus);

    // The no-gating case is IP-Adapter-FaceID-Plus's attention.
    const auto* no_gating = &fx.case_list[0];
    for (const auto& c : fx.case_list)
        if (c["name"] == "no_gating") no_gating = &c;
    for (const auto* k : {&st, &ip}) {
        const auto models = pipeline_t::models_type::bind(ctx, *k, fx.unet);
        check_case(ctx, fx, *no_gating, run_case(ctx, fx, models, *no_gating), 1e-3);
    }
}

TEST_CASE("dynamicid: checkpoint problems are reported together", "[dynamicid][pipeline][checkpoint]") {
    cpu_backend::context ctx{.threads = 2};
    const auto fx = load_fixture(ctx);
    const auto bin = dynamicid::io::torch_checkpoint::open(data_dir / "SAA.bin");
    dynamicid::io::safetensors_writer w;
    for (const auto& [name, t] : bin.flatten()) {
        if (name == "SAA_module.1.to_k_ip.weight" || name == "SAA_module.2.to_q_lora.up.weight") continue;  // dropped
        const auto bytes = t.contiguous_bytes();
        w.add_bytes(name, t.type(), t.dims(), bytes);
    }
    const std::vector<float> extra(4, 0.f);
    w.add("SAA_module.99.to_q_lora.down.weight", dynamicid::shape({2, 2}), extra);
    const auto bytes = w.to_bytes();
    const auto ck = dynamicid::io::identity_checkpoint::from_safetensors(
        std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(bytes)));
    try {
        (void)pipeline_t::models_type::bind(ctx, ck, fx.unet);
        FAIL("binding should fail");
    } catch (const dynamicid::io_error& e) {
        const std::string m = e.what();
        CHECK(m.find("1.to_k_ip.weight") != std::string::npos);
        CHECK(m.find("2.to_q_lora.up.weight") != std::string::npos);
        CHECK(m.find("processor 99") != std::string::npos);
    }
    // Neither layout: io_error naming both.
    dynamicid::io::safetensors_writer other;
    other.add("something.weight", dynamicid::shape({2}), std::vector<float>{1.f, 2.f});
    const auto ob = other.to_bytes();
    CHECK_THROWS_AS(dynamicid::io::identity_checkpoint::from_safetensors(
                        std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(ob))),
                    dynamicid::io_error);
}

TEST_CASE("dynamicid: activation maps are recorded per layer and step, cancellation stops the loop", "[dynamicid][pipeline][visual]") {
    cpu_backend::context ctx{.threads = 2};
    const auto fx = load_fixture(ctx);
    const auto ckpt = dynamicid::io::identity_checkpoint::open(data_dir / "SAA.bin");
    const auto models = pipeline_t::models_type::bind(ctx, ckpt, fx.unet);
    const auto& c = fx.case_list[0];  // two_ids_boxes
    REQUIRE(c["name"] == "two_ids_boxes");

    dynamicid::visual::activation_recorder rec;
    dynamicid::pipelines::dynamicid_controls<cpu_backend> controls;
    controls.on_activation = rec.callback();
    const auto r = run_case(ctx, fx, models, c, controls);
    check_case(ctx, fx, c, r, 1e-3);  // recording does not change the numbers

    // 4 attn2 layers (down_blocks.0, up_blocks.1 x 2, mid_block) x 4 steps.
    REQUIRE(rec.records().size() == 16);
    std::set<std::pair<index_t, std::int64_t>> seen;
    for (const auto& e : rec.records()) {
        seen.insert({e.layer, e.step});
        CHECK(e.layer % 2 == 1);
        CHECK(e.batch == 2);
        CHECK(e.beta == (e.step < 2 ? 2.0 : 0.0));
        CHECK(e.weights.size() == static_cast<std::size_t>(2 * e.grid.height * e.grid.width));
        CHECK(e.name.find("attn2") != std::string::npos);
    }
    CHECK(seen.size() == 16);

    // Heat maps: the identity's box view keeps only its cells.
    const auto& first = rec.records().front();
    const auto boxes = std::vector<saa::box>{{0.0, 0.0, 1.0, 0.5}, {0.25, 0.5, 0.9, 1.0}};
    const auto m1 = dynamicid::visual::identity_map(first, 1, boxes, 1, dynamicid::visual::map_kind::weights);
    const auto cells = saa::to_cells(boxes[1], first.grid);
    for (index_t y = 0; y < first.grid.height; ++y)
        for (index_t x = 0; x < first.grid.width; ++x)
            if (y < cells.y0 || y >= cells.y1 || x < cells.x0 || x >= cells.x1) CHECK(m1[static_cast<std::size_t>(y * first.grid.width + x)] == 0.f);
    const auto rgb = dynamicid::visual::heat_map_rgb(m1, first.grid, 4);
    CHECK(rgb.size() == static_cast<std::size_t>(first.grid.height * 4 * first.grid.width * 4 * 3));

    // Cancelling after the first step throws cancelled_error.
    std::atomic<bool> cancel{false};
    dynamicid::pipelines::dynamicid_controls<cpu_backend> stop;
    stop.cancel = &cancel;
    stop.on_step = [&](std::size_t, double, const tensor_f&) { cancel = true; };
    CHECK_THROWS_AS(run_case(ctx, fx, models, c, stop), dynamicid::cancelled_error);
}

TEST_CASE("dynamicid: generate() runs end to end on a tiny SD checkpoint", "[dynamicid][pipeline]") {
    namespace pl = dynamicid::pipelines;
    cpu_backend::context ctx{.threads = 2};
    auto sd = pl::text_to_image<cpu_backend>::load(ctx, fs::path(DYNAMICID_TEST_DATA_DIR) / "tiny_sd" / "diffusers");
    const index_t id_dim = 8, clip_dim = 12, clip_len = 5;
    const auto bytes = random_saa_checkpoint(sd.models().unet, id_dim, clip_dim);
    const auto ck = dynamicid::io::identity_checkpoint::from_safetensors(
        std::make_shared<const dynamicid::io::safetensors_file>(dynamicid::io::safetensors_file::from_memory(bytes)));
    auto models = pipeline_t::models_type::bind(ctx, ck, sd.models().unet);
    CHECK(models.projection.settings().depth == 1);
    CHECK(models.projection.settings().ff_mult == 4);
    const auto uc = noise(static_cast<std::size_t>(clip_len * clip_dim), 77);
    models.unconditional_clip_features = tensor_f::from_host(ctx, {1, clip_len, clip_dim}, uc);
    const pipeline_t pipe(sd, models);

    std::vector<pl::dynamicid_identity> ids(2);
    for (std::size_t i = 0; i < ids.size(); ++i) {
        ids[i].arcface = noise(static_cast<std::size_t>(id_dim), 10 + static_cast<std::uint32_t>(i), 1.f);
        ids[i].clip_features = noise(static_cast<std::size_t>(clip_len * clip_dim), 20 + static_cast<std::uint32_t>(i), 1.f);
    }
    ids[0].box = saa::box{0.0, 0.0, 1.0, 0.5};
    ids[1].box = saa::box{0.2, 0.5, 1.0, 1.0};
    pl::dynamicid_options o{.prompt = "two people on a bench", .steps = 3, .seed = 4, .width = 32, .height = 32, .infer_scale = 2.0};

    std::size_t progress = 0;
    std::size_t activations = 0;
    pl::dynamicid_controls<cpu_backend> c;
    c.on_progress = [&](std::size_t done, std::size_t total) { progress = done; CHECK(total == 3); };
    c.on_activation = [&](const pl::dynamicid_activation_event& e) { ++activations; CHECK(e.record.batch == 2); };
    const auto a = pipe.generate(ctx, o, ids, c);
    CHECK(progress == 3);
    const auto attn2 = sd.models().unet.attention_layer_names().size() / 2;
    CHECK(activations == 3 * attn2);
    REQUIRE(a.rgb.size() == 32u * 32u * 3u);
    const auto b = pipe.generate(ctx, o, ids);
    CHECK(a.rgb == b.rgb);  // deterministic for a seed

    // generate() = tokens + text + the denoiser.
    std::vector<tensor_f> cond, uncond;
    for (const auto& who : ids) {
        cond.push_back(pipe.identity_tokens(ctx, who));
        uncond.push_back(pipe.unconditional_tokens(ctx));
    }
    const auto text = sd.encode_text(ctx, pipeline_t::sd_options(o), true);
    const auto lat = pipe.denoise(ctx, o, text, dynamicid::ops::concat(ctx, cond, 1), dynamicid::ops::concat(ctx, uncond, 1),
                                  pipe.layer_controls(o, ids));
    CHECK(max_abs_diff(lat.to_host(ctx), a.latents.to_host(ctx)) == 0.0);

    // Gating off and identities without boxes give other images; non-square images run.
    auto plain = o;
    plain.activate_query = false;
    CHECK(pipe.generate(ctx, plain, ids).rgb != a.rgb);
    auto wide = o;
    wide.width = 64;
    wide.steps = 1;
    CHECK(pipe.generate(ctx, wide, ids).rgb.size() == 64u * 32u * 3u);

    // ID mixing: one box for all, mix_scale needed; no per-identity boxes then.
    auto mix = o;
    mix.mix_scale = 0.6;
    mix.steps = 1;
    CHECK_THROWS_AS(pipe.generate(ctx, mix, ids), dynamicid::value_error);
    auto unboxed = ids;
    for (auto& i : unboxed) i.box.reset();
    CHECK(pipe.generate(ctx, mix, unboxed).rgb.size() == 32u * 32u * 3u);

    // Bad inputs.
    auto half_boxed = ids;
    half_boxed[1].box.reset();
    CHECK_THROWS_AS(pipe.generate(ctx, o, half_boxed), dynamicid::value_error);
    auto bad_clip = ids;
    bad_clip[0].clip_features.pop_back();
    CHECK_THROWS_AS(pipe.generate(ctx, o, bad_clip), dynamicid::shape_error);
    auto edit = ids;
    edit[0].edit = pl::dynamicid_edit{.target_prompt = "in a happy expression, in front view"};
    CHECK_THROWS_AS(pipe.generate(ctx, o, edit), dynamicid::value_error);  // no IMR loaded
    CHECK_THROWS_AS(pipe.generate(ctx, o, {}), dynamicid::value_error);
}
