// dynamicid test matrix: permute, slice and concat (all lowered to strided_copy).
#pragma once

#include <matrix/common.hpp>

namespace dynamicid::matrix {

/// Permutations (negative axes included): forward against index arithmetic,
/// backward (the inverse permutation) by gradcheck.
template <class B>
void test_permute() {
    context_t<B> ctx{};
    const shape s{2, 3, 4, 2};
    const std::vector<std::vector<int>> perms{{0, 2, 1, 3}, {3, 1, 0, 2}, {-1, 0, 1, 2}, {0, 1, 2, 3}};
    std::uint64_t seed = 2100;
    for (const auto& perm : perms) {
        std::string label = "permute {";
        for (int p : perm) label += std::to_string(p) + ",";
        label += "}";
        const auto x = host_normal(static_cast<std::size_t>(s.numel()), ++seed);
        const auto y = ops::permute(ctx, testing::upload<B, float>(ctx, s, x), perm);
        std::vector<index_t> dims;
        for (int p : perm) dims.push_back(s[p]);
        REQUIRE(y.shape() == shape(dims));
        std::vector<double> want(x.size());
        for (index_t i = 0; i < y.numel(); ++i) {
            const auto out_idx = unravel(i, y.shape());
            std::vector<index_t> in_idx(4);
            for (std::size_t a = 0; a < 4; ++a) in_idx[static_cast<std::size_t>(s.normalise(perm[a]))] = out_idx[a];
            want[static_cast<std::size_t>(i)] = x[broadcast_index(in_idx, s)];
        }
        check_close(label + " forward", testing::download(ctx, y), want, 0, 0);
        check_gradients<B>(
            label, {{s}}, [=](auto& c, const auto& in) { return ops::permute(c, in[0], perm); },
            [=](auto& c, const auto& in, const auto& dy) {
                const auto saved = ops::permute_forward(c, in[0], perm).second;
                return grads_of(dy, ops::permute_backward(c, saved, dy));
            },
            ++seed);
    }
}

/// Slices along the first, a middle and the last (negative) axis.
template <class B>
void test_slice() {
    context_t<B> ctx{};
    const shape s{3, 5, 4};
    struct config {
        int axis;
        index_t start, length;
    };
    std::uint64_t seed = 2200;
    for (const auto& c : {config{0, 1, 2}, config{1, 1, 3}, config{-1, 2, 2}, config{1, 0, 5}}) {
        const std::string label = "slice axis " + std::to_string(c.axis) + " [" + std::to_string(c.start) + ", +" +
                                  std::to_string(c.length) + ")";
        const auto x = host_normal(static_cast<std::size_t>(s.numel()), ++seed);
        const auto y = ops::slice(ctx, testing::upload<B, float>(ctx, s, x), c.axis, c.start, c.length);
        const int axis = s.normalise(c.axis);
        std::vector<double> want(static_cast<std::size_t>(y.numel()));
        for (index_t i = 0; i < y.numel(); ++i) {
            auto idx = unravel(i, y.shape());
            idx[static_cast<std::size_t>(axis)] += c.start;
            want[static_cast<std::size_t>(i)] = x[broadcast_index(idx, s)];
        }
        check_close(label + " forward", testing::download(ctx, y), want, 0, 0);
        check_gradients<B>(
            label, {{s}}, [=](auto& ctx2, const auto& in) { return ops::slice(ctx2, in[0], c.axis, c.start, c.length); },
            [=](auto& ctx2, const auto& in, const auto& dy) {
                const auto saved = ops::slice_forward(ctx2, in[0], c.axis, c.start, c.length).second;
                return grads_of(dy, ops::slice_backward(ctx2, saved, dy));
            },
            ++seed);
    }
}

/// Concatenation of three parts along a middle axis, the first and the last.
template <class B>
void test_concat() {
    context_t<B> ctx{};
    struct config {
        int axis;
        shape a, b, c;
    };
    const config configs[] = {{1, {2, 1, 3}, {2, 3, 3}, {2, 2, 3}},
                              {0, {1, 2, 2}, {2, 2, 2}, {1, 2, 2}},
                              {-1, {2, 3, 1}, {2, 3, 2}, {2, 3, 3}}};
    std::uint64_t seed = 2300;
    for (const auto& c : configs) {
        const std::string label = "concat axis " + std::to_string(c.axis) + " of " + c.a.str() + ", " + c.b.str() + ", " + c.c.str();
        const int axis = c.a.normalise(c.axis);
        const auto xa = host_normal(static_cast<std::size_t>(c.a.numel()), ++seed);
        const auto xb = host_normal(static_cast<std::size_t>(c.b.numel()), ++seed);
        const auto xc = host_normal(static_cast<std::size_t>(c.c.numel()), ++seed);
        const auto y = ops::concat(ctx,
                                   std::vector{testing::upload<B, float>(ctx, c.a, xa), testing::upload<B, float>(ctx, c.b, xb),
                                               testing::upload<B, float>(ctx, c.c, xc)},
                                   c.axis);
        std::vector<double> want(static_cast<std::size_t>(y.numel()));
        for (index_t i = 0; i < y.numel(); ++i) {
            auto idx = unravel(i, y.shape());
            index_t& at = idx[static_cast<std::size_t>(axis)];
            if (at < c.a[axis]) {
                want[static_cast<std::size_t>(i)] = xa[broadcast_index(idx, c.a)];
            } else if ((at -= c.a[axis]) < c.b[axis]) {
                want[static_cast<std::size_t>(i)] = xb[broadcast_index(idx, c.b)];
            } else {
                at -= c.b[axis];
                want[static_cast<std::size_t>(i)] = xc[broadcast_index(idx, c.c)];
            }
        }
        check_close(label + " forward", testing::download(ctx, y), want, 0, 0);
        const int requested = c.axis;
        check_gradients<B>(
            label, {{c.a}, {c.b}, {c.c}},
            [=](auto& ctx2, const auto& in) { return ops::concat(ctx2, in, requested); },
            [=](auto& ctx2, const auto& in, const auto& dy) {
                const auto saved = ops::concat_forward(ctx2, in, requested).second;
                return ops::concat_backward(ctx2, saved, dy);
            },
            ++seed);
    }
}

}  // namespace dynamicid::matrix
