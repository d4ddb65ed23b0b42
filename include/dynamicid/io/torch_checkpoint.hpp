// dynamicid io: reading PyTorch checkpoint files (torch.save) without pickle.
//
// The authors' DynamicID weights ship as torch.save files: SAA.bin holds
// {"proj_module": <state dict>, "SAA_module": <state dict>}, IMR*.bin and
// key_point_encoder*.bin one state dict each. torch.save writes a ZIP archive
// (<name>/data.pkl: the pickled object tree; <name>/data/<key>: one raw blob
// per storage; <name>/byteorder, <name>/version) or, with
// _use_new_zipfile_serialization=False, the legacy stream (several pickles
// followed by the raw storages). Both are read here, and nothing in the file
// is executed: the pickle is interpreted symbolically (detail/pickle.hpp),
// only the names a state dict needs are resolved, and any other global
// (os.system, builtins.eval, a user class...) raises io_error naming it.
//
// The result is a tree of dicts (and lists, and plain scalars) whose leaves
// are torch_tensor views: dtype, shape, strides and offset into a storage
// that stays memory-mapped (stored ZIP entries are not copied). Views that
// share a storage share the bytes; non-contiguous views (e.g. a saved
// transpose) are copied into row-major order when their values are read.
//
//     auto ckpt = dynamicid::io::torch_checkpoint::open("SAA.bin");
//     for (const auto& [name, t] : ckpt.flatten()) std::cout << name << ' ' << t.dims().str() << '\n';
//     std::vector<float> w = ckpt.subtree("proj_module").at("proj.0.weight").tensor().to_vector<float>();
//
//     // As a weight_source (one copy into an in-memory safetensors image):
//     auto proj = dynamicid::io::torch_weight_source(ckpt, "proj_module");
//     // Or once, on disk, then memory-mapped as usual:
//     dynamicid::io::convert_to_safetensors("SAA.bin", "SAA.safetensors");
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/dtype.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/shape.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/detail/byte_source.hpp>
#include <dynamicid/io/detail/pickle.hpp>
#include <dynamicid/io/detail/zip.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/weights.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dynamicid::io {

inline constexpr std::string_view torch_component = "torch";

/// Limits applied while reading a checkpoint.
///
///     dynamicid::io::torch_checkpoint_options opts;
///     opts.verify_crc = true;   // also check every stored tensor blob's CRC-32
///     auto ckpt = dynamicid::io::torch_checkpoint::open("IMR.bin", opts);
struct torch_checkpoint_options {
    /// The pickle (data.pkl) may not be larger than this.
    std::size_t max_pickle_bytes = std::size_t{256} << 20;
    /// Deflated ZIP entries (torch never writes them; re-packing tools may) expand to at most this.
    std::uint64_t max_inflated_bytes = std::uint64_t{16} << 30;
    /// Deepest nesting of dicts and lists accepted (state dicts use 1 to 3).
    int max_depth = 64;
    /// Check the CRC-32 of stored tensor blobs (reads every byte once at open).
    /// The pickle and small entries are always checked.
    bool verify_crc = false;
    detail::pickle_limits pickle;
};

namespace detail {

/// Keeps the file (mapped or owned) and any inflated entries alive.
struct torch_bytes_owner {
    std::unique_ptr<byte_source> source;
    std::vector<std::shared_ptr<const std::vector<std::byte>>> inflated;
};

/// One storage: `bytes` holds exactly its elements, in the file's byte order.
struct torch_storage {
    dtype type = dtype::f32;
    std::string key;
    std::span<const std::byte> bytes;
    bool big_endian = false;
    std::shared_ptr<const torch_bytes_owner> owner;
};

inline void swap_elements(std::byte* p, std::size_t count, std::size_t element) {
    if (element == 1) return;
    for (std::size_t i = 0; i < count; ++i)
        for (std::size_t a = 0, b = element - 1; a < b; ++a, --b) std::swap(p[i * element + a], p[i * element + b]);
}

}  // namespace detail

/// A tensor as torch saved it: a strided view of a storage.
///
///     const auto& t = ckpt.root().at("SAA_module").at("3.to_k_ip.weight").tensor();
///     // t.type() == dtype::f16, t.dims() == shape{320, 768}
///     std::vector<float> w = t.to_vector<float>();   // row-major, converted
class torch_tensor {
public:
    torch_tensor() = default;
    torch_tensor(std::shared_ptr<const detail::torch_storage> storage, shape dims, std::vector<index_t> strides, index_t offset)
        : storage_(std::move(storage)), dims_(std::move(dims)), strides_(std::move(strides)), offset_(offset) {}

    dtype type() const noexcept { return storage_ ? storage_->type : dtype::f32; }
    const shape& dims() const noexcept { return dims_; }
    /// Strides in elements, one per dimension (torch's `stride()`).
    const std::vector<index_t>& strides() const noexcept { return strides_; }
    /// Offset of element [0, ..., 0] in the storage, in elements.
    index_t storage_offset() const noexcept { return offset_; }
    /// The storage's key in the file; views of one storage share it (and its bytes).
    const std::string& storage_key() const noexcept { return storage_->key; }
    /// The whole storage's bytes, in place, in the file's byte order.
    std::span<const std::byte> storage_bytes() const noexcept { return storage_->bytes; }
    index_t numel() const noexcept { return dims_.numel(); }
    std::size_t nbytes() const noexcept { return static_cast<std::size_t>(numel()) * size_of(type()); }

    /// True when the elements are stored row-major without gaps (sizes of 1 ignore their stride).
    bool is_contiguous() const noexcept {
        index_t expected = 1;
        for (int i = dims_.rank(); i-- > 0;) {
            const index_t d = dims_[i];
            if (d == 0) return true;
            if (d != 1 && strides_[static_cast<std::size_t>(i)] != expected) return false;
            expected *= d;
        }
        return true;
    }

    /// The elements in row-major order as little-endian bytes (a copy; strided
    /// views are gathered, big-endian files byte-swapped).
    std::vector<std::byte> contiguous_bytes() const {
        const std::size_t es = size_of(type());
        std::vector<std::byte> out(nbytes());
        if (out.empty()) return out;
        const std::byte* base = storage_->bytes.data();
        if (is_contiguous()) {
            std::memcpy(out.data(), base + static_cast<std::size_t>(offset_) * es, out.size());
        } else {
            const int rank = dims_.rank();
            std::vector<index_t> index(static_cast<std::size_t>(rank), 0);
            index_t src = offset_;
            for (std::size_t n = 0; n < out.size() / es; ++n) {
                std::memcpy(out.data() + n * es, base + static_cast<std::size_t>(src) * es, es);
                for (int a = rank; a-- > 0;) {  // odometer over the dims, last fastest
                    const auto ua = static_cast<std::size_t>(a);
                    if (++index[ua] < dims_[a]) {
                        src += strides_[ua];
                        break;
                    }
                    src -= (index[ua] - 1) * strides_[ua];
                    index[ua] = 0;
                }
            }
        }
        if (storage_->big_endian) detail::swap_elements(out.data(), out.size() / es, es);
        return out;
    }

    /// The elements converted to T, row-major (same conversions as safetensors_file::to_vector).
    template <class T>
        requires detail::io_element<T>
    std::vector<T> to_vector() const {
        const dtype t = type();
        if constexpr (!floating_element<T>) {
            if (detail::is_floating(t))
                throw shape_error(torch_component, "tensor stored as " + std::string(name_of(t)) + " cannot be read as an integer type");
        }
        const std::vector<std::byte> raw = contiguous_bytes();
        std::vector<T> out(static_cast<std::size_t>(numel()));
        const std::byte* src = raw.data();
        const std::string name = "storage " + storage_key();
        switch (t) {
            case dtype::f64: detail::convert_into<double>(src, out, name); break;
            case dtype::f32: detail::convert_into<float>(src, out, name); break;
            case dtype::f16: detail::convert_into<half>(src, out, name); break;
            case dtype::bf16: detail::convert_into<bfloat16>(src, out, name); break;
            case dtype::i64: detail::convert_into<std::int64_t>(src, out, name); break;
            case dtype::i32: detail::convert_into<std::int32_t>(src, out, name); break;
            case dtype::u8: detail::convert_into<std::uint8_t>(src, out, name); break;
            case dtype::boolean: detail::convert_into<detail::bool_byte>(src, out, name); break;
        }
        return out;
    }

    /// The tensor converted to T on the host, then copied to backend memory.
    template <class B, class T>
        requires backend<B> && backend_memory<B, T> && detail::io_element<T>
    tensor<B, T> load(context_t<B>& ctx) const {
        const std::vector<T> host = to_vector<T>();
        return tensor<B, T>::from_host(ctx, dims_, std::span<const T>(host));
    }

private:
    std::shared_ptr<const detail::torch_storage> storage_;
    shape dims_;
    std::vector<index_t> strides_;
    index_t offset_ = 0;
};

/// One value of a checkpoint's object tree: a dict (string keys, in saved
/// order), a list (tuples too), a tensor, or a plain scalar.
class torch_node {
public:
    enum class kind : std::uint8_t { none, boolean, integer, floating, string, tensor, list, dict };

    kind type() const noexcept { return kind_; }
    bool is_dict() const noexcept { return kind_ == kind::dict; }
    bool is_list() const noexcept { return kind_ == kind::list; }
    bool is_tensor() const noexcept { return kind_ == kind::tensor; }

    /// Dict keys in saved order (empty for other kinds).
    const std::vector<std::string>& keys() const noexcept { return keys_; }
    /// Dict values (matching keys()) or list elements.
    const std::vector<torch_node>& children() const noexcept { return children_; }

    /// The dict entry `key`, or nullptr (also for non-dicts).
    const torch_node* find(std::string_view key) const {
        for (std::size_t i = 0; i < keys_.size(); ++i)
            if (keys_[i] == key) return &children_[i];
        return nullptr;
    }
    /// The dict entry `key`; io_error naming the missing key otherwise.
    const torch_node& at(std::string_view key) const {
        if (kind_ != kind::dict) throw io_error(torch_component, "looking up '" + std::string(key) + "' in a " + kind_name() + ", not a dict");
        if (const auto* n = find(key)) return *n;
        throw io_error(torch_component, "no entry '" + std::string(key) + "'");
    }

    const torch_tensor& tensor() const {
        if (kind_ != kind::tensor) throw io_error(torch_component, "value is a " + kind_name() + ", not a tensor");
        return tensor_;
    }
    bool boolean() const { expect(kind::boolean); return integer_ != 0; }
    std::int64_t integer() const { expect(kind::integer); return integer_; }
    double real() const { expect(kind::floating); return real_; }
    const std::string& string() const { expect(kind::string); return text_; }

    std::string kind_name() const {
        switch (kind_) {
            case kind::none: return "None";
            case kind::boolean: return "bool";
            case kind::integer: return "int";
            case kind::floating: return "float";
            case kind::string: return "str";
            case kind::tensor: return "tensor";
            case kind::list: return "list";
            case kind::dict: return "dict";
        }
        return "?";
    }

private:
    friend class torch_checkpoint;
    void expect(kind k) const {
        if (kind_ != k) throw io_error(torch_component, "value is a " + kind_name());
    }

    kind kind_ = kind::none;
    std::int64_t integer_ = 0;
    double real_ = 0.0;
    std::string text_;
    torch_tensor tensor_;
    std::vector<std::string> keys_;
    std::vector<torch_node> children_;
};

/// Every tensor below `node`, named by its key path joined with `sep` (list
/// elements by their index). io_error when two paths give the same name.
inline std::map<std::string, torch_tensor, std::less<>> flatten(const torch_node& node, std::string_view sep = ".") {
    std::map<std::string, torch_tensor, std::less<>> out;
    const std::function<void(const torch_node&, const std::string&)> walk = [&](const torch_node& n, const std::string& prefix) {
        const auto join = [&](const std::string& key) { return prefix.empty() ? key : prefix + std::string(sep) + key; };
        if (n.is_tensor()) {
            if (!out.emplace(prefix, n.tensor()).second)
                throw io_error(torch_component, "two tensors flatten to the name '" + prefix + "'");
        } else if (n.is_dict()) {
            for (std::size_t i = 0; i < n.keys().size(); ++i) walk(n.children()[i], join(n.keys()[i]));
        } else if (n.is_list()) {
            for (std::size_t i = 0; i < n.children().size(); ++i) walk(n.children()[i], join(std::to_string(i)));
        }
    };
    walk(node, "");
    return out;
}

/// A PyTorch checkpoint opened without executing it. Cheap to copy (the tree
/// is shared); tensors keep the file mapped for as long as they live.
class torch_checkpoint {
public:
    /// Maps and parses `path`; io_error naming the path on any failure.
    static torch_checkpoint open(const std::filesystem::path& path, const torch_checkpoint_options& options = {}) {
        auto owner = std::make_shared<detail::torch_bytes_owner>();
        owner->source = std::make_unique<detail::mapped_file>(path, torch_component);
        return parse(std::move(owner), path.string(), options);
    }

    /// Parses a private copy of `bytes`.
    static torch_checkpoint from_memory(std::span<const std::byte> bytes, const torch_checkpoint_options& options = {}) {
        auto owner = std::make_shared<detail::torch_bytes_owner>();
        owner->source = std::make_unique<detail::owned_bytes>(bytes);
        return parse(std::move(owner), "<memory>", options);
    }

    const torch_node& root() const noexcept { return *root_; }

    /// The node at a '.'-separated key path ("" is the root), e.g. "proj_module".
    const torch_node& subtree(std::string_view path) const {
        const torch_node* n = root_.get();
        while (!path.empty()) {
            const auto dot = path.find('.');
            const std::string_view key = path.substr(0, dot);
            n = &n->at(key);
            path = dot == std::string_view::npos ? std::string_view{} : path.substr(dot + 1);
        }
        return *n;
    }

    /// Every tensor of the checkpoint by its joined key path.
    std::map<std::string, torch_tensor, std::less<>> flatten(std::string_view sep = ".") const { return io::flatten(*root_, sep); }

    /// "zip" (torch.save's default since 1.6) or "legacy".
    const std::string& format() const noexcept { return format_; }
    const std::string& source() const noexcept { return source_; }

private:
    using storage_ptr = std::shared_ptr<const detail::torch_storage>;
    using resolver = std::function<storage_ptr(const detail::pickle_storage&)>;

    [[noreturn]] static void fail(const std::string& source, const std::string& message) {
        throw io_error(torch_component, source + ": " + message);
    }

    static torch_checkpoint parse(std::shared_ptr<detail::torch_bytes_owner> owner, std::string source,
                                  const torch_checkpoint_options& options) {
        const auto bytes = owner->source->bytes();
        const auto starts = [&](std::string_view magic) {
            return bytes.size() >= magic.size() && std::memcmp(bytes.data(), magic.data(), magic.size()) == 0;
        };
        if (starts("PK\x03\x04") || starts(std::string_view("PK\x05\x06", 4))) return parse_zip(std::move(owner), std::move(source), options);
        if (bytes.size() >= 3 && bytes[0] == std::byte{0x80} && bytes[1] == std::byte{0x02} && bytes[2] == std::byte{0x8a})
            return parse_legacy(std::move(owner), std::move(source), options);
        if (bytes.size() >= 262 && std::memcmp(bytes.data() + 257, "ustar", 5) == 0)
            fail(source, "tar-format checkpoints (torch before 0.4) are not supported");
        fail(source, "not a PyTorch checkpoint (neither a torch.save ZIP archive nor a legacy torch.save stream)");
    }

    static torch_checkpoint parse_zip(std::shared_ptr<detail::torch_bytes_owner> owner, std::string source,
                                      const torch_checkpoint_options& options) {
        detail::zip_limits zl;
        zl.max_inflated_bytes = options.max_inflated_bytes;
        const auto zip = detail::zip_archive::parse(owner->source->bytes(), source, zl, torch_component);

        // torch names every record "<archive>/<record>"; the archive name is
        // whatever prefix data.pkl has.
        std::string prefix;
        int found = 0;
        for (const auto& e : zip.entries()) {
            const auto slash = e.name.find('/');
            if (slash != std::string::npos && e.name.substr(slash + 1) == "data.pkl") {
                prefix = e.name.substr(0, slash + 1);
                ++found;
            }
        }
        if (found == 0) fail(source, "ZIP archive has no '<name>/data.pkl' record: not a torch.save checkpoint");
        if (found > 1) fail(source, "ZIP archive has " + std::to_string(found) + " data.pkl records");

        bool big_endian = false;
        if (const auto* e = zip.find(prefix + "byteorder")) {
            const auto data = zip.read(*e, true, 16);
            const std::string_view order(reinterpret_cast<const char*>(data.bytes.data()), data.bytes.size());
            if (order == "big") big_endian = true;
            else if (order != "little") fail(source, "byteorder record says '" + std::string(order) + "'");
        }

        const auto pickle = zip.read(*zip.find(prefix + "data.pkl"), true, options.max_pickle_bytes);
        if (pickle.owner) owner->inflated.push_back(pickle.owner);
        detail::pickle_machine machine(source + ":" + prefix + "data.pkl", options.pickle);
        machine.run(pickle.bytes);

        std::map<std::string, storage_ptr, std::less<>> cache;
        const resolver resolve = [&](const detail::pickle_storage& s) -> storage_ptr {
            const std::size_t es = size_of(s.type);
            if (const auto it = cache.find(s.key); it != cache.end()) {
                if (it->second->type != s.type || it->second->bytes.size() != static_cast<std::uint64_t>(s.numel) * es)
                    fail(source, "storage '" + s.key + "' is referenced with two different types or sizes");
                return it->second;
            }
            const auto* e = zip.find(prefix + "data/" + s.key);
            if (!e) fail(source, "storage '" + s.key + "' has no record '" + prefix + "data/" + s.key + "'");
            const auto data = zip.read(*e, options.verify_crc, options.max_inflated_bytes);
            if (data.owner) owner->inflated.push_back(data.owner);
            if (static_cast<std::uint64_t>(s.numel) > data.bytes.size() / es || data.bytes.size() != static_cast<std::uint64_t>(s.numel) * es)
                fail(source, "storage '" + s.key + "' should hold " + std::to_string(s.numel) + " " + std::string(name_of(s.type)) +
                                 " elements but its record is " + std::to_string(data.bytes.size()) + " bytes");
            auto st = std::make_shared<detail::torch_storage>();
            st->type = s.type;
            st->key = s.key;
            st->bytes = data.bytes;
            st->big_endian = big_endian;
            st->owner = owner;
            cache.emplace(s.key, st);
            return st;
        };
        return finish(machine, machine.result(), resolve, source, "zip", options);  // resolve still reads `source`
    }

    static torch_checkpoint parse_legacy(std::shared_ptr<detail::torch_bytes_owner> owner, std::string source,
                                         const torch_checkpoint_options& options) {
        const auto bytes = owner->source->bytes();
        const std::span<const std::byte> head = bytes.subspan(0, std::min(bytes.size(), options.max_pickle_bytes));
        detail::pickle_machine machine(source, options.pickle);
        std::size_t pos = machine.run(head);
        static constexpr std::uint8_t magic[] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
        if (!machine.is_big_integer(machine.result(), magic)) fail(source, "legacy stream does not start with torch's magic number");
        pos = machine.run(head, pos);
        const auto& version = machine.value(machine.result());
        if (version.kind != detail::pickle_kind::integer || version.integer != 1001)
            fail(source, "legacy protocol version is not 1001");
        pos = machine.run(head, pos);
        bool big_endian = false;
        {
            const auto& info = machine.value(machine.result());
            if (info.kind != detail::pickle_kind::dict) fail(source, "legacy system info is not a dict");
            for (std::size_t i = 0; i + 1 < info.items.size(); i += 2) {
                const auto& k = machine.value(info.items[i]);
                const auto& v = machine.value(info.items[i + 1]);
                if (k.kind == detail::pickle_kind::string && k.text == "little_endian" && v.kind == detail::pickle_kind::boolean)
                    big_endian = !v.flag;
            }
        }
        pos = machine.run(head, pos);
        const std::uint32_t object = machine.result();
        pos = machine.run(head, pos);
        const auto& keys_value = machine.value(machine.result());
        if (keys_value.kind != detail::pickle_kind::list) fail(source, "legacy storage key list is not a list");
        std::vector<std::string> keys;
        for (const auto k : keys_value.items) {
            const auto& kv = machine.value(k);
            if (kv.kind != detail::pickle_kind::string) fail(source, "legacy storage key is not a string");
            keys.push_back(kv.text);
        }

        // Every storage the object tree names, with its type and full size.
        std::map<std::string, detail::pickle_storage, std::less<>> wanted;
        for (std::uint32_t i = 0; i < machine.value_count(); ++i) {
            const auto& v = machine.value(i);
            if (v.kind != detail::pickle_kind::storage) continue;
            const auto root_numel = v.storage.root_numel >= 0 ? v.storage.root_numel : v.storage.numel;
            const auto [it, inserted] = wanted.emplace(v.storage.key, v.storage);
            if (inserted) it->second.numel = root_numel;
            else if (it->second.type != v.storage.type || it->second.numel != root_numel)
                fail(source, "storage '" + v.storage.key + "' is referenced with two different types or sizes");
        }

        // The raw storages follow, in key-list order: an int64 element count, then the elements.
        std::map<std::string, std::span<const std::byte>, std::less<>> blobs;
        for (const auto& key : keys) {
            const auto it = wanted.find(key);
            if (it == wanted.end()) fail(source, "legacy storage '" + key + "' is listed but never used, so its type is unknown");
            if (bytes.size() - pos < 8) fail(source, "truncated: storage '" + key + "' is missing");
            std::uint64_t count = detail::load_le<std::uint64_t>(bytes.data() + pos);
            if (big_endian) count = detail::byte_swap(count);
            pos += 8;
            const std::size_t es = size_of(it->second.type);
            if (count != static_cast<std::uint64_t>(it->second.numel))
                fail(source, "storage '" + key + "' holds " + std::to_string(count) + " elements, the pickle says " +
                                 std::to_string(it->second.numel));
            if (count > (bytes.size() - pos) / es) fail(source, "truncated: storage '" + key + "' runs past the end of the file");
            if (!blobs.emplace(key, bytes.subspan(pos, static_cast<std::size_t>(count * es))).second)
                fail(source, "storage '" + key + "' is listed twice");
            pos += static_cast<std::size_t>(count * es);
        }

        std::map<std::string, storage_ptr, std::less<>> cache;
        const resolver resolve = [&](const detail::pickle_storage& s) -> storage_ptr {
            const std::string id = s.key + "@" + std::to_string(s.offset) + "+" + std::to_string(s.numel);
            if (const auto it = cache.find(id); it != cache.end()) return it->second;
            const auto it = blobs.find(s.key);
            if (it == blobs.end()) fail(source, "storage '" + s.key + "' is not in the file");
            const std::size_t es = size_of(s.type);
            auto st = std::make_shared<detail::torch_storage>();
            st->type = s.type;
            st->key = s.key;
            st->bytes = it->second.subspan(static_cast<std::size_t>(s.offset) * es, static_cast<std::size_t>(s.numel) * es);
            st->big_endian = big_endian;
            st->owner = owner;
            cache.emplace(id, st);
            return st;
        };
        return finish(machine, object, resolve, source, "legacy", options);
    }

    static torch_checkpoint finish(const detail::pickle_machine& machine, std::uint32_t object, const resolver& resolve,
                                   std::string source, std::string format, const torch_checkpoint_options& options) {
        torch_checkpoint ckpt;
        ckpt.root_ = std::make_shared<torch_node>(build(machine, object, resolve, 0, source, options));
        ckpt.source_ = std::move(source);
        ckpt.format_ = std::move(format);
        return ckpt;
    }

    static torch_node build(const detail::pickle_machine& m, std::uint32_t index, const resolver& resolve, int depth,
                            const std::string& source, const torch_checkpoint_options& options) {
        using pk = detail::pickle_kind;
        if (depth > options.max_depth)
            fail(source, "object tree nests deeper than " + std::to_string(options.max_depth) + " levels (or refers to itself)");
        const auto& v = m.value(index);
        torch_node n;
        switch (v.kind) {
            case pk::none: n.kind_ = torch_node::kind::none; break;
            case pk::boolean: n.kind_ = torch_node::kind::boolean; n.integer_ = v.flag ? 1 : 0; break;
            case pk::integer: n.kind_ = torch_node::kind::integer; n.integer_ = v.integer; break;
            case pk::floating: n.kind_ = torch_node::kind::floating; n.real_ = v.real; break;
            case pk::string: n.kind_ = torch_node::kind::string; n.text_ = v.text; break;
            case pk::tuple:
            case pk::list:
                n.kind_ = torch_node::kind::list;
                for (const auto item : v.items) n.children_.push_back(build(m, item, resolve, depth + 1, source, options));
                break;
            case pk::dict: {
                n.kind_ = torch_node::kind::dict;
                std::map<std::string, std::size_t, std::less<>> seen;
                for (std::size_t i = 0; i + 1 < v.items.size(); i += 2) {
                    const auto& k = m.value(v.items[i]);
                    std::string key;
                    if (k.kind == pk::string) key = k.text;
                    else if (k.kind == pk::integer) key = std::to_string(k.integer);
                    else fail(source, "dict key is " + m.describe(v.items[i]) + ", not a str or int");
                    auto child = build(m, v.items[i + 1], resolve, depth + 1, source, options);
                    if (const auto it = seen.find(key); it != seen.end()) {
                        n.children_[it->second] = std::move(child);  // later pair wins, as in Python
                    } else {
                        seen.emplace(key, n.keys_.size());
                        n.keys_.push_back(std::move(key));
                        n.children_.push_back(std::move(child));
                    }
                }
                break;
            }
            case pk::tensor: {
                const auto& t = v.tensor;
                auto storage = resolve(m.value(t.storage).storage);
                std::vector<index_t> sizes(t.sizes.begin(), t.sizes.end());
                std::vector<index_t> strides(t.strides.begin(), t.strides.end());
                n.kind_ = torch_node::kind::tensor;
                n.tensor_ = torch_tensor(std::move(storage), shape(sizes), std::move(strides), t.offset);
                break;
            }
            case pk::big_integer: fail(source, "integers wider than 64 bits are not supported");
            case pk::bytes: fail(source, "bytes values are not supported");
            case pk::global: fail(source, "a bare " + m.describe(index) + " is not a checkpoint value");
            case pk::storage: fail(source, "bare storages (saved without a tensor) are not supported");
        }
        return n;
    }

    std::shared_ptr<const torch_node> root_;
    std::string source_;
    std::string format_;
};

/// A safetensors writer holding every tensor below `node` (names joined with
/// "."), each copied into row-major little-endian order. Views sharing a
/// storage become independent tensors (safetensors has no aliasing).
inline safetensors_writer to_safetensors_writer(const torch_node& node) {
    safetensors_writer w;
    for (const auto& [name, t] : flatten(node)) {
        const auto data = t.contiguous_bytes();
        w.add_bytes(name, t.type(), t.dims(), data);
    }
    w.set_metadata("format", "pt");
    return w;
}

/// Converts the tensors of `bin_path` (or of one subtree, e.g. "proj_module")
/// into a safetensors file at `out_path` (written atomically).
///
///     dynamicid::io::convert_to_safetensors("IMR.bin", "IMR.safetensors");
///     dynamicid::io::convert_to_safetensors("SAA.bin", "proj.safetensors", "proj_module");
inline void convert_to_safetensors(const std::filesystem::path& bin_path, const std::filesystem::path& out_path,
                                   std::string_view subtree = {}, const torch_checkpoint_options& options = {}) {
    const auto ckpt = torch_checkpoint::open(bin_path, options);
    to_safetensors_writer(ckpt.subtree(subtree)).write(out_path);
}

/// The tensors below `subtree` of an opened checkpoint as a weight_source,
/// through an in-memory safetensors image. Costs a copy: the tensors are
/// gathered into a safetensors image, which safetensors_file::from_memory
/// copies once more (the image is freed before returning, so the lasting
/// cost is one copy of the tensors; the peak is about two). For repeated
/// use, convert_to_safetensors once and memory-map the result instead.
///
///     auto ckpt = dynamicid::io::torch_checkpoint::open("SAA.bin");
///     auto proj = dynamicid::io::torch_weight_source(ckpt, "proj_module");
///     auto saa = dynamicid::io::torch_weight_source(ckpt, "SAA_module");
inline modules::weight_source torch_weight_source(const torch_checkpoint& ckpt, std::string_view subtree = {},
                                                  modules::weight_source::key_map map = {}) {
    std::vector<std::byte> image = to_safetensors_writer(ckpt.subtree(subtree)).to_bytes();
    auto file = std::make_shared<const safetensors_file>(safetensors_file::from_memory(image));
    return modules::weight_source({std::move(file)}, std::move(map));
}

/// Opens `path` and returns the tensors below `subtree` as a weight_source (see above).
inline modules::weight_source open_torch_weights(const std::filesystem::path& path, std::string_view subtree = {},
                                                 const torch_checkpoint_options& options = {}) {
    return torch_weight_source(torch_checkpoint::open(path, options), subtree);
}

}  // namespace dynamicid::io
