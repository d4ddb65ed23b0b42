// dynamicid: the oneDNN backend, the fast CPU path.
//
// Same host memory and interface as the reference CPU backend, with the heavy
// primitives run by oneDNN: matmul (batched, strided, alpha as an output scale,
// beta as a sum post-op), convolution forward and both backwards in the memory
// formats oneDNN picks (blocked activations and weights, reordered in and out
// per call), layer norm, eltwise activations, GEGLU, softmax, broadcasting
// binary ops, reductions, strided copies (reorders), nearest resampling, and a
// blocked attention (the has_fused_attention capability) built on them, plus
// group norm forward and backward in kernels of our own (oneDNN 2.x has no
// group-norm primitive). f32 and bf16 (bf16 storage, f32 accumulation,
// avx512_bf16 kernels where the CPU has them) compute natively; bf16 needs
// AVX-512 (native_bf16() says whether this CPU has it). Everything
// else, and f64 and f16 entirely, runs on the reference backend's code with
// the same thread count: binary and reduce backward, axpby, conversion and
// random numbers, and any configuration for which oneDNN reports no
// implementation.
//
//     #include <dynamicid/backends/onednn.hpp>
//     dynamicid::onednn_backend::context ctx{.threads = 2};
//     auto x = dynamicid::ops::randn<dynamicid::onednn_backend, float>(ctx, {2, 4, 32, 32}, 1);
//
// Threads: every oneDNN call runs inside the context's thread count (OpenMP's
// setting is changed for the call and restored). A context caches primitive
// descriptors keyed by the op's descriptor, element type and thread count;
// copies of a context share that cache. Give each host thread its own context.
// On cores shared with other processes, OMP_WAIT_POLICY=PASSIVE keeps idle
// OpenMP threads from spinning between calls (it is read at program start).
//
// Memory: plain host memory, 64-byte aligned. Freed allocations of 1 MiB and
// more are cached for reuse (context::host_cache_bytes, 1 GiB by default;
// release_cached() empties the cache): above glibc's mmap threshold each
// fresh allocation otherwise costs page faults and zeroing on first touch.
//
// Weights: by default a convolution reorders its weights into oneDNN's blocked
// layout on every call (4-5% of a UNet evaluation), because nothing tells the
// backend when host memory is written. context::weight_cache_bytes keeps the
// reordered copies across calls, checked against a fingerprint of the weights
// on every use (detail/weight_cache.hpp): for inference.
#pragma once

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/backends/onednn/detail/group_norm.hpp>
#include <dynamicid/backends/onednn/detail/runtime.hpp>
#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string_view>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>

namespace dynamicid {

/// The oneDNN CPU backend. Stateless; all state lives in the context.
struct onednn_backend {
    /// Threads per call (0: std::thread::hardware_concurrency()) and the
    /// oneDNN runtime (engine, stream, primitive cache), made on first use.
    struct context {
        int threads = 0;
        /// Freed host allocations of 1 MiB and more are kept for reuse, up to
        /// this many bytes per runtime (0: every allocation goes back to the
        /// system at once). release_cached() hands them back.
        std::size_t host_cache_bytes = std::size_t{1} << 30;
        /// Convolution forward keeps weights reordered into oneDNN's layout
        /// across calls, up to this many bytes (0, the default: reordered on
        /// every call). Each use checks the weights' count and 16 sampled
        /// values, so a rewrite or another tensor at a reused address is
        /// noticed, but an in-place write that leaves those 16 unchanged is
        /// not: turn it on where weights are not written while cached, as in
        /// inference. release_cached() empties it.
        std::size_t weight_cache_bytes = 0;
        std::shared_ptr<onednn::detail::runtime> state = nullptr;

        int thread_count() const {
            if (threads > 0) return threads;
            const unsigned hw = std::thread::hardware_concurrency();
            return hw ? static_cast<int>(hw) : 1;
        }
        onednn::detail::runtime& runtime() {
            if (!state) state = std::make_shared<onednn::detail::runtime>();
            return *state;
        }
        /// The reference backend's context with the same thread count.
        cpu_backend::context reference() const { return {.threads = thread_count()}; }
    };

    template <class T> using pointer = T*;
    template <class T> using const_pointer = const T*;
    template <class T> using buffer = onednn::detail::pooled_buffer<T>;

    static constexpr const char* name() { return "onednn"; }

    /// Element types oneDNN computes in here; the others run on the reference code.
    template <class T>
    static constexpr bool native = std::is_same_v<T, float> || std::is_same_v<T, bfloat16>;

    // ---- memory (plain host memory, as the reference backend) -------------------

    template <class T>
    static buffer<T> allocate(context& ctx, std::size_t n) {
        if (n == 0) return buffer<T>();
        return buffer<T>(n, ctx.host_cache_bytes > 0 ? ctx.runtime().pool(ctx.host_cache_bytes) : nullptr);
    }
    /// Frees the cached host allocations and reordered weights (see
    /// context::host_cache_bytes and weight_cache_bytes); live buffers are untouched.
    static void release_cached(context& ctx) {
        if (!ctx.state) return;
        if (ctx.state->pool_if_made()) ctx.state->pool_if_made()->trim();
        ctx.state->weights().clear();
    }
    template <class T>
    static void copy_to_host(context&, const T* src, T* host, std::size_t n) {
        if (n) std::memcpy(host, src, n * sizeof(T));
    }
    template <class T>
    static void copy_from_host(context&, const T* host, T* dst, std::size_t n) {
        if (n) std::memcpy(dst, host, n * sizeof(T));
    }
    template <class T>
    static void copy(context&, const T* src, T* dst, std::size_t n) {
        if (n) std::memmove(dst, src, n * sizeof(T));
    }
    template <class T>
    static void fill(context&, T* dst, std::size_t n, T value) { std::fill(dst, dst + n, value); }
    template <class From, class To>
    static void convert(context& ctx, const From* src, To* dst, std::size_t n) {
        auto ref = ctx.reference();
        cpu_backend::convert(ref, src, dst, n);
    }
    static void synchronize(context&) {}  // every call waits for its stream

    // ---- linear algebra -------------------------------------------------------------

    template <class T>
    static void gemm(context& ctx, const gemm_desc& d, const T* a, const T* b, T* c) {
        if constexpr (native<T>) {
            if (d.batch > 0 && d.m > 0 && d.n > 0 && d.k > 0 && (d.batch == 1 || d.stride_c != 0)) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::key k("matmul");
                k << onednn::detail::data_type_of<T>() << threads << d.batch << d.m << d.n << d.k << d.trans_a << d.trans_b
                  << d.lda << d.ldb << d.ldc << (d.stride_a == 0) << (d.stride_b == 0) << d.stride_a << d.stride_b << d.stride_c
                  << d.alpha << d.beta;
                onednn::detail::thread_scope scope(threads);
                using entry = onednn::detail::planned<dnnl::matmul::primitive_desc, dnnl::matmul>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    const auto md = matmul_descs<T>(d);
                    dnnl::primitive_attr attr;
                    if (d.alpha != 1.0) attr.set_output_scales(0, {static_cast<float>(d.alpha)});
                    if (d.beta != 0.0) {
                        dnnl::post_ops po;
                        po.append_sum(static_cast<float>(d.beta));
                        attr.set_post_ops(po);
                    }
                    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(md[0], md[1], md[2]), attr, rt.engine());
                    return entry{pd, dnnl::matmul(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    e->primitive.execute(rt.stream(), {{DNNL_ARG_SRC, onednn::detail::wrap(e->pd.src_desc(), eng, a)},
                                                       {DNNL_ARG_WEIGHTS, onednn::detail::wrap(e->pd.weights_desc(), eng, b)},
                                                       {DNNL_ARG_DST, onednn::detail::wrap(e->pd.dst_desc(), eng, c)}});
                    rt.stream().wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::gemm(ref, d, a, b, c);
    }

    // ---- convolution ------------------------------------------------------------------

    template <class T>
    static void conv2d_forward(context& ctx, const conv2d_desc& d, const T* x, const T* w, const T* bias, T* y) {
        if constexpr (native<T>) {
            auto& rt = ctx.runtime();
            const int threads = ctx.thread_count();
            const bool has_bias = bias != nullptr;
            onednn::detail::thread_scope scope(threads);
            auto plan = conv_key("conv_fwd", d, onednn::detail::data_type_of<T>(), threads) << has_bias;
            auto* e = rt.template lookup<conv_fwd_entry>(plan, [&] { return make_conv_fwd<T>(rt, d, has_bias); });
            if (e) {
                const auto& eng = rt.engine();
                auto& s = rt.stream();
                auto src = staged_in(rt, e->src_in, e->user_src, e->pd.src_desc(), x, 0);
                auto wei = ctx.weight_cache_bytes > 0 && e->wei_in
                               ? cached_weights(ctx, rt, *e, plan.str(), w, static_cast<std::size_t>(d.c_out * (d.c_in / d.groups) * d.kh * d.kw))
                               : staged_in(rt, e->wei_in, e->user_wei, e->pd.weights_desc(), w, 1);
                auto user_dst = onednn::detail::wrap(e->user_dst, eng, y);
                auto dst = e->dst_out ? dnnl::memory(e->pd.dst_desc(), eng, rt.scratch(2, e->pd.dst_desc().get_size())) : user_dst;
                std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
                if (has_bias) args.emplace(DNNL_ARG_BIAS, onednn::detail::wrap(e->pd.bias_desc(), eng, bias));
                e->primitive.execute(s, args);
                if (e->dst_out) e->dst_out.execute(s, dst, user_dst);
                s.wait();
                return;
            }
        }
        auto ref = ctx.reference();
        cpu_backend::conv2d_forward(ref, d, x, w, bias, y);
    }

    template <class T>
    static void conv2d_backward_data(context& ctx, const conv2d_desc& d, const T* w, const T* dy, T* dx) {
        if constexpr (native<T>) {
            auto& rt = ctx.runtime();
            const int threads = ctx.thread_count();
            onednn::detail::thread_scope scope(threads);
            auto* e = rt.template lookup<conv_bwd_data_entry>(conv_key("conv_bwd_data", d, onednn::detail::data_type_of<T>(), threads),
                                                              [&] { return make_conv_bwd_data<T>(rt, d); });
            if (e) {
                const auto& eng = rt.engine();
                auto& s = rt.stream();
                auto wei = staged_in(rt, e->wei_in, e->user_wei, e->pd.weights_desc(), w, 1);
                auto ddst = staged_in(rt, e->diff_dst_in, e->user_dst, e->pd.diff_dst_desc(), dy, 0);
                auto user_dsrc = onednn::detail::wrap(e->user_src, eng, dx);
                auto dsrc = e->diff_src_out ? dnnl::memory(e->pd.diff_src_desc(), eng, rt.scratch(2, e->pd.diff_src_desc().get_size()))
                                            : user_dsrc;
                e->primitive.execute(s, {{DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, ddst}, {DNNL_ARG_DIFF_SRC, dsrc}});
                if (e->diff_src_out) e->diff_src_out.execute(s, dsrc, user_dsrc);
                s.wait();
                return;
            }
        }
        auto ref = ctx.reference();
        cpu_backend::conv2d_backward_data(ref, d, w, dy, dx);
    }

    /// dw and dbias may be null (frozen weight, no bias).
    template <class T>
    static void conv2d_backward_weight(context& ctx, const conv2d_desc& d, const T* x, const T* dy, T* dw, T* dbias) {
        if constexpr (native<T>) {
            if (dw) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                const bool has_bias = dbias != nullptr;
                onednn::detail::thread_scope scope(threads);
                auto* e = rt.template lookup<conv_bwd_weights_entry>(
                    conv_key("conv_bwd_weights", d, onednn::detail::data_type_of<T>(), threads) << has_bias,
                    [&] { return make_conv_bwd_weights<T>(rt, d, has_bias); });
                if (e) {
                    const auto& eng = rt.engine();
                    auto& s = rt.stream();
                    auto src = staged_in(rt, e->src_in, e->user_src, e->pd.src_desc(), x, 0);
                    auto ddst = staged_in(rt, e->diff_dst_in, e->user_dst, e->pd.diff_dst_desc(), dy, 1);
                    auto user_dw = onednn::detail::wrap(e->user_wei, eng, dw);
                    auto dwei = e->diff_wei_out
                                    ? dnnl::memory(e->pd.diff_weights_desc(), eng, rt.scratch(2, e->pd.diff_weights_desc().get_size()))
                                    : user_dw;
                    std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, ddst}, {DNNL_ARG_DIFF_WEIGHTS, dwei}};
                    if (has_bias) args.emplace(DNNL_ARG_DIFF_BIAS, onednn::detail::wrap(e->pd.diff_bias_desc(), eng, dbias));
                    e->primitive.execute(s, args);
                    if (e->diff_wei_out) e->diff_wei_out.execute(s, dwei, user_dw);
                    s.wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::conv2d_backward_weight(ref, d, x, dy, dw, dbias);
    }

    // ---- normalisation ---------------------------------------------------------------

    template <class T>
    static void group_norm_forward(context& ctx, const group_norm_desc& d, const T* x, const T* gamma, const T* beta, T* y,
                                   accum_t<T>* mean, accum_t<T>* rstd) {
        if constexpr (native<T>) {
            onednn::detail::group_norm_forward<T>(ctx.thread_count(), d, x, gamma, beta, y, mean, rstd);
        } else {
            auto ref = ctx.reference();
            cpu_backend::group_norm_forward(ref, d, x, gamma, beta, y, mean, rstd);
        }
    }
    template <class T>
    static void group_norm_backward(context& ctx, const group_norm_desc& d, const T* x, const T* gamma, const accum_t<T>* mean,
                                    const accum_t<T>* rstd, const T* dy, T* dx, T* dgamma, T* dbeta) {
        if constexpr (native<T>) {
            onednn::detail::group_norm_backward<T>(ctx.thread_count(), d, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
        } else {
            auto ref = ctx.reference();
            cpu_backend::group_norm_backward(ref, d, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
        }
    }

    /// oneDNN's layer normalisation (it saves the variance; the backend
    /// converts to and from the reciprocal standard deviation the ops layer
    /// keeps). oneDNN 2.6 takes scale and shift in f32 only, so bf16 converts
    /// gamma and beta (one row's worth) per call; the backward likewise
    /// converts gamma and its f32 affine gradients.
    template <class T>
    static void layer_norm_forward(context& ctx, const layer_norm_desc& d, const T* x, const T* gamma, const T* beta, T* y,
                                   accum_t<T>* mean, accum_t<T>* rstd) {
        if constexpr (native<T>) {
            if (d.rows > 0 && d.cols > 0) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                const auto flags = norm_flags(gamma != nullptr, beta != nullptr);
                onednn::detail::key k("lnorm_fwd");
                k << onednn::detail::data_type_of<T>() << threads << d.rows << d.cols << d.eps << flags;
                using entry = onednn::detail::planned<dnnl::layer_normalization_forward::primitive_desc, dnnl::layer_normalization_forward>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    auto pd = lnorm_fwd_pd<T>(rt, d, flags);
                    return entry{pd, dnnl::layer_normalization_forward(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    const auto rows = static_cast<std::size_t>(d.rows);
                    float* m = mean ? mean : static_cast<float*>(rt.scratch(0, rows * sizeof(float)));
                    float* var = static_cast<float*>(rt.scratch(1, rows * sizeof(float)));
                    std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, onednn::detail::wrap(e->pd.src_desc(), eng, x)},
                                                               {DNNL_ARG_DST, onednn::detail::wrap(e->pd.dst_desc(), eng, y)},
                                                               {DNNL_ARG_MEAN, onednn::detail::wrap(e->pd.mean_desc(), eng, m)},
                                                               {DNNL_ARG_VARIANCE, onednn::detail::wrap(e->pd.variance_desc(), eng, var)}};
                    const dnnl::memory::desc affine({d.cols}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::a);
                    if (gamma) args.emplace(DNNL_ARG_SCALE, onednn::detail::wrap(affine, eng, f32_operand(rt, gamma, d.cols, 4)));
                    if (beta) args.emplace(DNNL_ARG_SHIFT, onednn::detail::wrap(affine, eng, f32_operand(rt, beta, d.cols, 5)));
                    e->primitive.execute(rt.stream(), args);
                    rt.stream().wait();
                    if (rstd)
                        for (std::size_t r = 0; r < rows; ++r)
                            rstd[r] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var[r]) + d.eps));
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::layer_norm_forward(ref, d, x, gamma, beta, y, mean, rstd);
    }

    template <class T>
    static void layer_norm_backward(context& ctx, const layer_norm_desc& d, const T* x, const T* gamma, const accum_t<T>* mean,
                                    const accum_t<T>* rstd, const T* dy, T* dx, T* dgamma, T* dbeta) {
        if constexpr (native<T>) {
            // oneDNN computes the input gradient with the affine gradients; a
            // call without dx, or with only one of dgamma/dbeta, uses the reference.
            // Scale and the affine gradients are f32 operands: bf16 converts them.
            // With gamma but no affine gradients asked for, oneDNN 2.6 plans only
            // the full backward: its affine gradients go to scratch.
            const bool wanted = dgamma || dbeta;
            const bool params = wanted || gamma;
            if (dx && d.rows > 0 && d.cols > 0 && (!wanted || (dgamma && dbeta && gamma))) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                const auto flags = norm_flags(gamma != nullptr, params);
                onednn::detail::key k("lnorm_bwd");
                k << onednn::detail::data_type_of<T>() << threads << d.rows << d.cols << d.eps << flags << params;
                using entry = onednn::detail::planned<dnnl::layer_normalization_backward::primitive_desc, dnnl::layer_normalization_backward>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    const auto hint = lnorm_fwd_pd<T>(rt, d, flags);
                    const dnnl::memory::desc md({d.rows, d.cols}, onednn::detail::data_type_of<T>(), dnnl::memory::format_tag::ab);
                    dnnl::layer_normalization_backward::primitive_desc pd(
                        dnnl::layer_normalization_backward::desc(params ? dnnl::prop_kind::backward : dnnl::prop_kind::backward_data, md,
                                                                 md, static_cast<float>(d.eps), flags),
                        rt.engine(), hint);
                    return entry{pd, dnnl::layer_normalization_backward(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    const auto rows = static_cast<std::size_t>(d.rows);
                    const auto cols = static_cast<std::size_t>(d.cols);
                    // Back from the saved 1/sqrt(var + eps) to the variance oneDNN expects.
                    float* var = static_cast<float*>(rt.scratch(0, rows * sizeof(float)));
                    for (std::size_t r = 0; r < rows; ++r) {
                        const double inv = static_cast<double>(rstd[r]);
                        var[r] = static_cast<float>(1.0 / (inv * inv) - d.eps);
                    }
                    // Where oneDNN writes an f32 affine gradient: the caller's f32 vector, or a scratch slot.
                    auto f32_slot = [&](T* p, std::size_t slot) -> float* {
                        if constexpr (std::is_same_v<T, float>) {
                            if (p) return p;
                        }
                        return static_cast<float*>(rt.scratch(slot, cols * sizeof(float)));
                    };
                    const dnnl::memory::desc affine({d.cols}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::a);
                    std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, onednn::detail::wrap(e->pd.src_desc(), eng, x)},
                                                               {DNNL_ARG_DIFF_DST, onednn::detail::wrap(e->pd.diff_dst_desc(), eng, dy)},
                                                               {DNNL_ARG_MEAN, onednn::detail::wrap(e->pd.mean_desc(), eng, mean)},
                                                               {DNNL_ARG_VARIANCE, onednn::detail::wrap(e->pd.variance_desc(), eng, var)},
                                                               {DNNL_ARG_DIFF_SRC, onednn::detail::wrap(e->pd.diff_src_desc(), eng, dx)}};
                    if (gamma) args.emplace(DNNL_ARG_SCALE, onednn::detail::wrap(affine, eng, f32_operand(rt, gamma, d.cols, 4)));
                    float* dscale = nullptr;
                    float* dshift = nullptr;
                    if (params) {
                        // oneDNN 2.6 insists on a shift operand whenever the shift flag is
                        // set, although its backward never reads it.
                        auto* unused_shift = static_cast<float*>(rt.scratch(2, cols * sizeof(float)));
                        std::fill(unused_shift, unused_shift + d.cols, 0.0f);
                        dscale = f32_slot(dgamma, 5);
                        dshift = f32_slot(dbeta, 6);
                        args.emplace(DNNL_ARG_SHIFT, onednn::detail::wrap(affine, eng, unused_shift));
                        args.emplace(DNNL_ARG_DIFF_SCALE, onednn::detail::wrap(affine, eng, dscale));
                        args.emplace(DNNL_ARG_DIFF_SHIFT, onednn::detail::wrap(affine, eng, dshift));
                    }
                    e->primitive.execute(rt.stream(), args);
                    rt.stream().wait();
                    if constexpr (!std::is_same_v<T, float>) {
                        if (wanted) {
                            for (std::size_t i = 0; i < cols; ++i) dgamma[i] = static_cast<T>(dscale[i]);
                            if (dbeta)
                                for (std::size_t i = 0; i < cols; ++i) dbeta[i] = static_cast<T>(dshift[i]);
                        }
                    }
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::layer_norm_backward(ref, d, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
    }

    // ---- pointwise ----------------------------------------------------------------------

    /// oneDNN softmax; a row that is entirely -inf (fully masked) gives zeros, as in the reference.
    template <class T>
    static void softmax_forward(context& ctx, const softmax_desc& d, const T* x, T* y) {
        if constexpr (native<T>) {
            if (d.rows > 0 && d.cols > 0) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("softmax_fwd");
                k << onednn::detail::data_type_of<T>() << threads << d.rows << d.cols;
                using entry = onednn::detail::planned<dnnl::softmax_forward::primitive_desc, dnnl::softmax_forward>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    auto pd = softmax_fwd_pd<T>(rt, d);
                    return entry{pd, dnnl::softmax_forward(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    e->primitive.execute(rt.stream(), {{DNNL_ARG_SRC, onednn::detail::wrap(e->pd.src_desc(), eng, x)},
                                                       {DNNL_ARG_DST, onednn::detail::wrap(e->pd.dst_desc(), eng, y)}});
                    rt.stream().wait();
                    // A fully masked row comes out NaN (its maximum is -inf); its first entry tells.
                    for (index_t r = 0; r < d.rows; ++r) {
                        if (!std::isnan(static_cast<float>(y[r * d.cols]))) continue;
                        const T* xr = x + r * d.cols;
                        bool masked = true;
                        for (index_t i = 0; i < d.cols && masked; ++i) masked = static_cast<float>(xr[i]) == -std::numeric_limits<float>::infinity();
                        if (masked) std::fill(y + r * d.cols, y + (r + 1) * d.cols, T(0.0f));
                    }
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::softmax_forward(ref, d, x, y);
    }

    /// Scaled dot-product attention (the has_fused_attention capability), for
    /// inference: softmax(scale q k^T) v, computed a block of query rows at a
    /// time so that the scores never exist as a whole. A block's scores stay
    /// in cache between the two matmuls and the softmax, where the composed
    /// path writes and rereads batch x lq x lk values (a GiB at 4096 tokens
    /// and 16 heads). With several threads and at least as many heads, each
    /// thread takes its own heads with single-threaded primitives (its own
    /// oneDNN stream and plans), so no thread waits for another between the
    /// small matmuls. Same primitives and rounding as the composed path.
    ///   q (batch, lq, d), k (batch, lk, d), v (batch, lk, dv) -> out (batch, lq, dv)
    template <class T>
    static void attention_forward(context& ctx, index_t batch, index_t lq, index_t lk, index_t d, index_t dv, double scale, const T* q,
                                  const T* k, const T* v, T* out) {
        if (batch <= 0 || lq <= 0 || dv <= 0) return;
        if (lk <= 0) {  // softmax over nothing: the composed path gives zeros
            fill(ctx, out, static_cast<std::size_t>(batch * lq * dv), T(0.0f));
            return;
        }
        const attention_problem<T> p{lq, lk, d, dv, scale, q, k, v, out};
        const int threads = ctx.thread_count();
        if (native<T> && threads > 1 && batch >= threads) {
            auto& rt = ctx.runtime();
            std::vector<context> workers;
            for (int i = 0; i < threads; ++i) workers.push_back(context{.threads = 1, .host_cache_bytes = 0, .state = rt.worker(i)});
            // Worker w takes heads [batch w / threads, batch (w + 1) / threads). Inside
            // a caller's parallel region the workers run one after another on the
            // calling thread (parallel_for does not nest).
            cpu::detail::parallel_for(threads, threads, 1, [&](index_t w0, index_t w1) {
                for (index_t w = w0; w < w1; ++w) {
                    const index_t h0 = batch * w / threads, h1 = batch * (w + 1) / threads;
                    attention_blocks(workers[static_cast<std::size_t>(w)], p, h0, h1, attention_block(h1 - h0, lq, lk, index_t{1} << 18));
                }
            });
            return;
        }
        attention_blocks(ctx, p, 0, batch, attention_block(batch, lq, lk, index_t{1} << 20));
    }

    /// Whether oneDNN runs bf16 primitives on this CPU. oneDNN 2.x has bf16
    /// kernels from AVX-512 (avx512_core) up; on other CPUs (AVX2 only, for
    /// one) bf16 configurations have no implementation and run on the
    /// reference backend's code instead (correct, much slower), and
    /// context::runtime().unsupported() counts them.
    static bool native_bf16() noexcept {
        const auto isa = static_cast<unsigned>(dnnl_get_effective_cpu_isa());
        return (isa & dnnl_cpu_isa_avx512_core) == dnnl_cpu_isa_avx512_core;
    }

    /// Heads and query rows per attention block for scores of about `budget`
    /// values: several heads when a head's scores are smaller, else at least
    /// 32 rows (or all of them). One thread per head range: 256 Ki values (its
    /// share of L2); all threads on every block: a million (fewer cut each
    /// matmul too thin for several threads to share).
    static std::pair<index_t, index_t> attention_block(index_t batch, index_t lq, index_t lk, index_t budget) {
        if (lq * lk <= budget) return {std::clamp<index_t>(budget / (lq * lk), 1, std::max<index_t>(batch, 1)), lq};
        const index_t rows = std::max<index_t>(32, budget / lk / 16 * 16);
        return {1, std::min(rows, lq)};
    }

private:
    template <class T>
    struct attention_problem {
        index_t lq, lk, d, dv;
        double scale;
        const T *q, *k, *v;
        T* out;
    };

    // Heads [h0, h1) of an attention, `block` (heads, rows) at a time, on ctx.
    template <class T>
    static void attention_blocks(context& ctx, const attention_problem<T>& p, index_t h0, index_t h1, std::pair<index_t, index_t> block) {
        const auto [heads, rows] = block;
        const index_t lq = p.lq, lk = p.lk, d = p.d, dv = p.dv;
        T* scores = static_cast<T*>(ctx.runtime().scratch(3, static_cast<std::size_t>(heads * rows * lk) * sizeof(T)));
        for (index_t h = h0; h < h1; h += heads) {
            const index_t nh = std::min(heads, h1 - h);
            for (index_t r0 = 0; r0 < lq; r0 += rows) {
                const index_t nr = std::min(rows, lq - r0);
                const gemm_desc qk{.batch = nh, .m = nr, .n = lk, .k = d, .trans_a = false, .trans_b = true, .lda = d, .ldb = d, .ldc = lk,
                                   .stride_a = lq * d, .stride_b = lk * d, .stride_c = nr * lk, .alpha = p.scale};
                gemm(ctx, qk, p.q + (h * lq + r0) * d, p.k + h * lk * d, scores);
                softmax_forward(ctx, softmax_desc{.rows = nh * nr, .cols = lk}, scores, scores);
                const gemm_desc pv{.batch = nh, .m = nr, .n = dv, .k = lk, .trans_a = false, .trans_b = false, .lda = lk, .ldb = dv,
                                   .ldc = dv, .stride_a = nr * lk, .stride_b = lk * dv, .stride_c = lq * dv};
                gemm(ctx, pv, scores, p.v + h * lk * dv, p.out + (h * lq + r0) * dv);
            }
        }
    }

public:
    template <class T>
    static void softmax_backward(context& ctx, const softmax_desc& d, const T* y, const T* dy, T* dx) {
        if constexpr (native<T>) {
            if (d.rows > 0 && d.cols > 0) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("softmax_bwd");
                k << onednn::detail::data_type_of<T>() << threads << d.rows << d.cols;
                using entry = onednn::detail::planned<dnnl::softmax_backward::primitive_desc, dnnl::softmax_backward>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    const auto hint = softmax_fwd_pd<T>(rt, d);
                    const dnnl::memory::desc md({d.rows, d.cols}, onednn::detail::data_type_of<T>(), dnnl::memory::format_tag::ab);
                    dnnl::softmax_backward::primitive_desc pd(dnnl::softmax_backward::desc(md, md, 1), rt.engine(), hint);
                    return entry{pd, dnnl::softmax_backward(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    e->primitive.execute(rt.stream(), {{DNNL_ARG_DST, onednn::detail::wrap(e->pd.dst_desc(), eng, y)},
                                                       {DNNL_ARG_DIFF_DST, onednn::detail::wrap(e->pd.diff_dst_desc(), eng, dy)},
                                                       {DNNL_ARG_DIFF_SRC, onednn::detail::wrap(e->pd.diff_src_desc(), eng, dx)}});
                    rt.stream().wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::softmax_backward(ref, d, y, dy, dx);
    }

    template <class T>
    static void unary_forward(context& ctx, unary_op op, std::size_t n, const T* x, T* y) {
        if constexpr (native<T>) {
            if (n > 0) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("eltwise_fwd");
                k << onednn::detail::data_type_of<T>() << threads << op << n;
                using entry = onednn::detail::planned<dnnl::eltwise_forward::primitive_desc, dnnl::eltwise_forward>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    auto pd = eltwise_fwd_pd<T>(rt, op, n);
                    return entry{pd, dnnl::eltwise_forward(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    e->primitive.execute(rt.stream(), {{DNNL_ARG_SRC, onednn::detail::wrap(e->pd.src_desc(), eng, x)},
                                                       {DNNL_ARG_DST, onednn::detail::wrap(e->pd.dst_desc(), eng, y)}});
                    rt.stream().wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::unary_forward(ref, op, n, x, y);
    }

    /// dx = dy * f'(x), x being the forward's input.
    template <class T>
    static void unary_backward(context& ctx, unary_op op, std::size_t n, const T* x, const T* dy, T* dx) {
        if constexpr (native<T>) {
            if (n > 0) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("eltwise_bwd");
                k << onednn::detail::data_type_of<T>() << threads << op << n;
                using entry = onednn::detail::planned<dnnl::eltwise_backward::primitive_desc, dnnl::eltwise_backward>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    const auto hint = eltwise_fwd_pd<T>(rt, op, n);
                    const auto [alg, alpha] = eltwise_of(op);
                    const dnnl::memory::desc md({static_cast<dnnl::memory::dim>(n)}, onednn::detail::data_type_of<T>(), dnnl::memory::format_tag::a);
                    dnnl::eltwise_backward::primitive_desc pd(dnnl::eltwise_backward::desc(alg, md, md, alpha, 0.0f), rt.engine(), hint);
                    return entry{pd, dnnl::eltwise_backward(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    e->primitive.execute(rt.stream(), {{DNNL_ARG_SRC, onednn::detail::wrap(e->pd.src_desc(), eng, x)},
                                                       {DNNL_ARG_DIFF_DST, onednn::detail::wrap(e->pd.diff_dst_desc(), eng, dy)},
                                                       {DNNL_ARG_DIFF_SRC, onednn::detail::wrap(e->pd.diff_src_desc(), eng, dx)}});
                    rt.stream().wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::unary_backward(ref, op, n, x, dy, dx);
    }

    /// hidden * gelu_erf(gate) for x (rows, [hidden | gate]) in oneDNN's jit
    /// kernels, which want dense operands: the gate half is reordered into y
    /// and activated in place, the hidden half reordered into scratch, and
    /// the two multiplied into y (oneDNN 2.6 runs eltwise and binary on
    /// strided views with its reference code, slower than our own loop). In
    /// bf16 the activation is rounded to bf16 before the multiply (the
    /// reference rounds once).
    template <class T>
    static void geglu_forward(context& ctx, const geglu_desc& d, const T* x, T* y) {
        if constexpr (native<T>) {
            if (d.rows > 0 && d.cols > 0) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("geglu_fwd");
                k << onednn::detail::data_type_of<T>() << threads << d.rows << d.cols;
                struct entry {
                    geglu_layout layout;
                    dnnl::eltwise_forward gelu;
                    dnnl::binary multiply;
                };
                auto* e = rt.template lookup<entry>(k, [&] {
                    auto layout = geglu_layout::of<T>(rt, d);
                    const dnnl::eltwise_forward::primitive_desc gelu(
                        dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::eltwise_gelu_erf, layout.flat, 0.0f,
                                                    0.0f),
                        rt.engine());
                    const dnnl::binary::primitive_desc multiply(
                        dnnl::binary::desc(dnnl::algorithm::binary_mul, layout.flat, layout.flat, layout.flat), rt.engine());
                    return entry{std::move(layout), dnnl::eltwise_forward(gelu), dnnl::binary(multiply)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    T* hidden = static_cast<T*>(rt.scratch(3, static_cast<std::size_t>(d.rows * d.cols) * sizeof(T)));
                    e->layout.gather(rt, d, x, hidden, y);
                    const auto out = onednn::detail::wrap(e->layout.flat, eng, y);
                    e->gelu.execute(rt.stream(), {{DNNL_ARG_SRC, out}, {DNNL_ARG_DST, out}});
                    e->multiply.execute(rt.stream(), {{DNNL_ARG_SRC_0, out}, {DNNL_ARG_SRC_1, onednn::detail::wrap(e->layout.flat, eng, hidden)},
                                                      {DNNL_ARG_DST, out}});
                    rt.stream().wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::geglu_forward(ref, d, x, y);
    }
    /// d hidden = dy gelu(gate), d gate = gelu'(gate) (dy hidden): the halves
    /// gathered to two dense buffers, oneDNN's GELU backward with
    /// diff_dst = dy hidden, GELU forward, two multiplies (all in place), and
    /// the two gradients scattered back into dx's halves. In bf16, gelu(gate)
    /// and dy hidden are rounded to bf16 before their last product (the
    /// reference rounds once).
    template <class T>
    static void geglu_backward(context& ctx, const geglu_desc& d, const T* x, const T* dy, T* dx) {
        if constexpr (native<T>) {
            if (d.rows > 0 && d.cols > 0) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("geglu_bwd");
                k << onednn::detail::data_type_of<T>() << threads << d.rows << d.cols;
                struct entry {
                    geglu_layout layout;
                    dnnl::reorder scatter;
                    dnnl::eltwise_forward gelu;
                    dnnl::eltwise_backward gelu_grad;
                    dnnl::binary multiply;
                };
                auto* e = rt.template lookup<entry>(k, [&] {
                    auto layout = geglu_layout::of<T>(rt, d);
                    const auto& flat = layout.flat;
                    const dnnl::eltwise_forward::primitive_desc gelu(
                        dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_training, dnnl::algorithm::eltwise_gelu_erf, flat, 0.0f, 0.0f),
                        rt.engine());
                    const dnnl::eltwise_backward::primitive_desc gelu_grad(
                        dnnl::eltwise_backward::desc(dnnl::algorithm::eltwise_gelu_erf, flat, flat, 0.0f, 0.0f), rt.engine(), gelu);
                    const dnnl::binary::primitive_desc multiply(dnnl::binary::desc(dnnl::algorithm::binary_mul, flat, flat, flat), rt.engine());
                    auto scatter = dnnl::reorder(dnnl::reorder::primitive_desc(rt.engine(), layout.dense, rt.engine(), layout.half));
                    return entry{std::move(layout), std::move(scatter), dnnl::eltwise_forward(gelu), dnnl::eltwise_backward(gelu_grad),
                                 dnnl::binary(multiply)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    const auto bytes = static_cast<std::size_t>(d.rows * d.cols) * sizeof(T);
                    T* gate = static_cast<T*>(rt.scratch(3, bytes));
                    T* hidden = static_cast<T*>(rt.scratch(4, bytes));
                    auto& st = rt.stream();
                    const auto flat = [&](const T* p) { return onednn::detail::wrap(e->layout.flat, eng, p); };
                    e->layout.gather(rt, d, x, hidden, gate);
                    // d gate = gelu'(gate) (dy hidden), in place in `hidden`, into dx's second half.
                    e->multiply.execute(st, {{DNNL_ARG_SRC_0, flat(hidden)}, {DNNL_ARG_SRC_1, flat(dy)}, {DNNL_ARG_DST, flat(hidden)}});
                    e->gelu_grad.execute(st, {{DNNL_ARG_SRC, flat(gate)}, {DNNL_ARG_DIFF_DST, flat(hidden)}, {DNNL_ARG_DIFF_SRC, flat(hidden)}});
                    e->scatter.execute(st, {{DNNL_ARG_FROM, onednn::detail::wrap(e->layout.dense, eng, hidden)},
                                            {DNNL_ARG_TO, onednn::detail::wrap(e->layout.half, eng, dx + d.cols)}});
                    // d hidden = dy gelu(gate), in place in `gate`, into the first half.
                    e->gelu.execute(st, {{DNNL_ARG_SRC, flat(gate)}, {DNNL_ARG_DST, flat(gate)}});
                    e->multiply.execute(st, {{DNNL_ARG_SRC_0, flat(gate)}, {DNNL_ARG_SRC_1, flat(dy)}, {DNNL_ARG_DST, flat(gate)}});
                    e->scatter.execute(st, {{DNNL_ARG_FROM, onednn::detail::wrap(e->layout.dense, eng, gate)},
                                            {DNNL_ARG_TO, onednn::detail::wrap(e->layout.half, eng, dx)}});
                    st.wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::geglu_backward(ref, d, x, dy, dx);
    }

    /// oneDNN's binary primitive broadcasts its second operand only: a
    /// broadcasting first operand is swapped to second for commutative ops,
    /// and otherwise runs on the reference code.
    template <class T>
    static void binary_forward(context& ctx, binary_op op, const binary_desc& d, const T* a, const T* b, T* y) {
        if constexpr (native<T>) {
            const bool a_broadcast = cpu::detail::has_broadcast(d.rank, d.shape, d.a_strides);
            const bool b_broadcast = cpu::detail::has_broadcast(d.rank, d.shape, d.b_strides);
            const bool commutative = op == binary_op::add || op == binary_op::mul || op == binary_op::maximum || op == binary_op::minimum;
            const bool swap = a_broadcast && !b_broadcast && commutative;
            if ((!a_broadcast || swap) && cpu::detail::numel_of(d.rank, d.shape) > 0) {
                const T* first = swap ? b : a;
                const T* second = swap ? a : b;
                const auto& s0 = swap ? d.b_strides : d.a_strides;
                const auto& s1 = swap ? d.a_strides : d.b_strides;
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("binary");
                k << onednn::detail::data_type_of<T>() << threads << op << d.rank << d.shape << s0 << s1;
                auto* e = rt.template lookup<binary_entry>(k, [&] {
                    const auto dt = onednn::detail::data_type_of<T>();
                    dnnl::memory::dims dims, st0, st1, dims1;
                    for (int i = 0; i < d.rank; ++i) {
                        const auto u = static_cast<std::size_t>(i);
                        dims.push_back(d.shape[u]);
                        st0.push_back(s0[u]);
                        const bool bc = s1[u] == 0 && d.shape[u] > 1;
                        dims1.push_back(bc ? 1 : d.shape[u]);
                        st1.push_back(s1[u]);
                    }
                    if (dims.empty()) dims = dims1 = st0 = st1 = {1};
                    // A size-1 axis's stride is never used; give it the value a dense layout
                    // would have (computed from the right), so that oneDNN recognises plain
                    // layouts: strides of 1 there read as a permuted format (a (1, C, 1, 1)
                    // operand with strides 1, 1, 1, 1 is "bacd") and get the reference kernel.
                    for (std::size_t i = dims.size(); i-- > 0;) {
                        const bool last = i + 1 == dims.size();
                        if (dims[i] == 1) st0[i] = last ? 1 : st0[i + 1] * dims[i + 1];
                        if (dims1[i] == 1) st1[i] = last ? 1 : st1[i + 1] * dims1[i + 1];
                    }
                    const dnnl::memory::desc md0(dims, dt, st0), md1(dims1, dt, st1), mdd(dims, dt, onednn::detail::dense_strides(dims));
                    const auto algorithm = binary_algorithm(op);
                    dnnl::binary::primitive_desc pd(dnnl::binary::desc(algorithm, md0, md1, mdd), rt.engine());
                    // A first operand in another layout than the output (a channels-last view
                    // into a dense result) with a broadcast second one gets oneDNN's reference
                    // kernel, about a hundred times slower than a jitted one: copy it dense
                    // first (one fast reorder), then combine dense operands.
                    if (std::string_view(pd.impl_info_str()).rfind("ref", 0) == 0 && !(md0 == mdd)) {
                        dnnl::binary::primitive_desc dense(dnnl::binary::desc(algorithm, mdd, md1, mdd), rt.engine());
                        return binary_entry{dense, dnnl::binary(dense), md0, reorder_if_needed(rt.engine(), md0, mdd)};
                    }
                    return binary_entry{pd, dnnl::binary(pd), md0, {}};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    const auto src0 = staged_in(rt, e->src0_in, e->user_src0, e->pd.src_desc(0), first, 0);
                    e->primitive.execute(rt.stream(), {{DNNL_ARG_SRC_0, src0},
                                                       {DNNL_ARG_SRC_1, onednn::detail::wrap(e->pd.src_desc(1), eng, second)},
                                                       {DNNL_ARG_DST, onednn::detail::wrap(e->pd.dst_desc(), eng, y)}});
                    rt.stream().wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::binary_forward(ref, op, d, a, b, y);
    }

    template <class T>
    static void binary_backward(context& ctx, binary_op op, const binary_desc& d, const T* a, const T* b, const T* dy, T* da, T* db) {
        auto ref = ctx.reference();
        cpu_backend::binary_backward(ref, op, d, a, b, dy, da, db);
    }

    template <class T>
    static void axpby(context& ctx, std::size_t n, double alpha, const T* x, double beta, T* y) {
        auto ref = ctx.reference();
        cpu_backend::axpby(ref, n, alpha, x, beta, y);
    }

    // ---- reductions and data movement ------------------------------------------------

    template <class T>
    static void reduce_forward(context& ctx, const reduce_desc& d, const T* x, T* y) {
        if constexpr (native<T>) {
            bool any = false;
            for (int i = 0; i < d.rank; ++i) any = any || (d.reduce[static_cast<std::size_t>(i)] && d.shape[static_cast<std::size_t>(i)] > 1);
            if (any && cpu::detail::numel_of(d.rank, d.shape) > 0) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("reduction");
                k << onednn::detail::data_type_of<T>() << threads << d.rank << d.shape << d.reduce << d.mean;
                using entry = onednn::detail::planned<dnnl::reduction::primitive_desc, dnnl::reduction>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    const auto dt = onednn::detail::data_type_of<T>();
                    dnnl::memory::dims src, dst;
                    for (int i = 0; i < d.rank; ++i) {
                        const auto u = static_cast<std::size_t>(i);
                        src.push_back(d.shape[u]);
                        dst.push_back(d.reduce[u] ? 1 : d.shape[u]);
                    }
                    const dnnl::memory::desc ms(src, dt, onednn::detail::dense_strides(src)), md(dst, dt, onednn::detail::dense_strides(dst));
                    dnnl::reduction::primitive_desc pd(
                        dnnl::reduction::desc(d.mean ? dnnl::algorithm::reduction_mean : dnnl::algorithm::reduction_sum, ms, md, 0.0f, 0.0f),
                        rt.engine());
                    return entry{pd, dnnl::reduction(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    e->primitive.execute(rt.stream(), {{DNNL_ARG_SRC, onednn::detail::wrap(e->pd.src_desc(), eng, x)},
                                                       {DNNL_ARG_DST, onednn::detail::wrap(e->pd.dst_desc(), eng, y)}});
                    rt.stream().wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::reduce_forward(ref, d, x, y);
    }
    template <class T>
    static void reduce_backward(context& ctx, const reduce_desc& d, const T* dy, T* dx) {
        auto ref = ctx.reference();
        cpu_backend::reduce_backward(ref, d, dy, dx);
    }

    /// dst[box] = src[box] (or += when accumulate) as a oneDNN reorder (a sum
    /// post-op accumulates). A destination with repeated addresses (stride 0)
    /// or a source with stride 0 runs on the reference code.
    template <class T>
    static void strided_copy(context& ctx, const strided_copy_desc& d, const T* src, T* dst, bool accumulate) {
        if constexpr (native<T>) {
            const index_t n = cpu::detail::numel_of(d.rank, d.shape);
            if (n > 0 && !cpu::detail::has_broadcast(d.rank, d.shape, d.dst_strides) &&
                !cpu::detail::has_broadcast(d.rank, d.shape, d.src_strides)) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("reorder");
                k << onednn::detail::data_type_of<T>() << threads << d.rank << d.shape << d.src_strides << d.dst_strides << accumulate;
                using entry = onednn::detail::planned<dnnl::reorder::primitive_desc, dnnl::reorder>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    const auto dt = onednn::detail::data_type_of<T>();
                    dnnl::memory::dims dims, ss, ds;
                    for (int i = 0; i < d.rank; ++i) {
                        const auto u = static_cast<std::size_t>(i);
                        dims.push_back(d.shape[u]);
                        ss.push_back(d.shape[u] == 1 ? 1 : d.src_strides[u]);
                        ds.push_back(d.shape[u] == 1 ? 1 : d.dst_strides[u]);
                    }
                    if (dims.empty()) dims = ss = ds = {1};
                    dnnl::primitive_attr attr;
                    if (accumulate) {
                        dnnl::post_ops po;
                        po.append_sum(1.0f);
                        attr.set_post_ops(po);
                    }
                    dnnl::reorder::primitive_desc pd(rt.engine(), dnnl::memory::desc(dims, dt, ss), rt.engine(),
                                                     dnnl::memory::desc(dims, dt, ds), attr);
                    return entry{pd, dnnl::reorder(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    e->primitive.execute(rt.stream(), {{DNNL_ARG_FROM, onednn::detail::wrap(e->pd.src_desc(), eng, src)},
                                                       {DNNL_ARG_TO, onednn::detail::wrap(e->pd.dst_desc(), eng, dst)}});
                    rt.stream().wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::strided_copy(ref, d, src, dst, accumulate);
    }

    template <class T>
    static void upsample_nearest_forward(context& ctx, const upsample_desc& d, const T* x, T* y) {
        if constexpr (native<T>) {
            if (d.n * d.c * d.h * d.w > 0) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("resample_fwd");
                k << onednn::detail::data_type_of<T>() << threads << d;
                using entry = onednn::detail::planned<dnnl::resampling_forward::primitive_desc, dnnl::resampling_forward>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    auto pd = resampling_fwd_pd<T>(rt, d);
                    return entry{pd, dnnl::resampling_forward(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    e->primitive.execute(rt.stream(), {{DNNL_ARG_SRC, onednn::detail::wrap(e->pd.src_desc(), eng, x)},
                                                       {DNNL_ARG_DST, onednn::detail::wrap(e->pd.dst_desc(), eng, y)}});
                    rt.stream().wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::upsample_nearest_forward(ref, d, x, y);
    }
    template <class T>
    static void upsample_nearest_backward(context& ctx, const upsample_desc& d, const T* dy, T* dx) {
        if constexpr (native<T>) {
            if (d.n * d.c * d.h * d.w > 0) {
                auto& rt = ctx.runtime();
                const int threads = ctx.thread_count();
                onednn::detail::thread_scope scope(threads);
                onednn::detail::key k("resample_bwd");
                k << onednn::detail::data_type_of<T>() << threads << d;
                using entry = onednn::detail::planned<dnnl::resampling_backward::primitive_desc, dnnl::resampling_backward>;
                auto* e = rt.template lookup<entry>(k, [&] {
                    const auto hint = resampling_fwd_pd<T>(rt, d);
                    dnnl::resampling_backward::primitive_desc pd(
                        dnnl::resampling_backward::desc(dnnl::algorithm::resampling_nearest, hint.src_desc(), hint.dst_desc()), rt.engine(), hint);
                    return entry{pd, dnnl::resampling_backward(pd)};
                });
                if (e) {
                    const auto& eng = rt.engine();
                    e->primitive.execute(rt.stream(), {{DNNL_ARG_DIFF_DST, onednn::detail::wrap(e->pd.diff_dst_desc(), eng, dy)},
                                                       {DNNL_ARG_DIFF_SRC, onednn::detail::wrap(e->pd.diff_src_desc(), eng, dx)}});
                    rt.stream().wait();
                    return;
                }
            }
        }
        auto ref = ctx.reference();
        cpu_backend::upsample_nearest_backward(ref, d, dy, dx);
    }

    // ---- random numbers (the library's Philox streams, via the reference code) ----------

    template <class T>
    static void random_uniform(context& ctx, std::uint64_t seed, std::uint64_t offset, std::size_t n, T* y) {
        auto ref = ctx.reference();
        cpu_backend::random_uniform(ref, seed, offset, n, y);
    }
    template <class T>
    static void random_normal(context& ctx, std::uint64_t seed, std::uint64_t offset, std::size_t n, T* y) {
        auto ref = ctx.reference();
        cpu_backend::random_normal(ref, seed, offset, n, y);
    }

private:
    using dims = dnnl::memory::dims;
    using tag = dnnl::memory::format_tag;

    // ---- matmul -----------------------------------------------------------------------

    // (batch, m, k) x (batch, k, n) -> (batch, m, n) with the descriptor's strides; a
    // batch stride of 0 becomes a broadcast batch of 1.
    template <class T>
    static std::array<dnnl::memory::desc, 3> matmul_descs(const gemm_desc& d) {
        const auto dt = onednn::detail::data_type_of<T>();
        const index_t ba = d.stride_a == 0 ? 1 : d.batch, bb = d.stride_b == 0 ? 1 : d.batch;
        const index_t a_extent = (d.trans_a ? d.k : d.m) * d.lda, b_extent = (d.trans_b ? d.n : d.k) * d.ldb;
        const index_t sa = ba == 1 ? a_extent : d.stride_a, sb = bb == 1 ? b_extent : d.stride_b;
        const index_t sc = d.batch == 1 ? d.m * d.ldc : d.stride_c;
        return {dnnl::memory::desc({ba, d.m, d.k}, dt, d.trans_a ? dims{sa, 1, d.lda} : dims{sa, d.lda, 1}),
                dnnl::memory::desc({bb, d.k, d.n}, dt, d.trans_b ? dims{sb, 1, d.ldb} : dims{sb, d.ldb, 1}),
                dnnl::memory::desc({d.batch, d.m, d.n}, dt, dims{sc, d.ldc, 1})};
    }

    // ---- convolution ----------------------------------------------------------------------

    static onednn::detail::key conv_key(const char* op, const conv2d_desc& d, dnnl::memory::data_type dt, int threads) {
        onednn::detail::key k(op);
        k << dt << threads << d;
        return k;
    }

    struct conv_geometry {
        dims src, wei, bias, dst, strides, dilation, pad_l, pad_r;
        dnnl::memory::desc user_src, user_wei, user_dst;
    };

    template <class T>
    static conv_geometry geometry(const conv2d_desc& d) {
        const auto dt = onednn::detail::data_type_of<T>();
        conv_geometry g;
        g.src = {d.n, d.c_in, d.h, d.w};
        g.dst = {d.n, d.c_out, d.out_h(), d.out_w()};
        g.bias = {d.c_out};
        if (d.groups > 1) g.wei = {d.groups, d.c_out / d.groups, d.c_in / d.groups, d.kh, d.kw};
        else g.wei = {d.c_out, d.c_in, d.kh, d.kw};
        g.strides = {d.stride_h, d.stride_w};
        g.dilation = {d.dilation_h - 1, d.dilation_w - 1};
        g.pad_l = {d.pad_h, d.pad_w};
        // oneDNN wants the right/bottom padding that reproduces the output size.
        g.pad_r = {(d.out_h() - 1) * d.stride_h + (d.kh - 1) * d.dilation_h + 1 - d.h - d.pad_h,
                   (d.out_w() - 1) * d.stride_w + (d.kw - 1) * d.dilation_w + 1 - d.w - d.pad_w};
        g.user_src = dnnl::memory::desc(g.src, dt, tag::nchw);
        g.user_dst = dnnl::memory::desc(g.dst, dt, tag::nchw);
        g.user_wei = dnnl::memory::desc(g.wei, dt, d.groups > 1 ? tag::goihw : tag::oihw);
        return g;
    }

    static dnnl::memory::desc any(const dims& dd, dnnl::memory::data_type dt) { return dnnl::memory::desc(dd, dt, tag::any); }

    // A reorder from `from` to `to`, or an empty primitive when the layouts match.
    static dnnl::reorder reorder_if_needed(const dnnl::engine& eng, const dnnl::memory::desc& from, const dnnl::memory::desc& to) {
        if (from == to) return {};
        return dnnl::reorder(dnnl::reorder::primitive_desc(eng, from, eng, to));
    }

    // The convolution's weights in its layout from the weight cache, reordered
    // into it on a miss (or into scratch when they do not fit).
    template <class T, class Entry>
    static dnnl::memory cached_weights(context& ctx, onednn::detail::runtime& rt, const Entry& e, const std::string& plan, const T* w,
                                       std::size_t n) {
        auto& cache = rt.weights();
        const auto print = onednn::detail::weight_cache::fingerprint_of(w, n, sizeof(T));
        const auto& wanted = e.pd.weights_desc();
        if (void* p = cache.find(w, plan, print)) return dnnl::memory(wanted, rt.engine(), p);
        void* p = cache.insert(w, plan, print, wanted.get_size(), ctx.weight_cache_bytes);
        if (!p) return staged_in(rt, e.wei_in, e.user_wei, wanted, w, 1);
        dnnl::memory out(wanted, rt.engine(), p);
        auto in = onednn::detail::wrap(e.user_wei, rt.engine(), w);
        e.wei_in.execute(rt.stream(), in, out);
        return out;
    }

    // The caller's data in the layout a primitive wants: a view of it when no
    // reorder is needed, else a reordered copy in scratch slot `slot`.
    static dnnl::memory staged_in(onednn::detail::runtime& rt, const dnnl::reorder& r, const dnnl::memory::desc& user,
                                  const dnnl::memory::desc& wanted, const void* data, std::size_t slot) {
        auto in = onednn::detail::wrap(user, rt.engine(), data);
        if (!r) return in;
        dnnl::memory out(wanted, rt.engine(), rt.scratch(slot, wanted.get_size()));
        r.execute(rt.stream(), in, out);
        return out;
    }

    struct binary_entry {
        dnnl::binary::primitive_desc pd;
        dnnl::binary primitive;
        dnnl::memory::desc user_src0;
        dnnl::reorder src0_in;  ///< to a dense copy when the user's layout would get a reference kernel
    };

    struct conv_fwd_entry {
        dnnl::convolution_forward::primitive_desc pd;
        dnnl::convolution_forward primitive;
        dnnl::memory::desc user_src, user_wei, user_dst;
        dnnl::reorder src_in, wei_in, dst_out;
    };
    struct conv_bwd_data_entry {
        dnnl::convolution_backward_data::primitive_desc pd;
        dnnl::convolution_backward_data primitive;
        dnnl::memory::desc user_src, user_wei, user_dst;
        dnnl::reorder wei_in, diff_dst_in, diff_src_out;
    };
    struct conv_bwd_weights_entry {
        dnnl::convolution_backward_weights::primitive_desc pd;
        dnnl::convolution_backward_weights primitive;
        dnnl::memory::desc user_src, user_wei, user_dst;
        dnnl::reorder src_in, diff_dst_in, diff_wei_out;
    };

    template <class T>
    static dnnl::convolution_forward::primitive_desc conv_fwd_pd(onednn::detail::runtime& rt, const conv2d_desc& d, bool has_bias,
                                                                 dnnl::prop_kind prop) {
        const auto dt = onednn::detail::data_type_of<T>();
        const auto g = geometry<T>(d);
        const auto desc = has_bias ? dnnl::convolution_forward::desc(prop, dnnl::algorithm::convolution_direct, any(g.src, dt),
                                                                     any(g.wei, dt), dnnl::memory::desc(g.bias, dt, tag::a), any(g.dst, dt),
                                                                     g.strides, g.dilation, g.pad_l, g.pad_r)
                                   : dnnl::convolution_forward::desc(prop, dnnl::algorithm::convolution_direct, any(g.src, dt),
                                                                     any(g.wei, dt), any(g.dst, dt), g.strides, g.dilation, g.pad_l, g.pad_r);
        return dnnl::convolution_forward::primitive_desc(desc, rt.engine());
    }

    template <class T>
    static conv_fwd_entry make_conv_fwd(onednn::detail::runtime& rt, const conv2d_desc& d, bool has_bias) {
        const auto g = geometry<T>(d);
        auto pd = conv_fwd_pd<T>(rt, d, has_bias, dnnl::prop_kind::forward_inference);
        const auto& eng = rt.engine();
        return {pd,
                dnnl::convolution_forward(pd),
                g.user_src,
                g.user_wei,
                g.user_dst,
                reorder_if_needed(eng, g.user_src, pd.src_desc()),
                reorder_if_needed(eng, g.user_wei, pd.weights_desc()),
                reorder_if_needed(eng, pd.dst_desc(), g.user_dst)};
    }

    template <class T>
    static conv_bwd_data_entry make_conv_bwd_data(onednn::detail::runtime& rt, const conv2d_desc& d) {
        const auto dt = onednn::detail::data_type_of<T>();
        const auto g = geometry<T>(d);
        const auto hint = conv_fwd_pd<T>(rt, d, false, dnnl::prop_kind::forward_training);
        dnnl::convolution_backward_data::primitive_desc pd(
            dnnl::convolution_backward_data::desc(dnnl::algorithm::convolution_direct, any(g.src, dt), any(g.wei, dt), any(g.dst, dt),
                                                  g.strides, g.dilation, g.pad_l, g.pad_r),
            rt.engine(), hint);
        const auto& eng = rt.engine();
        return {pd,
                dnnl::convolution_backward_data(pd),
                g.user_src,
                g.user_wei,
                g.user_dst,
                reorder_if_needed(eng, g.user_wei, pd.weights_desc()),
                reorder_if_needed(eng, g.user_dst, pd.diff_dst_desc()),
                reorder_if_needed(eng, pd.diff_src_desc(), g.user_src)};
    }

    template <class T>
    static conv_bwd_weights_entry make_conv_bwd_weights(onednn::detail::runtime& rt, const conv2d_desc& d, bool has_bias) {
        const auto dt = onednn::detail::data_type_of<T>();
        const auto g = geometry<T>(d);
        const auto hint = conv_fwd_pd<T>(rt, d, has_bias, dnnl::prop_kind::forward_training);
        const auto desc = has_bias ? dnnl::convolution_backward_weights::desc(dnnl::algorithm::convolution_direct, any(g.src, dt),
                                                                              any(g.wei, dt), dnnl::memory::desc(g.bias, dt, tag::a),
                                                                              any(g.dst, dt), g.strides, g.dilation, g.pad_l, g.pad_r)
                                   : dnnl::convolution_backward_weights::desc(dnnl::algorithm::convolution_direct, any(g.src, dt),
                                                                              any(g.wei, dt), any(g.dst, dt), g.strides, g.dilation,
                                                                              g.pad_l, g.pad_r);
        dnnl::convolution_backward_weights::primitive_desc pd(desc, rt.engine(), hint);
        const auto& eng = rt.engine();
        return {pd,
                dnnl::convolution_backward_weights(pd),
                g.user_src,
                g.user_wei,
                g.user_dst,
                reorder_if_needed(eng, g.user_src, pd.src_desc()),
                reorder_if_needed(eng, g.user_dst, pd.diff_dst_desc()),
                reorder_if_needed(eng, pd.diff_weights_desc(), g.user_wei)};
    }

    // ---- other primitive descriptors ------------------------------------------------------

    // n values of T as the f32 operand oneDNN 2.6 wants for a norm's scale or
    // shift: the values themselves in f32, else converted into scratch slot `slot`.
    template <class T>
    static const float* f32_operand(onednn::detail::runtime& rt, const T* p, index_t n, std::size_t slot) {
        if constexpr (std::is_same_v<T, float>) {
            return p;
        } else {
            auto* f = static_cast<float*>(rt.scratch(slot, static_cast<std::size_t>(n) * sizeof(float)));
            for (index_t i = 0; i < n; ++i) f[i] = static_cast<float>(p[i]);
            return f;
        }
    }

    // GEGLU's operands: each half of a (rows, 2 cols) input as a strided
    // (rows, cols) view, its dense copy, the same values as one flat vector
    // (the jit eltwise and binary kernels take it, not (rows, cols)), and the
    // reorder that gathers a half into a dense buffer.
    struct geglu_layout {
        dnnl::memory::desc half, dense, flat;
        dnnl::reorder gather_half;

        template <class T>
        static geglu_layout of(onednn::detail::runtime& rt, const geglu_desc& d) {
            const auto dt = onednn::detail::data_type_of<T>();
            const dnnl::memory::desc half({d.rows, d.cols}, dt, dnnl::memory::dims{2 * d.cols, 1});
            const dnnl::memory::desc dense({d.rows, d.cols}, dt, tag::ab);
            return {half, dense, dnnl::memory::desc({d.rows * d.cols}, dt, tag::a),
                    dnnl::reorder(dnnl::reorder::primitive_desc(rt.engine(), half, rt.engine(), dense))};
        }
        // x's first half (hidden) and second half (gate) into dense buffers.
        template <class T>
        void gather(onednn::detail::runtime& rt, const geglu_desc& d, const T* x, T* hidden, T* gate) const {
            const auto& eng = rt.engine();
            gather_half.execute(rt.stream(), {{DNNL_ARG_FROM, onednn::detail::wrap(half, eng, x + d.cols)},
                                              {DNNL_ARG_TO, onednn::detail::wrap(dense, eng, gate)}});
            gather_half.execute(rt.stream(), {{DNNL_ARG_FROM, onednn::detail::wrap(half, eng, x)},
                                              {DNNL_ARG_TO, onednn::detail::wrap(dense, eng, hidden)}});
        }
    };

    static dnnl::normalization_flags norm_flags(bool scale, bool shift) {
        auto f = dnnl::normalization_flags::none;
        if (scale) f = f | dnnl::normalization_flags::use_scale;
        if (shift) f = f | dnnl::normalization_flags::use_shift;
        return f;
    }

    template <class T>
    static dnnl::layer_normalization_forward::primitive_desc lnorm_fwd_pd(onednn::detail::runtime& rt, const layer_norm_desc& d,
                                                                          dnnl::normalization_flags flags) {
        const dnnl::memory::desc md({d.rows, d.cols}, onednn::detail::data_type_of<T>(), tag::ab);
        return dnnl::layer_normalization_forward::primitive_desc(
            dnnl::layer_normalization_forward::desc(dnnl::prop_kind::forward_training, md, static_cast<float>(d.eps), flags), rt.engine());
    }

    template <class T>
    static dnnl::softmax_forward::primitive_desc softmax_fwd_pd(onednn::detail::runtime& rt, const softmax_desc& d) {
        const dnnl::memory::desc md({d.rows, d.cols}, onednn::detail::data_type_of<T>(), tag::ab);
        return dnnl::softmax_forward::primitive_desc(dnnl::softmax_forward::desc(dnnl::prop_kind::forward_training, md, 1), rt.engine());
    }

    static std::pair<dnnl::algorithm, float> eltwise_of(unary_op op) {
        using a = dnnl::algorithm;
        switch (op) {
            case unary_op::relu: return {a::eltwise_relu, 0.0f};
            case unary_op::silu: return {a::eltwise_swish, 1.0f};
            case unary_op::gelu_erf: return {a::eltwise_gelu_erf, 0.0f};
            case unary_op::gelu_tanh: return {a::eltwise_gelu_tanh, 0.0f};
            case unary_op::quick_gelu: return {a::eltwise_swish, 1.702f};
            case unary_op::sigmoid: return {a::eltwise_logistic, 0.0f};
            case unary_op::tanh: return {a::eltwise_tanh, 0.0f};
            case unary_op::exp: return {a::eltwise_exp, 0.0f};
            case unary_op::square: return {a::eltwise_square, 0.0f};
            case unary_op::sqrt: return {a::eltwise_sqrt, 0.0f};
        }
        throw unsupported_error("onednn", "unknown unary op");
    }

    template <class T>
    static dnnl::eltwise_forward::primitive_desc eltwise_fwd_pd(onednn::detail::runtime& rt, unary_op op, std::size_t n) {
        const auto [alg, alpha] = eltwise_of(op);
        const dnnl::memory::desc md({static_cast<dnnl::memory::dim>(n)}, onednn::detail::data_type_of<T>(), tag::a);
        return dnnl::eltwise_forward::primitive_desc(dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_training, alg, md, alpha, 0.0f),
                                                     rt.engine());
    }

    static dnnl::algorithm binary_algorithm(binary_op op) {
        switch (op) {
            case binary_op::add: return dnnl::algorithm::binary_add;
            case binary_op::sub: return dnnl::algorithm::binary_sub;
            case binary_op::mul: return dnnl::algorithm::binary_mul;
            case binary_op::div: return dnnl::algorithm::binary_div;
            case binary_op::maximum: return dnnl::algorithm::binary_max;
            case binary_op::minimum: return dnnl::algorithm::binary_min;
        }
        throw unsupported_error("onednn", "unknown binary op");
    }

    template <class T>
    static dnnl::resampling_forward::primitive_desc resampling_fwd_pd(onednn::detail::runtime& rt, const upsample_desc& d) {
        const auto dt = onednn::detail::data_type_of<T>();
        const dnnl::memory::desc src({d.n, d.c, d.h, d.w}, dt, tag::nchw), dst({d.n, d.c, d.h * d.factor, d.w * d.factor}, dt, tag::nchw);
        return dnnl::resampling_forward::primitive_desc(
            dnnl::resampling_forward::desc(dnnl::prop_kind::forward_training, dnnl::algorithm::resampling_nearest, src, dst), rt.engine());
    }
};

template <>
inline constexpr bool enable_backend<onednn_backend> = true;

static_assert(backend<onednn_backend>, "onednn_backend must model dynamicid::backend");
static_assert(supports_element<onednn_backend, bfloat16>, "onednn_backend computes in bf16");
// f64 (for gradient checks) and f16 run entirely on the reference backend's code.
static_assert(supports_element<onednn_backend, double> && supports_element<onednn_backend, half>);

}  // namespace dynamicid
