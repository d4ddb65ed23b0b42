// dynamicid test matrix: what the bodies share.
//
// Every body is `template <class B> void test_xxx()` and runs unchanged on any
// backend B; tests/unit/matrix_<backend>.cpp stamps one TEST_CASE per body.
#pragma once

#include <support/gradcheck.hpp>

#include <dynamicid/core/philox.hpp>
#include <dynamicid/ops.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace dynamicid::matrix {

using testing::check_close;
using testing::check_gradients;
using testing::grads_of;
using testing::operand;

/// `n` N(0, 1) values from stream `seed`, rounded to f32 so host and device agree.
inline std::vector<double> host_normal(std::size_t n, std::uint64_t seed) {
    std::vector<double> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(philox::normal(seed, i));
    return v;
}

/// Row-major linear index of `idx` in a contiguous tensor of `dims`, reading
/// axes of extent 1 as broadcast (numpy rules, aligned at the right).
inline std::size_t broadcast_index(const std::vector<index_t>& idx, const shape& dims) {
    const int offset = static_cast<int>(idx.size()) - dims.rank();
    std::size_t linear = 0;
    for (int a = 0; a < dims.rank(); ++a) {
        const index_t i = dims[a] == 1 ? 0 : idx[static_cast<std::size_t>(a + offset)];
        linear = linear * static_cast<std::size_t>(dims[a]) + static_cast<std::size_t>(i);
    }
    return linear;
}

/// The multi-index of row-major position `linear` in `dims`.
inline std::vector<index_t> unravel(index_t linear, const shape& dims) {
    std::vector<index_t> idx(static_cast<std::size_t>(dims.rank()));
    for (int a = dims.rank() - 1; a >= 0; --a) {
        idx[static_cast<std::size_t>(a)] = linear % dims[a];
        linear /= dims[a];
    }
    return idx;
}

}  // namespace dynamicid::matrix
