// dynamicid cpu backend, internal: GEMM on Eigen, split across the context's threads.
#pragma once

#ifndef EIGEN_DONT_PARALLELIZE
#define EIGEN_DONT_PARALLELIZE  // threads are ours (per context), not Eigen's global setting
#endif
#include <Eigen/Core>

#include <dynamicid/backends/cpu/detail/parallel.hpp>
#include <dynamicid/core/descriptors.hpp>
#include <dynamicid/core/dtype.hpp>

#include <type_traits>
#include <vector>

namespace dynamicid::cpu::detail {

template <class S>
using row_matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using const_map = Eigen::Map<const row_matrix<S>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class S>
using mut_map = Eigen::Map<row_matrix<S>, Eigen::Unaligned, Eigen::OuterStride<>>;

// C rows [r0, r1) of one batch entry, in a compute type S that Eigen handles natively.
template <class S>
void gemm_rows(const gemm_desc& d, const S* a, const S* b, S* c, index_t r0, index_t r1) {
    if (r1 <= r0) return;
    const index_t rows = r1 - r0;
    mut_map<S> cm(c + r0 * d.ldc, rows, d.n, Eigen::OuterStride<>(d.ldc));
    const S alpha = static_cast<S>(d.alpha), beta = static_cast<S>(d.beta);
    auto run = [&](const auto& op_a) {
        auto product = [&](const auto& op_b) {
            if (d.beta == 0.0) {
                cm.noalias() = alpha * (op_a * op_b);
            } else {
                if (d.beta != 1.0) cm *= beta;
                cm.noalias() += alpha * (op_a * op_b);
            }
        };
        if (d.trans_b) product(const_map<S>(b, d.n, d.k, Eigen::OuterStride<>(d.ldb)).transpose());
        else product(const_map<S>(b, d.k, d.n, Eigen::OuterStride<>(d.ldb)));
    };
    if (d.trans_a) run(const_map<S>(a + r0, d.k, rows, Eigen::OuterStride<>(d.lda)).transpose());
    else run(const_map<S>(a + r0 * d.lda, rows, d.k, Eigen::OuterStride<>(d.lda)));
}

// Batched GEMM in a native compute type: parallel over batch entries when there
// are enough, else over row blocks of C.
template <class S>
void gemm_native(int threads, const gemm_desc& d, const S* a, const S* b, S* c) {
    if (d.m == 0 || d.n == 0) return;
    if (d.k == 0) {  // C = beta C
        for (index_t bi = 0; bi < d.batch; ++bi)
            for (index_t i = 0; i < d.m; ++i)
                for (index_t j = 0; j < d.n; ++j) {
                    S& v = c[bi * d.stride_c + i * d.ldc + j];
                    v = d.beta == 0.0 ? S(0) : static_cast<S>(d.beta) * v;
                }
        return;
    }
    const double work = static_cast<double>(d.m) * d.n * d.k;
    const int t = work * d.batch < 32768.0 ? 1 : threads;
    if (d.batch >= t) {
        parallel_for(t, d.batch, 1, [&](index_t b0, index_t b1) {
            for (index_t bi = b0; bi < b1; ++bi)
                gemm_rows(d, a + bi * d.stride_a, b + bi * d.stride_b, c + bi * d.stride_c, 0, d.m);
        });
        return;
    }
    for (index_t bi = 0; bi < d.batch; ++bi) {
        const S* ab = a + bi * d.stride_a;
        const S* bb = b + bi * d.stride_b;
        S* cb = c + bi * d.stride_c;
        parallel_for(t, d.m, 16, [&](index_t r0, index_t r1) { gemm_rows(d, ab, bb, cb, r0, r1); });
    }
}

// Storage types (f16, bf16) are widened to float per batch entry, multiplied, and narrowed.
template <class T>
void gemm(int threads, const gemm_desc& d, const T* a, const T* b, T* c) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        gemm_native<T>(threads, d, a, b, c);
    } else {
        const index_t a_rows = d.trans_a ? d.k : d.m, a_cols = d.trans_a ? d.m : d.k;
        const index_t b_rows = d.trans_b ? d.n : d.k, b_cols = d.trans_b ? d.k : d.n;
        std::vector<float> af(static_cast<std::size_t>(a_rows * a_cols)), bf(static_cast<std::size_t>(b_rows * b_cols)),
            cf(static_cast<std::size_t>(d.m * d.n));
        gemm_desc dense = d;
        dense.batch = 1;
        dense.lda = a_cols;
        dense.ldb = b_cols;
        dense.ldc = d.n;
        for (index_t bi = 0; bi < d.batch; ++bi) {
            const T* ab = a + bi * d.stride_a;
            const T* bb = b + bi * d.stride_b;
            T* cb = c + bi * d.stride_c;
            for (index_t i = 0; i < a_rows; ++i)
                for (index_t j = 0; j < a_cols; ++j) af[static_cast<std::size_t>(i * a_cols + j)] = static_cast<float>(ab[i * d.lda + j]);
            for (index_t i = 0; i < b_rows; ++i)
                for (index_t j = 0; j < b_cols; ++j) bf[static_cast<std::size_t>(i * b_cols + j)] = static_cast<float>(bb[i * d.ldb + j]);
            if (d.beta != 0.0)
                for (index_t i = 0; i < d.m; ++i)
                    for (index_t j = 0; j < d.n; ++j) cf[static_cast<std::size_t>(i * d.n + j)] = static_cast<float>(cb[i * d.ldc + j]);
            gemm_native<float>(threads, dense, af.data(), bf.data(), cf.data());
            for (index_t i = 0; i < d.m; ++i)
                for (index_t j = 0; j < d.n; ++j) cb[i * d.ldc + j] = T(cf[static_cast<std::size_t>(i * d.n + j)]);
        }
    }
}

}  // namespace dynamicid::cpu::detail
