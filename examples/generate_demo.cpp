// generate_demo: the pieces of the generation pipeline that exist today, run
// end to end on the reference CPU backend.
//
// A seeded Philox latent (4 x 16 x 16, the shape of an SD1.5 latent at
// 128 x 128) goes through a tiny convolutional decoder with random weights:
// conv -> group norm -> SiLU -> self-attention over spatial tokens ->
// nearest upsampling x3 -> conv to RGB. The picture is noise shaped by those
// layers; it stands in for the SD1.5 + DynamicID pipeline and the built-in
// default model until they land.
//
//     generate_demo [--output out/demo.png] [--seed 42] [--threads 0]
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/dynamicid.hpp>

#include <stb/stb_image_write.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace {

namespace ops = dynamicid::ops;
using backend = dynamicid::cpu_backend;
using tensor = dynamicid::tensor<backend, float>;
using context = backend::context;
using dynamicid::index_t;

/// Called after each stage: (stage number, stage count, stage name).
using progress_callback = std::function<void(int, int, std::string_view)>;

struct options {
    std::string output = "out/demo.png";
    std::uint64_t seed = 42;
    int threads = 0;
};

/// Random weights: N(0, 1) scaled by gain / sqrt(fan_in). Each tensor draws
/// from its own Philox offset so the weights do not depend on creation order.
class weight_factory {
public:
    weight_factory(context& ctx, std::uint64_t seed) : ctx_(ctx), seed_(seed) {}

    tensor make(const dynamicid::shape& s, index_t fan_in, double gain = 1.0) {
        auto w = ops::randn<backend, float>(ctx_, s, seed_, offset_);
        offset_ += static_cast<std::uint64_t>(s.numel());
        return ops::scale(ctx_, w, gain / std::sqrt(static_cast<double>(fan_in)));
    }

    tensor conv(index_t out, index_t in, index_t k, double gain = 1.0) { return make({out, in, k, k}, in * k * k, gain); }
    tensor bias(index_t n) { return make({n}, 1, 0.1); }
    tensor linear(index_t out, index_t in) { return make({out, in}, in); }
    tensor ones(index_t n) { return tensor::full(ctx_, {n}, 1.0f); }
    tensor zeros(index_t n) { return tensor::zeros(ctx_, {n}); }

private:
    context& ctx_;
    std::uint64_t seed_;
    std::uint64_t offset_ = 1u << 20;  // the latent uses offsets [0, 1024)
};

/// GroupNorm + SiLU + 3x3 conv, the decoder's basic unit.
struct conv_block {
    tensor gamma, beta, weight, bias;

    conv_block(weight_factory& w, index_t in, index_t out)
        : gamma(w.ones(in)), beta(w.zeros(in)), weight(w.conv(out, in, 3, 1.4)), bias(w.bias(out)) {}

    tensor operator()(context& ctx, const tensor& x) const {
        auto h = ops::group_norm(ctx, x, 8, &gamma, &beta);
        h = ops::silu(ctx, h);
        return ops::conv2d(ctx, h, weight, &bias, {.padding = 1});
    }
};

/// Single-head self-attention over the H*W positions, with a residual.
struct spatial_attention {
    tensor gamma, beta, wq, wk, wv, wo;

    spatial_attention(weight_factory& w, index_t c)
        : gamma(w.ones(c)), beta(w.zeros(c)), wq(w.linear(c, c)), wk(w.linear(c, c)), wv(w.linear(c, c)), wo(w.linear(c, c)) {}

    tensor operator()(context& ctx, const tensor& x) const {
        const index_t n = x.dim(0), c = x.dim(1), h = x.dim(2), w = x.dim(3);
        auto normed = ops::group_norm(ctx, x, 8, &gamma, &beta);
        // (N, C, H, W) -> (N, H*W, C): one token per position.
        auto tokens = ops::permute(ctx, normed.reshape({n, c, h * w}), {0, 2, 1});
        auto attended = ops::attention(ctx, ops::linear(ctx, tokens, wq), ops::linear(ctx, tokens, wk), ops::linear(ctx, tokens, wv));
        auto projected = ops::linear(ctx, attended, wo);
        auto back = ops::permute(ctx, projected, {0, 2, 1}).reshape({n, c, h, w});
        return ops::add(ctx, x, back);
    }
};

/// The tiny decoder: latent (1, 4, 16, 16) -> RGB in roughly [-1, 1], (1, 3, 128, 128).
class tiny_decoder {
public:
    static constexpr index_t channels = 32;
    static constexpr int stages = 9;

    tiny_decoder(weight_factory& w)
        : conv_in_(w.conv(channels, 4, 3)), conv_in_bias_(w.bias(channels)), mid_(w, channels, channels), attention_(w, channels),
          up1_(w, channels, channels), up2_(w, channels, channels), up3_(w, channels, channels), out_gamma_(w.ones(channels)),
          out_beta_(w.zeros(channels)), conv_out_(w.conv(3, channels, 3, 2.0)), conv_out_bias_(w.zeros(3)) {}

    tensor operator()(context& ctx, const tensor& latent, const progress_callback& progress) const {
        int stage = 0;
        auto step = [&](std::string_view name) {
            if (progress) progress(++stage, stages, name);
        };
        auto h = ops::conv2d(ctx, latent, conv_in_, &conv_in_bias_, {.padding = 1});
        step("conv_in 4 -> 32 channels, 16x16");
        h = mid_(ctx, h);
        step("group_norm + silu + conv");
        h = attention_(ctx, h);
        step("self-attention over 256 spatial tokens");
        h = up1_(ctx, ops::upsample_nearest(ctx, h));
        step("upsample to 32x32 + conv block");
        h = up2_(ctx, ops::upsample_nearest(ctx, h));
        step("upsample to 64x64 + conv block");
        h = up3_(ctx, ops::upsample_nearest(ctx, h));
        step("upsample to 128x128 + conv block");
        h = ops::silu(ctx, ops::group_norm(ctx, h, 8, &out_gamma_, &out_beta_));
        step("group_norm + silu");
        h = ops::conv2d(ctx, h, conv_out_, &conv_out_bias_, {.padding = 1});
        step("conv_out 32 -> 3 channels");
        h = ops::unary(ctx, dynamicid::unary_op::tanh, h);
        step("tanh to [-1, 1]");
        return h;
    }

private:
    tensor conv_in_, conv_in_bias_;
    conv_block mid_;
    spatial_attention attention_;
    conv_block up1_, up2_, up3_;
    tensor out_gamma_, out_beta_, conv_out_, conv_out_bias_;
};

/// (1, 3, H, W) in [-1, 1] -> interleaved 8-bit RGB. Each channel is
/// stretched to its own range so the random picture uses the full scale.
std::vector<unsigned char> to_rgb8(const std::vector<float>& planar, index_t h, index_t w) {
    const auto plane = static_cast<std::size_t>(h * w);
    std::vector<unsigned char> rgb(plane * 3);
    for (std::size_t c = 0; c < 3; ++c) {
        const auto first = planar.begin() + static_cast<std::ptrdiff_t>(c * plane);
        const auto [lo, hi] = std::minmax_element(first, first + static_cast<std::ptrdiff_t>(plane));
        const float range = std::max(*hi - *lo, 1e-6f);
        for (std::size_t i = 0; i < plane; ++i) {
            const float v = (planar[c * plane + i] - *lo) / range;
            rgb[i * 3 + c] = static_cast<unsigned char>(std::lround(std::clamp(v, 0.0f, 1.0f) * 255.0f));
        }
    }
    return rgb;
}

bool parse(int argc, char** argv, options& o) {
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg = argv[i];
        const bool has_value = i + 1 < argc;
        if (arg == "--output" && has_value) {
            o.output = argv[++i];
        } else if (arg == "--seed" && has_value) {
            o.seed = std::strtoull(argv[++i], nullptr, 10);
        } else if (arg == "--threads" && has_value) {
            o.threads = std::atoi(argv[++i]);
        } else {
            std::fprintf(stderr, "usage: %s [--output out/demo.png] [--seed 42] [--threads 0]\n", argv[0]);
            return false;
        }
    }
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    options opt;
    if (!parse(argc, argv, opt)) return 2;

    try {
        const auto start = std::chrono::steady_clock::now();
        context ctx{.threads = opt.threads};
        std::printf("dynamicid %s generate_demo (placeholder decoder, random weights), backend %s, %d threads, seed %llu\n",
                    dynamicid::version.string, backend::name(), ctx.thread_count(), static_cast<unsigned long long>(opt.seed));

        weight_factory weights(ctx, opt.seed);
        const tiny_decoder decoder(weights);
        const auto latent = ops::randn<backend, float>(ctx, {1, 4, 16, 16}, opt.seed);

        const auto image = decoder(ctx, latent, [](int stage, int total, std::string_view name) {
            std::printf("  [%d/%d] %.*s\n", stage, total, static_cast<int>(name.size()), name.data());
            std::fflush(stdout);
        });

        const index_t h = image.dim(2), w = image.dim(3);
        const auto rgb = to_rgb8(image.to_host(ctx), h, w);

        const std::filesystem::path path(opt.output);
        if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
        if (!stbi_write_png(path.c_str(), static_cast<int>(w), static_cast<int>(h), 3, rgb.data(), static_cast<int>(w * 3))) {
            std::fprintf(stderr, "could not write %s\n", path.c_str());
            return 1;
        }
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::printf("wrote %s (%lldx%lld RGB) in %.2f s\n", path.c_str(), static_cast<long long>(w), static_cast<long long>(h),
                    seconds);
        return 0;
    } catch (const dynamicid::error& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
