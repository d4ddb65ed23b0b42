// dynamicid face: an ONNX model as plain C++ values (no protobuf types).
//
// The reader (`face/onnx/reader.hpp`) fills these from a .onnx file; the
// executor (`face/onnx/executor.hpp`) runs them. Keeping the protobuf classes
// out of this header lets code that only runs models avoid the ONNX headers.
//
//     auto m = dynamicid::face::onnx::read_model("det_10g.onnx");
//     for (const auto& n : m.graph.nodes) std::cout << n.op_type << '\n';
#pragma once

#include <dynamicid/core/error.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dynamicid::face::onnx {

/// Element types the executor computes with. Integer and boolean ONNX types
/// are held as int64 (their values fit); floating types other than f32 are
/// rejected by the reader with an unsupported_error.
enum class element_type : std::uint8_t { f32, i64, i32, u8, i8, boolean };

inline std::string_view name_of(element_type t) {
    switch (t) {
        case element_type::f32: return "float32";
        case element_type::i64: return "int64";
        case element_type::i32: return "int32";
        case element_type::u8: return "uint8";
        case element_type::i8: return "int8";
        case element_type::boolean: return "bool";
    }
    return "?";
}

inline bool is_float(element_type t) { return t == element_type::f32; }

/// A dense host tensor: f32 values in `f32`, every integer type in `i64`.
///
///     host_tensor t{.type = element_type::f32, .dims = {2, 3}, .f32 = std::vector<float>(6)};
struct host_tensor {
    std::string name;
    element_type type = element_type::f32;
    std::vector<std::int64_t> dims;
    std::vector<float> f32;
    std::vector<std::int64_t> i64;

    std::int64_t numel() const {
        std::int64_t n = 1;
        for (auto d : dims) n *= d;
        return n;
    }
    std::size_t size() const { return is_float(type) ? f32.size() : i64.size(); }
};

/// One node attribute; `kind` says which member holds the value.
struct attribute {
    enum class kind : std::uint8_t { f, i, s, t, floats, ints, strings, graph, other };
    std::string name;
    kind type = kind::other;
    float f = 0.0f;
    std::int64_t i = 0;
    std::string s;
    host_tensor t;
    std::vector<float> floats;
    std::vector<std::int64_t> ints;
    std::vector<std::string> strings;
};

/// One operator application. Empty input names are omitted optional inputs.
struct node {
    std::string name, op_type, domain;
    std::vector<std::string> inputs, outputs;
    std::vector<attribute> attributes;

    const attribute* find(std::string_view key) const {
        for (const auto& a : attributes)
            if (a.name == key) return &a;
        return nullptr;
    }
    std::int64_t attr_int(std::string_view key, std::int64_t fallback) const {
        const auto* a = find(key);
        return a && a->type == attribute::kind::i ? a->i : fallback;
    }
    float attr_float(std::string_view key, float fallback) const {
        const auto* a = find(key);
        return a && a->type == attribute::kind::f ? a->f : fallback;
    }
    std::string attr_string(std::string_view key, std::string fallback) const {
        const auto* a = find(key);
        return a && a->type == attribute::kind::s ? a->s : fallback;
    }
    std::vector<std::int64_t> attr_ints(std::string_view key, std::vector<std::int64_t> fallback = {}) const {
        const auto* a = find(key);
        return a && a->type == attribute::kind::ints ? a->ints : fallback;
    }
    std::vector<float> attr_floats(std::string_view key, std::vector<float> fallback = {}) const {
        const auto* a = find(key);
        return a && a->type == attribute::kind::floats ? a->floats : fallback;
    }
    /// Input i, or "" when it is absent or omitted.
    const std::string& input(std::size_t i) const {
        static const std::string none;
        return i < inputs.size() ? inputs[i] : none;
    }
};

/// A graph input or output: name, element type and dims (-1 where symbolic).
struct value_info {
    std::string name;
    std::optional<element_type> type;
    std::vector<std::int64_t> dims;
};

/// Nodes in topological order, weights, and the graph's interface.
struct graph {
    std::string name;
    std::vector<node> nodes;
    std::vector<host_tensor> initializers;
    std::vector<value_info> inputs;  ///< without the inputs that are initializers
    std::vector<value_info> outputs;
};

/// A whole model: the graph and the operator-set version it targets.
struct model {
    std::int64_t ir_version = 0;
    std::int64_t opset = 0;  ///< version of the default ("" / ai.onnx) domain
    std::string producer_name;
    onnx::graph graph;
};

}  // namespace dynamicid::face::onnx
