// dynamicid modules: binding weights to modules by name.
//
// A checkpoint is one or more safetensors files (diffusers shards, a single
// SD file, a converted .bin). A weight_source presents them as one key space,
// optionally through a key translation (e.g. original LDM names -> diffusers
// names). A weight_binder walks a module's parameters, converting each to the
// working type on the way to the backend, and collects *every* missing or
// misshapen tensor before it throws, so one run reports all problems at once.
//
//     auto source = dynamicid::modules::weight_source::open({"unet/diffusion_pytorch_model.safetensors"});
//     dynamicid::modules::weight_binder<dynamicid::cpu_backend, float> bind(ctx, source);
//     auto w = bind.tensor("conv_in.weight", {320, 4, 3, 3});
//     auto block = bind.scope("down_blocks.0");     // keys below "down_blocks.0."
//     bind.finish();                                // throws io_error listing every problem
//
// A binder given an initializer creates the tensors its source lacks instead
// of reporting them (a model trained from scratch binds exactly like a loaded
// one):
//
//     dynamicid::modules::weight_binder<B, float> fresh(ctx, {}, "", dynamicid::modules::torch_default_init(42));
//     auto imr = dynamicid::modules::imr::imr_model<B>(cfg, dynamicid::modules::imr::imr_model<B>::bind(fresh, cfg));
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/philox.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/safetensors.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace dynamicid::modules {

/// One key space over several safetensors files. Cheap to copy (files are shared).
class weight_source {
public:
    /// Maps a module key (what the binder asks for) to the key stored in the files.
    using key_map = std::function<std::string(std::string_view)>;

    weight_source() = default;
    explicit weight_source(std::vector<std::shared_ptr<const io::safetensors_file>> files, key_map map = {})
        : files_(std::move(files)), map_(std::move(map)) {}

    /// Opens (memory-maps) every file.
    static weight_source open(const std::vector<std::filesystem::path>& paths, key_map map = {}) {
        std::vector<std::shared_ptr<const io::safetensors_file>> files;
        for (const auto& p : paths) files.push_back(std::make_shared<const io::safetensors_file>(io::safetensors_file::open(p)));
        return weight_source(std::move(files), std::move(map));
    }

    /// The same files seen through another key translation.
    weight_source with_map(key_map map) const { return weight_source(files_, std::move(map)); }

    /// The file holding `key` (after translation), or nullptr.
    const io::safetensors_file* find(std::string_view key, std::string* stored_key = nullptr) const {
        const std::string stored = map_ ? map_(key) : std::string(key);
        for (const auto& f : files_)
            if (f->contains(stored)) {
                if (stored_key) *stored_key = stored;
                return f.get();
            }
        return nullptr;
    }

    bool contains(std::string_view key) const { return find(key) != nullptr; }

    /// Every stored key of every file.
    std::vector<std::string> stored_keys() const {
        std::vector<std::string> out;
        for (const auto& f : files_)
            for (auto& n : f->names()) out.push_back(std::move(n));
        return out;
    }

    const std::vector<std::shared_ptr<const io::safetensors_file>>& files() const noexcept { return files_; }

private:
    std::vector<std::shared_ptr<const io::safetensors_file>> files_;
    key_map map_;
};

/// Makes the values of a tensor a weight_source lacks: (full key, shape) -> values
/// in row-major order (one per element).
using weight_initializer = std::function<std::vector<float>(const std::string&, const shape&)>;

/// torch's default initialisation of the layers modules are made of, decided by
/// key and shape and drawn from Philox streams keyed by (seed, key), so the
/// values do not depend on the order modules bind in:
///   - "<x>.weight" of rank >= 2 (nn.Linear, nn.Conv2d): U(-b, b), b = 1/sqrt(fan_in)
///     with fan_in = the product of every dimension but the first (what
///     kaiming_uniform_(a=sqrt(5)) gives);
///   - "<x>.bias" after such a weight: U(-b, b) with the same b; otherwise 0;
///   - other rank-1 "weight"s (LayerNorm, GroupNorm, BatchNorm) and
///     "running_var": 1; "running_mean" and anything else of rank 1: 0;
///   - any other tensor of rank >= 2 (embeddings, latents): N(0, 1).
/// The bias rule needs the weight first, the order every layer binds in.
inline weight_initializer torch_default_init(std::uint64_t seed) {
    auto fan_in = std::make_shared<std::map<std::string, double>>();
    return [seed, fan_in](const std::string& key, const shape& dims) {
        const auto dot = key.rfind('.');
        const std::string owner = dot == std::string::npos ? std::string() : key.substr(0, dot);
        const std::string leaf = dot == std::string::npos ? key : key.substr(dot + 1);
        std::uint64_t h = 0xcbf29ce484222325ull ^ seed;  // FNV-1a of the key, salted with the seed
        for (const unsigned char ch : key) h = (h ^ ch) * 0x100000001b3ull;
        std::vector<float> v(static_cast<std::size_t>(dims.numel()), 0.0f);
        const auto uniform = [&](double bound) {
            for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>((2.0 * philox::uniform(h, i) - 1.0) * bound);
        };
        if (leaf == "weight" && dims.rank() >= 2) {
            double fan = 1.0;
            for (int d = 1; d < dims.rank(); ++d) fan *= static_cast<double>(dims[d]);
            (*fan_in)[owner] = fan;
            uniform(fan > 0 ? 1.0 / std::sqrt(fan) : 0.0);
        } else if (leaf == "bias") {
            if (const auto it = fan_in->find(owner); it != fan_in->end() && it->second > 0) uniform(1.0 / std::sqrt(it->second));
        } else if (dims.rank() <= 1) {
            if (leaf == "weight" || leaf == "running_var") std::fill(v.begin(), v.end(), 1.0f);
        } else {
            for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(philox::normal(h, i));
        }
        return v;
    };
}

/// Binds tensors of a weight_source to a module, converting to T on backend B.
template <class B, class T>
    requires backend<B>
class weight_binder {
public:
    using tensor_type = dynamicid::tensor<B, T>;

    weight_binder(context_t<B>& ctx, weight_source source, std::string prefix = {}, weight_initializer init = {})
        : ctx_(&ctx),
          source_(std::move(source)),
          prefix_(std::move(prefix)),
          init_(std::move(init)),
          problems_(std::make_shared<std::vector<std::string>>()) {}

    /// A binder for the keys below `name` ("a" -> "a.<key>"); problems are shared with the parent.
    weight_binder scope(std::string_view name) const {
        weight_binder child = *this;
        child.prefix_ = full_key(name) + ".";
        return child;
    }
    weight_binder scope(std::string_view name, index_t index) const { return scope(std::string(name) + "." + std::to_string(index)); }

    /// The tensor `key` with shape `expected`; records a problem (and returns
    /// an undefined tensor) when it is missing or has another shape. With an
    /// initializer, a missing tensor is created instead.
    tensor_type tensor(std::string_view key, const shape& expected) { return bind(key, &expected, false); }

    /// The tensor `key` whatever its shape (the module derives sizes from it).
    tensor_type tensor_any_shape(std::string_view key) { return bind(key, nullptr, false); }

    /// Undefined when absent (e.g. an optional bias); a wrong shape is still a problem.
    tensor_type optional(std::string_view key, const shape& expected) { return bind(key, &expected, true); }

    bool contains(std::string_view key) const { return source_.contains(full_key(key)); }

    /// Shape of `key` if present.
    std::optional<shape> shape_of(std::string_view key) const {
        std::string stored;
        const auto* f = source_.find(full_key(key), &stored);
        if (!f) return std::nullopt;
        return f->info(stored).dims;
    }

    /// Records a problem found by the module itself (e.g. inconsistent sizes).
    void report(std::string problem) { problems_->push_back(std::move(problem)); }

    const std::vector<std::string>& problems() const noexcept { return *problems_; }

    /// Throws io_error listing every problem, if any.
    void finish() const {
        if (problems_->empty()) return;
        std::string message = std::to_string(problems_->size()) + " weight problem" + (problems_->size() == 1 ? "" : "s") + ": ";
        for (std::size_t i = 0; i < problems_->size(); ++i) message += (i ? "; " : "") + (*problems_)[i];
        throw io_error("weights", message);
    }

    context_t<B>& context() const noexcept { return *ctx_; }
    const std::string& prefix() const noexcept { return prefix_; }

private:
    std::string full_key(std::string_view key) const { return prefix_ + std::string(key); }

    tensor_type bind(std::string_view key, const shape* expected, bool optional) {
        const std::string full = full_key(key);
        std::string stored;
        const auto* file = source_.find(full, &stored);
        if (!file) {
            if (init_ && expected && !optional) {
                const auto values = init_(full, *expected);
                check<value_error>(static_cast<index_t>(values.size()) == expected->numel(), "weights", "the initializer gave ", values.size(),
                                   " values for '", full, "' of shape ", expected->str());
                if constexpr (std::is_same_v<T, float>) {
                    return tensor_type::from_host(*ctx_, *expected, values);
                } else {
                    std::vector<T> converted(values.size());
                    for (std::size_t i = 0; i < values.size(); ++i) converted[i] = static_cast<T>(values[i]);
                    return tensor_type::from_host(*ctx_, *expected, converted);
                }
            }
            if (!optional) problems_->push_back("missing '" + full + "'");
            return {};
        }
        const auto& info = file->info(stored);
        if (expected && !(info.dims == *expected)) {
            problems_->push_back("'" + full + "' has shape " + info.dims.str() + ", expected " + expected->str());
            return {};
        }
        return file->template load<B, T>(*ctx_, stored);
    }

    context_t<B>* ctx_;
    weight_source source_;
    std::string prefix_;
    weight_initializer init_;
    std::shared_ptr<std::vector<std::string>> problems_;
};

}  // namespace dynamicid::modules
