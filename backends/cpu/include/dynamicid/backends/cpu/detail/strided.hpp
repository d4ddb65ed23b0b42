// dynamicid cpu backend, internal: walking an N-d index space with strides.
#pragma once

#include <dynamicid/core/config.hpp>

#include <array>

namespace dynamicid::cpu::detail {

using extents = std::array<index_t, max_rank>;

// Offset of linear index `linear` (row-major over `shape`) under `strides`.
inline index_t offset_of(index_t linear, int rank, const extents& shape, const extents& strides) {
    index_t offset = 0;
    for (int d = rank - 1; d >= 0; --d) {
        const auto i = static_cast<std::size_t>(d);
        const index_t extent = shape[i];
        if (extent == 0) return 0;
        offset += (linear % extent) * strides[i];
        linear /= extent;
    }
    return offset;
}

// Calls f(linear, off_a, off_b) for linear in [begin, end), keeping two sets of
// offsets up to date incrementally (no division per element).
template <class F>
void walk2(index_t begin, index_t end, int rank, const extents& shape, const extents& sa, const extents& sb, F&& f) {
    if (begin >= end) return;
    extents idx{};
    index_t rest = begin;
    for (int d = rank - 1; d >= 0; --d) {
        const auto i = static_cast<std::size_t>(d);
        idx[i] = rest % shape[i];
        rest /= shape[i];
    }
    index_t oa = offset_of(begin, rank, shape, sa), ob = offset_of(begin, rank, shape, sb);
    for (index_t linear = begin; linear < end; ++linear) {
        f(linear, oa, ob);
        for (int d = rank - 1; d >= 0; --d) {
            const auto i = static_cast<std::size_t>(d);
            ++idx[i];
            oa += sa[i];
            ob += sb[i];
            if (idx[i] < shape[i]) break;
            oa -= sa[i] * shape[i];
            ob -= sb[i] * shape[i];
            idx[i] = 0;
        }
    }
}

inline index_t numel_of(int rank, const extents& shape) {
    index_t n = 1;
    for (int d = 0; d < rank; ++d) n *= shape[static_cast<std::size_t>(d)];
    return n;
}

// True when some axis of extent > 1 has stride 0 (several indices share a slot).
inline bool has_broadcast(int rank, const extents& shape, const extents& strides) {
    for (int d = 0; d < rank; ++d) {
        const auto i = static_cast<std::size_t>(d);
        if (shape[i] > 1 && strides[i] == 0) return true;
    }
    return false;
}

// Element count of a contiguous operand read through broadcast strides.
inline index_t operand_numel(int rank, const extents& shape, const extents& strides) {
    index_t n = 1;
    for (int d = 0; d < rank; ++d) {
        const auto i = static_cast<std::size_t>(d);
        if (strides[i] != 0) n *= shape[i];
    }
    return n;
}

}  // namespace dynamicid::cpu::detail
