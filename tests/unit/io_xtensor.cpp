#include <dynamicid/backends/cpu/xtensor.hpp>

#include <catch2/catch.hpp>

#include <xtensor/xarray.hpp>
#include <xtensor/xbuilder.hpp>
#include <xtensor/xtensor.hpp>
#include <xtensor/xview.hpp>

#include <vector>

using cpu = dynamicid::cpu_backend;
using ftensor = dynamicid::tensor<cpu, float>;

namespace {
// A host-looking backend that does not promise host memory: host_view must not
// be offered for it even though its pointers are raw T*.
struct not_host_backend : cpu {};

template <class X>
concept has_host_view = requires(const X& x) { dynamicid::host_view(x); };
}  // namespace

template <>
inline constexpr bool dynamicid::enable_backend<not_host_backend> = true;

TEST_CASE("xtensor round trip through a tensor", "[xtensor]") {
    cpu::context ctx{.threads = 1};
    const xt::xarray<float> a = {{1.0f, 2.0f, 3.0f}, {4.0f, 5.0f, 6.0f}};
    const auto t = dynamicid::from_xtensor<cpu>(ctx, a);
    CHECK(t.shape() == dynamicid::shape{2, 3});
    CHECK(t.to_host(ctx) == std::vector<float>{1, 2, 3, 4, 5, 6});
    const xt::xarray<float> back = dynamicid::to_xtensor(ctx, t);
    CHECK((back == a));

    // Lazy expressions are evaluated; column-major and strided sources are
    // copied in row-major order.
    const auto doubled = dynamicid::from_xtensor<cpu>(ctx, a * 2.0f);
    CHECK(doubled.to_host(ctx) == std::vector<float>{2, 4, 6, 8, 10, 12});
    xt::xarray<float, xt::layout_type::column_major> cm = a;
    CHECK(dynamicid::from_xtensor<cpu>(ctx, cm).to_host(ctx) == std::vector<float>{1, 2, 3, 4, 5, 6});
    const auto column = dynamicid::from_xtensor<cpu>(ctx, xt::view(a, xt::all(), 1));
    CHECK(column.shape() == dynamicid::shape{2});
    CHECK(column.to_host(ctx) == std::vector<float>{2, 5});

    // Other element types, rank 0 and empty arrays.
    const xt::xtensor<double, 1> d = {0.5, -1.5};
    const auto td = dynamicid::from_xtensor<cpu>(ctx, d);
    static_assert(std::is_same_v<decltype(td), const dynamicid::tensor<cpu, double>>);
    CHECK((dynamicid::to_xtensor(ctx, td) == xt::xarray<double>{0.5, -1.5}));
    const xt::xarray<float> scalar = 3.0f;
    const auto ts = dynamicid::from_xtensor<cpu>(ctx, scalar);
    CHECK(ts.rank() == 0);
    CHECK(dynamicid::to_xtensor(ctx, ts)() == 3.0f);
    const xt::xarray<float> empty = xt::zeros<float>({0, 4});
    const auto te = dynamicid::from_xtensor<cpu>(ctx, empty);
    CHECK(te.shape() == dynamicid::shape{0, 4});
    CHECK(dynamicid::to_xtensor(ctx, te).shape() == std::vector<std::size_t>{0, 4});
}

TEST_CASE("xtensor host_view aliases the tensor's storage", "[xtensor]") {
    cpu::context ctx{.threads = 1};
    const auto t = ftensor::from_host(ctx, {2, 2}, std::vector<float>{1, 2, 3, 4});
    const auto v = dynamicid::host_view(t);
    CHECK(v.shape() == std::vector<std::size_t>{2, 2});
    CHECK(v(1, 0) == 3.0f);
    CHECK(v.data() == t.data());
    t.data()[3] = 42.0f;  // a write to the storage is visible through the view
    CHECK(v(1, 1) == 42.0f);

    // A leading slice views the slice's storage, not the whole buffer.
    const auto row = t.narrow_leading(1, 1);
    const auto rv = dynamicid::host_view(row);
    CHECK(rv.data() == t.data() + 2);
    CHECK(rv(0, 1) == 42.0f);

    static_assert(dynamicid::host_addressable<cpu, float>);
    static_assert(dynamicid::backend<not_host_backend>);
    static_assert(!dynamicid::host_addressable<not_host_backend, float>);
    static_assert(has_host_view<ftensor>);
    static_assert(!has_host_view<dynamicid::tensor<not_host_backend, float>>);
}

TEST_CASE("xtensor shape mismatches raise shape_error", "[xtensor]") {
    cpu::context ctx{.threads = 1};
    const xt::xarray<float> a = xt::ones<float>({2, 3});
    CHECK(dynamicid::from_xtensor<cpu>(ctx, a, {2, 3}).numel() == 6);
    CHECK_THROWS_AS(dynamicid::from_xtensor<cpu>(ctx, a, {3, 2}), dynamicid::shape_error);
    CHECK_THROWS_WITH(dynamicid::from_xtensor<cpu>(ctx, a, {6}), Catch::StartsWith("[xtensor]"));
    const xt::xarray<float> too_deep = xt::zeros<float>({1, 1, 1, 1, 1, 1, 1, 1, 1});
    CHECK_THROWS_AS(dynamicid::from_xtensor<cpu>(ctx, too_deep), dynamicid::shape_error);
}
