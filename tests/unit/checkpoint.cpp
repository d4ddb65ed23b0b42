// Opening Stable Diffusion 1.x checkpoints: the tiny diffusers folder and the
// same weights as an original single-file checkpoint (tests/data/tiny_sd,
// written by tools/golden/make_tiny_pipeline.py), the LDM key mapping, shards,
// variants, dtypes, and the errors for missing, truncated, pickled and
// misshapen weights.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/checkpoint.hpp>
#include <dynamicid/text/clip_tokenizer.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace io = dynamicid::io;
namespace modules = dynamicid::modules;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using tensor_f = dynamicid::tensor<cpu_backend, float>;

const fs::path tiny_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "tiny_sd";
const fs::path folder_dir = tiny_dir / "diffusers";
const fs::path single_path = tiny_dir / "single_file.safetensors";

/// A scratch folder removed at scope exit.
struct scratch {
    fs::path path;
    scratch() {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() / ("dynamicid_checkpoint_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~scratch() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    /// A copy of the tiny diffusers folder.
    fs::path copy_folder() const {
        const auto to = path / "sd";
        fs::copy(folder_dir, to, fs::copy_options::recursive);
        return to;
    }
};

template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const dynamicid::error& e) {
        return e.what();
    }
    return "";
}

/// Rewrites a safetensors file through `edit(name, dtype, dims, bytes, writer)`.
template <class Edit>
void rewrite(const fs::path& from, const fs::path& to, Edit edit) {
    const auto file = io::safetensors_file::open(from);
    io::safetensors_writer w;
    for (const auto& name : file.names()) {
        const auto& info = file.info(name);
        edit(name, info, file.bytes(name), w);
    }
    w.write(to);
}

std::vector<float> unet_out(cpu_backend::context& ctx, const modules::unet::unet_2d_condition<cpu_backend>& u) {
    const auto sample = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 4, 4, 4}, 11);
    const auto text = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 5, u.settings().cross_attention_dim}, 12);
    const std::vector<float> t{537.0f};
    return u.forward(ctx, sample, std::span<const float>(t), text).to_host(ctx);
}

std::vector<float> vae_out(cpu_backend::context& ctx, const modules::vae::autoencoder_kl<cpu_backend>& v) {
    const auto image = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 3, 8, 8}, 13);
    auto out = v.encode(ctx, image).mean.to_host(ctx);
    const auto latents = dynamicid::ops::randn<cpu_backend, float>(ctx, {1, 4, 4, 4}, 14);
    const auto decoded = v.decode(ctx, latents).to_host(ctx);
    out.insert(out.end(), decoded.begin(), decoded.end());
    return out;
}

std::vector<float> text_out(cpu_backend::context& ctx, const modules::clip::text_model<cpu_backend>& m) {
    const std::vector<std::int64_t> ids{49406, 320, 1125, 539, 320, 2533, 49407, 49407};
    return m.forward(ctx, ids, 1).last_hidden_state.to_host(ctx);
}

}  // namespace

TEST_CASE("checkpoint: the tiny diffusers folder opens and every component binds", "[checkpoint][io]") {
    cpu_backend::context ctx;
    const auto ckpt = io::sd_checkpoint::open(folder_dir);
    CHECK(ckpt.format() == io::checkpoint_format::diffusers);
    CHECK(ckpt.unet.block_out_channels == std::vector<index_t>{16, 32, 32});
    CHECK(ckpt.unet.cross_attention_dim == 16);
    CHECK(ckpt.vae.block_out_channels == std::vector<index_t>{16, 32});
    CHECK(ckpt.text_encoder.hidden_size == 16);
    CHECK(ckpt.scheduler_config.at("_class_name") == "DDIMScheduler");
    REQUIRE(ckpt.tokenizer_folder);
    CHECK(ckpt.unet_files().weight_files.size() == 1);
    // F16 UNet / text encoder and F32 VAE as stored.
    CHECK(ckpt.unet_weights().files().front()->info("conv_in.weight").type == dynamicid::dtype::f16);
    CHECK(ckpt.vae_weights().files().front()->info("decoder.conv_in.weight").type == dynamicid::dtype::f32);

    CHECK_NOTHROW(modules::unet::unet_2d_condition<cpu_backend>::load(ctx, ckpt.unet_weights(), ckpt.unet));
    CHECK_NOTHROW(modules::vae::autoencoder_kl<cpu_backend>::load(ctx, ckpt.vae_weights(), ckpt.vae));
    CHECK_NOTHROW(modules::clip::text_model<cpu_backend>::load(ctx, ckpt.text_encoder_weights(), ckpt.text_encoder));
    const auto tok = dynamicid::text::clip_tokenizer::from_folder(*ckpt.tokenizer_folder);
    CHECK(tok.encode("a photo of a person").front() == 49406);
}

TEST_CASE("checkpoint: the single file gives the folder's UNet, VAE and text encoder", "[checkpoint][io]") {
    cpu_backend::context ctx;
    const auto folder = io::sd_checkpoint::open(folder_dir);
    const auto single = io::sd_checkpoint::open(single_path, {.config_folder = folder_dir});
    CHECK(single.format() == io::checkpoint_format::single_file);
    REQUIRE(single.tokenizer_folder);

    // Every tensor the folder holds is reachable, with the same shape, through the LDM names.
    for (const auto& [a, b] : {std::pair{&folder.unet_weights(), &single.unet_weights()}, std::pair{&folder.vae_weights(), &single.vae_weights()}}) {
        for (const auto& key : a->stored_keys()) {
            std::string stored;
            const auto* f = b->find(key, &stored);
            INFO(key);
            REQUIRE(f != nullptr);
            CHECK(f->info(stored).dims == a->find(key)->info(key).dims);
            CHECK(f->to_vector<float>(stored) == a->find(key)->to_vector<float>(key));
        }
    }

    using unet_t = modules::unet::unet_2d_condition<cpu_backend>;
    using vae_t = modules::vae::autoencoder_kl<cpu_backend>;
    using text_t = modules::clip::text_model<cpu_backend>;
    CHECK(unet_out(ctx, unet_t::load(ctx, folder.unet_weights(), folder.unet)) ==
          unet_out(ctx, unet_t::load(ctx, single.unet_weights(), single.unet)));
    CHECK(vae_out(ctx, vae_t::load(ctx, folder.vae_weights(), folder.vae)) == vae_out(ctx, vae_t::load(ctx, single.vae_weights(), single.vae)));
    CHECK(text_out(ctx, text_t::load(ctx, folder.text_encoder_weights(), folder.text_encoder)) ==
          text_out(ctx, text_t::load(ctx, single.text_encoder_weights(), single.text_encoder)));
}

TEST_CASE("checkpoint: single-file configs inferred from shapes", "[checkpoint][io]") {
    cpu_backend::context ctx;
    const auto folder = io::sd_checkpoint::open(folder_dir);
    const auto inferred = io::sd_checkpoint::open(single_path);
    // What shapes show matches the folder's config.
    CHECK(inferred.unet.block_out_channels == folder.unet.block_out_channels);
    CHECK(inferred.unet.layers_per_block == folder.unet.layers_per_block);
    CHECK(inferred.unet.down_block_types == folder.unet.down_block_types);
    CHECK(inferred.unet.up_block_types == folder.unet.up_block_types);
    CHECK(inferred.unet.cross_attention_dim == folder.unet.cross_attention_dim);
    CHECK(inferred.unet.use_linear_projection == folder.unet.use_linear_projection);
    CHECK(inferred.vae.block_out_channels == folder.vae.block_out_channels);
    CHECK(inferred.vae.layers_per_block == folder.vae.layers_per_block);
    CHECK(inferred.vae.latent_channels == 4);
    CHECK(inferred.text_encoder.vocab_size == 49408);
    CHECK(inferred.text_encoder.hidden_size == 16);
    CHECK(inferred.text_encoder.num_hidden_layers == folder.text_encoder.num_hidden_layers);
    CHECK(inferred.text_encoder.intermediate_size == folder.text_encoder.intermediate_size);
    CHECK(inferred.scheduler_config.at("steps_offset") == 1);
    CHECK_FALSE(inferred.tokenizer_folder);

    // Norm groups are not in the shapes: 32 (SD1.5's) does not divide 16, so the guess is 16.
    CHECK(inferred.unet.norm_num_groups == 16);
    // Head counts and norm groups come from the caller, on top of the inferred sizes.
    const auto file = io::safetensors_file::open(single_path);
    auto base_unet = modules::unet::unet_config{};
    base_unet.attention_head_dim = {2};
    base_unet.norm_num_groups = 8;
    const auto from_base = io::infer_unet_config(file, base_unet);
    CHECK(from_base.attention_head_dim == folder.unet.attention_head_dim);
    CHECK(from_base.norm_num_groups == 8);
    auto unet_cfg = inferred.unet;
    unet_cfg.attention_head_dim = folder.unet.attention_head_dim;
    unet_cfg.norm_num_groups = folder.unet.norm_num_groups;
    auto vae_cfg = inferred.vae;
    vae_cfg.norm_num_groups = folder.vae.norm_num_groups;
    auto text_cfg = inferred.text_encoder;
    text_cfg.num_attention_heads = folder.text_encoder.num_attention_heads;
    const auto given = io::sd_checkpoint::open(single_path, {.unet = unet_cfg, .vae = vae_cfg, .text_encoder = text_cfg});
    CHECK(given.unet.attention_head_dim == folder.unet.attention_head_dim);
    CHECK_NOTHROW(modules::unet::unet_2d_condition<cpu_backend>::load(ctx, given.unet_weights(), given.unet));
    CHECK_NOTHROW(modules::vae::autoencoder_kl<cpu_backend>::load(ctx, given.vae_weights(), given.vae));
    CHECK_NOTHROW(modules::clip::text_model<cpu_backend>::load(ctx, given.text_encoder_weights(), given.text_encoder));
}

TEST_CASE("checkpoint: LDM key mapping for SD1.5's UNet and VAE layout", "[checkpoint][io]") {
    namespace d = io::detail;
    const d::ldm_unet_layout sd15{{2, 2, 2, 2}, {false, true, true, true}};
    CHECK(d::ldm_unet_key("conv_in.weight", sd15) == "input_blocks.0.0.weight");
    CHECK(d::ldm_unet_key("time_embedding.linear_2.bias", sd15) == "time_embed.2.bias");
    CHECK(d::ldm_unet_key("down_blocks.0.resnets.1.conv2.weight", sd15) == "input_blocks.2.0.out_layers.3.weight");
    CHECK(d::ldm_unet_key("down_blocks.1.attentions.0.proj_in.weight", sd15) == "input_blocks.4.1.proj_in.weight");
    CHECK(d::ldm_unet_key("down_blocks.2.downsamplers.0.conv.bias", sd15) == "input_blocks.9.0.op.bias");
    CHECK(d::ldm_unet_key("down_blocks.3.resnets.1.time_emb_proj.weight", sd15) == "input_blocks.11.0.emb_layers.1.weight");
    CHECK(d::ldm_unet_key("mid_block.resnets.1.norm1.weight", sd15) == "middle_block.2.in_layers.0.weight");
    CHECK(d::ldm_unet_key("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", sd15) ==
          "middle_block.1.transformer_blocks.0.attn2.to_k.weight");
    CHECK(d::ldm_unet_key("up_blocks.0.upsamplers.0.conv.weight", sd15) == "output_blocks.2.1.conv.weight");
    CHECK(d::ldm_unet_key("up_blocks.1.upsamplers.0.conv.weight", sd15) == "output_blocks.5.2.conv.weight");
    CHECK(d::ldm_unet_key("up_blocks.3.resnets.2.conv_shortcut.weight", sd15) == "output_blocks.11.0.skip_connection.weight");
    CHECK(d::ldm_unet_key("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight", sd15) ==
          "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight");
    CHECK(d::ldm_unet_key("conv_norm_out.bias", sd15) == "out.0.bias");
    CHECK(d::ldm_unet_key("conv_out.weight", sd15) == "out.2.weight");
    CHECK(d::ldm_unet_key("down_blocks.0.resnets.2.conv1.weight", sd15).front() == '\0');  // no third resnet
    CHECK(d::ldm_unet_key("down_blocks.4.resnets.0.conv1.weight", sd15).front() == '\0');

    CHECK(d::ldm_vae_key("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", 4) == "encoder.down.1.block.0.nin_shortcut.weight");
    CHECK(d::ldm_vae_key("encoder.down_blocks.0.downsamplers.0.conv.weight", 4) == "encoder.down.0.downsample.conv.weight");
    CHECK(d::ldm_vae_key("decoder.up_blocks.0.resnets.2.norm2.bias", 4) == "decoder.up.3.block.2.norm2.bias");
    CHECK(d::ldm_vae_key("decoder.up_blocks.2.upsamplers.0.conv.bias", 4) == "decoder.up.1.upsample.conv.bias");
    CHECK(d::ldm_vae_key("decoder.mid_block.resnets.1.conv1.weight", 4) == "decoder.mid.block_2.conv1.weight");
    CHECK(d::ldm_vae_key("encoder.mid_block.attentions.0.to_out.0.weight", 4) == "encoder.mid.attn_1.proj_out.weight");
    CHECK(d::ldm_vae_key("encoder.mid_block.attentions.0.group_norm.bias", 4) == "encoder.mid.attn_1.norm.bias");
    CHECK(d::ldm_vae_key("decoder.conv_norm_out.weight", 4) == "decoder.norm_out.weight");
    CHECK(d::ldm_vae_key("post_quant_conv.weight", 4) == "post_quant_conv.weight");
    CHECK(d::ldm_vae_key("decoder.mid_block.resnets.2.conv1.weight", 4).front() == '\0');
}

TEST_CASE("checkpoint: sharded, fp16-variant and BF16 folders load", "[checkpoint][io]") {
    cpu_backend::context ctx;
    scratch s;
    const auto sd = s.copy_folder();
    const auto reference = io::sd_checkpoint::open(folder_dir);

    // UNet split into two shards with an index.
    const auto unet_file = sd / "unet" / "diffusion_pytorch_model.safetensors";
    const auto whole = io::safetensors_file::open(unet_file);
    io::safetensors_writer a, b;
    nlohmann::json map = nlohmann::json::object();
    for (const auto& name : whole.names()) {
        const bool first = name < "mid";
        auto& w = first ? a : b;
        w.add_bytes(name, whole.info(name).type, whole.info(name).dims, whole.bytes(name));
        map[name] = first ? "diffusion_pytorch_model-00001-of-00002.safetensors" : "diffusion_pytorch_model-00002-of-00002.safetensors";
    }
    a.write(sd / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors");
    b.write(sd / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors");
    std::ofstream(sd / "unet" / "diffusion_pytorch_model.safetensors.index.json") << nlohmann::json{{"metadata", {}}, {"weight_map", map}}.dump();
    fs::remove(unet_file);
    // Text encoder only as the fp16 variant.
    fs::rename(sd / "text_encoder" / "model.safetensors", sd / "text_encoder" / "model.fp16.safetensors");
    // VAE in BF16.
    const auto vae_file = sd / "vae" / "diffusion_pytorch_model.safetensors";
    rewrite(vae_file, sd / "vae" / "bf16.tmp", [&](const std::string& name, const io::tensor_info& info, auto, io::safetensors_writer& w) {
        const auto values = io::safetensors_file::open(vae_file).to_vector<dynamicid::bfloat16>(name);
        w.add(name, info.dims, values);
    });
    fs::rename(sd / "vae" / "bf16.tmp", vae_file);

    const auto ckpt = io::sd_checkpoint::open(sd);
    CHECK(ckpt.unet_files().weight_files.size() == 2);
    CHECK(ckpt.text_encoder_files().weight_files.front().filename() == "model.fp16.safetensors");
    CHECK(ckpt.vae_weights().files().front()->info("decoder.conv_in.weight").type == dynamicid::dtype::bf16);
    for (const auto& key : reference.unet_weights().stored_keys()) {
        std::string stored;
        const auto* f = ckpt.unet_weights().find(key, &stored);
        REQUIRE(f != nullptr);
        CHECK(f->to_vector<float>(stored) == reference.unet_weights().find(key)->to_vector<float>(key));
    }
    CHECK_NOTHROW(modules::unet::unet_2d_condition<cpu_backend>::load(ctx, ckpt.unet_weights(), ckpt.unet));
    CHECK(text_out(ctx, modules::clip::text_model<cpu_backend>::load(ctx, ckpt.text_encoder_weights(), ckpt.text_encoder)) ==
          text_out(ctx, modules::clip::text_model<cpu_backend>::load(ctx, reference.text_encoder_weights(), reference.text_encoder)));
    CHECK_NOTHROW(modules::vae::autoencoder_kl<cpu_backend>::load(ctx, ckpt.vae_weights(), ckpt.vae));

    // Asking for the variant explicitly where only the plain VAE exists names the file wanted.
    const auto msg = error_of([&] { io::sd_checkpoint::open(sd, {.variant = "fp16"}); });
    CHECK(msg.find("[checkpoint]") == 0);
    CHECK(msg.find("diffusion_pytorch_model.fp16.safetensors") != std::string::npos);

    // An index naming a shard outside the folder is refused.
    std::ofstream(sd / "unet" / "diffusion_pytorch_model.safetensors.index.json")
        << nlohmann::json{{"weight_map", {{"conv_in.weight", "../../etc/passwd"}}}}.dump();
    CHECK(error_of([&] { io::sd_checkpoint::open(sd); }).find("not a plain file name") != std::string::npos);
}

TEST_CASE("checkpoint: missing components and files are named", "[checkpoint][io]") {
    scratch s;
    const auto sd = s.copy_folder();

    fs::remove(sd / "model_index.json");
    auto msg = error_of([&] { io::sd_checkpoint::open(sd); });
    CHECK(msg.find("[checkpoint]") == 0);
    CHECK(msg.find((sd / "model_index.json").string()) != std::string::npos);
    fs::copy(folder_dir / "model_index.json", sd / "model_index.json");

    fs::remove_all(sd / "vae");
    msg = error_of([&] { io::sd_checkpoint::open(sd); });
    CHECK(msg.find("missing component 'vae'") != std::string::npos);
    fs::copy(folder_dir / "vae", sd / "vae", fs::copy_options::recursive);

    fs::remove(sd / "text_encoder" / "model.safetensors");
    msg = error_of([&] { io::sd_checkpoint::open(sd); });
    CHECK(msg.find((sd / "text_encoder" / "model.safetensors").string()) != std::string::npos);

    // Only pickle weights: refused with a pointer to safetensors.
    std::ofstream(sd / "text_encoder" / "pytorch_model.bin") << "not read";
    msg = error_of([&] { io::sd_checkpoint::open(sd); });
    CHECK(msg.find("pytorch_model.bin") != std::string::npos);
    CHECK(msg.find("safetensors") != std::string::npos);
    CHECK(error_of([&] { io::sd_checkpoint::open(s.path / "v1-5-pruned-emaonly.ckpt"); }).find("pickle") != std::string::npos);
    fs::copy(folder_dir / "text_encoder" / "model.safetensors", sd / "text_encoder" / "model.safetensors");

    fs::remove(sd / "tokenizer" / "merges.txt");
    msg = error_of([&] { io::sd_checkpoint::open(sd); });
    CHECK(msg.find((sd / "tokenizer" / "merges.txt").string()) != std::string::npos);
    fs::copy(folder_dir / "tokenizer" / "merges.txt", sd / "tokenizer" / "merges.txt");

    fs::remove(sd / "unet" / "config.json");
    msg = error_of([&] { io::sd_checkpoint::open(sd); });
    CHECK(msg.find((sd / "unet" / "config.json").string()) != std::string::npos);
    fs::copy(folder_dir / "unet" / "config.json", sd / "unet" / "config.json");

    CHECK_NOTHROW(io::sd_checkpoint::open(sd));
    msg = error_of([&] { io::sd_checkpoint::open(s.path / "absent.safetensors"); });
    CHECK(msg.find("absent.safetensors") != std::string::npos);
    // A diffusers component file is not an original checkpoint.
    msg = error_of([&] { io::sd_checkpoint::open(sd / "unet" / "diffusion_pytorch_model.safetensors"); });
    CHECK(msg.find("diffusers-named") != std::string::npos);
}

TEST_CASE("checkpoint: a truncated weight file is an io_error naming it", "[checkpoint][io]") {
    scratch s;
    const auto sd = s.copy_folder();
    const auto unet_file = sd / "unet" / "diffusion_pytorch_model.safetensors";
    fs::resize_file(unet_file, fs::file_size(unet_file) / 2);
    try {
        io::sd_checkpoint::open(sd);
        FAIL("no error");
    } catch (const dynamicid::io_error& e) {
        CHECK(std::string(e.what()).find(unet_file.string()) != std::string::npos);
    }
    const auto single = s.path / "single.safetensors";
    fs::copy(single_path, single);
    fs::resize_file(single, 1000);
    CHECK_THROWS_AS(io::sd_checkpoint::open(single), dynamicid::io_error);
}

TEST_CASE("checkpoint: every problem of a misshapen component is reported at once", "[checkpoint][io]") {
    cpu_backend::context ctx;
    scratch s;
    const auto sd = s.copy_folder();
    const auto unet_file = sd / "unet" / "diffusion_pytorch_model.safetensors";
    // Drop one tensor, give two others wrong shapes.
    rewrite(folder_dir / "unet" / "diffusion_pytorch_model.safetensors", unet_file,
            [](const std::string& name, const io::tensor_info& info, std::span<const std::byte> bytes, io::safetensors_writer& w) {
                if (name == "mid_block.resnets.0.conv1.bias") return;
                if (name == "conv_in.weight" || name == "up_blocks.2.attentions.1.proj_out.weight") {
                    const std::vector<index_t> dims{info.dims.numel()};
                    w.add_bytes(name, info.type, dynamicid::shape(dims), bytes);
                    return;
                }
                w.add_bytes(name, info.type, info.dims, bytes);
            });
    const auto ckpt = io::sd_checkpoint::open(sd);
    const auto msg = error_of([&] { modules::unet::unet_2d_condition<cpu_backend>::load(ctx, ckpt.unet_weights(), ckpt.unet); });
    INFO(msg);
    CHECK(msg.find("3 weight problems") != std::string::npos);
    CHECK(msg.find("missing 'mid_block.resnets.0.conv1.bias'") != std::string::npos);
    CHECK(msg.find("'conv_in.weight' has shape") != std::string::npos);
    CHECK(msg.find("'up_blocks.2.attentions.1.proj_out.weight' has shape") != std::string::npos);

    // The same through the single file's LDM names: problems name the diffusers keys.
    const auto single = s.path / "single.safetensors";
    rewrite(single_path, single, [](const std::string& name, const io::tensor_info& info, std::span<const std::byte> bytes, io::safetensors_writer& w) {
        if (name == "model.diffusion_model.output_blocks.5.2.conv.weight") return;  // up_blocks.1's upsampler
        if (name == "first_stage_model.decoder.mid.attn_1.v.weight") {
            w.add_bytes(name, info.type, dynamicid::shape{info.dims[0], info.dims[1] / 2, 2, 1}, bytes);
            return;
        }
        w.add_bytes(name, info.type, info.dims, bytes);
    });
    const auto broken = io::sd_checkpoint::open(single, {.config_folder = folder_dir});
    const auto unet_msg = error_of([&] { modules::unet::unet_2d_condition<cpu_backend>::load(ctx, broken.unet_weights(), broken.unet); });
    CHECK(unet_msg.find("missing 'up_blocks.1.upsamplers.0.conv.weight'") != std::string::npos);
    const auto vae_msg = error_of([&] { modules::vae::autoencoder_kl<cpu_backend>::load(ctx, broken.vae_weights(), broken.vae); });
    CHECK(vae_msg.find("'decoder.mid_block.attentions.0.to_v.weight' has shape") != std::string::npos);
}

TEST_CASE("checkpoint: with_reshaped binds a 1x1 convolution as a linear weight", "[checkpoint][io]") {
    cpu_backend::context ctx;
    io::safetensors_writer w;
    const std::vector<float> conv{1, 2, 3, 4, 5, 6};
    w.add("proj.weight", {3, 2, 1, 1}, conv).add("other", {2}, std::vector<float>{7, 8});
    const auto bytes = w.to_bytes();
    const auto source = modules::weight_source(
        {std::make_shared<const io::safetensors_file>(io::safetensors_file::from_memory(bytes))},
        [](std::string_view k) { return "m." == k.substr(0, 2) ? std::string(k.substr(2)) : std::string(k); });
    const auto reshaped = io::with_reshaped(source, {{"m.proj.weight", {3, 2}}, {"m.absent", {1}}, {"m.other", {3}}});
    modules::weight_binder<cpu_backend, float> b(ctx, reshaped);
    CHECK(b.tensor("m.proj.weight", {3, 2}).to_host(ctx) == conv);
    CHECK(b.tensor("m.other", {2}).to_host(ctx) == std::vector<float>{7, 8});
    b.tensor("m.absent", {1});
    REQUIRE(b.problems().size() == 1);
    CHECK(b.problems().front() == "missing 'm.absent'");
}

TEST_CASE("checkpoint: a folder with pre-0.14 VAE attention names loads", "[checkpoint][io]") {
    cpu_backend::context ctx;
    scratch s;
    const auto sd = s.copy_folder();
    rewrite(folder_dir / "vae" / "diffusion_pytorch_model.safetensors", sd / "vae" / "diffusion_pytorch_model.safetensors",
            [](std::string name, const io::tensor_info& info, std::span<const std::byte> bytes, io::safetensors_writer& w) {
                for (const auto& [now, old] : {std::pair{".to_q.", ".query."}, std::pair{".to_k.", ".key."}, std::pair{".to_v.", ".value."},
                                               std::pair{".to_out.0.", ".proj_attn."}})
                    if (const auto at = name.find(now); at != std::string::npos) name.replace(at, std::string(now).size(), old);
                w.add_bytes(name, info.type, info.dims, bytes);
            });
    const auto legacy = io::sd_checkpoint::open(sd);
    const auto reference = io::sd_checkpoint::open(folder_dir);
    CHECK(legacy.vae_weights().contains("decoder.mid_block.attentions.0.to_out.0.weight"));
    using vae_t = modules::vae::autoencoder_kl<cpu_backend>;
    CHECK(vae_out(ctx, vae_t::load(ctx, legacy.vae_weights(), legacy.vae)) ==
          vae_out(ctx, vae_t::load(ctx, reference.vae_weights(), reference.vae)));
}

TEST_CASE("checkpoint: the e2e reference's prompt ids and embeddings match the folder's tokenizer and text encoder", "[checkpoint][io]") {
    cpu_backend::context ctx;
    const auto ref = io::safetensors_file::open(tiny_dir / "e2e_reference.safetensors");
    const auto ckpt = io::sd_checkpoint::open(tiny_dir / "single_file.safetensors", {.config_folder = folder_dir});
    const auto tok = dynamicid::text::clip_tokenizer::from_folder(*ckpt.tokenizer_folder);
    const auto ids = tok.encode("a photo of a person");
    CHECK(ids == ref.to_vector<std::int64_t>("input.prompt_ids"));
    CHECK(tok.encode("") == ref.to_vector<std::int64_t>("input.negative_ids"));
    const auto model = modules::clip::text_model<cpu_backend>::load(ctx, ckpt.text_encoder_weights(), ckpt.text_encoder);
    const auto got = model.forward(ctx, ids, 1).last_hidden_state.to_host(ctx);
    const auto want = ref.to_vector<float>("output.prompt_embeds");
    REQUIRE(got.size() == want.size());
    float worst = 0.0f;
    for (std::size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]));
    CHECK(worst < 1e-4f);
}
