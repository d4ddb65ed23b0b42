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
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/safetensors.hpp>

#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
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

/// Binds tensors of a weight_source to a module, converting to T on backend B.
template <class B, class T>
    requires backend<B>
class weight_binder {
public:
    using tensor_type = dynamicid::tensor<B, T>;

    weight_binder(context_t<B>& ctx, weight_source source, std::string prefix = {})
        : ctx_(&ctx), source_(std::move(source)), prefix_(std::move(prefix)), problems_(std::make_shared<std::vector<std::string>>()) {}

    /// A binder for the keys below `name` ("a" -> "a.<key>"); problems are shared with the parent.
    weight_binder scope(std::string_view name) const {
        weight_binder child = *this;
        child.prefix_ = full_key(name) + ".";
        return child;
    }
    weight_binder scope(std::string_view name, index_t index) const { return scope(std::string(name) + "." + std::to_string(index)); }

    /// The tensor `key` with shape `expected`; records a problem (and returns
    /// an undefined tensor) when it is missing or has another shape.
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
    std::shared_ptr<std::vector<std::string>> problems_;
};

}  // namespace dynamicid::modules
