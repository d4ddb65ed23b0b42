// dynamicid conformance: one golden case (a safetensors file) and the tensors
// a handler computes from it.
//
// A golden file holds `param.<key>` weights, `input.<name>` inputs and the
// reference's `output.<name>` results; `__metadata__["config"]` is a JSON
// object whose "module" names the reference call.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/dtype.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/shape.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace dynamicid::conform {

/// A computed output in whichever precision the handler ran.
template <class B>
using any_tensor = std::variant<tensor<B, float>, tensor<B, double>>;

/// Computed outputs by name, without the "output." prefix ("y", "grad_x", "tokens").
template <class B>
using output_map = std::map<std::string, any_tensor<B>>;

/// Every value of tensor `name` of `file`, widened to double (any stored dtype).
inline std::vector<double> read_as_double(const io::safetensors_file& file, const std::string& name) {
    return file.template to_vector<double>(name);
}

/// One golden case: the opened file, its parsed config and its label.
class golden_case {
public:
    /// Opens and parses `path`; throws io_error for unreadable files or a
    /// missing/malformed config.
    static golden_case open(const std::filesystem::path& path) {
        return golden_case(path.string(), io::safetensors_file::open(path.string()));
    }

    /// Wraps an already opened file; `label` is what results report as their file.
    golden_case(std::string label, io::safetensors_file file)
        : file_name_(std::move(label)), file_(std::make_shared<io::safetensors_file>(std::move(file))) {
        const auto meta = file_->metadata();
        const auto it = meta.find("config");
        check<io_error>(it != meta.end(), "conform", file_name_, ": no __metadata__[\"config\"]");
        try {
            config_ = nlohmann::json::parse(it->second);
        } catch (const nlohmann::json::exception& e) {
            throw io_error("conform", file_name_ + ": config is not valid JSON: " + e.what());
        }
        check<io_error>(config_.is_object() && config_.contains("module") && config_["module"].is_string(), "conform", file_name_,
                        ": config has no \"module\" string");
        module_ = config_["module"].get<std::string>();
    }

    const std::string& file_name() const noexcept { return file_name_; }
    const std::string& module() const noexcept { return module_; }
    const nlohmann::json& config() const noexcept { return config_; }
    const io::safetensors_file& file() const noexcept { return *file_; }

    bool has(const std::string& name) const { return file_->contains(name); }
    dtype type(const std::string& name) const { return file_->info(name).type; }
    shape dims(const std::string& name) const { return file_->info(name).dims; }

    /// Throws value_error naming the file when `name` is absent.
    void require(const std::string& name) const {
        check<value_error>(has(name), "conform", file_name_, ": missing tensor '", name, "' for module ", module_);
    }

    std::vector<double> values(const std::string& name) const {
        require(name);
        return read_as_double(*file_, name);
    }

    /// Tensor `name` converted to T on backend B.
    template <class B, class T>
    tensor<B, T> load(context_t<B>& ctx, const std::string& name) const {
        require(name);
        return file_->template load<B, T>(ctx, name);
    }

    /// The output names without their "output." prefix, in file order.
    std::vector<std::string> outputs() const {
        std::vector<std::string> out;
        for (const auto& n : file_->names())
            if (n.rfind("output.", 0) == 0) out.push_back(n.substr(7));
        return out;
    }

    /// True when every floating tensor in the file is F64: handlers then
    /// compute in double where the backend can.
    bool float64() const {
        bool any = false;
        for (const auto& n : file_->names()) {
            const auto t = file_->info(n).type;
            if (t == dtype::f32 || t == dtype::f16 || t == dtype::bf16) return false;
            any = any || t == dtype::f64;
        }
        return any;
    }

    // ---- typed config access ---------------------------------------------------

    bool has_setting(const std::string& key) const { return config_.contains(key) && !config_[key].is_null(); }

    template <class V>
    V setting(const std::string& key) const {
        check<value_error>(config_.contains(key), "conform", file_name_, ": config has no \"", key, "\"");
        try {
            return config_[key].get<V>();
        } catch (const nlohmann::json::exception& e) {
            throw value_error("conform", file_name_ + ": config \"" + key + "\" has the wrong type: " + e.what());
        }
    }

    template <class V>
    V setting(const std::string& key, V fallback) const {
        return has_setting(key) ? setting<V>(key) : fallback;
    }

private:
    std::string file_name_;
    std::shared_ptr<const io::safetensors_file> file_;
    nlohmann::json config_;
    std::string module_;
};

}  // namespace dynamicid::conform
