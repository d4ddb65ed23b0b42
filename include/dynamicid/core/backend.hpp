// dynamicid: the Backend concept and its optional capabilities.
//
// A backend is a stateless type whose static functions own memory and run the
// primitives. A type opts in by specialising `enable_backend`, so that a type
// that merely looks like one is never picked up by accident:
//
//     struct my_backend { ... };
//     template <> inline constexpr bool dynamicid::enable_backend<my_backend> = true;
//     static_assert(dynamicid::backend<my_backend>);
//
// Associated types
//   B::context          per-call state: threads, streams, engines, caches.
//   B::buffer<T>        an owning, movable allocation of T; .data() and .size().
//   B::pointer<T>       what buffer<T>::data() returns; supports `p + n`.
//                       Nothing in the core dereferences it.
//   B::const_pointer<T>
//
// Memory: allocate, copy_to_host, copy_from_host, copy, fill, convert, synchronize.
// Primitives (f32 required; each forward has a backward taking what it saved):
//   gemm, conv2d_{forward,backward_data,backward_weight},
//   group_norm_{forward,backward}, layer_norm_{forward,backward},
//   softmax_{forward,backward}, unary_{forward,backward} (ReLU, SiLU, GELU...),
//   geglu_{forward,backward}, binary_{forward,backward} with broadcasting,
//   reduce_{forward,backward}, strided_copy (permute/slice/concat lower to it),
//   upsample_nearest_{forward,backward}, axpby, random_{uniform,normal}.
#pragma once

#include <dynamicid/core/descriptors.hpp>
#include <dynamicid/core/dtype.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace dynamicid {

/// Opt-in switch: specialise to true next to a backend's definition.
template <class B>
inline constexpr bool enable_backend = false;

/// A backend's per-call context type.
template <class B>
using context_t = typename B::context;

/// A backend's owning buffer of T.
template <class B, class T>
using buffer_t = typename B::template buffer<T>;

/// A backend's device pointer to T.
template <class B, class T>
using pointer_t = typename B::template pointer<T>;

template <class B, class T>
using const_pointer_t = typename B::template const_pointer<T>;

namespace detail {
template <class T>
inline constexpr T* null_of = nullptr;
}

/// The memory half of the concept: allocation and host/device traffic for T.
template <class B, class T>
concept backend_memory = requires(context_t<B>& ctx, buffer_t<B, T>& buf, pointer_t<B, T> p, const_pointer_t<B, T> cp,
                                  T* host, const T* chost, std::size_t n, T value) {
    { B::template allocate<T>(ctx, n) } -> std::same_as<buffer_t<B, T>>;
    { buf.data() } -> std::convertible_to<pointer_t<B, T>>;
    { buf.size() } -> std::convertible_to<std::size_t>;
    { p + std::ptrdiff_t{1} } -> std::convertible_to<pointer_t<B, T>>;
    { cp + std::ptrdiff_t{1} } -> std::convertible_to<const_pointer_t<B, T>>;
    requires std::convertible_to<pointer_t<B, T>, const_pointer_t<B, T>>;
    requires std::movable<buffer_t<B, T>>;
    B::copy_to_host(ctx, cp, host, n);
    B::copy_from_host(ctx, chost, p, n);
    B::copy(ctx, cp, p, n);
    B::fill(ctx, p, n, value);
};

/// The primitives for floating element type T, each with its backward.
template <class B, class T>
concept backend_primitives = requires(context_t<B>& ctx, pointer_t<B, T> p, const_pointer_t<B, T> cp,
                                      pointer_t<B, accum_t<T>> stat, const_pointer_t<B, accum_t<T>> cstat,
                                      const gemm_desc& gd, const conv2d_desc& cd, const group_norm_desc& gnd,
                                      const layer_norm_desc& lnd, const softmax_desc& sd, const geglu_desc& ggd,
                                      const binary_desc& bd, const strided_copy_desc& scd, const reduce_desc& rd,
                                      const upsample_desc& ud, unary_op uo, binary_op bo, std::size_t n,
                                      std::uint64_t seed, double scalar) {
    B::gemm(ctx, gd, cp, cp, p);
    B::conv2d_forward(ctx, cd, cp, cp, cp, p);
    B::conv2d_backward_data(ctx, cd, cp, cp, p);
    B::conv2d_backward_weight(ctx, cd, cp, cp, p, p);
    B::group_norm_forward(ctx, gnd, cp, cp, cp, p, stat, stat);
    B::group_norm_backward(ctx, gnd, cp, cp, cstat, cstat, cp, p, p, p);
    B::layer_norm_forward(ctx, lnd, cp, cp, cp, p, stat, stat);
    B::layer_norm_backward(ctx, lnd, cp, cp, cstat, cstat, cp, p, p, p);
    B::softmax_forward(ctx, sd, cp, p);
    B::softmax_backward(ctx, sd, cp, cp, p);
    B::unary_forward(ctx, uo, n, cp, p);
    B::unary_backward(ctx, uo, n, cp, cp, p);
    B::geglu_forward(ctx, ggd, cp, p);
    B::geglu_backward(ctx, ggd, cp, cp, p);
    B::binary_forward(ctx, bo, bd, cp, cp, p);
    B::binary_backward(ctx, bo, bd, cp, cp, cp, p, p);
    B::reduce_forward(ctx, rd, cp, p);
    B::reduce_backward(ctx, rd, cp, p);
    B::strided_copy(ctx, scd, cp, p, true);
    B::upsample_nearest_forward(ctx, ud, cp, p);
    B::upsample_nearest_backward(ctx, ud, cp, p);
    B::axpby(ctx, n, scalar, cp, scalar, p);
    B::random_uniform(ctx, seed, seed, n, p);
    B::random_normal(ctx, seed, seed, n, p);
};

/// Element type T is usable on B: memory plus every primitive.
template <class B, class T>
concept supports_element = floating_element<T> && backend_memory<B, T> && backend_primitives<B, T> &&
                           backend_memory<B, accum_t<T>>;

/// A backend: opted in, with a context, and complete for f32 (the one type
/// every backend must compute in). f64, f16 and bf16 are optional: test them
/// with `supports_element<B, double>` and friends.
template <class B>
concept backend = enable_backend<B> && std::default_initializable<context_t<B>> &&
                  requires(context_t<B>& ctx) { B::synchronize(ctx); B::name(); } &&
                  supports_element<B, float> && requires(context_t<B>& ctx, const float* a, half* b, std::size_t n) {
                      // Mixed-type conversion (weights stored in f16/bf16, computed in f32).
                      B::convert(ctx, static_cast<const_pointer_t<B, float>>(nullptr), static_cast<pointer_t<B, half>>(nullptr), n);
                      B::convert(ctx, static_cast<const_pointer_t<B, float>>(nullptr), static_cast<pointer_t<B, bfloat16>>(nullptr), n);
                      B::convert(ctx, static_cast<const_pointer_t<B, half>>(nullptr), static_cast<pointer_t<B, float>>(nullptr), n);
                      B::convert(ctx, static_cast<const_pointer_t<B, bfloat16>>(nullptr), static_cast<pointer_t<B, float>>(nullptr), n);
                  };

/// Optional capability: a fused scaled-dot-product attention. The core uses it
/// when present and otherwise composes attention from gemm and softmax.
///   q (batch, lq, d), k (batch, lk, d), v (batch, lk, dv) -> out (batch, lq, dv)
template <class B, class T = float>
concept has_fused_attention = backend<B> && requires(context_t<B>& ctx, const_pointer_t<B, T> cp, pointer_t<B, T> p,
                                                     index_t batch, index_t lq, index_t lk, index_t d, index_t dv, double scale) {
    B::attention_forward(ctx, batch, lq, lk, d, dv, scale, cp, cp, cp, p);
};

/// Optional capability: the SAA gate (saa_gate_desc) on the device, so a gated
/// identity branch never waits for the host. `normalized` (f32, may be null)
/// receives the thresholded min-max weights before the layout boost.
///   q (batch, queries, hidden), key_sum (batch, hidden) -> gate (batch, queries)
template <class B, class T = float>
concept has_saa_gate = backend<B> && requires(context_t<B>& ctx, const saa_gate_desc& d, const_pointer_t<B, T> cp, pointer_t<B, T> p,
                                              pointer_t<B, float> f) { B::saa_gate(ctx, d, cp, cp, p, f); };

/// Optional capability: asynchronous execution with events a caller may wait on.
template <class B>
concept has_async_events = backend<B> && requires(context_t<B>& ctx) {
    typename B::event;
    { B::record_event(ctx) } -> std::same_as<typename B::event>;
    B::wait_event(ctx, std::declval<const typename B::event&>());
};

/// Optional capability: recording the device work of a repeated call once
/// and replaying it as one unit (CUDA graphs). B::step_graph is default
/// constructible and its run(ctx, variant, fn, inputs...) returns
/// fn(inputs...), replaying a recording when the input shapes and the variant
/// match an earlier call (see cuda_backend::step_graph for the contract).
/// step_runner below uses it where present and calls fn directly elsewhere.
template <class B>
concept has_step_graph = backend<B> && requires { typename B::step_graph; } && std::default_initializable<typename B::step_graph>;

namespace detail {
struct no_step_graph {};
template <class B, bool = has_step_graph<B>>
struct step_graph_of {
    using type = no_step_graph;
};
template <class B>
struct step_graph_of<B, true> {
    using type = typename B::step_graph;
};
}  // namespace detail

/// One step_graph for backends that have it, nothing for the rest.
/// run(ctx, variant, fn, inputs...) replays fn through the graph, or calls
/// fn(inputs...) directly (on other backends, or when not enabled).
template <class B>
class step_runner {
public:
    template <class F, class... Inputs>
    decltype(auto) run(context_t<B>& ctx, std::uint64_t variant, F&& fn, const Inputs&... inputs) {
        if constexpr (has_step_graph<B>) {
            if (enabled) return graph_.run(ctx, variant, fn, inputs...);
            return fn(inputs...);
        } else {
            (void)ctx;
            (void)variant;
            return fn(inputs...);
        }
    }
    /// False calls fn directly every time (work a graph cannot hold, such as
    /// callbacks that read device data on the host each call).
    bool enabled = true;

private:
    [[no_unique_address]] typename detail::step_graph_of<B>::type graph_;
};

/// True when B computes natively in T (not only stores it).
template <class B, class T>
concept has_native_math = backend<B> && supports_element<B, T>;

}  // namespace dynamicid
