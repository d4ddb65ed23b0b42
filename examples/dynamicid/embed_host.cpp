// Embedding DynamicID in a host program that owns its pixel buffers: the
// reference image comes from the host's own RGBA frame (here filled from a
// file to keep the example runnable), the ArcFace embedding from the host's
// memory, and the generated image is written into the host's preallocated
// BGRA framebuffer. A worker thread generates while the host can cancel.
//
//   dynamicid_embed_host --sd models/sd15 --saa SAA.bin --clip models/clip-vit-h-14
//       --arcface alice.safetensors --reference alice.png --prompt "an astronaut portrait" --output host.png
#include "common.hpp"

#include <atomic>
#include <cstring>
#include <thread>

namespace {

/// What a host application might own: a BGRA framebuffer with a row pitch.
struct host_framebuffer {
    int width = 0, height = 0, pitch = 0;  // pitch in bytes, >= 4 * width
    std::vector<std::uint8_t> bgra;
};

}  // namespace

int main(int argc, char** argv) {
    return example::run([&] {
        const example::args a(argc, argv);
        example::backend::context ctx{.threads = std::stoi(a.get("threads", "0"))};
        const auto pipe = example::load_pipeline(ctx, a);

        // The host's RGBA reference frame (with padding per row) ...
        const auto file = dynamicid::modules::clip::load_image(a.need("reference"));
        const int w = static_cast<int>(file.width), h = static_cast<int>(file.height), pitch = 4 * w + 16;
        std::vector<std::uint8_t> host_rgba(static_cast<std::size_t>(pitch * h));
        for (int y = 0; y < h; ++y)
            for (int x = 0; x < w; ++x)
                for (int ch = 0; ch < 4; ++ch)
                    host_rgba[static_cast<std::size_t>(y * pitch + 4 * x + ch)] =
                        ch == 3 ? 255 : file.pixels[static_cast<std::size_t>((y * w + x) * 3 + ch)];
        // ... handed to the library as tightly packed RGB.
        std::vector<std::uint8_t> rgb(static_cast<std::size_t>(w * h * 3));
        for (int y = 0; y < h; ++y)
            for (int x = 0; x < w; ++x) std::memcpy(&rgb[static_cast<std::size_t>((y * w + x) * 3)], &host_rgba[static_cast<std::size_t>(y * pitch + 4 * x)], 3);

        dynamicid::pipelines::dynamicid_identity who;
        who.reference = dynamicid::modules::clip::image_u8::from_rgb(rgb.data(), h, w);
        who.arcface = dynamicid::pipelines::load_arcface(a.need("arcface"));  // or copied from the host's face recogniser

        auto o = example::options(a);
        host_framebuffer fb{static_cast<int>(o.width), static_cast<int>(o.height), static_cast<int>(o.width) * 4 + 64, {}};
        fb.bgra.assign(static_cast<std::size_t>(fb.pitch * fb.height), 0);

        std::atomic<bool> cancel{false};
        std::exception_ptr failure;
        std::thread worker([&] {
            try {
                example::backend::context worker_ctx{.threads = ctx.threads};
                dynamicid::pipelines::dynamicid_controls<example::backend> c;
                c.cancel = &cancel;
                c.on_progress = example::progress;
                const auto out = pipe.generate(worker_ctx, o, {who}, c);
                // Into the host's framebuffer: RGB -> BGRA with the host's pitch.
                for (int y = 0; y < fb.height; ++y)
                    for (int x = 0; x < fb.width; ++x) {
                        const auto* s = &out.rgb[static_cast<std::size_t>((y * fb.width + x) * 3)];
                        auto* d = &fb.bgra[static_cast<std::size_t>(y * fb.pitch + 4 * x)];
                        d[0] = s[2], d[1] = s[1], d[2] = s[0], d[3] = 255;
                    }
            } catch (...) {
                failure = std::current_exception();
            }
        });
        worker.join();  // a host would keep its event loop running and set `cancel` to stop early
        if (failure) std::rethrow_exception(failure);

        // Show what the host holds (back to RGB for the PNG).
        std::vector<std::uint8_t> shown(static_cast<std::size_t>(fb.width * fb.height * 3));
        for (int y = 0; y < fb.height; ++y)
            for (int x = 0; x < fb.width; ++x) {
                const auto* s = &fb.bgra[static_cast<std::size_t>(y * fb.pitch + 4 * x)];
                auto* d = &shown[static_cast<std::size_t>((y * fb.width + x) * 3)];
                d[0] = s[2], d[1] = s[1], d[2] = s[0];
            }
        example::write_png(a.get("output", "host.png"), shown.data(), fb.width, fb.height);
    });
}
