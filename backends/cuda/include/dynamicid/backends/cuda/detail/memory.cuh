// dynamicid cuda backend, internal: the caching device allocator.
//
// cudaMalloc and cudaFree synchronise the device and cost tens of
// microseconds; a model allocates thousands of short-lived activations per
// step. Freed blocks therefore go to size-bucketed free lists and are handed
// out again. Reuse is stream-ordered: a context runs all its work on one
// stream, so a block freed by the host while kernels still use it is only
// handed to work queued later on that same stream, which runs after them.
#pragma once

#include <dynamicid/backends/cuda/detail/common.cuh>

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace dynamicid::cuda::detail {

class device_pool {
public:
    device_pool() = default;
    device_pool(const device_pool&) = delete;
    device_pool& operator=(const device_pool&) = delete;
    ~device_pool() { release_cached(); }

    /// Sizes are rounded up to a bucket: 512 bytes below 1 MiB, else a quarter
    /// of the enclosing power of two (at most 25% slack), so that blocks of
    /// similar size share a free list.
    static std::size_t bucket(std::size_t bytes) {
        if (bytes <= (std::size_t{1} << 20)) return std::max<std::size_t>(512, (bytes + 511) / 512 * 512);
        std::size_t power = std::size_t{1} << 20;
        while (power * 2 <= bytes) power <<= 1;  // power <= bytes < 2 * power
        const std::size_t step = power / 4;
        return (bytes + step - 1) / step * step;
    }

    /// A block of at least `bytes` (rounded to its bucket); 256-byte aligned.
    void* acquire(std::size_t bytes) {
        const std::size_t size = bucket(bytes);
        {
            std::lock_guard lock(mutex_);
            auto it = free_.find(size);
            if (it != free_.end() && !it->second.empty()) {
                void* p = it->second.back();
                it->second.pop_back();
                cached_bytes_ -= size;
                return p;
            }
        }
        void* p = nullptr;
        cudaError_t status = cudaMalloc(&p, size);
        if (status == cudaErrorMemoryAllocation) {
            (void)cudaGetLastError();  // clear the error so that later launch checks do not report it
            release_cached();
            status = cudaMalloc(&p, size);
        }
        if (status != cudaSuccess) {
            (void)cudaGetLastError();
            check_cuda(status, ("cudaMalloc of " + std::to_string(size) + " bytes").c_str());
        }
        std::lock_guard lock(mutex_);
        allocated_bytes_ += size;
        return p;
    }

    /// Returns a block obtained from acquire(bytes). Never throws.
    void give_back(void* p, std::size_t bytes) noexcept {
        if (!p) return;
        const std::size_t size = bucket(bytes);
        try {
            std::lock_guard lock(mutex_);
            free_[size].push_back(p);
            cached_bytes_ += size;
        } catch (...) {
            (void)cudaFree(p);  // bookkeeping failed (out of host memory): give it to the driver
        }
    }

    /// Frees every cached (unused) block.
    void release_cached() noexcept {
        std::lock_guard lock(mutex_);
        for (auto& [size, blocks] : free_) {
            for (void* p : blocks) (void)cudaFree(p);
            allocated_bytes_ -= size * blocks.size();
        }
        free_.clear();
        cached_bytes_ = 0;
    }

    /// Bytes obtained from cudaMalloc and not yet freed (in use plus cached).
    std::size_t allocated_bytes() const {
        std::lock_guard lock(mutex_);
        return allocated_bytes_;
    }
    /// Bytes held in free lists.
    std::size_t cached_bytes() const {
        std::lock_guard lock(mutex_);
        return cached_bytes_;
    }

private:
    mutable std::mutex mutex_;
    std::map<std::size_t, std::vector<void*>> free_;
    std::size_t allocated_bytes_ = 0, cached_bytes_ = 0;
};

/// An owning device block of n elements of T from a pool.
template <class T>
class device_buffer {
public:
    device_buffer() = default;
    device_buffer(std::shared_ptr<device_pool> pool, std::size_t n) : size_(n) {
        if (n == 0) return;
        if (n > (std::size_t{1} << 62) / sizeof(T))
            throw value_error("cuda", "allocation of " + std::to_string(n) + " elements is too large");
        data_ = static_cast<T*>(pool->acquire(n * sizeof(T)));
        pool_ = std::move(pool);
    }
    device_buffer(device_buffer&& other) noexcept
        : pool_(std::move(other.pool_)), data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
    device_buffer& operator=(device_buffer&& other) noexcept {
        if (this != &other) {
            reset();
            pool_ = std::move(other.pool_);
            data_ = std::exchange(other.data_, nullptr);
            size_ = std::exchange(other.size_, 0);
        }
        return *this;
    }
    device_buffer(const device_buffer&) = delete;
    device_buffer& operator=(const device_buffer&) = delete;
    ~device_buffer() { reset(); }

    T* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }

private:
    void reset() noexcept {
        if (data_ && pool_) pool_->give_back(data_, size_ * sizeof(T));
        data_ = nullptr;
        size_ = 0;
        pool_.reset();
    }

    std::shared_ptr<device_pool> pool_;
    T* data_ = nullptr;
    std::size_t size_ = 0;
};

}  // namespace dynamicid::cuda::detail
