// dynamicid training: the AdamW optimizer and gradient clipping by global norm.
//
// AdamW follows torch.optim.AdamW (its single-tensor path) step for step:
//
//     p  *= 1 - lr * weight_decay                      (decoupled decay, first)
//     m   = beta1 m + (1 - beta1) g
//     v   = beta2 v + (1 - beta2) g^2                   (amsgrad: vmax = max(vmax, v))
//     p  -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps),   t = 1, 2, ...
//
// Moments live on the backend in the accumulation type (f32 for f16/bf16/f32
// parameters, f64 for f64 ones). For f16 and bf16 parameters the optimizer
// keeps an f32 master copy, updates it, and writes the rounded result back
// into the parameter; the master copy is the one that accumulates.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/training/detail/flat_ops.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// Hyperparameters of one AdamW parameter group (torch's defaults).
struct adamw_options {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 1e-2;
    bool amsgrad = false;
};

/// Parameters sharing hyperparameters. The tensors are updated in place (they
/// share storage with the model's weights).
template <class B, class T>
struct param_group {
    std::vector<tensor<B, T>> params;
    adamw_options options{};
};

/// torch.optim.AdamW with parameter groups, f32 moments and f32 master weights.
///
/// Gradients are passed to step() in the flat parameter order: group 0's
/// parameters first, then group 1's, and so on. An undefined gradient tensor
/// skips its parameter (as torch does for `p.grad is None`).
///
///     using B = dynamicid::cpu_backend;
///     training::adamw<B, float> opt(ctx, {{.params = {w1, w2}, .options = {.lr = 1e-4, .weight_decay = 1e-2}},
///                                         {.params = {b1, b2}, .options = {.lr = 1e-4, .weight_decay = 0.0}}});
///     opt.step(ctx, grads);                       // grads[i] for parameter i
///     auto state = opt.state_dict(ctx);           // name -> tensor, for checkpoints
///     opt.load_state_dict(ctx, state);            // bit-exact restore
template <class B, class T>
    requires backend<B> && supports_element<B, accum_t<T>>
class adamw {
public:
    using accum_type = accum_t<T>;
    using state_tensor = tensor<B, accum_type>;
    /// What state_dict() returns and load_state_dict() takes.
    using state_map = std::map<std::string, state_tensor>;

    static constexpr bool keeps_master_weights = !std::is_same_v<T, accum_type>;

    adamw(context_t<B>& ctx, std::vector<param_group<B, T>> groups) : groups_(std::move(groups)) {
        (void)ctx;
        for (std::size_t g = 0; g < groups_.size(); ++g) {
            check_options(groups_[g].options, g);
            for (std::size_t j = 0; j < groups_[g].params.size(); ++j) {
                check(groups_[g].params[j].defined(), component, "parameter ", j, " of group ", g, " is undefined");
                index_.push_back({g, j});
            }
        }
        slots_.resize(index_.size());
    }

    /// One group holding every parameter.
    adamw(context_t<B>& ctx, std::vector<tensor<B, T>> params, adamw_options options = {})
        : adamw(ctx, std::vector<param_group<B, T>>{param_group<B, T>{std::move(params), options}}) {}

    std::size_t param_count() const noexcept { return index_.size(); }
    std::size_t group_count() const noexcept { return groups_.size(); }
    const param_group<B, T>& group(std::size_t g) const { return groups_.at(g); }
    /// Parameter i in the flat order step() uses.
    const tensor<B, T>& param(std::size_t i) const {
        const auto [g, j] = index_.at(i);
        return groups_[g].params[j];
    }

    /// Sets every group's learning rate (what a schedule does each step).
    void set_lr(double lr) {
        for (std::size_t g = 0; g < groups_.size(); ++g) set_lr(g, lr);
    }
    void set_lr(std::size_t g, double lr) {
        check(g < groups_.size(), component, "group ", g, " out of range (", groups_.size(), " groups)");
        check(std::isfinite(lr) && lr >= 0.0, component, "learning rate must be finite and >= 0, got ", lr);
        groups_[g].options.lr = lr;
    }

    /// Steps taken for parameter i (0 before its first gradient).
    std::int64_t step_count(std::size_t i) const { return slots_.at(i).step; }

    /// Updates every parameter whose gradient is defined.
    void step(context_t<B>& ctx, std::span<const tensor<B, T>> grads) {
        check<shape_error>(grads.size() == index_.size(), component, "got ", grads.size(), " gradients for ", index_.size(),
                           " parameters");
        for (std::size_t i = 0; i < grads.size(); ++i) {
            if (!grads[i].defined()) continue;
            const auto& p = param(i);
            check<shape_error>(grads[i].shape() == p.shape(), component, "gradient ", i, " has shape ", grads[i].shape().str(),
                               ", parameter has ", p.shape().str());
        }
        for (std::size_t i = 0; i < grads.size(); ++i)
            if (grads[i].defined()) update(ctx, i, grads[i]);
    }
    void step(context_t<B>& ctx, const std::vector<tensor<B, T>>& grads) { step(ctx, std::span<const tensor<B, T>>(grads)); }

    /// A copy of the optimizer state: for each parameter i that has state,
    /// "state.<i>.step" (one element, stored like torch's float step),
    /// "state.<i>.exp_avg", "state.<i>.exp_avg_sq", with amsgrad
    /// "state.<i>.max_exp_avg_sq", and for f16/bf16 parameters "state.<i>.master".
    /// Hyperparameters are configuration and are not included.
    state_map state_dict(context_t<B>& ctx) const {
        state_map out;
        for (std::size_t i = 0; i < slots_.size(); ++i) {
            const auto& s = slots_[i];
            if (s.step == 0) continue;
            const std::string prefix = "state." + std::to_string(i) + ".";
            check(static_cast<std::int64_t>(static_cast<accum_type>(s.step)) == s.step, component, "step count ", s.step,
                  " of parameter ", i, " is not representable in the state's element type");
            out.emplace(prefix + "step", state_tensor::full(ctx, shape({1}), static_cast<accum_type>(s.step)));
            out.emplace(prefix + "exp_avg", detail::converted_copy<accum_type>(ctx, s.exp_avg));
            out.emplace(prefix + "exp_avg_sq", detail::converted_copy<accum_type>(ctx, s.exp_avg_sq));
            if (s.max_exp_avg_sq.defined())
                out.emplace(prefix + "max_exp_avg_sq", detail::converted_copy<accum_type>(ctx, s.max_exp_avg_sq));
            if constexpr (keeps_master_weights) out.emplace(prefix + "master", detail::converted_copy<accum_type>(ctx, s.master));
        }
        return out;
    }

    /// Replaces the whole state with `state` (as written by state_dict). Parameters
    /// without entries start fresh. Unknown names, wrong shapes and partial entries
    /// are errors; nothing is changed when one is found.
    void load_state_dict(context_t<B>& ctx, const state_map& state) {
        std::vector<slot> fresh(slots_.size());
        std::size_t used = 0;
        for (std::size_t i = 0; i < slots_.size(); ++i) {
            const std::string prefix = "state." + std::to_string(i) + ".";
            const auto find = [&](const char* name) -> const state_tensor* {
                const auto it = state.find(prefix + name);
                return it == state.end() ? nullptr : &it->second;
            };
            const auto* step = find("step");
            const auto* m = find("exp_avg");
            const auto* v = find("exp_avg_sq");
            const auto* vmax = find("max_exp_avg_sq");
            const auto* master = find("master");
            if (!step && !m && !v && !vmax && !master) continue;
            check(step && m && v, component, "state of parameter ", i, " is incomplete (needs step, exp_avg and exp_avg_sq)");
            const bool amsgrad = options_of(i).amsgrad;
            check(amsgrad == (vmax != nullptr), component, "state of parameter ", i,
                  amsgrad ? " lacks max_exp_avg_sq (amsgrad is on)" : " has max_exp_avg_sq but amsgrad is off");
            check(keeps_master_weights == (master != nullptr), component, "state of parameter ", i,
                  keeps_master_weights ? " lacks the master weights its f16/bf16 parameter needs"
                                       : " has master weights but the parameter is not f16/bf16");
            const auto& p = param(i);
            for (const auto* t : {m, v, vmax, master})
                if (t) check<shape_error>(t->shape() == p.shape(), component, "state of parameter ", i, " has shape ",
                                          t->shape().str(), ", parameter has ", p.shape().str());
            check<shape_error>(step->numel() == 1, component, "step of parameter ", i, " must have one element");
            const double steps = static_cast<double>(step->to_host(ctx)[0]);
            check(std::isfinite(steps) && steps >= 1.0 && steps == std::floor(steps), component, "step of parameter ", i,
                  " must be a positive integer, got ", steps);
            auto& s = fresh[i];
            s.step = static_cast<std::int64_t>(steps);
            s.exp_avg = detail::converted_copy<accum_type>(ctx, *m);
            s.exp_avg_sq = detail::converted_copy<accum_type>(ctx, *v);
            if (vmax) s.max_exp_avg_sq = detail::converted_copy<accum_type>(ctx, *vmax);
            if (master) s.master = detail::converted_copy<accum_type>(ctx, *master);
            used += 2 + 1 + (vmax ? 1 : 0) + (master ? 1 : 0);
        }
        if (used != state.size()) {
            for (const auto& [name, t] : state) {
                bool known = false;
                for (std::size_t i = 0; i < slots_.size() && !known; ++i)
                    known = name.rfind("state." + std::to_string(i) + ".", 0) == 0;
                check(known, component, "unknown state entry '", name, "' (", slots_.size(), " parameters)");
            }
            throw value_error(component, "state has entries this optimizer does not use");
        }
        slots_ = std::move(fresh);
        // The parameters follow the restored master weights, as they did when saved.
        if constexpr (keeps_master_weights)
            for (std::size_t i = 0; i < slots_.size(); ++i)
                if (slots_[i].master.defined())
                    B::convert(ctx, const_pointer_t<B, accum_type>(slots_[i].master.data()), param(i).data(),
                               static_cast<std::size_t>(param(i).numel()));
    }

private:
    static constexpr const char* component = "adamw";

    struct slot {
        std::int64_t step = 0;
        state_tensor exp_avg, exp_avg_sq, max_exp_avg_sq, master;
    };

    static void check_options(const adamw_options& o, std::size_t g) {
        check(std::isfinite(o.lr) && o.lr >= 0.0, component, "group ", g, ": lr must be finite and >= 0, got ", o.lr);
        check(o.beta1 >= 0.0 && o.beta1 < 1.0, component, "group ", g, ": beta1 must be in [0, 1), got ", o.beta1);
        check(o.beta2 >= 0.0 && o.beta2 < 1.0, component, "group ", g, ": beta2 must be in [0, 1), got ", o.beta2);
        check(std::isfinite(o.eps) && o.eps >= 0.0, component, "group ", g, ": eps must be finite and >= 0, got ", o.eps);
        check(std::isfinite(o.weight_decay) && o.weight_decay >= 0.0, component, "group ", g,
              ": weight_decay must be finite and >= 0, got ", o.weight_decay);
    }

    const adamw_options& options_of(std::size_t i) const { return groups_[index_[i].first].options; }

    void update(context_t<B>& ctx, std::size_t i, const tensor<B, T>& grad) {
        using A = accum_type;
        const auto& o = options_of(i);
        const auto& p = param(i);
        const index_t n = p.numel();
        const auto un = static_cast<std::size_t>(n);
        auto& s = slots_[i];
        if (s.step == 0) {  // lazily, like torch: state appears with the first gradient
            s.exp_avg = state_tensor::zeros(ctx, p.shape());
            s.exp_avg_sq = state_tensor::zeros(ctx, p.shape());
            if (o.amsgrad) s.max_exp_avg_sq = state_tensor::zeros(ctx, p.shape());
            if constexpr (keeps_master_weights) s.master = detail::converted_copy<A>(ctx, p);
        }
        ++s.step;
        if (n == 0) return;
        using cp = const_pointer_t<B, A>;
        const auto g = detail::as_element<A>(ctx, grad);
        state_tensor w;
        if constexpr (keeps_master_weights) w = s.master;
        else w = p;

        if (o.weight_decay != 0.0) B::axpby(ctx, un, 1.0 - o.lr * o.weight_decay, cp(w.data()), 0.0, w.data());
        B::axpby(ctx, un, 1.0 - o.beta1, cp(g.data()), o.beta1, s.exp_avg.data());
        auto t1 = detail::flat_empty<B, A>(ctx, n);
        auto t2 = detail::flat_empty<B, A>(ctx, n);
        const auto same = detail::flat_binary_desc(n), scalar = detail::flat_binary_desc(n, true);
        B::binary_forward(ctx, binary_op::mul, same, cp(g.data()), cp(g.data()), t1.data());
        B::axpby(ctx, un, 1.0 - o.beta2, cp(t1.data()), o.beta2, s.exp_avg_sq.data());
        state_tensor v = s.exp_avg_sq;
        if (o.amsgrad) {
            B::binary_forward(ctx, binary_op::maximum, same, cp(s.max_exp_avg_sq.data()), cp(s.exp_avg_sq.data()), t1.data());
            B::copy(ctx, cp(t1.data()), s.max_exp_avg_sq.data(), un);
            v = s.max_exp_avg_sq;
        }
        const double t = static_cast<double>(s.step);
        const double bias_correction1 = 1.0 - std::pow(o.beta1, t);
        const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(o.beta2, t));
        const double step_size = o.lr / bias_correction1;
        // denom = sqrt(v) / sqrt(bc2) + eps, divided (not multiplied by a reciprocal) as torch does.
        const auto bc2 = state_tensor::full(ctx, shape({1}), static_cast<A>(bias_correction2_sqrt));
        const auto eps = state_tensor::full(ctx, shape({1}), static_cast<A>(o.eps));
        B::unary_forward(ctx, unary_op::sqrt, un, cp(v.data()), t1.data());
        B::binary_forward(ctx, binary_op::div, scalar, cp(t1.data()), cp(bc2.data()), t2.data());
        B::binary_forward(ctx, binary_op::add, scalar, cp(t2.data()), cp(eps.data()), t1.data());
        B::binary_forward(ctx, binary_op::div, same, cp(s.exp_avg.data()), cp(t1.data()), t2.data());
        B::axpby(ctx, un, -step_size, cp(t2.data()), 1.0, w.data());
        if constexpr (keeps_master_weights) B::convert(ctx, cp(w.data()), p.data(), un);
    }

    std::vector<param_group<B, T>> groups_;
    std::vector<std::pair<std::size_t, std::size_t>> index_;  // flat index -> (group, position)
    std::vector<slot> slots_;
};

/// Options of clip_grad_norm.
struct clip_options {
    /// Throw value_error when the total norm is inf or NaN. When false (torch's
    /// default), a non-finite norm is returned and the gradients are left as
    /// they are (torch would multiply them by NaN); the loss scaler then skips
    /// the step.
    bool error_if_nonfinite = false;
};

/// torch.nn.utils.clip_grad_norm_ with the 2-norm: scales every gradient in
/// place by min(1, max_norm / (total_norm + 1e-6)) and returns total_norm, the
/// 2-norm of all gradients together. Undefined gradients are skipped.
///
///     double norm = training::clip_grad_norm(ctx, std::span(grads), 1.0);
template <class B, class T>
    requires backend<B> && supports_element<B, accum_t<T>>
double clip_grad_norm(context_t<B>& ctx, std::span<const tensor<B, T>> grads, double max_norm, clip_options options = {}) {
    using A = accum_t<T>;
    check(std::isfinite(max_norm) && max_norm >= 0.0, "clip_grad_norm", "max_norm must be finite and >= 0, got ", max_norm);
    // Per-tensor norms rounded to A, then the norm of the norms, as torch computes it.
    double total_sq = 0.0;
    for (const auto& g : grads) {
        if (!g.defined()) continue;
        const double norm = static_cast<A>(std::sqrt(detail::sum_of_squares<A>(ctx, g)));
        total_sq += norm * norm;
    }
    const A total = static_cast<A>(std::sqrt(total_sq));
    if (!std::isfinite(total)) {
        check(!options.error_if_nonfinite, "clip_grad_norm", "the total norm of the gradients is ", static_cast<double>(total),
              "; gradients were left unscaled");
        return static_cast<double>(total);
    }
    A coef = static_cast<A>(max_norm) / (total + static_cast<A>(1e-6));
    if (coef < A(1))
        for (const auto& g : grads)
            if (g.defined()) detail::scale_in_place(ctx, g, static_cast<double>(coef));
    return static_cast<double>(total);
}

template <class B, class T>
    requires backend<B> && supports_element<B, accum_t<T>>
double clip_grad_norm(context_t<B>& ctx, const std::vector<tensor<B, T>>& grads, double max_norm, clip_options options = {}) {
    return clip_grad_norm(ctx, std::span<const tensor<B, T>>(grads), max_norm, options);
}

}  // namespace dynamicid::training
