// dynamicid: the CUDA backend (header-only; compile the including file with nvcc).
//
// GEMM runs on cuBLAS and convolutions on cuDNN; every other primitive is a
// kernel of this backend. f32, f16 and bf16 are computed natively; f16/bf16
// multiply on tensor cores and accumulate in f32 (f32 GEMM and convolution stay
// in full f32 unless the context allows TF32). There is no f64: the device's
// f64 log/sin/cos are not correctly rounded, so f64 Philox normals could not
// match the other backends bit for bit, and most GPUs run f64 slowly. Attention is
// fused (has_fused_attention): a flash-attention style tensor-core kernel for
// f16/bf16 with head dimension 40, 64, 80 or 160, a warp-per-row kernel for
// the rest. SAA's identity-branch gate (has_saa_gate) is computed on the
// device: min-max, threshold and layout boost without a host round trip.
// Group normalisation of few, long segments splits each over several blocks.
// Random numbers are the library's Philox streams, bit for bit the CPU
// backend's.
//
// All work of a context is queued on its stream; nothing waits for the device
// except copy_to_host (whose caller then synchronises) and synchronize().
// Device memory comes from the context's caching allocator and goes back to it
// when a buffer dies; cached blocks are released with the last context or
// buffer using them. Errors of the CUDA runtime, cuBLAS and cuDNN are thrown
// as dynamicid::cuda_error ("[cuda] ...").
//
//     #include <dynamicid/backends/cuda.cuh>      // in a .cu file
//     dynamicid::cuda_backend::context ctx;      // its own stream; {.allow_tf32 = true} to trade f32 accuracy for speed
//     auto x = dynamicid::ops::randn<dynamicid::cuda_backend, dynamicid::half>(ctx, {2, 4, 64, 64}, 42);
//     std::vector<dynamicid::half> host = x.to_host(ctx);
#pragma once

#if !defined(__CUDACC__)
#error "dynamicid/backends/cuda.cuh must be compiled by a CUDA compiler (nvcc): include it from a .cu file"
#endif

#include <dynamicid/backends/cuda/detail/attention.cuh>
#include <dynamicid/backends/cuda/detail/blas.cuh>
#include <dynamicid/backends/cuda/detail/common.cuh>
#include <dynamicid/backends/cuda/detail/context.cuh>
#include <dynamicid/backends/cuda/detail/memory.cuh>
#include <dynamicid/backends/cuda/detail/norm.cuh>
#include <dynamicid/backends/cuda/detail/pointwise.cuh>
#include <dynamicid/backends/cuda/detail/saa.cuh>
#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace dynamicid {

/// The CUDA backend. Stateless; all state lives in the context.
struct cuda_backend {
    /// Per-call state: a stream, lazily created cuBLAS/cuDNN handles, the
    /// caching allocator and the convolution plans. Copies share all of it (and
    /// so the stream). The device is the one current when the context is first
    /// used. One host thread at a time per context.
    struct context {
        /// Allow TF32 tensor cores for f32 GEMM and convolution (about 1e-3 relative error).
        bool allow_tf32 = false;
        /// Stream to queue work on; null makes the context create its own.
        cudaStream_t stream = nullptr;
        /// Internal; created on first use.
        std::shared_ptr<cuda::detail::context_state> state_ = {};

        cuda::detail::context_state& state() {
            if (!state_) state_ = std::make_shared<cuda::detail::context_state>(stream);
            return *state_;
        }
        cudaStream_t queue() { return state().stream(); }
    };

    /// Records the device work of a call that repeats with the same shapes
    /// (one UNet evaluation of a denoising loop) into a CUDA graph once and
    /// replays it, so that the host pays one launch per call instead of one
    /// per kernel and library call (has_step_graph).
    ///
    ///     dynamicid::cuda_backend::step_graph graph;
    ///     for (float t : timesteps) {
    ///         const auto features = unet.time_features(ctx, std::vector<float>{t, t});
    ///         auto eps = graph.run(ctx, 0, [&](const auto& x, const auto& f) { return unet.forward_features(ctx, x, f, text); },
    ///                              latents, features);
    ///         latents = scheduler.step(ctx, eps, t, latents);
    ///     }
    ///
    /// run(ctx, variant, fn, inputs...) returns fn(inputs...). The first
    /// `eager_calls` calls run fn normally (the context builds its plans,
    /// library handles and cached blocks). The next call copies the inputs
    /// into buffers of the graph, records fn's work on them into a graph, with
    /// memory from an allocator of the graph's own that nothing else draws
    /// from, and launches it. Later calls with the same input shapes and the
    /// same `variant` copy the new inputs into those buffers and launch the
    /// graph again: fn's host code does not run. The result is a copy of
    /// the graph's output, so it stays valid after later calls.
    ///
    /// So everything that changes from call to call must come in as an input
    /// tensor; whatever else fn reads (weights, tensors it captured) must stay
    /// alive and in place while the graph is used, and host values fn uses
    /// (including what it uploads) are those of the recording. When fn's host
    /// logic depends on something else, give each case its own `variant`: a
    /// new variant or new input shapes wait for the device and record again.
    /// Work that must reach the host (a copy to the host, synchronize) cannot
    /// be recorded: when fn asks for it, or the runtime refuses the capture,
    /// fn runs normally for this and all later calls (stats().fallback says
    /// why). An exception of fn ends the recording and propagates; the
    /// context stays usable. Not thread-safe; one per loop, on one context.
    class step_graph {
    public:
        explicit step_graph(int eager_calls = 1) : eager_calls_(std::max(0, eager_calls)) {}
        step_graph(const step_graph&) = delete;
        step_graph& operator=(const step_graph&) = delete;
        ~step_graph() { reset(); }

        struct statistics {
            std::size_t eager = 0;     ///< calls run without a graph
            std::size_t recorded = 0;  ///< graphs recorded (first graph call, new shapes or variant)
            std::size_t replayed = 0;  ///< calls that launched a recorded graph again
            std::string fallback;      ///< why graphs were given up, if they were
        };
        const statistics& stats() const noexcept { return stats_; }
        /// Device bytes the recorded graph holds (its own allocator's blocks).
        std::size_t held_bytes() const { return pool_ ? pool_->allocated_bytes() : 0; }

        template <class F, class... Ts>
        auto run(context& ctx, std::uint64_t variant, F&& fn, const tensor<cuda_backend, Ts>&... inputs)
            -> std::invoke_result_t<F&, const tensor<cuda_backend, Ts>&...> {
            using result_t = std::invoke_result_t<F&, const tensor<cuda_backend, Ts>&...>;
            static_assert(is_cuda_tensor<result_t>::value, "step_graph::run: fn must return a tensor of the CUDA backend");
            auto& state = ctx.state();
            if (!stats_.fallback.empty() || calls_++ < eager_calls_ || state.capturing()) {
                ++stats_.eager;
                return fn(inputs...);
            }
            std::vector<index_t> signature{static_cast<index_t>(sizeof...(Ts))};
            (append_signature(signature, inputs), ...);
            if (exec_ && (signature != signature_ || variant != variant_)) {
                cuda::detail::check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (step_graph)");
                reset();
            }
            if (exec_) {
                std::size_t i = 0;
                (copy_into(ctx, inputs, i++), ...);
                cuda::detail::check_cuda(cudaGraphLaunch(exec_, stream_), "cudaGraphLaunch");
                ++stats_.replayed;
                return copy_out<result_t>(ctx);
            }
            return record<result_t>(ctx, variant, std::move(signature), fn, inputs...);
        }

    private:
        template <class X>
        struct is_cuda_tensor : std::false_type {};
        template <class U>
        struct is_cuda_tensor<tensor<cuda_backend, U>> : std::true_type {};

        template <class U>
        static void append_signature(std::vector<index_t>& sig, const tensor<cuda_backend, U>& t) {
            sig.push_back(static_cast<index_t>(sizeof(U)) * 16 + (std::is_same_v<U, bfloat16> ? 1 : 0));
            sig.push_back(t.rank());
            for (index_t d = 0; d < t.rank(); ++d) sig.push_back(t.dim(d));
        }

        template <class U>
        void copy_into(context& ctx, const tensor<cuda_backend, U>& t, std::size_t i) {
            const auto& held = *std::static_pointer_cast<const tensor<cuda_backend, U>>(inputs_[i]);
            copy<U>(ctx, t.data(), held.data(), static_cast<std::size_t>(t.numel()));
        }

        template <class R>
        R copy_out(context& ctx) {
            return fresh_copy(ctx, *std::static_pointer_cast<const R>(output_));
        }

        template <class R, class F, class... Ts>
        R record(context& ctx, std::uint64_t variant, std::vector<index_t> signature, F& fn, const tensor<cuda_backend, Ts>&... inputs) {
            auto& state = ctx.state();
            stream_ = state.stream();
            pool_ = std::make_shared<cuda::detail::device_pool>();
            uploads_ = std::make_unique<cuda::detail::upload_stage>();
            state.begin_capture(pool_, uploads_.get());
            std::optional<R> result;
            bool capturing = false;
            try {
                // The graph's own copies of the inputs (from its allocator), filled before the recording.
                const auto held = std::make_tuple(fresh_copy(ctx, inputs)...);
                std::apply([&](const auto&... h) { (inputs_.push_back(std::make_shared<const std::decay_t<decltype(h)>>(h)), ...); }, held);
                cuda::detail::check_cuda(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
                capturing = true;
                result.emplace(std::apply(fn, held));
            } catch (const cuda_capture_refused& e) {
                abandon(state, capturing);
                stats_.fallback = e.what();
                ++stats_.eager;
                return fn(inputs...);
            } catch (...) {
                abandon(state, capturing);
                throw;
            }
            state.end_capture();
            cudaGraph_t graph = nullptr;
            const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
            if (ended != cudaSuccess || !graph) {
                (void)cudaGetLastError();
                if (graph) (void)cudaGraphDestroy(graph);
                result.reset();
                reset();
                stats_.fallback = std::string("the runtime refused the capture: ") + cudaGetErrorName(ended) + " (" + cudaGetErrorString(ended) + ")";
                ++stats_.eager;
                return fn(inputs...);
            }
            const std::unique_ptr<CUgraph_st, cudaError_t (*)(cudaGraph_t)> owned(graph, cudaGraphDestroy);
            output_ = std::make_shared<const R>(std::move(*result));
            try {
                cuda::detail::check_cuda(cudaGraphInstantiate(&exec_, graph, 0), "cudaGraphInstantiate");
                cuda::detail::check_cuda(cudaGraphLaunch(exec_, stream_), "cudaGraphLaunch");
            } catch (...) {
                reset();
                throw;
            }
            signature_ = std::move(signature);
            variant_ = variant;
            ++stats_.recorded;
            return copy_out<R>(ctx);
        }

        /// A new tensor (from the allocator in use) holding t's values.
        template <class U>
        static tensor<cuda_backend, U> fresh_copy(context& ctx, const tensor<cuda_backend, U>& t) {
            auto out = tensor<cuda_backend, U>::empty(ctx, t.shape());
            copy<U>(ctx, t.data(), out.data(), static_cast<std::size_t>(t.numel()));
            return out;
        }

        /// Ends a recording that failed; the context stays usable.
        void abandon(cuda::detail::context_state& state, bool capturing) noexcept {
            state.end_capture();
            if (capturing) {
                cudaGraph_t graph = nullptr;
                (void)cudaStreamEndCapture(stream_, &graph);
                if (graph) (void)cudaGraphDestroy(graph);
            }
            (void)cudaGetLastError();
            reset();
        }

        /// Drops the recorded graph and everything it holds (the caller made
        /// sure no launch of it is still running, or none was made).
        void reset() noexcept {
            if (exec_) {
                (void)cudaStreamSynchronize(stream_);
                (void)cudaGraphExecDestroy(exec_);
                exec_ = nullptr;
            }
            output_.reset();
            inputs_.clear();
            pool_.reset();
            uploads_.reset();
            signature_.clear();
        }

        int eager_calls_;
        int calls_ = 0;
        cudaStream_t stream_ = nullptr;
        cudaGraphExec_t exec_ = nullptr;
        std::shared_ptr<cuda::detail::device_pool> pool_;
        std::unique_ptr<cuda::detail::upload_stage> uploads_;
        std::vector<std::shared_ptr<const void>> inputs_;  // tensor<cuda_backend, T> each
        std::shared_ptr<const void> output_;               // the result type's tensor
        std::vector<index_t> signature_;
        std::uint64_t variant_ = 0;
        statistics stats_;
    };

    template <class T> using pointer = T*;
    template <class T> using const_pointer = const T*;
    template <class T> using buffer = cuda::detail::device_buffer<T>;

    /// Completion marker of the work queued so far (has_async_events).
    struct event {
        std::shared_ptr<CUevent_st> handle;
    };

    static constexpr const char* name() { return "cuda"; }

    /// Throws when the context is being captured into a step_graph: work that
    /// returns data to the host cannot be part of a graph.
    static void refuse_while_capturing(const context& ctx, const char* what) {
        if (ctx.state_ && ctx.state_->capturing())
            throw cuda_capture_refused("cuda", std::string(what) + " inside step_graph::run: a graph holds device work only");
    }

    // ---- memory -------------------------------------------------------------

    template <class T>
        requires(!std::is_same_v<T, double>)
    static buffer<T> allocate(context& ctx, std::size_t n) { return buffer<T>(ctx.state().pool(), n); }

    template <class T>
    static void copy_to_host(context& ctx, const T* src, T* host, std::size_t n) {
        if (!n) return;
        refuse_while_capturing(ctx, "copying to the host");
        cuda::detail::check_cuda(cudaMemcpyAsync(host, src, n * sizeof(T), cudaMemcpyDeviceToHost, ctx.queue()), "cudaMemcpyAsync (to host)");
    }
    /// Returns once `host` may be reused (the runtime stages pageable memory;
    /// inside a step_graph capture the bytes are staged in pinned memory).
    template <class T>
    static void copy_from_host(context& ctx, const T* host, T* dst, std::size_t n) {
        if (!n) return;
        auto& state = ctx.state();
        const void* src = state.capturing() ? state.uploads().stage(host, n * sizeof(T)) : static_cast<const void*>(host);
        cuda::detail::check_cuda(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, state.stream()), "cudaMemcpyAsync (from host)");
    }
    template <class T>
    static void copy(context& ctx, const T* src, T* dst, std::size_t n) {
        if (n && src != dst)
            cuda::detail::check_cuda(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToDevice, ctx.queue()), "cudaMemcpyAsync (device)");
    }
    template <class T>
    static void fill(context& ctx, T* dst, std::size_t n, T value) {
        if (!n) return;
        const auto count = static_cast<index_t>(n);
        cuda::detail::fill_kernel<T><<<cuda::detail::grid_for(count), cuda::detail::block_threads, 0, ctx.queue()>>>(dst, count, value);
        cuda::detail::check_launch("fill_kernel");
    }

    template <class From, class To>
    static void convert(context& ctx, const From* src, To* dst, std::size_t n) {
        if (!n) return;
        const auto count = static_cast<index_t>(n);
        cuda::detail::convert_kernel<From, To><<<cuda::detail::grid_for(count), cuda::detail::block_threads, 0, ctx.queue()>>>(src, dst, count);
        cuda::detail::check_launch("convert_kernel");
    }

    /// Waits for everything queued on the context and reports asynchronous errors.
    static void synchronize(context& ctx) {
        refuse_while_capturing(ctx, "waiting for the device");
        if (ctx.state_) cuda::detail::check_cuda(cudaStreamSynchronize(ctx.state_->stream()), "cudaStreamSynchronize");
    }

    static event record_event(context& ctx) {
        cudaEvent_t e = nullptr;
        cuda::detail::check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
        event out{std::shared_ptr<CUevent_st>(e, [](cudaEvent_t p) { (void)cudaEventDestroy(p); })};
        cuda::detail::check_cuda(cudaEventRecord(e, ctx.queue()), "cudaEventRecord");
        return out;
    }
    /// Later work on ctx waits for `e` (on the device; the host does not block).
    static void wait_event(context& ctx, const event& e) {
        if (e.handle) cuda::detail::check_cuda(cudaStreamWaitEvent(ctx.queue(), e.handle.get(), 0), "cudaStreamWaitEvent");
    }

    /// Device bytes the context's allocator holds (in use plus cached), and frees the cached ones.
    static std::size_t allocated_bytes(context& ctx) { return ctx.state().pool()->allocated_bytes(); }
    static void release_cached(context& ctx) {
        synchronize(ctx);
        ctx.state().pool()->release_cached();
    }

    // ---- linear algebra -----------------------------------------------------

    template <class T>
    static void gemm(context& ctx, const gemm_desc& d, const T* a, const T* b, T* c) {
        cuda::detail::gemm<T>(ctx.state(), ctx.allow_tf32, d, a, b, c);
    }

    template <class T>
    static void conv2d_forward(context& ctx, const conv2d_desc& d, const T* x, const T* w, const T* bias, T* y) {
        cuda::detail::conv2d_forward<T>(ctx.state(), ctx.allow_tf32, d, x, w, bias, y);
    }
    template <class T>
    static void conv2d_backward_data(context& ctx, const conv2d_desc& d, const T* w, const T* dy, T* dx) {
        cuda::detail::conv2d_backward_data<T>(ctx.state(), ctx.allow_tf32, d, w, dy, dx);
    }
    /// dw and dbias may be null (frozen weight, no bias).
    template <class T>
    static void conv2d_backward_weight(context& ctx, const conv2d_desc& d, const T* x, const T* dy, T* dw, T* dbias) {
        cuda::detail::conv2d_backward_weight<T>(ctx.state(), ctx.allow_tf32, d, x, dy, dw, dbias);
    }

    // ---- SAA gate (has_saa_gate) ----------------------------------------------

    /// See saa_gate_desc; two launches on the context's stream, no host wait.
    template <class T>
        requires(!std::is_same_v<T, double>)
    static void saa_gate(context& ctx, const saa_gate_desc& d, const T* q, const T* key_sum, T* gate, float* normalized) {
        const index_t rows = d.batch * d.queries;
        if (rows <= 0) return;
        check<shape_error>(d.boxes >= 0 && d.boxes <= saa_gate_desc::max_boxes && d.grid_width > 0 &&
                               d.grid_height * d.grid_width == d.queries,
                           "cuda", "saa_gate: ", d.boxes, " boxes on a ", d.grid_height, " x ", d.grid_width, " grid for ", d.queries,
                           " queries");
        auto w = allocate<float>(ctx, static_cast<std::size_t>(rows));
        const auto blocks = static_cast<unsigned>((rows + cuda::detail::saa_warps - 1) / cuda::detail::saa_warps);
        cuda::detail::saa_activation_kernel<T><<<blocks, cuda::detail::saa_warps * 32, 0, ctx.queue()>>>(
            rows, d.queries, d.hidden, static_cast<float>(d.scale), q, key_sum, w.data());
        cuda::detail::check_launch("saa_activation_kernel");
        cuda::detail::saa_gate_kernel<T><<<static_cast<unsigned>(d.batch), 1024, 0, ctx.queue()>>>(d, w.data(), gate, normalized);
        cuda::detail::check_launch("saa_gate_kernel");
    }

    // ---- attention (has_fused_attention) ------------------------------------

    /// out (batch, lq, dv) = softmax(scale q k^T) v for q (batch, lq, d), k (batch, lk, d), v (batch, lk, dv).
    template <class T>
    static void attention_forward(context& ctx, index_t batch, index_t lq, index_t lk, index_t d, index_t dv, double scale, const T* q,
                                  const T* k, const T* v, T* out) {
        if (batch <= 0 || lq <= 0 || dv <= 0) return;
        auto& state = ctx.state();
        if (cuda::detail::fused_attention<T>(state.stream(), state.compute_major() >= 8, batch, lq, lk, d, dv, scale, q, k, v, out))
            return;
        // Sizes the fused kernels do not cover (dv > 256, very long d): gemm +
        // softmax + gemm on slices of the batch small enough for their scores.
        const index_t per_entry = std::max<index_t>(1, lq * lk);
        const index_t slice = std::clamp<index_t>((index_t{1} << 26) / per_entry, 1, batch);
        auto scores = allocate<T>(ctx, static_cast<std::size_t>(slice * per_entry));
        for (index_t b0 = 0; b0 < batch; b0 += slice) {
            const index_t count = std::min(slice, batch - b0);
            gemm<T>(ctx, gemm_desc{.batch = count, .m = lq, .n = lk, .k = d, .trans_b = true, .lda = d, .ldb = d, .ldc = lk,
                                   .stride_a = lq * d, .stride_b = lk * d, .stride_c = lq * lk, .alpha = scale},
                    q + b0 * lq * d, k + b0 * lk * d, scores.data());
            softmax_forward<T>(ctx, softmax_desc{.rows = count * lq, .cols = lk}, scores.data(), scores.data());
            gemm<T>(ctx, gemm_desc{.batch = count, .m = lq, .n = dv, .k = lk, .lda = lk, .ldb = dv, .ldc = dv, .stride_a = lq * lk,
                                   .stride_b = lk * dv, .stride_c = lq * dv},
                    scores.data(), v + b0 * lk * dv, out + b0 * lq * dv);
        }
    }

    // ---- normalisation ------------------------------------------------------

    template <class T>
    static void group_norm_forward(context& ctx, const group_norm_desc& d, const T* x, const T* gamma, const T* beta, T* y,
                                   accum_t<T>* mean, accum_t<T>* rstd) {
        check<value_error>(d.groups > 0 && d.c % d.groups == 0, "cuda", "group_norm: ", d.c, " channels in ", d.groups, " groups");
        const index_t cg = d.c / d.groups;
        const cuda::detail::norm_layout layout{.groups = d.groups, .cg = cg, .spatial = d.spatial};
        normalise_forward(ctx, layout, d.n * d.groups, cg * d.spatial, d.eps, x, gamma, beta, y, mean, rstd);
    }
    template <class T>
    static void group_norm_backward(context& ctx, const group_norm_desc& d, const T* x, const T* gamma, const accum_t<T>* mean,
                                    const accum_t<T>* rstd, const T* dy, T* dx, T* dgamma, T* dbeta) {
        check<value_error>(d.groups > 0 && d.c % d.groups == 0, "cuda", "group_norm: ", d.c, " channels in ", d.groups, " groups");
        const index_t cg = d.c / d.groups, segments = d.n * d.groups;
        const cuda::detail::norm_layout layout{.groups = d.groups, .cg = cg, .spatial = d.spatial};
        normalise_backward_data(ctx, layout, segments, cg * d.spatial, x, gamma, mean, rstd, dy, dx);
        if ((dgamma || dbeta) && d.c > 0) {
            cuda::detail::group_norm_affine_grad_kernel<T><<<static_cast<unsigned>(d.c), 256, 0, ctx.queue()>>>(
                d.n, d.c, d.spatial, d.groups, x, mean, rstd, dy, dgamma, dbeta);
            cuda::detail::check_launch("group_norm_affine_grad_kernel");
        }
    }
    template <class T>
    static void layer_norm_forward(context& ctx, const layer_norm_desc& d, const T* x, const T* gamma, const T* beta, T* y,
                                   accum_t<T>* mean, accum_t<T>* rstd) {
        normalise_forward(ctx, cuda::detail::norm_layout{}, d.rows, d.cols, d.eps, x, gamma, beta, y, mean, rstd);
    }
    template <class T>
    static void layer_norm_backward(context& ctx, const layer_norm_desc& d, const T* x, const T* gamma, const accum_t<T>* mean,
                                    const accum_t<T>* rstd, const T* dy, T* dx, T* dgamma, T* dbeta) {
        normalise_backward_data(ctx, cuda::detail::norm_layout{}, d.rows, d.cols, x, gamma, mean, rstd, dy, dx);
        if ((dgamma || dbeta) && d.cols > 0) {
            cuda::detail::layer_norm_affine_grad_kernel<T><<<cuda::detail::grid_for(d.cols), cuda::detail::block_threads, 0, ctx.queue()>>>(
                d.rows, d.cols, x, mean, rstd, dy, dgamma, dbeta);
            cuda::detail::check_launch("layer_norm_affine_grad_kernel");
        }
    }

    // ---- pointwise ----------------------------------------------------------

    template <class T>
    static void softmax_forward(context& ctx, const softmax_desc& d, const T* x, T* y) {
        if (d.rows <= 0 || d.cols <= 0) return;
        cuda::detail::softmax_forward_kernel<T><<<row_grid(d.rows), row_threads(d.cols), 0, ctx.queue()>>>(d.rows, d.cols, x, y);
        cuda::detail::check_launch("softmax_forward_kernel");
    }
    template <class T>
    static void softmax_backward(context& ctx, const softmax_desc& d, const T* y, const T* dy, T* dx) {
        if (d.rows <= 0 || d.cols <= 0) return;
        cuda::detail::softmax_backward_kernel<T><<<row_grid(d.rows), row_threads(d.cols), 0, ctx.queue()>>>(d.rows, d.cols, y, dy, dx);
        cuda::detail::check_launch("softmax_backward_kernel");
    }

    template <class T>
    static void unary_forward(context& ctx, unary_op op, std::size_t n, const T* x, T* y) {
        if (!n) return;
        const auto count = static_cast<index_t>(n);
        const auto grid = cuda::detail::grid_for(count);
        if (count < (index_t{1} << 31))
            cuda::detail::unary_forward_kernel<T, std::uint32_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(
                op, static_cast<std::uint32_t>(count), x, y);
        else
            cuda::detail::unary_forward_kernel<T, index_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(op, count, x, y);
        cuda::detail::check_launch("unary_forward_kernel");
    }
    /// dx = dy * f'(x), x being the forward's input.
    template <class T>
    static void unary_backward(context& ctx, unary_op op, std::size_t n, const T* x, const T* dy, T* dx) {
        if (!n) return;
        const auto count = static_cast<index_t>(n);
        cuda::detail::unary_backward_kernel<T><<<cuda::detail::grid_for(count), cuda::detail::block_threads, 0, ctx.queue()>>>(op, count, x, dy, dx);
        cuda::detail::check_launch("unary_backward_kernel");
    }

    template <class T>
    static void geglu_forward(context& ctx, const geglu_desc& d, const T* x, T* y) {
        const index_t count = d.rows * d.cols;
        if (count <= 0) return;
        const auto grid = cuda::detail::grid_for(count);
        if (2 * count < (index_t{1} << 31))
            cuda::detail::geglu_forward_kernel<T, std::uint32_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(
                static_cast<std::uint32_t>(d.rows), static_cast<std::uint32_t>(d.cols), x, y);
        else
            cuda::detail::geglu_forward_kernel<T, index_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(d.rows, d.cols, x, y);
        cuda::detail::check_launch("geglu_forward_kernel");
    }
    template <class T>
    static void geglu_backward(context& ctx, const geglu_desc& d, const T* x, const T* dy, T* dx) {
        const index_t count = d.rows * d.cols;
        if (count <= 0) return;
        cuda::detail::geglu_backward_kernel<T><<<cuda::detail::grid_for(count), cuda::detail::block_threads, 0, ctx.queue()>>>(d.rows, d.cols, x, dy, dx);
        cuda::detail::check_launch("geglu_backward_kernel");
    }

    template <class T>
    static void binary_forward(context& ctx, binary_op op, const binary_desc& d, const T* a, const T* b, T* y) {
        const auto box = cuda::detail::coalesce(binary_box(d), 3);
        const index_t n = cuda::detail::box_numel(box);
        if (n <= 0 || numel(d.rank, d.shape) == 0) return;
        const void* const ptrs[3] = {y, a, b};
        bool vector_ops[3] = {};
        if (cuda::detail::box_fits_u32(box, 3, n) && cuda::detail::vectorisable<T, 3>(box, ptrs, vector_ops) && vector_ops[0]) {
            const index_t vectors = n / cuda::detail::vector_width<T>;
            cuda::detail::binary_vector_kernel<T, std::uint32_t><<<cuda::detail::grid_for(vectors), cuda::detail::block_threads, 0, ctx.queue()>>>(
                op, box, static_cast<std::uint32_t>(vectors), a, b, y);
            cuda::detail::check_launch("binary_vector_kernel");
            return;
        }
        const auto grid = cuda::detail::grid_for(n);
        if (cuda::detail::box_fits_u32(box, 3, n))
            cuda::detail::binary_forward_kernel<T, std::uint32_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(
                op, box, static_cast<std::uint32_t>(n), a, b, y);
        else
            cuda::detail::binary_forward_kernel<T, index_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(op, box, n, a, b, y);
        cuda::detail::check_launch("binary_forward_kernel");
    }
    /// da, db (either may be null) have the layouts of a and b; broadcast axes are summed.
    template <class T>
    static void binary_backward(context& ctx, binary_op op, const binary_desc& d, const T* a, const T* b, const T* dy, T* da, T* db) {
        if (numel(d.rank, d.shape) == 0) return;
        const auto box = binary_box(d);
        for (int which = 0; which < 2; ++which) {
            T* grad = which == 0 ? da : db;
            if (!grad) continue;
            const auto& strides = which == 0 ? d.a_strides : d.b_strides;
            std::array<bool, max_rank> inner{};
            for (int axis = 0; axis < d.rank; ++axis) {
                const auto i = static_cast<std::size_t>(axis);
                inner[i] = strides[i] == 0 && d.shape[i] > 1;
            }
            cuda::detail::strided_box outer_part, inner_part;
            cuda::detail::split_box(box, inner, outer_part, inner_part);
            outer_part = cuda::detail::coalesce(outer_part, 3);
            inner_part = cuda::detail::coalesce(inner_part, 3);
            const index_t n_outer = cuda::detail::box_numel(outer_part), n_inner = cuda::detail::box_numel(inner_part);
            cuda::detail::binary_backward_kernel<T><<<cuda::detail::grid_for(n_outer), cuda::detail::block_threads, 0, ctx.queue()>>>(
                op, which, outer_part, inner_part, n_outer, n_inner, a, b, dy, grad);
            cuda::detail::check_launch("binary_backward_kernel");
        }
    }

    /// y = alpha * x + beta * y (y is not read when beta == 0).
    template <class T>
    static void axpby(context& ctx, std::size_t n, double alpha, const T* x, double beta, T* y) {
        if (!n) return;
        using A = accum_t<T>;
        const auto count = static_cast<index_t>(n);
        cuda::detail::axpby_kernel<T><<<cuda::detail::grid_for(count), cuda::detail::block_threads, 0, ctx.queue()>>>(
            count, static_cast<A>(alpha), x, static_cast<A>(beta), y);
        cuda::detail::check_launch("axpby_kernel");
    }

    // ---- reductions and data movement ---------------------------------------

    template <class T>
    static void reduce_forward(context& ctx, const reduce_desc& d, const T* x, T* y) {
        using A = accum_t<T>;
        if (numel(d.rank, d.shape) == 0) {  // an empty reduction: zeros (or nothing to write)
            auto out_shape = d.shape;
            for (int a = 0; a < d.rank; ++a)
                if (d.reduce[static_cast<std::size_t>(a)]) out_shape[static_cast<std::size_t>(a)] = 1;
            fill(ctx, y, static_cast<std::size_t>(numel(d.rank, out_shape)), element_cast<T>(0.0f));
            return;
        }
        cuda::detail::strided_box box, outer_part, inner_part;
        box.rank = d.rank;
        box.shape = d.shape;
        box.strides[0] = cuda::detail::contiguous_strides(d.rank, d.shape);
        auto out_shape = d.shape;
        index_t count = 1;
        for (int a = 0; a < d.rank; ++a) {
            const auto i = static_cast<std::size_t>(a);
            if (d.reduce[i]) {
                out_shape[i] = 1;
                count *= d.shape[i];
            }
        }
        box.strides[1] = cuda::detail::contiguous_strides(d.rank, out_shape);
        for (int a = 0; a < d.rank; ++a)
            if (d.reduce[static_cast<std::size_t>(a)]) box.strides[1][static_cast<std::size_t>(a)] = 0;
        cuda::detail::split_box(box, d.reduce, outer_part, inner_part);
        outer_part = cuda::detail::coalesce(outer_part, 2);
        inner_part = cuda::detail::coalesce(inner_part, 2);
        const index_t n_outer = cuda::detail::box_numel(outer_part), n_inner = cuda::detail::box_numel(inner_part);
        const A scale = d.mean ? A(1) / static_cast<A>(count) : A(1);
        if (n_inner >= 512 && n_outer <= 0x7fffffff) {  // long reductions: a block per output
            cuda::detail::reduce_block_kernel<T><<<static_cast<unsigned>(n_outer), cuda::detail::block_threads, 0, ctx.queue()>>>(
                outer_part, inner_part, n_inner, scale, x, y);
            cuda::detail::check_launch("reduce_block_kernel");
        } else {
            cuda::detail::reduce_thread_kernel<T><<<cuda::detail::grid_for(n_outer), cuda::detail::block_threads, 0, ctx.queue()>>>(
                outer_part, inner_part, n_outer, n_inner, scale, x, y);
            cuda::detail::check_launch("reduce_thread_kernel");
        }
    }
    template <class T>
    static void reduce_backward(context& ctx, const reduce_desc& d, const T* dy, T* dx) {
        using A = accum_t<T>;
        const index_t n = numel(d.rank, d.shape);
        if (n == 0) return;
        auto out_shape = d.shape;
        index_t count = 1;
        for (int a = 0; a < d.rank; ++a)
            if (d.reduce[static_cast<std::size_t>(a)]) {
                out_shape[static_cast<std::size_t>(a)] = 1;
                count *= d.shape[static_cast<std::size_t>(a)];
            }
        cuda::detail::strided_box box;
        box.rank = d.rank;
        box.shape = d.shape;
        box.strides[0] = cuda::detail::contiguous_strides(d.rank, d.shape);
        box.strides[1] = cuda::detail::contiguous_strides(d.rank, out_shape);
        for (int a = 0; a < d.rank; ++a)
            if (d.reduce[static_cast<std::size_t>(a)]) box.strides[1][static_cast<std::size_t>(a)] = 0;
        box = cuda::detail::coalesce(box, 2);
        const A scale = d.mean ? A(1) / static_cast<A>(count) : A(1);
        const auto grid = cuda::detail::grid_for(n);
        if (cuda::detail::box_fits_u32(box, 2, n))
            cuda::detail::broadcast_scaled_kernel<T, std::uint32_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(
                box, static_cast<std::uint32_t>(n), scale, dy, dx);
        else
            cuda::detail::broadcast_scaled_kernel<T, index_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(box, n, scale, dy, dx);
        cuda::detail::check_launch("broadcast_scaled_kernel");
    }

    /// The coalesced copy `box` (fits 32-bit indices) as a batch of tiled
    /// transposes, when it is one: dst rows contiguous, src contiguous along
    /// dst's second-innermost axis. False when not (nothing queued).
    template <class T>
    static bool transpose_copy(context& ctx, const cuda::detail::strided_box& box, const T* src, T* dst) {
        if (box.rank < 2 || box.rank > 3) return false;
        const auto last = static_cast<std::size_t>(box.rank - 1), row_axis = last - 1;
        const auto& s = box.strides[0];
        const auto& d = box.strides[1];
        if (d[last] != 1 || s[row_axis] != 1 || s[last] < 2) return false;
        const index_t rows = box.shape[row_axis], cols = box.shape[last], batch = box.rank == 3 ? box.shape[0] : 1;
        constexpr index_t tile = cuda::detail::transpose_tile;
        if (batch > 65535 || (rows + tile - 1) / tile > 65535 || rows < tile || cols < tile) return false;
        const index_t src_batch = box.rank == 3 ? s[0] : 0, dst_batch = box.rank == 3 ? d[0] : 0;
        const dim3 grid(static_cast<unsigned>((cols + tile - 1) / tile), static_cast<unsigned>((rows + tile - 1) / tile),
                        static_cast<unsigned>(batch));
        cuda::detail::transpose_copy_kernel<T, std::uint32_t><<<grid, dim3(tile, 8), 0, ctx.queue()>>>(
            static_cast<std::uint32_t>(rows), static_cast<std::uint32_t>(cols), static_cast<std::uint32_t>(src_batch),
            static_cast<std::uint32_t>(s[last]), static_cast<std::uint32_t>(dst_batch), static_cast<std::uint32_t>(d[row_axis]), src, dst);
        cuda::detail::check_launch("transpose_copy_kernel");
        return true;
    }

    /// dst[box] = src[box] (or += when accumulate), both read through strides.
    template <class T>
    static void strided_copy(context& ctx, const strided_copy_desc& d, const T* src, T* dst, bool accumulate) {
        if (numel(d.rank, d.shape) == 0) return;
        cuda::detail::strided_box box;
        box.rank = d.rank;
        box.shape = d.shape;
        box.strides[0] = d.src_strides;
        box.strides[1] = d.dst_strides;
        std::array<bool, max_rank> repeated{};
        bool any_repeated = false;
        for (int a = 0; a < d.rank; ++a) {
            const auto i = static_cast<std::size_t>(a);
            repeated[i] = d.dst_strides[i] == 0 && d.shape[i] > 1;
            any_repeated = any_repeated || repeated[i];
        }
        if (accumulate && any_repeated) {  // several sources add into one destination: one owner thread each
            cuda::detail::strided_box outer_part, inner_part;
            cuda::detail::split_box(box, repeated, outer_part, inner_part);
            outer_part = cuda::detail::coalesce(outer_part, 2);
            inner_part = cuda::detail::coalesce(inner_part, 2);
            const index_t n_outer = cuda::detail::box_numel(outer_part), n_inner = cuda::detail::box_numel(inner_part);
            cuda::detail::strided_accumulate_kernel<T><<<cuda::detail::grid_for(n_outer), cuda::detail::block_threads, 0, ctx.queue()>>>(
                outer_part, inner_part, n_outer, n_inner, src, dst);
            cuda::detail::check_launch("strided_accumulate_kernel");
            return;
        }
        box = cuda::detail::coalesce(box, 2);
        const index_t n = cuda::detail::box_numel(box);
        if (!accumulate && cuda::detail::box_fits_u32(box, 2, n)) {
            const void* const ptrs[2] = {src, dst};
            bool vector_ops[2] = {};
            if (cuda::detail::vectorisable<T, 2>(box, ptrs, vector_ops) && vector_ops[0] && vector_ops[1]) {
                const index_t vectors = n / cuda::detail::vector_width<T>;
                cuda::detail::strided_copy_vector_kernel<T, std::uint32_t><<<cuda::detail::grid_for(vectors), cuda::detail::block_threads, 0,
                                                                             ctx.queue()>>>(box, static_cast<std::uint32_t>(vectors), src, dst);
                cuda::detail::check_launch("strided_copy_vector_kernel");
                return;
            }
            if (transpose_copy(ctx, box, src, dst)) return;
        }
        const auto grid = cuda::detail::grid_for(n);
        if (cuda::detail::box_fits_u32(box, 2, n))
            cuda::detail::strided_copy_kernel<T, std::uint32_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(
                box, static_cast<std::uint32_t>(n), src, dst, accumulate);
        else
            cuda::detail::strided_copy_kernel<T, index_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(box, n, src, dst, accumulate);
        cuda::detail::check_launch("strided_copy_kernel");
    }

    template <class T>
    static void upsample_nearest_forward(context& ctx, const upsample_desc& d, const T* x, T* y) {
        const index_t n = d.n * d.c * d.h * d.w * d.factor * d.factor;
        if (n <= 0) return;
        const auto grid = cuda::detail::grid_for(n);
        if (n < (index_t{1} << 31))
            cuda::detail::upsample_forward_kernel<T, std::uint32_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(
                static_cast<std::uint32_t>(d.n * d.c), static_cast<std::uint32_t>(d.h), static_cast<std::uint32_t>(d.w),
                static_cast<std::uint32_t>(d.factor), x, y);
        else
            cuda::detail::upsample_forward_kernel<T, index_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(d.n * d.c, d.h, d.w,
                                                                                                                   d.factor, x, y);
        cuda::detail::check_launch("upsample_forward_kernel");
    }
    template <class T>
    static void upsample_nearest_backward(context& ctx, const upsample_desc& d, const T* dy, T* dx) {
        const index_t n = d.n * d.c * d.h * d.w;
        if (n <= 0) return;
        cuda::detail::upsample_backward_kernel<T><<<cuda::detail::grid_for(n), cuda::detail::block_threads, 0, ctx.queue()>>>(
            d.n * d.c, d.h, d.w, d.factor, dy, dx);
        cuda::detail::check_launch("upsample_backward_kernel");
    }

    // ---- random numbers (Philox4x32-10; identical on every backend) ---------

    template <class T>
    static void random_uniform(context& ctx, std::uint64_t seed, std::uint64_t offset, std::size_t n, T* y) {
        if (!n) return;
        const auto count = static_cast<index_t>(n);
        cuda::detail::random_uniform_kernel<T><<<cuda::detail::grid_for(count), cuda::detail::block_threads, 0, ctx.queue()>>>(seed, offset, count, y);
        cuda::detail::check_launch("random_uniform_kernel");
    }
    template <class T>
    static void random_normal(context& ctx, std::uint64_t seed, std::uint64_t offset, std::size_t n, T* y) {
        if (!n) return;
        const auto count = static_cast<index_t>(n);
        cuda::detail::random_normal_kernel<T><<<cuda::detail::grid_for(count), cuda::detail::block_threads, 0, ctx.queue()>>>(seed, offset, count, y);
        cuda::detail::check_launch("random_normal_kernel");
    }

private:
    static index_t numel(int rank, const std::array<index_t, max_rank>& shape) {
        index_t n = 1;
        for (int a = 0; a < rank; ++a) n *= shape[static_cast<std::size_t>(a)];
        return n;
    }
    static cuda::detail::strided_box binary_box(const binary_desc& d) {
        cuda::detail::strided_box box;
        box.rank = d.rank;
        box.shape = d.shape;
        box.strides[0] = cuda::detail::contiguous_strides(d.rank, d.shape);
        box.strides[1] = d.a_strides;
        box.strides[2] = d.b_strides;
        return box;
    }
    static unsigned row_grid(index_t rows) { return static_cast<unsigned>(std::min<index_t>(rows, index_t{1} << 20)); }
    static unsigned row_threads(index_t cols) { return cols >= 1024 ? 256 : (cols >= 128 ? 128 : 64); }

    template <class T>
    static void normalise_forward(context& ctx, const cuda::detail::norm_layout& layout, index_t segments, index_t len, double eps, const T* x,
                                  const T* gamma, const T* beta, T* y, accum_t<T>* mean, accum_t<T>* rstd) {
        if (segments <= 0 || len <= 0) return;
        auto& state = ctx.state();
        const index_t blocks_wanted = 2 * static_cast<index_t>(state.sm_count());
        if (segments < blocks_wanted && len >= 8192) {
            // Few long segments (group norm of a large feature map): one block each
            // would leave most of the device idle. Statistics from chunks of
            // several blocks, merged per segment, then one thread per value.
            using A = accum_t<T>;
            const index_t parts = std::min<index_t>((blocks_wanted + segments - 1) / segments, len / 4096);
            const index_t chunk = (len + parts - 1) / parts;
            auto part_mean = allocate<A>(ctx, static_cast<std::size_t>(segments * parts));
            auto part_m2 = allocate<A>(ctx, static_cast<std::size_t>(segments * parts));
            cuda::detail::device_buffer<A> own_mean, own_rstd;
            if (!mean) mean = (own_mean = allocate<A>(ctx, static_cast<std::size_t>(segments))).data();
            if (!rstd) rstd = (own_rstd = allocate<A>(ctx, static_cast<std::size_t>(segments))).data();
            cuda::detail::segment_partial_kernel<T><<<dim3(static_cast<unsigned>(parts), static_cast<unsigned>(segments)), 256, 0, ctx.queue()>>>(
                len, chunk, x, part_mean.data(), part_m2.data());
            cuda::detail::check_launch("segment_partial_kernel");
            cuda::detail::segment_combine_kernel<A><<<cuda::detail::grid_for(segments, 64), 64, 0, ctx.queue()>>>(
                segments, parts, len, chunk, eps, part_mean.data(), part_m2.data(), mean, rstd);
            cuda::detail::check_launch("segment_combine_kernel");
            const index_t total = segments * len;
            const auto grid = cuda::detail::grid_for(total);
            if (total < (index_t{1} << 31))
                cuda::detail::normalise_apply_kernel<T, std::uint32_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(
                    layout, static_cast<std::uint32_t>(total), static_cast<std::uint32_t>(len), x, gamma, beta, mean, rstd, y);
            else
                cuda::detail::normalise_apply_kernel<T, index_t><<<grid, cuda::detail::block_threads, 0, ctx.queue()>>>(
                    layout, total, len, x, gamma, beta, mean, rstd, y);
            cuda::detail::check_launch("normalise_apply_kernel");
            return;
        }
        cuda::detail::normalise_forward_kernel<T><<<row_grid(segments), len >= 8192 ? 512 : row_threads(len), 0, ctx.queue()>>>(
            layout, segments, len, eps, x, gamma, beta, y, mean, rstd);
        cuda::detail::check_launch("normalise_forward_kernel");
    }
    template <class T>
    static void normalise_backward_data(context& ctx, const cuda::detail::norm_layout& layout, index_t segments, index_t len, const T* x,
                                        const T* gamma, const accum_t<T>* mean, const accum_t<T>* rstd, const T* dy, T* dx) {
        if (!dx || segments <= 0 || len <= 0) return;
        cuda::detail::normalise_backward_data_kernel<T><<<row_grid(segments), len >= 8192 ? 512 : row_threads(len), 0, ctx.queue()>>>(
            layout, segments, len, x, gamma, mean, rstd, dy, dx);
        cuda::detail::check_launch("normalise_backward_data_kernel");
    }
};

template <>
inline constexpr bool enable_backend<cuda_backend> = true;

static_assert(backend<cuda_backend>, "cuda_backend must model dynamicid::backend");
static_assert(supports_element<cuda_backend, half> && supports_element<cuda_backend, bfloat16>);
static_assert(!supports_element<cuda_backend, double>);
static_assert(has_saa_gate<cuda_backend, float> && has_saa_gate<cuda_backend, half> && has_saa_gate<cuda_backend, bfloat16>);
static_assert(has_fused_attention<cuda_backend, float> && has_fused_attention<cuda_backend, half> &&
              has_fused_attention<cuda_backend, bfloat16>);
static_assert(has_async_events<cuda_backend>);
static_assert(has_step_graph<cuda_backend>);

}  // namespace dynamicid
