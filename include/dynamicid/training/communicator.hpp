// dynamicid training: collective communication for data-parallel training.
//
// A communicator connects the `size()` processes (ranks) of a data-parallel
// job. The core knows only the concept and the one-process model of it;
// MPI and NCCL models live in their own headers (mpi_communicator.hpp,
// nccl_communicator.hpp) behind the CMake targets dynamicid::mpi and
// dynamicid::nccl, so that nothing here needs either library.
//
// A communicator works on memory of one kind (`C::memory`): host memory for
// MPI, device memory for NCCL. The tensor helpers below and the
// gradient_bucketer stage through the host when the communicator asks for it.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// A collective operation failed (MPI or NCCL reported an error).
class communication_error : public error {
public:
    using error::error;
};

/// Where a communicator expects the buffers it reduces.
enum class memory_space : std::uint8_t { host, device };

/// C can reduce and broadcast buffers of T.
template <class C, class T>
concept communicates = requires(C& c, std::span<T> s, typename C::request& r, int root) {
    { c.start_allreduce_sum(s) } -> std::same_as<typename C::request>;
    c.wait(r);
    c.allreduce_sum(s);
    c.broadcast(s, root);
};

/// The communicator concept: a rank in a group of `size()` processes with
///   start_allreduce_sum(span) -> request   non-blocking in-place sum over ranks
///   wait(request&)                         completes it
///   allreduce_sum(span), broadcast(span, root), barrier()
/// over f32 buffers at least (f64 and others: `communicates<C, T>`).
///
///     template <training::communicator C>
///     void sync_initial_weights(C& comm, std::span<float> w) { comm.broadcast(w, 0); }
template <class C>
concept communicator = requires(C& c, const C& cc) {
    typename C::request;
    { cc.rank() } -> std::convertible_to<int>;
    { cc.size() } -> std::convertible_to<int>;
    { C::memory } -> std::convertible_to<memory_space>;
    c.barrier();
} && communicates<C, float>;

/// The one-process communicator: every collective is the identity. The
/// default for training that is not data-parallel; needs no MPI.
///
///     training::single_process_communicator comm;
///     training::gradient_bucketer<B, float, training::single_process_communicator> buckets(comm, params);
struct single_process_communicator {
    struct request {};
    static constexpr memory_space memory = memory_space::host;

    int rank() const noexcept { return 0; }
    int size() const noexcept { return 1; }
    template <class T>
    request start_allreduce_sum(std::span<T>) noexcept { return {}; }
    void wait(request&) noexcept {}
    template <class T>
    void allreduce_sum(std::span<T>) noexcept {}
    template <class T>
    void broadcast(std::span<T>, int root) {
        check(root == 0, "communicator", "broadcast root ", root, " out of range for 1 process");
    }
    void barrier() noexcept {}
};
static_assert(communicator<single_process_communicator>);

namespace detail {

template <class C>
inline constexpr bool host_memory_v = C::memory == memory_space::host;

// x / size in T's accumulation type: the same on every rank.
template <class T>
void divide_host(std::span<T> values, int size) {
    using A = accum_t<T>;
    const A d = static_cast<A>(size);
    for (auto& v : values) v = element_cast<T>(element_cast<A>(v) / d);
}

// Runs f on a span over t's elements in the communicator's memory space.
template <class C, class B, class T, class F>
void with_comm_span(context_t<B>& ctx, const tensor<B, T>& t, bool write_back, F&& f) {
    const auto n = static_cast<std::size_t>(t.numel());
    if constexpr (host_memory_v<C>) {
        std::vector<T> host = t.to_host(ctx);
        f(std::span<T>(host));
        if (write_back && n) B::copy_from_host(ctx, host.data(), t.data(), n);
    } else {
        static_assert(std::is_same_v<pointer_t<B, T>, T*>, "a device communicator needs a backend with raw device pointers");
        B::synchronize(ctx);  // the buffer must be complete before another stream reads it
        f(std::span<T>(t.data(), n));
    }
}

}  // namespace detail

/// Sums `t` over all ranks, in place.
template <communicator C, class B, class T>
    requires communicates<C, T>
void allreduce_sum(context_t<B>& ctx, C& comm, const tensor<B, T>& t) {
    if (comm.size() == 1) return;
    detail::with_comm_span<C>(ctx, t, true, [&](std::span<T> s) { comm.allreduce_sum(s); });
}

/// Averages `t` over all ranks, in place (the sum divided by size()).
template <communicator C, class B, class T>
    requires communicates<C, T>
void allreduce_average(context_t<B>& ctx, C& comm, const tensor<B, T>& t) {
    if (comm.size() == 1) return;
    if constexpr (detail::host_memory_v<C>) {
        detail::with_comm_span<C>(ctx, t, true, [&](std::span<T> s) {
            comm.allreduce_sum(s);
            detail::divide_host(s, comm.size());
        });
    } else {
        allreduce_sum(ctx, comm, t);
        if (t.numel()) B::axpby(ctx, static_cast<std::size_t>(t.numel()), 1.0 / comm.size(), t.data(), 0.0, t.data());
    }
}

/// Averages a host buffer over all ranks (host-memory communicators).
template <communicator C, class T>
    requires communicates<C, T> && (C::memory == memory_space::host)
void allreduce_average(C& comm, std::span<T> values) {
    if (comm.size() == 1) return;
    comm.allreduce_sum(values);
    detail::divide_host(values, comm.size());
}

/// Copies rank `root`'s `t` into every other rank's `t` (e.g. initial weights).
template <communicator C, class B, class T>
    requires communicates<C, T>
void broadcast(context_t<B>& ctx, C& comm, const tensor<B, T>& t, int root = 0) {
    check(root >= 0 && root < comm.size(), "communicator", "broadcast root ", root, " out of range for ", comm.size(),
          " processes");
    if (comm.size() == 1) return;
    detail::with_comm_span<C>(ctx, t, true, [&](std::span<T> s) { comm.broadcast(s, root); });
}

/// Bucket sizing of a gradient_bucketer.
struct bucket_options {
    /// A bucket closes once it holds at least this many bytes (torch DDP's
    /// default is 25 MiB); a parameter larger than this gets a bucket of its own.
    std::size_t bucket_bytes = std::size_t{25} << 20;
    /// finish() divides the sums by size() (false: gradients hold the sum over
    /// ranks, for losses already scaled by the global batch).
    bool average = true;
};

/// Averages gradients over ranks while the backward is still running.
///
/// Parameters are packed into buckets in reverse order (the order a backward
/// produces their gradients). As gradient i becomes final the backward calls
/// `grad_ready(ctx, i, grad)` (or the callback()); when the last gradient of a
/// bucket arrives, its all-reduce is started without waiting, so communication
/// overlaps the rest of the backward. Buckets are started in bucket order on
/// every rank, as collectives must be. `finish()` waits for all of them, divides
/// by size() and writes the averages into the gradient tensors that were passed.
/// The communicator must outlive the bucketer.
///
///     training::mpi_communicator comm;                                  // or single_process_communicator
///     training::gradient_bucketer<B, float, training::mpi_communicator> buckets(comm, params, {.bucket_bytes = 1 << 20});
///     model.backward(ctx, saved, grad_out, buckets.callback(ctx));       // calls grad_ready(i, grad)
///     buckets.finish(ctx);                                              // grads now hold the rank average
///     optimizer.step(ctx, grads);
template <class B, class T, communicator C>
    requires backend<B> && communicates<C, T>
class gradient_bucketer {
public:
    using callback_type = std::function<void(std::size_t, tensor<B, T>&)>;

    /// Buckets for parameters of the given element counts.
    gradient_bucketer(C& comm, std::vector<index_t> param_numels, bucket_options options = {})
        : comm_(&comm), numels_(std::move(param_numels)), options_(options) {
        check(options_.bucket_bytes > 0, component, "bucket_bytes must be > 0");
        bucket_of_.assign(numels_.size(), 0);
        offset_of_.assign(numels_.size(), 0);
        for (std::size_t k = numels_.size(); k-- > 0;) {
            check<shape_error>(numels_[k] >= 0, component, "parameter ", k, " has a negative size");
            if (buckets_.empty() || buckets_.back().elements * sizeof(T) >= options_.bucket_bytes) buckets_.emplace_back();
            auto& b = buckets_.back();
            bucket_of_[k] = buckets_.size() - 1;
            offset_of_[k] = b.elements;
            b.params.push_back(k);
            b.elements += static_cast<std::size_t>(numels_[k]);
        }
        grads_.resize(numels_.size());
        arrived_.assign(numels_.size(), false);
    }

    /// Buckets shaped after `params` (only their sizes are used).
    gradient_bucketer(C& comm, std::span<const tensor<B, T>> params, bucket_options options = {})
        : gradient_bucketer(comm, numels_of(params), options) {}
    gradient_bucketer(C& comm, const std::vector<tensor<B, T>>& params, bucket_options options = {})
        : gradient_bucketer(comm, std::span<const tensor<B, T>>(params), options) {}

    gradient_bucketer(const gradient_bucketer&) = delete;
    gradient_bucketer& operator=(const gradient_bucketer&) = delete;
    ~gradient_bucketer() { abandon(); }

    std::size_t bucket_count() const noexcept { return buckets_.size(); }
    /// The parameter indices of bucket b, in the order they were packed.
    const std::vector<std::size_t>& bucket_params(std::size_t b) const { return buckets_.at(b).params; }
    /// How many buckets have had their all-reduce started in this iteration.
    std::size_t buckets_started() const noexcept { return next_launch_; }

    /// Gradient `param_index` is final: pack it and, if that completes its
    /// bucket, start the bucket's all-reduce. `grad` receives the average in finish().
    void grad_ready(context_t<B>& ctx, std::size_t param_index, tensor<B, T>& grad) {
        check(param_index < numels_.size(), component, "parameter index ", param_index, " out of range (", numels_.size(),
              " parameters)");
        check(!arrived_[param_index], component, "gradient of parameter ", param_index, " arrived twice in one iteration");
        check<shape_error>(grad.defined() && grad.numel() == numels_[param_index], component, "gradient of parameter ",
                           param_index, " has ", grad.defined() ? grad.numel() : 0, " elements, expected ",
                           numels_[param_index]);
        arrived_[param_index] = true;
        grads_[param_index] = grad;
        auto& b = buckets_[bucket_of_[param_index]];
        if (comm_->size() > 1) pack(ctx, b, param_index, grad);
        if (++b.arrived == b.params.size()) launch_ready(ctx);
    }

    /// grad_ready bound to `ctx`, in the form the backward passes take.
    callback_type callback(context_t<B>& ctx) {
        return [this, &ctx](std::size_t i, tensor<B, T>& g) { grad_ready(ctx, i, g); };
    }

    /// Waits for every bucket, divides by size() and writes the averages back
    /// into the gradients; then the bucketer is ready for the next iteration.
    /// Throws value_error (after waiting for what was started) when a
    /// gradient never arrived.
    void finish(context_t<B>& ctx) {
        std::size_t missing = numels_.size();
        for (std::size_t i = 0; i < numels_.size() && missing == numels_.size(); ++i)
            if (!arrived_[i]) missing = i;
        if (missing != numels_.size()) {
            abandon();
            throw value_error(component, "the gradient of parameter " + std::to_string(missing) +
                                             " never arrived; every parameter must report one each iteration");
        }
        try {
            for (std::size_t b = 0; b < buckets_.size(); ++b) complete(ctx, buckets_[b]);
        } catch (...) {
            abandon();
            throw;
        }
        reset_iteration();
    }

    /// Drops the current iteration (waiting for started reductions first).
    void abandon() noexcept {
        for (std::size_t b = 0; b < next_launch_ && b < buckets_.size(); ++b) {
            if (!buckets_[b].in_flight) continue;
            try {
                comm_->wait(buckets_[b].request);
            } catch (...) {  // nothing more can be done for a failed reduction being dropped
            }
            buckets_[b].in_flight = false;
        }
        reset_iteration();
    }

private:
    static constexpr const char* component = "gradient_bucketer";
    static constexpr bool host_staging = C::memory == memory_space::host;

    struct bucket {
        std::vector<std::size_t> params;
        std::size_t elements = 0;
        std::size_t arrived = 0;
        std::vector<T> host;  // host-memory communicators
        tensor<B, T> device;  // device-memory communicators
        typename C::request request{};
        bool in_flight = false;
    };

    static std::vector<index_t> numels_of(std::span<const tensor<B, T>> params) {
        std::vector<index_t> out;
        out.reserve(params.size());
        for (const auto& p : params) out.push_back(p.defined() ? p.numel() : 0);
        return out;
    }

    void pack(context_t<B>& ctx, bucket& b, std::size_t k, const tensor<B, T>& grad) {
        const auto n = static_cast<std::size_t>(numels_[k]);
        if constexpr (host_staging) {
            if (b.host.size() != b.elements) b.host.resize(b.elements);
            if (n) B::copy_to_host(ctx, grad.data(), b.host.data() + offset_of_[k], n);
        } else {
            if (!b.device.defined()) b.device = tensor<B, T>::empty(ctx, shape({static_cast<index_t>(b.elements)}));
            if (n) B::copy(ctx, const_pointer_t<B, T>(grad.data()), b.device.data() + static_cast<std::ptrdiff_t>(offset_of_[k]), n);
        }
    }

    std::span<T> comm_span(bucket& b) {
        if constexpr (host_staging) return std::span<T>(b.host);
        else return std::span<T>(b.device.data(), b.elements);
    }

    // Starts every complete bucket whose predecessors have started.
    void launch_ready(context_t<B>& ctx) {
        if (comm_->size() == 1) {
            while (next_launch_ < buckets_.size() && buckets_[next_launch_].arrived == buckets_[next_launch_].params.size())
                ++next_launch_;
            return;
        }
        bool synced = false;
        while (next_launch_ < buckets_.size() && buckets_[next_launch_].arrived == buckets_[next_launch_].params.size()) {
            if (!synced) {
                B::synchronize(ctx);  // packing copies may still be queued on the backend
                synced = true;
            }
            auto& b = buckets_[next_launch_];
            b.request = comm_->start_allreduce_sum(comm_span(b));
            b.in_flight = true;
            ++next_launch_;
        }
    }

    void complete(context_t<B>& ctx, bucket& b) {
        if (comm_->size() == 1) return;
        if (b.in_flight) {
            comm_->wait(b.request);
            b.in_flight = false;
        }
        const int size = options_.average ? comm_->size() : 1;
        if constexpr (host_staging) {
            if (size > 1) detail::divide_host(std::span<T>(b.host), size);
            for (const std::size_t k : b.params) {
                const auto n = static_cast<std::size_t>(numels_[k]);
                if (n) B::copy_from_host(ctx, b.host.data() + offset_of_[k], grads_[k].data(), n);
            }
        } else {
            if (b.elements) B::axpby(ctx, b.elements, 1.0 / size, const_pointer_t<B, T>(b.device.data()), 0.0, b.device.data());
            for (const std::size_t k : b.params) {
                const auto n = static_cast<std::size_t>(numels_[k]);
                if (n)
                    B::copy(ctx, const_pointer_t<B, T>(b.device.data() + static_cast<std::ptrdiff_t>(offset_of_[k])), grads_[k].data(),
                            n);
            }
        }
    }

    void reset_iteration() noexcept {
        for (auto& b : buckets_) {
            b.arrived = 0;
            b.in_flight = false;
        }
        for (auto& g : grads_) g = tensor<B, T>{};
        std::fill(arrived_.begin(), arrived_.end(), false);
        next_launch_ = 0;
    }

    C* comm_;
    std::vector<index_t> numels_;
    bucket_options options_;
    std::vector<bucket> buckets_;
    std::vector<std::size_t> bucket_of_, offset_of_;
    std::vector<tensor<B, T>> grads_;
    std::vector<bool> arrived_;
    std::size_t next_launch_ = 0;
};

}  // namespace dynamicid::training
