// dynamicid modules: reading image files (PNG, JPEG, BMP, PPM, ...) into
// image_u8 with stb_image.
//
// Needs stb_image's implementation at link time: link Debian's libstb
// (`stb`), or compile it into one translation unit of the program with
// `#define STB_IMAGE_IMPLEMENTATION` before `#include <stb/stb_image.h>`.
// Grey images are repeated into RGB and alpha is dropped, as PIL's
// convert("RGB") (transformers' load_image) does.
//
//     auto img = dynamicid::modules::clip::load_image("face.jpg");    // throws "[image] ..." on bad files
//     auto pixels = dynamicid::modules::clip::image_processor{}.preprocess<B>(ctx, img);
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/modules/clip/image_processor.hpp>

#include <stb/stb_image.h>

#include <climits>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace dynamicid::modules::clip {

/// Decodes an encoded image held in memory; io_error("[image] ...") when stb cannot.
inline image_u8 decode_image(std::span<const std::uint8_t> bytes, const std::string& label = "image data") {
    check<io_error>(!bytes.empty(), "image", label, ": empty");
    check<io_error>(bytes.size() <= static_cast<std::size_t>(INT_MAX), "image", label, ": too large to decode");
    int width = 0, height = 0, channels = 0;
    std::unique_ptr<stbi_uc, void (*)(void*)> data(
        stbi_load_from_memory(bytes.data(), static_cast<int>(bytes.size()), &width, &height, &channels, 3), stbi_image_free);
    if (!data) {
        const char* reason = stbi_failure_reason();
        throw io_error("image", label + ": cannot decode (" + (reason ? reason : "unknown reason") + ")");
    }
    check<io_error>(width > 0 && height > 0, "image", label, ": empty image");
    return image_u8::from_rgb(data.get(), height, width, 3);
}

/// Reads and decodes an image file; io_error("[image] ...") for a missing,
/// unreadable or undecodable file.
inline image_u8 load_image(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    check<io_error>(static_cast<bool>(in), "image", "cannot open '", path.string(), "'");
    std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    check<io_error>(!in.bad(), "image", "cannot read '", path.string(), "'");
    return decode_image(bytes, "'" + path.string() + "'");
}

}  // namespace dynamicid::modules::clip
