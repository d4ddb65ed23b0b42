// dynamicid ops: counter-based random tensors (same numbers on every backend).
#pragma once

#include <dynamicid/ops/common.hpp>

namespace dynamicid::ops {

/// Standard normal tensor; element i is philox::normal(seed, offset + i).
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> randn(context_t<B>& ctx, const shape& s, std::uint64_t seed, std::uint64_t offset = 0) {
    auto y = tensor<B, T>::empty(ctx, s);
    B::random_normal(ctx, seed, offset, static_cast<std::size_t>(s.numel()), y.data());
    return y;
}

/// Uniform (0, 1] tensor; element i is philox::uniform(seed, offset + i).
template <class B, class T>
    requires computes_in<B, T>
tensor<B, T> rand(context_t<B>& ctx, const shape& s, std::uint64_t seed, std::uint64_t offset = 0) {
    auto y = tensor<B, T>::empty(ctx, s);
    B::random_uniform(ctx, seed, offset, static_cast<std::size_t>(s.numel()), y.data());
    return y;
}

}  // namespace dynamicid::ops
