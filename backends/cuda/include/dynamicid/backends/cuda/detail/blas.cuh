// dynamicid cuda backend, internal: GEMM through cuBLAS and convolution through cuDNN.
#pragma once

#include <dynamicid/backends/cuda/detail/common.cuh>
#include <dynamicid/backends/cuda/detail/context.cuh>
#include <dynamicid/backends/cuda/detail/memory.cuh>
#include <dynamicid/backends/cuda/detail/pointwise.cuh>

#include <climits>
#include <cstddef>
#include <memory>

namespace dynamicid::cuda::detail {

template <class T> struct blas_types;
template <> struct blas_types<float> {
    static constexpr cudaDataType_t data = CUDA_R_32F;
    static constexpr cudnnDataType_t dnn = CUDNN_DATA_FLOAT, dnn_compute = CUDNN_DATA_FLOAT;
    using scale = float;
};
template <> struct blas_types<double> {
    static constexpr cudaDataType_t data = CUDA_R_64F;
    static constexpr cudnnDataType_t dnn = CUDNN_DATA_DOUBLE, dnn_compute = CUDNN_DATA_DOUBLE;
    using scale = double;
};
template <> struct blas_types<half> {
    static constexpr cudaDataType_t data = CUDA_R_16F;
    static constexpr cudnnDataType_t dnn = CUDNN_DATA_HALF, dnn_compute = CUDNN_DATA_FLOAT;
    using scale = float;
};
template <> struct blas_types<bfloat16> {
    static constexpr cudaDataType_t data = CUDA_R_16BF;
    static constexpr cudnnDataType_t dnn = CUDNN_DATA_BFLOAT16, dnn_compute = CUDNN_DATA_FLOAT;
    using scale = float;
};

inline int to_int(index_t v, const char* what) {
    check<unsupported_error>(v >= 0 && v <= INT_MAX, "cuda", what, " = ", v, " does not fit the library's 32-bit sizes");
    return static_cast<int>(v);
}

// ---- GEMM -------------------------------------------------------------------------

/// Row-major C = alpha op(A) op(B) + beta C, as cuBLAS's column-major
/// C^T = alpha op(B)^T op(A)^T: a row-major matrix with leading dimension ld is
/// the column-major transpose with the same ld, so the operands swap and keep
/// their transpose flags. f16/bf16 multiply on tensor cores and accumulate in f32.
template <class T>
void gemm(context_state& state, bool allow_tf32, const gemm_desc& d, const T* a, const T* b, T* c) {
    if (d.batch <= 0 || d.m <= 0 || d.n <= 0) return;
    using S = typename blas_types<T>::scale;
    const S alpha = static_cast<S>(d.alpha), beta = static_cast<S>(d.beta);
    cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
    if constexpr (std::is_same_v<T, double>) compute = CUBLAS_COMPUTE_64F;
    else if constexpr (std::is_same_v<T, float>) compute = allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const auto type = blas_types<T>::data;
    const auto ld = [](index_t v) { return std::max<index_t>(v, 1); };
    check_cublas(cublasGemmStridedBatchedEx(state.cublas(), d.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, d.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                            to_int(d.n, "gemm n"), to_int(d.m, "gemm m"), to_int(d.k, "gemm k"), &alpha, b, type,
                                            to_int(ld(d.ldb), "gemm ldb"), static_cast<long long>(d.stride_b), a, type,
                                            to_int(ld(d.lda), "gemm lda"), static_cast<long long>(d.stride_a), &beta, c, type,
                                            to_int(ld(d.ldc), "gemm ldc"), static_cast<long long>(d.stride_c),
                                            to_int(d.batch, "gemm batch"), compute, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmStridedBatchedEx");
}

// ---- convolution ------------------------------------------------------------------

inline constexpr std::size_t conv_workspace_limit = std::size_t{1} << 30;

template <class T>
int type_code() {
    if constexpr (std::is_same_v<T, float>) return 0;
    else if constexpr (std::is_same_v<T, double>) return 1;
    else if constexpr (std::is_same_v<T, half>) return 2;
    else return 3;
}

/// The plan for (d, kind, T): descriptors plus the algorithm cuDNN's
/// heuristics rank first among those that fit the workspace limit. Built once
/// per shape and kept in the context.
template <class T>
conv_plan& conv_plan_for(context_state& state, bool allow_tf32, const conv2d_desc& d, conv_kind kind) {
    conv_key key;
    key.sizes = {d.n, d.c_in, d.h, d.w, d.c_out, d.kh, d.kw, d.stride_h, d.stride_w, d.pad_h, d.pad_w, d.dilation_h, d.dilation_w,
                 d.groups, 0};
    key.type = type_code<T>();
    key.kind = kind;
    key.tf32 = std::is_same_v<T, float> && allow_tf32;
    if (conv_plan* found = state.find_plan(key)) return *found;

    check<value_error>(d.groups > 0 && d.c_in % d.groups == 0 && d.c_out % d.groups == 0, "cuda", "conv2d channels ", d.c_in, " -> ",
                       d.c_out, " do not divide into ", d.groups, " groups");
    const cudnnDataType_t type = blas_types<T>::dnn, compute = blas_types<T>::dnn_compute;
    cudnnMathType_t math = CUDNN_DEFAULT_MATH;
    if constexpr (std::is_same_v<T, float>) math = allow_tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
    else if constexpr (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>) math = CUDNN_TENSOR_OP_MATH;

    auto plan = std::make_unique<conv_plan>();
    check_cudnn(cudnnCreateTensorDescriptor(&plan->x), "cudnnCreateTensorDescriptor");
    check_cudnn(cudnnCreateTensorDescriptor(&plan->y), "cudnnCreateTensorDescriptor");
    check_cudnn(cudnnCreateFilterDescriptor(&plan->w), "cudnnCreateFilterDescriptor");
    check_cudnn(cudnnCreateConvolutionDescriptor(&plan->conv), "cudnnCreateConvolutionDescriptor");
    check_cudnn(cudnnSetTensor4dDescriptor(plan->x, CUDNN_TENSOR_NCHW, type, to_int(d.n, "conv2d n"), to_int(d.c_in, "conv2d c_in"),
                                           to_int(d.h, "conv2d h"), to_int(d.w, "conv2d w")),
                "cudnnSetTensor4dDescriptor(x)");
    check_cudnn(cudnnSetFilter4dDescriptor(plan->w, type, CUDNN_TENSOR_NCHW, to_int(d.c_out, "conv2d c_out"),
                                           to_int(d.c_in / d.groups, "conv2d c_in/groups"), to_int(d.kh, "conv2d kh"),
                                           to_int(d.kw, "conv2d kw")),
                "cudnnSetFilter4dDescriptor");
    check_cudnn(cudnnSetConvolution2dDescriptor(plan->conv, to_int(d.pad_h, "pad"), to_int(d.pad_w, "pad"), to_int(d.stride_h, "stride"),
                                                to_int(d.stride_w, "stride"), to_int(d.dilation_h, "dilation"),
                                                to_int(d.dilation_w, "dilation"), CUDNN_CROSS_CORRELATION, compute),
                "cudnnSetConvolution2dDescriptor");
    check_cudnn(cudnnSetConvolutionGroupCount(plan->conv, to_int(d.groups, "groups")), "cudnnSetConvolutionGroupCount");
    check_cudnn(cudnnSetConvolutionMathType(plan->conv, math), "cudnnSetConvolutionMathType");
    check_cudnn(cudnnSetTensor4dDescriptor(plan->y, CUDNN_TENSOR_NCHW, type, to_int(d.n, "conv2d n"), to_int(d.c_out, "conv2d c_out"),
                                           to_int(d.out_h(), "conv2d out_h"), to_int(d.out_w(), "conv2d out_w")),
                "cudnnSetTensor4dDescriptor(y)");

    cudnnHandle_t handle = state.cudnn();
    // Ranks candidates; takes the first that runs, fits the workspace limit and
    // honours the math type (no TF32 for f32 unless allowed).
    const auto choose = [&](auto* perf, int returned) {
        for (int i = 0; i < returned; ++i) {
            if (perf[i].status != CUDNN_STATUS_SUCCESS || perf[i].memory > conv_workspace_limit) continue;
            if (math == CUDNN_FMA_MATH && perf[i].mathType != CUDNN_FMA_MATH && perf[i].mathType != CUDNN_DEFAULT_MATH) continue;
            check_cudnn(cudnnSetConvolutionMathType(plan->conv, perf[i].mathType == CUDNN_DEFAULT_MATH && math == CUDNN_FMA_MATH
                                                                      ? CUDNN_FMA_MATH
                                                                      : perf[i].mathType),
                        "cudnnSetConvolutionMathType");
            plan->algorithm = static_cast<int>(perf[i].algo);
            return true;
        }
        return false;
    };
    int returned = 0;
    bool found = false;
    switch (kind) {
        case conv_kind::forward: {
            cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
            check_cudnn(cudnnGetConvolutionForwardAlgorithm_v7(handle, plan->x, plan->w, plan->conv, plan->y,
                                                               CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &returned, perf),
                        "cudnnGetConvolutionForwardAlgorithm_v7");
            found = choose(perf, returned);
            if (found)
                check_cudnn(cudnnGetConvolutionForwardWorkspaceSize(handle, plan->x, plan->w, plan->conv, plan->y,
                                                                    static_cast<cudnnConvolutionFwdAlgo_t>(plan->algorithm),
                                                                    &plan->workspace_bytes),
                            "cudnnGetConvolutionForwardWorkspaceSize");
            break;
        }
        case conv_kind::backward_data: {
            cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
            check_cudnn(cudnnGetConvolutionBackwardDataAlgorithm_v7(handle, plan->w, plan->y, plan->conv, plan->x,
                                                                    CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &returned, perf),
                        "cudnnGetConvolutionBackwardDataAlgorithm_v7");
            found = choose(perf, returned);
            if (found)
                check_cudnn(cudnnGetConvolutionBackwardDataWorkspaceSize(handle, plan->w, plan->y, plan->conv, plan->x,
                                                                         static_cast<cudnnConvolutionBwdDataAlgo_t>(plan->algorithm),
                                                                         &plan->workspace_bytes),
                            "cudnnGetConvolutionBackwardDataWorkspaceSize");
            break;
        }
        case conv_kind::backward_weight: {
            cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
            check_cudnn(cudnnGetConvolutionBackwardFilterAlgorithm_v7(handle, plan->x, plan->y, plan->conv, plan->w,
                                                                      CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &returned, perf),
                        "cudnnGetConvolutionBackwardFilterAlgorithm_v7");
            found = choose(perf, returned);
            if (found)
                check_cudnn(cudnnGetConvolutionBackwardFilterWorkspaceSize(
                                handle, plan->x, plan->y, plan->conv, plan->w,
                                static_cast<cudnnConvolutionBwdFilterAlgo_t>(plan->algorithm), &plan->workspace_bytes),
                            "cudnnGetConvolutionBackwardFilterWorkspaceSize");
            break;
        }
    }
    check<unsupported_error>(found, "cuda", "cuDNN has no convolution algorithm for this shape and element type");
    return *state.store_plan(key, std::move(plan));
}

template <class T>
void conv2d_forward(context_state& state, bool allow_tf32, const conv2d_desc& d, const T* x, const T* w, const T* bias, T* y) {
    if (d.n == 0 || d.c_out == 0 || d.out_h() <= 0 || d.out_w() <= 0) return;
    conv_plan& plan = conv_plan_for<T>(state, allow_tf32, d, conv_kind::forward);
    using S = typename blas_types<T>::scale;
    const S one = 1, zero = 0;
    device_buffer<std::byte> workspace(state.pool(), plan.workspace_bytes);
    check_cudnn(cudnnConvolutionForward(state.cudnn(), &one, plan.x, x, plan.w, w, plan.conv,
                                        static_cast<cudnnConvolutionFwdAlgo_t>(plan.algorithm), workspace.data(), plan.workspace_bytes,
                                        &zero, plan.y, y),
                "cudnnConvolutionForward");
    if (bias) {
        const index_t spatial = d.out_h() * d.out_w();
        const index_t total = d.n * d.c_out * spatial;
        if (total < (index_t{1} << 31))
            add_channel_bias_kernel<T, std::uint32_t><<<grid_for(total), block_threads, 0, state.stream()>>>(
                static_cast<std::uint32_t>(d.n), static_cast<std::uint32_t>(d.c_out), static_cast<std::uint32_t>(spatial), bias, y);
        else
            add_channel_bias_kernel<T, index_t><<<grid_for(total), block_threads, 0, state.stream()>>>(d.n, d.c_out, spatial, bias, y);
        check_launch("add_channel_bias_kernel");
    }
}

template <class T>
void conv2d_backward_data(context_state& state, bool allow_tf32, const conv2d_desc& d, const T* w, const T* dy, T* dx) {
    if (d.n == 0 || d.c_in == 0 || d.h == 0 || d.w == 0) return;
    conv_plan& plan = conv_plan_for<T>(state, allow_tf32, d, conv_kind::backward_data);
    using S = typename blas_types<T>::scale;
    const S one = 1, zero = 0;
    device_buffer<std::byte> workspace(state.pool(), plan.workspace_bytes);
    check_cudnn(cudnnConvolutionBackwardData(state.cudnn(), &one, plan.w, w, plan.y, dy, plan.conv,
                                             static_cast<cudnnConvolutionBwdDataAlgo_t>(plan.algorithm), workspace.data(),
                                             plan.workspace_bytes, &zero, plan.x, dx),
                "cudnnConvolutionBackwardData");
}

template <class T>
void conv2d_backward_weight(context_state& state, bool allow_tf32, const conv2d_desc& d, const T* x, const T* dy, T* dw, T* dbias) {
    if (dw) {
        conv_plan& plan = conv_plan_for<T>(state, allow_tf32, d, conv_kind::backward_weight);
        using S = typename blas_types<T>::scale;
        const S one = 1, zero = 0;
        device_buffer<std::byte> workspace(state.pool(), plan.workspace_bytes);
        check_cudnn(cudnnConvolutionBackwardFilter(state.cudnn(), &one, plan.x, x, plan.y, dy, plan.conv,
                                                   static_cast<cudnnConvolutionBwdFilterAlgo_t>(plan.algorithm), workspace.data(),
                                                   plan.workspace_bytes, &zero, plan.w, dw),
                    "cudnnConvolutionBackwardFilter");
    }
    if (dbias && d.c_out > 0) {
        channel_sum_kernel<T><<<static_cast<unsigned>(d.c_out), block_threads, 0, state.stream()>>>(d.n, d.c_out, d.out_h() * d.out_w(), dy,
                                                                                                  dbias);
        check_launch("channel_sum_kernel");
    }
}

}  // namespace dynamicid::cuda::detail
