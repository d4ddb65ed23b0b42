// dynamicid: reading and writing the safetensors format.
//
// Layout: an 8-byte little-endian u64 N, N bytes of JSON header, then the data
// section. The header maps each tensor name to {"dtype", "shape",
// "data_offsets": [begin, end)} (offsets relative to the data section) and may
// hold a "__metadata__" object of string -> string.
//
// The reader treats every file as hostile: any malformed, truncated or
// inconsistent header raises io_error before a tensor is touched, and nothing
// is allocated in proportion to a size the file merely claims.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/dtype.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/shape.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/detail/byte_source.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <ranges>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace dynamicid::io {

/// Limits applied while parsing a header.
///
///     dynamicid::io::safetensors_options opts;
///     opts.max_header_bytes = 1 << 20;
///     auto f = dynamicid::io::safetensors_file::open("small.safetensors", opts);
struct safetensors_options {
    /// Headers longer than this are rejected before being read, so a forged
    /// length cannot make the parser allocate without bound.
    std::size_t max_header_bytes = 100u * 1024u * 1024u;
};

/// One tensor as described by a safetensors header.
///
///     const auto& ti = file.info("unet.conv_in.weight");
///     // ti.type == dtype::f16, ti.dims == shape{320, 4, 3, 3}, ti.bytes == 23040
struct tensor_info {
    std::string name;
    dtype type = dtype::f32;
    shape dims;
    /// Start of the tensor's bytes, relative to the start of the data section.
    std::size_t offset = 0;
    /// Byte length; always numel * size_of(type).
    std::size_t bytes = 0;
};

/// The dtype spelt `name` in a safetensors header ("F32", "BF16", ...), if supported.
inline std::optional<dtype> dtype_from_name(std::string_view name) {
    for (dtype t : {dtype::f64, dtype::f32, dtype::f16, dtype::bf16, dtype::i64, dtype::i32, dtype::u8, dtype::boolean})
        if (name_of(t) == name) return t;
    return std::nullopt;
}

namespace detail {

inline constexpr std::string_view safetensors_component = "safetensors";

/// How a BOOL element is stored: one byte, any non-zero value reads as true.
struct bool_byte {
    std::uint8_t value;
};

template <class T, class... U>
inline constexpr bool is_one_of = (std::is_same_v<T, U> || ...);

/// Element types that to_vector can produce and the writer can store.
template <class T>
inline constexpr bool io_element =
    is_one_of<T, double, float, half, bfloat16, std::int64_t, std::int32_t, std::uint8_t, bool>;

template <class T>
constexpr dtype io_dtype_of() {
    if constexpr (std::is_same_v<T, bool>) return dtype::boolean;
    else return dtype_of<T>;
}

constexpr bool is_floating(dtype t) {
    return t == dtype::f64 || t == dtype::f32 || t == dtype::f16 || t == dtype::bf16;
}

template <class T, class S>
T convert_element(S s, const std::string& name) {
    if constexpr (std::is_same_v<T, S>) {
        return s;
    } else if constexpr (std::is_same_v<S, bool_byte>) {
        if constexpr (std::is_same_v<T, bool>) return s.value != 0;
        else if constexpr (floating_element<T>) return element_cast<T>(s.value != 0 ? 1.0f : 0.0f);
        else return static_cast<T>(s.value != 0 ? 1 : 0);
    } else if constexpr (floating_element<T>) {
        if constexpr (floating_element<S>) return element_cast<T>(s);
        else if constexpr (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>) return T(static_cast<float>(s));
        else return static_cast<T>(s);
    } else if constexpr (floating_element<S>) {
        // Rejected before conversion starts (see to_vector); kept so every
        // (storage, target) pair instantiates.
        return T{};
    } else if constexpr (std::is_same_v<T, bool>) {
        return s != 0;
    } else {
        if (!std::in_range<T>(s))
            throw value_error(safetensors_component, "tensor '" + name + "' holds " + std::to_string(s) +
                                                         ", out of range for the requested integer type");
        return static_cast<T>(s);
    }
}

template <class S, class T>
void convert_into(const std::byte* src, std::vector<T>& out, const std::string& name) {
    if constexpr (std::is_same_v<S, T> && !std::is_same_v<T, bool> && std::endian::native == std::endian::little) {
        if (!out.empty()) std::memcpy(out.data(), src, out.size() * sizeof(T));
    } else {
        for (std::size_t i = 0; i < out.size(); ++i) out[i] = convert_element<T>(load_le<S>(src + i * sizeof(S)), name);
    }
}

/// Non-negative JSON integer, or nullopt for floats, negatives and non-numbers.
inline std::optional<std::uint64_t> json_unsigned(const nlohmann::json& j) {
    if (j.is_number_unsigned()) return j.get<std::uint64_t>();
    return std::nullopt;
}

inline std::string json_kind(const nlohmann::json& j) {
    if (j.is_number_integer() && !j.is_number_unsigned()) return "a negative integer";
    if (j.is_number_float()) return "a non-integer number";
    const std::string type = j.type_name();
    return (type == "array" || type == "object" ? "an " : "a ") + type;
}

}  // namespace detail

/// A read-only safetensors file. open() memory-maps the file (nothing is
/// copied until a tensor is converted); from_memory() parses a private copy
/// of a buffer. The whole header is validated up front. Movable, not copyable;
/// spans from bytes() stay valid while the object (or its moved-to owner) lives.
///
///     auto f = dynamicid::io::safetensors_file::open("vae.safetensors");
///     for (const auto& name : f.names()) std::cout << name << f.info(name).dims.str() << '\n';
///     std::vector<float> w = f.to_vector<float>("decoder.conv_in.weight");
///     dynamicid::cpu_backend::context ctx;
///     auto t = f.load<dynamicid::cpu_backend, float>(ctx, "decoder.conv_in.weight");
class safetensors_file {
public:
    safetensors_file() = default;
    safetensors_file(safetensors_file&&) noexcept = default;
    safetensors_file& operator=(safetensors_file&&) noexcept = default;
    safetensors_file(const safetensors_file&) = delete;
    safetensors_file& operator=(const safetensors_file&) = delete;

    /// Maps and parses `path`; io_error (naming the path) on any failure.
    static safetensors_file open(const std::filesystem::path& path, const safetensors_options& options = {}) {
        auto source = std::make_unique<detail::mapped_file>(path, detail::safetensors_component);
        return parse(std::move(source), path.string(), options);
    }

    /// Parses a copy of `bytes`, so the caller's buffer may go away afterwards.
    static safetensors_file from_memory(std::span<const std::byte> bytes, const safetensors_options& options = {}) {
        return parse(std::make_unique<detail::owned_bytes>(bytes), "<memory>", options);
    }

    /// Tensor names in lexicographic order (not header order: JSON objects are unordered).
    std::vector<std::string> names() const {
        std::vector<std::string> out;
        out.reserve(entries_.size());
        for (const auto& [name, info] : entries_) out.push_back(name);
        return out;
    }

    std::size_t size() const noexcept { return entries_.size(); }
    bool contains(std::string_view name) const { return entries_.find(name) != entries_.end(); }

    /// io_error when the file has no tensor called `name`.
    const tensor_info& info(std::string_view name) const {
        const auto it = entries_.find(name);
        if (it == entries_.end())
            throw io_error(detail::safetensors_component, source_ + ": no tensor named '" + std::string(name) + "'");
        return it->second;
    }

    /// The tensor's raw little-endian bytes, in place (unaligned in general).
    std::span<const std::byte> bytes(std::string_view name) const {
        const auto& ti = info(name);
        return data_section().subspan(ti.offset, ti.bytes);
    }

    /// The "__metadata__" map; empty when the header has none.
    const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

    /// Where the bytes came from: the path, or "<memory>".
    const std::string& source() const noexcept { return source_; }

    /// The tensor's elements converted to T, row-major. Any stored type converts
    /// to a floating T; integer and BOOL storage also convert to integer T or
    /// bool (value_error when a value does not fit). Floating storage never
    /// silently truncates to an integer T: that is a shape_error.
    template <class T>
        requires detail::io_element<T>
    std::vector<T> to_vector(std::string_view name) const {
        const auto& ti = info(name);
        if constexpr (!floating_element<T>) {
            if (detail::is_floating(ti.type))
                throw shape_error(detail::safetensors_component, source_ + ": tensor '" + ti.name + "' is stored as " +
                                                                     std::string(name_of(ti.type)) +
                                                                     " and cannot be read as an integer type");
        }
        std::vector<T> out(ti.bytes / size_of(ti.type));
        const std::byte* src = data_section().data() + ti.offset;
        switch (ti.type) {
            case dtype::f64: detail::convert_into<double>(src, out, ti.name); break;
            case dtype::f32: detail::convert_into<float>(src, out, ti.name); break;
            case dtype::f16: detail::convert_into<half>(src, out, ti.name); break;
            case dtype::bf16: detail::convert_into<bfloat16>(src, out, ti.name); break;
            case dtype::i64: detail::convert_into<std::int64_t>(src, out, ti.name); break;
            case dtype::i32: detail::convert_into<std::int32_t>(src, out, ti.name); break;
            case dtype::u8: detail::convert_into<std::uint8_t>(src, out, ti.name); break;
            case dtype::boolean: detail::convert_into<detail::bool_byte>(src, out, ti.name); break;
        }
        return out;
    }

    /// The tensor converted to T on the host, then copied to backend memory
    /// with B::copy_from_host (device memory is never written directly).
    template <class B, class T>
        requires backend<B> && backend_memory<B, T> && detail::io_element<T>
    tensor<B, T> load(context_t<B>& ctx, std::string_view name) const {
        const auto& ti = info(name);
        const std::vector<T> host = to_vector<T>(name);
        return tensor<B, T>::from_host(ctx, ti.dims, std::span<const T>(host));
    }

private:
    std::span<const std::byte> data_section() const noexcept {
        if (!source_bytes_) return {};
        return source_bytes_->bytes().subspan(data_start_);
    }

    static safetensors_file parse(std::unique_ptr<detail::byte_source> source, std::string source_name,
                                  const safetensors_options& options);

    std::unique_ptr<detail::byte_source> source_bytes_;
    std::string source_;
    std::size_t data_start_ = 0;
    std::map<std::string, tensor_info, std::less<>> entries_;
    std::map<std::string, std::string> metadata_;
};

inline safetensors_file safetensors_file::parse(std::unique_ptr<detail::byte_source> source, std::string source_name,
                                                const safetensors_options& options) {
    using nlohmann::json;
    const auto fail = [&](const std::string& message) {
        throw io_error(detail::safetensors_component, source_name + ": " + message);
    };

    const std::span<const std::byte> all = source->bytes();
    if (all.size() < 8)
        fail("file is " + std::to_string(all.size()) + " bytes, too short for the 8-byte header length");
    const std::uint64_t header_len = detail::load_le<std::uint64_t>(all.data());
    if (header_len > options.max_header_bytes)
        fail("header length " + std::to_string(header_len) + " exceeds the limit of " +
             std::to_string(options.max_header_bytes) + " bytes");
    if (header_len > all.size() - 8)
        fail("header length " + std::to_string(header_len) + " runs past the end of the file (" +
             std::to_string(all.size()) + " bytes)");

    // The callback sees the header while it is parsed: it rejects duplicate
    // keys (which the DOM would silently collapse) and nesting deeper than the
    // format uses, which bounds the parser's memory to the header's size.
    std::vector<std::set<std::string>> open_objects;
    const auto guard = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
        switch (event) {
            case json::parse_event_t::object_start:
                if (depth > 1) fail("header nests objects deeper than the format allows");
                open_objects.emplace_back();
                break;
            case json::parse_event_t::array_start:
                if (depth > 2) fail("header nests arrays deeper than the format allows");
                break;
            case json::parse_event_t::key:
                if (!open_objects.empty() && !open_objects.back().insert(parsed.get<std::string>()).second)
                    fail("duplicate key '" + parsed.get<std::string>() + "' in header");
                break;
            case json::parse_event_t::object_end:
                if (!open_objects.empty()) open_objects.pop_back();
                break;
            default:
                break;
        }
        return true;
    };

    const char* header_begin = reinterpret_cast<const char*>(all.data() + 8);
    // The JSON parser stops at a NUL as if the input ended, which would let
    // arbitrary bytes hide after one; valid JSON never contains a raw NUL.
    if (std::memchr(header_begin, 0, static_cast<std::size_t>(header_len)) != nullptr)
        fail("header contains a NUL byte");
    json root;
    try {
        root = json::parse(header_begin, header_begin + header_len, guard);
    } catch (const json::exception& e) {
        fail(std::string("header is not valid JSON: ") + e.what());
    }
    if (!root.is_object()) fail("header is " + detail::json_kind(root) + ", not a JSON object");

    safetensors_file file;
    file.source_ = source_name;
    file.data_start_ = static_cast<std::size_t>(8 + header_len);
    const std::size_t data_size = all.size() - file.data_start_;

    for (auto it = root.begin(); it != root.end(); ++it) {
        const std::string& name = it.key();
        const json& entry = it.value();
        if (name == "__metadata__") {
            if (!entry.is_object()) fail("__metadata__ is " + detail::json_kind(entry) + ", not an object");
            for (auto m = entry.begin(); m != entry.end(); ++m) {
                if (!m.value().is_string())
                    fail("__metadata__ value for '" + m.key() + "' is " + detail::json_kind(m.value()) + ", not a string");
                file.metadata_.emplace(m.key(), m.value().get<std::string>());
            }
            continue;
        }
        const std::string where = "tensor '" + name + "': ";
        if (!entry.is_object()) fail(where + "entry is " + detail::json_kind(entry) + ", not an object");

        const auto field = [&](const char* key) -> const json& {
            const auto f = entry.find(key);
            if (f == entry.end()) fail(where + "missing \"" + key + "\"");
            return *f;
        };

        tensor_info info;
        info.name = name;

        const json& dtype_json = field("dtype");
        if (!dtype_json.is_string()) fail(where + "\"dtype\" is " + detail::json_kind(dtype_json) + ", not a string");
        const auto type = dtype_from_name(dtype_json.get_ref<const std::string&>());
        if (!type) fail(where + "unsupported dtype \"" + dtype_json.get<std::string>() + "\"");
        info.type = *type;

        const json& shape_json = field("shape");
        if (!shape_json.is_array()) fail(where + "\"shape\" is " + detail::json_kind(shape_json) + ", not an array");
        if (shape_json.size() > static_cast<std::size_t>(max_rank))
            fail(where + "rank " + std::to_string(shape_json.size()) + " exceeds the maximum of " + std::to_string(max_rank));
        std::vector<index_t> dims;
        // The product of the non-zero dims must fit index_t: shape's numel and
        // strides multiply them without overflow checks.
        std::uint64_t nonzero_product = 1;
        std::uint64_t numel = 1;
        constexpr auto index_max = static_cast<std::uint64_t>(std::numeric_limits<index_t>::max());
        for (const json& d : shape_json) {
            const auto v = detail::json_unsigned(d);
            if (!v) fail(where + "shape dimension is " + detail::json_kind(d) + ", not a non-negative integer");
            if (*v > index_max) fail(where + "shape dimension " + std::to_string(*v) + " is too large");
            if (*v != 0) {
                if (nonzero_product > index_max / *v) fail(where + "shape " + shape_json.dump() + " overflows the element count");
                nonzero_product *= *v;
            }
            numel = *v == 0 ? 0 : numel * *v;
            dims.push_back(static_cast<index_t>(*v));
        }
        info.dims = shape(dims);

        const json& offsets = field("data_offsets");
        if (!offsets.is_array() || offsets.size() != 2)
            fail(where + "\"data_offsets\" must be an array of two integers");
        const auto begin = detail::json_unsigned(offsets[0]);
        const auto end = detail::json_unsigned(offsets[1]);
        if (!begin || !end) fail(where + "\"data_offsets\" must hold non-negative integers");
        if (*begin > *end)
            fail(where + "data_offsets [" + std::to_string(*begin) + ", " + std::to_string(*end) + ") begin after end");
        if (*end > data_size)
            fail(where + "data_offsets end " + std::to_string(*end) + " is past the data section (" +
                 std::to_string(data_size) + " bytes)");

        const std::uint64_t element = size_of(info.type);
        if (numel > std::numeric_limits<std::uint64_t>::max() / element)
            fail(where + "shape " + shape_json.dump() + " is too large in bytes");
        if (numel * element != *end - *begin)
            fail(where + "shape " + info.dims.str() + " of " + std::string(name_of(info.type)) + " needs " +
                 std::to_string(numel * element) + " bytes but data_offsets span " + std::to_string(*end - *begin));
        info.offset = static_cast<std::size_t>(*begin);
        info.bytes = static_cast<std::size_t>(*end - *begin);
        file.entries_.emplace(name, std::move(info));
    }

    // Overlapping tensors would alias each other; empty ones occupy nothing.
    std::vector<const tensor_info*> by_offset;
    for (const auto& [name, info] : file.entries_)
        if (info.bytes) by_offset.push_back(&info);
    std::sort(by_offset.begin(), by_offset.end(),
              [](const tensor_info* a, const tensor_info* b) { return a->offset < b->offset; });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
        const tensor_info& prev = *by_offset[i - 1];
        if (by_offset[i]->offset < prev.offset + prev.bytes)
            fail("tensors '" + prev.name + "' and '" + by_offset[i]->name + "' overlap in the data section");
    }

    file.source_bytes_ = std::move(source);
    return file;
}

/// Builds a safetensors file in memory and writes it atomically. Tensor bytes
/// are copied when added, so sources may be freed right away. In the output,
/// tensors are ordered by element size (largest first) then name, which keeps
/// every tensor naturally aligned without gaps between them.
///
///     dynamicid::io::safetensors_writer w;
///     std::vector<float> bias(320, 0.0f);
///     w.add("conv.bias", {320}, bias).add(ctx, "conv.weight", weight_tensor);
///     w.set_metadata("format", "pt");
///     w.write("out.safetensors");
class safetensors_writer {
public:
    /// Adds raw little-endian bytes of `type`; value_error when the byte count
    /// does not match the shape, or the name is taken or is "__metadata__".
    safetensors_writer& add_bytes(std::string name, dtype type, const shape& dims, std::span<const std::byte> data) {
        check_name(name);
        const auto need = static_cast<std::uint64_t>(dims.numel()) * size_of(type);
        check<value_error>(need == data.size(), detail::safetensors_component, "tensor '", name, "' of shape ", dims.str(),
                           " and dtype ", name_of(type), " needs ", need, " bytes, got ", data.size());
        entries_.emplace(name, entry{name, type, dims, std::vector<std::byte>(data.begin(), data.end())});
        return *this;
    }

    /// Adds host values (float, double, half, bfloat16, int64, int32, uint8 or bool).
    template <std::ranges::contiguous_range R>
        requires detail::io_element<std::remove_cv_t<std::ranges::range_value_t<R>>>
    safetensors_writer& add(std::string name, const shape& dims, const R& values) {
        using T = std::remove_cv_t<std::ranges::range_value_t<R>>;
        const std::span<const T> span(std::ranges::data(values), std::ranges::size(values));
        check_name(name);
        check<value_error>(static_cast<index_t>(span.size()) == dims.numel(), detail::safetensors_component, "tensor '", name,
                           "' of shape ", dims.str(), " needs ", dims.numel(), " values, got ", span.size());
        std::vector<std::byte> bytes(span.size() * sizeof(T));
        if constexpr (std::is_same_v<T, bool>) {
            for (std::size_t i = 0; i < span.size(); ++i) bytes[i] = std::byte{span[i] ? std::uint8_t{1} : std::uint8_t{0}};
        } else if constexpr (std::endian::native == std::endian::little) {
            if (!span.empty()) std::memcpy(bytes.data(), span.data(), bytes.size());
        } else {
            for (std::size_t i = 0; i < span.size(); ++i) detail::store_le(bytes.data() + i * sizeof(T), span[i]);
        }
        entries_.emplace(name, entry{name, detail::io_dtype_of<T>(), dims, std::move(bytes)});
        return *this;
    }

    /// Adds a backend tensor, copied to the host with to_host.
    template <class B, class T>
        requires backend<B> && detail::io_element<T>
    safetensors_writer& add(context_t<B>& ctx, std::string name, const tensor<B, T>& t) {
        const std::vector<T> host = t.to_host(ctx);
        return add(std::move(name), t.shape(), host);
    }

    safetensors_writer& set_metadata(std::string key, std::string value) {
        metadata_.insert_or_assign(std::move(key), std::move(value));
        return *this;
    }

    std::size_t size() const noexcept { return entries_.size(); }

    /// The complete file contents.
    std::vector<std::byte> to_bytes() const {
        const auto [header, order] = layout();
        std::vector<std::byte> out(8 + header.size());
        detail::store_le<std::uint64_t>(out.data(), header.size());
        std::memcpy(out.data() + 8, header.data(), header.size());
        for (const entry* e : order) out.insert(out.end(), e->data.begin(), e->data.end());
        return out;
    }

    /// Writes to a temporary file next to `path`, then renames it over `path`,
    /// so readers never see a half-written file. io_error on failure.
    void write(const std::filesystem::path& path) const {
        const auto [header, order] = layout();
        std::byte length[8];
        detail::store_le<std::uint64_t>(length, header.size());
        std::vector<std::span<const std::byte>> pieces;
        pieces.emplace_back(length, 8);
        pieces.emplace_back(reinterpret_cast<const std::byte*>(header.data()), header.size());
        for (const entry* e : order) pieces.emplace_back(e->data);
        write_atomically(path, pieces);
    }

private:
    struct entry {
        std::string name;
        dtype type;
        shape dims;
        std::vector<std::byte> data;
    };

    void check_name(const std::string& name) const {
        check<value_error>(name != "__metadata__", detail::safetensors_component, "\"__metadata__\" is reserved");
        check<value_error>(!entries_.contains(name), detail::safetensors_component, "tensor '", name, "' was already added");
    }

    std::pair<std::string, std::vector<const entry*>> layout() const {
        std::vector<const entry*> order;
        for (const auto& [name, e] : entries_) order.push_back(&e);
        std::stable_sort(order.begin(), order.end(),
                         [](const entry* a, const entry* b) { return size_of(a->type) > size_of(b->type); });
        nlohmann::json header = nlohmann::json::object();
        std::uint64_t offset = 0;
        for (const entry* e : order) {
            header[e->name] = {{"dtype", std::string(name_of(e->type))},
                               {"shape", e->dims.to_vector()},
                               {"data_offsets", {offset, offset + e->data.size()}}};
            offset += e->data.size();
        }
        if (!metadata_.empty()) header["__metadata__"] = metadata_;
        std::string text;
        try {
            text = header.dump();
        } catch (const nlohmann::json::exception& e) {
            throw value_error(detail::safetensors_component,
                              std::string("tensor names and metadata must be valid UTF-8: ") + e.what());
        }
        // Padding keeps the data section 8-byte aligned, as the format recommends.
        text.append((8 - text.size() % 8) % 8, ' ');
        return {std::move(text), std::move(order)};
    }

    static void write_atomically(const std::filesystem::path& path, const std::vector<std::span<const std::byte>>& pieces) {
        const auto fail = [&](const std::string& what, int code) {
            throw io_error(detail::safetensors_component,
                           "cannot write '" + path.string() + "': " + what + ": " + detail::system_message(code));
        };
#if DYNAMICID_IO_HAS_POSIX
        static std::atomic<unsigned> counter{0};
        std::filesystem::path temp;
        int fd = -1;
        for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
            temp = path;
            temp += ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
            fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
            if (fd < 0 && errno != EEXIST) break;
        }
        if (fd < 0) fail("cannot create a temporary file", errno);
        const auto abandon = [&](const std::string& what) {
            const int code = errno;
            if (fd >= 0) ::close(fd);
            ::unlink(temp.c_str());
            fail(what, code);
        };
        for (const auto& piece : pieces) {
            const std::byte* p = piece.data();
            std::size_t left = piece.size();
            while (left > 0) {
                const ::ssize_t n = ::write(fd, p, left);
                if (n < 0) {
                    if (errno == EINTR) continue;
                    abandon("write failed");
                }
                p += n;
                left -= static_cast<std::size_t>(n);
            }
        }
        if (::fsync(fd) != 0) abandon("fsync failed");
        const int closed = ::close(fd);
        fd = -1;
        if (closed != 0) abandon("close failed");
        if (::rename(temp.c_str(), path.c_str()) != 0) abandon("rename failed");
#else
        std::filesystem::path temp = path;
        temp += ".tmp";
        {
            std::ofstream out(temp, std::ios::binary | std::ios::trunc);
            for (const auto& piece : pieces)
                out.write(reinterpret_cast<const char*>(piece.data()), static_cast<std::streamsize>(piece.size()));
            if (!out) {
                std::error_code ignored;
                std::filesystem::remove(temp, ignored);
                fail("write failed", EIO);
            }
        }
        std::error_code ec;
        std::filesystem::rename(temp, path, ec);
        if (ec) {
            std::filesystem::remove(temp, ec);
            fail("rename failed", EIO);
        }
#endif
    }

    std::map<std::string, entry, std::less<>> entries_;
    std::map<std::string, std::string> metadata_;
};

}  // namespace dynamicid::io
