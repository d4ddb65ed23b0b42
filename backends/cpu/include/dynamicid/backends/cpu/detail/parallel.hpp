// dynamicid cpu backend, internal: a parallel loop bounded by the context's thread count.
#pragma once

#include <dynamicid/core/config.hpp>

#include <algorithm>
#include <exception>
#include <mutex>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace dynamicid::cpu::detail {

// Runs body(begin, end) over [0, n) split into at most `threads` contiguous
// chunks. Exceptions thrown by a chunk are rethrown on the calling thread
// (OpenMP would otherwise terminate the process).
template <class Body>
void parallel_for(int threads, index_t n, index_t min_chunk, Body&& body) {
    if (n <= 0) return;
    const index_t max_chunks = std::max<index_t>(1, n / std::max<index_t>(1, min_chunk));
    const int chunks = static_cast<int>(std::min<index_t>(std::max(threads, 1), max_chunks));
#if defined(_OPENMP)
    if (chunks > 1 && !omp_in_parallel()) {
        std::exception_ptr failure;
        std::mutex guard;
#pragma omp parallel for num_threads(chunks) schedule(static, 1)
        for (int c = 0; c < chunks; ++c) {
            try {
                const index_t begin = n * c / chunks, end = n * (c + 1) / chunks;
                body(begin, end);
            } catch (...) {
                std::lock_guard lock(guard);
                if (!failure) failure = std::current_exception();
            }
        }
        if (failure) std::rethrow_exception(failure);
        return;
    }
#endif
    body(index_t{0}, n);
}

}  // namespace dynamicid::cpu::detail
