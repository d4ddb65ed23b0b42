// The test matrix on the minimal backend (tests/support/minimal_backend.hpp):
// the bodies its f32 primitives can run. Each gradient check runs in f32 with
// loose tolerances and is compared element by element with the CPU backend.
#include <matrix/all.hpp>
#include <support/minimal_backend.hpp>

#define DYNAMICID_MINIMAL_CASE(body, what) \
    TEST_CASE("minimal: " what, "[matrix][minimal]") { dynamicid::matrix::body<dynamicid::testing::minimal_backend>(); }

DYNAMICID_MINIMAL_CASE(test_gemm_forward, "gemm forward")
DYNAMICID_MINIMAL_CASE(test_matmul_forward, "matmul forward")
DYNAMICID_MINIMAL_CASE(test_matmul_backward, "matmul backward")
DYNAMICID_MINIMAL_CASE(test_linear_backward, "linear backward")
DYNAMICID_MINIMAL_CASE(test_linear_needs, "linear needs")
DYNAMICID_MINIMAL_CASE(test_attention_forward, "attention forward")
DYNAMICID_MINIMAL_CASE(test_attention_backward, "attention backward")
DYNAMICID_MINIMAL_CASE(test_softmax_forward, "softmax forward")
DYNAMICID_MINIMAL_CASE(test_softmax_backward, "softmax backward")
DYNAMICID_MINIMAL_CASE(test_silu, "silu")
DYNAMICID_MINIMAL_CASE(test_binary_forward, "binary forward")
DYNAMICID_MINIMAL_CASE(test_binary_backward, "binary backward")
DYNAMICID_MINIMAL_CASE(test_reduce, "reduce")
DYNAMICID_MINIMAL_CASE(test_permute, "permute")
DYNAMICID_MINIMAL_CASE(test_slice, "slice")
DYNAMICID_MINIMAL_CASE(test_concat, "concat")
DYNAMICID_MINIMAL_CASE(test_half_forward, "f16 forward (skipped: f32 only)")
DYNAMICID_MINIMAL_CASE(test_random_streams, "random streams")
DYNAMICID_MINIMAL_CASE(test_large_pointwise, "large pointwise")
DYNAMICID_MINIMAL_CASE(test_large_gemm, "large gemm")

TEST_CASE("minimal: primitives it does not offer say so", "[matrix][minimal]") {
    using dynamicid::testing::minimal_backend;
    minimal_backend::context ctx;
    auto x = dynamicid::tensor<minimal_backend, float>::zeros(ctx, {1, 1, 2, 2});
    CHECK_THROWS_AS(dynamicid::ops::upsample_nearest(ctx, x), dynamicid::unsupported_error);
    CHECK_THROWS_AS(dynamicid::ops::unary(ctx, dynamicid::unary_op::gelu_erf, x), dynamicid::unsupported_error);
}
