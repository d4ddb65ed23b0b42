// dynamicid face: reading ONNX files through ONNX's protobuf classes.
//
// Needs the dynamicid::onnx target (ONNX::onnx_proto and protobuf). Files are
// treated as hostile: sizes are bounded before anything is allocated,
// malformed protobuf is an io_error, every tensor's byte count is checked
// against its dims, and external data must stay inside the model's folder.
//
//     auto m = dynamicid::face::onnx::read_model("models/buffalo_l/det_10g.onnx");
//     auto t = dynamicid::face::onnx::read_tensor_file("test_data_set_0/input_0.pb");
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/face/onnx/graph.hpp>

#include <onnx/onnx_pb.h>

#include <bit>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <unordered_set>
#include <vector>

namespace dynamicid::face::onnx {

/// Bounds on what a file may make the reader allocate.
struct read_limits {
    std::uint64_t max_file_bytes = 1ull << 30;          ///< the .onnx (or .pb) file itself
    std::uint64_t max_tensor_elements = 1ull << 28;     ///< per tensor
    std::uint64_t max_external_bytes = 2ull << 30;      ///< one external-data file
    std::size_t max_nodes = 1u << 20;
};

namespace detail {

inline constexpr std::string_view component = "onnx";

inline std::vector<char> read_bounded(const std::filesystem::path& path, std::uint64_t limit, std::uint64_t offset = 0,
                                      std::optional<std::uint64_t> length = std::nullopt) {
    std::error_code ec;
    check<io_error>(std::filesystem::is_regular_file(path, ec), component, "cannot open '", path.string(), "': not a regular file");
    const auto size = std::filesystem::file_size(path, ec);
    check<io_error>(!ec, component, "cannot stat '", path.string(), "'");
    check<io_error>(offset <= size, component, "'", path.string(), "': offset ", offset, " beyond the file's ", size, " bytes");
    const std::uint64_t count = length ? *length : size - offset;
    check<io_error>(count <= size - offset, component, "'", path.string(), "': ", count, " bytes at offset ", offset,
                    " run past the file's end (", size, " bytes)");
    check<io_error>(count <= limit, component, "'", path.string(), "' is ", count, " bytes, over the limit of ", limit);
    std::ifstream in(path, std::ios::binary);
    check<io_error>(static_cast<bool>(in), component, "cannot open '", path.string(), "'");
    std::vector<char> bytes(static_cast<std::size_t>(count));
    in.seekg(static_cast<std::streamoff>(offset));
    if (count) in.read(bytes.data(), static_cast<std::streamsize>(count));
    check<io_error>(static_cast<bool>(in), component, "cannot read '", path.string(), "'");
    return bytes;
}

inline element_type convert_type(int t, const std::string& what) {
    using TP = ::onnx::TensorProto;
    switch (t) {
        case TP::FLOAT: return element_type::f32;
        case TP::INT64: return element_type::i64;
        case TP::INT32: return element_type::i32;
        case TP::UINT8: return element_type::u8;
        case TP::INT8: return element_type::i8;
        case TP::BOOL: return element_type::boolean;
        default: break;
    }
    static constexpr const char* names[] = {"UNDEFINED", "FLOAT",  "UINT8",   "INT8",      "UINT16",     "INT16",
                                            "INT32",     "INT64",  "STRING",  "BOOL",      "FLOAT16",    "DOUBLE",
                                            "UINT32",    "UINT64", "COMPLEX64", "COMPLEX128", "BFLOAT16"};
    const std::string name = t >= 0 && t < 17 ? names[t] : std::to_string(t);
    throw unsupported_error(component, what + " has element type " + name + ", which is not supported");
}

inline std::size_t byte_width(element_type t) {
    switch (t) {
        case element_type::f32: case element_type::i32: return 4;
        case element_type::i64: return 8;
        default: return 1;
    }
}

template <class T>
T load_le(const char* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    if constexpr (std::endian::native == std::endian::big) {
        auto* b = reinterpret_cast<unsigned char*>(&v);
        for (std::size_t i = 0; i < sizeof(T) / 2; ++i) std::swap(b[i], b[sizeof(T) - 1 - i]);
    }
    return v;
}

// Fills `out` from little-endian bytes of `out.type`.
inline void decode_raw(host_tensor& out, std::span<const char> raw, std::size_t n) {
    const auto w = byte_width(out.type);
    check<io_error>(raw.size() == n * w, component, "tensor '", out.name, "' holds ", raw.size(), " bytes, its dims need ", n * w);
    if (out.type == element_type::f32) {
        out.f32.resize(n);
        for (std::size_t i = 0; i < n; ++i) out.f32[i] = load_le<float>(raw.data() + 4 * i);
        return;
    }
    out.i64.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
        const char* p = raw.data() + w * i;
        switch (out.type) {
            case element_type::i64: out.i64[i] = load_le<std::int64_t>(p); break;
            case element_type::i32: out.i64[i] = load_le<std::int32_t>(p); break;
            case element_type::u8: out.i64[i] = static_cast<unsigned char>(*p); break;
            case element_type::i8: out.i64[i] = static_cast<signed char>(*p); break;
            case element_type::boolean: out.i64[i] = *p != 0; break;
            default: break;
        }
    }
}

// The external-data file, confined to `base` (the model's folder).
inline std::filesystem::path confined_path(const std::filesystem::path& base, const std::string& location, const std::string& tensor) {
    namespace fs = std::filesystem;
    check<io_error>(!base.empty(), component, "tensor '", tensor, "' uses external data, but the model was not read from a file");
    const fs::path rel(location);
    check<io_error>(!location.empty() && rel.is_relative() && !rel.has_root_name(), component, "tensor '", tensor,
                    "': external data location '", location, "' must be a relative path");
    for (const auto& part : rel)
        check<io_error>(part != "..", component, "tensor '", tensor, "': external data location '", location,
                        "' leaves the model's folder");
    std::error_code ec;
    const auto root = fs::weakly_canonical(base, ec);
    const auto full = fs::weakly_canonical(base / rel, ec);
    check<io_error>(!ec, component, "tensor '", tensor, "': cannot resolve external data '", location, "'");
    // Symbolic links must not lead out of the folder either.
    auto r = root.begin();
    auto f = full.begin();
    for (; r != root.end(); ++r, ++f)
        check<io_error>(f != full.end() && *r == *f, component, "tensor '", tensor, "': external data '", location,
                        "' resolves outside the model's folder");
    return full;
}

inline std::uint64_t checked_numel(const ::onnx::TensorProto& t, const read_limits& limits, std::vector<std::int64_t>& dims) {
    std::uint64_t n = 1;
    for (auto d : t.dims()) {
        check<io_error>(d >= 0, component, "tensor '", t.name(), "' has a negative dimension ", d);
        dims.push_back(d);
        if (d == 0) n = 0;
        else {
            check<io_error>(n <= limits.max_tensor_elements / static_cast<std::uint64_t>(d), component, "tensor '", t.name(),
                            "' has more than ", limits.max_tensor_elements, " elements");
            n *= static_cast<std::uint64_t>(d);
        }
    }
    return n;
}

inline host_tensor convert_tensor(const ::onnx::TensorProto& t, const std::filesystem::path& base, const read_limits& limits) {
    host_tensor out;
    out.name = t.name();
    out.type = convert_type(t.data_type(), "tensor '" + t.name() + "'");
    const auto n = static_cast<std::size_t>(checked_numel(t, limits, out.dims));
    if (t.data_location() == ::onnx::TensorProto::EXTERNAL) {
        std::string location;
        std::uint64_t offset = 0;
        std::optional<std::uint64_t> length;
        for (const auto& kv : t.external_data()) {
            auto number = [&](const std::string& s) {
                check<io_error>(!s.empty() && s.size() < 20 && s.find_first_not_of("0123456789") == std::string::npos, component,
                                "tensor '", t.name(), "': external data ", kv.key(), " '", s, "' is not a number");
                return static_cast<std::uint64_t>(std::stoull(s));
            };
            if (kv.key() == "location") location = kv.value();
            else if (kv.key() == "offset") offset = number(kv.value());
            else if (kv.key() == "length") length = number(kv.value());
        }
        const auto path = confined_path(base, location, t.name());
        const auto bytes = read_bounded(path, limits.max_external_bytes, offset, length ? length : std::optional<std::uint64_t>(n * byte_width(out.type)));
        decode_raw(out, bytes, n);
        return out;
    }
    if (t.has_raw_data()) {
        decode_raw(out, std::span<const char>(t.raw_data().data(), t.raw_data().size()), n);
        return out;
    }
    auto expect = [&](std::size_t have) {
        check<io_error>(have == n, component, "tensor '", t.name(), "' holds ", have, " values, its dims need ", n);
    };
    switch (t.data_type()) {
        case ::onnx::TensorProto::FLOAT:
            expect(static_cast<std::size_t>(t.float_data_size()));
            out.f32.assign(t.float_data().begin(), t.float_data().end());
            break;
        case ::onnx::TensorProto::INT64:
            expect(static_cast<std::size_t>(t.int64_data_size()));
            out.i64.assign(t.int64_data().begin(), t.int64_data().end());
            break;
        default:  // int32, uint8, int8 and bool share int32_data
            expect(static_cast<std::size_t>(t.int32_data_size()));
            out.i64.assign(t.int32_data().begin(), t.int32_data().end());
            if (out.type == element_type::boolean)
                for (auto& v : out.i64) v = v != 0;
            break;
    }
    return out;
}

inline std::optional<element_type> value_type(const ::onnx::ValueInfoProto& v) {
    if (!v.has_type() || !v.type().has_tensor_type()) return std::nullopt;
    try {
        return convert_type(v.type().tensor_type().elem_type(), "value '" + v.name() + "'");
    } catch (const unsupported_error&) {
        return std::nullopt;
    }
}

inline value_info convert_value_info(const ::onnx::ValueInfoProto& v) {
    value_info out{v.name(), value_type(v), {}};
    if (v.has_type() && v.type().has_tensor_type() && v.type().tensor_type().has_shape())
        for (const auto& d : v.type().tensor_type().shape().dim()) out.dims.push_back(d.has_dim_value() ? d.dim_value() : -1);
    return out;
}

inline attribute convert_attribute(const ::onnx::AttributeProto& a, const std::filesystem::path& base, const read_limits& limits) {
    using AP = ::onnx::AttributeProto;
    attribute out;
    out.name = a.name();
    switch (a.type()) {
        case AP::FLOAT: out.type = attribute::kind::f; out.f = a.f(); break;
        case AP::INT: out.type = attribute::kind::i; out.i = a.i(); break;
        case AP::STRING: out.type = attribute::kind::s; out.s = a.s(); break;
        case AP::TENSOR: out.type = attribute::kind::t; out.t = convert_tensor(a.t(), base, limits); break;
        case AP::FLOATS: out.type = attribute::kind::floats; out.floats.assign(a.floats().begin(), a.floats().end()); break;
        case AP::INTS: out.type = attribute::kind::ints; out.ints.assign(a.ints().begin(), a.ints().end()); break;
        case AP::STRINGS: out.type = attribute::kind::strings; out.strings.assign(a.strings().begin(), a.strings().end()); break;
        case AP::GRAPH: out.type = attribute::kind::graph; break;
        default: out.type = attribute::kind::other; break;
    }
    return out;
}

}  // namespace detail

/// Parses a serialised ModelProto. `base` is the folder external data is
/// read from (and confined to); empty when the bytes did not come from a file.
inline model parse_model(std::span<const char> bytes, const std::filesystem::path& base = {}, const read_limits& limits = {},
                         const std::string& label = "model") {
    using detail::component;
    check<io_error>(bytes.size() <= limits.max_file_bytes && bytes.size() <= static_cast<std::size_t>(INT_MAX), component, label,
                    ": ", bytes.size(), " bytes is over the size limit");
    check<io_error>(!bytes.empty(), component, label, ": empty file");
    ::onnx::ModelProto proto;
    check<io_error>(proto.ParseFromArray(bytes.data(), static_cast<int>(bytes.size())), component, label,
                    ": not a valid ONNX model (malformed protobuf)");
    check<io_error>(proto.has_graph(), component, label, ": no graph");
    model m;
    m.ir_version = proto.ir_version();
    m.producer_name = proto.producer_name();
    m.opset = -1;
    for (const auto& op : proto.opset_import())
        if (op.domain().empty() || op.domain() == "ai.onnx") m.opset = op.version();
    check<io_error>(m.opset > 0, component, label, ": no opset for the default domain");
    const auto& g = proto.graph();
    check<io_error>(static_cast<std::size_t>(g.node_size()) <= limits.max_nodes, component, label, ": ", g.node_size(),
                    " nodes is over the limit");
    m.graph.name = g.name();
    std::unordered_set<std::string> known;
    for (const auto& t : g.initializer()) {
        check<io_error>(!t.name().empty(), component, label, ": an initializer has no name");
        check<io_error>(known.insert(t.name()).second, component, label, ": initializer '", t.name(), "' defined twice");
        m.graph.initializers.push_back(detail::convert_tensor(t, base, limits));
    }
    for (const auto& v : g.input()) {
        if (known.count(v.name())) continue;  // older exporters list initializers as inputs too
        check<io_error>(!v.name().empty() && known.insert(v.name()).second, component, label, ": graph input '", v.name(),
                        "' is unnamed or defined twice");
        m.graph.inputs.push_back(detail::convert_value_info(v));
    }
    for (const auto& n : g.node()) {
        node out{n.name(), n.op_type(), n.domain(), {}, {}, {}};
        for (const auto& in : n.input()) {
            check<io_error>(in.empty() || known.count(in), component, label, ": node '", n.name(), "' (", n.op_type(),
                            ") reads '", in, "', which nothing before it defines");
            out.inputs.push_back(in);
        }
        for (const auto& o : n.output()) {
            if (!o.empty())
                check<io_error>(known.insert(o).second, component, label, ": value '", o, "' is defined twice");
            out.outputs.push_back(o);
        }
        for (const auto& a : n.attribute()) out.attributes.push_back(detail::convert_attribute(a, base, limits));
        m.graph.nodes.push_back(std::move(out));
    }
    for (const auto& v : g.output()) {
        check<io_error>(known.count(v.name()), component, label, ": graph output '", v.name(), "' is never computed");
        m.graph.outputs.push_back(detail::convert_value_info(v));
    }
    return m;
}

/// Reads a .onnx file; external data is looked up next to it.
/// 'path' for messages (built with append: GCC 12 warns falsely on "'" + string).
inline std::string quoted_path(const std::filesystem::path& path) {
    std::string out(1, '\'');
    out.append(path.string()).push_back('\'');
    return out;
}

inline model read_model(const std::filesystem::path& path, const read_limits& limits = {}) {
    const auto bytes = detail::read_bounded(path, limits.max_file_bytes);
    return parse_model(bytes, path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path(), limits,
                       quoted_path(path));
}

/// Parses a serialised TensorProto (the .pb files of ONNX's conformance tests).
inline host_tensor parse_tensor(std::span<const char> bytes, const read_limits& limits = {}, const std::string& label = "tensor") {
    using detail::component;
    check<io_error>(bytes.size() <= limits.max_file_bytes && bytes.size() <= static_cast<std::size_t>(INT_MAX), component, label,
                    ": over the size limit");
    ::onnx::TensorProto proto;
    check<io_error>(proto.ParseFromArray(bytes.data(), static_cast<int>(bytes.size())), component, label,
                    ": not a valid TensorProto (malformed protobuf)");
    return detail::convert_tensor(proto, {}, limits);
}

/// Reads a serialised TensorProto file.
inline host_tensor read_tensor_file(const std::filesystem::path& path, const read_limits& limits = {}) {
    const auto bytes = detail::read_bounded(path, limits.max_file_bytes);
    return parse_tensor(bytes, limits, "'" + path.string() + "'");
}

}  // namespace dynamicid::face::onnx
