// dynamicid: the reference CPU backend.
//
// Correct first, but not slow: GEMM and convolutions run on Eigen, loops are
// split across the context's threads with OpenMP. Computes in f32 and f64
// natively; f16 and bf16 are storage types widened to f32 inside each kernel.
//
//     #include <dynamicid/backends/cpu.hpp>
//     dynamicid::cpu_backend::context ctx{.threads = 2};
//     auto x = dynamicid::tensor<dynamicid::cpu_backend, float>::zeros(ctx, {2, 8});
#pragma once

#include <dynamicid/backends/cpu/detail/conv.hpp>
#include <dynamicid/backends/cpu/detail/gemm.hpp>
#include <dynamicid/backends/cpu/detail/parallel.hpp>
#include <dynamicid/backends/cpu/detail/pointwise.hpp>
#include <dynamicid/backends/cpu/detail/strided.hpp>
#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/philox.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <thread>
#include <vector>

namespace dynamicid {

/// The reference CPU backend. Stateless; all state lives in the context.
struct cpu_backend {
    /// Threads used by each call; 0 picks std::thread::hardware_concurrency().
    /// A context may be shared by threads only if calls on it are not
    /// concurrent; give each host thread its own context (they are cheap).
    struct context {
        int threads = 0;
        int thread_count() const {
            if (threads > 0) return threads;
            const unsigned hw = std::thread::hardware_concurrency();
            return hw ? static_cast<int>(hw) : 1;
        }
    };

    template <class T> using pointer = T*;
    template <class T> using const_pointer = const T*;

    /// 64-byte aligned host allocation.
    template <class T>
    class buffer {
    public:
        buffer() = default;
        explicit buffer(std::size_t n) : size_(n) {
            if (n == 0) return;
            if (n > std::numeric_limits<std::size_t>::max() / sizeof(T) / 2)
                throw value_error("cpu", "allocation of " + std::to_string(n) + " elements is too large");
            const std::size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
            void* p = std::aligned_alloc(64, bytes);
            if (!p) throw value_error("cpu", "out of memory allocating " + std::to_string(bytes) + " bytes");
            data_.reset(static_cast<T*>(p));
        }
        T* data() const noexcept { return data_.get(); }
        std::size_t size() const noexcept { return size_; }

    private:
        struct release {
            void operator()(T* p) const noexcept { std::free(p); }
        };
        std::unique_ptr<T, release> data_;
        std::size_t size_ = 0;
    };

    static constexpr const char* name() { return "cpu"; }

    // ---- memory -------------------------------------------------------------

    template <class T>
    static buffer<T> allocate(context&, std::size_t n) { return buffer<T>(n); }

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
        cpu::detail::parallel_for(ctx.thread_count(), static_cast<index_t>(n), 1 << 14, [&](index_t b, index_t e) {
            for (index_t i = b; i < e; ++i) dst[i] = element_cast<To>(src[i]);
        });
    }

    static void synchronize(context&) {}

    // ---- linear algebra -----------------------------------------------------

    template <class T>
    static void gemm(context& ctx, const gemm_desc& d, const T* a, const T* b, T* c) {
        cpu::detail::gemm<T>(ctx.thread_count(), d, a, b, c);
    }

    template <class T>
    static void conv2d_forward(context& ctx, const conv2d_desc& d, const T* x, const T* w, const T* bias, T* y) {
        cpu::detail::conv2d_forward<T>(ctx.thread_count(), d, x, w, bias, y);
    }
    template <class T>
    static void conv2d_backward_data(context& ctx, const conv2d_desc& d, const T* w, const T* dy, T* dx) {
        cpu::detail::conv2d_backward_data<T>(ctx.thread_count(), d, w, dy, dx);
    }
    /// dw and dbias may be null (frozen weight, no bias).
    template <class T>
    static void conv2d_backward_weight(context& ctx, const conv2d_desc& d, const T* x, const T* dy, T* dw, T* dbias) {
        cpu::detail::conv2d_backward_weight<T>(ctx.thread_count(), d, x, dy, dw, dbias);
    }

    // ---- normalisation ------------------------------------------------------
    // Both norms reduce to "normalise `rows` segments of `len` values, then apply
    // a per-feature affine": group norm has (n*groups) segments whose feature
    // index is the channel; layer norm has `rows` segments indexed by column.

    template <class T>
    static void group_norm_forward(context& ctx, const group_norm_desc& d, const T* x, const T* gamma, const T* beta, T* y,
                                   accum_t<T>* mean, accum_t<T>* rstd) {
        const index_t cg = d.c / d.groups, len = cg * d.spatial;
        normalise_forward(ctx, d.n * d.groups, len, d.eps, x, y, mean, rstd, [&](index_t seg, index_t i) {
            return ((seg % d.groups) * cg + i / d.spatial);
        }, gamma, beta);
    }
    template <class T>
    static void group_norm_backward(context& ctx, const group_norm_desc& d, const T* x, const T* gamma, const accum_t<T>* mean,
                                    const accum_t<T>* rstd, const T* dy, T* dx, T* dgamma, T* dbeta) {
        const index_t cg = d.c / d.groups, len = cg * d.spatial;
        normalise_backward(ctx, d.n * d.groups, len, d.c, x, gamma, mean, rstd, dy, dx, dgamma, dbeta,
                           [&](index_t seg, index_t i) { return ((seg % d.groups) * cg + i / d.spatial); });
    }
    template <class T>
    static void layer_norm_forward(context& ctx, const layer_norm_desc& d, const T* x, const T* gamma, const T* beta, T* y,
                                   accum_t<T>* mean, accum_t<T>* rstd) {
        normalise_forward(ctx, d.rows, d.cols, d.eps, x, y, mean, rstd, [](index_t, index_t i) { return i; }, gamma, beta);
    }
    template <class T>
    static void layer_norm_backward(context& ctx, const layer_norm_desc& d, const T* x, const T* gamma, const accum_t<T>* mean,
                                    const accum_t<T>* rstd, const T* dy, T* dx, T* dgamma, T* dbeta) {
        normalise_backward(ctx, d.rows, d.cols, d.cols, x, gamma, mean, rstd, dy, dx, dgamma, dbeta,
                           [](index_t, index_t i) { return i; });
    }

    // ---- pointwise ----------------------------------------------------------

    template <class T>
    static void softmax_forward(context& ctx, const softmax_desc& d, const T* x, T* y) {
        using A = accum_t<T>;
        cpu::detail::parallel_for(ctx.thread_count(), d.rows, std::max<index_t>(1, 4096 / std::max<index_t>(1, d.cols)),
                                  [&](index_t r0, index_t r1) {
            for (index_t r = r0; r < r1; ++r) {
                const T* xr = x + r * d.cols;
                T* yr = y + r * d.cols;
                A peak = -std::numeric_limits<A>::infinity();
                for (index_t i = 0; i < d.cols; ++i) peak = std::max(peak, static_cast<A>(xr[i]));
                if (peak == -std::numeric_limits<A>::infinity()) peak = 0;  // every entry masked: softmax of -inf row
                A total = 0;
                std::vector<A> e(static_cast<std::size_t>(d.cols));
                for (index_t i = 0; i < d.cols; ++i) total += (e[static_cast<std::size_t>(i)] = std::exp(static_cast<A>(xr[i]) - peak));
                const A inv = total > A(0) ? A(1) / total : A(0);
                for (index_t i = 0; i < d.cols; ++i) yr[i] = T(e[static_cast<std::size_t>(i)] * inv);
            }
        });
    }
    template <class T>
    static void softmax_backward(context& ctx, const softmax_desc& d, const T* y, const T* dy, T* dx) {
        using A = accum_t<T>;
        cpu::detail::parallel_for(ctx.thread_count(), d.rows, std::max<index_t>(1, 4096 / std::max<index_t>(1, d.cols)),
                                  [&](index_t r0, index_t r1) {
            for (index_t r = r0; r < r1; ++r) {
                const T* yr = y + r * d.cols;
                const T* gr = dy + r * d.cols;
                A dot = 0;
                for (index_t i = 0; i < d.cols; ++i) dot += static_cast<A>(yr[i]) * static_cast<A>(gr[i]);
                for (index_t i = 0; i < d.cols; ++i)
                    dx[r * d.cols + i] = T(static_cast<A>(yr[i]) * (static_cast<A>(gr[i]) - dot));
            }
        });
    }

    template <class T>
    static void unary_forward(context& ctx, unary_op op, std::size_t n, const T* x, T* y) {
        using A = accum_t<T>;
        cpu::detail::parallel_for(ctx.thread_count(), static_cast<index_t>(n), 1 << 13, [&](index_t b, index_t e) {
            for (index_t i = b; i < e; ++i) y[i] = T(cpu::detail::unary_value<A>(op, static_cast<A>(x[i])));
        });
    }
    /// dx = dy * f'(x), x being the forward's input.
    template <class T>
    static void unary_backward(context& ctx, unary_op op, std::size_t n, const T* x, const T* dy, T* dx) {
        using A = accum_t<T>;
        cpu::detail::parallel_for(ctx.thread_count(), static_cast<index_t>(n), 1 << 13, [&](index_t b, index_t e) {
            for (index_t i = b; i < e; ++i)
                dx[i] = T(static_cast<A>(dy[i]) * cpu::detail::unary_derivative<A>(op, static_cast<A>(x[i])));
        });
    }

    template <class T>
    static void geglu_forward(context& ctx, const geglu_desc& d, const T* x, T* y) {
        using A = accum_t<T>;
        cpu::detail::parallel_for(ctx.thread_count(), d.rows, 1, [&](index_t r0, index_t r1) {
            for (index_t r = r0; r < r1; ++r)
                for (index_t i = 0; i < d.cols; ++i) {
                    const A h = static_cast<A>(x[r * 2 * d.cols + i]), g = static_cast<A>(x[r * 2 * d.cols + d.cols + i]);
                    y[r * d.cols + i] = T(h * cpu::detail::unary_value<A>(unary_op::gelu_erf, g));
                }
        });
    }
    template <class T>
    static void geglu_backward(context& ctx, const geglu_desc& d, const T* x, const T* dy, T* dx) {
        using A = accum_t<T>;
        cpu::detail::parallel_for(ctx.thread_count(), d.rows, 1, [&](index_t r0, index_t r1) {
            for (index_t r = r0; r < r1; ++r)
                for (index_t i = 0; i < d.cols; ++i) {
                    const index_t hi = r * 2 * d.cols + i, gi = hi + d.cols;
                    const A h = static_cast<A>(x[hi]), g = static_cast<A>(x[gi]), up = static_cast<A>(dy[r * d.cols + i]);
                    dx[hi] = T(up * cpu::detail::unary_value<A>(unary_op::gelu_erf, g));
                    dx[gi] = T(up * h * cpu::detail::unary_derivative<A>(unary_op::gelu_erf, g));
                }
        });
    }

    template <class T>
    static void binary_forward(context& ctx, binary_op op, const binary_desc& d, const T* a, const T* b, T* y) {
        using A = accum_t<T>;
        const index_t n = cpu::detail::numel_of(d.rank, d.shape);
        cpu::detail::parallel_for(ctx.thread_count(), n, 1 << 13, [&](index_t begin, index_t end) {
            cpu::detail::walk2(begin, end, d.rank, d.shape, d.a_strides, d.b_strides, [&](index_t i, index_t oa, index_t ob) {
                y[i] = T(cpu::detail::binary_value<A>(op, static_cast<A>(a[oa]), static_cast<A>(b[ob])));
            });
        });
    }
    /// da, db (either may be null) have the layouts of a and b; broadcast axes are summed.
    template <class T>
    static void binary_backward(context& ctx, binary_op op, const binary_desc& d, const T* a, const T* b, const T* dy, T* da,
                                T* db) {
        using A = accum_t<T>;
        const index_t n = cpu::detail::numel_of(d.rank, d.shape);
        const index_t na = cpu::detail::operand_numel(d.rank, d.shape, d.a_strides);
        const index_t nb = cpu::detail::operand_numel(d.rank, d.shape, d.b_strides);
        const bool reduce_a = cpu::detail::has_broadcast(d.rank, d.shape, d.a_strides);
        const bool reduce_b = cpu::detail::has_broadcast(d.rank, d.shape, d.b_strides);
        std::vector<A> acc_a(reduce_a && da ? static_cast<std::size_t>(na) : 0), acc_b(reduce_b && db ? static_cast<std::size_t>(nb) : 0);
        auto body = [&](index_t begin, index_t end) {
            cpu::detail::walk2(begin, end, d.rank, d.shape, d.a_strides, d.b_strides, [&](index_t i, index_t oa, index_t ob) {
                A pa = 0, pb = 0;
                cpu::detail::binary_partials<A>(op, static_cast<A>(a[oa]), static_cast<A>(b[ob]), pa, pb);
                const A g = static_cast<A>(dy[i]);
                if (da) {
                    if (reduce_a) acc_a[static_cast<std::size_t>(oa)] += g * pa;
                    else da[oa] = T(g * pa);
                }
                if (db) {
                    if (reduce_b) acc_b[static_cast<std::size_t>(ob)] += g * pb;
                    else db[ob] = T(g * pb);
                }
            });
        };
        // Reductions into a shared slot are done on one thread (deterministic order).
        if ((reduce_a && da) || (reduce_b && db)) body(0, n);
        else cpu::detail::parallel_for(ctx.thread_count(), n, 1 << 13, body);
        for (std::size_t i = 0; i < acc_a.size(); ++i) da[i] = T(acc_a[i]);
        for (std::size_t i = 0; i < acc_b.size(); ++i) db[i] = T(acc_b[i]);
    }

    /// y = alpha * x + beta * y (y is not read when beta == 0).
    template <class T>
    static void axpby(context& ctx, std::size_t n, double alpha, const T* x, double beta, T* y) {
        using A = accum_t<T>;
        cpu::detail::parallel_for(ctx.thread_count(), static_cast<index_t>(n), 1 << 14, [&](index_t b, index_t e) {
            for (index_t i = b; i < e; ++i) {
                const A base = beta == 0.0 ? A(0) : static_cast<A>(beta) * static_cast<A>(y[i]);
                y[i] = T(static_cast<A>(alpha) * static_cast<A>(x[i]) + base);
            }
        });
    }

    // ---- reductions and data movement ---------------------------------------

    template <class T>
    static void reduce_forward(context& ctx, const reduce_desc& d, const T* x, T* y) {
        using A = accum_t<T>;
        cpu::detail::extents out_shape = d.shape, inner_shape{}, out_strides{}, inner_strides{};
        const auto in_strides = contiguous_strides(d.rank, d.shape);
        index_t count = 1;
        int inner_rank = 0;
        for (int a = 0; a < d.rank; ++a) {
            const auto i = static_cast<std::size_t>(a);
            if (d.reduce[i]) {
                out_shape[i] = 1;
                inner_shape[static_cast<std::size_t>(inner_rank)] = d.shape[i];
                inner_strides[static_cast<std::size_t>(inner_rank++)] = in_strides[i];
                count *= d.shape[i];
            }
        }
        for (int a = 0; a < d.rank; ++a) {
            const auto i = static_cast<std::size_t>(a);
            out_strides[i] = d.reduce[i] ? 0 : in_strides[i];
        }
        const index_t n_out = cpu::detail::numel_of(d.rank, out_shape);
        cpu::detail::parallel_for(ctx.thread_count(), n_out, 64, [&](index_t b, index_t e) {
            for (index_t o = b; o < e; ++o) {
                const index_t base = cpu::detail::offset_of(o, d.rank, out_shape, out_strides);
                A sum = 0;
                cpu::detail::walk2(0, count, inner_rank, inner_shape, inner_strides, inner_strides,
                                   [&](index_t, index_t off, index_t) { sum += static_cast<A>(x[base + off]); });
                y[o] = T(d.mean && count ? sum / static_cast<A>(count) : sum);
            }
        });
    }
    template <class T>
    static void reduce_backward(context& ctx, const reduce_desc& d, const T* dy, T* dx) {
        using A = accum_t<T>;
        cpu::detail::extents out_shape = d.shape, zero{};
        index_t count = 1;
        for (int a = 0; a < d.rank; ++a)
            if (d.reduce[static_cast<std::size_t>(a)]) {
                out_shape[static_cast<std::size_t>(a)] = 1;
                count *= d.shape[static_cast<std::size_t>(a)];
            }
        auto read = contiguous_strides(d.rank, out_shape);
        for (int a = 0; a < d.rank; ++a)
            if (d.reduce[static_cast<std::size_t>(a)]) read[static_cast<std::size_t>(a)] = 0;
        const A scale = d.mean && count ? A(1) / static_cast<A>(count) : A(1);
        const index_t n = cpu::detail::numel_of(d.rank, d.shape);
        cpu::detail::parallel_for(ctx.thread_count(), n, 1 << 13, [&](index_t b, index_t e) {
            cpu::detail::walk2(b, e, d.rank, d.shape, read, zero,
                               [&](index_t i, index_t off, index_t) { dx[i] = T(static_cast<A>(dy[off]) * scale); });
        });
    }

    /// dst[box] = src[box] (or += when accumulate), both read through strides.
    template <class T>
    static void strided_copy(context& ctx, const strided_copy_desc& d, const T* src, T* dst, bool accumulate) {
        using A = accum_t<T>;
        const index_t n = cpu::detail::numel_of(d.rank, d.shape);
        auto body = [&](index_t b, index_t e) {
            cpu::detail::walk2(b, e, d.rank, d.shape, d.src_strides, d.dst_strides, [&](index_t, index_t os, index_t od) {
                dst[od] = accumulate ? T(static_cast<A>(dst[od]) + static_cast<A>(src[os])) : src[os];
            });
        };
        if (accumulate && cpu::detail::has_broadcast(d.rank, d.shape, d.dst_strides)) body(0, n);
        else cpu::detail::parallel_for(ctx.thread_count(), n, 1 << 13, body);
    }

    template <class T>
    static void upsample_nearest_forward(context& ctx, const upsample_desc& d, const T* x, T* y) {
        const index_t oh = d.h * d.factor, ow = d.w * d.factor;
        cpu::detail::parallel_for(ctx.thread_count(), d.n * d.c, 1, [&](index_t p0, index_t p1) {
            for (index_t p = p0; p < p1; ++p)
                for (index_t i = 0; i < oh; ++i)
                    for (index_t j = 0; j < ow; ++j) y[(p * oh + i) * ow + j] = x[(p * d.h + i / d.factor) * d.w + j / d.factor];
        });
    }
    template <class T>
    static void upsample_nearest_backward(context& ctx, const upsample_desc& d, const T* dy, T* dx) {
        using A = accum_t<T>;
        const index_t oh = d.h * d.factor, ow = d.w * d.factor;
        cpu::detail::parallel_for(ctx.thread_count(), d.n * d.c, 1, [&](index_t p0, index_t p1) {
            for (index_t p = p0; p < p1; ++p)
                for (index_t i = 0; i < d.h; ++i)
                    for (index_t j = 0; j < d.w; ++j) {
                        A sum = 0;
                        for (index_t u = 0; u < d.factor; ++u)
                            for (index_t v = 0; v < d.factor; ++v)
                                sum += static_cast<A>(dy[(p * oh + i * d.factor + u) * ow + j * d.factor + v]);
                        dx[(p * d.h + i) * d.w + j] = T(sum);
                    }
        });
    }

    // ---- random numbers (Philox4x32-10; identical on every backend) ---------

    template <class T>
    static void random_uniform(context& ctx, std::uint64_t seed, std::uint64_t offset, std::size_t n, T* y) {
        cpu::detail::parallel_for(ctx.thread_count(), static_cast<index_t>(n), 1 << 12, [&](index_t b, index_t e) {
            for (index_t i = b; i < e; ++i) y[i] = element_cast<T>(philox::uniform(seed, offset + static_cast<std::uint64_t>(i)));
        });
    }
    template <class T>
    static void random_normal(context& ctx, std::uint64_t seed, std::uint64_t offset, std::size_t n, T* y) {
        cpu::detail::parallel_for(ctx.thread_count(), static_cast<index_t>(n), 1 << 12, [&](index_t b, index_t e) {
            for (index_t i = b; i < e; ++i) y[i] = element_cast<T>(philox::normal(seed, offset + static_cast<std::uint64_t>(i)));
        });
    }

private:
    static cpu::detail::extents contiguous_strides(int rank, const cpu::detail::extents& shape) {
        cpu::detail::extents s{};
        index_t running = 1;
        for (int a = rank - 1; a >= 0; --a) {
            s[static_cast<std::size_t>(a)] = running;
            running *= shape[static_cast<std::size_t>(a)];
        }
        return s;
    }

    template <class T, class Feature>
    static void normalise_forward(context& ctx, index_t segments, index_t len, double eps, const T* x, T* y, accum_t<T>* mean,
                                  accum_t<T>* rstd, Feature feature, const T* gamma, const T* beta) {
        using A = accum_t<T>;
        cpu::detail::parallel_for(ctx.thread_count(), segments, 1, [&](index_t s0, index_t s1) {
            for (index_t s = s0; s < s1; ++s) {
                const T* xs = x + s * len;
                double sum = 0, sq = 0;
                for (index_t i = 0; i < len; ++i) sum += static_cast<double>(xs[i]);
                const double mu = len ? sum / static_cast<double>(len) : 0.0;
                for (index_t i = 0; i < len; ++i) {
                    const double c = static_cast<double>(xs[i]) - mu;
                    sq += c * c;
                }
                const double var = len ? sq / static_cast<double>(len) : 0.0;
                const A m = static_cast<A>(mu), r = static_cast<A>(1.0 / std::sqrt(var + eps));
                if (mean) mean[s] = m;
                if (rstd) rstd[s] = r;
                for (index_t i = 0; i < len; ++i) {
                    const index_t f = feature(s, i);
                    const A g = gamma ? static_cast<A>(gamma[f]) : A(1), b = beta ? static_cast<A>(beta[f]) : A(0);
                    y[s * len + i] = T((static_cast<A>(xs[i]) - m) * r * g + b);
                }
            }
        });
    }

    template <class T, class Feature>
    static void normalise_backward(context& ctx, index_t segments, index_t len, index_t features, const T* x, const T* gamma,
                                   const accum_t<T>* mean, const accum_t<T>* rstd, const T* dy, T* dx, T* dgamma, T* dbeta,
                                   Feature feature) {
        using A = accum_t<T>;
        if (dx) {
            cpu::detail::parallel_for(ctx.thread_count(), segments, 1, [&](index_t s0, index_t s1) {
                for (index_t s = s0; s < s1; ++s) {
                    const A m = mean[s], r = rstd[s];
                    A mean_g = 0, mean_gx = 0;
                    for (index_t i = 0; i < len; ++i) {
                        const A xhat = (static_cast<A>(x[s * len + i]) - m) * r;
                        const A g = static_cast<A>(dy[s * len + i]) * (gamma ? static_cast<A>(gamma[feature(s, i)]) : A(1));
                        mean_g += g;
                        mean_gx += g * xhat;
                    }
                    mean_g /= static_cast<A>(len);
                    mean_gx /= static_cast<A>(len);
                    for (index_t i = 0; i < len; ++i) {
                        const A xhat = (static_cast<A>(x[s * len + i]) - m) * r;
                        const A g = static_cast<A>(dy[s * len + i]) * (gamma ? static_cast<A>(gamma[feature(s, i)]) : A(1));
                        dx[s * len + i] = T(r * (g - mean_g - xhat * mean_gx));
                    }
                }
            });
        }
        if (dgamma || dbeta) {
            std::vector<A> sg(static_cast<std::size_t>(features), A(0)), sb(static_cast<std::size_t>(features), A(0));
            for (index_t s = 0; s < segments; ++s)
                for (index_t i = 0; i < len; ++i) {
                    const auto f = static_cast<std::size_t>(feature(s, i));
                    const A g = static_cast<A>(dy[s * len + i]);
                    sg[f] += g * (static_cast<A>(x[s * len + i]) - mean[s]) * rstd[s];
                    sb[f] += g;
                }
            for (index_t f = 0; f < features; ++f) {
                if (dgamma) dgamma[f] = T(sg[static_cast<std::size_t>(f)]);
                if (dbeta) dbeta[f] = T(sb[static_cast<std::size_t>(f)]);
            }
        }
    }
};

template <>
inline constexpr bool enable_backend<cpu_backend> = true;

static_assert(backend<cpu_backend>, "cpu_backend must model dynamicid::backend");
static_assert(supports_element<cpu_backend, double>, "cpu_backend computes in f64 for gradient checks");
static_assert(supports_element<cpu_backend, half> && supports_element<cpu_backend, bfloat16>);

}  // namespace dynamicid
