// The MAC counter: SD1.5's published-size figures, the module tree, and
// counts that follow from the shapes by hand.
#include <dynamicid/analysis/flops.hpp>

#include <catch2/catch.hpp>

#include <cstdint>

namespace {

namespace analysis = dynamicid::analysis;
namespace modules = dynamicid::modules;

double gmac(const analysis::mac_node& n) { return static_cast<double>(n.total()) / 1e9; }

}  // namespace

TEST_CASE("flops: SD1.5 UNet, VAE decoder and text encoder MACs", "[flops]") {
    // One UNet evaluation, 64x64 latents, 77 tokens, batch 1.
    const auto unet = analysis::unet_macs(modules::unet::unet_config{}, {.batch = 1, .height = 64, .width = 64, .tokens = 77});
    CHECK(gmac(unet) == Approx(401.6).epsilon(0.01));
    // The VAE decoder to 512x512.
    const auto vae = analysis::vae_decoder_macs(modules::vae::autoencoder_kl_config{}, {.batch = 1, .height = 64, .width = 64});
    CHECK(gmac(vae) == Approx(1257.0).epsilon(0.01));
    // CLIP ViT-L/14's text tower, 77 tokens.
    const modules::clip::encoder_config clip_l{.hidden_size = 768, .intermediate_size = 3072, .num_attention_heads = 12,
                                               .num_hidden_layers = 12};
    const auto text = analysis::text_encoder_macs(clip_l, {.batch = 1, .tokens = 77});
    CHECK(gmac(text) == Approx(6.65).epsilon(0.01));
}

TEST_CASE("flops: counts scale with batch and the tree mirrors the module names", "[flops]") {
    const modules::unet::unet_config cfg{};
    const auto one = analysis::unet_macs(cfg, {.batch = 1});
    const auto two = analysis::unet_macs(cfg, {.batch = 2});
    CHECK(two.total() == 2 * one.total());

    // The first down block's first transformer at 64x64 with 320 channels, 8 heads, 77 tokens.
    const auto* t = one.find("down_blocks.0.attentions.0");
    REQUIRE(t != nullptr);
    CHECK(t->kind == "transformer_2d");
    const std::uint64_t hw = 64 * 64, c = 320, l = 77, x = 768;
    const std::uint64_t expected = hw * c * c * 2             // proj_in, proj_out (1x1 convolutions)
                                   + hw * c * c * 4 + hw * hw * c * 2      // attn1: q, k, v, out; q k^T and p v
                                   + hw * c * c * 2 + l * x * c * 2 + hw * l * c * 2  // attn2
                                   + hw * c * 8 * c + hw * 4 * c * c;      // GEGLU feed-forward
    CHECK(t->total() == expected);
    const auto* conv = one.find("down_blocks.0.resnets.0.conv1");
    REQUIRE(conv != nullptr);
    CHECK(conv->kind == "conv2d");
    CHECK(conv->total() == hw * 320 * 320 * 9);
    CHECK(one.find("up_blocks.3.resnets.2.conv_shortcut") != nullptr);  // 640 -> 320 (skip from conv_in)
    CHECK(one.find("down_blocks.3.downsamplers.0.conv") == nullptr);     // the last level does not downsample
    CHECK(one.find("no.such.module") == nullptr);
    CHECK(one.total_of_kind("conv2d") + one.total_of_kind("linear") + one.total_of_kind("attention") == one.total());

    // 256x256 images: a quarter of the convolutions, a sixteenth of the self-attention scores.
    const auto small = analysis::unet_macs(cfg, {.batch = 1, .height = 32, .width = 32});
    CHECK(small.find("down_blocks.0.resnets.0.conv1")->total() * 4 == conv->total());
}

TEST_CASE("flops: the text encoder layer by hand, whole generations add up", "[flops]") {
    const modules::clip::encoder_config c{.hidden_size = 16, .intermediate_size = 32, .num_attention_heads = 2, .num_hidden_layers = 2};
    const auto t = analysis::text_encoder_macs(c, {.batch = 3, .tokens = 5});
    const std::uint64_t rows = 15;
    const std::uint64_t layer = rows * 16 * 16 * 4 + 3 * 5 * 5 * 16 * 2 + rows * 16 * 32 * 2;
    CHECK(t.total() == 2 * layer);
    CHECK(t.find("encoder.layers.1.mlp.fc2")->total() == rows * 32 * 16);

    const auto run = analysis::text_to_image_macs(modules::clip::encoder_config{}, modules::unet::unet_config{},
                                                  modules::vae::autoencoder_kl_config{}, {.images = 1, .steps = 50});
    const auto unet2 = analysis::unet_macs(modules::unet::unet_config{}, {.batch = 2});
    const auto text2 = analysis::text_encoder_macs(modules::clip::encoder_config{}, {.batch = 2, .tokens = 77});
    const auto vae = analysis::vae_decoder_macs(modules::vae::autoencoder_kl_config{}, {});
    CHECK(run.total() == 50 * unet2.total() + text2.total() + vae.total());

    CHECK_THROWS_AS(analysis::unet_macs(modules::unet::unet_config{}, {.height = 60}), dynamicid::value_error);
    // The encoder of a 512x512 image.
    const auto enc = analysis::vae_encoder_macs(modules::vae::autoencoder_kl_config{}, {.batch = 1, .height = 512, .width = 512});
    CHECK(enc.find("encoder.mid_block.attentions.0") != nullptr);
    CHECK(gmac(enc) > 500.0);
}
