// dynamicid io (internal): a minimal, read-only ZIP archive reader.
//
// Enough of the format for PyTorch checkpoints (torch.save writes a ZIP whose
// entries are stored, i.e. uncompressed, and aligned so tensors can be mapped
// in place) and for archives re-packed by other tools (deflate, ZIP64). Every
// offset and size in the file is treated as hostile: the end-of-central-
// directory record, the central directory, each local header and each entry's
// data are bounds-checked against the buffer before they are read, and
// nothing is allocated in proportion to a size the file merely claims
// (deflated entries are capped both absolutely and by the deflate ratio).
//
//     auto zip = dynamicid::io::detail::zip_archive::parse(bytes, "model.bin");
//     if (const auto* e = zip.find("model/data.pkl")) {
//         auto data = zip.read(*e);   // a view for stored entries, a buffer for deflated ones
//     }
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/io/detail/byte_source.hpp>

#include <zlib.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dynamicid::io::detail {

/// Limits applied while reading an archive.
struct zip_limits {
    /// Central directories with more entries are rejected.
    std::size_t max_entries = 1u << 20;
    /// Largest size a deflated entry may expand to.
    std::uint64_t max_inflated_bytes = std::uint64_t{8} << 30;
};

/// One entry as described by the central directory (sizes already resolved
/// through the ZIP64 extra field where the 32-bit fields overflow).
struct zip_entry {
    std::string name;
    std::uint16_t method = 0;  ///< 0 stored, 8 deflate
    std::uint32_t crc32 = 0;
    std::uint64_t compressed_size = 0;
    std::uint64_t uncompressed_size = 0;
    std::uint64_t local_header_offset = 0;
    std::uint64_t data_offset = 0;  ///< first byte of the (possibly compressed) data
};

/// An entry's contents: a view into the archive for stored entries, or an
/// owned buffer (kept alive by `owner`) for deflated ones.
struct zip_data {
    std::span<const std::byte> bytes;
    std::shared_ptr<const std::vector<std::byte>> owner;
};

/// The CRC-32 (ISO-HDLC, as ZIP uses) of `bytes`.
inline std::uint32_t zip_crc32(std::span<const std::byte> bytes) {
    uLong crc = ::crc32(0L, Z_NULL, 0);
    const auto* p = reinterpret_cast<const Bytef*>(bytes.data());
    std::size_t left = bytes.size();
    constexpr std::size_t chunk = std::size_t{1} << 30;  // zlib's length type is 32-bit
    while (left > 0) {
        const std::size_t n = std::min(left, chunk);
        crc = ::crc32(crc, p, static_cast<uInt>(n));
        p += n;
        left -= n;
    }
    return static_cast<std::uint32_t>(crc);
}

/// A parsed archive over bytes the caller keeps alive.
class zip_archive {
public:
    /// Parses the central directory of `bytes`; io_error (component
    /// `component`, naming `source`) on any inconsistency.
    static zip_archive parse(std::span<const std::byte> bytes, std::string source, const zip_limits& limits = {},
                             std::string_view component = "zip") {
        zip_archive z;
        z.bytes_ = bytes;
        z.source_ = std::move(source);
        z.component_ = std::string(component);
        z.limits_ = limits;
        z.read_directory();
        return z;
    }

    const std::vector<zip_entry>& entries() const noexcept { return entries_; }

    /// The entry called `name`, or nullptr.
    const zip_entry* find(std::string_view name) const {
        const auto it = by_name_.find(name);
        return it == by_name_.end() ? nullptr : &entries_[it->second];
    }

    /// The entry's uncompressed contents. Stored entries are returned in place
    /// (their CRC is checked only when `verify_crc`); deflated entries are
    /// inflated into a new buffer of at most `max_bytes` and always CRC-checked.
    zip_data read(const zip_entry& e, bool verify_crc = false,
                  std::uint64_t max_bytes = std::numeric_limits<std::uint64_t>::max()) const {
        if (e.uncompressed_size > max_bytes)
            fail("entry '" + e.name + "' is " + std::to_string(e.uncompressed_size) + " bytes, more than the limit of " +
                 std::to_string(max_bytes));
        const auto raw = bytes_.subspan(static_cast<std::size_t>(e.data_offset), static_cast<std::size_t>(e.compressed_size));
        zip_data out;
        if (e.method == 0) {
            out.bytes = raw;
        } else {
            out.owner = inflate(e, raw);
            out.bytes = *out.owner;
            verify_crc = true;
        }
        if (verify_crc && zip_crc32(out.bytes) != e.crc32) fail("entry '" + e.name + "' fails its CRC-32 check");
        return out;
    }

    const std::string& source() const noexcept { return source_; }

private:
    static constexpr std::uint32_t local_signature = 0x04034b50;
    static constexpr std::uint32_t central_signature = 0x02014b50;
    static constexpr std::uint32_t eocd_signature = 0x06054b50;
    static constexpr std::uint32_t zip64_eocd_signature = 0x06064b50;
    static constexpr std::uint32_t zip64_locator_signature = 0x07064b50;
    static constexpr std::size_t eocd_size = 22;
    static constexpr std::size_t zip64_locator_size = 20;
    static constexpr std::size_t zip64_eocd_size = 56;
    static constexpr std::size_t central_size = 46;
    static constexpr std::size_t local_size = 30;
    // Deflate cannot expand by more than about 1032:1, so a larger claimed
    // size is a lie that must not drive an allocation.
    static constexpr std::uint64_t max_deflate_ratio = 1032;

    [[noreturn]] void fail(const std::string& message) const { throw io_error(component_, source_ + ": " + message); }

    template <class U>
    U at(std::uint64_t offset) const {
        if (offset > bytes_.size() || bytes_.size() - offset < sizeof(U))
            fail("truncated archive: a " + std::to_string(sizeof(U)) + "-byte field at offset " + std::to_string(offset) +
                 " lies past the end (" + std::to_string(bytes_.size()) + " bytes)");
        return load_le<U>(bytes_.data() + offset);
    }

    bool fits(std::uint64_t offset, std::uint64_t length, std::uint64_t end) const noexcept {
        return offset <= end && length <= end - offset;
    }

    void read_directory() {
        const std::uint64_t size = bytes_.size();
        if (size < eocd_size) fail("file is " + std::to_string(size) + " bytes, too short to be a ZIP archive");

        // The end record sits at the end, followed only by its comment (at most 64 KiB).
        std::optional<std::uint64_t> eocd;
        const std::uint64_t lowest = size - eocd_size > 0xffff ? size - eocd_size - 0xffff : 0;
        for (std::uint64_t pos = size - eocd_size + 1; pos-- > lowest;) {
            if (at<std::uint32_t>(pos) != eocd_signature) continue;
            if (pos + eocd_size + at<std::uint16_t>(pos + 20) == size) {
                eocd = pos;
                break;
            }
        }
        if (!eocd) fail("no end-of-central-directory record: not a ZIP archive, or truncated");

        const std::uint16_t disk = at<std::uint16_t>(*eocd + 4);
        const std::uint16_t cd_disk = at<std::uint16_t>(*eocd + 6);
        std::uint64_t count = at<std::uint16_t>(*eocd + 10);
        std::uint64_t cd_size = at<std::uint32_t>(*eocd + 12);
        std::uint64_t cd_offset = at<std::uint32_t>(*eocd + 16);
        std::uint64_t cd_end_limit = *eocd;

        if (*eocd >= zip64_locator_size && at<std::uint32_t>(*eocd - zip64_locator_size) == zip64_locator_signature) {
            const std::uint64_t locator = *eocd - zip64_locator_size;
            const std::uint64_t record = at<std::uint64_t>(locator + 8);
            if (at<std::uint32_t>(locator + 16) > 1) fail("multi-disk ZIP64 archives are not supported");
            if (!fits(record, zip64_eocd_size, locator)) fail("ZIP64 end record offset " + std::to_string(record) + " is out of range");
            if (at<std::uint32_t>(record) != zip64_eocd_signature) fail("ZIP64 locator does not point at a ZIP64 end record");
            if (at<std::uint32_t>(record + 16) != 0 || at<std::uint32_t>(record + 20) != 0)
                fail("multi-disk ZIP64 archives are not supported");
            count = at<std::uint64_t>(record + 32);
            cd_size = at<std::uint64_t>(record + 40);
            cd_offset = at<std::uint64_t>(record + 48);
            cd_end_limit = record;
        } else if (disk != 0 || cd_disk != 0) {
            fail("multi-disk ZIP archives are not supported");
        }

        if (!fits(cd_offset, cd_size, cd_end_limit))
            fail("central directory [" + std::to_string(cd_offset) + ", +" + std::to_string(cd_size) +
                 ") lies outside the file");
        if (count > limits_.max_entries)
            fail(std::to_string(count) + " entries exceed the limit of " + std::to_string(limits_.max_entries));
        if (count > cd_size / central_size)
            fail("central directory of " + std::to_string(cd_size) + " bytes cannot hold " + std::to_string(count) + " entries");

        entries_.reserve(static_cast<std::size_t>(count));
        std::uint64_t pos = cd_offset;
        const std::uint64_t cd_end = cd_offset + cd_size;
        for (std::uint64_t i = 0; i < count; ++i) {
            if (!fits(pos, central_size, cd_end)) fail("central directory entry " + std::to_string(i) + " is truncated");
            if (at<std::uint32_t>(pos) != central_signature) fail("central directory entry " + std::to_string(i) + " has a bad signature");
            zip_entry e;
            const std::uint16_t flags = at<std::uint16_t>(pos + 8);
            e.method = at<std::uint16_t>(pos + 10);
            e.crc32 = at<std::uint32_t>(pos + 16);
            e.compressed_size = at<std::uint32_t>(pos + 20);
            e.uncompressed_size = at<std::uint32_t>(pos + 24);
            const std::uint16_t name_len = at<std::uint16_t>(pos + 28);
            const std::uint16_t extra_len = at<std::uint16_t>(pos + 30);
            const std::uint16_t comment_len = at<std::uint16_t>(pos + 32);
            const std::uint16_t entry_disk = at<std::uint16_t>(pos + 34);
            e.local_header_offset = at<std::uint32_t>(pos + 42);
            const std::uint64_t variable = std::uint64_t{name_len} + extra_len + comment_len;
            if (!fits(pos + central_size, variable, cd_end)) fail("central directory entry " + std::to_string(i) + " is truncated");
            e.name.assign(reinterpret_cast<const char*>(bytes_.data() + pos + central_size), name_len);
            if (e.name.find('\0') != std::string::npos) fail("entry name contains a NUL byte");
            read_zip64_extra(e, entry_disk, pos + central_size + name_len, extra_len);
            if (flags & 0x1u) fail("entry '" + e.name + "' is encrypted");
            if (e.method != 0 && e.method != 8)
                fail("entry '" + e.name + "' uses compression method " + std::to_string(e.method) + " (only stored and deflate are supported)");
            if (e.method == 0 && e.compressed_size != e.uncompressed_size)
                fail("stored entry '" + e.name + "' claims " + std::to_string(e.compressed_size) + " bytes stored but " +
                     std::to_string(e.uncompressed_size) + " uncompressed");
            locate_data(e);
            if (!by_name_.emplace(e.name, entries_.size()).second) fail("duplicate entry '" + e.name + "'");
            entries_.push_back(std::move(e));
            pos += central_size + variable;
        }
    }

    void read_zip64_extra(zip_entry& e, std::uint16_t disk, std::uint64_t pos, std::uint64_t length) {
        const bool need_u = e.uncompressed_size == 0xffffffffu;
        const bool need_c = e.compressed_size == 0xffffffffu;
        const bool need_o = e.local_header_offset == 0xffffffffu;
        const bool need_d = disk == 0xffffu;
        std::uint32_t disk_number = disk;
        const std::uint64_t end = pos + length;
        bool found = false;
        while (end - pos >= 4) {
            const std::uint16_t id = at<std::uint16_t>(pos);
            const std::uint16_t n = at<std::uint16_t>(pos + 2);
            if (n > end - pos - 4) fail("entry '" + e.name + "' has a truncated extra field");
            if (id == 0x0001) {
                found = true;
                std::uint64_t q = pos + 4;
                const std::uint64_t q_end = q + n;
                const auto next = [&]() {
                    if (q_end - q < 8) fail("entry '" + e.name + "' has a short ZIP64 extra field");
                    const auto v = at<std::uint64_t>(q);
                    q += 8;
                    return v;
                };
                if (need_u) e.uncompressed_size = next();
                if (need_c) e.compressed_size = next();
                if (need_o) e.local_header_offset = next();
                if (need_d) {
                    if (q_end - q < 4) fail("entry '" + e.name + "' has a short ZIP64 extra field");
                    disk_number = at<std::uint32_t>(q);
                }
            }
            pos += 4 + n;
        }
        if ((need_u || need_c || need_o) && !found) fail("entry '" + e.name + "' needs a ZIP64 extra field but has none");
        if (disk_number != 0) fail("entry '" + e.name + "' lies on another disk");
    }

    void locate_data(zip_entry& e) const {
        const std::uint64_t size = bytes_.size();
        if (!fits(e.local_header_offset, local_size, size))
            fail("entry '" + e.name + "' has its local header at " + std::to_string(e.local_header_offset) + ", past the end");
        const std::uint64_t h = e.local_header_offset;
        if (at<std::uint32_t>(h) != local_signature) fail("entry '" + e.name + "' has a bad local header signature");
        if (at<std::uint16_t>(h + 8) != e.method) fail("entry '" + e.name + "': local and central headers disagree on the method");
        const std::uint16_t name_len = at<std::uint16_t>(h + 26);
        const std::uint16_t extra_len = at<std::uint16_t>(h + 28);
        if (!fits(h + local_size, std::uint64_t{name_len} + extra_len, size))
            fail("entry '" + e.name + "' has a truncated local header");
        const std::string_view local_name(reinterpret_cast<const char*>(bytes_.data() + h + local_size), name_len);
        if (local_name != e.name) fail("entry '" + e.name + "': local header names '" + std::string(local_name) + "'");
        e.data_offset = h + local_size + name_len + extra_len;
        if (!fits(e.data_offset, e.compressed_size, size))
            fail("entry '" + e.name + "' claims " + std::to_string(e.compressed_size) + " bytes at offset " +
                 std::to_string(e.data_offset) + ", past the end of the file (" + std::to_string(size) + " bytes)");
    }

    std::shared_ptr<const std::vector<std::byte>> inflate(const zip_entry& e, std::span<const std::byte> raw) const {
        if (e.uncompressed_size > limits_.max_inflated_bytes)
            fail("entry '" + e.name + "' inflates to " + std::to_string(e.uncompressed_size) + " bytes, more than the limit of " +
                 std::to_string(limits_.max_inflated_bytes));
        if (e.uncompressed_size / max_deflate_ratio > e.compressed_size)
            fail("entry '" + e.name + "' claims to inflate " + std::to_string(e.compressed_size) + " bytes to " +
                 std::to_string(e.uncompressed_size) + ", beyond what deflate can do");
        auto out = std::make_shared<std::vector<std::byte>>(static_cast<std::size_t>(e.uncompressed_size));
        z_stream zs{};
        if (::inflateInit2(&zs, -MAX_WBITS) != Z_OK) fail("cannot initialise zlib");
        std::size_t in_done = 0, out_done = 0;
        int rc = Z_OK;
        constexpr std::size_t chunk = std::size_t{1} << 30;
        // zlib needs somewhere to write even when nothing is expected, to see
        // the end of the stream; a byte landing here means the claim was short.
        Bytef spare = 0;
        while (rc == Z_OK && out_done <= out->size()) {
            zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(raw.data() + in_done));
            zs.avail_in = static_cast<uInt>(std::min(raw.size() - in_done, chunk));
            if (out_done < out->size()) {
                zs.next_out = reinterpret_cast<Bytef*>(out->data() + out_done);
                zs.avail_out = static_cast<uInt>(std::min(out->size() - out_done, chunk));
            } else {
                zs.next_out = &spare;
                zs.avail_out = 1;
            }
            const uInt in_before = zs.avail_in, out_before = zs.avail_out;
            rc = ::inflate(&zs, Z_NO_FLUSH);
            in_done += in_before - zs.avail_in;
            out_done += out_before - zs.avail_out;
            if (rc == Z_OK && in_before == zs.avail_in && out_before == zs.avail_out) rc = Z_BUF_ERROR;  // no progress
        }
        ::inflateEnd(&zs);
        if (rc != Z_STREAM_END && out_done <= out->size())
            fail("entry '" + e.name + "' is not a valid deflate stream of " + std::to_string(e.uncompressed_size) + " bytes");
        if (out_done != out->size())
            fail("entry '" + e.name + "' inflates to " + std::to_string(out_done) + " bytes, not the " +
                 std::to_string(out->size()) + " its header claims");
        return out;
    }

    std::span<const std::byte> bytes_;
    std::string source_;
    std::string component_;
    zip_limits limits_;
    std::vector<zip_entry> entries_;
    std::map<std::string, std::size_t, std::less<>> by_name_;
};

}  // namespace dynamicid::io::detail
