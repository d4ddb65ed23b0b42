// dynamicid tests: a deliberately minimal second model of dynamicid::backend.
//
// Its device pointers are handles {storage, offset}, not raw pointers, and
// every element access is bounds-checked; so if the core ever dereferenced a
// device pointer or lowered an op to an out-of-range strided access, this
// backend would fail to compile or throw. It computes only in f32, with naive
// loops; primitives the matrix does not run on it throw unsupported_error.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/philox.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace dynamicid::testing {

/// A position in a backend-owned vector. Default-constructed (or from
/// nullptr) it is null.
template <class T>
struct handle {
    using storage_type = std::conditional_t<std::is_const_v<T>, const std::vector<std::remove_const_t<T>>, std::vector<T>>;
    storage_type* storage = nullptr;
    std::ptrdiff_t offset = 0;

    handle() = default;
    handle(std::nullptr_t) {}
    handle(storage_type* s, std::ptrdiff_t o) : storage(s), offset(o) {}
    /// Mutable to const, like T* to const T*.
    template <class U>
        requires(std::is_const_v<T> && std::is_same_v<const U, T>)
    handle(const handle<U>& other) : storage(other.storage), offset(other.offset) {}

    handle operator+(std::ptrdiff_t n) const { return {storage, offset + n}; }
    explicit operator bool() const { return storage != nullptr; }
    /// Element i from here; std::vector::at throws on an out-of-range access.
    T& operator[](index_t i) const { return storage->at(static_cast<std::size_t>(offset + i)); }
};

struct minimal_backend {
    struct context {};

    template <class T> using pointer = handle<T>;
    template <class T> using const_pointer = handle<const T>;

    template <class T>
    class buffer {
    public:
        buffer() = default;
        explicit buffer(std::size_t n) : values_(std::make_unique<std::vector<T>>(n)) {}
        pointer<T> data() const { return {values_.get(), 0}; }
        std::size_t size() const { return values_ ? values_->size() : 0; }

    private:
        std::unique_ptr<std::vector<T>> values_;  // boxed, so a moved buffer keeps its handles valid
    };

    static constexpr const char* name() { return "minimal"; }
    static void synchronize(context&) {}

    // ---- memory (any element type) --------------------------------------------
    // Source handles sit in a non-deduced context: T comes from the other
    // argument, so a mutable handle converts to a const one as T* would.

    template <class T>
    static buffer<T> allocate(context&, std::size_t n) { return buffer<T>(n); }
    template <class T>
    static void copy_to_host(context&, std::type_identity_t<const_pointer<T>> src, T* host, std::size_t n) {
        for (std::size_t i = 0; i < n; ++i) host[i] = src[static_cast<index_t>(i)];
    }
    template <class T>
    static void copy_from_host(context&, const T* host, pointer<T> dst, std::size_t n) {
        for (std::size_t i = 0; i < n; ++i) dst[static_cast<index_t>(i)] = host[i];
    }
    template <class T>
    static void copy(context&, std::type_identity_t<const_pointer<T>> src, pointer<T> dst, std::size_t n) {
        std::vector<T> staged(n);  // the ranges may overlap
        for (std::size_t i = 0; i < n; ++i) staged[i] = src[static_cast<index_t>(i)];
        for (std::size_t i = 0; i < n; ++i) dst[static_cast<index_t>(i)] = staged[i];
    }
    template <class T>
    static void fill(context&, pointer<T> dst, std::size_t n, T value) {
        for (std::size_t i = 0; i < n; ++i) dst[static_cast<index_t>(i)] = value;
    }
    // From may arrive const-qualified or not: the handle is taken as it comes.
    template <class From, class To>
    static void convert(context&, handle<From> src, pointer<To> dst, std::size_t n) {
        for (std::size_t i = 0; i < n; ++i) dst[static_cast<index_t>(i)] = element_cast<To>(src[static_cast<index_t>(i)]);
    }

    // ---- f32 primitives -----------------------------------------------------------
    // Plain (non-template) functions on float, so supports_element<minimal_backend, T>
    // holds for f32 only and the matrix exercises its f32 fallbacks.

    using cp = const_pointer<float>;
    using p = pointer<float>;

    static void gemm(context&, const gemm_desc& d, cp a, cp b, p c) {
        for (index_t bi = 0; bi < d.batch; ++bi)
            for (index_t i = 0; i < d.m; ++i)
                for (index_t j = 0; j < d.n; ++j) {
                    double sum = 0;
                    for (index_t l = 0; l < d.k; ++l) {
                        const float av = d.trans_a ? a[bi * d.stride_a + l * d.lda + i] : a[bi * d.stride_a + i * d.lda + l];
                        const float bv = d.trans_b ? b[bi * d.stride_b + j * d.ldb + l] : b[bi * d.stride_b + l * d.ldb + j];
                        sum += static_cast<double>(av) * bv;
                    }
                    float& out = c[bi * d.stride_c + i * d.ldc + j];
                    out = static_cast<float>(d.alpha * sum + (d.beta == 0.0 ? 0.0 : d.beta * out));
                }
    }

    static void softmax_forward(context&, const softmax_desc& d, cp x, p y) {
        for (index_t r = 0; r < d.rows; ++r) {
            float peak = -std::numeric_limits<float>::infinity();
            for (index_t i = 0; i < d.cols; ++i) peak = std::max(peak, x[r * d.cols + i]);
            double total = 0;
            for (index_t i = 0; i < d.cols; ++i) {
                const float v = x[r * d.cols + i];
                total += (v == -std::numeric_limits<float>::infinity()) ? 0.0 : std::exp(static_cast<double>(v) - peak);
            }
            for (index_t i = 0; i < d.cols; ++i) {
                const float v = x[r * d.cols + i];
                const double e = (v == -std::numeric_limits<float>::infinity()) ? 0.0 : std::exp(static_cast<double>(v) - peak);
                y[r * d.cols + i] = total > 0 ? static_cast<float>(e / total) : 0.0f;
            }
        }
    }
    static void softmax_backward(context&, const softmax_desc& d, cp y, cp dy, p dx) {
        for (index_t r = 0; r < d.rows; ++r) {
            double dot = 0;
            for (index_t i = 0; i < d.cols; ++i) dot += static_cast<double>(y[r * d.cols + i]) * dy[r * d.cols + i];
            for (index_t i = 0; i < d.cols; ++i)
                dx[r * d.cols + i] = static_cast<float>(y[r * d.cols + i] * (dy[r * d.cols + i] - dot));
        }
    }

    static void unary_forward(context&, unary_op op, std::size_t n, cp x, p y) {
        for (index_t i = 0; i < static_cast<index_t>(n); ++i) {
            const double v = x[i];
            y[i] = static_cast<float>(op == unary_op::silu ? v / (1.0 + std::exp(-v)) : relu_only(op, v));
        }
    }
    static void unary_backward(context&, unary_op op, std::size_t n, cp x, cp dy, p dx) {
        for (index_t i = 0; i < static_cast<index_t>(n); ++i) {
            const double v = x[i];
            double slope;
            if (op == unary_op::silu) {
                const double s = 1.0 / (1.0 + std::exp(-v));
                slope = s * (1.0 + v * (1.0 - s));
            } else {
                slope = relu_only(op, v) > 0 ? 1.0 : 0.0;
            }
            dx[i] = static_cast<float>(dy[i] * slope);
        }
    }

    static void binary_forward(context&, binary_op op, const binary_desc& d, cp a, cp b, p y) {
        for_each_index(d.rank, d.shape, [&](index_t i, const index_t* idx) {
            y[i] = static_cast<float>(apply(op, a[dot(d.rank, idx, d.a_strides)], b[dot(d.rank, idx, d.b_strides)]));
        });
    }
    static void binary_backward(context&, binary_op op, const binary_desc& d, cp a, cp b, cp dy, p da, p db) {
        // Broadcast operands receive sums, so start from zero and accumulate.
        const index_t na = span_of(d.rank, d.shape, d.a_strides), nb = span_of(d.rank, d.shape, d.b_strides);
        if (da) for (index_t i = 0; i < na; ++i) da[i] = 0.0f;
        if (db) for (index_t i = 0; i < nb; ++i) db[i] = 0.0f;
        for_each_index(d.rank, d.shape, [&](index_t i, const index_t* idx) {
            const index_t ia = dot(d.rank, idx, d.a_strides), ib = dot(d.rank, idx, d.b_strides);
            const double av = a[ia], bv = b[ib], g = dy[i];
            double pa = 1, pb = 1;
            switch (op) {
                case binary_op::add: break;
                case binary_op::sub: pb = -1; break;
                case binary_op::mul: pa = bv; pb = av; break;
                case binary_op::div: pa = 1 / bv; pb = -av / (bv * bv); break;
                case binary_op::maximum: pa = av >= bv ? 1 : 0; pb = 1 - pa; break;
                case binary_op::minimum: pa = av <= bv ? 1 : 0; pb = 1 - pa; break;
            }
            if (da) da[ia] = static_cast<float>(da[ia] + g * pa);
            if (db) db[ib] = static_cast<float>(db[ib] + g * pb);
        });
    }

    static void reduce_forward(context&, const reduce_desc& d, cp x, p y) {
        const auto out_strides = reduced_strides(d);
        const index_t count = reduced_count(d), n_out = out_numel(d);
        for (index_t o = 0; o < n_out; ++o) y[o] = 0.0f;
        for_each_index(d.rank, d.shape, [&](index_t i, const index_t* idx) {
            const index_t o = dot(d.rank, idx, out_strides);
            y[o] = y[o] + x[i];
        });
        if (d.mean && count)
            for (index_t o = 0; o < n_out; ++o) y[o] = y[o] / static_cast<float>(count);
    }
    static void reduce_backward(context&, const reduce_desc& d, cp dy, p dx) {
        const auto out_strides = reduced_strides(d);
        const index_t count = reduced_count(d);
        const float scale = d.mean && count ? 1.0f / static_cast<float>(count) : 1.0f;
        for_each_index(d.rank, d.shape, [&](index_t i, const index_t* idx) { dx[i] = dy[dot(d.rank, idx, out_strides)] * scale; });
    }

    static void strided_copy(context&, const strided_copy_desc& d, cp src, p dst, bool accumulate) {
        for_each_index(d.rank, d.shape, [&](index_t, const index_t* idx) {
            float& out = dst[dot(d.rank, idx, d.dst_strides)];
            const float in = src[dot(d.rank, idx, d.src_strides)];
            out = accumulate ? out + in : in;
        });
    }

    static void axpby(context&, std::size_t n, double alpha, cp x, double beta, p y) {
        for (index_t i = 0; i < static_cast<index_t>(n); ++i)
            y[i] = static_cast<float>(alpha * x[i] + (beta == 0.0 ? 0.0 : beta * y[i]));
    }

    // Same counter-based streams as every backend, so results agree bit for bit.
    static void random_uniform(context&, std::uint64_t seed, std::uint64_t offset, std::size_t n, p y) {
        for (std::size_t i = 0; i < n; ++i) y[static_cast<index_t>(i)] = philox::uniform(seed, offset + i);
    }
    static void random_normal(context&, std::uint64_t seed, std::uint64_t offset, std::size_t n, p y) {
        for (std::size_t i = 0; i < n; ++i) y[static_cast<index_t>(i)] = static_cast<float>(philox::normal(seed, offset + i));
    }

    // ---- not offered ------------------------------------------------------------------

    [[noreturn]] static void unsupported(const char* what) { throw unsupported_error("minimal", std::string(what) + " is not implemented"); }
    static void conv2d_forward(context&, const conv2d_desc&, cp, cp, cp, p) { unsupported("conv2d"); }
    static void conv2d_backward_data(context&, const conv2d_desc&, cp, cp, p) { unsupported("conv2d"); }
    static void conv2d_backward_weight(context&, const conv2d_desc&, cp, cp, p, p) { unsupported("conv2d"); }
    static void group_norm_forward(context&, const group_norm_desc&, cp, cp, cp, p, p, p) { unsupported("group_norm"); }
    static void group_norm_backward(context&, const group_norm_desc&, cp, cp, cp, cp, cp, p, p, p) { unsupported("group_norm"); }
    static void layer_norm_forward(context&, const layer_norm_desc&, cp, cp, cp, p, p, p) { unsupported("layer_norm"); }
    static void layer_norm_backward(context&, const layer_norm_desc&, cp, cp, cp, cp, cp, p, p, p) { unsupported("layer_norm"); }
    static void geglu_forward(context&, const geglu_desc&, cp, p) { unsupported("geglu"); }
    static void geglu_backward(context&, const geglu_desc&, cp, cp, p) { unsupported("geglu"); }
    static void upsample_nearest_forward(context&, const upsample_desc&, cp, p) { unsupported("upsample_nearest"); }
    static void upsample_nearest_backward(context&, const upsample_desc&, cp, p) { unsupported("upsample_nearest"); }

private:
    static double relu_only(unary_op op, double v) {
        if (op != unary_op::relu) unsupported("this unary op");
        return v > 0 ? v : 0;
    }
    static double apply(binary_op op, double a, double b) {
        switch (op) {
            case binary_op::add: return a + b;
            case binary_op::sub: return a - b;
            case binary_op::mul: return a * b;
            case binary_op::div: return a / b;
            case binary_op::maximum: return a >= b ? a : b;
            case binary_op::minimum: return a <= b ? a : b;
        }
        return 0;
    }

    using extents = std::array<index_t, max_rank>;

    static index_t dot(int rank, const index_t* idx, const extents& strides) {
        index_t off = 0;
        for (int i = 0; i < rank; ++i) off += idx[i] * strides[static_cast<std::size_t>(i)];
        return off;
    }
    // Calls f(linear, index) for every index of `shape` in row-major order.
    template <class F>
    static void for_each_index(int rank, const extents& shape, F&& f) {
        index_t total = 1;
        for (int i = 0; i < rank; ++i) total *= shape[static_cast<std::size_t>(i)];
        extents idx{};
        for (index_t linear = 0; linear < total; ++linear) {
            f(linear, idx.data());
            for (int i = rank - 1; i >= 0; --i) {
                if (++idx[static_cast<std::size_t>(i)] < shape[static_cast<std::size_t>(i)]) break;
                idx[static_cast<std::size_t>(i)] = 0;
            }
        }
    }
    // Elements of a contiguous operand read through broadcast strides.
    static index_t span_of(int rank, const extents& shape, const extents& strides) {
        index_t n = 1;
        for (int i = 0; i < rank; ++i)
            if (strides[static_cast<std::size_t>(i)] != 0) n *= shape[static_cast<std::size_t>(i)];
        return n;
    }
    // Strides of the keepdims output, 0 along reduced axes.
    static extents reduced_strides(const reduce_desc& d) {
        extents s{};
        index_t running = 1;
        for (int i = d.rank - 1; i >= 0; --i) {
            const auto a = static_cast<std::size_t>(i);
            s[a] = d.reduce[a] ? 0 : running;
            if (!d.reduce[a]) running *= d.shape[a];
        }
        return s;
    }
    static index_t reduced_count(const reduce_desc& d) {
        index_t n = 1;
        for (int i = 0; i < d.rank; ++i)
            if (d.reduce[static_cast<std::size_t>(i)]) n *= d.shape[static_cast<std::size_t>(i)];
        return n;
    }
    static index_t out_numel(const reduce_desc& d) {
        index_t n = 1;
        for (int i = 0; i < d.rank; ++i)
            if (!d.reduce[static_cast<std::size_t>(i)]) n *= d.shape[static_cast<std::size_t>(i)];
        return n;
    }
};

}  // namespace dynamicid::testing

template <>
inline constexpr bool dynamicid::enable_backend<dynamicid::testing::minimal_backend> = true;
static_assert(dynamicid::backend<dynamicid::testing::minimal_backend>);
static_assert(!dynamicid::supports_element<dynamicid::testing::minimal_backend, double>,
              "the minimal backend computes in f32 only, so the matrix runs its f32 paths");
