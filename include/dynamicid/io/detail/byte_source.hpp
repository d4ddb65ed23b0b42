// dynamicid: read-only byte sources behind safetensors_file (a memory-mapped
// file or an owned copy of a buffer), and little-endian element access.
#pragma once

#include <dynamicid/core/error.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#if __has_include(<sys/mman.h>) && __has_include(<unistd.h>)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define DYNAMICID_IO_HAS_POSIX 1
#else
#include <fstream>
#define DYNAMICID_IO_HAS_POSIX 0
#endif

namespace dynamicid::io::detail {

/// Bytes that stay valid and at a fixed address for the source's lifetime, so
/// that moving the owner (which holds it by unique_ptr) never invalidates spans.
class byte_source {
public:
    virtual ~byte_source() = default;
    std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }

protected:
    const std::byte* data_ = nullptr;
    std::size_t size_ = 0;
};

/// A private copy of caller-provided bytes.
class owned_bytes final : public byte_source {
public:
    explicit owned_bytes(std::span<const std::byte> in) : storage_(in.begin(), in.end()) {
        data_ = storage_.data();
        size_ = storage_.size();
    }

private:
    std::vector<std::byte> storage_;
};

inline std::string system_message(int code) { return std::generic_category().message(code); }

#if DYNAMICID_IO_HAS_POSIX

/// A read-only private mapping of a whole regular file. The descriptor is
/// closed right after mmap: the mapping keeps the file alive by itself.
/// A file truncated by another process while mapped makes reads fault (SIGBUS);
/// that is inherent to mmap and the price of not copying multi-GB weights.
class mapped_file final : public byte_source {
public:
    mapped_file(const std::filesystem::path& path, std::string_view component) {
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) throw io_error(component, "cannot open '" + path.string() + "': " + system_message(errno));
        struct stat st {};
        if (::fstat(fd, &st) != 0) {
            const int code = errno;
            ::close(fd);
            throw io_error(component, "cannot stat '" + path.string() + "': " + system_message(code));
        }
        if (!S_ISREG(st.st_mode)) {
            ::close(fd);
            throw io_error(component, "'" + path.string() + "' is not a regular file");
        }
        size_ = static_cast<std::size_t>(st.st_size);
        if (size_ == 0) {  // mmap rejects empty lengths; an empty file is still a (truncated) file
            ::close(fd);
            return;
        }
        void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        const int code = errno;
        ::close(fd);
        if (p == MAP_FAILED) throw io_error(component, "cannot map '" + path.string() + "': " + system_message(code));
        base_ = p;
        data_ = static_cast<const std::byte*>(p);
    }
    ~mapped_file() override {
        if (base_) ::munmap(base_, size_);
    }
    mapped_file(const mapped_file&) = delete;
    mapped_file& operator=(const mapped_file&) = delete;

private:
    void* base_ = nullptr;
};

#else

/// Fallback where mmap is unavailable: read the whole file.
class mapped_file final : public byte_source {
public:
    mapped_file(const std::filesystem::path& path, std::string_view component) {
        std::ifstream in(path, std::ios::binary);
        if (!in) throw io_error(component, "cannot open '" + path.string() + "'");
        in.seekg(0, std::ios::end);
        const auto end = in.tellg();
        in.seekg(0, std::ios::beg);
        storage_.resize(static_cast<std::size_t>(end));
        in.read(reinterpret_cast<char*>(storage_.data()), static_cast<std::streamsize>(storage_.size()));
        if (!in) throw io_error(component, "cannot read '" + path.string() + "'");
        data_ = storage_.data();
        size_ = storage_.size();
    }

private:
    std::vector<std::byte> storage_;
};

#endif

template <std::size_t N> struct uint_of_size;
template <> struct uint_of_size<1> { using type = std::uint8_t; };
template <> struct uint_of_size<2> { using type = std::uint16_t; };
template <> struct uint_of_size<4> { using type = std::uint32_t; };
template <> struct uint_of_size<8> { using type = std::uint64_t; };

template <class U>
constexpr U byte_swap(U v) noexcept {
    U out = 0;
    for (std::size_t i = 0; i < sizeof(U); ++i) {
        out = static_cast<U>((out << 8) | (v & 0xffu));
        v = static_cast<U>(v >> 8);
    }
    return out;
}

/// Reads one little-endian S from a possibly unaligned address.
template <class S>
S load_le(const std::byte* p) noexcept {
    using U = typename uint_of_size<sizeof(S)>::type;
    U bits;
    std::memcpy(&bits, p, sizeof bits);
    if constexpr (std::endian::native == std::endian::big) bits = byte_swap(bits);
    return std::bit_cast<S>(bits);
}

/// Writes one S as little-endian bytes to a possibly unaligned address.
template <class S>
void store_le(std::byte* p, S value) noexcept {
    using U = typename uint_of_size<sizeof(S)>::type;
    U bits = std::bit_cast<U>(value);
    if constexpr (std::endian::native == std::endian::big) bits = byte_swap(bits);
    std::memcpy(p, &bits, sizeof bits);
}

}  // namespace dynamicid::io::detail
