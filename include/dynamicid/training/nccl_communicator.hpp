// dynamicid training: the NCCL model of the communicator concept.
//
// Optional add-on: include it and link the CMake target dynamicid::nccl
// (present when the CUDA toolkit and NCCL are found). Buffers are device
// memory; collectives are queued on the stream given at construction and a
// request is a CUDA event recorded after the queued reduction. Give it a
// stream of its own for the reductions to overlap the backward (the
// gradient_bucketer synchronises the backend before starting one).
#pragma once

#include <dynamicid/core/dtype.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/training/communicator.hpp>

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

namespace dynamicid::training {

namespace detail {

inline void check_nccl(ncclResult_t code, const char* what) {
    if (code != ncclSuccess) throw communication_error("nccl", std::string(what) + " failed: " + ncclGetErrorString(code));
}
inline void check_cuda_comm(cudaError_t code, const char* what) {
    if (code != cudaSuccess) throw communication_error("nccl", std::string(what) + " failed: " + cudaGetErrorString(code));
}

template <class T>
inline constexpr bool nccl_element = std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, half> ||
                                     std::is_same_v<T, bfloat16> || std::is_same_v<T, std::byte>;

template <class T>
ncclDataType_t nccl_type() {
    if constexpr (std::is_same_v<T, float>) return ncclFloat32;
    else if constexpr (std::is_same_v<T, double>) return ncclFloat64;
    else if constexpr (std::is_same_v<T, half>) return ncclFloat16;  // same bits as __half
    else if constexpr (std::is_same_v<T, bfloat16>) return ncclBfloat16;
    else return ncclUint8;
}

}  // namespace detail

/// A communicator over NCCL ranks (one GPU per process). The unique id is made
/// by rank 0 and shared out of band, e.g. over MPI:
///
///     ncclUniqueId id{};
///     if (mpi.rank() == 0) id = training::nccl_communicator::make_unique_id();
///     mpi.broadcast(std::as_writable_bytes(std::span(&id, 1)), 0);
///     training::nccl_communicator comm(mpi.rank(), mpi.size(), id, comm_stream);
class nccl_communicator {
public:
    /// A queued reduction: an event recorded on the communicator's stream after it.
    struct request {
        cudaEvent_t event = nullptr;
    };
    static constexpr memory_space memory = memory_space::device;

    static ncclUniqueId make_unique_id() {
        ncclUniqueId id{};
        detail::check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
        return id;
    }

    /// Joins the group of `size` ranks named by `id` as `rank`, on the current device.
    nccl_communicator(int rank, int size, const ncclUniqueId& id, cudaStream_t stream = nullptr) : stream_(stream) {
        check(size > 0 && rank >= 0 && rank < size, "nccl", "rank ", rank, " out of range for ", size, " ranks");
        detail::check_nccl(ncclCommInitRank(&comm_, size, id, rank), "ncclCommInitRank");
        rank_ = rank;
        size_ = size;
        const cudaError_t status = cudaMalloc(&scratch_, sizeof(float));
        if (status != cudaSuccess) {
            ncclCommDestroy(comm_);
            detail::check_cuda_comm(status, "cudaMalloc");
        }
    }
    nccl_communicator(const nccl_communicator&) = delete;
    nccl_communicator& operator=(const nccl_communicator&) = delete;
    ~nccl_communicator() {
        if (scratch_) cudaFree(scratch_);
        if (comm_) ncclCommDestroy(comm_);
    }

    int rank() const noexcept { return rank_; }
    int size() const noexcept { return size_; }
    ncclComm_t native() const noexcept { return comm_; }
    cudaStream_t stream() const noexcept { return stream_; }

    template <class T>
        requires detail::nccl_element<T>
    request start_allreduce_sum(std::span<T> values) {
        detail::check_nccl(ncclAllReduce(values.data(), values.data(), values.size(), detail::nccl_type<T>(), ncclSum, comm_, stream_),
                           "ncclAllReduce");
        request r;
        detail::check_cuda_comm(cudaEventCreateWithFlags(&r.event, cudaEventDisableTiming), "cudaEventCreate");
        const cudaError_t status = cudaEventRecord(r.event, stream_);
        if (status != cudaSuccess) {
            cudaEventDestroy(r.event);
            detail::check_cuda_comm(status, "cudaEventRecord");
        }
        return r;
    }

    void wait(request& r) {
        if (!r.event) return;
        const cudaError_t status = cudaEventSynchronize(r.event);
        cudaEventDestroy(std::exchange(r.event, nullptr));
        detail::check_cuda_comm(status, "cudaEventSynchronize");
    }

    template <class T>
        requires detail::nccl_element<T>
    void allreduce_sum(std::span<T> values) {
        auto r = start_allreduce_sum(values);
        wait(r);
    }

    template <class T>
        requires detail::nccl_element<T>
    void broadcast(std::span<T> values, int root) {
        check(root >= 0 && root < size_, "nccl", "broadcast root ", root, " out of range for ", size_, " ranks");
        detail::check_nccl(ncclBroadcast(values.data(), values.data(), values.size(), detail::nccl_type<T>(), root, comm_, stream_),
                           "ncclBroadcast");
        detail::check_cuda_comm(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }

    void barrier() {
        allreduce_sum(std::span<float>(static_cast<float*>(scratch_), 1));
    }

private:
    ncclComm_t comm_ = nullptr;
    cudaStream_t stream_ = nullptr;
    void* scratch_ = nullptr;
    int rank_ = 0, size_ = 1;
};
static_assert(communicator<nccl_communicator>);

}  // namespace dynamicid::training
