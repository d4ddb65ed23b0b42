// dynamicid test matrix: every body, and the list a backend's test file stamps out.
//
// A backend gets the whole matrix with one file:
//
//     #include <matrix/all.hpp>
//     #define CASE(body, what) TEST_CASE("mine: " what, "[matrix][mine]") { dynamicid::matrix::body<my_backend>(); }
//     DYNAMICID_MATRIX_BODIES(CASE)
#pragma once

#include <matrix/conv.hpp>
#include <matrix/layout.hpp>
#include <matrix/linear_algebra.hpp>
#include <matrix/norm.hpp>
#include <matrix/parallel.hpp>
#include <matrix/pointwise.hpp>
#include <matrix/precision.hpp>

// X(body, "description") for every body of the matrix.
#define DYNAMICID_MATRIX_BODIES(X)                          \
    X(test_gemm_forward, "gemm forward")                    \
    X(test_matmul_forward, "matmul forward")                \
    X(test_matmul_backward, "matmul backward")              \
    X(test_linear_backward, "linear backward")              \
    X(test_linear_needs, "linear needs")                    \
    X(test_attention_forward, "attention forward")          \
    X(test_attention_backward, "attention backward")        \
    X(test_conv2d_forward, "conv2d forward")                \
    X(test_conv2d_backward, "conv2d backward")              \
    X(test_conv2d_needs, "conv2d needs")                    \
    X(test_conv2d_tiled, "conv2d tiled")                    \
    X(test_upsample_nearest, "upsample_nearest")            \
    X(test_group_norm_forward, "group_norm forward")        \
    X(test_group_norm_backward, "group_norm backward")      \
    X(test_layer_norm_forward, "layer_norm forward")        \
    X(test_layer_norm_backward, "layer_norm backward")      \
    X(test_softmax_forward, "softmax forward")              \
    X(test_softmax_backward, "softmax backward")            \
    X(test_unary_ops, "unary ops")                          \
    X(test_silu, "silu")                                    \
    X(test_geglu, "geglu")                                  \
    X(test_binary_forward, "binary forward")                \
    X(test_binary_backward, "binary backward")              \
    X(test_reduce, "reduce")                                \
    X(test_permute, "permute")                              \
    X(test_slice, "slice")                                  \
    X(test_concat, "concat")                                \
    X(test_half_forward, "f16 forward")                     \
    X(test_bfloat16_forward, "bf16 forward")                \
    X(test_random_streams, "random streams")                \
    X(test_large_pointwise, "large pointwise")              \
    X(test_large_gemm, "large gemm")
