// dynamicid test matrix: f16/bf16 forward accuracy and the shared random streams.
#pragma once

#include <matrix/common.hpp>

namespace dynamicid::matrix {

namespace detail {

// Runs `op` on inputs stored in H and on the same (already H-rounded) values
// in f32; the results must agree within `rel` * (1 + |f32 result|). The f32
// run sees identical inputs, so the bound measures only H's rounding of
// outputs and intermediates: ~1e-2 for f16 (11-bit significand) and ~3e-2 for
// bf16 (8 bits) leave room for a few roundings on values of order one.
template <class B, class H, class Op>
void compare_low_precision(const std::string& label, const std::vector<shape>& shapes, double rel, Op op, std::uint64_t seed) {
    context_t<B> ctx{};
    std::vector<tensor<B, H>> low;
    std::vector<tensor<B, float>> wide;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
        const auto values = testing::round_to<H>(host_normal(static_cast<std::size_t>(shapes[i].numel()), seed + i));
        low.push_back(testing::upload<B, H>(ctx, shapes[i], values));
        wide.push_back(testing::upload<B, float>(ctx, shapes[i], values));
    }
    check_close(label, testing::download(ctx, op(ctx, low)), testing::download(ctx, op(ctx, wide)), rel, rel);
}

template <class B, class H>
void low_precision_forward(const char* type_name, double rel) {
    const std::string t = std::string(" in ") + type_name;
    compare_low_precision<B, H>("matmul" + t, {{2, 3, 8}, {8, 5}}, rel,
                                [](auto& c, const auto& in) { return ops::matmul(c, in[0], in[1]); }, 2401);
    compare_low_precision<B, H>("matmul transposed, batched" + t, {{2, 8, 3}, {2, 5, 8}}, rel,
                                [](auto& c, const auto& in) { return ops::matmul(c, in[0], in[1], true, true); }, 2411);
    compare_low_precision<B, H>("linear" + t, {{4, 6}, {3, 6}, {3}}, rel,
                                [](auto& c, const auto& in) { return ops::linear(c, in[0], in[1], &in[2]); }, 2421);
    compare_low_precision<B, H>("conv2d groups 2 stride 2" + t, {{1, 4, 7, 6}, {6, 2, 3, 3}, {6}}, rel,
                                [](auto& c, const auto& in) {
                                    return ops::conv2d(c, in[0], in[1], &in[2], {.stride = 2, .padding = 1, .groups = 2});
                                },
                                2431);
    compare_low_precision<B, H>("softmax" + t, {{4, 9}}, rel, [](auto& c, const auto& in) { return ops::softmax(c, in[0]); }, 2441);
    compare_low_precision<B, H>("silu" + t, {{3, 7}}, rel, [](auto& c, const auto& in) { return ops::silu(c, in[0]); }, 2451);
    compare_low_precision<B, H>("gelu" + t, {{3, 7}}, rel, [](auto& c, const auto& in) { return ops::gelu(c, in[0]); }, 2461);
    compare_low_precision<B, H>("layer_norm" + t, {{3, 8}, {8}, {8}}, rel,
                                [](auto& c, const auto& in) { return ops::layer_norm(c, in[0], &in[1], &in[2]); }, 2471);
    compare_low_precision<B, H>("group_norm" + t, {{2, 4, 3, 3}, {4}, {4}}, rel,
                                [](auto& c, const auto& in) { return ops::group_norm(c, in[0], 2, &in[1], &in[2]); }, 2481);
    compare_low_precision<B, H>("mul broadcast" + t, {{2, 3, 4}, {3, 1}}, rel,
                                [](auto& c, const auto& in) { return ops::mul(c, in[0], in[1]); }, 2491);
    compare_low_precision<B, H>("mean" + t, {{2, 3, 4}}, rel, [](auto& c, const auto& in) { return ops::mean(c, in[0], {1, 2}); },
                                2501);
}

}  // namespace detail

/// f16 forward results against f32 on identical inputs (tolerance 1e-2 relative).
template <class B>
void test_half_forward() {
    if constexpr (supports_element<B, half>) {
        detail::low_precision_forward<B, half>("f16", 1e-2);
    } else {
        WARN(B::name() << " has no f16 arithmetic; f16 forward checks skipped");
    }
}

/// bf16 forward results against f32 on identical inputs (tolerance 3e-2 relative).
template <class B>
void test_bfloat16_forward() {
    if constexpr (supports_element<B, bfloat16>) {
        detail::low_precision_forward<B, bfloat16>("bf16", 3e-2);
    } else {
        WARN(B::name() << " has no bf16 arithmetic; bf16 forward checks skipped");
    }
}

/// randn and rand on B are the library's Philox streams, element for element:
/// element i of (seed, offset) is philox::normal / philox::uniform(seed, offset + i).
template <class B>
void test_random_streams() {
    context_t<B> ctx{};
    const std::uint64_t seed = 0x1234'5678'9abcull;
    for (std::uint64_t offset : {0ull, 3ull, 1000ull}) {
        const auto normal = ops::randn<B, float>(ctx, {7, 3}, seed, offset).to_host(ctx);
        const auto uniform = ops::rand<B, float>(ctx, {7, 3}, seed, offset).to_host(ctx);
        for (std::size_t i = 0; i < normal.size(); ++i) {
            INFO("offset " << offset << ", element " << i);
            CHECK(normal[i] == static_cast<float>(philox::normal(seed, offset + i)));
            CHECK(uniform[i] == philox::uniform(seed, offset + i));
        }
    }
    if constexpr (supports_element<B, double>) {
        const auto normal = ops::randn<B, double>(ctx, {11}, seed, 5).to_host(ctx);
        for (std::size_t i = 0; i < normal.size(); ++i) CHECK(normal[i] == philox::normal(seed, 5 + i));
    }
}

}  // namespace dynamicid::matrix
