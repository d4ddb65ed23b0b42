// dynamicid face: reading photos (JPEG, PNG, ... through stb_image) upright.
//
// Grey and RGBA images become RGB (alpha dropped). A JPEG's EXIF orientation
// tag (0x0112) is applied, as phone photos need. stb_image's implementation
// must be linked (see modules/clip/image_file.hpp).
//
//     auto photo = dynamicid::face::load_photo("me.jpg");   // io_error "[image] ..." on bad files
#pragma once

#include <dynamicid/modules/clip/image_file.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <vector>

namespace dynamicid::face {

using image_u8 = modules::clip::image_u8;  // the same type as in geometry.hpp

/// The EXIF orientation (1..8) of a JPEG, 1 when absent or unreadable.
inline int exif_orientation(std::span<const std::uint8_t> b) {
    if (b.size() < 4 || b[0] != 0xFF || b[1] != 0xD8) return 1;
    std::size_t p = 2;
    while (p + 4 <= b.size()) {
        if (b[p] != 0xFF) return 1;
        const std::uint8_t marker = b[p + 1];
        if (marker == 0xDA || marker == 0xD9) return 1;  // image data starts: no EXIF before it
        const std::size_t len = static_cast<std::size_t>(b[p + 2]) << 8 | b[p + 3];
        if (len < 2 || p + 2 + len > b.size()) return 1;
        const std::size_t seg = p + 4, seg_end = p + 2 + len;
        if (marker == 0xE1 && seg + 14 <= seg_end && std::equal(b.begin() + static_cast<std::ptrdiff_t>(seg), b.begin() + static_cast<std::ptrdiff_t>(seg) + 6,
                                                                 "Exif\0\0")) {
            const std::size_t t = seg + 6;  // TIFF header
            const bool le = b[t] == 'I' && b[t + 1] == 'I';
            if (!le && !(b[t] == 'M' && b[t + 1] == 'M')) return 1;
            auto u16 = [&](std::size_t at) -> std::uint32_t {
                if (at + 2 > seg_end) return 0;
                return le ? (b[at] | b[at + 1] << 8) : (b[at] << 8 | b[at + 1]);
            };
            auto u32 = [&](std::size_t at) -> std::uint32_t {
                if (at + 4 > seg_end) return 0;
                return le ? (b[at] | b[at + 1] << 8 | b[at + 2] << 16 | static_cast<std::uint32_t>(b[at + 3]) << 24)
                          : (static_cast<std::uint32_t>(b[at]) << 24 | b[at + 1] << 16 | b[at + 2] << 8 | b[at + 3]);
            };
            const std::size_t ifd = t + u32(t + 4);
            if (ifd + 2 > seg_end || ifd < t) return 1;
            const std::uint32_t entries = u16(ifd);
            for (std::uint32_t e = 0; e < entries; ++e) {
                const std::size_t at = ifd + 2 + 12 * e;
                if (at + 12 > seg_end) return 1;
                if (u16(at) == 0x0112) {
                    const auto v = static_cast<int>(u16(at + 8));
                    return v >= 1 && v <= 8 ? v : 1;
                }
            }
            return 1;
        }
        p = seg_end;
    }
    return 1;
}

/// Turns an image stored with EXIF orientation `o` upright.
inline image_u8 apply_orientation(const image_u8& img, int o) {
    if (o <= 1 || o > 8) return img;
    const bool swap = o >= 5;
    const index_t W = swap ? img.height : img.width, H = swap ? img.width : img.height;
    image_u8 out{H, W, std::vector<std::uint8_t>(img.pixels.size())};
    for (index_t y = 0; y < H; ++y)
        for (index_t x = 0; x < W; ++x) {
            index_t sx = 0, sy = 0;  // source pixel shown at (x, y)
            switch (o) {
                case 2: sx = img.width - 1 - x; sy = y; break;
                case 3: sx = img.width - 1 - x; sy = img.height - 1 - y; break;
                case 4: sx = x; sy = img.height - 1 - y; break;
                case 5: sx = y; sy = x; break;
                case 6: sx = y; sy = img.height - 1 - x; break;
                case 7: sx = img.width - 1 - y; sy = img.height - 1 - x; break;
                case 8: sx = img.width - 1 - y; sy = x; break;
                default: break;
            }
            for (int c = 0; c < 3; ++c)
                out.pixels[static_cast<std::size_t>((y * W + x) * 3 + c)] = img.pixels[static_cast<std::size_t>((sy * img.width + sx) * 3 + c)];
        }
    return out;
}

/// 'path' for messages (built with append: GCC 12 warns falsely on "'" + string).
inline std::string quoted(const std::filesystem::path& path) {
    std::string out(1, '\'');
    out.append(path.string()).push_back('\'');
    return out;
}

/// Decodes a photo held in memory, upright, as RGB.
inline image_u8 decode_photo(std::span<const std::uint8_t> bytes, const std::string& label = "image data") {
    return apply_orientation(modules::clip::decode_image(bytes, label), exif_orientation(bytes));
}

/// Reads a photo file, upright, as RGB; io_error naming the file when it cannot.
inline image_u8 load_photo(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    check<io_error>(static_cast<bool>(in), "image", "cannot open '", path.string(), "'");
    std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    check<io_error>(!in.bad(), "image", "cannot read '", path.string(), "'");
    return decode_photo(bytes, quoted(path));
}

}  // namespace dynamicid::face
