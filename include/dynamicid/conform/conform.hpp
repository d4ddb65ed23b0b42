// dynamicid conformance runner: checks the library against golden tensors.
//
// A golden case is one safetensors file (see golden_case.hpp) whose config
// names a reference module. A registry maps module names to handlers that
// compute the same outputs with the library; run_case compares every
// `output.<name>` of the file with what the handler returned:
//
//     pass  <=>  max|out - ref| <= atol + rtol * max|ref|
//
// Tolerances, first found wins: run_options (the command line), the case's
// config keys "atol"/"rtol", then a default from the reference output's dtype
// (1e-4 for F32, 1e-9 for F64, 1e-2 for F16/BF16).
//
//     dynamicid::cpu_backend::context ctx;
//     auto registry = dynamicid::conform::registry<dynamicid::cpu_backend>::builtin();
//     auto golden = dynamicid::conform::golden_case::open("tests/data/golden/torch/linear.safetensors");
//     for (const auto& r : dynamicid::conform::run_case(ctx, registry, golden))
//         if (!r.pass) ...;
#pragma once

#include <dynamicid/conform/detail/clip.hpp>
#include <dynamicid/conform/detail/dynamicid_modules.hpp>
#include <dynamicid/conform/detail/golden_case.hpp>
#include <dynamicid/conform/detail/official.hpp>
#include <dynamicid/conform/detail/primitives.hpp>
#include <dynamicid/conform/detail/schedulers.hpp>
#if !defined(__CUDACC__)  // the tokenizer is host code (and uses range-v3, which nvcc cannot parse)
#include <dynamicid/conform/detail/text.hpp>
#endif
#include <dynamicid/conform/detail/unet.hpp>
#include <dynamicid/conform/detail/vae.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::conform {

/// The case names a module no handler is registered for.
class unsupported_module : public unsupported_error {
public:
    unsupported_module(const std::string& file, std::string module)
        : unsupported_error("conform", file + ": unsupported module '" + module + "'"), module_(std::move(module)) {}

    const std::string& module() const noexcept { return module_; }

private:
    std::string module_;
};

/// How one output compared with its reference.
struct result {
    std::string file;   ///< the case's file name (as opened)
    std::string name;   ///< "output.<name>"
    double max_abs = 0.0;  ///< max |out - ref|
    double max_rel = 0.0;  ///< max_abs / max|ref| (0 when both are 0, inf when only ref is 0)
    bool pass = false;
    double atol = 0.0, rtol = 0.0;  ///< the tolerances applied
    std::string note;  ///< why it failed without numbers (missing output, shape mismatch)
};

/// Tolerance overrides (the command line's --atol/--rtol).
struct run_options {
    std::optional<double> atol, rtol;
};

/// Default tolerance for reference outputs stored as `t`.
constexpr double default_tolerance(dtype t) {
    switch (t) {
        case dtype::f64: return 1e-9;
        case dtype::f16:
        case dtype::bf16: return 1e-2;
        default: return 1e-4;
    }
}

/// Compares `out` with `ref` (same length) under `max|out-ref| <= atol + rtol * max|ref|`.
/// Any NaN in either (where the other is not NaN too) fails.
inline result compare(std::string file, std::string name, const std::vector<double>& out, const std::vector<double>& ref,
                      double atol, double rtol) {
    result r{std::move(file), std::move(name), 0.0, 0.0, false, atol, rtol, {}};
    if (out.size() != ref.size()) {
        r.max_abs = r.max_rel = std::numeric_limits<double>::infinity();
        r.note = "computed " + std::to_string(out.size()) + " values, reference has " + std::to_string(ref.size());
        return r;
    }
    double max_ref = 0.0;
    bool nan = false;
    for (std::size_t i = 0; i < out.size(); ++i) {
        const bool out_nan = std::isnan(out[i]), ref_nan = std::isnan(ref[i]);
        if (out_nan || ref_nan) {
            nan = nan || out_nan != ref_nan;
            continue;
        }
        // Equal infinities match; anything else involving an infinity is an infinite error.
        const double diff = out[i] == ref[i] ? 0.0 : std::abs(out[i] - ref[i]);
        r.max_abs = std::max(r.max_abs, std::isnan(diff) ? std::numeric_limits<double>::infinity() : diff);
        if (std::isfinite(ref[i])) max_ref = std::max(max_ref, std::abs(ref[i]));
    }
    if (nan) {
        r.max_abs = r.max_rel = std::numeric_limits<double>::quiet_NaN();
        r.note = "NaN where the reference has a number (or the reverse)";
        return r;
    }
    r.max_rel = max_ref > 0.0 ? r.max_abs / max_ref : (r.max_abs > 0.0 ? std::numeric_limits<double>::infinity() : 0.0);
    r.pass = r.max_abs <= atol + rtol * max_ref;
    return r;
}

/// Module name -> handler computing that module's outputs for a golden case.
template <class B>
    requires backend<B>
class registry {
public:
    using handler = std::function<output_map<B>(context_t<B>&, const golden_case&)>;

    /// Registers (or replaces) the handler for `module`.
    registry& add(std::string module, handler h) {
        handlers_.insert_or_assign(std::move(module), std::move(h));
        return *this;
    }

    bool contains(const std::string& module) const { return handlers_.count(module) != 0; }

    /// The handler for the case's module; unsupported_module when none.
    const handler& find(const golden_case& g) const {
        const auto it = handlers_.find(g.module());
        if (it == handlers_.end()) throw unsupported_module(g.file_name(), g.module());
        return it->second;
    }

    /// Registered module names, sorted.
    std::vector<std::string> modules() const {
        std::vector<std::string> out;
        for (const auto& [name, h] : handlers_) out.push_back(name);
        return out;
    }

    /// Wraps a generic handler `f.template operator()<T>(ctx, g)` so that it
    /// runs in double for all-F64 cases (when B computes in double), else in float.
    template <class F>
    static handler by_precision(F f) {
        return [f](context_t<B>& ctx, const golden_case& g) -> output_map<B> {
            if constexpr (supports_element<B, double>) {
                if (g.float64()) return f.template operator()<double>(ctx, g);
            }
            return f.template operator()<float>(ctx, g);
        };
    }

    /// Every handler the library ships: the torch primitives and the official modules.
    static registry builtin() {
        registry r;
        namespace d = detail;
        using ctx_t = context_t<B>;
        const auto unary = [&r](std::initializer_list<const char*> names, unary_op op) {
            for (const char* n : names)
                r.add(n, by_precision([op]<class T>(ctx_t& ctx, const golden_case& g) { return d::unary_case<B, T>(ctx, g, op); }));
        };
        const auto binary = [&r](std::initializer_list<const char*> names, binary_op op) {
            for (const char* n : names)
                r.add(n, by_precision([op]<class T>(ctx_t& ctx, const golden_case& g) { return d::binary_case<B, T>(ctx, g, op); }));
        };
        r.add("torch.nn.functional.linear", by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::linear_case<B, T>(ctx, g); }));
        r.add("torch.matmul", by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::matmul_case<B, T>(ctx, g); }));
        r.add("torch.nn.functional.conv2d", by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::conv2d_case<B, T>(ctx, g); }));
        r.add("torch.nn.functional.group_norm",
              by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::group_norm_case<B, T>(ctx, g); }));
        r.add("torch.nn.functional.layer_norm",
              by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::layer_norm_case<B, T>(ctx, g); }));
        for (const char* n : {"torch.softmax", "torch.nn.functional.softmax"})
            r.add(n, by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::softmax_case<B, T>(ctx, g); }));
        unary({"torch.nn.functional.silu", "torch.silu"}, unary_op::silu);
        unary({"torch.nn.functional.relu", "torch.relu"}, unary_op::relu);
        unary({"torch.sigmoid", "torch.nn.functional.sigmoid"}, unary_op::sigmoid);
        unary({"torch.tanh", "torch.nn.functional.tanh"}, unary_op::tanh);
        unary({"quick_gelu"}, unary_op::quick_gelu);
        r.add("torch.nn.functional.gelu", by_precision([]<class T>(ctx_t& ctx, const golden_case& g) {
                  return d::unary_case<B, T>(ctx, g, d::gelu_kind(g));
              }));
        r.add("geglu", by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::geglu_case<B, T>(ctx, g); }));
        binary({"torch.add"}, binary_op::add);
        binary({"torch.sub"}, binary_op::sub);
        binary({"torch.mul"}, binary_op::mul);
        binary({"torch.div"}, binary_op::div);
        r.add("torch.sum", by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::reduce_case<B, T>(ctx, g, false); }));
        r.add("torch.mean", by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::reduce_case<B, T>(ctx, g, true); }));
        r.add("torch.permute", by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::permute_case<B, T>(ctx, g); }));
        r.add("torch.cat", by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::cat_case<B, T>(ctx, g); }));
        r.add("torch.nn.functional.interpolate",
              by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::interpolate_case<B, T>(ctx, g); }));
        r.add("torch.nn.functional.scaled_dot_product_attention",
              by_precision([]<class T>(ctx_t& ctx, const golden_case& g) { return d::sdpa_case<B, T>(ctx, g); }));
        // Official modules are float32 models: computed in float whatever the file holds.
        r.add("ProjPlusModel", [](ctx_t& ctx, const golden_case& g) { return d::proj_plus_case<B, float>(ctx, g); });
        // Tokenizer and schedulers (float32 outputs; ids are exact in float).
#if !defined(__CUDACC__)
        r.add("CLIPTokenizer", [](ctx_t& ctx, const golden_case& g) { return d::clip_tokenizer_case<B>(ctx, g); });
#endif
        r.add("DDIMScheduler", [](ctx_t& ctx, const golden_case& g) { return d::ddim_scheduler_case<B>(ctx, g); });
        r.add("DDPMScheduler.add_noise", [](ctx_t& ctx, const golden_case& g) { return d::ddpm_add_noise_case<B>(ctx, g); });
        // diffusers UNet modules: float32 models, like the official ones.
        r.add("UNet2DConditionModel", [](ctx_t& ctx, const golden_case& g) { return d::unet_2d_condition_case<B, float>(ctx, g); });
        r.add("ResnetBlock2D", [](ctx_t& ctx, const golden_case& g) { return d::resnet_block_case<B, float>(ctx, g); });
        r.add("Transformer2DModel", [](ctx_t& ctx, const golden_case& g) { return d::transformer_2d_case<B, float>(ctx, g); });
        d::add_dynamicid_module_handlers<B>(r);
        d::add_clip_handlers<B>(r);
        d::add_vae_handlers<B>(r);
        return r;
    }

private:
    std::map<std::string, handler, std::less<>> handlers_;
};

namespace detail {

template <class B>
std::pair<shape, std::vector<double>> to_host_double(context_t<B>& ctx, const any_tensor<B>& t) {
    return std::visit(
        [&](const auto& x) {
            std::vector<double> out;
            if (x.defined()) {
                const auto host = x.to_host(ctx);
                out.assign(host.begin(), host.end());
            }
            return std::pair<shape, std::vector<double>>{x.shape(), std::move(out)};
        },
        t);
}

}  // namespace detail

/// Compares computed outputs with every `output.<name>` of the case.
template <class B>
std::vector<result> compare_outputs(context_t<B>& ctx, const golden_case& g, const output_map<B>& computed,
                                    const run_options& options = {}) {
    std::vector<result> results;
    for (const auto& name : g.outputs()) {
        const std::string full = "output." + name;
        const dtype ref_type = g.type(full);
        const double atol = options.atol ? *options.atol : g.setting<double>("atol", default_tolerance(ref_type));
        const double rtol = options.rtol ? *options.rtol : g.setting<double>("rtol", default_tolerance(ref_type));
        const auto it = computed.find(name);
        if (it == computed.end()) {
            result r{g.file_name(), full, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity(),
                     false, atol, rtol, "not computed by the handler"};
            results.push_back(std::move(r));
            continue;
        }
        auto [out_shape, out_values] = detail::to_host_double<B>(ctx, it->second);
        const shape ref_shape = g.dims(full);
        if (!(out_shape == ref_shape)) {
            result r{g.file_name(), full, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity(),
                     false, atol, rtol, "shape " + out_shape.str() + " differs from the reference " + ref_shape.str()};
            results.push_back(std::move(r));
            continue;
        }
        results.push_back(compare(g.file_name(), full, out_values, g.values(full), atol, rtol));
    }
    return results;
}

/// Runs the case's handler and compares. Throws unsupported_module for an
/// unknown module; other errors from the handler propagate.
template <class B>
std::vector<result> run_case(context_t<B>& ctx, const registry<B>& reg, const golden_case& g, const run_options& options = {}) {
    const auto& handler = reg.find(g);
    const auto computed = handler(ctx, g);
    return compare_outputs<B>(ctx, g, computed, options);
}

}  // namespace dynamicid::conform
