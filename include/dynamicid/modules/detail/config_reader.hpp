// dynamicid modules, internal: reading diffusers config.json files.
//
// A reader collects every problem of a config (wrong types, unsupported
// settings) so that from_json can throw one value_error naming them all.
#pragma once

#include <dynamicid/core/config.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <string>
#include <vector>

namespace dynamicid::modules::detail {

/// Collects config problems so that one exception names them all.
struct config_reader {
    const nlohmann::json& j;
    std::vector<std::string> problems;

    bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }

    template <class V>
    void read(const char* key, V& out) {
        if (!has(key)) return;
        try {
            out = j[key].get<V>();
        } catch (const nlohmann::json::exception&) {
            problems.push_back(std::string("\"") + key + "\" has the wrong type: " + j[key].dump());
        }
    }

    /// An int (the same for every block) or a per-block list.
    void read_per_block(const char* key, std::vector<index_t>& out, std::size_t blocks) {
        if (!has(key)) {
            if (!out.empty() && out.size() != blocks) out.assign(blocks, out.front());
            return;
        }
        const auto& v = j[key];
        if (v.is_number_integer()) {
            out.assign(blocks, v.get<index_t>());
        } else if (v.is_array() && v.size() == blocks && std::all_of(v.begin(), v.end(), [](const auto& e) { return e.is_number_integer(); })) {
            out = v.get<std::vector<index_t>>();
        } else {
            problems.push_back(std::string("\"") + key + "\" must be an integer or a list of " + std::to_string(blocks) +
                               " integers, got " + v.dump());
        }
    }

    /// The key must be absent, null, or equal to `expected`.
    void require(const char* key, const nlohmann::json& expected, const char* why = "is not supported") {
        if (has(key) && j[key] != expected)
            problems.push_back(std::string("\"") + key + "\" = " + j[key].dump() + " " + why + " (supported: " + expected.dump() + ")");
    }
    /// The key must be absent or null.
    void require_null(const char* key) {
        if (has(key)) problems.push_back(std::string("\"") + key + "\" = " + j[key].dump() + " is not supported (supported: null)");
    }

    /// A list of `count` copies of `expected` (absent: taken as such).
    void require_all(const char* key, const std::string& expected, std::size_t count) {
        if (!has(key)) return;
        const auto& v = j[key];
        const bool ok = v.is_array() && v.size() == count &&
                        std::all_of(v.begin(), v.end(), [&](const auto& e) { return e.is_string() && e.template get<std::string>() == expected; });
        if (!ok)
            problems.push_back(std::string("\"") + key + "\" = " + v.dump() + " is not supported (supported: " + std::to_string(count) +
                               " x \"" + expected + "\", one per block_out_channels entry)");
    }
};

}  // namespace dynamicid::modules::detail
