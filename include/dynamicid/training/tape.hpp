// dynamicid training: the module-level tape and the trainable-parameter
// gradient board.
//
// A training forward records one entry per module it runs (a closure that
// owns the module's typed saved state); tape::backward plays the entries back
// in reverse. Activations that several modules read (the UNet's skip
// connections, the encoder hidden states) are `variable`s: each has a slot in
// which gradients from every reader accumulate before its producer runs.
//
// Trainable parameters live on a parameter_gradients board. A module that
// reads parameter `id` in a recorded forward calls use(id); its backward calls
// deliver(id, grad). When the last pending delivery of a parameter arrives,
// its gradient is final and on_ready(id, grad) fires, so a data-parallel
// trainer can reduce that bucket while the rest of the backward runs.
//
//     dynamicid::training::parameter_gradients<B, float> board;
//     board.on_ready = [&](dynamicid::index_t id, const auto& grad) { bucket.add(id, grad); };
//     dynamicid::training::tape<B, float> tp(&board);
//     auto x = tp.leaf(latents);
//     auto eps = unet.forward_train(ctx, tp, x, timesteps, tp.leaf(states), &hooks);
//     tp.backward(ctx, eps, grad_eps);
//     auto d_latents = tp.gradient(x);
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/ops.hpp>

#include <cstddef>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// Trainable parameters and their gradients for one backward.
///
///     parameter_gradients<B, float> board;
///     const auto id = board.add("0.to_q_lora.down.weight", weight);
///     board.on_ready = [](index_t id, const tensor<B, float>& g) { /* reduce g */ };
template <class B, class T>
class parameter_gradients {
public:
    using tensor_type = tensor<B, T>;
    /// Called once per parameter and backward, when its gradient is final.
    std::function<void(index_t, const tensor_type&)> on_ready{};

    /// Registers a parameter; returns its id (0, 1, ... in registration order).
    index_t add(std::string name, tensor_type value) {
        entries_.push_back({std::move(name), std::move(value), {}, 0, false});
        return static_cast<index_t>(entries_.size() - 1);
    }

    index_t size() const noexcept { return static_cast<index_t>(entries_.size()); }
    const std::string& name(index_t id) const { return at(id).name; }
    const tensor_type& value(index_t id) const { return at(id).value; }
    /// The accumulated gradient (undefined when nothing was delivered).
    const tensor_type& gradient(index_t id) const { return at(id).grad; }
    /// Whether the gradient of `id` was announced final in this backward.
    bool ready(index_t id) const { return at(id).ready; }
    /// Deliveries still expected for `id`.
    index_t pending(index_t id) const { return at(id).pending; }

    /// A recorded forward read `id`: one more gradient delivery to wait for.
    /// Ignored while counting is paused (a checkpointed block's recompute).
    void use(index_t id) {
        if (paused_ > 0) return;
        auto& e = at(id);
        e.pending += 1;
        e.ready = false;
    }

    /// Adds `grad` to the gradient of `id`; fires on_ready when no delivery is pending.
    void deliver(context_t<B>& ctx, index_t id, const tensor_type& grad) {
        auto& e = at(id);
        check<shape_error>(grad.defined() && grad.shape() == e.value.shape(), "training", "gradient of '", e.name, "' has shape ",
                           grad.defined() ? grad.shape().str() : std::string("(undefined)"), ", expected ", e.value.shape().str());
        if (!e.grad.defined()) {
            e.grad = tensor_type::empty(ctx, grad.shape());
            B::copy(ctx, const_pointer_t<B, T>(grad.data()), e.grad.data(), static_cast<std::size_t>(grad.numel()));
        } else {
            ops::accumulate(ctx, e.grad, grad);
        }
        if (e.pending > 0 && --e.pending == 0) {
            e.ready = true;
            if (on_ready) on_ready(id, e.grad);
        }
    }

    /// Forgets every gradient and pending count (before the next step).
    void zero() {
        for (auto& e : entries_) {
            e.grad = {};
            e.pending = 0;
            e.ready = false;
        }
    }

    /// While alive, use() counts nothing (checkpoint recomputation reads the
    /// parameters a second time but delivers only once).
    class pause_guard {
    public:
        explicit pause_guard(parameter_gradients* p) : p_(p) {
            if (p_) ++p_->paused_;
        }
        ~pause_guard() {
            if (p_) --p_->paused_;
        }
        pause_guard(const pause_guard&) = delete;
        pause_guard& operator=(const pause_guard&) = delete;

    private:
        parameter_gradients* p_;
    };

private:
    struct entry {
        std::string name;
        tensor_type value, grad;
        index_t pending = 0;
        bool ready = false;
    };
    entry& at(index_t id) {
        check<value_error>(id >= 0 && id < size(), "training", "no parameter ", id, " (", size(), " registered)");
        return entries_[static_cast<std::size_t>(id)];
    }
    const entry& at(index_t id) const {
        check<value_error>(id >= 0 && id < size(), "training", "no parameter ", id, " (", size(), " registered)");
        return entries_[static_cast<std::size_t>(id)];
    }
    std::vector<entry> entries_;
    int paused_ = 0;
};

/// An activation recorded on a tape: its value and the slot its gradient accumulates in.
template <class B, class T>
struct variable {
    tensor<B, T> value;
    index_t slot = -1;
};

/// The record of the modules a training forward ran.
///
///     tape<B, float> tp;
///     auto x = tp.leaf(input);
///     auto [y, saved] = block.forward_train(ctx, x.value);
///     auto out = tp.output(y);
///     tp.record("block", [=, &block](auto& ctx, auto& t) { t.add_gradient(ctx, x, block.backward(ctx, saved, t.take(out)).input); });
///     tp.backward(ctx, out, grad);
template <class B, class T>
class tape {
public:
    using tensor_type = tensor<B, T>;
    using variable_type = variable<B, T>;
    using backward_fn = std::function<void(context_t<B>&, tape&)>;

    explicit tape(parameter_gradients<B, T>* parameters = nullptr) : parameters_(parameters) {}

    /// The board trainable modules deliver to (may be null: no trainable parameters).
    parameter_gradients<B, T>* parameters() const noexcept { return parameters_; }

    /// An input whose gradient the caller reads after backward.
    variable_type leaf(tensor_type value) { return output(std::move(value)); }
    /// A module's output: a fresh slot.
    variable_type output(tensor_type value) {
        grads_.emplace_back();
        return {std::move(value), static_cast<index_t>(grads_.size() - 1)};
    }

    /// Appends an entry; `backward` reads its outputs' gradients (take) and adds its inputs' (add_gradient).
    void record(std::string name, backward_fn backward) { entries_.push_back({std::move(name), std::move(backward)}); }

    /// Names of the recorded entries, in forward order.
    std::vector<std::string> entry_names() const {
        std::vector<std::string> names;
        for (const auto& e : entries_) names.push_back(e.name);
        return names;
    }
    std::size_t size() const noexcept { return entries_.size(); }

    /// Accumulates into `v`'s slot; an undefined gradient is a zero and ignored.
    void add_gradient(context_t<B>& ctx, const variable_type& v, const tensor_type& grad) {
        if (!grad.defined()) return;
        auto& g = slot(v);
        check<shape_error>(grad.shape() == v.value.shape(), "training", "gradient ", grad.shape().str(), " for a variable of shape ",
                           v.value.shape().str());
        if (!g.defined()) {
            g = grad;
        } else {
            g = ops::add(ctx, g, grad);  // a fresh tensor: `grad` may share storage with a caller's
        }
    }
    /// The gradient of `v` so far (undefined: none reached it).
    const tensor_type& gradient(const variable_type& v) const {
        check<value_error>(v.slot >= 0 && v.slot < static_cast<index_t>(grads_.size()), "training", "variable not on this tape");
        return grads_[static_cast<std::size_t>(v.slot)];
    }
    /// Moves the gradient out of `v`'s slot (an intermediate is read once, by its producer).
    tensor_type take(const variable_type& v) {
        auto g = std::move(slot(v));
        slot(v) = {};
        return g;
    }

    /// Seeds `root` with `grad` and runs every entry in reverse, releasing its
    /// saved state as it goes. The tape is empty afterwards; leaves keep their gradients.
    void backward(context_t<B>& ctx, const variable_type& root, const tensor_type& grad) {
        check<shape_error>(grad.defined() && grad.shape() == root.value.shape(), "training", "seed gradient ",
                           grad.defined() ? grad.shape().str() : std::string("(undefined)"), " for an output of shape ",
                           root.value.shape().str());
        add_gradient(ctx, root, grad);
        while (!entries_.empty()) {
            auto e = std::move(entries_.back());
            entries_.pop_back();
            e.backward(ctx, *this);
        }
    }

private:
    struct entry {
        std::string name;
        backward_fn backward;
    };
    tensor_type& slot(const variable_type& v) {
        check<value_error>(v.slot >= 0 && v.slot < static_cast<index_t>(grads_.size()), "training", "variable not on this tape");
        return grads_[static_cast<std::size_t>(v.slot)];
    }

    parameter_gradients<B, T>* parameters_ = nullptr;
    std::vector<entry> entries_;
    std::vector<tensor_type> grads_;
};

}  // namespace dynamicid::training
