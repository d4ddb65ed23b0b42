// dynamicid CLI: PNG files with text chunks.
//
// stb_image_write encodes the pixels but writes no text chunks, so the PNG is
// encoded to memory and the chunks are inserted right after IHDR (where the
// PNG spec allows them), each with its CRC-32 (zlib's crc32, which is the
// PNG polynomial). Latin-1-safe (here: ASCII) text goes in tEXt; text with
// other bytes in iTXt, whose text is UTF-8 by definition.
//
//     auto png = encode_png_rgb(rgb, 512, 512);
//     png = with_text_chunks(std::move(png), {{"parameters", "a photo of a cat\nSteps: 30, Seed: 1"}});
#pragma once

#include <stb/stb_image_write.h>
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid_cli {

/// RGB bytes (height x width x 3) -> PNG file bytes.
inline std::vector<std::uint8_t> encode_png_rgb(const std::uint8_t* rgb, int width, int height) {
    std::vector<std::uint8_t> out;
    const auto append = [](void* context, void* data, int size) {
        auto* v = static_cast<std::vector<std::uint8_t>*>(context);
        const auto* bytes = static_cast<const std::uint8_t*>(data);
        v->insert(v->end(), bytes, bytes + size);
    };
    if (!stbi_write_png_to_func(append, &out, width, height, 3, rgb, width * 3) || out.size() < 33)
        throw std::runtime_error("PNG encoding failed");
    return out;
}

namespace detail {

inline void put_u32_be(std::uint8_t* p, std::uint32_t x) {
    p[0] = static_cast<std::uint8_t>(x >> 24);
    p[1] = static_cast<std::uint8_t>(x >> 16);
    p[2] = static_cast<std::uint8_t>(x >> 8);
    p[3] = static_cast<std::uint8_t>(x);
}

/// One chunk: length, type, data, CRC-32 over type and data.
inline std::vector<std::uint8_t> make_chunk(const char (&type)[5], const std::vector<std::uint8_t>& data) {
    // Sized up front and filled by index (GCC 12 misreads vector::insert of a
    // string literal as an overflow).
    std::vector<std::uint8_t> chunk(12 + data.size());
    put_u32_be(chunk.data(), static_cast<std::uint32_t>(data.size()));
    for (std::size_t i = 0; i < 4; ++i) chunk[4 + i] = static_cast<std::uint8_t>(type[i]);
    if (!data.empty()) std::memcpy(chunk.data() + 8, data.data(), data.size());
    uLong crc = crc32(0L, Z_NULL, 0);
    crc = crc32(crc, chunk.data() + 4, static_cast<uInt>(4 + data.size()));
    put_u32_be(chunk.data() + 8 + data.size(), static_cast<std::uint32_t>(crc));
    return chunk;
}

inline bool is_ascii(const std::string& s) {
    return std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80 && c != '\0'; });
}

}  // namespace detail

/// `png` with a text chunk per (keyword, text) inserted after IHDR. Keywords
/// are 1-79 printable Latin-1 characters (the spec's rule).
inline std::vector<std::uint8_t> with_text_chunks(std::vector<std::uint8_t> png,
                                                  const std::vector<std::pair<std::string, std::string>>& entries) {
    static const std::uint8_t signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (png.size() < 33 || std::memcmp(png.data(), signature, 8) != 0 || std::memcmp(png.data() + 12, "IHDR", 4) != 0)
        throw std::runtime_error("not a PNG starting with IHDR");
    const std::size_t ihdr_length = (std::size_t{png[8]} << 24) | (std::size_t{png[9]} << 16) | (std::size_t{png[10]} << 8) | png[11];
    const std::size_t insert_at = 8 + 12 + ihdr_length;
    std::vector<std::uint8_t> chunks;
    for (const auto& [keyword, text] : entries) {
        if (keyword.empty() || keyword.size() > 79 || !detail::is_ascii(keyword)) throw std::runtime_error("bad PNG text keyword");
        std::vector<std::uint8_t> data(keyword.begin(), keyword.end());
        data.push_back(0);
        std::vector<std::uint8_t> chunk;
        if (detail::is_ascii(text)) {
            data.insert(data.end(), text.begin(), text.end());
            chunk = detail::make_chunk("tEXt", data);
        } else {
            // iTXt: uncompressed, no language tag, no translated keyword, UTF-8 text.
            data.resize(data.size() + 4, 0);
            data.insert(data.end(), text.begin(), text.end());
            chunk = detail::make_chunk("iTXt", data);
        }
        chunks.insert(chunks.end(), chunk.begin(), chunk.end());
    }
    png.insert(png.begin() + static_cast<std::ptrdiff_t>(insert_at), chunks.begin(), chunks.end());
    return png;
}

}  // namespace dynamicid_cli
