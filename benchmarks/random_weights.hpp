// dynamicid benchmarks: random weights for any module, built from its config
// (no checkpoint), shared by the backend benchmarks.
//
//     cpu_backend::context ctx;
//     const auto source = dynamicid::bench::random_weight_source<cpu_backend, float>(
//         ctx, [&](auto& b) { (void)unet_2d_condition<cpu_backend>::bind(b, cfg); }, 1234);
//     const auto unet = unet_2d_condition<cpu_backend>::load(ctx, source, cfg);
//
// The module is bound twice through weight_binder. The first pass maps every
// key to one probe tensor of shape (1), so the binder lists every parameter
// with the shape it expected; the second maps each key to a prototype tensor
// of its shape (N(0, 1) / sqrt(fan_in) for matrices and kernels, ones for norm
// scales, zeros for biases). The source is backend-neutral: every backend and
// element type binds (and converts) from the same small in-memory file.
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/weights.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace dynamicid::bench {

/// A parameter the binder asked for: its key and expected shape.
struct parameter_request {
    std::string key;
    std::vector<index_t> dims;
};

/// Parses "'<key>' has shape (1), expected (a, b, ...)" (weight_binder's wording).
inline bool parse_problem(const std::string& problem, parameter_request& out) {
    const std::string marker = "' has shape (1), expected (";
    const auto end_key = problem.find(marker);
    if (problem.size() < 2 || problem.front() != '\'' || end_key == std::string::npos) return false;
    out.key = problem.substr(1, end_key - 1);
    out.dims.clear();
    std::string_view rest = std::string_view(problem).substr(end_key + marker.size());
    while (!rest.empty() && rest.front() != ')') {
        std::size_t used = 0;
        out.dims.push_back(std::stoll(std::string(rest), &used));
        rest.remove_prefix(used);
        while (!rest.empty() && (rest.front() == ',' || rest.front() == ' ')) rest.remove_prefix(1);
    }
    return true;
}

/// A weight_source whose every key resolves to a random tensor of the shape a
/// module asks for. `bind(weight_binder<B, T>&)` binds the module once.
template <class B, class T, class Bind>
modules::weight_source random_weight_source(context_t<B>& ctx, Bind&& bind, std::uint64_t seed) {
    io::safetensors_writer probe_writer;
    probe_writer.add("probe", shape({1}), std::vector<float>{0.0f});
    const auto probe_bytes = probe_writer.to_bytes();
    auto probe_file = std::make_shared<const io::safetensors_file>(io::safetensors_file::from_memory(probe_bytes));
    modules::weight_source probe({probe_file}, [](std::string_view) { return std::string("probe"); });
    modules::weight_binder<B, T> probe_binder(ctx, probe);
    bind(probe_binder);

    std::map<std::string, std::string> key_to_proto;
    io::safetensors_writer writer;
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    parameter_request request;
    std::set<std::string> seen;
    for (const auto& problem : probe_binder.problems()) {
        if (!parse_problem(problem, request)) throw value_error("bench", "unexpected binder problem: " + problem);
        const bool vector = request.dims.size() == 1;
        const bool norm_scale = vector && request.key.ends_with(".weight");
        std::string proto = vector ? (norm_scale ? "ones" : "zeros") : "normal";
        for (auto d : request.dims) {
            proto += '_';
            proto += std::to_string(d);
        }
        key_to_proto[request.key] = proto;
        if (!seen.insert(proto).second) continue;
        const shape s(request.dims);
        std::vector<float> values(static_cast<std::size_t>(s.numel()));
        if (vector) {
            std::fill(values.begin(), values.end(), norm_scale ? 1.0f : 0.0f);
        } else {
            const double fan_in = static_cast<double>(s.numel() / s[0]);
            const float gain = static_cast<float>(1.0 / std::sqrt(fan_in));
            for (auto& v : values) v = normal(rng) * gain;
        }
        writer.add(proto, s, values);
    }
    const auto bytes = writer.to_bytes();
    auto file = std::make_shared<const io::safetensors_file>(io::safetensors_file::from_memory(bytes));
    return modules::weight_source({file}, [map = std::move(key_to_proto)](std::string_view key) {
        const auto it = map.find(std::string(key));
        return it == map.end() ? std::string(key) : it->second;
    });
}

}  // namespace dynamicid::bench
