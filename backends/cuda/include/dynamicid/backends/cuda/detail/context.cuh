// dynamicid cuda backend, internal: the state behind a context (stream,
// library handles, allocator, per-shape caches).
#pragma once

#include <dynamicid/backends/cuda/detail/common.cuh>
#include <dynamicid/backends/cuda/detail/memory.cuh>

#include <cublas_v2.h>
#include <cudnn.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace dynamicid::cuda::detail {

inline void check_cublas(cublasStatus_t status, const char* what) {
    if (status == CUBLAS_STATUS_SUCCESS) return;
    const std::string message = std::string(what) + " failed: " + cublasGetStatusName(status) + " (" + cublasGetStatusString(status) + ")";
    if (status == CUBLAS_STATUS_ALLOC_FAILED) throw cuda_out_of_memory("cuda", message);
    throw cuda_error("cuda", message);
}

inline void check_cudnn(cudnnStatus_t status, const char* what) {
    if (status == CUDNN_STATUS_SUCCESS) return;
    const std::string message = std::string(what) + " failed: " + cudnnGetErrorString(status);
    if (status == CUDNN_STATUS_ALLOC_FAILED) throw cuda_out_of_memory("cuda", message);
    throw cuda_error("cuda", message);
}

/// Which cuDNN convolution a cached plan runs.
enum class conv_kind : int { forward, backward_data, backward_weight };

/// Cache key: the descriptor's sizes, the element type and the direction.
struct conv_key {
    std::array<index_t, 15> sizes{};
    int type = 0;
    conv_kind kind = conv_kind::forward;
    bool tf32 = false;
    friend bool operator<(const conv_key& a, const conv_key& b) {
        if (a.type != b.type) return a.type < b.type;
        if (a.kind != b.kind) return a.kind < b.kind;
        if (a.tf32 != b.tf32) return a.tf32 < b.tf32;
        return a.sizes < b.sizes;
    }
};

/// cuDNN descriptors and the chosen algorithm for one convolution shape.
struct conv_plan {
    cudnnTensorDescriptor_t x = nullptr, y = nullptr;
    cudnnFilterDescriptor_t w = nullptr;
    cudnnConvolutionDescriptor_t conv = nullptr;
    int algorithm = 0;  // cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t, by kind
    std::size_t workspace_bytes = 0;

    conv_plan() = default;
    conv_plan(const conv_plan&) = delete;
    conv_plan& operator=(const conv_plan&) = delete;
    ~conv_plan() {
        if (x) cudnnDestroyTensorDescriptor(x);
        if (y) cudnnDestroyTensorDescriptor(y);
        if (w) cudnnDestroyFilterDescriptor(w);
        if (conv) cudnnDestroyConvolutionDescriptor(conv);
    }
};

/// Pinned host blocks that hold the bytes of host-to-device copies recorded
/// in a CUDA graph. A recorded copy reads its source each time the graph runs,
/// and the runtime cannot record copies from pageable memory at all, so the
/// bytes are copied here at capture and kept for the graph's lifetime.
class upload_stage {
public:
    upload_stage() = default;
    upload_stage(const upload_stage&) = delete;
    upload_stage& operator=(const upload_stage&) = delete;
    ~upload_stage() {
        for (auto& b : blocks_) (void)cudaFreeHost(b.data);
    }

    /// A pinned copy of `bytes` bytes of `host`.
    const void* stage(const void* host, std::size_t bytes) {
        const std::size_t need = (bytes + 255) / 256 * 256;
        if (blocks_.empty() || blocks_.back().capacity - blocks_.back().used < need) {
            block fresh;
            fresh.capacity = std::max<std::size_t>(std::size_t{1} << 16, need);
            check_cuda(cudaHostAlloc(&fresh.data, fresh.capacity, cudaHostAllocDefault), "cudaHostAlloc (graph upload stage)");
            blocks_.push_back(fresh);
        }
        auto& b = blocks_.back();
        void* out = static_cast<std::byte*>(b.data) + b.used;
        std::memcpy(out, host, bytes);
        b.used += need;
        return out;
    }

private:
    struct block {
        void* data = nullptr;
        std::size_t capacity = 0, used = 0;
    };
    std::vector<block> blocks_;
};

/// Everything a context owns. Library handles are created on first use, so a
/// context that only moves memory never loads cuBLAS or cuDNN.
class context_state {
public:
    explicit context_state(cudaStream_t external) {
        check_cuda(cudaGetDevice(&device_), "cudaGetDevice");
        if (external) {
            stream_ = external;
        } else {
            check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
            owns_stream_ = true;
        }
        check_cuda(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_), "cudaDeviceGetAttribute");
        check_cuda(cudaDeviceGetAttribute(&cc_major_, cudaDevAttrComputeCapabilityMajor, device_), "cudaDeviceGetAttribute");
        check_cuda(cudaDeviceGetAttribute(&max_shared_optin_, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_),
                   "cudaDeviceGetAttribute");
        pool_ = std::make_shared<device_pool>();
    }
    context_state(const context_state&) = delete;
    context_state& operator=(const context_state&) = delete;
    ~context_state() {
        // Queued work may still use pooled blocks and plans: let it finish first.
        (void)cudaStreamSynchronize(stream_);
        conv_plans_.clear();
        if (cudnn_) cudnnDestroy(cudnn_);
        if (cublas_) cublasDestroy(cublas_);
        cublas_workspace_ = {};
        if (owns_stream_) (void)cudaStreamDestroy(stream_);
        pool_->release_cached();
    }

    cudaStream_t stream() const noexcept { return stream_; }
    int device() const noexcept { return device_; }
    int sm_count() const noexcept { return sm_count_; }
    int max_shared_optin() const noexcept { return max_shared_optin_; }
    /// Compute capability major version (8: Ampere, 9: Hopper).
    int compute_major() const noexcept { return cc_major_; }
    /// The allocator work draws from: the context's, or a graph's own while it is being captured.
    const std::shared_ptr<device_pool>& pool() const noexcept { return capture_pool_ ? capture_pool_ : pool_; }

    cublasHandle_t cublas() {
        if (!cublas_) {
            check_cublas(cublasCreate(&cublas_), "cublasCreate");
            check_cublas(cublasSetStream(cublas_, stream_), "cublasSetStream");
            check_cublas(cublasSetPointerMode(cublas_, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
            // A workspace of our own, so that cuBLAS allocates nothing while a
            // graph is being captured (32 MiB is what Hopper's kernels ask for).
            cublas_workspace_ = device_buffer<std::byte>(pool_, cublas_workspace_bytes);  // never a graph's pool
            check_cublas(cublasSetWorkspace(cublas_, cublas_workspace_.data(), cublas_workspace_bytes), "cublasSetWorkspace");
        }
        return cublas_;
    }

    cudnnHandle_t cudnn() {
        if (!cudnn_) {
            check_cudnn(cudnnCreate(&cudnn_), "cudnnCreate");
            check_cudnn(cudnnSetStream(cudnn_, stream_), "cudnnSetStream");
        }
        return cudnn_;
    }

    /// The cached plan for `key`, or null.
    conv_plan* find_plan(const conv_key& key) {
        const auto it = conv_plans_.find(key);
        return it == conv_plans_.end() ? nullptr : it->second.get();
    }
    conv_plan* store_plan(const conv_key& key, std::unique_ptr<conv_plan> plan) {
        auto& slot = conv_plans_[key];
        slot = std::move(plan);
        return slot.get();
    }

    // ---- graph capture (cuda_backend::step_graph) ------------------------------

    /// True while the context's stream is being captured into a graph.
    bool capturing() const noexcept { return capture_uploads_ != nullptr; }
    /// While capturing, allocations come from `pool` (the graph's, so that
    /// nothing outside the graph reuses its memory between launches) and host
    /// uploads are staged in `uploads`.
    void begin_capture(std::shared_ptr<device_pool> pool, upload_stage* uploads) noexcept {
        capture_pool_ = std::move(pool);
        capture_uploads_ = uploads;
    }
    void end_capture() noexcept {
        capture_pool_.reset();
        capture_uploads_ = nullptr;
    }
    upload_stage& uploads() noexcept { return *capture_uploads_; }

    static constexpr std::size_t cublas_workspace_bytes = std::size_t{32} << 20;

private:
    cudaStream_t stream_ = nullptr;
    bool owns_stream_ = false;
    int device_ = 0, sm_count_ = 1, max_shared_optin_ = 48 * 1024, cc_major_ = 0;
    std::shared_ptr<device_pool> pool_;
    cublasHandle_t cublas_ = nullptr;
    cudnnHandle_t cudnn_ = nullptr;
    std::map<conv_key, std::unique_ptr<conv_plan>> conv_plans_;
    device_buffer<std::byte> cublas_workspace_;
    std::shared_ptr<device_pool> capture_pool_;
    upload_stage* capture_uploads_ = nullptr;
};

}  // namespace dynamicid::cuda::detail
