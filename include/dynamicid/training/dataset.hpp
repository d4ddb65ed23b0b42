// dynamicid training: the JSON-lines manifests of the two training stages and
// a deterministic, resumable sample order.
//
// Anchoring stage, one single-person image per line:
//
//     {"image": "imgs/0001.png", "text": "a man in a red hat on the beach", "arcface": "emb/0001.safetensors"}
//     {"image": "imgs/0002.png", "text": "...", "arcface": [0.013, -0.021, ...]}
//
// Reconfiguration stage, several images of a person grouped by "person"; each
// has the 106 landmarks of its face (a file of "x y" lines or an inline array
// of 212 numbers, on `landmark_frame` x `landmark_frame` pixels, 512 by
// default) and its face prompt:
//
//     {"person": "p17", "image": "p17/a.png", "arcface": "p17/a.safetensors",
//      "landmarks": "p17/a_106.txt", "face_prompt": "the expression is happy, the face is front view"}
//
// Anchoring lines may carry "landmarks" too; the anchoring trainer uses them
// only to weight the face in its loss (anchor_trainer_config::face_loss_weight).
// The landmark frame stands for the whole image file, stretched to a square.
//
// Relative paths are relative to the manifest's folder. Optional keys:
// "reference" (the image the CLIP features come from; default "image").
// Unknown keys are ignored so manifests can carry more. Every problem is an
// io_error naming the manifest, the line and the key.
//
//     auto data = dynamicid::training::read_manifest("train.jsonl");
//     dynamicid::training::sample_order order(data.size(), /*seed=*/7);
//     for (std::size_t i = 0; i < 1000; ++i) { const auto& s = data[order.at(i)]; ... }
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/philox.hpp>
#include <dynamicid/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::training {

inline constexpr std::string_view dataset_component = "dataset";

/// One line of a manifest.
struct manifest_sample {
    std::filesystem::path image;      ///< the training image
    std::filesystem::path reference;  ///< CLIP features come from it (the image itself by default)
    std::string text;                 ///< caption ("" allowed)
    std::vector<float> arcface;       ///< the identity embedding
    std::string person;               ///< group key (reconfiguration stage); empty otherwise
    std::vector<float> landmarks;     ///< 106 (x, y) pairs, or empty
    std::string face_prompt;          ///< reconfiguration stage
};

/// Limits that keep a hostile manifest from exhausting memory.
struct manifest_limits {
    std::size_t max_line_bytes = 1 << 20;
    std::size_t max_samples = 10'000'000;
    std::size_t arcface_width = 512;  ///< 0: any width (all lines must agree)
    bool require_arcface = true;      ///< false: "arcface" may be absent (base-model training)
};

namespace detail {

inline std::vector<float> read_floats(const nlohmann::json& v, const std::string& where) {
    check<io_error>(v.is_array(), dataset_component, where, " is not an array of numbers");
    std::vector<float> out;
    out.reserve(v.size());
    for (const auto& x : v) {
        check<io_error>(x.is_number(), dataset_component, where, " holds a ", x.type_name(), ", not a number");
        const double d = x.get<double>();
        check<io_error>(std::isfinite(d), dataset_component, where, " holds a non-finite value");
        out.push_back(static_cast<float>(d));
    }
    return out;
}

inline std::vector<float> read_landmark_file(const std::filesystem::path& path, const std::string& where) {
    std::ifstream in(path);
    check<io_error>(static_cast<bool>(in), dataset_component, where, ": cannot open '", path.string(), "'");
    std::vector<float> out;
    double x = 0, y = 0;
    while (in >> x >> y) {
        check<io_error>(std::isfinite(x) && std::isfinite(y), dataset_component, where, ": non-finite landmark in '", path.string(), "'");
        out.push_back(static_cast<float>(x));
        out.push_back(static_cast<float>(y));
        check<io_error>(out.size() <= 4096, dataset_component, where, ": '", path.string(), "' holds too many landmarks");
    }
    check<io_error>(in.eof(), dataset_component, where, ": '", path.string(), "' is not \"x y\" number pairs");
    return out;
}

}  // namespace detail

/// Reads a JSON-lines manifest (blank lines and lines starting with '#' are skipped).
inline std::vector<manifest_sample> read_manifest(const std::filesystem::path& path, const manifest_limits& limits = {}) {
    std::ifstream in(path, std::ios::binary);
    check<io_error>(static_cast<bool>(in), dataset_component, "cannot open manifest '", path.string(), "'");
    const auto base = path.parent_path();
    const auto resolve = [&](const std::string& p) { return std::filesystem::path(p).is_absolute() ? std::filesystem::path(p) : base / p; };
    std::vector<manifest_sample> out;
    std::string line;
    std::size_t number = 0, width = limits.arcface_width;
    while (std::getline(in, line)) {
        ++number;
        const std::string where = path.filename().string() + ":" + std::to_string(number);
        check<io_error>(line.size() <= limits.max_line_bytes, dataset_component, where, ": line longer than ", limits.max_line_bytes, " bytes");
        const auto first = line.find_first_not_of(" \t\r");
        if (first == std::string::npos || line[first] == '#') continue;
        check<io_error>(out.size() < limits.max_samples, dataset_component, where, ": more than ", limits.max_samples, " samples");
        nlohmann::json j;
        try {
            j = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
            throw io_error(std::string(dataset_component), where + ": not JSON (" + e.what() + ")");
        }
        check<io_error>(j.is_object(), dataset_component, where, ": not a JSON object");
        const auto string_of = [&](const char* key, bool required) -> std::optional<std::string> {
            if (!j.contains(key)) {
                check<io_error>(!required, dataset_component, where, ": no \"", key, "\"");
                return std::nullopt;
            }
            check<io_error>(j[key].is_string(), dataset_component, where, ": \"", key, "\" is a ", j[key].type_name(), ", not a string");
            return j[key].get<std::string>();
        };
        manifest_sample s;
        s.image = resolve(*string_of("image", true));
        s.reference = string_of("reference", false) ? resolve(*string_of("reference", false)) : s.image;
        s.text = string_of("text", false).value_or("");
        s.person = string_of("person", false).value_or("");
        s.face_prompt = string_of("face_prompt", false).value_or("");
        check<io_error>(j.contains("arcface") || !limits.require_arcface, dataset_component, where, ": no \"arcface\"");
        if (!j.contains("arcface")) {
        } else if (j["arcface"].is_string()) {
            const auto file = io::safetensors_file::open(resolve(j["arcface"].get<std::string>()));
            const auto names = file.names();
            check<io_error>(names.size() == 1, dataset_component, where, ": the arcface file holds ", names.size(), " tensors, expected 1");
            s.arcface = file.to_vector<float>(names.front());
        } else {
            s.arcface = detail::read_floats(j["arcface"], where + ": \"arcface\"");
        }
        for (float v : s.arcface) check<io_error>(std::isfinite(v), dataset_component, where, ": the arcface embedding is not finite");
        if (width == 0) width = s.arcface.size();
        check<io_error>(s.arcface.size() == width, dataset_component, where, ": the arcface embedding has ", s.arcface.size(),
                        " values, expected ", width);
        if (j.contains("landmarks")) {
            s.landmarks = j["landmarks"].is_string() ? detail::read_landmark_file(resolve(j["landmarks"].get<std::string>()), where)
                                                     : detail::read_floats(j["landmarks"], where + ": \"landmarks\"");
            check<io_error>(s.landmarks.size() == 212, dataset_component, where, ": ", s.landmarks.size() / 2, " landmarks, expected 106");
        }
        out.push_back(std::move(s));
    }
    check<io_error>(!in.bad(), dataset_component, "cannot read manifest '", path.string(), "'");
    check<io_error>(!out.empty(), dataset_component, "manifest '", path.string(), "' has no samples");
    return out;
}

/// Indices of the samples of each person, in manifest order, persons sorted by key.
inline std::vector<std::vector<std::size_t>> group_by_person(const std::vector<manifest_sample>& samples) {
    std::map<std::string, std::vector<std::size_t>> groups;
    for (std::size_t i = 0; i < samples.size(); ++i) {
        check<io_error>(!samples[i].person.empty(), dataset_component, "sample ", i, " (", samples[i].image.string(), ") has no \"person\"");
        groups[samples[i].person].push_back(i);
    }
    std::vector<std::vector<std::size_t>> out;
    for (auto& [key, idx] : groups) out.push_back(std::move(idx));
    return out;
}

/// A reproducible order over `n` items: a fresh Philox-driven Fisher-Yates
/// shuffle per epoch. at(k) depends only on (n, seed, k), so a run resumed at
/// position k draws exactly what an uninterrupted run would.
class sample_order {
public:
    sample_order(std::size_t n, std::uint64_t seed, bool shuffle = true) : n_(n), seed_(seed), shuffle_(shuffle) {
        check<value_error>(n > 0, dataset_component, "sample_order over no items");
    }

    std::size_t size() const noexcept { return n_; }

    /// The item at global position `k` (epoch k / n, slot k % n).
    std::size_t at(std::uint64_t k) const {
        const std::uint64_t epoch = k / n_;
        if (epoch != cached_epoch_) fill(epoch);
        return perm_[static_cast<std::size_t>(k % n_)];
    }

private:
    void fill(std::uint64_t epoch) const {
        perm_.resize(n_);
        for (std::size_t i = 0; i < n_; ++i) perm_[i] = i;
        if (shuffle_) {
            const std::uint64_t stream = seed_ ^ (0x9e3779b97f4a7c15ull * (epoch + 1));
            for (std::size_t i = n_ - 1; i > 0; --i) {
                // 64 random bits per draw: the modulo bias is negligible for any realistic n.
                const std::uint64_t r = (static_cast<std::uint64_t>(philox::bits(stream, 2 * i)) << 32) | philox::bits(stream, 2 * i + 1);
                std::swap(perm_[i], perm_[static_cast<std::size_t>(r % (i + 1))]);
            }
        }
        cached_epoch_ = epoch;
    }

    std::size_t n_;
    std::uint64_t seed_;
    bool shuffle_;
    mutable std::vector<std::size_t> perm_;
    mutable std::uint64_t cached_epoch_ = ~std::uint64_t{0};
};

}  // namespace dynamicid::training
